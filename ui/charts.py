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
