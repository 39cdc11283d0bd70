"""The headline verdict: does the searched design beat the hand-made baselines, beyond seed noise?

Retrained designs come as rows of ``retrained.json``, one per design and seed (``number`` is the
design's trial, ``seed`` the training seed). The **searched design** is the retrained design the
search found (no label) within the budget with the lowest mean full dev WER over its seeds: the
test set plays no part in choosing it. Against each baseline, on test WER means over seeds:

- it **beats** the baseline when its mean is lower by more than twice the larger standard
  deviation of the two (sample standard deviations over seeds);
- it is **worse** when its mean is higher by more than that;
- otherwise the two are **within noise**.

With a single seed on either side there is no noise estimate, and the headline says so instead
of calling a winner. The goal the project set (issue 13) is a searched mean at most 0.90 times the
better baseline's; the headline reports that ratio.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

BASELINES = ("unshared", "paper")
NOISE_SIGMAS = 2.0
GOAL_RATIO = 0.90


@dataclass(frozen=True)
class Entry:
    """One design's retrains: a row per seed."""

    name: str  # "searched", or the baseline's label
    rows: tuple[dict, ...]

    @property
    def number(self) -> int:
        return self.rows[0]["number"]

    @property
    def seeds(self) -> list[int]:
        return [r.get("seed", 0) for r in self.rows]

    def mean(self, key: str) -> float:
        return statistics.fmean(r[key] for r in self.rows)

    def std(self, key: str) -> float | None:
        """Sample standard deviation over seeds; None with a single seed."""
        return statistics.stdev([r[key] for r in self.rows]) if len(self.rows) > 1 else None


@dataclass(frozen=True)
class Comparison:
    """The searched design against one baseline, on test WER means."""

    baseline: str
    difference: float  # baseline mean - searched mean: positive when the searched design is better
    noise: float | None  # NOISE_SIGMAS times the larger std; None without a noise estimate
    ratio: float  # searched mean / baseline mean

    @property
    def outcome(self) -> str:
        if self.noise is None:
            return "no noise estimate"
        if self.difference > self.noise:
            return "beats"
        if -self.difference > self.noise:
            return "worse"
        return "within noise"


VERDICTS = ("yes", "no", "within noise", "no noise estimate", "no searched design", "baseline missing",
            "nothing learned")


@dataclass(frozen=True)
class Headline:
    best: Entry | None
    baselines: dict[str, Entry | None]
    comparisons: dict[str, Comparison]
    verdict: str  # one of VERDICTS
    budget_bytes: int

    @property
    def missing(self) -> list[str]:
        return [label for label, e in self.baselines.items() if e is None]

    @property
    def goal_ratio(self) -> float | None:
        """Searched mean test WER over the better baseline's."""
        present = [e for e in self.baselines.values() if e is not None]
        if self.best is None or not present:
            return None
        better = min(e.mean("full_test_wer") for e in present)
        return self.best.mean("full_test_wer") / better if better else math.inf


def headline(rows: list[dict], budget_bytes: int) -> Headline:
    by_design: dict[int, list[dict]] = {}
    for r in rows:
        if r.get("full_test_wer") is not None:
            by_design.setdefault(r["number"], []).append(r)
    entries = {n: tuple(sorted(rs, key=lambda r: r.get("seed", 0))) for n, rs in by_design.items()}
    searched = [Entry("searched", rs) for rs in entries.values()
                if not rs[0].get("label") and rs[0]["bytes"] <= budget_bytes]
    best = min(searched, key=lambda e: e.mean("full_dev_wer")) if searched else None
    base = {label: next((Entry(label, rs) for rs in entries.values() if rs[0].get("label") == label), None)
            for label in BASELINES}
    comparisons = {}
    if best is not None:
        for label, e in base.items():
            if e is None:
                continue
            stds = [best.std("full_test_wer"), e.std("full_test_wer")]
            noise = None if None in stds else NOISE_SIGMAS * max(stds)
            b, s = e.mean("full_test_wer"), best.mean("full_test_wer")
            comparisons[label] = Comparison(label, b - s, noise, s / b if b else math.inf)
    if best is None:
        verdict = "no searched design"
    elif any(e is None for e in base.values()):
        verdict = "baseline missing"
    elif min(e.mean("full_test_wer") for e in [best, *base.values()]) >= 1.0:
        verdict = "nothing learned"  # no design learned to spell words: differences mean nothing
    else:
        outcomes = {c.outcome for c in comparisons.values()}
        verdict = ("no noise estimate" if "no noise estimate" in outcomes else "no" if "worse" in outcomes
                   else "yes" if outcomes == {"beats"} else "within noise")
    return Headline(best, base, comparisons, verdict, budget_bytes)


@dataclass(frozen=True)
class Shortfall:
    """Where a verdict misses the goal, the measured facts that bear on why: how much of the budget
    each baseline already uses (sharing is needed to fit only where a design would not), and the
    search's own proxy value of the searched design against the baselines' (lower is better for
    every proxy signal). Behind on the proxy too: the search found nothing the proxy put ahead, and
    the lever is the space or the number of trials. Ahead on the proxy: the proxy misranked it."""

    budget_share: dict[str, float]  # each baseline's bytes over the budget's (both are present for a verdict)
    proxy_signal: str | None
    proxy_searched: float | None
    proxy_baselines: dict[str, float]

    @property
    def behind_on_the_proxy(self) -> bool | None:
        if self.proxy_searched is None or not self.proxy_baselines:
            return None
        return self.proxy_searched > min(self.proxy_baselines.values())


def shortfall(h: Headline) -> Shortfall | None:
    """The facts behind a missed goal; None where the goal is met or there is no verdict to explain."""
    if h.verdict not in ("yes", "no", "within noise") or h.goal_ratio is None or h.goal_ratio <= GOAL_RATIO:
        return None
    base = {label: e for label, e in h.baselines.items() if e is not None}
    proxy = {label: e.rows[0]["proxy_value"] for label, e in base.items() if e.rows[0].get("proxy_value") is not None}
    return Shortfall({label: e.rows[0]["bytes"] / h.budget_bytes for label, e in base.items()},
                     h.best.rows[0].get("proxy_signal"), h.best.rows[0].get("proxy_value"), proxy)


def headline_json(h: Headline) -> dict:
    """``headline.json``: the searched design and each baseline with their test WER, CER, bytes and
    seeds, the comparisons and the verdict."""
    def entry(e: Entry | None) -> dict | None:
        if e is None:
            return None
        first = e.rows[0]
        return {"trial": e.number, "label": first.get("label"), "bytes": first["bytes"],
                "physical_params": first["physical_params"], "seeds": e.seeds,
                "test_wer": [r["full_test_wer"] for r in e.rows], "test_wer_mean": e.mean("full_test_wer"),
                "test_wer_std": e.std("full_test_wer"), "test_cer_mean": e.mean("full_test_cer"),
                "dev_wer_mean": e.mean("full_dev_wer"), "decoding": first.get("decoding"),
                "schedule": first.get("schedule")}
    return {
        "rule": f"beats: mean test WER lower by more than {NOISE_SIGMAS:g} x the larger std over seeds",
        "verdict": h.verdict,
        "searched": entry(h.best),
        "baselines": {label: entry(e) for label, e in h.baselines.items()},
        "comparisons": {label: {"difference": c.difference, "noise": c.noise, "ratio": c.ratio,
                                "outcome": c.outcome} for label, c in h.comparisons.items()},
        "goal": {"ratio_to_better_baseline": h.goal_ratio, "at_most": GOAL_RATIO,
                 "met": h.goal_ratio is not None and h.goal_ratio <= GOAL_RATIO},
    }
