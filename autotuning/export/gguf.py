"""GGUF export (llama.cpp / Ollama) written with the ``gguf`` library, then read back and checked.

No llama.cpp checkout, no compiler and no pip install at run time: tensors are renamed with
``gguf.TensorNameMap``, converted the way llama.cpp's own converter does it (Llama q/k head
permutation, GPT-2 Conv1D transposes), quantized with ``gguf.quants`` (f32, f16, bf16, q8_0) and
written with ``GGUFWriter`` together with the tokenizer (tokens, types, merges, special ids,
add-bos/eos flags, chat template, pre-tokenizer name). k-quants (q4_k_m, q5_k_m, q6_k) go through
llama-cpp-python's quantizer when that optional extra is installed.

Verification reloads the file with transformers (``from_pretrained(dir, gguf_file=...)``), which
reads GGUF independently of our writer, and compares logits, greedy decodes and tokenizer ids
with the merged torch model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, ExportError

__all__ = [
    "GGUF_TYPES",
    "SUPPORTED_GGUF_ARCHITECTURES",
    "check_gguf_supported",
    "write_gguf",
    "export_gguf",
    "verify_gguf",
    "ollama_modelfile",
    "LLAMA_CPP_EXTRA",
    "K_QUANT_FIX",
]

log = logging.getLogger(__name__)

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k")
_K_QUANTS = {"q4_k_m", "q5_k_m", "q6_k"}
# The extra in pyproject.toml that brings llama-cpp-python: k-quants and the check that runs a GGUF in llama.cpp.
LLAMA_CPP_EXTRA = "llama-cpp"
K_QUANT_FIX = (
    f"install the {LLAMA_CPP_EXTRA} extra: pip install '.[{LLAMA_CPP_EXTRA}]' in the autotuning folder "
    "(llama-cpp-python 0.3.36, a ~5 minute source build), or use q8_0, f16, bf16 or f32"
)
F32_TOLERANCE = 1e-4
CHECK_TEXT = "Hello world! Ça va? 你好, мир. 12345 + 678 = 13023\n\tdef f(x): return x"


@dataclass(frozen=True)
class _Arch:
    gguf_name: str  # general.architecture in the file
    permute_qk: bool  # llama.cpp's llama/mistral rope layout needs the q/k head permutation
    family: str  # how hyper-parameters are read: "llama" (LlamaConfig-like) or "gpt2"


# HF model_type -> how to write it. Gemma (norm offsets, embedding scale) needs extra conversions that are
# not implemented yet. Phi-3 files written the same way read back in transformers but llama.cpp refuses
# their vocabulary, so Phi-3 stays off the list until that is understood. Both fail in pre-flight.
SUPPORTED_GGUF_ARCHITECTURES: dict[str, _Arch] = {
    "llama": _Arch("llama", True, "llama"),
    "mistral": _Arch("llama", True, "llama"),
    "qwen2": _Arch("qwen2", False, "llama"),
    "qwen3": _Arch("qwen3", False, "llama"),
    "gpt2": _Arch("gpt2", False, "gpt2"),
}


def check_gguf_supported(model_type: str, where: str = "field 'save_format'") -> _Arch:
    arch = SUPPORTED_GGUF_ARCHITECTURES.get(model_type)
    if arch is None:
        raise ConfigError(
            f"GGUF export does not support the '{model_type}' architecture",
            where,
            f"supported: {', '.join(sorted(SUPPORTED_GGUF_ARCHITECTURES))}; remove gguf from save_format for this model",
        )
    return arch


# --------------------------------------------------------------------------- tensors


def _permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's q/k row permutation (HF rotates halves; GGML's llama rope rotates pairs)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _checkpoint_tensors(merged_dir: Path) -> dict[str, tuple[Path, list[int]]]:
    """Every tensor name of the saved model -> (the safetensors file that holds it, its shape); no data read."""
    from safetensors import safe_open

    files = sorted(merged_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(
            "the merged export has no .safetensors weights", str(merged_dir), "export torch again (safetensors)"
        )
    where: dict[str, tuple[Path, list[int]]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has keys(), no __iter__)
                where[name] = (file, list(f.get_slice(name).get_shape()))
    return where


def _dropped(name: str, arch: _Arch, cfg) -> bool:
    """Tensors llama.cpp has no use for: GPT-2's causal-mask buffers, an LM head tied to the embeddings."""
    if arch.family == "gpt2" and name.endswith((".attn.bias", ".attn.masked_bias")):
        return True
    return name == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False)


def _transposed(name: str, arch: _Arch) -> bool:
    return arch.family == "gpt2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight"))


def _convert(name: str, data: np.ndarray, arch: _Arch, cfg) -> np.ndarray:
    """One tensor in llama.cpp's layout (fp32)."""
    if _transposed(name, arch):
        data = data.T  # Conv1D stores (in, out)
    if arch.permute_qk and name.endswith("self_attn.q_proj.weight"):
        data = _permute(data, cfg.num_attention_heads, cfg.num_attention_heads)
    elif arch.permute_qk and name.endswith("self_attn.k_proj.weight"):
        data = _permute(data, cfg.num_attention_heads, cfg.num_key_value_heads)
    return np.ascontiguousarray(data)


def _read(file: Path, name: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(name).float().numpy()


def _storage(shape, name: str, gtype: str):
    """How one tensor is stored: "f32", "f16" or a gguf quantization type. Norms, biases and 1-D tensors stay
    f32, like llama.cpp; q8_0 needs rows in blocks of 32 values, else the tensor is kept as f16."""
    import gguf

    if len(shape) < 2 or gtype == "f32" or name.endswith(".bias") or "norm" in name:
        return "f32"
    if gtype == "f16":
        return "f16"
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[gtype]
    if qtype == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % 32:
        return "f16"
    return qtype


def _encode(data: np.ndarray, name: str, gtype: str):
    """(array to write, raw dtype or None)."""
    import gguf

    kind = _storage(data.shape, name, gtype)
    if kind == "f32":
        return data.astype(np.float32), None
    if kind == "f16":
        return data.astype(np.float16), None
    return gguf.quants.quantize(data.astype(np.float32), kind), kind


def _encoded_info(shape, name: str, gtype: str):
    """(shape, dtype, bytes, raw dtype) that :func:`_encode` will produce, without the data."""
    import gguf

    kind = _storage(shape, name, gtype)
    count = int(np.prod(shape))
    if kind == "f32":
        return tuple(shape), np.dtype(np.float32), 4 * count, None
    if kind == "f16":
        if gtype == "q8_0":
            log.info("gguf: %s has rows of %d values (not a multiple of 32): kept as f16", name, shape[-1])
        return tuple(shape), np.dtype(np.float16), 2 * count, None
    byte_shape = tuple(gguf.quants.quant_shape_to_byte_shape(tuple(shape), kind))
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), kind


# --------------------------------------------------------------------------- tokenizer


def _pre_tokenizer_name(tokenizer_json: dict, model_type: str) -> str:
    """llama.cpp's name for how text is split before BPE, from the HF pre-tokenizer definition."""
    pre = json.dumps(tokenizer_json.get("pre_tokenizer") or {})
    if "\\\\p{N}{1,3}" in pre or "\\p{N}{1,3}" in pre:
        return "llama-bpe"  # Llama 3 style: numbers in groups of up to 3
    if "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in pre and "\\p{N}|" in pre.replace("\\\\", "\\"):
        return "qwen2"
    if '"Digits"' in pre:
        return "smollm"
    if model_type == "gpt2" or '"ByteLevel"' in pre:
        return "gpt-2"
    return "default"


def _add_tokenizer(writer, tokenizer, source_dir: Path, n_vocab: int, model_type: str) -> None:
    import gguf

    tok_json_path = source_dir / "tokenizer.json"
    if not tok_json_path.is_file():
        raise ExportError(
            "GGUF export needs a fast tokenizer (tokenizer.json)",
            str(source_dir),
            "use a model whose tokenizer ships tokenizer.json",
        )
    tok_json = json.loads(tok_json_path.read_text(encoding="utf-8"))
    if (tok_json.get("model") or {}).get("type") != "BPE":
        raise ExportError(
            f"GGUF export supports byte-level BPE tokenizers; this one is {(tok_json.get('model') or {}).get('type')}",
            str(tok_json_path),
            "use a model with a BPE tokenizer (Llama 3, Qwen, SmolLM, GPT-2 families)",
        )
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tok_json, model_type))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(source_dir, load_merges=True, n_vocab=n_vocab)
    special.add_to_gguf(writer)
    if not special.chat_template and getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


# --------------------------------------------------------------------------- writing


def _add_hparams(writer, arch: _Arch, cfg, n_vocab: int, gtype: str) -> None:
    import gguf

    if arch.family == "gpt2":
        writer.add_context_length(cfg.n_positions)
        writer.add_embedding_length(cfg.n_embd)
        writer.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
        writer.add_block_count(cfg.n_layer)
        writer.add_head_count(cfg.n_head)
        writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        rope_theta = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
        if rope_theta:
            writer.add_rope_freq_base(float(rope_theta))
        writer.add_rope_dimension_count(head_dim)
        if arch.gguf_name == "qwen3":
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
    writer.add_vocab_size(n_vocab)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[gtype]
    writer.add_file_type(file_type)


def write_gguf(merged_dir: Path, out_path: Path, gtype: str = "f32", name: str = "") -> dict[str, Any]:
    """Write ``merged_dir`` (a saved HF model + tokenizer) as GGUF of type f32/f16/bf16/q8_0.

    Tensors stream from the safetensors files to the GGUF file one at a time: the header (every tensor's
    shape, type and size) is computed from the checkpoint's shapes alone, then each tensor is read,
    converted, quantized and written before the next is read. Peak memory is about one tensor in fp32.
    """
    import gguf
    from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast

    cfg = AutoConfig.from_pretrained(merged_dir)
    arch = check_gguf_supported(cfg.model_type)
    try:
        tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    except Exception:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(merged_dir)
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_name.upper()], cfg.num_hidden_layers)
    plan: list[tuple[str, str, Path, list[int]]] = []  # (HF name, GGUF name, file, shape in the file)
    for hf_name, (file, shape) in _checkpoint_tensors(merged_dir).items():
        if _dropped(hf_name, arch, cfg):
            continue
        new_name = tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ExportError(
                f"no GGUF name for tensor '{hf_name}'",
                str(merged_dir),
                "this model variant is not supported for GGUF yet",
            )
        plan.append((hf_name, new_name, file, shape))

    writer = gguf.GGUFWriter(str(out_path), arch.gguf_name)
    # general.name is free text, but transformers' reader treats a name equal to "mistral" as a
    # different architecture: a suffix keeps any run name from colliding with that.
    writer.add_name(f"{name or merged_dir.name} (autotuning)")
    n_vocab = None
    for hf_name, new_name, _file, shape in plan:  # the header lists every tensor (shape, type, size) first
        shape = shape[::-1] if _transposed(hf_name, arch) else shape
        if new_name == "token_embd.weight":
            n_vocab = shape[0]
        out_shape, dtype, nbytes, raw_dtype = _encoded_info(shape, new_name, gtype)
        writer.add_tensor_info(new_name, out_shape, dtype, nbytes, raw_dtype=raw_dtype)
    if n_vocab is None:
        raise ExportError("the model has no token embedding tensor", str(merged_dir), "export torch again")
    _add_hparams(writer, arch, cfg, n_vocab, gtype)
    _add_tokenizer(writer, tokenizer, merged_dir, n_vocab, cfg.model_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for hf_name, new_name, file, _shape in plan:  # then the data, one tensor in memory at a time
        array, _raw = _encode(_convert(hf_name, _read(file, hf_name), arch, cfg), new_name, gtype)
        writer.write_tensor_data(array)  # checks the size against the header
        del array
    writer.close()
    return {
        "tensors": len(plan),
        "architecture": arch.gguf_name,
        "pre_tokenizer": _pre_tokenizer_name(
            json.loads((merged_dir / "tokenizer.json").read_text(encoding="utf-8")), cfg.model_type
        ),
    }


def _k_quantize(src: Path, dst: Path, gtype: str) -> None:
    """k-quants through llama-cpp-python (optional extra): llama.cpp's own quantizer."""
    try:
        import llama_cpp
    except ImportError:
        raise ConfigError(
            f"GGUF type {gtype} needs the optional llama-cpp-python package",
            "field 'gguf_type'",
            K_QUANT_FIX,
        ) from None
    ftype = {
        "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
        "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
        "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
    }[gtype]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    # Rows too short for a k-quant block are kept at a valid fallback type by llama.cpp itself.
    code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if code != 0:
        raise ExportError(f"llama.cpp quantization to {gtype} failed (code {code})", str(dst), "try q8_0")
    _log_fallbacks(dst, gtype)


def _log_fallbacks(path: Path, gtype: str) -> dict[str, int]:
    """Say which 2-D tensors llama.cpp kept at another type (rows shorter than a k-quant block of 256)."""
    import gguf

    target = {"q4_k_m": ("Q4_K", "Q6_K", "Q5_K"), "q5_k_m": ("Q5_K", "Q6_K"), "q6_k": ("Q6_K",)}[gtype]
    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        kind = tensor.tensor_type.name
        if len(tensor.shape) >= 2 and kind not in target:
            counts[kind] = counts.get(kind, 0) + 1
    if counts:
        log.info(
            "gguf %s: rows too short for a k-quant block, so llama.cpp used a fallback type for %s",
            gtype,
            ", ".join(f"{n} tensors ({k})" for k, n in sorted(counts.items())),
        )
    return counts


# --------------------------------------------------------------------------- verification


def _greedy(model, ids: torch.Tensor, steps: int = 32) -> list[int]:
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False, min_new_tokens=steps
    )
    return out[0, ids.shape[1] :].tolist()


@torch.no_grad()
def verify_gguf(gguf_path: Path, merged_dir: Path, gtype: str, tokenizer) -> dict[str, Any]:
    """Reload with transformers' GGUF reader and compare with the merged torch model."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(merged_dir)
    extra = {"n_positions": cfg.n_positions} if cfg.model_type == "gpt2" else {}
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Give me one tip for learning to cook."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    # One model in memory at a time: the reference's logits and greedy tokens first, then the GGUF's.
    reference = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    ref_logits, ref_tokens = reference(input_ids=ids).logits, _greedy(reference, ids)
    del reference
    reloaded = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, **extra
    ).eval()
    diff = float((ref_logits - reloaded(input_ids=ids).logits).abs().max())
    gguf_tokens = _greedy(reloaded, ids)
    del reloaded
    agree = 0
    for a, b in zip(ref_tokens, gguf_tokens):
        if a != b:
            break
        agree += 1
    # Tokenizer: transformers rebuilds it from the GGUF metadata alone.
    gguf_tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    ids_hf = tokenizer(CHECK_TEXT, add_special_tokens=False)["input_ids"]
    ids_gguf = gguf_tok(CHECK_TEXT, add_special_tokens=False)["input_ids"]
    reader = gguf.GGUFReader(str(gguf_path))

    def field(key: str):
        f = reader.get_field(key)
        return None if f is None else f.contents()

    template = field("tokenizer.chat_template") or ""
    eos_id = field("tokenizer.ggml.eos_token_id")
    result = {
        "type": gtype,
        "max_abs_logit_diff": diff,
        "greedy_agreement_tokens": agree,
        "greedy_tokens": len(ref_tokens),
        "tokenizer_ids_match": ids_hf == ids_gguf,
        "chat_template_present": bool(template) and template == (tokenizer.chat_template or ""),
        "eos_token_id": eos_id,
        "eos_matches": eos_id == tokenizer.eos_token_id,
    }
    if gtype == "f32" and not diff <= F32_TOLERANCE:
        raise ExportError(
            f"the f32 GGUF's logits differ from the torch model's by {diff:.3g} (> {F32_TOLERANCE})",
            str(gguf_path),
            "report this as a bug; the torch export is unaffected",
        )
    if not (result["tokenizer_ids_match"] and result["chat_template_present"] and result["eos_matches"]):
        raise ExportError(
            "the GGUF's tokenizer metadata does not match the model's "
            f"(ids match {result['tokenizer_ids_match']}, chat template {result['chat_template_present']}, "
            f"eos {result['eos_matches']})",
            str(gguf_path),
            "report this as a bug with the model id",
        )
    result.update(_verify_with_llama_cpp(gguf_path, ids, ref_tokens, tokenizer))
    if result.get("llama_cpp_tokenizer_ids_match") is False:
        raise ExportError(
            "llama.cpp splits text differently from the model's tokenizer (pre-tokenizer "
            f"'{field('tokenizer.ggml.pre')}')",
            str(gguf_path),
            "report this as a bug with the model id; the file would produce garbage in llama.cpp and Ollama",
        )
    return result


def _verify_with_llama_cpp(gguf_path: Path, ids: torch.Tensor, ref_tokens: list[int], tokenizer=None) -> dict[str, Any]:
    """Run the file in llama.cpp itself when llama-cpp-python is installed; say so when it is not."""
    try:
        import llama_cpp
    except ImportError:
        return {"llama_cpp": f"skipped: llama-cpp-python is not installed (optional extra {LLAMA_CPP_EXTRA})"}
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=512, logits_all=False, verbose=False)
    tokens = ids[0].tolist()
    out = []
    for token in llm.generate(tokens, temp=0.0, top_k=1):
        out.append(token)
        if len(out) >= len(ref_tokens):
            break
    agree = 0
    for a, b in zip(ref_tokens, out):
        if a != b:
            break
        agree += 1
    result: dict[str, Any] = {"llama_cpp": "ran", "llama_cpp_greedy_agreement_tokens": agree}
    if tokenizer is not None:
        # llama.cpp splits text with the pre-tokenizer named in the file: the ids must match the HF tokenizer's.
        cpp_ids = llm.tokenize(CHECK_TEXT.encode("utf-8"), add_bos=False, special=True)
        result["llama_cpp_tokenizer_ids_match"] = (
            cpp_ids == tokenizer(CHECK_TEXT, add_special_tokens=False)["input_ids"]
        )
    return result


# --------------------------------------------------------------------------- Ollama


def ollama_modelfile(gguf_name: str, tokenizer) -> str:
    """An Ollama Modelfile: the GGUF, its chat template (Go syntax) and stop tokens."""
    template = getattr(tokenizer, "chat_template", "") or ""
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    lines = [f"FROM ./{gguf_name}"]
    if "<|im_start|>" in template:
        stops.append("<|im_end|>")
        lines.append(
            'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
            '<|im_start|>assistant\n"""'
        )
    elif "<|start_header_id|>" in template:
        stops.append("<|eot_id|>")
        lines.append(
            'TEMPLATE """{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
            '{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"""'
        )
    else:
        lines.append("# The chat template is stored in the GGUF (tokenizer.chat_template); Ollama reads it from there.")
    for stop in dict.fromkeys(stops):
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"


def export_gguf(run, tokenizer, gtype: str = "f32") -> dict[str, Any]:
    """Write ``gguf/model-<type>.gguf`` and a Modelfile from the verified ``merged/`` export."""
    if gtype not in GGUF_TYPES:
        raise ConfigError(f"unknown GGUF type '{gtype}'", "field 'gguf_type'", f"use one of: {', '.join(GGUF_TYPES)}")
    merged = run.merged
    if not (merged / "config.json").is_file():
        raise ExportError(
            "GGUF export starts from the merged torch export, which is missing", str(merged), "export torch first"
        )
    final_dir = run.path / "gguf"
    tmp_dir = run.path / ".gguf.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    name = f"model-{gtype}.gguf"
    try:
        if gtype in _K_QUANTS:
            base = tmp_dir / "model-f32.gguf"
            info = write_gguf(merged, base, "f32", run.path.name)
            _k_quantize(base, tmp_dir / name, gtype)
            base.unlink()
            verify_type = gtype
        else:
            info = write_gguf(merged, tmp_dir / name, gtype, run.path.name)
            verify_type = gtype
        figures = verify_gguf(tmp_dir / name, merged, verify_type, tokenizer)
        (tmp_dir / "Modelfile").write_text(ollama_modelfile(name, tokenizer), encoding="utf-8")
        final_dir.mkdir(exist_ok=True)
        for item in tmp_dir.iterdir():
            os.replace(item, final_dir / item.name)  # a good earlier export is replaced only by a verified one
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    path = final_dir / name
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "modelfile": str(final_dir / "Modelfile"),
        **info,
        **figures,
    }
