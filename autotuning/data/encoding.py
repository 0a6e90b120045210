"""Turn normalised rows into token ids and a completion mask, with the model's chat template.

The whole conversation is rendered with the chat template and tokenised **once**, so the ids are
exactly those of the rendered text (tokenising prompt and answer apart can change the tokens at
their boundary, e.g. with SentencePiece-style vocabularies). Each trained answer is located in
that text: turn ``k`` starts where ``turns[:k]`` rendered with ``add_generation_prompt=True``
ends (what inference renders before the model speaks) and ends where ``turns[:k + 1]`` ends.
The tokens whose characters fall in an answer (``return_offsets_mapping``) are trained
(``completion_mask == 1``); TRL's SFTTrainer turns the mask into labels (-100 elsewhere).

Which answers: every assistant turn (``trained_turns: all``) or only the last one (``last``).

Where an answer stops: on the template's end-of-turn token, the first special token after the
answer's text (``<|im_end|>`` for ChatML, ``<end_of_turn>`` for Gemma), so the model learns to
stop; template text after it (e.g. the newline before the next turn) is not trained. When a
template emits no special token after an answer, the EOS id is inserted after it and trained:
the ids then differ from the rendered text by that one token per answer.
:func:`end_of_turn_token_ids` gives the same token(s) to generation as its stop ids.

Fallbacks: a turn whose rendering is not a prefix of the whole conversation (templates that
rewrite earlier turns, e.g. dropping their reasoning) cannot be located and is not trained
(counted as ``untrained_turns``); when even the last answer cannot be, or the tokenizer is a slow
one without offsets, the rendered pieces are tokenised separately, as before this module
tokenised whole conversations.

Truncation keeps the start and cuts the end. A row with no trained token left (its prompt alone
fills ``max_seq_length``) is dropped and counted, never trained as a silent no-op.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import TrainedTurns

__all__ = [
    "EncodedExample",
    "EncodingStats",
    "encode_example",
    "encode_examples",
    "end_of_turn_token_ids",
    "render_prompt",
    "chat_token_ids",
    "encode_answer",
]


@dataclass
class EncodedExample:
    input_ids: list[int]
    completion_mask: list[int]
    prompt_length: int  # tokens before the first trained token (after truncation)
    full_length: int  # tokens before truncation
    truncated: bool  # the end of the row was cut
    answer_lost: bool  # no trained token survived truncation: the row is unusable
    untrained_turns: int = 0  # answers meant to be trained that the template's rendering did not let us locate

    def as_row(self) -> dict[str, Any]:
        return {"input_ids": self.input_ids, "completion_mask": self.completion_mask}


@dataclass
class EncodingStats:
    rows: int = 0
    truncated: int = 0
    answer_lost: int = 0
    lengths: list[int] = field(default_factory=list)  # untruncated token counts
    answer_tokens: int = 0
    untrained_turns: int = 0

    def add(self, enc: EncodedExample) -> None:
        self.rows += 1
        self.truncated += int(enc.truncated and not enc.answer_lost)
        self.answer_lost += int(enc.answer_lost)
        self.lengths.append(enc.full_length)
        self.answer_tokens += sum(enc.completion_mask)
        self.untrained_turns += enc.untrained_turns

    def summary(self) -> dict[str, Any]:
        lengths = sorted(self.lengths)

        def pct(p: float) -> int:
            return lengths[min(len(lengths) - 1, int(p * len(lengths)))] if lengths else 0

        return {
            "rows": self.rows,
            "truncated_rows": self.truncated,
            "answer_lost_rows": self.answer_lost,
            "answer_tokens": self.answer_tokens,
            "untrained_turns": self.untrained_turns,
            "min_tokens": lengths[0] if lengths else 0,
            "median_tokens": pct(0.5),
            "p95_tokens": pct(0.95),
            "max_tokens": lengths[-1] if lengths else 0,
            "mean_tokens": round(sum(lengths) / len(lengths), 1) if lengths else 0.0,
        }


def chat_token_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of messages through the chat template (transformers 5 returns a BatchEncoding for tokenize=True)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def encode_answer(tokenizer, prompt: list[dict], answer: list[dict], max_length: int) -> tuple[list[int], int]:
    """(token ids of prompt + answer through the chat template, where the answer starts), cut to ``max_length``.

    The answer starts where the tokenised prompt (with the generation prompt) and prompt + answer diverge, as in
    TRL's preference trainers, so the scored tokens are the ones they train.
    """
    prompt_ids = chat_token_ids(tokenizer, prompt, add_generation_prompt=True)
    full = chat_token_ids(tokenizer, prompt + answer)
    start = next((i for i, (a, b) in enumerate(zip(prompt_ids, full)) if a != b), min(len(prompt_ids), len(full)))
    return full[:max_length], min(start, max_length)


def render_prompt(tokenizer, prompt: list[dict]) -> str:
    """The prompt text the model sees at inference (ends with the assistant header)."""
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def _render(tokenizer, turns: list[dict]) -> str:
    return tokenizer.apply_chat_template(turns, tokenize=False)


@dataclass(frozen=True)
class _Span:
    """Where one trained answer lies in the rendered conversation (character offsets)."""

    start: int  # end of the generation prompt: the first character the model must produce
    text_end: int  # end of the answer's own text (== start when the template rewrote it beyond recognition)
    turn_end: int  # end of the rendered turn: the end-of-turn token is searched for in [text_end, turn_end)


def _spans(tokenizer, turns: list[dict], trained: list[int], full: str) -> list[_Span | None]:
    """The span of each trained turn, or None where the rendering does not reveal it (not prefix-consistent)."""
    spans: list[_Span | None] = []
    last = len(turns) - 1
    for k in trained:
        before = render_prompt(tokenizer, turns[:k])
        upto = full if k == last else _render(tokenizer, turns[: k + 1])
        if not (full.startswith(upto) and upto.startswith(before)):
            spans.append(None)
            continue
        at = upto.find(turns[k]["content"], len(before))
        text_end = at + len(turns[k]["content"]) if at >= 0 else len(before)
        spans.append(_Span(len(before), text_end, len(upto)))
    return spans


def _special_ids(tokenizer) -> set[int]:
    """Ids of the special (added) tokens: the candidates for a template's end-of-turn token."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special)
    return ids


def _mask_from_offsets(
    ids: list[int], offsets: list[tuple[int, int]], spans: list[_Span], special: set[int], eos_id: int | None
) -> tuple[list[int], list[int]]:
    """(input_ids, completion_mask) of one tokenised conversation: every token overlapping an answer's text,
    through its end-of-turn token, is trained; an EOS is inserted after an answer whose template emits none."""
    mask = [0] * len(ids)
    insert_after: list[int] = []  # token indices after which a trained EOS goes

    def overlapping(begin: int, end: int) -> list[int]:
        return [i for i, (a, b) in enumerate(offsets) if b > begin and a < end]

    for span in spans:
        answer = overlapping(span.start, span.text_end)
        after = answer[-1] + 1 if answer else next((i for i, (a, _) in enumerate(offsets) if a >= span.start), 0)
        end_of_turn = None
        for i in range(after, len(ids)):
            if offsets[i][0] >= span.turn_end:
                break
            if ids[i] in special:
                end_of_turn = i
                break
        if end_of_turn is not None:
            first = answer[0] if answer else after
            mask[first : end_of_turn + 1] = [1] * (end_of_turn + 1 - first)
            continue
        # No end-of-turn token: the answer's text (the whole turn when its text was not found) plus an EOS.
        answer = answer or overlapping(span.start, span.turn_end)
        if answer:
            mask[answer[0] : answer[-1] + 1] = [1] * (answer[-1] + 1 - answer[0])
            if eos_id is not None:
                insert_after.append(answer[-1])
    if not insert_after:
        return list(ids), mask
    out_ids: list[int] = []
    out_mask: list[int] = []
    pending = set(insert_after)
    for i, (token, m) in enumerate(zip(ids, mask)):
        out_ids.append(token)
        out_mask.append(m)
        if i in pending:
            out_ids.append(eos_id)
            out_mask.append(1)
    return out_ids, out_mask


def _mask_from_pieces(
    tokenizer, full: str, spans: list[_Span], special: set[int], eos_id: int | None
) -> tuple[list[int], list[int]]:
    """The fallback without offsets: each untrained stretch and each answer tokenised on its own. An answer is
    trained through its first special token; the rest of its piece is not."""
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    for span in spans:
        pieces.append((full[cursor : span.start], False))
        pieces.append((full[span.start : span.turn_end], True))
        cursor = span.turn_end
    pieces.append((full[cursor:], False))
    texts = [text for text, _ in pieces]
    ids_per_piece = _batch_ids(tokenizer, texts)
    ids: list[int] = []
    mask: list[int] = []
    for (_, is_answer), piece in zip(pieces, ids_per_piece):
        if not is_answer:
            ids += piece
            mask += [0] * len(piece)
            continue
        stop = next((i for i, t in enumerate(piece) if t in special), None)
        if stop is None:
            trained, rest = piece + ([eos_id] if eos_id is not None else []), []
        else:
            trained, rest = piece[: stop + 1], piece[stop + 1 :]
        ids += trained + rest
        mask += [1] * len(trained) + [0] * len(rest)
    return ids, mask


def _mask_by_common_prefix(tokenizer, turns: list[dict], full: str, eos_id: int | None, special: set[int]):
    """The last resort for a template that renders the prompt differently alone: the last answer is what follows
    the longest common token prefix of the prompt and the whole conversation."""
    prompt_ids, full_ids = _batch_ids(tokenizer, [render_prompt(tokenizer, turns[:-1]), full])
    common = 0
    for a, b in zip(prompt_ids, full_ids):
        if a != b:
            break
        common += 1
    answer = full_ids[common:]
    stop = next((i for i, t in enumerate(answer) if t in special), None)
    if stop is None:
        trained, rest = answer + ([eos_id] if eos_id is not None else []), []
    else:
        trained, rest = answer[: stop + 1], answer[stop + 1 :]
    return full_ids[:common] + trained + rest, [0] * common + [1] * len(trained) + [0] * len(rest)


def encode_example(
    tokenizer, example: dict, max_seq_length: int, trained_turns: TrainedTurns = TrainedTurns.ALL
) -> EncodedExample:
    return encode_examples(tokenizer, [example], max_seq_length, trained_turns)[0]


def encode_examples(
    tokenizer,
    examples: list[dict],
    max_seq_length: int,
    trained_turns: TrainedTurns = TrainedTurns.ALL,
    chunk: int = 1024,
) -> list[EncodedExample]:
    """:func:`encode_example` for many rows: templates rendered per row, token ids in batched tokenizer calls.

    The tokenizer runs once per ``chunk`` conversations (its Rust core batches them, in parallel threads unless
    ``TOKENIZERS_PARALLELISM=false``); the chat template stays per row (Jinja).
    """
    special = _special_ids(tokenizer)
    eos_id = tokenizer.eos_token_id
    fast = bool(getattr(tokenizer, "is_fast", False))
    out: list[EncodedExample] = []
    for begin in range(0, len(examples), chunk):
        part = examples[begin : begin + chunk]
        conversations = [ex["prompt"] + ex["completion"] for ex in part]
        fulls = [_render(tokenizer, turns) for turns in conversations]
        located = []
        for turns, full in zip(conversations, fulls):
            if trained_turns is TrainedTurns.LAST:
                trained = [len(turns) - 1]
            else:
                trained = [k for k, turn in enumerate(turns) if turn["role"] == "assistant"]
            located.append(_spans(tokenizer, turns, trained, full))
        encoded = tokenizer(fulls, add_special_tokens=False, return_offsets_mapping=True) if fast else None
        for i, (turns, full) in enumerate(zip(conversations, fulls)):
            spans = [span for span in located[i] if span is not None]
            missed = len(located[i]) - len(spans)
            if located[i][-1] is None:
                # Not even the last answer is where the prompt alone ends: train it alone, by the token prefix.
                ids, mask = _mask_by_common_prefix(tokenizer, turns, full, eos_id, special)
                missed = len(located[i]) - 1
            elif fast:
                ids, mask = _mask_from_offsets(
                    encoded["input_ids"][i], encoded["offset_mapping"][i], spans, special, eos_id
                )
            else:
                ids, mask = _mask_from_pieces(tokenizer, full, spans, special, eos_id)
            out.append(_truncate(ids, mask, max_seq_length, missed))
    return out


_PROBE = {
    "prompt": [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi"},
        {"role": "user", "content": "Bye"},
    ],
    "completion": [{"role": "assistant", "content": "Goodbye"}],
}


def end_of_turn_token_ids(tokenizer) -> list[int]:
    """The token id(s) that end an assistant turn in this tokenizer's chat template: the special tokens that
    training puts in the loss (the end-of-turn token, or the EOS inserted when the template emits none).

    Generation stops on these: the model was trained to emit them at the end of each answer.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    try:
        enc = encode_example(tokenizer, _PROBE, max_seq_length=1 << 20)
    except Exception:  # a template that refuses the probe (e.g. it requires a system turn): no better guess
        return eos
    special = _special_ids(tokenizer)
    found = {t for t, m in zip(enc.input_ids, enc.completion_mask) if m and t in special}
    return sorted(found) or eos


def _batch_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    # Special tokens come from the template text itself; the tokenizer must not add BOS/EOS again.
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _truncate(ids: list[int], mask: list[int], max_seq_length: int, untrained_turns: int) -> EncodedExample:
    kept_ids, kept_mask = ids[:max_seq_length], mask[:max_seq_length]
    prompt_length = next((i for i, m in enumerate(kept_mask) if m), len(kept_mask))
    return EncodedExample(
        input_ids=kept_ids,
        completion_mask=kept_mask,
        prompt_length=prompt_length,
        full_length=len(ids),
        truncated=len(ids) > max_seq_length,
        answer_lost=not any(kept_mask),
        untrained_turns=untrained_turns,
    )
