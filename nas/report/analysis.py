"""What the report says, as data: the front, the hypervolume, the proxy fidelity, the headline
verdict and the search summary. No drawing and no text here; :mod:`nas.report.plots` draws this
data and :mod:`nas.report.document` writes it.

Trials are read through :func:`nas.trials.records`, the front and the hypervolume come from
:mod:`nas.pareto`, and the infeasible share is :attr:`nas.trials.Tally.infeasible_share`.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass

import optuna

from nas.pareto import front, hypervolume_curve, nondominated_ranks, reference_point
from nas.trials import DONE, Tally, TrialRecord, tally

MIN_ROWS_FOR_FIDELITY = 3
ERROR_RATES = ("wer", "cer")


@dataclass(frozen=True)
class Signal:
    """The first objective, the proxy signal designs are ranked by: an error rate, or e.g. a loss."""

    name: str

    @property
    def is_rate(self) -> bool:
        """An error rate (a share, shown as a percentage), rather than a plain number."""
        return self.name in ERROR_RATES

    @property
    def title(self) -> str:
        return self.name.upper() if self.is_rate else self.name


# ---- the front ----------------------------------------------------------------------------

@dataclass
class FrontView:
    """The trained designs against the budget. Sizes are at ``dtype``; lists are smallest first."""

    signal: Signal
    budget_bytes: int
    dtype: str
    on_front: list[TrialRecord]
    dominated: list[TrialRecord]
    step: list[tuple[int, float]]  # the 2-D front (bytes, signal): a 3-objective front has dominated points in 2-D
    labelled: list[TrialRecord]  # baselines and other enqueued designs that were trained
    infeasible: list[TrialRecord]
    failed: list[TrialRecord]

    def size(self, r: TrialRecord) -> int:
        return r.bytes_by_dtype.get(self.dtype, r.bytes)

    def value(self, r: TrialRecord) -> float:
        return r.values[self.signal.name]

    @property
    def complete(self) -> list[TrialRecord]:
        return sorted(self.on_front + self.dominated, key=lambda r: r.number)


def front_view(study: optuna.Study, recs: list[TrialRecord], signal: Signal, budget_bytes: int,
               dtype: str) -> FrontView:
    on_front = front(study)
    numbers = {r.number for r in on_front}
    complete = [r for r in recs if r.state == "complete"]
    view = FrontView(signal, budget_bytes, dtype, on_front=on_front,
                     dominated=[r for r in complete if r.number not in numbers], step=[],
                     labelled=[r for r in complete if r.label],
                     infeasible=[r for r in recs if r.state == "infeasible"],
                     failed=[r for r in recs if r.state == "failed"])
    view.on_front.sort(key=lambda r: (view.size(r), r.number))
    points = [(view.size(r), view.value(r)) for r in on_front]
    view.step = sorted(p for p, rank in zip(points, nondominated_ranks(points)) if rank == 0)
    return view


# ---- hypervolume --------------------------------------------------------------------------

@dataclass
class Hypervolume:
    """Hypervolume after each trained design, as a share of the box bounded by ``ref``
    (the signal's bound, the budget's bytes)."""

    signal: Signal
    dtype: str
    ref: tuple[float, float]
    curve: list[float]
    best: float | None  # the best signal value of any trained design

    @property
    def box_empty(self) -> bool:
        """No trained design lies inside the box yet (every one is at the signal's bound or worse)."""
        return self.best is not None and self.best >= self.ref[0]


def hypervolume(recs: list[TrialRecord], signal: Signal, budget_bytes: int, dtype: str) -> Hypervolume:
    ref = reference_point(signal.name, budget_bytes, recs)
    best = min((r.values[signal.name] for r in recs if r.state == "complete"), default=None)
    return Hypervolume(signal, dtype, ref, hypervolume_curve(recs, signal.name, ref), best)


# ---- proxy fidelity -----------------------------------------------------------------------

@dataclass
class Fidelity:
    """Rank correlation between the proxy signal and the full-retrain dev WER of the retrained
    designs; the statistics are None when fewer than :data:`MIN_ROWS_FOR_FIDELITY` designs were
    retrained, and nan when one side does not vary."""

    rows: list[dict]
    tau: float | None = None
    tau_p: float | None = None
    rho: float | None = None
    rho_p: float | None = None

    @property
    def measured(self) -> bool:
        return self.tau is not None

    @property
    def proxy(self) -> list[float]:
        return [r["proxy_value"] for r in self.rows]  # the value of the signal `proxy_signal` names

    @property
    def full(self) -> list[float]:
        return [r["full_dev_wer"] for r in self.rows]


def fidelity(retrained: list[dict]) -> Fidelity:
    """Over the retrained designs (a design retrained with several seeds counts once, at its first
    seed: the proxy ranked it once) that have a final proxy value (a design stopped at a rung of an
    older study has none)."""
    from scipy.stats import kendalltau, spearmanr

    first = {}
    for r in sorted(retrained, key=lambda r: r.get("seed", 0)):
        if r.get("proxy_value") is not None:
            first.setdefault(r["number"], r)
    out = Fidelity(list(first.values()))
    if len(out.rows) < MIN_ROWS_FOR_FIDELITY:
        return out
    with warnings.catch_warnings():  # constant input: scipy warns and returns nan, which the report explains
        warnings.simplefilter("ignore")
        out.tau, out.tau_p = map(float, kendalltau(out.proxy, out.full))
        out.rho, out.rho_p = map(float, spearmanr(out.proxy, out.full))
    return out


# ---- the search summary -------------------------------------------------------------------

TRAINED_STATES = (*DONE, "retried")  # the states of trials that reached a worker


@dataclass
class Summary:
    """Trials by state, failures by reason (most common first), and where the time went."""

    tally: Tally
    failures: list[tuple[str, list[int]]]
    span_s: float | None  # from the first trial's start to the last one's end; None before one ends
    busy_s: float  # the trained trials' durations, summed over parallel workers
    train_s: float  # of which inside the trainer's steps and evaluations


NO_REASON = "no reason recorded"


def summary(recs: list[TrialRecord]) -> Summary:
    failed = [r for r in recs if r.state == "failed"]
    reasons = Counter(r.fail_reason or NO_REASON for r in failed)
    failures = [(reason, [r.number for r in failed if (r.fail_reason or NO_REASON) == reason])
                for reason, _ in reasons.most_common()]
    starts, ends = [r.start for r in recs if r.start], [r.end for r in recs if r.end]
    span = (max(ends) - min(starts)).total_seconds() if starts and ends else None
    trained = [r for r in recs if r.state in TRAINED_STATES and r.duration_s]
    return Summary(tally(recs), failures, span, sum((r.duration_s for r in trained), 0.0),
                   sum((r.train_seconds or 0.0 for r in trained), 0.0))
