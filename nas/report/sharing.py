"""What the search learned about sharing: which of the four levels the front designs use, and how
each compares with the unshared baseline, the design that shares nothing, at equal or fewer bytes.

Data for the report's "What the front shares" section, read from the front (:class:`FrontView`);
:mod:`nas.report.document` writes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from nas.describe import LEVELS, sharing_levels
from nas.report.analysis import FrontView
from nas.trials import TrialRecord


@dataclass(frozen=True)
class FrontDesign:
    record: TrialRecord
    levels: tuple[str, ...]
    virtual_layers: int
    stored_blocks: int
    bytes: int
    value: float  # the proxy signal
    bytes_ratio: float | None  # bytes / the unshared baseline's
    value_difference: float | None  # the proxy signal minus the unshared baseline's: negative is better


@dataclass(frozen=True)
class FrontSharing:
    designs: list[FrontDesign]  # the front, smallest first
    baseline: TrialRecord | None  # the unshared baseline, when it was trained
    baseline_value: float | None

    def using(self, level: str) -> int:
        return sum(level in d.levels for d in self.designs)

    @property
    def best_within_baseline_bytes(self) -> FrontDesign | None:
        """The front design with the best proxy signal among those no larger than the baseline."""
        fitting = [d for d in self.designs if d.bytes_ratio is not None and d.bytes_ratio <= 1]
        return min(fitting, key=lambda d: d.value) if fitting else None


def front_sharing(view: FrontView) -> FrontSharing:
    baseline = next((r for r in view.labelled if r.label == "unshared" and r.values), None)
    base_bytes = view.size(baseline) if baseline else None
    base_value = view.value(baseline) if baseline else None
    designs = []
    for r in view.on_front:
        blocks = r.arch.block_map()
        designs.append(FrontDesign(
            r, sharing_levels(r.arch), len(blocks), len(set(blocks)), view.size(r), view.value(r),
            view.size(r) / base_bytes if base_bytes else None,
            view.value(r) - base_value if base_value is not None else None))
    return FrontSharing(designs, baseline, base_value)


__all__ = ["LEVELS", "FrontDesign", "FrontSharing", "front_sharing"]
