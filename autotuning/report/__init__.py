"""The run report: ``report.html`` (self-contained, with plotly curves) and ``report.md`` in the run directory.

:mod:`.data` reads what the run wrote into a :class:`Report` (plain data); :mod:`.render` puts that one object
through the templates in ``templates/``. The job writes the report at the end; ``export`` and ``evaluate``
rewrite it, so it can be rebuilt from the run directory at any time.
"""

from .data import Report, build_report
from .render import render_html, render_markdown, write_report

__all__ = ["write_report", "build_report", "render_html", "render_markdown", "Report"]
