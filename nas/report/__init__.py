"""The report a user reads after a search: ``report.md``, a self-contained ``report.html``, PNGs.

One module per concern:

- :mod:`~nas.report.analysis`: what the report says, as data (the front, the hypervolume, the
  proxy fidelity, the headline verdict, the search summary);
- :mod:`~nas.report.importance`: the importance of each design decision (Optuna's evaluators);
- :mod:`~nas.report.plots`: one PNG per figure, drawn from that data;
- :mod:`~nas.report.document`: the Markdown document, written once;
- :mod:`~nas.report.page`: that Markdown as HTML, images embedded as ``data:`` URIs;
- :mod:`~nas.report.write`: :func:`write_report`, which runs them in that order.

Sections, in order: the headline comparison (only with full retrains), how to read the report,
the front, the Pareto designs, their layer maps, hypervolume against trials, the importance of
each design decision, proxy fidelity, and the search summary.
"""

from nas.report.importance import decisions, param_importances
from nas.report.write import write_report

__all__ = ["decisions", "param_importances", "write_report"]
