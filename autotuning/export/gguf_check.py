"""Running a GGUF file in llama.cpp and comparing it with the merged torch model: the check every GGUF export gets.

Every file is loaded by llama.cpp itself (f32 KV cache) and compared with merged/ (:mod:`.verify`): llama.cpp's
tokenisation of a multilingual text against the HF tokenizer's; the chat prompt rendered from the template
embedded in the GGUF, tokenised by llama.cpp, against the HF template's ids; the logits at every position of that
prompt (a relative bound per type), greedy agreement; and the template's end-of-turn token being one llama.cpp
stops generation on. llama-cpp-python is optional (the ``llama-cpp`` extra): without it a file is never verified.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM
from transformers.utils.chat_template_utils import render_jinja_template

from ..concurrency import MODEL_LOADING
from ..data.encoding import end_of_turn_token_ids
from .verify import GREEDY_TOKENS, PARITY_CONVERSATION, also_require, hf_reference, judge, parity_ids

__all__ = ["CHECK_TEXT", "LLAMA_CPP_EXTRA", "LLAMA_CPP_FIX", "has_llama_cpp", "merged_reference", "verify_gguf"]

# The extra in pyproject.toml that brings llama-cpp-python: the quantizer and the check that runs a GGUF in llama.cpp.
LLAMA_CPP_EXTRA = "llama-cpp"
LLAMA_CPP_FIX = (
    f"install the {LLAMA_CPP_EXTRA} extra: pip install '.[{LLAMA_CPP_EXTRA}]' in the autotuning folder "
    "(llama-cpp-python 0.3.36, a ~5 minute source build)"
)
CHECK_TEXT = "Hello world! Ça va? 你好, мир. 12345 + 678 = 13023\n\tdef f(x): return x"


def has_llama_cpp() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def _render_embedded_template(template: str, tokenizer) -> str:
    """The check conversation rendered by the chat template stored in the GGUF, the way llama.cpp's chat
    front ends do: Jinja with the model's BOS/EOS strings and the generation prompt."""

    rendered, _ = render_jinja_template(
        conversations=[PARITY_CONVERSATION],
        chat_template=template,
        add_generation_prompt=True,
        bos_token=tokenizer.bos_token or "",
        eos_token=tokenizer.eos_token or "",
    )
    return rendered[0]


@torch.no_grad()
def merged_reference(merged_dir: Path, tokenizer):
    """merged/'s fp32 logits and greedy tokens on the check prompt (one model in memory, freed after)."""

    with MODEL_LOADING:  # transformers' load patches are process-wide (concurrency.py)
        model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    reference = hf_reference(model, parity_ids(tokenizer), "merged/ (fp32)")
    del model
    return reference


@torch.no_grad()
def verify_gguf(gguf_path: Path, merged_dir: Path, gtype: str, tokenizer, reference=None) -> dict[str, Any]:
    """Run the file in llama.cpp and compare it with merged/ (fp32). Never raises on a failed check.

    ``reference`` (:func:`merged_reference`) is computed when not given; one export shares it across types."""

    if not has_llama_cpp():
        return {
            "type": gtype,
            "status": "unverified",
            "verified": False,
            "reason": f"not checked in llama.cpp: llama-cpp-python is not installed ({LLAMA_CPP_FIX})",
        }
    import llama_cpp

    ids = parity_ids(tokenizer)
    if reference is None:
        reference = merged_reference(merged_dir, tokenizer)
    tokens = ids[0].tolist()
    # f32 KV cache (type_k/type_v 0): llama.cpp's default f16 cache moves sharp-attention logits by 2-4% on its
    # own, which would measure the cache, not the file.
    llm = llama_cpp.Llama(
        model_path=str(gguf_path),
        n_ctx=max(512, len(tokens) + GREEDY_TOKENS + 8),
        logits_all=True,
        type_k=0,
        type_v=0,
        verbose=False,
    )
    try:
        template = llm.metadata.get("tokenizer.chat_template", "")
        add_bos = llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model))
        # The chat prompt as a llama.cpp user gets it: the GGUF's own template, llama.cpp's tokenizer (adding BOS
        # where the file says so, unless the template wrote it already).
        prompt = _render_embedded_template(template, tokenizer) if template else ""
        cpp_prompt = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) if prompt else []
        if add_bos and (not cpp_prompt or cpp_prompt[0] != llm.token_bos()):
            cpp_prompt = [llm.token_bos(), *cpp_prompt]
        llm.eval(tokens)
        logits = torch.from_numpy(np.array(llm.scores[: len(tokens)], dtype=np.float32))
        greedy: list[int] = []
        for _ in range(GREEDY_TOKENS):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            greedy.append(token)
            llm.eval([token])
        cpp_ids = llm.tokenize(CHECK_TEXT.encode("utf-8"), add_bos=False, special=True)
        stops = sorted({*end_of_turn_token_ids(tokenizer), tokenizer.eos_token_id} - {None})
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        stop_ok = {t: bool(llama_cpp.llama_vocab_is_eog(vocab, t)) for t in stops}
    finally:
        llm.close()
    result = judge("gguf", gtype, reference, logits[:, : reference.logits.shape[-1]], greedy)
    hf_ids = tokenizer(CHECK_TEXT, add_special_tokens=False)["input_ids"]
    result = {
        "type": gtype,
        "checked_in": f"llama.cpp (llama-cpp-python {llama_cpp.__version__}, f32 KV cache)",
        **result,
        "tokenizer_ids_match": cpp_ids == hf_ids,
        "chat_template_present": bool(template) and template == (tokenizer.chat_template or ""),
        "chat_prompt_ids_match": cpp_prompt == tokens,
        "end_of_turn_stops": {str(k): v for k, v in stop_ok.items()},
        "eos_token_id": tokenizer.eos_token_id,
    }
    if not result["chat_prompt_ids_match"] and cpp_prompt:
        at = next((i for i, (a, b) in enumerate(zip(cpp_prompt, tokens)) if a != b), min(len(cpp_prompt), len(tokens)))
        result["chat_prompt_difference"] = {
            "position": at,
            "llama_cpp": cpp_prompt[max(0, at - 2) : at + 3],
            "model": tokens[max(0, at - 2) : at + 3],
            "lengths": [len(cpp_prompt), len(tokens)],
        }
    problems = []
    if not result["tokenizer_ids_match"]:
        problems.append("llama.cpp splits text unlike the model's tokenizer (pre-tokenizer in the file)")
    if not result["chat_template_present"]:
        problems.append("the GGUF's chat template is missing or differs from the model's")
    elif not result["chat_prompt_ids_match"]:
        problems.append("the chat prompt from the GGUF's template tokenises unlike the model's")
    if not all(stop_ok.values()):
        problems.append(f"llama.cpp does not stop generation on {[k for k, v in stop_ok.items() if not v]}")
    if problems:
        also_require(result, "tokenizer_metadata", {"verified": False, "reason": "; ".join(problems)})
    return result
