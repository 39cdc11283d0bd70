"""What happened to each trial of a study, read once from Optuna storage.

The search writes a trial's design and sizes into Optuna storage (user attrs) when it samples it,
and its objective values, curve and fail reason when it ends. Everything downstream (the trials
table, the front, the report, retraining, the export, the benchmarks) reads trials through
:func:`records`, which parses each one once into a :class:`TrialRecord`. Nothing else parses a
trial's user attrs.

Every trial is in exactly one state (:data:`STATES`); :class:`Tally` counts them, and defines the
one *infeasible share* the README, the report and the benchmarks quote: samples over the budget
among all samples the study drew (every trial but those still queued and those retried: a retry
is the same draw run again).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from nas.config import ArchConfig

STATES = {
    "complete": "trained and scored",
    "pruned": "trained, then stopped early at a rung of successive halving",
    "failed": "trained, but the run failed (reasons below)",
    "infeasible": "sampled over the budget, never trained",
    "invalid": "sampled combination that ArchConfig refuses, never trained",
    "retried": "interrupted (driver died) and run again as a new trial",
    "running": "still running",
    "waiting": "queued",
}
DONE = ("complete", "pruned", "failed")  # a design trained to its end, to a rung, or to a failure: what --trials counts
BUDGET_KEY = "budget"  # the name of the budget constraint (Optuna's ``trial.set_constraint``)


def is_infeasible(t: FrozenTrial) -> bool:
    """Over the budget: its budget constraint is positive (it was never trained)."""
    return t.system_attrs.get(f"constraints:{BUDGET_KEY}", 0) > 0


def state_of(t: FrozenTrial, retried: set[int]) -> str:
    """The trial's state, one of :data:`STATES`. ``retried``: numbers of trials run again."""
    if t.state == TrialState.PRUNED:
        return "infeasible" if is_infeasible(t) else "pruned"
    if t.state == TrialState.FAIL:
        return "invalid" if "invalid" in t.user_attrs else "retried" if t.number in retried else "failed"
    return t.state.name.lower()


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Every trial that a later trial ran again. A design interrupted twice is a chain (15 retried
    as 17, 17 as 19): 19's history is [15, 17], while its ``retried_trial_number`` names 15 alone,
    so reading that would leave 17 a "failed" trial that counts as done."""
    return {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}


@dataclass(frozen=True)
class TrialRecord:
    """One trial, parsed. ``arch`` and the sizes are absent for an ``invalid`` sample (ArchConfig
    refused it); ``values`` maps objective names to values for complete and pruned trials."""

    number: int
    state: str
    arch: ArchConfig | None
    label: str | None = None
    values: dict[str, float] = field(default_factory=dict)
    physical_params: int | None = None
    virtual_params: int | None = None
    bytes: int | None = None  # at the budget's dtype
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    macs_per_second: float | None = None
    dtype: str | None = None
    run_dir: Path | None = None
    fail_reason: str | None = None
    curve: list[dict] = field(default_factory=list)  # the trainer's intermediate evaluations
    train_seconds: float | None = None  # inside the trainer's steps and evaluations
    trainer_seconds: float | None = None  # the whole train() call
    duration_s: float | None = None  # from Optuna's ask to its tell
    start: datetime | None = None
    end: datetime | None = None

    @property
    def trained(self) -> bool:
        """It reached a worker (it has a run directory)."""
        return self.run_dir is not None

    @property
    def name(self) -> str:
        return f"#{self.number}" + (f" ({self.label})" if self.label else "")

    @property
    def proxy(self) -> tuple[str | None, float | None]:
        """The search's first objective, its proxy signal (cer, wer, loss or train_loss), and its value."""
        return next(iter(self.values.items()), (None, None))


def record(t: FrozenTrial, objectives: tuple[str, ...], retried: set[int] = frozenset()) -> TrialRecord:
    a = t.user_attrs
    arch = ArchConfig.model_validate_json(a["arch"]) if "arch" in a and "invalid" not in a else None
    return TrialRecord(
        number=t.number,
        state=state_of(t, retried),
        arch=arch,
        label=a.get("label"),
        values=dict(zip(objectives, t.values)) if t.values else {},
        physical_params=a.get("physical_params"),
        virtual_params=a.get("virtual_params"),
        bytes=a.get("bytes"),
        bytes_by_dtype={dt: a[f"bytes_{dt}"] for dt in ("fp32", "bf16", "int8") if f"bytes_{dt}" in a},
        macs_per_second=a.get("macs_per_second"),
        dtype=a.get("dtype"),
        run_dir=Path(a["run_dir"]) if a.get("run_dir") else None,
        fail_reason=a.get("fail_reason"),
        curve=list(a.get("curve", [])),
        train_seconds=a.get("train_seconds"),
        trainer_seconds=a.get("trainer_seconds"),
        duration_s=t.duration.total_seconds() if t.duration else None,
        start=t.datetime_start,
        end=t.datetime_complete,
    )


def objectives_of(study: optuna.Study) -> tuple[str, ...]:
    """The study's objective names, as the search stored them."""
    return tuple(study.user_attrs.get("settings", {}).get("objectives", ("wer", "bytes")))


def records(study: optuna.Study) -> list[TrialRecord]:
    """Every trial of ``study``, in trial order."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    objectives = objectives_of(study)
    return [record(t, objectives, retried) for t in trials]


@dataclass(frozen=True)
class Tally:
    """Trials counted by state.

    ``samples`` counts every draw of the study (all trials but the queued and the retried ones), and
    ``infeasible_share`` is the share of them over the budget. ``done`` counts the trained designs
    that reached an end and were not run again: the number a search's ``--trials`` asks for.
    """

    counts: dict[str, int]

    def __getitem__(self, state: str) -> int:
        return self.counts.get(state, 0)

    @property
    def samples(self) -> int:
        """Draws from the sampler: a retried trial is the same draw run again, not another one."""
        return sum(n for s, n in self.counts.items() if s not in ("waiting", "retried"))

    @property
    def done(self) -> int:
        return sum(self[s] for s in DONE)

    @property
    def infeasible_share(self) -> float:
        return self["infeasible"] / self.samples if self.samples else 0.0


def tally(recs: list[TrialRecord] | list[FrozenTrial]) -> Tally:
    """Count records (or raw Optuna trials, whose states are worked out here) by state."""
    if recs and isinstance(recs[0], FrozenTrial):
        retried = retried_numbers(recs)
        return Tally(dict(Counter(state_of(t, retried) for t in recs)))
    return Tally(dict(Counter(r.state for r in recs)))
