"""Asynchronous successive halving for several objectives (``nas search --fidelity asha``).

A design trains under one long schedule: the proxy stretched to its last rung (``rungs`` times
its steps, 2x, 4x and 9x by default), evaluated every base proxy's steps. When a
design reaches a rung, its objective vector there (the proxy signal and bytes, and MACs if they
are objectives) is ranked with those of every design that reached the same rung before it, in
this study and under any driver, as MOASHA ranks them (Schmucker et al. 2021, with Syne Tune's
default order): fronts of non-dominated sorting first, and within a front an epsilon-net (Salinas
et al. 2021), which takes the best proxy signal first and then, each time, the design farthest
from those taken. The design is **promoted**, and simply trains on from where it is, when at most
a ``1/eta`` share of the rung comes before it; otherwise Ray Tune stops it and Optuna is told
PRUNED, its intermediate values kept in its ``curve``. A design that passes every rung trains to
the end and is told COMPLETE with its final values. A design the user named (the baselines, and
``--enqueue`` files) is never stopped: it is the yardstick the others are read against, so the
front places it after the same training as the designs that complete, and it can be retrained
and compared in full. Its points still count in the rung tables of the others.

Decisions live in Optuna storage (each trial's ``curve`` and ``rungs`` user attrs), so a driver
that dies and is started again, or a second driver on the same study, decides from the same table;
a retried trial resumes from its checkpoint and is judged at the rungs it had not passed yet.
"""

from __future__ import annotations

import math

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from nas.pareto import nondominated_ranks
from nas.schedule import Rungs, Schedule  # Rungs: the stretching of a schedule, free of Ray
from nas.study import SIGNALS, taken_over_is_dropped
from nas.trials import records


def promoted(vector: tuple[float, ...], others: list[tuple[float, ...]], eta: int) -> bool:
    """Whether a design with objective ``vector`` at a rung goes on, ``others`` being the vectors of
    the other designs that reached that rung: at most a ``1/eta`` share of all of them (itself
    included) comes before it in :func:`moasha_order`. The first design at a rung always goes on.

    Counting only the designs that dominate it would keep nearly all: with bytes an objective, known
    before training, every design on the (signal, bytes) front has no dominator. Measured that way,
    successive halving stopped 2 of 6 designs in an hour (``nas bench search``, 2026-11-29)."""
    points = [*others, vector]
    return moasha_order(points).index(len(others)) <= len(points) / eta


def moasha_order(points: list[tuple[float, ...]]) -> list[int]:
    """The indices of ``points`` (all objectives minimized) best first: front by front of
    non-dominated sorting, and within a front as an epsilon-net in objectives scaled to the
    points' range: the lowest first objective first (ties: the next objectives), then each time
    the point farthest from those of its front already taken (ties: the earlier point).

    Hand-written, like :func:`nas.pareto.nondominated_ranks`: the order is Syne Tune's MOASHA
    default, and Syne Tune is a whole tuning framework beside Ray Tune for these few lines."""
    ranks = nondominated_ranks(points)
    lows = [min(c) for c in zip(*points)]
    spans = [(max(c) - low) or 1.0 for c, low in zip(zip(*points), lows)]
    scaled = [[(x - low) / span for x, low, span in zip(p, lows, spans)] for p in points]
    order: list[int] = []
    for level in range(max(ranks) + 1):
        left = [i for i, r in enumerate(ranks) if r == level]
        taken = [min(left, key=lambda i: points[i])]
        left.remove(taken[0])
        while left:
            far = max(left, key=lambda i: min(math.dist(scaled[i], scaled[j]) for j in taken))
            taken.append(far)
            left.remove(far)
        order += taken
    return order


def vector(point: dict, objectives: tuple[str, ...], sizes: dict) -> tuple[float, ...]:
    """The objective vector of an evaluation point (signals) and a design's sizes."""
    return tuple(float(point[SIGNALS[o]]) if o in SIGNALS else float(sizes[o]) for o in objectives)


class RungScheduler(FIFOScheduler):
    """Ray Tune scheduler that stops a trial at a rung where it is not promoted.

    ``searcher`` is the search's :class:`~nas.search.BudgetSearcher`: it maps Tune trials to
    Optuna trials and records their evaluation points.
    """

    def __init__(self, searcher, base: Schedule, rungs: Rungs):
        super().__init__()
        self.searcher, self.rungs = searcher, rungs
        self.rung_steps = rungs.steps(base)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        optuna_trial = self.searcher.live.get(trial.trial_id)
        if optuna_trial is None or "step" not in result or "error" in result or result.get("final"):
            return TrialScheduler.CONTINUE
        go_on = False  # a trial that another driver took over is stopped here
        with taken_over_is_dropped(optuna_trial):
            self.searcher.record_point(optuna_trial, result)
            go_on = self.judge(optuna_trial, result)
        return TrialScheduler.CONTINUE if go_on else TrialScheduler.STOP

    def judge(self, optuna_trial, result: dict) -> bool:
        """Decide every rung up to ``result["step"]`` not decided yet; False once one stops it."""
        objectives = self.searcher.settings.objectives
        attrs = optuna_trial.user_attrs
        sizes = {"bytes": attrs["bytes"], "macs": attrs["macs_per_second"]}
        decided = dict(attrs.get("rungs", {}))
        if "stopped" in decided.values():  # a retry of a design stopped before its driver died
            return False
        for k, step in enumerate(self.rung_steps[:-1]):  # the last rung is the end of training
            if step > result["step"] or str(k) in decided:
                continue
            if attrs.get("label"):  # a named design is the yardstick: it trains to the end
                decided[str(k)] = "kept: named design"
                optuna_trial.set_user_attr("rungs", decided)
                continue
            # Judge at the rung's own point; a trial resumed past it is judged at where it stands.
            curve = {p["step"]: p for p in attrs.get("curve", [])}
            mine = vector(curve.get(step, result), objectives, sizes)
            # A retried trial's curve was copied to its retry, which stands for the design: counting
            # both would enter one design twice (and a retry would meet its own earlier copies).
            others = [vector(p, objectives, {"bytes": r.bytes, "macs": r.macs_per_second})
                      for r in records(self.searcher.study)
                      if r.number != optuna_trial.number and r.state != "retried"
                      for p in r.curve if p["step"] == step]
            decided[str(k)] = "promoted" if promoted(mine, others, self.rungs.eta) else "stopped"
            optuna_trial.set_user_attr("rungs", decided)
            if decided[str(k)] == "stopped":
                return False
        return True
