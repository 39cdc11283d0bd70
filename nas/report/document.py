"""The report as one Markdown document, written from the analysis data.

Each section is a function from analysis data (and the name of its PNG, if it has one) to
Markdown text; :func:`document` joins them under a title. :mod:`nas.report.page` turns the same
text into HTML. Text that comes from outside (failure reasons, labels, settings) goes through
:func:`_escape` or :func:`_code`, so it is shown as written and never read as markup.

Proxy values are written in the study's first objective (:class:`~nas.report.analysis.Signal`):
error rates as percentages, other signals as plain numbers. Full-retrain numbers are WERs.
"""

from __future__ import annotations

import math
from pathlib import Path

from nas.describe import layer_map, sharing_in_words
from nas.markdown import code as _code, escape as _escape, table as _table  # shared with the model card
from nas.report.analysis import (MIN_ROWS_FOR_FIDELITY, Fidelity, FrontView,
                                 Hypervolume, Signal, Summary)
from nas.report.importance import MIN_TRIALS_FOR_IMPORTANCE, Importance
from nas.report.sharing import LEVELS, FrontSharing
from nas.report.verdict import GOAL_RATIO, NOISE_SIGMAS, Entry, Headline, Shortfall, shortfall
from nas.trials import STATES


def document(title: str, intro: str, sections: list[str]) -> str:
    return "\n\n".join([f"# {_escape(title)}", intro, *sections]) + "\n"


def intro(settings: dict, budget_bytes: int, dtype: str) -> str:
    parts = [f"Budget **{budget_bytes:,} B at {dtype}**" + (f" ({_code(settings['budget'])})" if "budget" in settings
                                                             else "")]
    for key, words in (("space", "space"), ("data", "data"), ("proxy", "proxy schedule"), ("objectives", "objectives")):
        if key in settings:
            value = settings[key]
            parts.append(f"{words} {_code(', '.join(value) if isinstance(value, list) else value)}")
    return "; ".join(parts) + "."


# ---- sections -----------------------------------------------------------------------------

HEADLINE = "Headline: the searched design against the baselines"


def headline_section(h: Headline) -> str:
    """Full-retrain test WER of the best searched design against the two hand-made baselines, as
    mean ± standard deviation over seeds, and the verdict of :mod:`nas.report.verdict`."""
    rows = []
    for name, e in (("searched (best mean full dev WER)", h.best), ("unshared Conformer", h.baselines["unshared"]),
                    ("paper-style hand design", h.baselines["paper"])):
        if e is None:
            rows.append([name, "not retrained", "", "", "", "", "", "", ""])
            continue
        c = h.comparisons.get(e.name)
        vs = "—" if e is h.best else f"{_relative(1 - c.ratio)}, {c.outcome}" if c else ""
        first = e.rows[0]
        rows.append([name, str(e.number), f"{first['physical_params']:,}", f"{first['bytes']:,}",
                     ", ".join(map(str, e.seeds)), _pct(e.mean("full_dev_wer")), _mean_std(e, "full_test_wer"),
                     _pct(e.mean("full_test_cer")), vs])
    decoding = next((e.rows[0].get("decoding") for e in (h.best, *h.baselines.values()) if e), None)
    return _section(HEADLINE, _table(["design", "trial", "params", "bytes", "seeds", "dev WER", "test WER",
                                      "test CER", "searched design against this"], rows),
                    f"**{_verdict(h)}**", _shortfall(shortfall(h)),
                    "WERs after full retraining" + (f", decoded with {decoding}" if decoding else "") + "; test WER "
                    "as mean ± standard deviation over seeds. The searched design is the retrained design the "
                    "search found (no label) with the lowest mean full dev WER within the budget, so the test set "
                    f"plays no part in choosing it. It **beats** a baseline when its mean test WER is lower by more "
                    f"than {NOISE_SIGMAS:g} times the larger standard deviation of the two; a difference smaller "
                    "than that is **within noise**.")


def _shortfall(s: Shortfall | None) -> str | None:
    if s is None:
        return None
    share = s.budget_share
    text = (f"Why the goal is missed, as far as these numbers tell: the unshared baseline fits in {share['unshared']:.0%} "
            f"of the budget's bytes (the paper-style design in {share['paper']:.0%}), so at this budget a design needs "
            "no sharing to fit, and sharing can only save bytes.")
    if s.behind_on_the_proxy is None:
        return text
    label, value = min(s.proxy_baselines.items(), key=lambda kv: kv[1])
    signal = Signal(s.proxy_signal or "value")
    values = f"{_value(signal, s.proxy_searched)} against {label}'s {_value(signal, value)}"
    if s.behind_on_the_proxy:
        return text + (f" The search's proxy {signal.title} already put the searched design behind ({values}): "
                       "the search found no design that its proxy ranked ahead of the hand designs, so the lever is "
                       "the space or the number of trials rather than the proxy.")
    return text + (f" The search's proxy {signal.title} put the searched design ahead ({values}) and full training "
                   "did not: the proxy misranked it.")


def _mean_std(e: Entry, key: str) -> str:
    std = e.std(key)
    return _pct(e.mean(key)) + ("" if std is None else f" ± {std * 100:.1f}")


def _verdict(h: Headline) -> str:
    if h.verdict == "no searched design":
        return "No verdict: no searched design within the budget was retrained in full."
    if h.verdict == "baseline missing":
        return f"No verdict: the {' and '.join(h.missing)} baseline was not retrained in full."
    text = "; ".join(f"{_pct(h.best.mean('full_test_wer'))} against {label}'s "
                     f"{_pct(h.baselines[label].mean('full_test_wer'))} ({c.outcome})"
                     for label, c in h.comparisons.items())
    goal = (f" Its mean is {h.goal_ratio:.2f}x the better baseline's (goal: at most {GOAL_RATIO:.2f}x, "
            f"{'met' if h.goal_ratio <= GOAL_RATIO else 'not met'}).") if h.goal_ratio is not None else ""
    trial = f"the searched design (trial {h.best.number})"
    if h.verdict == "nothing learned":
        return (f"No verdict: every design's test WER is at least 100% ({text}); the retrain schedule was too "
                "short for any of them to learn to spell words, so these differences mean nothing.")
    if h.verdict == "no noise estimate":
        return (f"No verdict yet: {trial} and the baselines were retrained with one seed only, so there is no "
                f"noise estimate ({text}). Retrain with --seeds 3." + goal)
    if h.verdict == "yes":
        return f"Yes: {trial} beats both baselines beyond seed noise: {text}." + goal
    if h.verdict == "no":
        return f"No: {trial} is worse than a baseline beyond seed noise: {text}." + goal
    return f"Within noise: {trial} does not beat both baselines beyond seed noise: {text}." + goal


def how_to_read_section(s: Signal) -> str:
    return _section("How to read this report", (
        f"Each point is one design, trained briefly with the proxy schedule and scored by its {s.title} on the dev "
        "set; the x axis is the exact memory of its stored parameters at the budget's dtype. The **front** "
        f"holds the designs no other design beats on both {s.title} and memory: these are the ones worth retraining "
        "in full. Designs over the budget were never trained; they appear only as marks above the plot. "
        f"Proxy {s.title} values rank designs; they are not what a fully trained model reaches (the proxy-fidelity "
        "section checks how well the ranking holds). In the layer maps, each letter is one stored block or "
        "module instance: equal letters in a row are shared weights."))


def front_section(v: FrontView, png: str) -> str:
    n_done = len(v.complete)
    caption = (f"{_n(n_done, 'design')} trained: {len(v.on_front)} on the front (blue, joined as a step line), "
               f"{len(v.dominated)} dominated (grey). {_n(len(v.failed), 'failed trial')} not plotted. "
               f"{_n(len(v.infeasible), 'sample')} over the budget of {v.budget_bytes:,} B at {v.dtype}: never "
               "trained, shown as red crosses above the plot at their size. Diamonds mark the baselines and other "
               "labelled designs. Where front points crowd, some numbers are left out; the table below lists them all.")
    blocks = [_image(png, f"proxy {v.signal.title} against bytes, with the Pareto front"), caption]
    if v.labelled:
        on = {r.number for r in v.on_front}
        blocks.append(_table(["trial", "label", f"bytes {v.dtype}", f"proxy {v.signal.title}", "standing"], [
            [str(r.number), _escape(r.label), f"{v.size(r):,}", _value(v.signal, v.value(r)),
             "on the front" if r.number in on else "dominated"] for r in v.labelled]))
    return _section("The front", *blocks)


def sharing_section(f: FrontSharing, signal: Signal) -> str:
    """Which sharing levels the front uses, and each front design against the unshared baseline."""
    if not f.designs:
        return _section("What the front shares", "No design has been trained yet.")
    n = len(f.designs)
    uses = ", ".join(f"{f.using(level)} of {n} {LEVEL_WORDS[level]}" for level in LEVELS)
    text = [f"Of the {_n(n, 'design')} on the front, {uses}."]
    if f.baseline is not None:
        best = f.best_within_baseline_bytes
        base = (f"the unshared baseline (trial {f.baseline.number}, "
                f"{_value(signal, f.baseline_value)} proxy {signal.title})")
        if best is None:
            text.append(f"No front design is as small as {base}.")
        else:
            better = "better than" if best.value_difference < 0 else "no better than"
            text.append(f"With no more bytes than {base}, the best front design is trial {best.record.number} "
                        f"({', '.join(best.levels) or 'nothing shared'}; {best.bytes_ratio:.0%} of its bytes, "
                        f"{best.virtual_layers} virtual layers on {best.stored_blocks} stored blocks) at "
                        f"{_value(signal, best.value)}: {better} the design that shares nothing. Proxy values rank "
                        "designs; the headline says whether the difference holds after full training.")
    rows = [[str(d.record.number), ", ".join(d.levels) or "none", f"{d.virtual_layers} / {d.stored_blocks}",
             f"{d.bytes:,}", "" if d.bytes_ratio is None else f"{d.bytes_ratio:.0%}", _value(signal, d.value),
             "" if d.value_difference is None else
             (f"{d.value_difference:+.1%}" if signal.is_rate else f"{d.value_difference:+.4g}")]
            for d in f.designs]
    return _section("What the front shares", " ".join(text), _table(
        ["trial", "sharing levels", "virtual layers / stored blocks", "bytes", "bytes vs unshared",
         f"proxy {signal.title}", "vs unshared"], rows))


LEVEL_WORDS = {"blocks": "repeat stored blocks", "modules": "share modules among blocks",
               "ties": "tie sub-components", "low rank": "factor matrices at low rank"}


def pareto_table_section(v: FrontView) -> str:
    if not v.on_front:
        return _section("The Pareto designs", "No design has been trained yet.")
    rows = []
    for r in v.on_front:
        enc, b = r.arch.encoder, r.bytes_by_dtype
        rows.append([str(r.number), _escape(r.label or ""), f"d={enc.d_model} ffn={enc.ffn_dim} h={enc.n_heads} "
                     f"k={enc.conv_kernel}", f"{r.physical_params:,}", f"{b['fp32']:,}", f"{b['bf16']:,}",
                     f"{b['int8']:,}", f"{r.macs_per_second / 1e6:.1f}", _value(v.signal, v.value(r)),
                     sharing_in_words(r.arch)])
    return _section("The Pareto designs", (
        f"{_n(len(v.on_front), 'design').capitalize()} on the front, smallest first. Bytes are the stored parameters "
        "at each dtype; MMACs/s are million multiply-accumulates per second of audio."),
        _table(["trial", "label", "dimensions", "params", "bytes fp32", "bytes bf16", "bytes int8", "MMACs/s",
                f"proxy {v.signal.title}", "sharing"], rows))


def layer_map_section(v: FrontView) -> str:
    if not v.on_front:
        return _section("Layer maps", "No design has been trained yet.")
    width = max(len(r.name) for r in v.on_front)
    lines = [f"{r.name.ljust(width)}  {layer_map(r.arch)}" for r in v.on_front]
    return _section("Layer maps", (
        "Per virtual layer (left to right): the stored block it runs, then the feed-forward, self-attention and "
        "convolution module instance it uses. Equal letters are the same stored weights."),
        "\n".join(["```", *lines, "```"]))


def hypervolume_section(h: Hypervolume, png: str) -> str:
    s, bound = h.signal, _value(h.signal, h.ref[0])
    text = (f"The hypervolume is the area that the front dominates inside the box bounded by {s.title} {bound} and "
            f"the budget ({h.ref[1]:,.0f} B at {h.dtype}), as a share of that box: the reference point is "
            f"({s.title} {bound}, {h.ref[1]:,.0f} B). It grows when a new design joins the front; a long flat "
            "tail means the last trials found nothing better.")
    if h.curve:
        text += f" After {_n(len(h.curve), 'design')}: {h.curve[-1]:.1%}."
    if h.box_empty:
        text += f" Every design so far has a {s.title} of {bound} or more, so the front dominates none of the box yet."
    return _section("Hypervolume against trials", _image(png, "hypervolume after each trained design"), text)


def importance_section(imp: Importance, png: str | None) -> str:
    """How much each design decision explains the proxy signal, over the trained designs."""
    title, s = "Importance of each design decision", imp.signal.title
    if imp.too_few:
        return _section(title, f"Not enough trials ({imp.n}) to estimate importance: at least "
                               f"{MIN_TRIALS_FOR_IMPORTANCE} trained designs are needed.")
    if imp.same_value is not None:
        return _section(title, f"Every one of the {imp.n} trained designs has the same proxy {s} "
                               f"({_value(imp.signal, imp.same_value)}), so no decision explains a difference: "
                               "importance is not estimated. A longer proxy schedule would separate the designs.")
    if not imp.importances:
        return _section(title, "Importance could not be estimated: " + _escape("; ".join(imp.notes)) + ".")
    return _section(title, (
        f"Estimated with Optuna's {imp.evaluator} over the {imp.n} trained designs, for the proxy {s}. "
        "The decisions are read from each design's ArchConfig (not the space's knobs), so baselines count "
        "and a decision is defined for every design: a full-rank family has rank 0, an unshared level "
        "has as many stored blocks or modules as layers. Decisions that never varied are left out; decisions that "
        "moved together (a family's input and output rank, say) share the credit, and importance is not "
        "causation." + ("".join(" " + _escape(n) for n in imp.notes))),
        _image(png, "importance of each design decision"),
        _table(["decision", "importance"], [[n, f"{v:.1%}"] for n, v in imp.importances.items()]))


def fidelity_section(f: Fidelity, signal: Signal, png: str | None) -> str:
    """Does the proxy rank designs as full training does? Kendall τ and Spearman ρ."""
    n = len(f.rows)
    if not f.measured:
        why = "no design with a final proxy value has been retrained in full" if not n else \
            f"only {n} design{'s' if n > 1 else ''} with a final proxy value {'were' if n > 1 else 'was'} retrained in full"
        return _section("Proxy fidelity", f"Not measured: {why}; rank correlations need at least "
                                          f"{MIN_ROWS_FOR_FIDELITY}.")
    undefined = math.isnan(f.tau) or math.isnan(f.rho)
    return _section("Proxy fidelity",
                    _table(["statistic", "value", "p-value"], [["Kendall τ", _corr(f.tau), _corr(f.tau_p)],
                                                               ["Spearman ρ", _corr(f.rho), _corr(f.rho_p)]]),
                    f"Over the {n} retrained designs, between the proxy {signal.title} the search ranked them by and "
                    "the dev WER after full retraining. Close to 1: the proxy orders designs as full training does; "
                    "near 0 or negative: the proxy's ranking says little."
                    + (" A value is undefined (n/a) when one side does not vary." if undefined else ""),
                    _image(png, f"proxy {signal.title} against full dev WER"))


def summary_section(s: Summary) -> str:
    t = s.tally
    if not t.counts:
        return _section("Search summary", "The study has no trials yet.")
    blocks = [_table(["state", "trials", "meaning"], [[state, str(t[state]), meaning]
                                                      for state, meaning in STATES.items() if t[state]])]
    if t.samples:
        blocks.append(f"{t['infeasible']} of {t.samples} samples ({t.infeasible_share:.1%}) were over the budget.")
    if s.failures:
        blocks.append(_table(["failure reason", "trials"],
                             [[_escape(reason), ", ".join(map(str, numbers))] for reason, numbers in s.failures]))
    if s.span_s is None:
        blocks.append("No trial has finished yet.")
    else:
        blocks.append(f"Total time: {_duration(s.span_s)} from the first trial's start to the last one's end; the "
                      f"trained trials ran {_duration(s.busy_s)} in all (summed over parallel workers)"
                      + (f", of which {_duration(s.train_s)} training." if s.train_s else "."))
    return _section("Search summary", *blocks)


# ---- Markdown -----------------------------------------------------------------------------

def _section(title: str, *blocks: str) -> str:
    return "\n\n".join([f"## {title}", *(b for b in blocks if b is not None)])


def _image(png: str | Path, alt: str) -> str:
    return f"![{alt}]({Path(png).name})"


def _value(s: Signal, x: float) -> str:
    return _pct(x) if s.is_rate else f"{x:.4g}"


def _relative(g: float) -> str:
    return "higher (baseline WER is 0)" if math.isinf(g) else f"{g:.1%} lower" if g >= 0 else f"{-g:.1%} higher"


def _pct(x: float) -> str:
    return f"{x:.1%}"


def _n(count: int, noun: str) -> str:
    """``1 design``, ``3 designs``... for captions."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _corr(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"
