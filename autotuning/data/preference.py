"""Preference data (DPO, ORPO, SimPO pairs; KTO's unpaired labels): detect the format, normalise, refuse bad rows.

Rows normalise to TRL's conversational preference schema, so the prompt renders through the model's chat
template as for SFT::

    paired:   {"prompt": [messages ending with a user turn], "chosen": [{"role": "assistant", ...}],
               "rejected": [{"role": "assistant", ...}]}
    unpaired: {"prompt": [...], "completion": [{"role": "assistant", ...}], "label": bool}

Accepted layouts, detected from the columns like the SFT formats (:mod:`.formats`):

- ``pair_text``: ``prompt`` / ``chosen`` / ``rejected`` as strings;
- ``pair_conversations``: ``chosen`` / ``rejected`` as whole conversations (message lists, UltraFeedback style)
  that share every turn before the last assistant turn;
- ``pair_messages``: ``prompt`` / ``chosen`` / ``rejected`` with message lists;
- ``kto``: ``prompt`` / ``completion`` / ``label`` (true for a desirable completion, false for an undesirable one).

A bad row is a :class:`~autotuning.data.formats.RowError` naming its field, turned into a DataError naming the
file and row by :func:`normalise_preference_rows`; nothing is written before that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from .formats import FORMATS, RowError, make_alternating
from .loading import RawData

__all__ = [
    "PreferenceFormat",
    "PREFERENCE_FORMATS",
    "preference_layout",
    "detect_preference_format",
    "normalise_preference_row",
    "normalise_preference_rows",
]

_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


@dataclass(frozen=True)
class PreferenceFormat:
    name: str
    paired: bool
    columns: tuple[str, ...]
    description: str
    convert: Callable[[dict], dict]
    lists: bool | None = None  # whether chosen/rejected (or prompt) hold message lists; None: either

    def matches(self, columns: set[str], row: dict | None = None) -> bool:
        if not set(self.columns) <= columns:
            return False
        if row is None or self.lists is None:
            return True
        key = "chosen" if self.paired else "completion"
        return isinstance(row.get(key), list) == self.lists

    def expected(self) -> str:
        return f"{self.name} ({', '.join(self.columns)}: {self.description})"


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and value != value):
        raise RowError("is missing or null", key)
    if not isinstance(value, str):
        raise RowError(f"must be text, got {type(value).__name__}", key)
    if not value.strip():
        raise RowError("is empty", key)
    return value.strip()


def _messages(value: Any, key: str) -> list[dict]:
    """A message list ({role, content} or ShareGPT's {from, value}) -> [{role, content}], roles checked."""
    if not isinstance(value, list) or not value:
        raise RowError("must be a non-empty list of messages", key)
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise RowError(f"message {i + 1} must be an object with role and content", key)
        role = _ROLES.get(str(turn.get("role", turn.get("from", ""))).lower())
        content = turn.get("content", turn.get("value"))
        if role is None:
            raise RowError(f"message {i + 1} has role {turn.get('role', turn.get('from'))!r}", key)
        if not isinstance(content, str) or not content.strip():
            raise RowError(f"message {i + 1} is empty", key)
        turns.append({"role": role, "content": content.strip()})
    return turns


def _alternating_prompt(turns: list[dict], key: str) -> list[dict]:
    """The prompt turns in the order chat templates accept (formats.make_alternating's rule), ending on a user turn."""
    if turns[-1]["role"] != "user":
        raise RowError("must end with a user turn (the answers follow it)", key)
    answered, _fixes = make_alternating([*turns, {"role": "assistant", "content": "-"}])
    return answered[:-1]


def _prompt(row: dict) -> list[dict]:
    value = row.get("prompt")
    if isinstance(value, list):
        return _alternating_prompt(_messages(value, "prompt"), "prompt")
    return [{"role": "user", "content": _text(row, "prompt")}]


def _answer(row: dict, key: str) -> list[dict]:
    value = row.get(key)
    if isinstance(value, list):
        turns = _messages(value, key)
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise RowError("must hold one assistant message (the prompt's turns go in 'prompt')", key)
        return turns
    return [{"role": "assistant", "content": _text(row, key)}]


def _distinct(example: dict) -> dict:
    if example["chosen"][0]["content"] == example["rejected"][0]["content"]:
        raise RowError("is identical to 'rejected': a pair must prefer one answer over another", "chosen")
    return example


def _convert_pair(row: dict) -> dict:
    return _distinct({"prompt": _prompt(row), "chosen": _answer(row, "chosen"), "rejected": _answer(row, "rejected")})


def _split(turns: list[dict], key: str) -> tuple[list[dict], dict]:
    if turns[-1]["role"] != "assistant":
        raise RowError("must end with an assistant turn (the answer being judged)", key)
    if len(turns) < 2:
        raise RowError("has no prompt before its answer", key)
    return turns[:-1], turns[-1]


def _convert_conversations(row: dict) -> dict:
    chosen_prompt, chosen = _split(_messages(row.get("chosen"), "chosen"), "chosen")
    rejected_prompt, rejected = _split(_messages(row.get("rejected"), "rejected"), "rejected")
    if chosen_prompt != rejected_prompt:
        at = next(
            (i for i, (a, b) in enumerate(zip(chosen_prompt, rejected_prompt)) if a != b),
            min(len(chosen_prompt), len(rejected_prompt)),
        )
        raise RowError(
            f"differs from 'rejected' before the last assistant turn (at message {at + 1}): both conversations "
            "must share their prompt turns",
            "chosen",
        )
    prompt = _alternating_prompt(chosen_prompt, "chosen")
    return _distinct({"prompt": prompt, "chosen": [chosen], "rejected": [rejected]})


def _convert_kto(row: dict) -> dict:
    label = row.get("label")
    if label is None or (isinstance(label, float) and label != label):
        raise RowError("is missing (true for a desirable completion, false for an undesirable one)", "label")
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):
        label = label.strip().lower() == "true"
    if not isinstance(label, bool):
        raise RowError(f"must be true or false, got {label!r}", "label")
    return {"prompt": _prompt(row), "completion": _answer(row, "completion"), "label": label}


# Order matters: the first match wins (message-list layouts are told apart by the first row's values).
PREFERENCE_FORMATS: list[PreferenceFormat] = [
    PreferenceFormat(
        "pair_messages", True, ("prompt", "chosen", "rejected"), "message lists", _convert_pair, lists=True
    ),
    PreferenceFormat("pair_text", True, ("prompt", "chosen", "rejected"), "strings", _convert_pair, lists=False),
    PreferenceFormat(
        "pair_conversations",
        True,
        ("chosen", "rejected"),
        "two whole conversations sharing their turns before the last answer",
        _convert_conversations,
    ),
    PreferenceFormat(
        "kto", False, ("prompt", "completion", "label"), "label true = desirable, false = undesirable", _convert_kto
    ),
]


def preference_layout(columns: set[str], rows: list[dict]) -> PreferenceFormat | None:
    """The preference layout of rows that an SFT run must refuse, or None.

    Pairs are recognised by their ``chosen`` / ``rejected`` columns. KTO's columns (prompt, completion, label) are
    also an SFT prompt/completion file with a label column, so they count as preference data only when the labels
    are booleans: an SFT file with, say, category labels still trains.
    """
    if {"chosen", "rejected"} <= columns:
        return next(f for f in PREFERENCE_FORMATS if f.name == "pair_conversations")
    kto = PREFERENCE_FORMATS[-1]
    labels = [row.get("label") for row in rows[:50] if "label" in row]
    if kto.matches(columns) and labels and all(isinstance(v, bool) for v in labels):
        return kto
    return None


def detect_preference_format(columns: set[str], paired: bool, source: str, first_row: dict | None = None):
    """The preference layout of a file, or a DataError saying what was found and what is expected."""
    wanted = [f for f in PREFERENCE_FORMATS if f.paired == paired]
    for fmt in wanted:
        if fmt.matches(columns, first_row):
            return fmt
    other = next((f for f in PREFERENCE_FORMATS if f.matches(columns)), None)
    sft = next((f for f in FORMATS if f.matches(columns)), None)
    if other is not None:
        found = f"unpaired KTO data ({other.expected()})" if paired else f"paired data ({other.expected()})"
    elif sft is not None:
        found = f"SFT data in the {sft.name} format, with no preference between answers"
    else:
        found = f"the columns {sorted(columns)}"
    need = "pairs" if paired else "unpaired labelled completions"
    raise DataError(
        f"{'paired' if paired else 'unpaired'} preference tuning needs {need}, and this file holds {found}",
        source,
        "provide columns for one of: " + "; ".join(f.expected() for f in wanted),
    )


def normalise_preference_row(fmt: PreferenceFormat, row: dict) -> dict:
    return fmt.convert(row)


def normalise_preference_rows(raw: RawData, paired: bool, skip_bad_rows: bool = False) -> tuple[str, list[dict], int]:
    """(format name, rows, skipped): every row converted, or a DataError naming the file, row and field."""
    columns: set[str] = set()
    for row in raw.rows[:200]:
        columns.update(row)
    fmt = detect_preference_format(columns, paired, raw.source, raw.rows[0] if raw.rows else None)
    rows, skipped = [], 0
    for index, row in enumerate(raw.rows):
        try:
            rows.append(fmt.convert(row))
        except RowError as err:
            if skip_bad_rows:
                skipped += 1
                continue
            raise err.at(raw.where(index)) from None
    if not rows:
        raise DataError("no usable rows", raw.source, "every row was skipped as bad; check the file format")
    return fmt.name, rows, skipped
