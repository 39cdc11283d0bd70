"""Deployment benchmark: trained models exported at int8, against fp32 measured in the same run.

For each trainer run directory, :func:`bench_deploy` writes an export (:func:`nas.export.write_export`,
static int8 calibrated on the corpus's training audio) and reads back what it measured on the
test split, on the deployment path (onnxruntime, numpy, one CPU thread):

- the int8 weight bytes counted from ``model.onnx``'s initializers against the budget arithmetic
  (goal: within 1%), and the scales and zero points beside them;
- test WER and CER at fp32 and int8, and the increase (goal: at most 1.0 point absolute), with the
  run's own decoding (beam search with its LM when it has one) and greedy;
- the real-time factor of each on one thread, and the peak activation memory of a 10 s utterance;
- beam + LM decoding's share: its time over the forward passes' time, both summed over the same
  test utterances in the same loop (batch 1, one thread, as a device runs them; goal: at most 25%),
  and beside it the same search run again in a loop of its own (``decode_share_alone``): the
  difference is what the forward passes between the searches cost them (their data leaves the
  core's cache), not the search itself.

The goals are reported, not asserted: these are trained models, and the point is the figure.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from nas.config import ArchConfig
from nas.errors import UserError

RESULTS = Path("results")
DEFAULT_RUNS = ("full-1m",)  # the 1M unshared design (nas train unshared-1m.json --schedule full)
BYTES_GOAL, WER_GOAL = 0.01, 0.01  # within 1% of the arithmetic; at most 1.0 point of WER lost
DECODE_GOAL = 0.25  # beam + LM decoding: at most a quarter of the forward passes' time


def default_runs(results: Path = RESULTS) -> list[Path]:
    """``results/full-1m`` and every ``results/full-1m-*`` run directory beside it (a shared
    low-rank design trained as ``--out results/full-1m-shared``, say)."""
    found = [results / name for name in DEFAULT_RUNS] + sorted(results.glob("full-1m-*"))
    return [p for p in dict.fromkeys(found) if (p / "model.safetensors").is_file()]


def bench_deploy(runs: list[str | Path] | None = None, data: str | None = None, dtype: str = "int8",
                 activations: str = "static", test_utterances: int | None = None,
                 results: Path = RESULTS / "bench-deploy") -> dict:
    """Export each run directory of ``runs`` (default :func:`default_runs`) at ``dtype`` into
    ``results/<run name>`` and return its figures, keyed ``<run name>.<figure>``. Each run is
    calibrated and measured on ``data``, else on the corpus it was trained on (its ``metrics.json``
    records it), else on ``synth``: the test set is the one its training came with."""
    runs = [Path(r) for r in runs] if runs else default_runs()
    if not runs:
        raise UserError(str(RESULTS / DEFAULT_RUNS[0]), "", "no trained run directory to export (train one: nas "
                        "train search_spaces/designs/unshared-1m.json --schedule full --out results/full-1m)")
    from nas.export import write_export

    figures: dict = {"dtype": dtype, "activations": activations, "data": data or "each run's own", "threads": 1}
    for run in runs:
        arch = arch_of(run)
        corpus = data or trained_on(run)
        t0 = time.perf_counter()
        out = write_export(Path(results) / run.name, arch, run, {"run_dir": str(run), "data": corpus}, force=True,
                           dtype=dtype, data=corpus, activations=activations, test_utterances=test_utterances)
        figures[f"{run.name}.data"] = corpus
        prov = json.loads((out / "arch.json").read_text())["provenance"]
        figures |= {f"{run.name}.{k}": v for k, v in _figures(prov, dtype).items()}
        figures[f"{run.name}.export_s"] = round(time.perf_counter() - t0, 1)
    return figures


def _figures(prov: dict, dtype: str) -> dict:
    f, d = prov["onnx_file"], prov["deployment"]
    decoding = "beam" if "beam" in d["accuracy"]["fp32"] else "greedy"
    out = {
        "physical_params": prov["physical_params"],
        "virtual_params": prov["virtual_params"],
        f"{dtype}_weight_bytes": f["weights"],
        "budget_arithmetic_bytes": f["budget_bytes"],
        "bytes_difference": f["difference"],
        "bytes_difference_pct": round(100 * f["difference_share"], 4),
        "bytes_within_1pct": abs(f["difference_share"]) <= BYTES_GOAL,
        "scales_and_zero_points_bytes": f["quantization_params"],
        "test_utterances": d["test"]["utterances"],
        "decoding": d["decoding"],
    }
    for dt in dict.fromkeys(["fp32", dtype]):
        for dec, m in d["accuracy"][dt].items():
            out[f"{dt}_{dec}_wer"], out[f"{dt}_{dec}_cer"] = round(m["wer"], 4), round(m["cer"], 4)
        out[f"{dt}_rtf_1_thread"] = d["rtf"][dt]
        mem = d["activation_memory"][dt].get("bytes")
        out[f"{dt}_activation_mb_10s"] = None if mem is None else round(mem / 1e6, 2)
        if decoding == "beam" and d.get("forward_s"):  # exports measured before 2026-12-06 lack forward_s
            share = d["decode_s"][dt] / d["forward_s"][dt]
            out[f"{dt}_beam_decode_s"], out[f"{dt}_forward_s"] = d["decode_s"][dt], d["forward_s"][dt]
            out[f"{dt}_decode_share"] = round(share, 3)
            out[f"{dt}_decode_within_25pct"] = share <= DECODE_GOAL
            if d.get("decode_alone_s"):  # exports measured before 2026-12-06 14:30 lack it
                out[f"{dt}_decode_share_alone"] = round(d["decode_alone_s"][dt] / d["forward_s"][dt], 3)
    if dtype != "fp32":
        for dec, m in d["difference"].items():
            out[f"wer_increase_points_{dec}"] = round(100 * m["wer"], 2)
        out["wer_increase_within_1pt"] = d["difference"][decoding]["wer"] <= WER_GOAL
    return out


def trained_on(run: Path) -> str:
    """The corpus a run directory's ``metrics.json`` says it trained on (runs of before 2026-12-06
    do not say: ``synth``, every one of them committed here)."""
    try:
        return json.loads((run / "metrics.json").read_text())["data"]["spec"]
    except (OSError, ValueError, KeyError, TypeError):
        return "synth"


def arch_of(run: Path) -> ArchConfig:
    """The design a run directory trained: its ``arch.json`` if it has one, else its checkpoint's."""
    if (run / "arch.json").is_file():
        return ArchConfig.load(run / "arch.json")
    ckpt = run / "checkpoint.pt"
    if not ckpt.is_file():
        raise UserError(str(run), "", "holds neither arch.json nor checkpoint.pt: which design it trained is unknown")
    return ArchConfig.from_json(torch.load(ckpt, map_location="cpu", weights_only=True)["arch"], str(ckpt))
