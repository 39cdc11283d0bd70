"""Write the report: analyse the study, draw the figures, write the Markdown once, render it as HTML."""

from __future__ import annotations

import json
from pathlib import Path

import optuna

from nas.files import atomic_write
from nas.report import analysis, document, plots
from nas.report.importance import importance
from nas.report.page import to_html
from nas.report.robustness import robustness, robustness_section
from nas.report.sharing import front_sharing
from nas.report.verdict import headline, headline_json
from nas.trials import objectives_of, records

PNGS = ("front.png", "hypervolume.png", "importance.png", "fidelity.png")


def write_report(study: optuna.Study, out_dir: Path, budget_bytes: int, dtype: str,
                 retrained: list[dict] | None = None) -> Path:
    """Write ``report.md``, ``report.html`` and the PNGs into ``out_dir``; return the Markdown path.

    ``budget_bytes`` at ``dtype`` is the search's budget. ``retrained`` rows (one per fully
    retrained design: ``number``, ``label``, ``proxy_signal`` and ``proxy_value`` (the search's proxy signal and its value),
    ``full_dev_wer``, ``full_test_wer``, ``full_test_cer``, ``bytes``, ``physical_params``, ``arch``)
    add the headline comparison and the proxy-fidelity check.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in PNGS:  # a figure a section no longer draws must not linger beside the report
        (out_dir / name).unlink(missing_ok=True)
    recs = records(study)
    signal = analysis.Signal(objectives_of(study)[0])
    # A retrain that failed has no full WER: it is reported as not retrained.
    retrained = [r for r in retrained or [] if r.get("full_test_wer") is not None]

    head = headline(retrained, budget_bytes) if retrained else None
    if head is not None:  # the verdict as data, beside retrained.json
        atomic_write(out_dir / "headline.json", json.dumps(headline_json(head), indent=2) + "\n")
    view = analysis.front_view(study, recs, signal, budget_bytes, dtype)
    hv = analysis.hypervolume(recs, signal, budget_bytes, dtype)
    imp = importance(recs, signal)
    fid = analysis.fidelity(retrained)
    rob = robustness(retrained, study.user_attrs.get("settings", {}).get("data"), out_dir)
    sections = [
        document.headline_section(head) if head else None,
        document.how_to_read_section(signal),
        document.front_section(view, plots.front_png(view, out_dir / "front.png")),
        document.sharing_section(front_sharing(view), signal),
        document.pareto_table_section(view),
        document.layer_map_section(view),
        document.hypervolume_section(hv, plots.hypervolume_png(hv, out_dir / "hypervolume.png")),
        document.importance_section(imp, plots.importance_png(imp, out_dir / "importance.png")
                                    if imp.importances else None),
        document.fidelity_section(fid, signal, plots.fidelity_png(fid, signal, out_dir / "fidelity.png")
                                  if fid.measured else None),
        robustness_section(rob) if rob else None,
        document.summary_section(analysis.summary(recs)),
    ]
    title = f"Search report: study {study.study_name}"
    text = document.document(title, document.intro(study.user_attrs.get("settings", {}), budget_bytes, dtype),
                             [s for s in sections if s is not None])
    md_path = out_dir / "report.md"
    atomic_write(md_path, text)
    atomic_write(out_dir / "report.html", to_html(text, title, out_dir))
    return md_path
