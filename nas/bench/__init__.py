"""Benchmarks. Each prints figures measured in one run, as ratios against a reference measured
in the same run (these machines are noisy, so no absolute threshold is ever asserted), and
adds them to ``results/bench.json`` and ``results/bench.md``.

- ``budget``, ``train`` (:mod:`nas.bench.speed`): the budget arithmetic against building each
  model; our training step against torchaudio's Conformer, and low rank against full rank.
- ``optim`` (:mod:`nas.bench.speed`): the optimizer's step alone, the library's Muon against ours.
- ``search`` (:mod:`nas.bench.search`): TPE against random sampling, parallel workers, overhead.
- ``learn`` (:mod:`nas.bench.learn`): time to accuracy of today's recipe against the old one;
  ``levers``: what one more change to today's recipe would give that ratio.
- ``fidelity`` (:mod:`nas.bench.fidelity`): how well each proxy signal ranks designs as full
  training does, against ranking by size.
- ``deploy`` (:mod:`nas.bench.deploy`): int8 exports of trained runs against fp32: bytes, WER,
  real-time factor and activation memory.
- ``decode`` (:mod:`nas.bench.decode`): the beam's pruning on trained runs, test WER and CER
  against decoding's share of the forward passes' time.
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

from nas.files import atomic_write


# name -> (module of nas.bench, function): imported on use, since each pulls in heavy parts.
BENCHMARKS = {"budget": ("speed", "bench_budget"), "train": ("speed", "bench_train"),
              "optim": ("speed", "bench_optim"),
              "search": ("search", "bench_search"), "learn": ("learn", "bench_learn"),
              "levers": ("learn", "bench_levers"),
              "fidelity": ("fidelity", "bench_fidelity"), "deploy": ("deploy", "bench_deploy"),
              "decode": ("decode", "bench_decode")}


def run(which: str, out_dir: Path, search: dict | None = None, learn: dict | None = None,
        deploy: dict | None = None, fidelity: dict | None = None, decode: dict | None = None) -> dict:
    """Run one benchmark or all; ``search``, ``learn``, ``fidelity``, ``deploy`` and ``decode``
    override :func:`bench_search`'s, :func:`bench_learn`'s, :func:`bench_fidelity`'s,
    :func:`bench_deploy`'s and :func:`bench_decode`'s arguments."""
    names = list(BENCHMARKS) if which == "all" else [which]
    overrides = {"search": {"results": out_dir / "bench-search"} | (search or {}),
                 "learn": {"results": out_dir / "bench-learn"} | (learn or {}),
                 "levers": {"results": out_dir / "bench-learn" / "levers"},
                 "fidelity": {"results": out_dir / "bench-fidelity"} | (fidelity or {}),
                 "deploy": {"results": out_dir / "bench-deploy"} | (deploy or {}), "decode": decode or {}}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for name in names:
        print(f"== bench {name}", flush=True)
        module, function = BENCHMARKS[name]
        bench = getattr(importlib.import_module(f"nas.bench.{module}"), function)
        figures = bench(**overrides.get(name, {}))
        for key, value in figures.items():
            print(f"  {key}: {value}")
        stamp = time.strftime("%Y-%m-%d %H:%M")
        if name == "learn":  # run one design per sitting: the designs measured before are kept,
            # each with the date of its own sitting (the section's date is the latest sitting's)
            figures = {k: v | {"measured": stamp} if isinstance(v, dict) else v for k, v in figures.items()}
            figures = {k: v for k, v in results.get(name, {}).items() if k != "measured"} | figures
        results[name] = figures | {"measured": stamp}
    atomic_write(path, json.dumps(results, indent=2) + "\n")
    atomic_write(out_dir / "bench.md", _markdown(results))
    return results


def _markdown(results: dict) -> str:
    lines = ["# Benchmarks", "", "Written by `nas bench`. Ratios are against a reference measured in the same run.", ""]
    for name, figures in results.items():
        tables = {k: v for k, v in figures.items() if _is_table(v)}
        lines += [f"## {name}", "", "| figure | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in _flat({k: v for k, v in figures.items() if k not in tables})]
        lines.append("")
        for key, rows in tables.items():  # a list of records reads as a table of its own
            columns = list(dict.fromkeys(c for row in rows for c in row))
            lines += [f"**{key}**", "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
            lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
            lines.append("")
    return "\n".join(lines)


def _flat(figures: dict, prefix: str = ""):
    """(name, value) pairs, a nested record's figures named ``record.figure``: one row each."""
    for key, value in figures.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _is_table(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(row, dict) for row in value)
