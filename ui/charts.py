"""Plotly figures drawn from metric events (the same events whether live or read from metrics.jsonl)."""

from __future__ import annotations

import json
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio
from gradio.components.plot import PlotData

_TEMPLATE = pio.templates["plotly_white"].to_plotly_json()

__all__ = [
    "loss_figure",
    "compare_figure",
    "lr_figure",
    "throughput_figure",
    "rewards_figure",
    "length_histogram",
    "progress_html",
]

_LAYOUT = dict(
    height=280,
    margin=dict(l=50, r=20, t=40, b=40),
    template="plotly_white",
    legend=dict(orientation="h", y=1.12, x=0),
    xaxis_title="step",
)


def _series(events: list[dict[str, Any]], kind: str, key: str) -> tuple[list, list]:
    points = [(e["step"], e[key]) for e in events if e.get("type") == kind and e.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _figure(traces: list[dict], title: str, yaxis: str) -> PlotData:
    # Serialised straight from plain dicts: plotly's validating graph_objects API costs ~25 ms per
    # figure, and these are redrawn every second while training runs in another thread of this process.
    layout = {k: v for k, v in _LAYOUT.items() if k != "xaxis_title"}
    layout.update(title={"text": title}, yaxis={"title": {"text": yaxis}}, xaxis={"title": {"text": "step"}})
    layout["template"] = _TEMPLATE
    return PlotData(type="plotly", plot=json.dumps({"data": traces, "layout": layout}))


def loss_figure(events: list[dict[str, Any]]) -> PlotData:
    x, y = _series(events, "train", "loss")
    traces = [{"type": "scatter", "x": x, "y": y, "mode": "lines+markers", "name": "train loss", "marker": {"size": 4}}]
    ex, ey = _series(events, "eval", "eval_loss")
    if ex:
        traces.append(
            {
                "type": "scatter",
                "x": ex,
                "y": ey,
                "mode": "lines+markers",
                "name": "eval loss",
                "marker": {"size": 7, "symbol": "diamond"},
            }
        )
    return _figure(traces, f"Loss ({len(x)} points)", "loss")


# One colour per run in an overlaid chart (plotly's default colourway; it repeats after ten runs).
_COLOURS = [
    "#636efa",
    "#ef553b",
    "#00cc96",
    "#ab63fa",
    "#ffa15a",
    "#19d3f3",
    "#ff6692",
    "#b6e880",
    "#ff97ff",
    "#fecb52",
]


def compare_figure(curves: dict[str, dict[str, list]], best: str | None = None) -> PlotData:
    """Several runs' train loss (lines) and eval loss (diamonds, dotted) overlaid, one colour per run."""
    traces = []
    for i, (name, series) in enumerate(curves.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        label = f"{name} (best)" if name == best else name
        width = 3 if name == best else 1.5
        for kind, dash, marker in (("train", None, 3), ("eval", "dot", 7)):
            points = series.get(kind) or []
            if not points:
                continue
            line = {"color": colour, "width": width}
            if dash:
                line["dash"] = dash
            traces.append(
                {
                    "type": "scatter",
                    "x": [p[0] for p in points],
                    "y": [p[1] for p in points],
                    "mode": "lines+markers",
                    "name": f"{label} {kind}",
                    "legendgroup": name,
                    "line": line,
                    "marker": {"size": marker, "color": colour, **({"symbol": "diamond"} if kind == "eval" else {})},
                }
            )
    return _figure(traces, f"Loss of {len(curves)} runs (solid: train, dotted: eval)", "loss")


def rewards_figure(events: list[dict[str, Any]]) -> PlotData:
    """Preference runs: the implicit rewards of chosen and rejected answers, their margin, and the share of pairs
    ranked right (reward accuracy, on the right axis), from training and from evaluation."""
    traces = []
    for kind, key, name, dash in [
        ("train", "reward_chosen", "chosen", None),
        ("train", "reward_rejected", "rejected", None),
        ("train", "reward_margin", "margin", None),
        ("eval", "eval_reward_margin", "eval margin", "dot"),
    ]:
        x, y = _series(events, kind, key)
        if x:
            trace = {"type": "scatter", "x": x, "y": y, "mode": "lines+markers", "name": name, "marker": {"size": 4}}
            if dash:
                trace["line"] = {"dash": dash}
            traces.append(trace)
    for kind, key, name in [
        ("train", "reward_accuracy", "accuracy"),
        ("eval", "eval_reward_accuracy", "eval accuracy"),
    ]:
        x, y = _series(events, kind, key)
        if x:
            traces.append(
                {
                    "type": "scatter",
                    "x": x,
                    "y": y,
                    "mode": "lines+markers",
                    "name": name,
                    "yaxis": "y2",
                    "marker": {"size": 6, "symbol": "diamond" if kind == "eval" else "circle"},
                }
            )
    if not traces:
        return _figure([], "Rewards (preference methods: dpo, orpo, simpo, kto)", "reward")
    figure = _figure(traces, "Rewards and reward accuracy", "reward")
    plot = json.loads(figure.plot)
    plot["layout"]["yaxis2"] = {"title": {"text": "accuracy"}, "overlaying": "y", "side": "right", "range": [0, 1]}
    return PlotData(type="plotly", plot=json.dumps(plot))


def lr_figure(events: list[dict[str, Any]]) -> PlotData:
    x, y = _series(events, "train", "learning_rate")
    return _figure(
        [{"type": "scatter", "x": x, "y": y, "mode": "lines", "name": "learning rate"}], "Learning rate", "lr"
    )


def throughput_figure(events: list[dict[str, Any]]) -> PlotData:
    x, y = _series(events, "train", "tokens_per_second")
    trace = {"type": "scatter", "x": x, "y": y, "mode": "lines+markers", "name": "tokens/s", "marker": {"size": 4}}
    return _figure([trace], "Throughput (non-padding tokens/s)", "tokens/s")


def length_histogram(lengths: list[int], max_seq_length: int) -> go.Figure:
    fig = go.Figure(go.Histogram(x=lengths, nbinsx=40, name="rows"))
    fig.add_vline(
        x=max_seq_length, line_dash="dash", line_color="crimson", annotation_text=f"max_seq_length {max_seq_length}"
    )
    layout = dict(_LAYOUT, xaxis_title="tokens per row (prompt + answer)")
    fig.update_layout(title="Token lengths", yaxis_title="rows", **layout)
    return fig


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_html(progress: dict[str, Any]) -> str:
    step, total = progress.get("step", 0) or 0, progress.get("max_steps", 0) or 0
    pct = int(100 * step / total) if total else 0
    return (
        f'<div class="at-progress"><div class="at-bar" style="width:{pct}%"></div></div>'
        f'<div class="at-progress-text" id="at-progress-text">step <b id="at-step">{step}</b> / {total or "?"}'
        f" &middot; elapsed {_fmt_seconds(progress.get('elapsed_s'))} &middot; ETA {_fmt_seconds(progress.get('eta_s'))}</div>"
    )
