"""Decoding's trade-off: what the beam's pruning costs in accuracy, and buys in time, on trained runs.

The trainer tunes the LM weight and word score under the widest pruning of
:data:`nas.decode.PRUNING`, then keeps the fastest pruning whose dev WER is within
:data:`nas.decode.PRUNING_TOLERANCE` of the best (:func:`nas.decode.tune_decoder`). For each trainer
run directory that decoded with beam search, :func:`bench_decode` shows what that choice gives up:

- the model runs once on dev and once on test, batched as the trainer's final evaluation runs it
  (its schedule's batch size, ``threads`` torch threads);
- both are decoded under each pruning of ``pruning`` (and the run's own), at the run's tuned LM
  weight and word score: dev and test WER and CER, and on test the beam search's time over the
  forward passes' (the trainer's ``decode_s`` against ``forward_s``; each the fastest of ``repeats``
  passes, since a decoding pass lasts a fraction of a second), with ``threads`` decoding processes
  as the trainer decodes (``decode_share``, :func:`nas.train.decode_workers`) and in one process
  (``decode_share_1_worker``);
- the row of the run's own settings re-decodes what the trainer decoded: its test WER must equal
  the run's ``metrics.json`` (``reproduces_metrics``), or the rows describe another model or decoder;
- the share of test words, and of their characters, that are not in the run's lexicon: a
  lexicon-constrained search can never spell them, whatever its pruning.

The goals of the full schedule are reported beside each row (test WER at most 15%, CER at most 6%,
decoding at most 25% of the forward passes), not asserted: the point is the figure.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jiwer
import torch

from nas.bench.deploy import DECODE_GOAL, arch_of, default_runs, trained_on
from nas.data.corpus import resolve_data
from nas.data.features import FeatureConfig, FeatureSet
from nas.data.tokenizer import Tokenizer
from nas.decode import PRUNING, BeamDecoder, BeamSettings
from nas.errors import UserError
from nas.model import ConformerCTC
from nas.schedule import load_schedule
from nas.train import Outputs, decode_workers, forward

# (beam, classes per frame, score threshold), widest first: the tuner's three and two between them.
SWEEP = (PRUNING[0], (24, 10, 25.0), (32, 7, 20.0), *PRUNING[1:])
WER_GOAL, CER_GOAL = 0.15, 0.06  # the full schedule's test WER and CER


def bench_decode(runs: list[str | Path] | None = None, pruning: tuple = SWEEP, threads: int = 2,
                 repeats: int = 5) -> dict:
    """Figures of each run directory of ``runs`` (default: those of :func:`nas.bench.deploy.default_runs`
    that decoded with beam search), keyed ``<run name>.<figure>``; ``<run name>.pruning`` is a table."""
    runs = [Path(r) for r in runs] if runs else [r for r in default_runs() if (r / "lm").is_dir()]
    if not runs:
        raise UserError("results/full-1m", "", "no trained run directory with an LM to decode (train one: nas train "
                        "search_spaces/designs/unshared-1m.json --schedule full --out results/full-1m)")
    torch.set_num_threads(threads)
    workers = decode_workers()  # as the trainer's final evaluation decodes with these threads
    figures: dict = {"threads": threads, "decode_workers": workers, "repeats": repeats}
    for run in runs:
        figures |= {f"{run.name}.{k}": v for k, v in _run_figures(run, pruning, repeats, workers).items()}
    return figures


def _run_figures(run: Path, pruning: tuple, repeats: int, workers: int) -> dict:
    metrics = _metrics(run)
    tuned = metrics["decoder"]
    arch, spec = arch_of(run), trained_on(run)
    corpus = resolve_data(spec, progress=False)
    model = ConformerCTC.load(arch, run / "model.safetensors").eval()
    tokenizer = Tokenizer.load(run / "tokenizer.model")
    features, batch_frames = FeatureConfig(n_mels=arch.frontend.n_mels), _batch_frames(run, metrics)
    sets = {split: FeatureSet(getattr(corpus, split), corpus.feature_cache, features) for split in ("dev", "test")}
    outputs = {split: forward(model, data, tokenizer, batch_frames) for split, data in sets.items()}
    forward_s = min([outputs["test"].forward_s] + [forward(model, sets["test"], tokenizer, batch_frames).forward_s
                                                   for _ in range(repeats - 1)])

    own = (tuned["beam"], tuned["beam_tokens"], float(tuned["beam_threshold"]))
    rows = []
    for beam, tokens, threshold in dict.fromkeys([*pruning, own]):
        settings = BeamSettings(beam, tokens, threshold, tuned["lm_weight"], tuned["word_score"])
        decoder, alone = BeamDecoder(run / "lm", settings, workers), BeamDecoder(run / "lm", settings)
        row = {"beam": beam, "classes": tokens, "threshold": threshold, "tuned": (beam, tokens, threshold) == own}
        dev, _ = _decoded(decoder, outputs["dev"], 1)
        test, seconds = _decoded(decoder, outputs["test"], repeats)
        test_alone, seconds_alone = _decoded(alone, outputs["test"], repeats)
        for split, hyps in (("dev", dev), ("test", test)):
            refs = outputs[split].refs
            row[f"{split}_wer"], row[f"{split}_cer"] = round(jiwer.wer(refs, hyps), 4), round(jiwer.cer(refs, hyps), 4)
        row["decode_share"] = round(seconds / forward_s, 3)
        row["decode_share_1_worker"] = round(seconds_alone / forward_s, 3)
        # The same hypotheses in one process as in several, unless two hypotheses tie: flashlight orders
        # them by their lexicon trie nodes' addresses, which differ between processes (seen at beam 2).
        row["workers_agree"] = test == test_alone
        row["meets_goals"] = row["test_wer"] <= WER_GOAL and row["test_cer"] <= CER_GOAL and row["decode_share"] <= DECODE_GOAL
        rows.append(row)

    mine = next(r for r in rows if r["tuned"])
    lexicon = {line.split("\t")[0] for line in (run / "lm" / "lexicon.txt").read_text().splitlines()}
    words = [w for ref in outputs["test"].refs for w in ref.split()]
    unseen = [w for w in words if w not in lexicon]
    return {
        "data": spec,
        "tuned_pruning": "-".join(f"{x:g}" for x in own),
        "lm_weight": tuned["lm_weight"], "word_score": tuned["word_score"],
        "reproduces_metrics": mine["test_wer"] == round(metrics["test"]["beam_wer"], 4),
        "test_forward_s": round(forward_s, 3),
        "test_words_outside_lexicon": round(len(unseen) / len(words), 4),
        "test_chars_outside_lexicon": round(sum(map(len, unseen)) / sum(map(len, words)), 4),
        "pruning": rows,
    }


def _decoded(decoder: BeamDecoder, outputs: Outputs, repeats: int) -> tuple[list[str], float]:
    """The hypotheses of ``outputs``, and the fastest of ``repeats`` decoding passes over them, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        hyps = decoder.decode(outputs.batches)
        best = min(best, time.perf_counter() - t0)
    return hyps, best


def _batch_frames(run: Path, metrics: dict) -> int:
    """The batch size the run's final evaluation used (its checkpoint's schedule, else the schedule
    its ``metrics.json`` names), so that the forward passes here pad as the trainer's did."""
    if (run / "checkpoint.pt").is_file():
        return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["schedule"]["batch_frames"]
    return load_schedule(metrics["schedule"]).batch_frames


def _metrics(run: Path) -> dict:
    """The run's ``metrics.json``, which must say how it decoded with beam search."""
    path = run / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(str(path), "", f"unreadable ({e.__class__.__name__}): is {run} a finished trainer run?") from None
    if not isinstance(metrics.get("decoder"), dict) or "beam_wer" not in metrics.get("test", {}):
        raise UserError(str(path), "decoder", "the run did not decode with beam search (its schedule's decode is greedy)")
    return metrics
