"""The Pareto front of a study, its hypervolume, and the files a search leaves behind.

The front is Optuna's (``study.best_trials``: the non-dominated COMPLETE trials; infeasible
designs are never COMPLETE). ``results/<study>/trials.csv`` holds every trial with its parameters,
sizes, objectives, state and duration; ``pareto.json`` the current front.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from nas.study import is_infeasible


def front(study: optuna.Study) -> list[FrozenTrial]:
    return sorted(study.best_trials, key=lambda t: t.values[1] if len(t.values) > 1 else t.number)


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


def hypervolume_curve(trials: list[FrozenTrial], ref: tuple[float, float]) -> list[float]:
    """Hypervolume of (WER, bytes) after each finished trial, in trial order."""
    points, curve = [], []
    for t in sorted(trials, key=lambda t: t.number):
        if t.state == TrialState.COMPLETE:
            points.append((t.values[0], t.values[1]))
            curve.append(hypervolume_2d(points, ref))
    return curve


def state_of(t: FrozenTrial) -> str:
    if t.state == TrialState.PRUNED:
        return "INFEASIBLE" if is_infeasible(t) else "PRUNED"
    return t.state.name


def write_outputs(study: optuna.Study, out: Path, objectives: tuple[str, ...]) -> None:
    """Write ``trials.csv`` and ``pareto.json`` (atomically: a reader never sees half a file)."""
    out.mkdir(parents=True, exist_ok=True)
    df = study.trials_dataframe(attrs=("number", "state", "values", "params", "user_attrs", "system_attrs",
                                       "duration", "datetime_start", "datetime_complete"))
    if len(df):
        df = df.rename(columns={f"values_{i}": o for i, o in enumerate(objectives)})
        df["state"] = [state_of(t) for t in study.get_trials(deepcopy=False)]
        df["on_front"] = df["number"].isin({t.number for t in study.best_trials})
        keep = [c for c in df.columns if not c.startswith("system_attrs_") or c == "system_attrs_constraints:budget"]
        df = df[keep].rename(columns={"system_attrs_constraints:budget": "budget_violation_bytes",
                                      "user_attrs_arch": "arch"})
        _atomic(out / "trials.csv", df.to_csv(index=False))
    rows = [{"number": t.number, **dict(zip(objectives, t.values)), "label": t.user_attrs.get("label"),
             "physical_params": t.user_attrs["physical_params"], "bytes_fp32": t.user_attrs["bytes_fp32"],
             "bytes_int8": t.user_attrs["bytes_int8"], "macs_per_second": t.user_attrs["macs_per_second"],
             "arch": json.loads(t.user_attrs["arch"])} for t in front(study)]
    _atomic(out / "pareto.json", json.dumps({"objectives": list(objectives), "front": rows}, indent=2) + "\n")


def trial_line(study: optuna.Study, t: FrozenTrial) -> str:
    """``trial 7: WER 0.412, 3,881,600 B fp32, feasible, on the front``."""
    label = f" ({t.user_attrs['label']})" if t.user_attrs.get("label") else ""
    if t.state != TrialState.COMPLETE:
        return f"trial {t.number}{label}: {state_of(t)}: {t.user_attrs.get('fail_reason', '')}"
    on = t.number in {b.number for b in study.best_trials}
    wer = t.values[0]
    return (f"trial {t.number}{label}: WER {wer:.3f}, {t.user_attrs['bytes']:,} B {t.user_attrs['dtype']}, "
            f"feasible, {'on the front' if on else 'dominated'}")


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)

