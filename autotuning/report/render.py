"""report.html and report.md: one :class:`~autotuning.report.data.Report` through two Jinja2 templates.

The templates live in ``templates/`` beside this module (shipped as package data). HTML is autoescaped, so a
dataset answer that contains ``<script>`` shows as text; the only markup passed through unescaped (``|safe``)
is plotly's chart, built here from numbers and fixed trace names. Markdown is not escaped (it is plain text);
only its table cells are made safe for a pipe table.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import plotly.io as pio
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from ..runs import RunDir
from .card import write_model_cards
from .data import Report, build_report, fmt_value

__all__ = ["render_html", "render_markdown", "write_report"]

log = logging.getLogger(__name__)


def _cell(value: Any) -> str:
    """A table cell: a dash for "no value", numbers in the report's one style."""
    return "–" if value is None else fmt_value(value)


def _md_cell(value: Any, width: int | None = None) -> str:
    """A pipe-table cell: one line, pipes escaped; ``width`` cuts long text (prompts)."""
    text = _cell(value)
    if width is not None:
        text = text[:width]
    return text.replace("|", "\\|").replace("\n", " ")


_ENV = Environment(
    loader=PackageLoader("autotuning.report", "templates"),
    autoescape=select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
    undefined=StrictUndefined,  # a misspelt field fails the test suite instead of rendering as blank
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
_ENV.filters.update(cell=_cell, md_cell=_md_cell)


def _xy(points: list[tuple[int, float]]) -> dict[str, list[Any]]:
    return {"x": [p[0] for p in points], "y": [p[1] for p in points]}


def _loss_chart(report: Report) -> str:
    """Train loss, eval loss and learning rate (second axis) as a plotly div with plotly.js inlined."""

    line = {"type": "scatter", "mode": "lines+markers"}
    traces = [
        {**line, **_xy(report.train_loss), "name": "train loss"},
        {**line, **_xy(report.eval_loss), "name": "eval loss", "marker": {"symbol": "diamond", "size": 8}},
        {
            **line,
            **_xy(report.learning_rate),
            "mode": "lines",
            "name": "learning rate",
            "yaxis": "y2",
            "line": {"dash": "dot"},
        },
    ]
    layout = {
        "title": {"text": "Loss and learning rate"},
        "xaxis": {"title": {"text": "step"}},
        "yaxis": {"title": {"text": "loss"}},
        "yaxis2": {"title": {"text": "learning rate"}, "overlaying": "y", "side": "right", "showgrid": False},
        "height": 420,
        "margin": {"l": 60, "r": 60, "t": 50, "b": 50},
        "legend": {"orientation": "h"},
    }
    # plotly.js inlined: the report opens offline, from a file, years later.
    return pio.to_html({"data": traces, "layout": layout}, include_plotlyjs=True, full_html=False, div_id="loss-chart")


def _rewards_chart(report: Report) -> str | None:
    """Preference runs: the train reward margin, and train and eval reward accuracy (second axis); plotly.js is
    already in the page with the loss chart."""
    if not (report.reward_margin or report.eval_reward_accuracy):
        return None
    line = {"type": "scatter", "mode": "lines+markers"}
    traces = [
        {**line, **_xy(report.reward_margin), "name": "reward margin"},
        {**line, **_xy(report.reward_accuracy), "name": "reward accuracy", "yaxis": "y2", "line": {"dash": "dot"}},
        {
            **line,
            **_xy(report.eval_reward_accuracy),
            "name": "eval reward accuracy",
            "yaxis": "y2",
            "marker": {"symbol": "diamond", "size": 8},
        },
    ]
    layout = {
        "title": {"text": "Rewards"},
        "xaxis": {"title": {"text": "step"}},
        "yaxis": {"title": {"text": "reward margin"}},
        "yaxis2": {"title": {"text": "reward accuracy"}, "overlaying": "y", "side": "right", "range": [0, 1.05]},
        "height": 380,
        "margin": {"l": 60, "r": 60, "t": 50, "b": 50},
        "legend": {"orientation": "h"},
    }
    return pio.to_html(
        {"data": traces, "layout": layout}, include_plotlyjs=False, full_html=False, div_id="rewards-chart"
    )


def render_html(report: Report) -> str:
    """The self-contained report.html."""
    has_curves = bool(report.train_loss or report.eval_loss or report.learning_rate)
    chart = _loss_chart(report) if has_curves else None
    rewards = _rewards_chart(report) if chart else None
    return _ENV.get_template("report.html.j2").render(report=report, chart=chart, rewards_chart=rewards)


def render_markdown(report: Report) -> str:
    """report.md: the same sections as the HTML, the curves as their first and last points."""
    return _ENV.get_template("report.md.j2").render(report=report)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write report.html and report.md (atomically) from one read of the run directory; return their paths.

    The model cards of merged/ and adapter/ (:mod:`.card`) are rewritten from the same read: they show the same
    figures. A card that cannot be written is a warning, never a failed report (nor run, nor export).
    """
    run = RunDir(run_dir)
    report = build_report(run.path)
    html_path, md_path = run.path / "report.html", run.path / "report.md"
    _write_atomic(html_path, render_html(report))
    _write_atomic(md_path, render_markdown(report))
    try:
        write_model_cards(run.path, report)
    except Exception as exc:  # the card is a view of what the run recorded; writing it again fixes it
        log.warning("could not write the model card of %s: %s: %s", run.path, type(exc).__name__, exc)
    return html_path, md_path
