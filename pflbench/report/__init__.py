"""Report generator: tables, statistics, figures, LaTeX/Markdown/HTML from the tidy results.

``build_report(run_dir)`` reads only :mod:`pflbench.results` (finished runs under
``run_dir/results``) and writes ``report.md``, a self-contained ``report.html``,
``tables/*.tex`` and ``figures/*.pdf|png`` into ``run_dir/report`` (or ``out``).
"""

from .build import build_report
from .data import ReportError

__all__ = ["ReportError", "build_report"]
