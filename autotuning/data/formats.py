"""Detect a dataset's format from its columns and normalise every row into one schema.

The normalised schema is TRL's conversational prompt/completion format plus what evaluation
needs::

    {"prompt": [{"role": "system"|"user"|"assistant", "content": str}, ...],   # ends with a user turn
     "completion": [{"role": "assistant", "content": str}],                      # the last answer
     "references": [str, ...],                                                   # every acceptable answer
     "choices": [str, ...]}                                                      # multiple-choice options, or []

Evaluation asks for the completion given the prompt; training learns every assistant turn of prompt +
completion (or only the completion with ``trained_turns: last``). Conversations are made to alternate by
:func:`make_alternating`'s documented rule; a row it changed carries ``"turn_fixes": {rule: count}``, which
:func:`autotuning.data.normalise_rows` removes and totals for the log and the data stats.

Each format is a small converter registered in :data:`FORMATS`; each fine-tuning type lists the
formats it accepts in :data:`ACCEPTED_FORMATS`.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import FineTuningType
from ..errors import DataError

__all__ = [
    "Format",
    "FORMATS",
    "ACCEPTED_FORMATS",
    "RowError",
    "TURN_FIXES",
    "detect_format",
    "make_alternating",
    "normalise_row",
    "build_user_prompt",
]

TURN_FIXES = "turn_fixes"  # key of a normalised row whose conversation make_alternating changed


class RowError(ValueError):
    """A single row that cannot be converted; ``field`` names the offending column."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field

    def at(self, where: str) -> DataError:
        """The user's error for this row: the field and what is wrong with it, ``where`` the file and row."""
        return DataError(
            f"field '{self.field}' {self}",
            where,
            "fix or remove that row (or set skip_bad_rows: true to skip bad rows)",
        )


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
    """Validate every turn (role known, content text) and map roles onto system/user/assistant; order is kept."""
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
    return out


def make_alternating(turns: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """Turns in the order every chat template accepts: an optional system turn, then user/assistant alternating
    from a user turn and ending on an assistant turn. Returns (turns, what was changed: counts by rule).

    Real conversations do not always alternate, and templates such as Gemma's raise on those that do not, so
    instead of rejecting the row this rule repairs it, in this order:

    1. system turns at the start are joined into one system turn; a system turn later in the conversation
       becomes a user turn where it stands (``system_as_user``): it is an instruction given at that point, and
       templates only accept a system turn first;
    2. assistant turns before the first user turn are dropped (``leading_assistant_dropped``): they answer
       nothing;
    3. consecutive turns of the same role are joined into one turn, their contents separated by a blank line
       (``joined``: turns merged into the one before them);
    4. user turns after the last assistant turn are dropped (``trailing_user_dropped``): nothing answers them.

    A conversation left with no assistant turn raises :class:`RowError` (nothing to learn from).

    >>> make_alternating([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
    ...                   {"role": "assistant", "content": "c"}])[0][0]["content"]
    'a\\n\\nb'
    """
    fixes = {"system_as_user": 0, "leading_assistant_dropped": 0, "joined": 0, "trailing_user_dropped": 0}
    out: list[dict] = []
    for turn in turns:
        role = turn["role"]
        if role == "system" and any(t["role"] != "system" for t in out):
            role = "user"
            fixes["system_as_user"] += 1
        if role == "assistant" and not any(t["role"] == "user" for t in out):
            fixes["leading_assistant_dropped"] += 1
            continue
        if out and out[-1]["role"] == role:
            out[-1] = {"role": role, "content": out[-1]["content"] + "\n\n" + turn["content"]}
            fixes["joined"] += 1
            continue
        out.append({"role": role, "content": turn["content"]})
    while out and out[-1]["role"] != "assistant":
        if out[-1]["role"] == "user":
            fixes["trailing_user_dropped"] += 1
        out.pop()
    return out, {name: n for name, n in fixes.items() if n}


def _split_last_answer(turns: list[dict], column: str) -> dict:
    """The normalised row of a conversation: the last assistant turn is the completion, the turns before it the
    prompt (earlier assistant turns are trained too unless ``trained_turns: last``; see encoding.py)."""
    if not any(t["role"] == "assistant" for t in turns):
        raise RowError("has no assistant turn to learn from", column)
    turns, fixes = make_alternating(turns)
    if not turns:
        raise RowError(
            "has no assistant turn that answers a user turn (assistant turns before the first user turn answer "
            "nothing and are dropped)",
            column,
        )
    answer = turns[-1]["content"]
    example = {
        "prompt": turns[:-1],
        "completion": [{"role": "assistant", "content": answer}],
        "references": [answer],
        "choices": [],
    }
    if fixes:
        example[TURN_FIXES] = fixes
    return example


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
