"""The trainer: the whole chain learns, runs resume, bad data and divergence are handled."""

import json
import shutil

import pytest
import torch

import nas.schedule
from nas.config import ArchConfig
from nas.data.corpus import resolve_data
from damage import corrupt_flac
from nas.data.manifest import Utterance, read_manifest, write_manifest
from nas.data.tokenizer import Tokenizer
from nas.errors import UserError
from nas.schedule import Schedule, load_schedule
from nas.decode import greedy_decode
from nas.train import Diverged, OverMemory, train


def schedule(**over) -> Schedule:
    return load_schedule("tiny").model_copy(update=over)


def corpus_of(tmp_path, rows, name="corpus"):
    d = tmp_path / name
    for split in ("train", "dev", "test"):
        write_manifest(d / f"{split}.jsonl", rows)
    return resolve_data(f"manifest:{d}")


def test_overfits_a_handful_of_utterances_to_their_text(tiny_corpus_dir, tmp_path):
    rows = sorted(read_manifest(tiny_corpus_dir / "train.jsonl"), key=lambda r: r.duration)[:4]
    arch = ArchConfig.from_dict({"frontend": {"channels": 16}, "vocab_size": 40,
                                 "encoder": {"d_model": 64, "n_heads": 4, "ffn_dim": 128, "n_layers": 2,
                                             "conv_kernel": 15}})
    s = Schedule(name="overfit", steps=120, batch_frames=4000, peak_lr=3e-3, warmup_steps=20, final_lr_ratio=0.1,
                 weight_decay=0.0, grad_clip=5.0, dropout=0.0, eval_every=60,
                 specaugment={"freq_masks": 0, "time_masks": 0})
    m = train(arch, s, corpus_of(tmp_path, rows), tmp_path / "run", threads=2, progress=False)
    assert m["test"]["wer"] <= 0.05, m["test"]["examples"]
    assert m["curve"][-1]["train_loss"] < 0.1


def test_writes_metrics_checkpoint_tokenizer_and_resumes(tiny_corpus_dir, tiny_arch, tmp_path):
    corpus = resolve_data(f"manifest:{tiny_corpus_dir}")
    out = tmp_path / "run"
    seen = []

    def crash_after_first_eval(step, point):
        seen.append(step)
        raise KeyboardInterrupt  # as if the run were killed right after its checkpoint

    with pytest.raises(KeyboardInterrupt):
        train(tiny_arch, schedule(), corpus, out, callback=crash_after_first_eval, progress=False)
    assert seen == [6] and (out / "checkpoint.pt").is_file() and not (out / "metrics.json").exists()

    saved = torch.load(out / "checkpoint.pt", weights_only=False)["state"]["curve"][-1]
    heard = []
    m = train(tiny_arch, schedule(), corpus, out, callback=lambda step, p: heard.append((step, p)), progress=False)
    # Steps 1-6 were not run again; the evaluation at step 6 is reported again first, since the run
    # may have died between saving it and the caller hearing of it.
    assert [s for s, _ in heard] == [6, 12] and heard[0][1] == saved and m["resumed_at_steps"] == [6]
    assert [p["step"] for p in m["curve"]] == [6, 12] and m["steps"] == 12
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["test"]["wer"] == m["test"]["wer"] and 0 <= m["test"]["wer"]
    assert Tokenizer.load(out / "tokenizer.model").vocab_size == tiny_arch.vocab_size
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("optimizer", [{}, {"muon_lr": 4e-3}], ids=["adamw", "muon"])
def test_a_resumed_run_trains_exactly_as_the_uninterrupted_one(tiny_corpus_dir, tiny_arch, tmp_path, optimizer):
    # The checkpoint at step 6 falls inside an epoch (about 4 batches each here) and SpecAugment and
    # dropout draw random numbers: the resumed run must continue the same batch order and draws, and
    # the optimizer its state (with Muon, both halves of nas.optim.MuonAdamW).
    corpus = resolve_data(f"manifest:{tiny_corpus_dir}")
    s = schedule(dropout=0.1, **optimizer)
    whole = train(tiny_arch, s, corpus, tmp_path / "whole", progress=False, evaluate_test=False)

    def crash(step, point):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_arch, s, corpus, tmp_path / "cut", callback=crash, progress=False, evaluate_test=False)
    resumed = train(tiny_arch, s, corpus, tmp_path / "cut", progress=False, evaluate_test=False)
    assert resumed["resumed_at_steps"] == [6]
    keys = ("step", "train_loss", "dev_cer", "dev_loss", "lr")
    assert [[p[k] for k in keys] for p in resumed["curve"]] == [[p[k] for k in keys] for p in whole["curve"]]
    if optimizer:  # Muon did step something: AdamW alone trains another run
        plain = train(tiny_arch, schedule(dropout=0.1), corpus, tmp_path / "adamw", progress=False, evaluate_test=False)
        assert plain["curve"][-1]["train_loss"] != whole["curve"][-1]["train_loss"]


def test_a_checkpoint_of_another_design_is_refused(tiny_corpus_dir, tiny_arch, tmp_path):
    corpus = resolve_data(f"manifest:{tiny_corpus_dir}")
    train(tiny_arch, schedule(steps=6), corpus, tmp_path, progress=False, evaluate_test=False)
    other = tiny_arch.model_copy(update={"vocab_size": 41})
    with pytest.raises(UserError, match="holds a run of another design or schedule"):
        train(other, schedule(steps=6), corpus, tmp_path, progress=False)


def test_a_run_records_its_corpus_and_refuses_to_resume_on_another(tiny_corpus_dir, tiny_arch, tmp_path):
    corpus = resolve_data(f"manifest:{tiny_corpus_dir}")
    out = tmp_path / "run"

    def crash(step, point):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_arch, schedule(), corpus, out, callback=crash, progress=False)
    rows = read_manifest(corpus.train)[:-1]  # the same corpus less one training utterance
    other = tmp_path / "other"
    for split in ("train", "dev", "test"):
        write_manifest(other / f"{split}.jsonl", rows if split == "train" else read_manifest(getattr(corpus, split)))
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(UserError, match=r"checkpoint.pt: data: holds a run trained on another corpus \(manifest:"):
        train(tiny_arch, schedule(), resolve_data(f"manifest:{other}"), out, progress=False)
    assert (out / "checkpoint.pt").read_bytes() == before  # the refused run wrote nothing

    m = train(tiny_arch, schedule(), corpus, out, progress=False, evaluate_test=False)  # its own corpus resumes
    train_rows = read_manifest(corpus.train)
    assert m["resumed_at_steps"] == [6] and m["data"]["spec"] == f"manifest:{tiny_corpus_dir}"
    assert m["data"]["train_utterances"] == len(train_rows) == len(rows) + 1
    assert abs(m["data"]["train_hours"] - sum(u.duration for u in train_rows) / 3600) <= 0.005


def test_callback_can_stop_a_run_early(tiny_corpus_dir, tiny_arch, tmp_path):
    corpus = resolve_data(f"manifest:{tiny_corpus_dir}")
    m = train(tiny_arch, schedule(), corpus, tmp_path, callback=lambda step, p: True, progress=False)
    assert m["stopped_early"] and m["steps"] == 6 and "test" not in m


def test_audio_that_will_not_decode_is_skipped_and_counted(tiny_corpus_dir, tiny_arch, tmp_path):
    rows = read_manifest(tiny_corpus_dir / "train.jsonl")
    bad = [Utterance("bad1", corrupt_flac(tmp_path / "bad1.flac"), "some text"),
           Utterance("bad2", corrupt_flac(tmp_path / "bad2.flac", seconds=2.0), "more text")]
    corpus = corpus_of(tmp_path, rows + bad)
    m = train(tiny_arch, schedule(steps=3, eval_every=3), corpus, tmp_path / "run", progress=False)
    assert m["skipped"]["train"] == {"bad audio": 2}
    assert m["skipped"]["test"] == m["skipped"]["train"]


def test_a_damaged_checkpoint_is_one_clear_error(tiny_corpus_dir, tiny_arch, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"PK\x03\x04 half a zip file")
    with pytest.raises(UserError, match=r"checkpoint\.pt: cannot read this checkpoint \(.*\); delete it"):
        train(tiny_arch, schedule(steps=3), resolve_data(f"manifest:{tiny_corpus_dir}"), tmp_path / "run",
              progress=False)


def test_a_run_over_its_memory_guard_stops_with_a_clear_error(tiny_corpus_dir, tiny_arch, tmp_path):
    held = nas.train.rss_mb()
    assert 50 < held < 24 * 1024  # torch alone holds more than 50 MB: the reading is real
    with pytest.raises(OverMemory, match=r"run: memory: the process holds [\d,]+ MB at step 0, over its guard of 1"):
        train(tiny_arch, schedule(steps=3), resolve_data(f"manifest:{tiny_corpus_dir}"), tmp_path / "run",
              progress=False, max_memory_mb=1)
    m = train(tiny_arch, schedule(steps=3), resolve_data(f"manifest:{tiny_corpus_dir}"), tmp_path / "run2",
              progress=False, max_memory_mb=held + 2048)
    assert m["steps"] == 3


def test_a_persistently_non_finite_loss_stops_with_a_clear_error(tiny_corpus_dir, tiny_arch, tmp_path):
    corpus = resolve_data(f"manifest:{tiny_corpus_dir}")
    out = tmp_path / "run"
    with pytest.raises(Diverged, match=r"run/checkpoint.pt: loss: non-finite for 20 consecutive batches at step \d+; "
                                       r"the last good checkpoint is kept"):
        train(tiny_arch, schedule(steps=40, peak_lr=1e30, warmup_steps=0, eval_every=1), corpus, out, progress=False)
    # The checkpoint left behind is the last one saved before the loss went non-finite: weights
    # that are all finite, at a step before the one that diverged, so the run can be resumed with
    # a saner learning rate.
    kept = torch.load(out / "checkpoint.pt", weights_only=False)
    assert 0 < kept["state"]["step"] < 40
    assert all(torch.isfinite(t).all() for t in kept["model"].values() if t.is_floating_point())


def test_a_transient_non_finite_batch_is_skipped_and_counted(tiny_corpus_dir, tiny_arch, tmp_path, monkeypatch):
    corpus = resolve_data(f"manifest:{tiny_corpus_dir}")
    real, calls = nas.train.F.ctc_loss, []

    def nan_once(*args, **kwargs):  # fault injection: the third batch's loss is NaN
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(nas.train.F, "ctc_loss", nan_once)
    m = train(tiny_arch, schedule(steps=6), corpus, tmp_path, progress=False, evaluate_test=False)
    assert m["nonfinite_batches"] == 1 and m["steps"] == 6


def test_greedy_decoding_collapses_repeats_and_drops_blanks(tmp_path):
    tok = Tokenizer.train(["ab ba", "abba"], 8, "char", tmp_path / "t.model")
    a, b = tok.encode("a")[-1], tok.encode("b")[-1]
    frames = [a, a, 0, a, b, b, 0, 0]  # -> "a a b" before spacing: a,a (blank splits),b
    log_probs = torch.full((1, len(frames), 8), -10.0)
    for t, c in enumerate(frames):
        log_probs[0, t, c] = 0.0
    assert greedy_decode(log_probs, torch.tensor([len(frames)]), tok) == [tok.decode([a, a, b])]
    assert greedy_decode(log_probs, torch.tensor([3]), tok) == [tok.decode([a])]


def test_bad_schedule_files_name_their_field(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: x\nsteps: -3\n")
    with pytest.raises(UserError, match=r"^error: .*s.yaml: steps: Input should be greater than 0"):
        load_schedule(p)
    shutil.copy(nas.schedule.SCHEDULES / "full.yaml", p)
    assert load_schedule(p).name == "full"


def test_the_moving_average_is_the_warmed_up_formula_applied_to_every_float_tensor():
    from torch.optim.swa_utils import AveragedModel

    from nas.train import _ema

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = AveragedModel(model, multi_avg_fn=_ema(0.9), use_buffers=True)
    expected = {k: v.clone() for k, v in model.state_dict().items()}  # the first update copies
    for n in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 3))  # moves BatchNorm's running statistics
        ema.update_parameters(model)
        d = 0.0 if n == 0 else min(0.9, (1 + n) / (10 + n))  # n updates before this one
        for k, v in model.state_dict().items():
            expected[k] = v.clone() if not v.is_floating_point() else expected[k] + (v - expected[k]) * (1 - d)
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6)


def test_a_tensor_that_serves_k_places_learns_at_the_rate_divided_by_k():
    """Adam moves a tensor about as far whatever its gradient, so one that serves k places of the
    encoder gets peak_lr / k (``shared_lr_exponent`` 1); ``full-v1`` keeps one rate for all."""
    from nas.model import ConformerCTC
    from nas.train import _param_groups

    arch = ArchConfig.from_dict({  # 4 virtual layers on 2 blocks, one conv for all, tied halves
        "encoder": {"d_model": 32, "n_heads": 2, "ffn_dim": 64, "conv_kernel": 5, "n_layers": 4},
        "sharing": {"blocks": {"pattern": "cycle", "n": 2},
                    "modules": {"conv": {"pattern": "cycle", "n": 1}},
                    "ties": {"ffn_macaron": True, "attn_qk": True},
                    "low_rank": {"ffn_in": {"rank": 8, "share": "U"}}},
    })
    model = ConformerCTC(arch)
    groups = _param_groups(model, schedule(peak_lr=1e-3))
    lr = {p: g["lr"] for g in groups for p in g["params"]}
    decay = {p: g["weight_decay"] for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(lr) == len(list(model.parameters()))
    first = model.layers[0]
    want = {
        first.conv.pw2.weight: 4,      # one convolution for the 4 layers
        first.ffn1.inner.U: 8,         # one U for the 4 layers, each using it in both tied halves
        first.ffn1.inner.V: 4,         # per block: 2 layers, both halves
        first.attn.q.weight: 4,        # per block, and q is k
        first.attn.v.weight: 2,        # per block
        first.final_norm.weight: 2,
        model.head.weight: 1,          # outside the encoder
        model.frontend.proj.weight: 1,
    }
    for p, k in want.items():
        assert lr[p] == pytest.approx(1e-3 / k)
    assert decay[first.attn.q.weight] == 0.01 and decay[first.final_norm.weight] == 0.0
    # the recipe before it: one rate for all
    old = _param_groups(model, schedule(peak_lr=1e-3, shared_lr_exponent=0.0))
    assert {g["lr"] for g in old} == {1e-3}
    exponents = {p.stem: load_schedule(p.stem).shared_lr_exponent for p in nas.schedule.SCHEDULES.glob("*.yaml")}
    assert exponents.pop("full-v1") == 0.0 and set(exponents.values()) == {1.0} and len(exponents) >= 5


def test_nas_train_seed_repeats_a_run_with_another_seed_and_resumes_only_its_own(tiny_corpus_dir, tiny_arch,
                                                                                   tmp_path, capsys):
    from nas.cli import main

    design = tmp_path / "arch.json"
    tiny_arch.save(design)
    args = ["train", str(design), "--schedule", "tiny", "--data", f"manifest:{tiny_corpus_dir}", "--threads", "2"]
    runs = {}
    for seed in (None, 3):
        out = tmp_path / f"seed-{seed}"
        assert main(args + ["--out", str(out)] + ([] if seed is None else ["--seed", str(seed)])) == 0
        ck = torch.load(out / "checkpoint.pt", weights_only=False)
        runs[seed] = (ck["schedule"]["seed"], json.loads((out / "metrics.json").read_text())["curve"][0]["train_loss"])
    assert runs[None][0] == load_schedule("tiny").seed == 0 and runs[3][0] == 3
    assert runs[None][1] != runs[3][1]  # another initialization and batch order: another first loss
    capsys.readouterr()
    # the seed-3 run's directory holds a run of another schedule for seed 4: refused in one line, kept
    assert main(args + ["--out", str(tmp_path / "seed-3"), "--seed", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a run of another design or schedule" in err[0], err
    assert (tmp_path / "seed-3" / "metrics.json").is_file()


def test_a_schedules_data_is_what_nas_train_trains_on_unless_data_is_given(tiny_corpus_dir, tiny_arch, tmp_path,
                                                                           capsys):
    from nas.cli import main
    from nas.workers import run_key

    assert load_schedule("full").data == "synth:30"  # full's figures are on 30 h of the embedded corpus
    design = tmp_path / "arch.json"
    tiny_arch.save(design)
    mine = tmp_path / "tiny-here.yaml"
    mine.write_text((nas.schedule.SCHEDULES / "tiny.yaml").read_text() + f"\ndata: manifest:{tiny_corpus_dir}\n")
    # the corpus is no part of the schedule's serialization, so none of a run's key: the run records it
    assert load_schedule(mine).model_dump() == load_schedule("tiny").model_dump()
    assert run_key(tiny_arch, load_schedule(mine)) == run_key(tiny_arch, load_schedule("tiny"))
    args = ["train", str(design), "--schedule", str(mine), "--threads", "2", "--out"]
    capsys.readouterr()
    assert main(args + [str(tmp_path / "run")]) == 0
    assert f"corpus manifest:{tiny_corpus_dir}: the tiny schedule's data" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["data"]["spec"] == f"manifest:{tiny_corpus_dir}"
    other = tmp_path / "copy"
    shutil.copytree(tiny_corpus_dir, other, ignore=shutil.ignore_patterns("features"))
    assert main(args + [str(tmp_path / "given"), "--data", f"manifest:{other}"]) == 0  # --data wins
    assert json.loads((tmp_path / "given" / "metrics.json").read_text())["data"]["spec"] == f"manifest:{other}"

    mine.write_text((nas.schedule.SCHEDULES / "tiny.yaml").read_text() + "\ndata: synth:-1\n")
    capsys.readouterr()
    assert main(args + [str(tmp_path / "bad")]) == 2 and not (tmp_path / "bad" / "checkpoint.pt").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {mine}: data: ") and "positive number of hours" in err[0], err


def test_the_blank_bias_raises_the_blank_at_initialization_and_nothing_else(tiny_arch):
    from nas.data.tokenizer import BLANK
    from nas.train import initial_model

    tiny = load_schedule("tiny")
    torch.manual_seed(0)
    plain = initial_model(tiny_arch, tiny).state_dict()
    torch.manual_seed(0)
    biased = initial_model(tiny_arch, tiny.model_copy(update={"blank_bias": 3.7})).state_dict()
    assert plain.keys() == biased.keys()
    for name in plain:
        if name != "head.bias":
            assert torch.equal(plain[name], biased[name]), name  # the same draws: only the bias moved
    shift = biased["head.bias"] - plain["head.bias"]
    assert shift[BLANK].item() == pytest.approx(3.7) and not shift[BLANK + 1:].any()


def test_inter_ctc_mixes_in_the_ctc_loss_of_the_middle_layers_output_through_the_same_head(tiny_corpus_dir, tiny_arch,
                                                                                           tmp_path, monkeypatch):
    """With ``inter_ctc: w`` a step's loss is ``(1 - w)`` times the CTC loss of the model's output
    plus ``w`` times that of the middle virtual layer's output through the same head (InterCTC).
    The first step's training loss is that mix, and its second term is what the initial model's
    first ``n_layers // 2`` layers and its head give on the step's batch, computed here by hand."""
    import torch.nn.functional as F

    from nas.data.tokenizer import BLANK
    from nas.train import initial_model, inter_layer

    corpus = resolve_data(f"manifest:{tiny_corpus_dir}")
    real, terms = nas.train._ctc, []

    def spy(log_probs, lengths, batch, reduction="mean"):
        loss = real(log_probs, lengths, batch, reduction)
        if reduction == "mean":  # a training term (the dev loss sums)
            terms.append((loss.item(), batch))
        return loss

    monkeypatch.setattr(nas.train, "_ctc", spy)
    s = schedule(steps=1, eval_every=1, inter_ctc=0.25)
    m = train(tiny_arch, s, corpus, tmp_path, progress=False, evaluate_test=False)
    (final, batch), (middle, _) = terms  # one step: two CTC terms, the output's first
    assert m["curve"][0]["train_loss"] == pytest.approx(0.75 * final + 0.25 * middle, rel=1e-6)

    k = inter_layer(tiny_arch)
    assert k == tiny_arch.encoder.n_layers // 2 >= 1
    torch.manual_seed(s.seed)  # the trainer's initial model: the same draws
    model = initial_model(tiny_arch, s).train()
    with torch.no_grad():
        x, lens = model.frontend(batch.feats, batch.feat_lens)
        mask = torch.arange(x.shape[1])[None, :] >= lens[:, None]
        for layer in model.layers[:k]:
            x = layer(x, mask)
        by_hand = F.ctc_loss(model.head(x).log_softmax(-1).transpose(0, 1), batch.targets, lens, batch.target_lens,
                             blank=BLANK, zero_infinity=True)
    assert middle == pytest.approx(float(by_hand), rel=1e-5) and middle != pytest.approx(final, rel=1e-3)
