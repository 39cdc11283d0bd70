"""Decoding: greedy, and beam search with the lexicon and word LM of the training transcripts."""

import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import nas.decode
import nas.train
from nas.data.corpus import resolve_data
from nas.data.manifest import read_manifest
from nas.data.text import normalize
from nas.data.tokenizer import Tokenizer
from nas.decode import BeamDecoder, BeamSettings, build_lm, greedy_decode, kenlm_layout, tune_decoder
from nas.schedule import load_schedule
from nas.train import train


def texts(corpus_dir, split) -> list[str]:
    return [normalize(u.text) for u in read_manifest(corpus_dir / f"{split}.jsonl")]


def spelled(tokenizer: Tokenizer, sentence: str, wrong: float, seed: int = 0) -> torch.Tensor:
    """Log-probs ``(1, T, V)`` that spell ``sentence`` (a class then two blanks per piece), where a
    share ``wrong`` of the letters is misspelled: another letter wins that frame, the right one a
    close second. A model that hears the right sounds and spells them wrong."""
    rng = random.Random(seed)
    ids = tokenizer.encode(sentence)
    letters = [i + 1 for i, p in enumerate(tokenizer.piece_list()) if re.fullmatch("[a-z]", p)]
    logits = torch.full((1, 3 * len(ids), tokenizer.vocab_size), -8.0)
    for t, c in enumerate(ids):
        if rng.random() < wrong and c in letters:
            logits[0, 3 * t, c] = -1.0
            c = rng.choice([x for x in letters if x != c])
        logits[0, 3 * t, c] = 0.0
        logits[0, 3 * t + 1 : 3 * t + 3, 0] = 0.0  # the blank
    return logits.log_softmax(-1)


def test_beam_search_with_the_lm_spells_the_words_greedy_decoding_misspells(tiny_corpus_dir, tmp_path):
    train_texts = texts(tiny_corpus_dir, "train")
    tokenizer = Tokenizer.train(train_texts, 40, "char", tmp_path / "tok.model")
    lm = build_lm(train_texts, tokenizer, tmp_path / "lm")
    decoder = BeamDecoder(lm, BeamSettings(beam=50, lm_weight=2.0, word_score=0.0))
    sentences = sorted(train_texts, key=len)[-5:]  # the longest: the LM has the most context
    greedy_right = beam_right = 0
    for i, sentence in enumerate(sentences):
        log_probs = spelled(tokenizer, sentence, wrong=0.12, seed=i)
        lengths = torch.tensor([log_probs.shape[1]])
        greedy_right += greedy_decode(log_probs, lengths, tokenizer)[0] == sentence
        beam_right += decoder(log_probs, lengths)[0] == sentence
    assert greedy_right <= 1 and beam_right >= 4, (greedy_right, beam_right)


def test_the_arpa_file_is_laid_out_as_kenlm_reads_it():
    arpa = "Corpus: 2 sentences\n\n\\data\\\nngram 1=2\nngram 2=1\n\n\\1-grams:\n-1.0 <s> -0.3\n-0.5 a\n\n" \
           "\\2-grams:\n-0.2 <s> a\n\n\\end\\\n"
    assert kenlm_layout(arpa) == ("\\data\\\nngram 1=2\nngram 2=1\n\n\\1-grams:\n-1.0\t<s>\t-0.3\n-0.5\ta\n\n"
                                  "\\2-grams:\n-0.2\t<s> a\n\n\\end\\\n")


def test_the_lm_and_lexicon_are_built_from_training_text_only(tiny_corpus_dir, tmp_path, monkeypatch):
    seen = []

    def spy(train_texts, *args, **kwargs):
        seen.append(list(train_texts))
        return build_lm(train_texts, *args, **kwargs)

    monkeypatch.setattr(nas.train, "build_lm", spy)
    arch = nas.train.ArchConfig.from_dict({"frontend": {"channels": 8}, "vocab_size": 40, "encoder": {
        "d_model": 32, "n_heads": 2, "ffn_dim": 64, "n_layers": 2, "conv_kernel": 7}})
    schedule = load_schedule("tiny").model_copy(update={"decode": "beam"})
    m = train(arch, schedule, resolve_data(f"manifest:{tiny_corpus_dir}"), tmp_path / "run", progress=False,
              threads=2)

    train_texts, held_out = texts(tiny_corpus_dir, "train"), texts(tiny_corpus_dir, "dev") + texts(tiny_corpus_dir, "test")
    assert len(seen) == 1 and sorted(seen[0]) == sorted(train_texts)
    assert not set(held_out) & set(seen[0])  # no dev or test sentence went into the LM
    train_words = {w for t in train_texts for w in t.split()}
    unseen = {w for t in held_out for w in t.split()} - train_words
    assert unseen, "the held-out sentences must have words of their own, or this test proves nothing"
    lm = tmp_path / "run" / "lm"
    lexicon = {line.split("\t")[0] for line in (lm / "lexicon.txt").read_text().splitlines()}
    assert lexicon == train_words
    arpa = (lm / "lm.arpa").read_text()
    unigrams = arpa[arpa.index("\\1-grams:"):arpa.index("\\2-grams:")].splitlines()[1:]
    assert {line.split("\t")[1] for line in unigrams if line} == train_words | {"<s>", "</s>"}
    # The beam search ran on dev and test, its settings tuned on dev; greedy is reported beside it.
    assert m["decoder"]["tuned_on"].startswith("dev") and m["decoder"]["lm"]["source"] == "training transcripts only"
    for split in ("dev", "test"):
        assert {"wer", "cer", "beam_wer", "beam_cer", "decode_s", "forward_s"} <= m[split].keys()
        assert m[split]["decode_workers"] == 2  # a process per thread: the cores the forward passes had
    assert not nas.decode._POOLS  # the trainer stopped its decoding processes once it had decoded


def padded(batch: list[torch.Tensor], filler: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1, T, V)`` log-probs as one batch, padded with ``filler``'s frames (words spelled out: a
    decoder that read past an utterance's length would add them)."""
    T = max(lp.shape[1] for lp in batch)
    out = filler[:, :T].repeat(len(batch), 1, 1)
    for i, lp in enumerate(batch):
        out[i, : lp.shape[1]] = lp[0]
    return out, torch.tensor([lp.shape[1] for lp in batch])


def test_worker_processes_decode_what_one_process_decodes(tiny_corpus_dir, tmp_path):
    train_texts = texts(tiny_corpus_dir, "train")
    tokenizer = Tokenizer.train(train_texts, 40, "char", tmp_path / "tok.model")
    lm = build_lm(train_texts, tokenizer, tmp_path / "lm")
    sentences = sorted(train_texts, key=len)[-9:]
    spelled_out = [spelled(tokenizer, s, 0.12, seed=i) for i, s in enumerate(sentences)]
    filler = spelled(tokenizer, " ".join(["the"] * 100), 0.0)
    batches = [padded(spelled_out[i : i + 4], filler) for i in range(0, len(spelled_out), 4)]  # 4, 4 and 1 utterances
    settings = BeamSettings(beam=50, lm_weight=2.0, word_score=0.0)
    alone = BeamDecoder(lm, settings).decode(batches)
    assert sum(h == s for h, s in zip(alone, sentences)) >= 7  # it spells them: the order below means something
    assert BeamDecoder(lm, settings, workers=2).decode(batches) == alone
    # The LM directory rebuilt in place, from other text: the workers load it again.
    build_lm([t for t in train_texts if t not in sentences[:4]], tokenizer, lm)
    rebuilt = BeamDecoder(lm, settings).decode(batches)
    assert rebuilt != alone and BeamDecoder(lm, settings, workers=2).decode(batches) == rebuilt


def test_the_tuner_keeps_the_fastest_pruning_that_costs_no_more_than_its_tolerance(tiny_corpus_dir, tmp_path):
    train_texts = texts(tiny_corpus_dir, "train")
    tokenizer = Tokenizer.train(train_texts, 40, "char", tmp_path / "tok.model")
    lm = build_lm(train_texts, tokenizer, tmp_path / "lm")
    sentences = sorted(train_texts, key=len)[-5:]
    outputs = [(lp, torch.tensor([lp.shape[1]])) for lp in (spelled(tokenizer, s, 0.12, seed=i)
                                                            for i, s in enumerate(sentences))]
    # the right letter is a close second where a letter is wrong: 5 classes a frame still hold it,
    # 1 class a frame with a single hypothesis cannot spell the words back
    pruning = ((50, 10, 25.0), (50, 5, 25.0), (1, 1, 0.0))
    settings, wer = tune_decoder(lm, outputs, sentences, lm_weights=(2.0,), word_scores=(0.0,), pruning=pruning,
                                 tolerance=0.0)
    assert (settings.beam, settings.beam_tokens, settings.beam_threshold) == (50, 5, 25.0) and wer <= 0.1
    assert (settings.lm_weight, settings.word_score) == (2.0, 0.0)
    loose, loose_wer = tune_decoder(lm, outputs, sentences, lm_weights=(2.0,), word_scores=(0.0,), pruning=pruning,
                                    tolerance=1.0)
    assert (loose.beam, loose.beam_tokens) == (1, 1) and loose_wer > wer  # the fastest, and worse


def test_the_decode_benchmark_redecodes_a_run_as_its_trainer_did(tiny_corpus_dir, tmp_path):
    from nas.bench.decode import bench_decode
    from nas.errors import UserError

    arch = nas.train.ArchConfig.from_dict({"frontend": {"channels": 8}, "vocab_size": 40, "encoder": {
        "d_model": 32, "n_heads": 2, "ffn_dim": 64, "n_layers": 2, "conv_kernel": 7}})
    run = tmp_path / "run"
    schedule = load_schedule("tiny").model_copy(update={"decode": "beam", "steps": 150, "peak_lr": 1e-2, "eval_every": 150})
    m = train(arch, schedule, resolve_data(f"manifest:{tiny_corpus_dir}"), run, progress=False)
    assert 0 < m["test"]["beam_cer"] < 1, "the model must spell something, or reproducing its WER proves nothing"
    pruning = ((50, 10, 30.0), (2, 2, 5.0))
    figures = bench_decode([run], pruning=pruning, threads=2, repeats=1)

    d, rows = m["decoder"], figures["run.pruning"]
    own = (d["beam"], d["beam_tokens"], d["beam_threshold"])
    assert own not in pruning  # so the run's own pruning is added, last
    assert [(r["beam"], r["classes"], r["threshold"]) for r in rows] == [*pruning, own]
    assert [r["tuned"] for r in rows] == [False, False, True]
    # the row of the run's own settings decodes as the trainer's final evaluation did
    assert (rows[-1]["test_wer"], rows[-1]["test_cer"]) == (round(m["test"]["beam_wer"], 4), round(m["test"]["beam_cer"], 4))
    assert figures["run.reproduces_metrics"] is True and figures["run.data"] == f"manifest:{tiny_corpus_dir}"
    assert (figures["run.lm_weight"], figures["run.word_score"]) == (d["lm_weight"], d["word_score"])
    for r in rows:
        assert r["decode_share"] > 0 and r["decode_share_1_worker"] > 0
        assert r["meets_goals"] == (r["test_wer"] <= 0.15 and r["test_cer"] <= 0.06 and r["decode_share"] <= 0.25)
    # two processes decode what one does, where the beam is wide enough that hypotheses rarely tie
    # (flashlight orders tied hypotheses by their trie nodes' addresses, which differ between processes)
    assert [r["workers_agree"] for r in rows if r["beam"] >= 16] == [True, True]
    # the test words a lexicon-constrained search can never spell: those of no training transcript
    train_words = {w for t in texts(tiny_corpus_dir, "train") for w in t.split()}
    words = [w for t in texts(tiny_corpus_dir, "test") for w in t.split()]
    unseen = [w for w in words if w not in train_words]
    assert unseen and figures["run.test_words_outside_lexicon"] == round(len(unseen) / len(words), 4)
    assert figures["run.test_chars_outside_lexicon"] == round(sum(map(len, unseen)) / sum(map(len, words)), 4)

    # a run that decoded greedily has nothing to re-decode: one line naming its metrics.json
    (run / "metrics.json").write_text(json.dumps({k: v for k, v in m.items() if k != "decoder"}))
    with pytest.raises(UserError, match=r"metrics.json: decoder: the run did not decode with beam search"):
        bench_decode([run])


def test_decoding_workers_leave_when_the_process_that_started_them_is_killed(tiny_corpus_dir, tmp_path):
    """A Ray trial is stopped with SIGKILL: its decoding processes must not wait for tasks for ever."""
    train_texts = texts(tiny_corpus_dir, "train")
    lm = build_lm(train_texts, Tokenizer.train(train_texts, 40, "char", tmp_path / "tok.model"), tmp_path / "lm")
    script = ("import sys, time\nfrom nas.decode import BeamDecoder, _POOLS\n"
              "if __name__ == '__main__':\n"
              f"    BeamDecoder({str(lm)!r}, workers=2)\n"
              "    print(*_POOLS[2]._pool._processes, flush=True)\n"
              "    time.sleep(120)\n")
    (tmp_path / "start.py").write_text(script)
    child = subprocess.Popen([sys.executable, str(tmp_path / "start.py")], stdout=subprocess.PIPE, text=True)
    workers = [int(pid) for pid in child.stdout.readline().split()]
    assert len(workers) == 2
    child.kill()
    child.wait()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in workers)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status
