"""Test WER by recording condition: the groups of each condition field (SNR band, accent, noise
colour, reverberation, telephone band) and a WER per group.

The conditions come from the test manifest's optional condition fields
(:data:`nas.data.manifest.CONDITIONS`): a table gets a column per group of each field present.
The embedded corpus records them; for a synth corpus made before its manifests did, they are drawn
again from its parameters (:func:`nas.data.synth.conditions`). The export measures its model with
:func:`robustness_table` (:mod:`nas.measure`) and the model card shows it (:func:`markdown_tables`);
the report does the same for every retrained design (:mod:`nas.report.robustness`).
"""

from __future__ import annotations

from pathlib import Path

from nas.data.manifest import CONDITIONS, read_manifest
from nas.markdown import table as markdown_table

SNR_BANDS = ((5.0, 10.0), (10.0, 20.0), (20.0, 30.0))  # dB, lower bound included; 30 dB falls in the last
TITLES = {"snr_db": "SNR", "accent": "accent", "noise": "noise colour", "reverb": "reverberation",
          "telephone": "telephone band"}
BOOLEANS = {"reverb": ("dry", "reverberant"), "telephone": ("full band", "telephone band")}


def group_of(key: str, value) -> str:
    """The group a condition value falls in: an SNR band, with or without, or the value itself."""
    if key == "snr_db":
        lo, hi = SNR_BANDS[0][0], SNR_BANDS[-1][1]
        if value < lo:
            return f"under {lo:g} dB"
        if value > hi:
            return f"over {hi:g} dB"
        return next(f"{a:g}–{b:g} dB" for a, b in SNR_BANDS if value < b or b == hi)
    if key in BOOLEANS:
        return BOOLEANS[key][bool(value)]
    return str(value)


def _group_order(key: str, groups: set[str]) -> list[str]:
    if key == "snr_db":
        bands = [f"under {SNR_BANDS[0][0]:g} dB", *(f"{a:g}–{b:g} dB" for a, b in SNR_BANDS),
                 f"over {SNR_BANDS[-1][1]:g} dB"]
        return [b for b in bands if b in groups]
    if key in BOOLEANS:
        return [g for g in BOOLEANS[key] if g in groups]
    return sorted(groups)


def robustness_table(refs: dict[str, str], hyps: dict[str, str], conditions: dict[str, dict]) -> dict:
    """WER per group of each condition field present, over the utterances of ``hyps``.

    Args:
        refs, hyps: normalized reference and hypothesis per utterance id.
        conditions: per utterance id, its condition fields (a row's :meth:`Utterance.conditions`).

    Returns ``{field: {group: {"wer": ..., "utterances": n}}}``, groups in a fixed order (SNR
    bands ascending, without before with), and ``"all"``: the WER over every utterance.
    """
    import jiwer

    ids = [i for i in hyps if i in refs]
    table: dict = {"all": {"wer": jiwer.wer([refs[i] for i in ids], [hyps[i] for i in ids]) if ids else None,
                           "utterances": len(ids)}}
    for key in CONDITIONS:
        members: dict[str, list[str]] = {}
        for i in ids:
            value = conditions.get(i, {}).get(key)
            if value is not None:
                members.setdefault(group_of(key, value), []).append(i)
        if members:
            table[key] = {g: {"wer": jiwer.wer([refs[i] for i in members[g]], [hyps[i] for i in members[g]]),
                              "utterances": len(members[g])} for g in _group_order(key, set(members))}
    return table


def conditions_of(manifest: Path) -> tuple[dict[str, dict], str]:
    """Each utterance's conditions, by id, and where they come from."""
    rows = read_manifest(manifest)
    found = {r.id: r.conditions() for r in rows}
    if any(found.values()):
        return found, "the test manifest"
    from nas.data import synth

    drawn = synth.conditions(Path(manifest).parent)
    if drawn and all(r.id in drawn and drawn[r.id]["text"] == r.text for r in rows):
        return ({r.id: {k: v for k, v in drawn[r.id].items() if k != "text"} for r in rows},
                "the synth corpus's parameters (its manifests predate condition fields)")
    return found, "the test manifest"


def markdown_tables(table: dict) -> str:
    """One design's :func:`robustness_table` as Markdown: a table per condition field (for a model card)."""
    out = []
    for key in CONDITIONS:
        if key in table:
            out.append(markdown_table([TITLES[key], "utterances", "WER"],
                                      [[g, str(c["utterances"]), percent(c["wer"])] for g, c in table[key].items()]))
    return "\n\n".join(out)


def percent(x) -> str:
    """A WER cell: a percentage, or a dash where there is none."""
    return "—" if x is None else f"{x:.1%}"
