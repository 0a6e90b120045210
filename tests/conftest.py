"""Shared fixtures. Tests run offline: builtin tiny models are built into a per-session cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _builtin_cache(tmp_path_factory):
    """Builtin models are built once per session into a private cache (never the user's)."""
    cache = tmp_path_factory.mktemp("autotuning-cache")
    previous = os.environ.get("AUTOTUNING_CACHE")
    os.environ["AUTOTUNING_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("AUTOTUNING_CACHE", None)
    else:
        os.environ["AUTOTUNING_CACHE"] = previous


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def jsonl(tmp_path):
    def make(rows: list[dict], name: str = "data.jsonl") -> Path:
        return write_jsonl(tmp_path / name, rows)

    return make
