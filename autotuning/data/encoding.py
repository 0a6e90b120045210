"""Turn normalised rows into token ids and a completion mask, with the model's chat template.

The prompt is rendered with ``add_generation_prompt=True`` exactly as it will be at inference,
and the answer tokens are what follows it in the rendered conversation. Only the answer tokens
(``completion_mask == 1``) are trained; TRL's SFTTrainer turns the mask into labels (-100
elsewhere). The answer ends on the tokenizer's EOS token so the model learns to stop: template
text after the EOS (e.g. a trailing newline) is not trained, and an EOS is appended when the
template emits none.

Truncation keeps the start (the whole prompt where possible) and cuts the end of the answer.
A row whose prompt alone fills ``max_seq_length`` would have no answer left: it is dropped and
counted, never trained as a silent no-op.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["EncodedExample", "EncodingStats", "encode_example", "encode_examples", "render_prompt"]


@dataclass
class EncodedExample:
    input_ids: list[int]
    completion_mask: list[int]
    prompt_length: int  # tokens before the answer (after truncation)
    full_length: int  # tokens before truncation
    truncated: bool  # the end of the answer was cut
    answer_lost: bool  # nothing of the answer survived truncation: the row is unusable

    def as_row(self) -> dict[str, Any]:
        return {"input_ids": self.input_ids, "completion_mask": self.completion_mask}


@dataclass
class EncodingStats:
    rows: int = 0
    truncated: int = 0
    answer_lost: int = 0
    lengths: list[int] = field(default_factory=list)  # untruncated token counts
    answer_tokens: int = 0

    def add(self, enc: EncodedExample) -> None:
        self.rows += 1
        self.truncated += int(enc.truncated and not enc.answer_lost)
        self.answer_lost += int(enc.answer_lost)
        self.lengths.append(enc.full_length)
        self.answer_tokens += sum(enc.completion_mask)

    def summary(self) -> dict[str, Any]:
        lengths = sorted(self.lengths)

        def pct(p: float) -> int:
            return lengths[min(len(lengths) - 1, int(p * len(lengths)))] if lengths else 0

        return {
            "rows": self.rows,
            "truncated_rows": self.truncated,
            "answer_lost_rows": self.answer_lost,
            "answer_tokens": self.answer_tokens,
            "min_tokens": lengths[0] if lengths else 0,
            "median_tokens": pct(0.5),
            "p95_tokens": pct(0.95),
            "max_tokens": lengths[-1] if lengths else 0,
            "mean_tokens": round(sum(lengths) / len(lengths), 1) if lengths else 0.0,
        }


def render_prompt(tokenizer, prompt: list[dict]) -> str:
    """The prompt text the model sees at inference (ends with the assistant header)."""
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def encode_example(tokenizer, example: dict, max_seq_length: int) -> EncodedExample:
    return encode_examples(tokenizer, [example], max_seq_length)[0]


def encode_examples(tokenizer, examples: list[dict], max_seq_length: int, chunk: int = 1024) -> list[EncodedExample]:
    """:func:`encode_example` for many rows: templates rendered per row, token ids in batched tokenizer calls.

    The tokenizer runs once per ``chunk`` texts instead of twice per row (its Rust core batches them, in
    parallel threads unless ``TOKENIZERS_PARALLELISM=false``); the chat template stays per row (Jinja).
    """
    out: list[EncodedExample] = []
    for begin in range(0, len(examples), chunk):
        part = examples[begin : begin + chunk]
        prompts = [render_prompt(tokenizer, ex["prompt"]) for ex in part]
        fulls = [tokenizer.apply_chat_template(ex["prompt"] + ex["completion"], tokenize=False) for ex in part]
        split = [full.startswith(prompt) for prompt, full in zip(prompts, fulls)]
        # Tokenise the two parts separately: the boundary is exactly where generation starts at inference.
        texts = prompts + [full[len(prompt) :] if ok else full for prompt, full, ok in zip(prompts, fulls, split)]
        ids = _batch_ids(tokenizer, texts)
        for i in range(len(part)):
            prompt_ids, second = ids[i], ids[len(part) + i]
            if split[i]:
                answer_ids = second
            else:
                # Templates that render the prompt differently alone (rare): use the longest common token prefix.
                common = 0
                for a, b in zip(prompt_ids, second):
                    if a != b:
                        break
                    common += 1
                prompt_ids, answer_ids = second[:common], second[common:]
            out.append(_assemble(prompt_ids, answer_ids, tokenizer.eos_token_id, max_seq_length))
    return out


def _batch_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    # Special tokens come from the template text itself; the tokenizer must not add BOS/EOS again.
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _assemble(prompt_ids: list[int], answer_ids: list[int], eos_id: int | None, max_seq_length: int) -> EncodedExample:
    if eos_id is not None:
        if eos_id in answer_ids:
            answer_ids = answer_ids[: answer_ids.index(eos_id) + 1]  # nothing after the EOS is trained
        else:
            answer_ids = answer_ids + [eos_id]
    full_length = len(prompt_ids) + len(answer_ids)
    ids = (prompt_ids + answer_ids)[:max_seq_length]
    prompt_length = min(len(prompt_ids), max_seq_length)
    mask = [0] * prompt_length + [1] * (len(ids) - prompt_length)
    return EncodedExample(
        input_ids=ids,
        completion_mask=mask,
        prompt_length=prompt_length,
        full_length=full_length,
        truncated=full_length > max_seq_length,
        answer_lost=len(ids) == prompt_length,
    )
