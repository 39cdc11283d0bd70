"""The report a user reads after a search: ``report.md``, a self-contained ``report.html``, PNGs.

:func:`write_report` composes one function per section. Each section function returns a
:class:`Section` (a title and a few blocks: paragraphs, tables, images, code lines) and writes
its PNG, if it has one; the same blocks are rendered once as Markdown and once as HTML, where the
images are embedded as ``data:`` URIs so the file opens with no network.

Sections, in order: the headline comparison (only with full retrains), how to read the report,
the front, the Pareto designs, their layer maps, hypervolume against trials, the importance of
each design decision, proxy fidelity, and the search summary.

Plots use matplotlib's object API (``Figure``, no pyplot), so importing this module changes no
global backend.
"""

from __future__ import annotations

import base64
import html
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, LogLocator, MaxNLocator, NullFormatter, PercentFormatter
from optuna.trial import FrozenTrial, TrialState

from nas.config import FAMILIES, KINDS, ArchConfig, Tiling
from nas.describe import layer_map, sharing_in_words
from nas.pareto import front, hypervolume_curve
from nas.study import is_infeasible

BASELINES = ("unshared", "paper")
WIN_MARGIN = 0.10  # relative WER improvement the searched design must reach over each baseline
MIN_TRIALS_FOR_IMPORTANCE = 5
MIN_ROWS_FOR_FIDELITY = 3
REF_WER = 1.0  # hypervolume reference point: (WER 100%, the budget)
PNGS = ("front.png", "hypervolume.png", "importance.png", "fidelity.png")
DPI = 120
FRONT_COLOR, FADED, INFEASIBLE_COLOR, BUDGET_COLOR = "#1f5fa8", "#9a9a9a", "#c0392b", "#c0392b"


# ---- the document model: what a section holds, rendered twice -------------------------------

@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    path: Path
    alt: str


@dataclass
class Code:
    lines: list[str]


Block = str | Table | Image | Code  # a str is a paragraph (``**bold**`` and ```code``` allowed)


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


# ---- the composition ------------------------------------------------------------------------

def write_report(study: optuna.Study, out_dir: Path, budget_bytes: int, dtype: str,
                 retrained: list[dict] | None = None) -> Path:
    """Write ``report.md``, ``report.html`` and the PNGs into ``out_dir``; return the Markdown path.

    ``budget_bytes`` at ``dtype`` is the search's budget. ``retrained`` rows (one per fully
    retrained design: ``number``, ``label``, ``proxy_wer``, ``full_dev_wer``, ``full_test_wer``,
    ``full_test_cer``, ``bytes``, ``physical_params``, ``arch``) add the headline comparison and
    the proxy-fidelity check.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in PNGS:  # a figure a section no longer draws must not linger beside the report
        (out_dir / name).unlink(missing_ok=True)
    trials = study.get_trials(deepcopy=False)
    # A retrain that failed has no full WER: it is reported as not retrained.
    retrained = [r for r in retrained or [] if r.get("full_test_wer") is not None]
    sections = [
        headline_section(retrained, budget_bytes) if retrained else None,
        how_to_read_section(),
        front_section(trials, study, out_dir, budget_bytes, dtype),
        pareto_table_section(study),
        layer_map_section(study),
        hypervolume_section(trials, out_dir, budget_bytes, dtype),
        importance_section(trials, out_dir),
        fidelity_section(retrained or [], out_dir),
        summary_section(trials),
    ]
    sections = [s for s in sections if s is not None]
    title = f"Search report: study {study.study_name}"
    intro = _intro(study, budget_bytes, dtype)
    md_path = out_dir / "report.md"
    md_path.write_text(render_markdown(title, intro, sections))
    (out_dir / "report.html").write_text(render_html(title, intro, sections))
    return md_path


def _intro(study: optuna.Study, budget_bytes: int, dtype: str) -> str:
    s = study.user_attrs.get("settings", {})
    parts = [f"Budget **{budget_bytes:,} B at {dtype}**" + (f" (`{s['budget']}`)" if "budget" in s else "")]
    for key, words in (("space", "space"), ("data", "data"), ("proxy", "proxy schedule"), ("objectives", "objectives")):
        if key in s:
            value = ", ".join(s[key]) if isinstance(s[key], list) else s[key]
            parts.append(f"{words} `{value}`")
    return "; ".join(parts) + "."


# ---- sections -------------------------------------------------------------------------------

def headline_section(retrained: list[dict], budget_bytes: int) -> Section:
    """Full-retrain test WER of the best searched design against the two hand-made baselines."""
    sec = Section("Headline: the searched design against the baselines")
    searched = [r for r in retrained if not r.get("label") and r["bytes"] <= budget_bytes]
    best = min(searched, key=lambda r: r["full_dev_wer"]) if searched else None
    base = {label: next((r for r in retrained if r.get("label") == label), None) for label in BASELINES}
    rows = []
    for name, r in (("searched (best full dev WER)", best), ("unshared Conformer", base["unshared"]),
                    ("paper-style hand design", base["paper"])):
        if r is None:
            rows.append([name, "not retrained", "", "", "", "", "", ""])
            continue
        gain = "—" if r is best else _relative(best, r)
        rows.append([name, str(r["number"]), f"{r['physical_params']:,}", f"{r['bytes']:,}",
                     _pct(r["full_dev_wer"]), _pct(r["full_test_wer"]), _pct(r["full_test_cer"]), gain])
    sec.blocks.append(Table(["design", "trial", "params", "bytes", "dev WER", "test WER", "test CER",
                             "searched design's test WER vs this"], rows))
    sec.blocks.append(_verdict(best, base))
    sec.blocks.append("WERs after full retraining. The searched design is the retrained design the search found "
                      "(no label) with the lowest full dev WER within the budget, so the test set plays no part in "
                      "choosing it.")
    return sec


def _gain(best: dict, other: dict) -> float:
    """Relative test-WER improvement of ``best`` over ``other`` (negative: ``best`` is worse)."""
    if other["full_test_wer"] == 0:
        return 0.0 if best["full_test_wer"] == 0 else -math.inf
    return (other["full_test_wer"] - best["full_test_wer"]) / other["full_test_wer"]


def _relative(best: dict | None, other: dict) -> str:
    if best is None:
        return ""
    g = _gain(best, other)
    return "higher (baseline WER is 0)" if math.isinf(g) else f"{g:.1%} lower" if g >= 0 else f"{-g:.1%} higher"


def _verdict(best: dict | None, base: dict[str, dict | None]) -> str:
    if best is None:
        return "**No verdict: no searched design within the budget was retrained in full.**"
    missing = [label for label, r in base.items() if r is None]
    if missing:
        return f"**No verdict: the {' and '.join(missing)} baseline was not retrained in full.**"
    gains = {label: _gain(best, r) for label, r in base.items()}
    text = " and ".join(f"{_relative(best, r)} vs {label}" for label, r in base.items())
    if min([best["full_test_wer"]] + [r["full_test_wer"] for r in base.values()]) >= 1.0:
        return (f"**No verdict: every design's test WER is at least 100% ({text}); the retrain schedule "
                "was too short for any of them to learn to spell words, so these differences mean nothing.**")
    if all(g >= WIN_MARGIN for g in gains.values()):
        return (f"**Yes: the searched design (trial {best['number']}) beats both baselines by at least "
                f"{WIN_MARGIN:.0%} relative test WER ({text}).**")
    return (f"**No: the searched design (trial {best['number']}) does not beat both baselines by "
            f"{WIN_MARGIN:.0%} relative test WER ({text}).**")


def how_to_read_section() -> Section:
    return Section("How to read this report", [(
        "Each point is one design, trained briefly with the proxy schedule and scored by its WER on the dev "
        "set; the x axis is the exact memory of its stored parameters at the budget's dtype. The **front** "
        "holds the designs no other design beats on both WER and memory: these are the ones worth retraining "
        "in full. Designs over the budget were never trained; they appear only as marks above the plot. "
        "Proxy WERs rank designs; they are not what a fully trained model reaches (the proxy-fidelity "
        "section checks how well the ranking holds). In the layer maps, each letter is one stored block or "
        "module instance: equal letters in a row are shared weights."
    )])


def front_section(trials: list[FrozenTrial], study: optuna.Study, out_dir: Path, budget_bytes: int,
                  dtype: str) -> Section:
    """WER against bytes: the front highlighted as a step line, the rest faded, infeasible apart."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    on_front = {t.number for t in front(study)}
    infeasible = [t for t in trials if t.state == TrialState.PRUNED and is_infeasible(t)]
    failed = [t for t in trials if t.state == TrialState.FAIL and "invalid" not in t.user_attrs]

    def size(t: FrozenTrial) -> int:
        return t.user_attrs[f"bytes_{dtype}"]

    fig = Figure(figsize=(8, 5.6), dpi=DPI, layout="constrained")
    strip, ax = fig.subplots(2, 1, sharex=True, height_ratios=[1, 6])
    xs = [size(t) for t in complete + infeasible] + [budget_bytes]
    _bytes_axis(ax, min(xs), max(xs))
    for a in (strip, ax):
        a.axvline(budget_bytes, color=BUDGET_COLOR, linestyle="--", linewidth=1.2)
    # Left of the line, in the strip: only over-budget samples lie right of it, nothing lies left.
    strip.text(budget_bytes, 0.5, f"budget {_eng(budget_bytes)} ", color=BUDGET_COLOR, va="center", ha="right",
               fontsize=9, transform=strip.get_xaxis_transform())

    strip.scatter([size(t) for t in infeasible], [_jitter(t.number) for t in infeasible], marker="x", s=22,
                  color=INFEASIBLE_COLOR, alpha=0.7, linewidths=1)
    strip.set_ylim(-0.15, 1.15)
    strip.set_yticks([])
    strip.set_title(f"over budget, never trained: {len(infeasible)} samples", fontsize=9, loc="left")

    dominated = [t for t in complete if t.number not in on_front]
    ax.scatter([size(t) for t in dominated], [t.values[0] for t in dominated], color=FADED, alpha=0.45, s=24,
               label=f"dominated ({len(dominated)})")
    best = sorted((t for t in complete if t.number in on_front), key=size)
    if best:
        step = _front_2d([(size(t), t.values[0]) for t in best])
        ax.step([x for x, _ in step] + [budget_bytes], [y for _, y in step] + [step[-1][1]], where="post",
                color=FRONT_COLOR, linewidth=1.5, alpha=0.8)
        ax.scatter([size(t) for t in best], [t.values[0] for t in best], color=FRONT_COLOR, s=46, zorder=3,
                   label=f"on the front ({len(best)})")
    ax.set_xlabel(f"parameter memory at {dtype} (bytes)")
    ax.set_ylabel("proxy dev WER")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    for i, t in enumerate(_uncrowded(ax, best, size)):  # alternate sides: front neighbours are close
        ax.annotate(f"#{t.number}", (size(t), t.values[0]), textcoords="offset points",
                    xytext=(5, -11) if i % 2 == 0 else (-5, 5), ha="left" if i % 2 == 0 else "right",
                    fontsize=8, color=FRONT_COLOR)
    labelled = [t for t in complete if t.user_attrs.get("label")]
    if labelled:
        ax.scatter([size(t) for t in labelled], [t.values[0] for t in labelled], marker="D", s=70,
                   facecolors="none", edgecolors="black", linewidths=1.2, zorder=4, label="baseline / enqueued")
        for t in labelled:
            ax.annotate(t.user_attrs["label"], (size(t), t.values[0]), textcoords="offset points", xytext=(-6, 6),
                        ha="right", fontsize=9, fontweight="bold")  # left: baselines sit near the budget
    if not complete:
        ax.text(0.5, 0.5, "no design trained yet", transform=ax.transAxes, ha="center", color=FADED)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8, frameon=False)
    fig.suptitle("Proxy WER against memory" + (f" ({_n(len(failed), 'failed trial')} not plotted)" if failed else ""),
                 fontsize=11)
    path = _save(fig, out_dir / "front.png")

    caption = (f"{_n(len(complete), 'design')} trained: {len(best)} on the front (blue, joined as a step line), "
               f"{len(dominated)} dominated (grey). {_n(len(failed), 'failed trial')} not plotted. "
               f"{_n(len(infeasible), 'sample')} over the budget of {budget_bytes:,} B at {dtype}: never trained, "
               "shown as red crosses above the plot at their size. Diamonds mark the baselines and other labelled "
               "designs. Where front points crowd, some numbers are left out; the table below lists them all.")
    sec = Section("The front", [Image(path, "proxy WER against bytes, with the Pareto front"), caption])
    if labelled:
        sec.blocks.append(Table(["trial", "label", f"bytes {dtype}", "proxy WER", "standing"], [
            [str(t.number), t.user_attrs["label"], f"{size(t):,}", _pct(t.values[0]),
             "on the front" if t.number in on_front else "dominated"] for t in labelled]))
    return sec


def pareto_table_section(study: optuna.Study) -> Section:
    designs = front(study)
    if not designs:
        return Section("The Pareto designs", ["No design has been trained yet."])
    rows = []
    for t in designs:
        a, arch = t.user_attrs, ArchConfig.from_json(t.user_attrs["arch"])
        enc = arch.encoder
        dims = f"d={enc.d_model} ffn={enc.ffn_dim} h={enc.n_heads} k={enc.conv_kernel}"
        rows.append([str(t.number), a.get("label") or "", dims, f"{a['physical_params']:,}", f"{a['bytes_fp32']:,}",
                     f"{a['bytes_bf16']:,}", f"{a['bytes_int8']:,}", f"{a['macs_per_second'] / 1e6:.1f}",
                     _pct(t.values[0]), sharing_in_words(arch)])
    return Section("The Pareto designs", [
        (f"{_n(len(designs), 'design').capitalize()} on the front, smallest first. Bytes are the stored parameters "
         "at each dtype; MMACs/s are million multiply-accumulates per second of audio."),
        Table(["trial", "label", "dimensions", "params", "bytes fp32", "bytes bf16", "bytes int8", "MMACs/s",
               "proxy WER", "sharing"], rows),
    ])


def layer_map_section(study: optuna.Study) -> Section:
    designs = front(study)
    if not designs:
        return Section("Layer maps", ["No design has been trained yet."])
    width = max(len(_name(t)) for t in designs)
    lines = [f"{_name(t).ljust(width)}  {layer_map(ArchConfig.from_json(t.user_attrs['arch']))}" for t in designs]
    return Section("Layer maps", [
        ("Per virtual layer (left to right): the stored block it runs, then the feed-forward, self-attention and "
         "convolution module instance it uses. Equal letters are the same stored weights."),
        Code(lines),
    ])


def hypervolume_section(trials: list[FrozenTrial], out_dir: Path, budget_bytes: int, dtype: str) -> Section:
    ref = (REF_WER, float(budget_bytes))
    box = ref[0] * ref[1]
    curve = [h / box for h in hypervolume_curve(trials, ref)]
    trained = [t for t in trials if t.state == TrialState.COMPLETE]
    fig = Figure(figsize=(7, 3.6), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    if curve:
        ax.step(range(1, len(curve) + 1), curve, where="post", color=FRONT_COLOR, marker="o", markersize=3)
        ax.annotate(f"{curve[-1]:.1%}", (len(curve), curve[-1]), textcoords="offset points", xytext=(-4, 6),
                    ha="right", fontsize=9)
        ax.set_ylim(0, max(max(curve) * 1.15, 0.01))
    else:
        ax.text(0.5, 0.5, "no design trained yet", transform=ax.transAxes, ha="center", color=FADED)
    ax.set_xlabel("designs trained (complete trials, in trial order)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("hypervolume")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    ax.set_title(f"Hypervolume: share of the box WER ≤ {REF_WER:.0%}, bytes ≤ {_eng(budget_bytes)} at {dtype}",
                 fontsize=10)
    path = _save(fig, out_dir / "hypervolume.png")
    text = (f"The hypervolume is the area that the front dominates inside the box bounded by WER {REF_WER:.0%} and "
            f"the budget, as a share of that box. It grows when a new design joins the front; a long flat tail "
            f"means the last trials found nothing better.")
    if curve:
        text += f" After {_n(len(curve), 'design')}: {curve[-1]:.1%}."
    if trained and min(t.values[0] for t in trained) >= REF_WER:
        text += f" Every design so far has a WER of {REF_WER:.0%} or more, so the front dominates none of the box yet."
    return Section("Hypervolume against trials", [Image(path, "hypervolume after each trained design"), text])


def importance_section(trials: list[FrozenTrial], out_dir: Path) -> Section:
    """How much each design decision explains the proxy WER, over the trained designs."""
    sec = Section("Importance of each design decision")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        sec.blocks.append(f"Not enough trials ({len(complete)}) to estimate importance: at least "
                          f"{MIN_TRIALS_FOR_IMPORTANCE} trained designs are needed.")
        return sec
    if len({t.values[0] for t in complete}) == 1:
        sec.blocks.append(f"Every one of the {len(complete)} trained designs has the same proxy WER "
                          f"({_pct(complete[0].values[0])}), so no decision explains a difference: importance "
                          "is not estimated. A longer proxy schedule would separate the designs.")
        return sec
    importances, evaluator, notes = param_importances(complete)
    if not importances:
        sec.blocks.append("Importance could not be estimated: " + "; ".join(notes) + ".")
        return sec
    names = list(importances)
    fig = Figure(figsize=(7, 0.6 + 0.32 * len(names)), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.barh(names[::-1], [importances[n] for n in names[::-1]], color=FRONT_COLOR)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel(f"share of importance for the proxy WER ({evaluator})")
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    path = _save(fig, out_dir / "importance.png")
    sec.blocks += [
        f"Estimated with Optuna's {evaluator} over the {len(complete)} trained designs, for the proxy WER. "
        "The decisions are read from each design's ArchConfig (not the space's knobs), so baselines count "
        "and a decision is defined for every design: a full-rank family has rank 0, an unshared level "
        "has as many stored blocks or modules as layers. Decisions that never varied are left out; decisions that "
        "moved together (a family's input and output rank, say) share the credit, and importance is not "
        "causation."
        + (" " + " ".join(notes) if notes else ""),
        Image(path, "importance of each design decision"),
        Table(["decision", "importance"], [[n, f"{v:.1%}"] for n, v in importances.items()]),
    ]
    return sec


def fidelity_section(retrained: list[dict], out_dir: Path) -> Section:
    """Does the proxy rank designs as full training does? Kendall τ and Spearman ρ."""
    from scipy.stats import kendalltau, spearmanr

    sec = Section("Proxy fidelity")
    if len(retrained) < MIN_ROWS_FOR_FIDELITY:
        why = "no design has been retrained in full" if not retrained else \
            f"only {len(retrained)} design{'s were' if len(retrained) > 1 else ' was'} retrained in full"
        sec.blocks.append(f"Not measured: {why}; rank correlations need at least {MIN_ROWS_FOR_FIDELITY}.")
        return sec
    proxy = [r["proxy_wer"] for r in retrained]
    full = [r["full_dev_wer"] for r in retrained]
    with warnings.catch_warnings():  # constant input: scipy warns and returns nan, which we explain
        warnings.simplefilter("ignore")
        tau, tau_p = kendalltau(proxy, full)
        rho, rho_p = spearmanr(proxy, full)
    fig = Figure(figsize=(6, 4.4), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.scatter(proxy, full, color=FRONT_COLOR, s=36)
    for r in retrained:
        ax.annotate(r.get("label") or f"#{r['number']}", (r["proxy_wer"], r["full_dev_wer"]),
                    textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.margins(0.15)
    ax.set_xlabel("proxy dev WER (search)")
    ax.set_ylabel("dev WER after full retraining")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    ax.set_title(f"Kendall τ = {_corr(tau)}, Spearman ρ = {_corr(rho)} ({len(retrained)} designs)", fontsize=10)
    path = _save(fig, out_dir / "fidelity.png")
    sec.blocks += [
        Table(["statistic", "value", "p-value"], [["Kendall τ", _corr(tau), _corr(tau_p)],
                                                  ["Spearman ρ", _corr(rho), _corr(rho_p)]]),
        f"Over the {len(retrained)} retrained designs, between the proxy WER the search ranked them by and the dev "
        "WER after full retraining. Close to 1: the proxy orders designs as full training does; near 0 or "
        "negative: the proxy's ranking says little." + (" A value is undefined (n/a) when one side does not vary."
                                                       if math.isnan(tau) or math.isnan(rho) else ""),
        Image(path, "proxy WER against full dev WER"),
    ]
    return sec


def summary_section(trials: list[FrozenTrial]) -> Section:
    retried = {optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in trials} - {None}
    groups: dict[str, list[FrozenTrial]] = {}
    for t in trials:
        groups.setdefault(_summary_state(t, retried), []).append(t)
    sampled = sum(len(v) for k, v in groups.items() if k != "waiting")
    n_inf = len(groups.get("infeasible", []))
    what = {
        "complete": "trained and scored",
        "failed": "trained, but the run failed (reasons below)",
        "infeasible": "sampled over the budget, never trained",
        "invalid": "sampled combination that ArchConfig refuses, never trained",
        "pruned": "stopped early",
        "retried": "interrupted (driver died) and run again as a new trial",
        "running": "still running",
        "waiting": "queued",
    }
    if not trials:
        return Section("Search summary", ["The study has no trials yet."])
    rows = [[state, str(len(groups[state])), what[state]] for state in what if groups.get(state)]
    sec = Section("Search summary", [Table(["state", "trials", "meaning"], rows)])
    if sampled:
        sec.blocks.append(f"{n_inf} of {sampled} samples ({n_inf / sampled:.0%}) were over the budget.")
    reasons = Counter(t.user_attrs.get("fail_reason", "no reason recorded") for t in groups.get("failed", []))
    if reasons:
        sec.blocks.append(Table(["failure reason", "trials"], [
            [r, ", ".join(str(t.number) for t in groups["failed"] if t.user_attrs.get("fail_reason",
                                                                                    "no reason recorded") == r)]
            for r, _ in reasons.most_common()]))
    sec.blocks.append(_time_line(trials))
    return sec


def _summary_state(t: FrozenTrial, retried: set[int]) -> str:
    if t.state == TrialState.PRUNED:
        return "infeasible" if is_infeasible(t) else "pruned"
    if t.state == TrialState.FAIL:
        return "invalid" if "invalid" in t.user_attrs else "retried" if t.number in retried else "failed"
    return t.state.name.lower()


def _time_line(trials: list[FrozenTrial]) -> str:
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    if not starts or not ends:
        return "No trial has finished yet."
    trained = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL) and t.duration
               and "invalid" not in t.user_attrs]
    busy = sum((t.duration.total_seconds() for t in trained), 0.0)
    train_s = sum(t.user_attrs.get("train_seconds") or 0.0 for t in trained)
    text = (f"Total time: {_duration((max(ends) - min(starts)).total_seconds())} from the first trial's start to the "
            f"last one's end; the trained trials ran {_duration(busy)} in all (summed over parallel workers)")
    return text + (f", of which {_duration(train_s)} training." if train_s else ".")


# ---- importance -----------------------------------------------------------------------------

def decisions(arch: ArchConfig) -> dict[str, int | str]:
    """The design decisions of ``arch``, each defined for every design (so none is conditional)."""
    enc, sh = arch.encoder, arch.sharing
    blocks = arch.block_map()
    n_blocks = len(set(blocks))
    out: dict[str, int | str] = {
        "encoder.d_model": enc.d_model, "encoder.ffn_dim": enc.ffn_dim, "encoder.n_heads": enc.n_heads,
        "encoder.conv_kernel": enc.conv_kernel, "virtual layers": enc.n_layers, "stored blocks": n_blocks,
        "block pattern": "none" if n_blocks == len(blocks) else
        sh.blocks.pattern if isinstance(sh.blocks, Tiling) else "explicit",
    }
    for kind in KINDS:
        out[f"{kind} modules"] = arch.n_instances(kind)
    for name, tied in sh.ties:
        out[f"ties.{name}"] = "yes" if tied else "no"
    for fam in FAMILIES:
        lr = getattr(sh.low_rank, fam)
        out[f"low_rank.{fam}.rank"] = lr.rank or 0
        out[f"low_rank.{fam}.share"] = lr.share
        out[f"low_rank.{fam}.groups"] = lr.groups
    out["per_layer_cheap"] = "yes" if sh.per_layer_cheap else "no"
    return out


def param_importances(complete: list[FrozenTrial]) -> tuple[dict[str, float], str, list[str]]:
    """Importance of each varying decision for WER: fANOVA, else PED-ANOVA (no scikit-learn needed).

    Returns the importances (largest first), the evaluator's name and notes on evaluators that
    could not run.
    """
    from optuna.distributions import CategoricalDistribution, IntDistribution
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    rows = [decisions(ArchConfig.from_json(t.user_attrs["arch"])) for t in complete]
    dists = {}
    for name in rows[0]:
        values = sorted({r[name] for r in rows})
        if len(values) < 2:
            continue
        dists[name] = (IntDistribution(values[0], values[-1]) if isinstance(values[0], int)
                       else CategoricalDistribution(values))
    if not dists:
        return {}, "", ["no design decision varied between the trained designs"]
    view = optuna.create_study(directions=["minimize", "minimize"])  # in memory: the decisions as params
    view.add_trials([optuna.trial.create_trial(params={n: r[n] for n in dists}, distributions=dists,
                                               values=[t.values[0], t.values[1]])
                     for r, t in zip(rows, complete)])
    quantile = min(0.5, max(0.1, 3 / len(complete)))  # keep a few designs in PED-ANOVA's top group
    notes = []
    for name, evaluator in (("fANOVA", lambda: FanovaImportanceEvaluator(seed=0)),
                            ("PED-ANOVA", lambda: PedAnovaImportanceEvaluator(target_quantile=quantile))):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = optuna.importance.get_param_importances(view, evaluator=evaluator(),
                                                                 target=lambda t: t.values[0])
            return dict(result), name, notes
        except Exception as exc:  # noqa: BLE001 - e.g. fANOVA without scikit-learn; try the next one
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "sklearn" in reason:
                reason = "it needs scikit-learn, which is not installed"
            notes.append(f"{name} could not run ({_short(reason)}).")
    return {}, "", notes


# ---- rendering ------------------------------------------------------------------------------

def render_markdown(title: str, intro: str, sections: list[Section]) -> str:
    out = [f"# {title}", "", intro, ""]
    for sec in sections:
        out += [f"## {sec.title}", ""]
        for b in sec.blocks:
            if isinstance(b, str):
                out.append(b)
            elif isinstance(b, Table):
                out += [_md_row(b.header), _md_row(["---"] * len(b.header)), *map(_md_row, b.rows)]
            elif isinstance(b, Image):
                out.append(f"![{b.alt}]({b.path.name})")
            elif isinstance(b, Code):
                out += ["```", *b.lines, "```"]
            out.append("")
    return "\n".join(out)


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def render_html(title: str, intro: str, sections: list[Section]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{_inline(intro)}</p>"]
    for sec in sections:
        body.append(f"<h2>{html.escape(sec.title)}</h2>")
        for b in sec.blocks:
            if isinstance(b, str):
                body.append(f"<p>{_inline(b)}</p>")
            elif isinstance(b, Table):
                head = "".join(f"<th>{html.escape(c)}</th>" for c in b.header)
                rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in b.rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif isinstance(b, Image):
                data = base64.b64encode(b.path.read_bytes()).decode("ascii")
                body.append(f'<img src="data:image/png;base64,{data}" alt="{html.escape(b.alt)}">')
            elif isinstance(b, Code):
                body.append(f"<pre>{html.escape(chr(10).join(b.lines))}</pre>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f3; }}
pre {{ background: #f6f6f6; padding: 0.6rem; overflow-x: auto; }}
img {{ max-width: 100%; }}
code {{ background: #f3f3f3; padding: 0 0.2rem; }}
</style></head>
<body>
{chr(10).join(body)}
</body></html>
"""


def _inline(text: str) -> str:
    """The two inline marks we write, ``**bold**`` and ```code```, as HTML."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


# ---- small helpers --------------------------------------------------------------------------

def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


def _bytes_axis(ax, lo: float, hi: float) -> None:
    """Bytes in engineering units (kB, MB); logarithmic when sizes span more than a factor of 4."""
    if hi > 4 * lo > 0:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(EngFormatter(unit="B", places=0))
    pad = (hi / lo) ** 0.06 if ax.get_xscale() == "log" else None
    if pad:
        ax.set_xlim(lo / pad, hi * pad)


def _uncrowded(ax, trials: list[FrozenTrial], size, min_px: float = 16.0) -> list[FrozenTrial]:
    """The trials whose points lie at least ``min_px`` pixels from every one kept before them."""
    kept, spots = [], []
    for t in trials:
        x, y = ax.transData.transform((size(t), t.values[0]))
        if all((x - a) ** 2 + (y - b) ** 2 >= min_px ** 2 for a, b in spots):
            kept.append(t)
            spots.append((x, y))
    return kept


def _front_2d(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The non-dominated (bytes, WER) points, by bytes: a 3-objective front has dominated ones in 2-D."""
    out: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not out or y < out[-1][1]:
            out.append((x, y))
    return out


def _jitter(number: int) -> float:
    return (number * 0.6180339887) % 1.0


def _name(t: FrozenTrial) -> str:
    label = t.user_attrs.get("label")
    return f"#{t.number}" + (f" ({label})" if label else "")


def _pct(x: float) -> str:
    return f"{x:.1%}"


def _n(count: int, noun: str) -> str:
    """``1 design``, ``3 designs``, ``no design``... for captions."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _corr(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def _eng(n: float) -> str:
    return EngFormatter(unit="B", places=0)(n)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"


def _short(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


__all__ = ["decisions", "param_importances", "write_report"]
