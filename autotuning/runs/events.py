"""Metric events: one dict per log/eval step, kept in memory for pollers and appended to metrics.jsonl.

The JSONL file is the durable copy: a reloaded page or a restarted app reads the whole curve back
from it (:func:`read_metrics`), and a resumed run continues the same file.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

__all__ = ["MetricsSink", "read_metrics", "truncate_metrics"]


class MetricsSink:
    """Thread-safe event buffer with an optional JSONL file behind it."""

    def __init__(self, path: str | Path | None = None):
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.path = Path(path) if path else None

    def attach(self, path: str | Path) -> None:
        """Start writing to ``path``; events buffered before are written first, history already there is kept."""
        with self._lock:
            self.path = Path(path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            previous = read_metrics(self.path)
            with self.path.open("a", encoding="utf-8") as fh:
                for event in self._events:
                    fh.write(json.dumps(event) + "\n")
            self._events = previous + self._events

    def emit(self, event: dict[str, Any]) -> None:
        with self._lock:
            self._events.append(event)
            if self.path is not None:
                # One line per event, flushed at once: a crash loses at most the line being written.
                with self.path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(event) + "\n")
                    fh.flush()

    def truncate(self, max_step: int) -> None:
        """Forget events after ``max_step`` (memory and file): a retry from that step redraws the curve from there."""
        with self._lock:
            self._events = [e for e in self._events if _kept(e, max_step)]
            if self.path is not None:
                truncate_metrics(self.path, max_step)

    def events(self, since_index: int = 0) -> list[dict[str, Any]]:
        """Events from position ``since_index`` on (pollers keep the count they have seen)."""
        with self._lock:
            return list(self._events[since_index:])

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)


def _kept(event: dict[str, Any], max_step: int) -> bool:
    """Curve points after ``max_step`` go; notices (what the run changed and why) stay in the history."""
    return event.get("type") == "notice" or event.get("step", 0) <= max_step


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete events of a metrics.jsonl; a torn last line (crash mid-write) is ignored."""
    p = Path(path)
    if not p.is_file():
        return []
    events = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def truncate_metrics(path: str | Path, max_step: int) -> None:
    """Drop events after ``max_step`` so a run resumed from that checkpoint continues one clean curve."""
    p = Path(path)
    if not p.is_file():
        return
    kept = [e for e in read_metrics(p) if _kept(e, max_step)]
    tmp = p.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(e) + "\n" for e in kept), encoding="utf-8")
    tmp.replace(p)
