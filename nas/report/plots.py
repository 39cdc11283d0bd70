"""The report's figures, each a function from analysis data to a PNG path.

matplotlib's object API (``Figure``, no pyplot), so importing this module changes no global
backend. PNGs carry no software metadata, so the same data draws the same bytes.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, LogLocator, MaxNLocator, NullFormatter, PercentFormatter

from nas.report.analysis import Fidelity, FrontView, Hypervolume, Signal
from nas.report.importance import Importance
from nas.trials import TrialRecord

DPI = 120
FRONT_COLOR, FADED, INFEASIBLE_COLOR, BUDGET_COLOR = "#1f5fa8", "#9a9a9a", "#c0392b", "#c0392b"


def front_png(v: FrontView, path: Path) -> Path:
    """Signal against bytes: the front highlighted as a step line, the rest faded, infeasible apart."""
    fig = Figure(figsize=(8, 5.6), dpi=DPI, layout="constrained")
    strip, ax = fig.subplots(2, 1, sharex=True, height_ratios=[1, 6])
    xs = [v.size(r) for r in v.complete + v.infeasible] + [v.budget_bytes]
    _bytes_axis(ax, min(xs), max(xs))
    for a in (strip, ax):
        a.axvline(v.budget_bytes, color=BUDGET_COLOR, linestyle="--", linewidth=1.2)
    # Left of the line, in the strip: only over-budget samples lie right of it, nothing lies left.
    strip.text(v.budget_bytes, 0.5, f"budget {_eng(v.budget_bytes)} ", color=BUDGET_COLOR, va="center", ha="right",
               fontsize=9, transform=strip.get_xaxis_transform())
    strip.scatter([v.size(r) for r in v.infeasible], [_jitter(r.number) for r in v.infeasible], marker="x", s=22,
                  color=INFEASIBLE_COLOR, alpha=0.7, linewidths=1)
    strip.set_ylim(-0.15, 1.15)
    strip.set_yticks([])
    strip.set_title(f"over budget, never trained: {len(v.infeasible)} samples", fontsize=9, loc="left")

    ax.scatter([v.size(r) for r in v.dominated], [v.value(r) for r in v.dominated], color=FADED, alpha=0.45, s=24,
               label=f"dominated ({len(v.dominated)})")
    if v.on_front:
        ax.step([x for x, _ in v.step] + [v.budget_bytes], [y for _, y in v.step] + [v.step[-1][1]], where="post",
                color=FRONT_COLOR, linewidth=1.5, alpha=0.8)
        ax.scatter([v.size(r) for r in v.on_front], [v.value(r) for r in v.on_front], color=FRONT_COLOR, s=46,
                   zorder=3, label=f"on the front ({len(v.on_front)})")
    ax.set_xlabel(f"parameter memory at {v.dtype} (bytes)")
    _signal_axis(ax.yaxis, v.signal, "proxy dev")
    for i, r in enumerate(_uncrowded(ax, v.on_front, v)):  # alternate sides: front neighbours are close
        ax.annotate(f"#{r.number}", (v.size(r), v.value(r)), textcoords="offset points",
                    xytext=(5, -11) if i % 2 == 0 else (-5, 5), ha="left" if i % 2 == 0 else "right",
                    fontsize=8, color=FRONT_COLOR)
    if v.labelled:
        ax.scatter([v.size(r) for r in v.labelled], [v.value(r) for r in v.labelled], marker="D", s=70,
                   facecolors="none", edgecolors="black", linewidths=1.2, zorder=4, label="baseline / enqueued")
        for r in v.labelled:
            ax.annotate(r.label, (v.size(r), v.value(r)), textcoords="offset points", xytext=(-6, 6),
                        ha="right", fontsize=9, fontweight="bold")  # left: baselines sit near the budget
    if not v.complete:
        ax.text(0.5, 0.5, "no design trained yet", transform=ax.transAxes, ha="center", color=FADED)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8, frameon=False)
    failed = len(v.failed)
    fig.suptitle(f"Proxy {v.signal.title} against memory"
                 + (f" ({failed} failed trial{'' if failed == 1 else 's'} not plotted)" if failed else ""), fontsize=11)
    return _save(fig, path)


def hypervolume_png(h: Hypervolume, path: Path) -> Path:
    fig = Figure(figsize=(7, 3.6), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    if h.curve:
        ax.step(range(1, len(h.curve) + 1), h.curve, where="post", color=FRONT_COLOR, marker="o", markersize=3)
        ax.annotate(f"{h.curve[-1]:.1%}", (len(h.curve), h.curve[-1]), textcoords="offset points", xytext=(-4, 6),
                    ha="right", fontsize=9)
        ax.set_ylim(0, max(max(h.curve) * 1.15, 0.01))
    else:
        ax.text(0.5, 0.5, "no design trained yet", transform=ax.transAxes, ha="center", color=FADED)
    ax.set_xlabel("designs trained (complete trials, in trial order)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("hypervolume")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    bound = f"{h.ref[0]:.0%}" if h.signal.is_rate else f"{h.ref[0]:.4g}"
    ax.set_title(f"Hypervolume: share of the box {h.signal.title} ≤ {bound}, bytes ≤ {_eng(h.ref[1])} at {h.dtype}",
                 fontsize=10)
    return _save(fig, path)


def importance_png(imp: Importance, path: Path) -> Path:
    names = list(imp.importances)
    fig = Figure(figsize=(7, 0.6 + 0.32 * len(names)), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.barh(names[::-1], [imp.importances[n] for n in names[::-1]], color=FRONT_COLOR)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel(f"share of importance for the proxy {imp.signal.title} ({imp.evaluator})")
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def fidelity_png(f: Fidelity, signal: Signal, path: Path) -> Path:
    fig = Figure(figsize=(6, 4.4), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.scatter(f.proxy, f.full, color=FRONT_COLOR, s=36)
    for r, x, y in zip(f.rows, f.proxy, f.full):
        ax.annotate(r.get("label") or f"#{r['number']}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.margins(0.15)
    _signal_axis(ax.xaxis, signal, "proxy dev", " (search)")
    ax.set_ylabel("dev WER after full retraining")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    ax.set_title(f"Kendall τ = {_corr(f.tau)}, Spearman ρ = {_corr(f.rho)} ({len(f.rows)} designs)", fontsize=10)
    return _save(fig, path)


# ---- helpers ------------------------------------------------------------------------------

def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


def _signal_axis(axis, signal: Signal, before: str, after: str = "") -> None:
    axis.set_label_text(f"{before} {signal.title}{after}")
    if signal.is_rate:
        axis.set_major_formatter(PercentFormatter(1.0))


def _bytes_axis(ax: Axes, lo: float, hi: float) -> None:
    """Bytes in engineering units (kB, MB); logarithmic when sizes span more than a factor of 4."""
    if hi > 4 * lo > 0:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        pad = (hi / lo) ** 0.06
        ax.set_xlim(lo / pad, hi * pad)
    ax.xaxis.set_major_formatter(EngFormatter(unit="B", places=0))


def _uncrowded(ax: Axes, recs: list[TrialRecord], v: FrontView, min_px: float = 16.0) -> list[TrialRecord]:
    """The designs whose points lie at least ``min_px`` pixels from every one kept before them."""
    kept, spots = [], []
    for r in recs:
        x, y = ax.transData.transform((v.size(r), v.value(r)))
        if all((x - a) ** 2 + (y - b) ** 2 >= min_px ** 2 for a, b in spots):
            kept.append(r)
            spots.append((x, y))
    return kept


def _jitter(number: int) -> float:
    return (number * 0.6180339887) % 1.0


def _corr(x: float) -> str:
    return "n/a" if x != x else f"{x:.3f}"  # nan: one side does not vary


def _eng(n: float) -> str:
    return EngFormatter(unit="B", places=0)(n)
