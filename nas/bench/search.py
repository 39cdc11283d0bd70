"""The search benchmark: TPE against random sampling, parallel workers, and Ray's overhead."""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"


def bench_search(trials: int = 12, seeds: int = 3, space: str = "paper.yaml", budget: str = "1M",
                 proxy: str = "proxy", data: str = "synth", parallel_trials: int = 4,
                 results: Path = Path("results/bench-search")) -> dict:
    """The default sampler (TPE) against random sampling on the same space, budget and proxy, over
    ``seeds`` seeds and ``trials`` trials each: hypervolume of (WER, bytes) after each trial, with
    no baselines enqueued (they would be the same first trials for both). Then trials per hour for
    2 workers x 1 CPU against 1 worker x 2 CPUs on the same designs (same seed), and the share of a
    trial's wall time that is Ray and Optuna overhead: from Optuna's ask to its tell, everything
    outside the trainer (worker start, imports, scheduling, storage)."""
    from nas.budget import parse_budget
    from nas.pareto import hypervolume_curve, reference_point
    from nas.trials import records, tally
    from nas.search import SearchSettings, run_search
    from nas.space import load_space

    sp, b = load_space(SPACES / space), parse_budget(budget)
    results = Path(results)
    shutil.rmtree(results, ignore_errors=True)  # every figure comes from this run
    ref = reference_point("wer", b.max_bytes)

    def search(study: str, **kw) -> list:
        settings = SearchSettings(space=sp, budget=b, study=study, data=data, proxy=proxy, results=results,
                                  baselines=False, **kw)
        return records(run_search(settings))

    curves: dict[str, list[list[float]]] = {"tpe": [], "random": []}
    overhead, waste = [], {"tpe": [], "random": []}
    for seed in range(seeds):
        for sampler in curves:
            done = search(f"{sampler}-{seed}", trials=trials, sampler=sampler, seed=seed)
            curves[sampler].append(hypervolume_curve(done, "wer", ref)[:trials])
            waste[sampler].append(tally(done).infeasible_share)
            overhead += [1 - r.trainer_seconds / r.duration_s for r in done if r.trainer_seconds and r.duration_s]
    mean = {k: [statistics.mean(c[i] for c in v if len(c) > i) for i in range(trials)] for k, v in curves.items()}
    target = mean["random"][-1]
    reach = next((i + 1 for i, hv in enumerate(mean["tpe"]) if hv >= target), None)
    rates = {}
    for workers, cpus in ((2, 1), (1, 2)):
        t0 = time.perf_counter()
        search(f"parallel-{workers}x{cpus}", trials=parallel_trials, workers=workers, cpus_per_trial=cpus, seed=0)
        rates[f"{workers}x{cpus}"] = parallel_trials / ((time.perf_counter() - t0) / 3600)
    return {
        "setup": f"{space} at {budget}, proxy {proxy}, data {data}; hypervolume of (WER, bytes) as a share "
                 f"of the box [0, {ref[0]}] x [0, budget bytes] (nas.pareto.reference_point), mean over seeds",
        "trials_per_run": trials, "seeds": seeds,
        "hypervolume_tpe": [round(x, 4) for x in mean["tpe"]],
        "hypervolume_random": [round(x, 4) for x in mean["random"]],
        "tpe_trials_to_reach_random_final": reach, "goal_trials": trials // 2,
        "infeasible_share_tpe": round(statistics.mean(waste["tpe"]), 3),
        "infeasible_share_random": round(statistics.mean(waste["random"]), 3),
        "trials_per_hour_2x1": round(rates["2x1"], 1), "trials_per_hour_1x2": round(rates["1x2"], 1),
        "ratio_2x1_vs_1x2": round(rates["2x1"] / rates["1x2"], 2),
        "overhead_share_of_trial_time": round(statistics.median(overhead), 3) if overhead else None,
        "goal_overhead_share": 0.05,
    }
