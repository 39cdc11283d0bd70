"""The search benchmark: TPE against random sampling, parallel workers, Ray's overhead, and
successive halving against fixed proxies at equal wall time."""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import time
from pathlib import Path

from nas.files import atomic_write
from nas.schedule import Rungs
from nas.study import DEFAULT_FIDELITY, DEFAULT_OBJECTIVES, TPE_STARTUP_TRIALS

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"


def bench_search(trials: int = 12, seeds: int = 3, space: str = "paper.yaml", budget: str = "1M",
                 proxy: str = "proxy", data: str = "synth", parallel_trials: int = 4, objective: str = DEFAULT_OBJECTIVES[0],
                 fidelity_minutes: float = 0, reference: str = "full", rungs: Rungs = Rungs(),
                 results: Path = Path("results/bench-search")) -> dict:
    """The default sampler (TPE) against random sampling on the same space, budget and proxy, over
    ``seeds`` seeds and ``trials`` trials each, under the search's default fidelity: hypervolume of
    (``objective``, bytes) after each trial (a design stopped at a rung adds nothing), with no
    baselines enqueued (they would be the same first trials for both). Then trials per
    hour for 2 workers x 1 CPU against 1 worker x 2 CPUs on the same designs (same seed), and the
    share of a trial's wall time that is Ray and Optuna overhead: from Optuna's ask to its tell,
    everything outside the trainer (worker start, imports, scheduling, storage).

    With ``fidelity_minutes``, also ``--fidelity asha`` against a fixed proxy as long as its last
    rung (seed 0), each searching for that long: the designs each evaluated (complete, or stopped
    at a rung), and the ``reference`` schedule's test WER of each one's best complete design
    (:func:`compare_fidelity`). Every search under ``--fidelity asha`` runs ``rungs``; its studies
    are named by them, so those measured under other rungs stay beside them.

    It takes hours at the default size, so it resumes: run it again with the same arguments and
    the sampler studies continue where they stopped (Optuna storage), a timed part that finished
    is read back, and one cut short starts over (its clock must cover it whole). Other arguments, or
    a changed proxy or reference recipe, measure into a directory of their own under ``results``.
    The two timed searches of ``fidelity_minutes`` run first, so that a sitting of a little over
    twice that finishes both; everything after them resumes from any point. Without
    ``fidelity_minutes`` the same directory is used, so the untimed sampler studies can be run
    first, while the machine does other work, and the timed parts added by a later run."""
    from nas.budget import parse_budget
    from nas.pareto import hypervolume_curve, reference_point
    from nas.schedule import load_schedule
    from nas.trials import records, tally
    from nas.search import SearchSettings, run_search
    from nas.space import load_space

    sp, b = load_space(SPACES / space), parse_budget(budget)
    results = Path(results)
    stamp = {"space": space, "budget": budget, "data": data, "objective": objective, "trials": trials,
             "seeds": seeds, "parallel_trials": parallel_trials, "fixed_proxy": "as long as the last rung",
             "proxy": load_schedule(proxy).model_dump(mode="json"),
             "reference": load_schedule(reference).model_dump(mode="json")}
    # Each set of settings measures into a directory of its own, so figures of other settings never
    # mix in and hours already measured under them are never deleted. The timed parts' length is
    # not one of them (their studies are named by it), so that the sampler studies can be run
    # first, without --fidelity-minutes, and the timed hours added later, alone on the machine.
    digest = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:8]
    results = results / f"{Path(space).stem}-{budget}-{objective}-{digest}"
    results.mkdir(parents=True, exist_ok=True)
    atomic_write(results / "settings.json", json.dumps(stamp, indent=2) + "\n")

    def search(study: str, **kw) -> list:
        # Every design trains the proxy unless a part says otherwise (workers against threads: the same
        # designs at the same cost).
        settings = SearchSettings(**{"space": sp, "budget": b, "study": study, "data": data, "proxy": proxy, "rungs": rungs,
                                     "results": results, "baselines": False, "objectives": (objective, "bytes"),
                                     "fidelity": "fixed"} | kw)
        done = records(run_search(settings))
        if settings.time_budget_s is None and tally(done).done < settings.trials:
            # Ray Tune ends a search early, and returns, only when interrupted (Ctrl-C): stop here rather
            # than go on to the next study. This one resumes when the command is run again.
            raise KeyboardInterrupt
        return done

    # The two timed hours go first: each must run whole within one sitting, and the rest resumes anywhere.
    modes = compare_fidelity(search, proxy, rungs, fidelity_minutes, reference, data, results) if fidelity_minutes else None
    studies: dict[str, list[list]] = {"tpe": [], "random": []}
    overhead, waste = [], {"tpe": [], "random": []}
    for seed in range(seeds):
        for sampler in studies:
            # As the search runs by default: at the proxy's own length every design's WER sits near 1.0
            # (0.97-1.01 over tpe-0's 12 designs on 2026-11-29), so the front, and its hypervolume, would
            # measure size alone; halving's complete designs are ranked after its last rung.
            # named by the rungs too: studies under other rungs (asha1-3-9, measured before) stay as they are
            tag = rungs.tag if DEFAULT_FIDELITY == "asha" else DEFAULT_FIDELITY
            done = search(f"{sampler}-{seed}-{tag}", trials=trials, sampler=sampler, seed=seed, fidelity=DEFAULT_FIDELITY)
            studies[sampler].append(done)
            waste[sampler].append(tally(done).infeasible_share)
            overhead += [1 - r.trainer_seconds / r.duration_s for r in done if r.trainer_seconds and r.duration_s]
    # One box for every study (for a loss, bounded by the worst value any of them trained).
    ref = reference_point(objective, b.max_bytes, [r for runs in studies.values() for done in runs for r in done])
    curves = {k: [hypervolume_curve(done, objective, ref)[:trials] for done in runs] for k, runs in studies.items()}
    mean = {k: [statistics.mean(c[i] for c in v if len(c) > i) for i in range(trials)] for k, v in curves.items()}
    target = mean["random"][-1]
    reach = next((i + 1 for i, hv in enumerate(mean["tpe"]) if hv >= target), None)
    rates = {}
    for workers, cpus in ((2, 1), (1, 2)):
        def timed(study=f"parallel-{workers}x{cpus}", workers=workers, cpus=cpus) -> float:
            t0 = time.perf_counter()
            search(study, trials=parallel_trials, workers=workers, cpus_per_trial=cpus, seed=0)
            return parallel_trials / ((time.perf_counter() - t0) / 3600)
        rates[f"{workers}x{cpus}"] = _once(results / f"parallel-{workers}x{cpus}", timed)
    return {
        **({"fidelity_fixed_vs_asha": modes} if modes else {}),
        "setup": f"{space} at {budget}, proxy {proxy}, data {data}, samplers under --fidelity {DEFAULT_FIDELITY}; hypervolume of ({objective}, bytes) as a share "
                 f"of the box [0, {ref[0]}] x [0, budget bytes] (nas.pareto.reference_point), mean over seeds; "
                 f"TPE's first {TPE_STARTUP_TRIALS} Optuna trials (over-budget samples count) are the random sampler's own "
                 "draws under the same seed, so the two differ only after them",
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


def compare_fidelity(search, proxy: str, rungs: Rungs, minutes: float, reference: str, data: str, results: Path) -> dict:
    """``--fidelity asha`` against a fixed proxy as long as its last rung, ``minutes`` of search
    each (same seed): designs evaluated, and the reference-schedule test WER of each one's best
    complete design.

    The fixed proxy trains every design as far as successive halving trains the designs it keeps
    (the proxy stretched to the last rung, the same schedule), so both rank their complete designs
    by the same signal, and what is compared is what halving is for: stopping the designs that
    are behind at a lower rung, to evaluate more designs in the same time without choosing a worse
    one. (A fixed proxy as short as the first rung would be the first rung without the others.)"""
    import yaml

    from nas.config import ArchConfig
    from nas.data.corpus import resolve_data
    from nas.schedule import load_schedule
    from nas.train import train
    from nas.workers import run_key

    base, last = load_schedule(proxy), rungs.multiples[-1]
    top = rungs.schedule(base).model_copy(update={"name": f"{base.name}-x{last}"})
    top_file = results / f"{top.name}.yaml"
    atomic_write(top_file, yaml.safe_dump(top.model_dump(mode="json"), sort_keys=False))
    out = {}
    # Each part is named by what it trains (fixed-x9-60min, asha2-4-9-60min): one measured under other
    # rungs stays beside it, and halving under rungs with the same last one is compared with the same
    # fixed proxy, read back.
    names = {"fixed": f"fixed-x{last}", "asha": rungs.tag}
    for fidelity, name in names.items():
        def timed(study=f"{name}-{minutes:g}min", fidelity=fidelity) -> dict:
            fixed = {"proxy": str(top_file.resolve())} if fidelity == "fixed" else {}
            done = search(study, trials=100_000, fidelity=fidelity, seed=0, time_budget_s=minutes * 60, **fixed)
            complete = [r for r in done if r.state == "complete"]
            best = min(complete, key=lambda r: r.proxy[1], default=None)
            return {"designs_evaluated": sum(r.state in ("complete", "pruned") for r in done),
                    "complete": len(complete), "stopped_at_a_rung": sum(r.state == "pruned" for r in done),
                    **({"best_trial": best.number, "best_bytes": best.bytes,
                        "best_arch": best.arch.model_dump(mode="json")} if best else {})}
        out[fidelity] = _once(results / f"{name}-{minutes:g}min", timed) | ({"rungs": list(rungs.multiples)} if fidelity == "asha" else {})
    # Both timed parts before either retrain, so the hours that must not be cut come first.
    ref = load_schedule(reference)
    runs: dict[str, Path] = {}  # one retrain per distinct design (as the search keys runs): both modes may choose the same
    for fidelity, row in out.items():
        if "best_arch" in row:
            arch = ArchConfig.from_dict(row.pop("best_arch"))
            # named by the timed length too: the directory is shared by every --fidelity-minutes
            run = runs.setdefault(run_key(arch, ref), results / f"reference-{names[fidelity]}-{minutes:g}min")
            # a finished run is read back, a cut one resumes
            m = _read(run / "metrics.json") or train(arch, ref, resolve_data(data), run, progress=False)
            test = m["test"]
            row |= {"reference": reference, "reference_run": run.name, "best_reference_test_wer": round(test.get("beam_wer", test["wer"]), 4)}
    fixed, asha = out["fixed"]["designs_evaluated"], out["asha"]["designs_evaluated"]
    out["asha_designs_per_fixed_design"] = round(asha / fixed, 2) if fixed else None
    return out


def _read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _once(study_dir: Path, measure):
    """A timed part of the benchmark: its figure as measured before, or measured now from a clean
    start (a part cut short left a study that its clock no longer covers)."""
    done = study_dir.with_name(study_dir.name + ".json")
    if (figure := _read(done)) is not None:
        return figure
    shutil.rmtree(study_dir, ignore_errors=True)
    figure = measure()
    atomic_write(done, json.dumps(figure) + "\n")
    return figure
