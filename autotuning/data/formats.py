"""Detect a dataset's format from its columns and normalise every row into one schema.

The normalised schema is TRL's conversational prompt/completion format plus what evaluation
needs::

    {"prompt": [{"role": "system"|"user"|"assistant", "content": str}, ...],   # ends with a user turn
     "completion": [{"role": "assistant", "content": str}],                      # the answer: the only trained tokens
     "references": [str, ...],                                                   # every acceptable answer
     "choices": [str, ...]}                                                      # multiple-choice options, or []

Each format is a small converter registered in :data:`FORMATS`; each fine-tuning type lists the
formats it accepts in :data:`ACCEPTED_FORMATS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import FineTuningType
from ..errors import DataError

__all__ = ["Format", "FORMATS", "ACCEPTED_FORMATS", "RowError", "detect_format", "normalise_row", "build_user_prompt"]


class RowError(ValueError):
    """A single row that cannot be converted; ``field`` names the offending column."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def _text(row: dict, key: str, *, required: bool = True) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        if required:
            raise RowError("is missing or null", key)
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # JSON numbers are usually a column mix-up (an id, a score); a numeric answer is written as text.
        raise RowError(f'must be text, got the number {value!r} (write it as a string: "{value}")', key)
    if not isinstance(value, str):
        raise RowError(f"must be text, got {type(value).__name__}", key)
    value = value.strip()
    if required and not value:
        raise RowError("is empty", key)
    return value


def _answers(row: dict, key: str) -> list[str]:
    """A string, a list of strings, or SQuAD's {"text": [...]} -> non-empty list of answers."""
    value = row.get(key)
    if isinstance(value, dict):
        value = value.get("text", value.get("answer"))
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise RowError(f'must be text, got the number {value!r} (write it as a string: "{value}")', key)
    if not isinstance(value, list):
        raise RowError("must be a string, a list of strings or {'text': [...]}", key)
    answers = [v.strip() for v in value if isinstance(v, str) and v.strip()]
    if not answers:
        raise RowError("has no non-empty answer", key)
    return answers


def _choices(row: dict, key: str = "choices") -> list[str]:
    value = row.get(key)
    if value is None or value == "":
        return []
    if isinstance(value, str):
        # CSV exports often hold a list as text: "['a', 'b']" or "a|b".
        import ast

        try:
            parsed = ast.literal_eval(value)
            value = parsed if isinstance(parsed, list) else [value]
        except (ValueError, SyntaxError):
            value = [v.strip() for v in value.split("|")] if "|" in value else [value]
    if isinstance(value, dict) and "text" in value:
        value = value["text"]
    if not isinstance(value, list):
        raise RowError("must be a list of options", key)
    return [str(v).strip() for v in value if str(v).strip()]


def _passages(row: dict, key: str) -> list[str]:
    value = row.get(key)
    if isinstance(value, dict):  # ms_marco: {"passage_text": [...], "is_selected": [...], "url": [...]}
        value = value.get("passage_text", value.get("text"))
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise RowError("must be text or a list of passages", key)
    passages = [str(v).strip() for v in value if isinstance(v, str) and v.strip()]
    if not passages:
        raise RowError("has no non-empty passage", key)
    return passages


# --------------------------------------------------------------------------- prompts per type

_RAG_INSTRUCTION = "Answer the question using the passages below."


def build_user_prompt(kind: FineTuningType, *, question: str, context: list[str] | None, choices: list[str]) -> str:
    """The user turn for QA and RAG rows. Kept in one place so training and evaluation agree."""
    parts: list[str] = []
    if kind is FineTuningType.RAG and context:
        parts.append(_RAG_INSTRUCTION)
        parts.append("\n\n".join(f"[{i}] {p}" for i, p in enumerate(context, start=1)))
    elif context:
        parts.append("Context:\n" + "\n\n".join(context))
    parts.append(f"Question: {question}")
    if choices:
        parts.append("Options:\n" + "\n".join(f"- {c}" for c in choices))
    return "\n\n".join(parts)


def _example(user: str, answer: str, references: list[str] | None = None, choices=None, history=None) -> dict:
    prompt = list(history or []) + [{"role": "user", "content": user}]
    return {
        "prompt": prompt,
        "completion": [{"role": "assistant", "content": answer}],
        "references": references or [answer],
        "choices": choices or [],
    }


# --------------------------------------------------------------------------- converters


def _convert_alpaca(row: dict, kind: FineTuningType) -> dict:
    instruction = _text(row, "instruction")
    extra = _text(row, "input", required=False)
    user = f"{instruction}\n\n{extra}" if extra else instruction
    history = []
    system = _text(row, "system", required=False)
    if system:
        history.append({"role": "system", "content": system})
    return _example(user, _text(row, "output"), history=history)


def _convert_prompt_completion(row: dict, kind: FineTuningType) -> dict:
    prompt_key, answer_key = ("prompt", "completion") if "prompt" in row else ("question", "answer")
    if isinstance(row.get(prompt_key), list) and isinstance(row.get(answer_key), list):
        # Already conversational prompt/completion (TRL's format).
        turns = _normalise_turns(row[prompt_key] + row[answer_key], prompt_key, "role", "content", _OPENAI_ROLES)
        return _split_last_answer(turns, prompt_key)
    return _example(_text(row, prompt_key), _text(row, answer_key))


_OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
}


def _normalise_turns(turns: Any, column: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise RowError("must be a non-empty list of turns", column)
    out: list[dict] = []
    for i, turn in enumerate(turns):
        where = f"{column}[{i}]"
        if not isinstance(turn, dict):
            raise RowError(f"must be an object with '{role_key}' and '{content_key}'", where)
        raw_role = str(turn.get(role_key, "")).strip().lower()
        if raw_role not in roles:
            raise RowError(
                f"has unknown role {turn.get(role_key)!r} (expected one of {', '.join(sorted(roles))})",
                f"{where}.{role_key}",
            )
        content = turn.get(content_key)
        if not isinstance(content, str) or not content.strip():
            raise RowError("is empty or not text", f"{where}.{content_key}")
        out.append({"role": roles[raw_role], "content": content.strip()})
    # Order: an optional system turn first, then user/assistant strictly alternating from a user turn.
    body = out[1:] if out[0]["role"] == "system" else out
    for i, turn in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != expected:
            index = i + (len(out) - len(body))
            raise RowError(
                f"is a '{turn['role']}' turn where a '{expected}' turn was expected (turns must alternate "
                "user/assistant after an optional first system turn)",
                f"{column}[{index}]",
            )
    return out


def _split_last_answer(turns: list[dict], column: str) -> dict:
    if not any(t["role"] == "assistant" for t in turns):
        raise RowError("has no assistant turn to learn from", column)
    while turns[-1]["role"] != "assistant":  # a trailing unanswered user turn teaches nothing
        turns = turns[:-1]
    answer = turns[-1]["content"]
    return {
        "prompt": turns[:-1],
        "completion": [{"role": "assistant", "content": answer}],
        "references": [answer],
        "choices": [],
    }


def _convert_messages(row: dict, kind: FineTuningType) -> dict:
    return _split_last_answer(
        _normalise_turns(row.get("messages"), "messages", "role", "content", _OPENAI_ROLES), "messages"
    )


def _convert_sharegpt(row: dict, kind: FineTuningType) -> dict:
    return _split_last_answer(
        _normalise_turns(row.get("conversations"), "conversations", "from", "value", _SHAREGPT_ROLES), "conversations"
    )


def _first_present(row: dict, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in row), None)


_ANSWER_KEYS = ("answer", "answers", "correct_answer", "output")
_CONTEXT_KEYS = ("context", "contexts", "passages", "documents")


def _convert_qa(row: dict, kind: FineTuningType) -> dict:
    question = _text(row, "question")
    answer_key = _first_present(row, _ANSWER_KEYS) or "answer"
    answers = _answers(row, answer_key)
    context_key = _first_present(row, _CONTEXT_KEYS)
    context = None
    if context_key is not None and not (row.get(context_key) in (None, "") and kind is FineTuningType.QA):
        context = _passages(row, context_key)
    if kind is FineTuningType.RAG and not context:
        raise RowError("is needed for RAG rows (the passages the answer comes from)", context_key or "context")
    choices = _choices(row) if "choices" in row else []
    if choices and answers[0] not in choices:
        # Answer given as a letter/index ("B" or 1) -> map onto the option text.
        choices_ok = False
        ref = answers[0].strip().upper()
        if len(ref) == 1 and "A" <= ref <= "Z" and ord(ref) - 65 < len(choices):
            answers = [choices[ord(ref) - 65]]
            choices_ok = True
        elif ref.isdigit() and int(ref) < len(choices):
            answers = [choices[int(ref)]]
            choices_ok = True
        if not choices_ok:
            raise RowError(f"answer {answers[0]!r} is not one of the choices", answer_key)
    user = build_user_prompt(kind, question=question, context=context, choices=choices)
    return _example(user, answers[0], references=answers, choices=choices)


def _convert_ms_marco(row: dict, kind: FineTuningType) -> dict:
    question = _text(row, "query")
    answers = [a for a in _answers(row, "answers") if a.lower() != "no answer present."]
    well_formed = row.get("wellFormedAnswers")
    if isinstance(well_formed, list):
        answers = [str(a).strip() for a in well_formed if str(a).strip()] + answers
    if not answers:
        raise RowError("has no answer (only 'No Answer Present.')", "answers")
    context = _passages(row, "passages")
    user = build_user_prompt(FineTuningType.RAG, question=question, context=context, choices=[])
    return _example(user, answers[0], references=answers)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    required: tuple[str, ...]  # every one of these columns must exist
    convert: Callable[[dict, FineTuningType], dict]
    any_of: tuple[tuple[str, ...], ...] = ()  # for each tuple, at least one column must exist

    def matches(self, columns: set[str]) -> bool:
        return all(c in columns for c in self.required) and all(
            any(c in columns for c in group) for group in self.any_of
        )

    def expected(self) -> str:
        cols = list(self.required) + ["/".join(group) for group in self.any_of]
        return f"{self.name} ({', '.join(cols)})"


# Order matters: the first match wins, so more specific formats come first.
FORMATS: list[Format] = [
    Format("messages", "OpenAI-style chat: messages = [{role, content}, ...]", ("messages",), _convert_messages),
    Format("sharegpt", "ShareGPT: conversations = [{from, value}, ...]", ("conversations",), _convert_sharegpt),
    Format("ms_marco", "MS MARCO: query, passages, answers", ("query", "passages", "answers"), _convert_ms_marco),
    Format(
        "qa",
        "question answering: context (text or list of passages), question, answer (+ optional choices)",
        ("question",),
        _convert_qa,
        any_of=(_ANSWER_KEYS, (*_CONTEXT_KEYS, "choices")),
    ),
    Format("alpaca", "Alpaca: instruction, input (optional), output", ("instruction", "output"), _convert_alpaca),
    Format("prompt_completion", "prompt, completion", ("prompt", "completion"), _convert_prompt_completion),
    Format("question_answer", "glaive-style question, answer", ("question", "answer"), _convert_prompt_completion),
]
_BY_NAME = {f.name: f for f in FORMATS}

ACCEPTED_FORMATS: dict[FineTuningType, tuple[str, ...]] = {
    FineTuningType.INSTRUCTION: ("alpaca", "prompt_completion", "question_answer", "messages", "sharegpt"),
    FineTuningType.CODE: ("question_answer", "prompt_completion", "alpaca", "messages", "sharegpt"),
    FineTuningType.CHAT: ("messages", "sharegpt"),
    FineTuningType.QA: ("qa", "question_answer"),
    FineTuningType.RAG: ("qa", "ms_marco"),
}


def detect_format(columns: set[str], kind: FineTuningType, source: str) -> Format:
    """The first accepted format whose columns are present, or a DataError naming found vs expected."""
    accepted = [_BY_NAME[n] for n in ACCEPTED_FORMATS[kind]]
    for fmt in FORMATS:
        if fmt.name not in ACCEPTED_FORMATS[kind] or not fmt.matches(columns):
            continue
        if fmt.name == "qa" and kind is FineTuningType.RAG and not any(c in columns for c in _CONTEXT_KEYS):
            continue  # RAG needs the passages
        return fmt
    other = next((f for f in FORMATS if f.matches(columns)), None)
    hint = f" (it looks like {other.name}, which {kind.value} does not accept)" if other else ""
    raise DataError(
        f"the columns {sorted(columns)} do not match a format accepted by {kind.value}{hint}",
        source,
        "provide columns for one of: " + "; ".join(f.expected() for f in accepted),
    )


def normalise_row(fmt: Format, row: dict, kind: FineTuningType, system_prompt: str = "") -> dict:
    example = fmt.convert(row, kind)
    if system_prompt and not (example["prompt"] and example["prompt"][0]["role"] == "system"):
        example["prompt"] = [{"role": "system", "content": system_prompt}] + example["prompt"]
    return example
