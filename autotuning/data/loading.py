"""Read rows from local files, a directory, the bundled samples or the Hugging Face Hub.

Local files are parsed here rather than through ``datasets`` so that a broken file is reported
with its line number (JSON Lines) or row (CSV) instead of an Arrow error.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pandas as pd

from ..config import QUICKSTART_DATASET, FineTuningType
from ..errors import DataError
from ..hub import hub_reachable
from ..resources import ASSETS as BUNDLED_ASSETS

__all__ = [
    "SUPPORTED_SUFFIXES",
    "BUILTIN_HUB_DATASETS",
    "SAMPLE_FILES",
    "RawData",
    "load_rows",
    "sample_path",
]

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
ASSETS = BUNDLED_ASSETS / "datasets"

# The seed's built-in datasets per fine-tuning type: (Hub id, config name).
BUILTIN_HUB_DATASETS: dict[FineTuningType, tuple[str, str]] = {
    FineTuningType.INSTRUCTION: ("yahma/alpaca-cleaned", ""),
    FineTuningType.CODE: ("glaiveai/glaive-code-assistant-v2", ""),
    FineTuningType.CHAT: ("Crystalcareai/Code-feedback-sharegpt-renamed", ""),
    FineTuningType.QA: ("mou3az/Question-Answering-Generation-Choices", ""),
    FineTuningType.RAG: ("microsoft/ms_marco", "v2.1"),
}

SAMPLE_FILES: dict[FineTuningType, str] = {
    FineTuningType.INSTRUCTION: "instruction_sample.jsonl",
    FineTuningType.CODE: "code_sample.jsonl",
    FineTuningType.CHAT: "chat_sample.jsonl",
    FineTuningType.QA: "qa_sample.jsonl",
    FineTuningType.RAG: "rag_sample.jsonl",
}


# The offline quickstart's data (dataset_path: sample:quickstart): templated instructions whose held-out rows a
# 1M-parameter builtin model learns to predict within seconds (see scripts/make_quickstart_sample.py).
QUICKSTART_FILE = "quickstart_sample.jsonl"


def sample_path(kind: FineTuningType) -> Path:
    return ASSETS / SAMPLE_FILES[kind]


@dataclass
class RawData:
    """Rows as read, before format detection. ``locations[i]`` says where row i came from."""

    rows: list[dict[str, Any]]
    source: str  # what the user would recognise: a path, "hub:<id>" or "sample:<type>"
    locations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # things the user should be told (fallbacks)

    def where(self, index: int) -> str:
        if index < len(self.locations):
            return self.locations[index]
        return f"{self.source}, row {index + 1}"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        # Count lines up to the bad byte so the user can find it.
        raw = path.read_bytes()
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"the file is not UTF-8 text (byte 0x{raw[exc.start]:02x})",
            f"{path}, line {line}",
            "re-save the file as UTF-8",
        ) from None


def _check_record(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(
            f"each row must be a JSON object with named fields, got {type(value).__name__}",
            where,
            'write rows like {"instruction": ..., "output": ...}',
        )
    return value


def _load_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    rows: list[dict] = []
    locations: list[str] = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"invalid JSON ({exc.msg} at column {exc.colno})",
                f"{path}, line {number}",
                "fix that line; JSON Lines needs one complete JSON object per line",
            ) from None
        rows.append(_check_record(value, f"{path}, line {number}"))
        locations.append(f"{path}, line {number}")
    return rows, locations


def _load_json(path: Path) -> tuple[list[dict], list[str]]:
    text = _read_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        # Maybe it is JSON Lines with a .json suffix.
        if exc.msg == "Extra data":
            return _load_jsonl(path)
        raise DataError(
            f"invalid JSON ({exc.msg})", f"{path}, line {exc.lineno}, column {exc.colno}", "fix the JSON syntax"
        ) from None
    if isinstance(value, dict):
        # {"data": [...]} / {"train": [...]} wrappers are common.
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) == 1 and all(isinstance(v, dict) for v in lists[0]):
            value = lists[0]
        else:
            value = [value]
    if not isinstance(value, list):
        raise DataError("expected a JSON list of row objects", str(path), 'write [{"instruction": ...}, ...]')
    rows = [_check_record(v, f"{path}, row {i + 1}") for i, v in enumerate(value)]
    return rows, [f"{path}, row {i + 1}" for i in range(len(rows))]


def _load_table(path: Path) -> tuple[list[dict], list[str]]:

    try:
        if path.suffix == ".csv":
            frame = pd.read_csv(path, keep_default_na=False, dtype=object, encoding="utf-8")
            first_row_line = 2  # header is line 1
        else:
            frame = pd.read_parquet(path)
            first_row_line = 0
    except UnicodeDecodeError:
        _read_text(path)  # raises a DataError with the line number
        raise
    except pd.errors.EmptyDataError:
        raise DataError("the file is empty", str(path), "add a header row and data rows") from None
    except (pd.errors.ParserError, ValueError, OSError) as exc:
        raise DataError(
            f"cannot parse the file ({str(exc).splitlines()[0][:200]})", str(path), "check it is a valid table"
        ) from None
    rows = frame.to_dict(orient="records")
    rows = [{str(k): _from_table(v) for k, v in row.items()} for row in rows]
    if first_row_line:
        locations = [f"{path}, line {i + first_row_line}" for i in range(len(rows))]
    else:
        locations = [f"{path}, row {i + 1}" for i in range(len(rows))]
    return rows, locations


def _from_table(value: Any) -> Any:
    """Parquet gives numpy arrays for list columns; turn them into plain Python."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_from_table(v) for v in value]
    if isinstance(value, dict):
        return {k: _from_table(v) for k, v in value.items()}
    return value


_LOADERS = {".jsonl": _load_jsonl, ".json": _load_json, ".csv": _load_table, ".parquet": _load_table}


def _load_file(path: Path) -> tuple[list[dict], list[str]]:
    if path.suffix.lower() not in _LOADERS:
        raise DataError(
            f"unsupported file type '{path.suffix or '(none)'}'",
            str(path),
            f"use one of {', '.join(SUPPORTED_SUFFIXES)}",
        )
    if path.stat().st_size == 0:
        raise DataError("the file is empty", str(path), "add rows to it or pick another file")
    return _LOADERS[path.suffix.lower()](path)


def _load_local(path: Path) -> RawData:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
        if not files:
            raise DataError(
                "the directory holds no data files", str(path), f"add {', '.join(SUPPORTED_SUFFIXES)} files"
            )
        suffixes = sorted({p.suffix.lower() for p in files})
        if len(suffixes) > 1:
            examples = ", ".join(next(p.name for p in files if p.suffix.lower() == s) for s in suffixes)
            raise DataError(
                f"the directory mixes file types ({', '.join(suffixes)}: {examples})",
                str(path),
                "keep one file type per directory (convert the others, or point dataset_path at one file)",
            )
        rows: list[dict] = []
        locations: list[str] = []
        columns_seen: dict[frozenset, Path] = {}
        for file in files:
            file_rows, file_locations = _load_file(file)
            if file_rows:
                columns_seen.setdefault(frozenset(file_rows[0]), file)
            rows.extend(file_rows)
            locations.extend(file_locations)
        if len(columns_seen) > 1:
            (a_cols, a_file), (b_cols, b_file) = list(columns_seen.items())[:2]
            raise DataError(
                f"the directory mixes data formats: {a_file.name} has columns {sorted(a_cols)} but "
                f"{b_file.name} has {sorted(b_cols)}",
                str(path),
                "keep files of one format per directory",
            )
        data = RawData(rows, str(path), locations)
    else:
        rows, locations = _load_file(path)
        data = RawData(rows, str(path), locations)
    if not data.rows:
        raise DataError("the dataset has no rows", str(path), "add rows or pick another file")
    return data


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not text.startswith((".", "~")) and "\\" not in text


def _is_connection_problem(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    markers = ("offline", "connection", "resolve", "timed out", "timeout", "network", "unreachable", "max retries")
    return any(m in text for m in markers)


def _load_hub(dataset_id: str, config_name: str, split: str, token: str | None, max_samples: int = 0) -> RawData:

    # A slice keeps huge datasets (ms_marco has ~800k rows) from being materialised in full when
    # the user only wants a few thousand rows; shuffling then happens within that slice.
    split_spec = f"{split}[:{max_samples * 4}]" if max_samples else split
    if not hub_reachable():
        raise DataError(
            f"cannot reach the Hugging Face Hub to download dataset '{dataset_id}'",
            "field 'dataset_path'",
            "connect to the internet, or use a local file or 'sample'",
        ) from ConnectionError("hub unreachable")
    try:
        ds = datasets.load_dataset(dataset_id, name=config_name or None, split=split_spec, token=token)
    except Exception as exc:
        if _is_connection_problem(exc):
            raise DataError(
                f"cannot reach the Hugging Face Hub to download dataset '{dataset_id}'",
                "field 'dataset_path'",
                "connect to the internet, or use a local file or 'sample'",
            ) from exc
        message = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise DataError(
            f"dataset '{dataset_id}' could not be loaded from the Hub ({message})",
            "field 'dataset_path'",
            "check the dataset id, dataset_config and dataset_split (and hf_token for gated datasets)",
        ) from None
    rows = [dict(r) for r in ds]
    if not rows:
        raise DataError(f"Hub dataset '{dataset_id}' split '{split}' is empty", "field 'dataset_split'", "pick a split")
    return RawData(rows, f"hub:{dataset_id}", [f"hub:{dataset_id}, row {i + 1}" for i in range(len(rows))])


# More text than any max_seq_length can use (a 128k-token context is ~0.5M characters): a row this big is a
# broken export (a whole file in one cell, a missing newline), and tokenising it would take minutes and gigabytes.
MAX_ROW_CHARS = 8_000_000


def _text_size(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_size(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_text_size(v) for v in value)
    return 0


def _check_row_sizes(data: RawData) -> RawData:
    for i, row in enumerate(data.rows):
        size = _text_size(row)
        if size > MAX_ROW_CHARS:
            where = data.locations[i] if i < len(data.locations) else f"{data.source}, row {i + 1}"
            raise DataError(
                f"one row holds {size / 1e6:.1f}M characters of text, over the {MAX_ROW_CHARS / 1e6:.0f}M limit "
                "(more than any max_seq_length can use)",
                where,
                "split that row into several rows or shorten it; a whole document in one cell is usually a broken export",
            )
    return data


def load_rows(
    kind: FineTuningType,
    dataset_path: str,
    dataset_config: str = "",
    dataset_split: str = "train",
    token: str | None = None,
    max_samples: int = 0,
) -> RawData:
    """Read the rows named by ``dataset_path`` (see the config help for the accepted forms)."""
    if dataset_path in ("sample", f"sample:{kind.value}"):
        path = sample_path(kind)
        data = _load_local(path)
        data.source = f"sample:{kind.value}"
        return data
    if dataset_path == QUICKSTART_DATASET:
        data = _load_local(ASSETS / QUICKSTART_FILE)
        data.source = dataset_path
        return data
    if not dataset_path:
        hub_id, hub_config = BUILTIN_HUB_DATASETS[kind]
        if hub_reachable():
            try:
                return _load_hub(hub_id, hub_config, "train", token, max_samples)
            except DataError as err:
                if not isinstance(err.__cause__, BaseException) or not _is_connection_problem(err.__cause__):
                    raise
        note = f"the Hub is unreachable, so the bundled {kind.value} sample is used instead of {hub_id}"
        log.warning(note)
        data = load_rows(kind, "sample")
        data.notes.append(note)
        return data
    path = Path(dataset_path).expanduser()
    if path.exists():
        return _check_row_sizes(_load_local(path))
    if path.suffix.lower() in SUPPORTED_SUFFIXES or not _looks_like_hub_id(dataset_path):
        raise DataError(
            "dataset file not found",
            f"field 'dataset_path' = {dataset_path}",
            f"check the path (relative paths start from {Path.cwd()})",
        )
    return _load_hub(dataset_path, dataset_config, dataset_split, token, max_samples)
