"""The Pareto front of a study, its hypervolume, and the files a search leaves behind.

The front is Optuna's (``study.best_trials``: the non-dominated COMPLETE trials; infeasible and
stopped designs are never COMPLETE), as :class:`~nas.trials.TrialRecord` s sorted by bytes.
:func:`nondominated_ranks` sorts any set of points into fronts (the search's successive halving
promotes by it; the report draws the 2-D front of a 3-objective study with it).

The hypervolume is of the first objective (the proxy signal) and bytes, inside the box bounded by
:func:`reference_point`, as a share of that box. The report and the benchmarks use this one
definition.

``results/<study>/trials.csv`` holds every trial with its parameters, sizes, objectives, state
and duration; ``pareto.json`` the current front.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import optuna

from nas.files import atomic_write
from nas.study import SIGNALS
from nas.trials import DONE, TrialRecord, objectives_of, record, records, retried_numbers, state_of

# The box's bound for the proxy signal. Error rates of barely trained models sit around 1.0 and
# above (insertions), so 1.5 keeps them inside the box. Bytes are bounded by the budget.
REFERENCE = {"wer": 1.5, "cer": 1.5}


def front(study: optuna.Study) -> list[TrialRecord]:
    """The Pareto designs, smallest first."""
    objectives = objectives_of(study)
    retried = retried_numbers(study.get_trials(deepcopy=False))
    recs = [record(t, objectives, retried) for t in study.best_trials]
    return sorted(recs, key=lambda r: (r.bytes, r.number))


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is no worse than ``b`` everywhere and better somewhere (all minimized)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def nondominated_ranks(points: Sequence[Sequence[float]]) -> list[int]:
    """The front each point lies on: 0 for the non-dominated ones, 1 for those that only rank-0
    points dominate, and so on (non-dominated sorting, Deb et al. 2002).

    Hand-written: Optuna's non-dominated sort is private API; O(n²) per front is plenty here.
    """
    rank = [-1] * len(points)
    left, level = set(range(len(points))), 0
    while left:
        layer = {i for i in left if not any(dominates(points[j], points[i]) for j in left if j != i)}
        for i in layer:
            rank[i] = level
        left -= layer
        level += 1
    return rank


def reference_point(objective: str, budget_bytes: int, recs: list[TrialRecord] | None = None) -> tuple[float, float]:
    """The hypervolume box's far corner for (``objective``, bytes).

    Error rates use :data:`REFERENCE`. A loss has no natural bound, so the box's bound is the
    worst value any trained design reached, times 1.1 (``recs`` are needed then).
    """
    if objective in REFERENCE:
        return REFERENCE[objective], float(budget_bytes)
    worst = max((r.values[objective] for r in recs or [] if objective in r.values), default=1.0)
    return worst * 1.1, float(budget_bytes)


def hypervolume_2d(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by ``points`` (both objectives minimized) and bounded by ``ref``.

    Hand-written: Optuna's hypervolume is private API, and in two dimensions it is a sweep.
    """
    area, best_y = 0.0, ref[1]
    for x, y in sorted(p for p in points if p[0] < ref[0] and p[1] < ref[1]):
        if y < best_y:
            area += (ref[0] - x) * (best_y - y)
            best_y = y
    return area


def hypervolume_curve(recs: list[TrialRecord], objective: str, ref: tuple[float, float]) -> list[float]:
    """Hypervolume of (``objective``, bytes) after each trained design, in trial order, as a share
    of the box ``[0, ref[0]] x [0, ref[1]]``. A design stopped at a rung of successive halving, or
    failed, spent its training and adds no point; samples over the budget were never trained."""
    points, curve = [], []
    for r in sorted(recs, key=lambda r: r.number):
        if r.state == "complete":
            points.append((r.values[objective], float(r.bytes)))
        if r.state in DONE:
            curve.append(hypervolume_2d(points, ref) / (ref[0] * ref[1]))
    return curve


def write_outputs(study: optuna.Study, out: Path) -> None:
    """Write ``trials.csv`` and ``pareto.json`` (atomically: a reader never sees half a file)."""
    out.mkdir(parents=True, exist_ok=True)
    objectives = objectives_of(study)
    trials = study.get_trials(deepcopy=False)
    df = study.trials_dataframe(attrs=("number", "state", "values", "params", "user_attrs", "system_attrs",
                                       "duration", "datetime_start", "datetime_complete"))
    if len(df):
        df = df.rename(columns={f"values_{i}": o for i, o in enumerate(objectives)})
        retried = retried_numbers(trials)
        df["state"] = [state_of(t, retried).upper() for t in trials]
        df["on_front"] = df["number"].isin({t.number for t in study.best_trials})
        keep = [c for c in df.columns if not c.startswith("system_attrs_") or c == "system_attrs_constraints:budget"]
        df = df[keep].rename(columns={"system_attrs_constraints:budget": "budget_violation_bytes",
                                      "user_attrs_arch": "arch"})
        atomic_write(out / "trials.csv", df.to_csv(index=False))
    rows = [{"number": r.number, **r.values, "label": r.label, "physical_params": r.physical_params,
             "bytes_fp32": r.bytes_by_dtype["fp32"], "bytes_int8": r.bytes_by_dtype["int8"],
             "macs_per_second": r.macs_per_second, "arch": r.arch.model_dump(mode="json")} for r in front(study)]
    atomic_write(out / "pareto.json", json.dumps({"objectives": list(objectives), "front": rows}, indent=2) + "\n")


def trial_line(study: optuna.Study, number: int) -> str:
    """``trial 7: WER 0.412, 3,881,600 B fp32, feasible, on the front``."""
    r = next(r for r in records(study) if r.number == number)
    label = f" ({r.label})" if r.label else ""
    signal = objectives_of(study)[0]
    name = signal.upper() if len(signal) <= 3 else signal
    if r.state == "pruned" and r.curve:  # stopped at a rung of successive halving
        last = r.curve[-1]
        return (f"trial {r.number}{label}: {name} {last[SIGNALS[signal]]:.3f} at step {last['step']}, "
                f"{r.bytes:,} B {r.dtype}, stopped at a rung")
    if r.state != "complete":
        return f"trial {r.number}{label}: {r.state.upper()}: {r.fail_reason or ''}"
    on = r.number in {b.number for b in study.best_trials}
    return (f"trial {r.number}{label}: {name} {r.values[signal]:.3f}, "
            f"{r.bytes:,} B {r.dtype}, feasible, {'on the front' if on else 'dominated'}")
