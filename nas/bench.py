"""Benchmarks. Each prints figures measured in one run, as ratios against a reference measured
in the same run (these machines are noisy, so no absolute threshold is ever asserted), and
adds them to ``results/bench.json`` and ``results/bench.md``.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Callable

SPACE = Path(__file__).resolve().parent.parent / "search_spaces" / "paper.yaml"


def bench_budget(n: int = 5000, n_models: int = 50, seed: int = 0) -> dict:
    """Designs per second of the budget arithmetic, against building each model and counting
    its unique parameters (the reference the arithmetic replaces)."""
    import torch

    from nas.budget import count
    from nas.model import ConformerCTC
    from nas.space import load_space

    space = load_space(SPACE)
    rng = random.Random(seed)
    archs = [space.random(rng) for _ in range(n)]
    count(archs[0])  # warm imports and caches
    t0 = time.perf_counter()
    counts = [count(a).physical for a in archs]
    arithmetic = n / (time.perf_counter() - t0)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    built = [ConformerCTC(a).num_params() for a in archs[:n_models]]
    reference = n_models / (time.perf_counter() - t0)
    assert built == counts[:n_models], "budget arithmetic disagrees with the built model"
    return {
        "designs_per_s": round(arithmetic),
        "built_models_per_s": round(reference, 1),
        "speedup_vs_building": round(arithmetic / reference),
        "goal_designs_per_s": 10_000,
    }


BENCHMARKS: dict[str, Callable[[], dict]] = {"budget": bench_budget}


def run(which: str, out_dir: Path) -> dict:
    names = list(BENCHMARKS) if which == "all" else [which]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for name in names:
        print(f"== bench {name}", flush=True)
        figures = BENCHMARKS[name]()
        for key, value in figures.items():
            print(f"  {key}: {value}")
        results[name] = figures | {"measured": time.strftime("%Y-%m-%d %H:%M")}
    path.write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "bench.md").write_text(_markdown(results))
    return results


def _markdown(results: dict) -> str:
    lines = ["# Benchmarks", "", "Written by `nas bench`. Ratios are against a reference measured in the same run.", ""]
    for name, figures in results.items():
        lines += [f"## {name}", "", "| figure | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in figures.items()]
        lines.append("")
    return "\n".join(lines)
