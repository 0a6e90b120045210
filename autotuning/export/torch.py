"""Merged safetensors export: adapter merged into an unquantized base, saved in the base's dtype, checked.

The merge math happens on a freshly loaded fp32 base: merging into 4/8-bit layers would keep them
quantized, which is not the model users want to ship, and fp32 keeps the merge itself exact. The merged
weights are then saved in the base model's own dtype (``dtype``/``torch_dtype`` in its config.json): a
bf16 base gives a bf16 ``merged/``, the size users downloaded, not twice it. The export is written under
a temporary name, reloaded in fp32 (so the check measures what saving did to the weights, not bf16
arithmetic) and compared with the trained model on the parity prompt (:mod:`.verify`); the bound depends
on the saved dtype. A failed check keeps the files, marked unverified.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..concurrency import MODEL_LOADING
from ..errors import ExportError
from ..runs import last_checkpoint
from .verify import (
    PARITY_CONVERSATION,
    also_require,
    hf_greedy,
    hf_logits,
    hf_reference,
    install_export,
    judge,
    parity_ids,
    work_dir,
)

__all__ = ["export_torch", "base_dtype", "SAVED_DTYPES"]

log = logging.getLogger(__name__)

# The dtypes merged/ is saved in; a base in any other dtype (none seen) is saved as float32.
SAVED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def base_dtype(base_path: str, token: str | None = None) -> torch.dtype:
    """The dtype a model's weights are stored in, from its config (``dtype``, or ``torch_dtype`` in older
    files); float32 when the config says nothing."""

    cfg = AutoConfig.from_pretrained(base_path, token=token)
    value = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    name = str(value).removeprefix("torch.") if value is not None else "float32"
    return SAVED_DTYPES.get(name, torch.float32)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_plain_fp32(model) -> bool:
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return False
    base = getattr(model, "base_model", model)
    if getattr(getattr(base, "model", base), "is_quantized", False):
        return False
    return all(p.dtype == torch.float32 for p in model.parameters())


def _adapter_from_last_checkpoint(run) -> None:
    """adapter/ from the last checkpoint, for a run whose export failed before the adapter was saved."""
    checkpoint = last_checkpoint(run.checkpoints)
    if checkpoint is None or not (checkpoint / "adapter_config.json").is_file():
        raise ExportError("the run has no trained adapter", str(run.adapter), "train the run to the end first")
    run.adapter.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(checkpoint / name, run.adapter / name)
    log.info("adapter/ restored from %s", checkpoint)


def _with_adapter(base, adapter: Path):
    """``base`` wrapped with the saved adapter, as ``PeftModel.from_pretrained`` gives it, drawing nothing from the
    process-wide RNG.

    from_pretrained first builds the adapter's layers with a random initialisation (``nn.Linear``'s own, then
    LoRA's), drawn from the global RNG that a training job in another thread of the app draws its dropout masks
    from, and only then loads the saved weights over it: an export from the Export tab would change the running
    job's losses. Here the layers are built on the meta device, where initialising draws nothing (``torch.device``
    as a context is this thread's default only; PEFT's own ``low_cpu_mem_usage`` would patch ``nn.Module`` for every
    thread), and the saved weights are assigned in their place.
    """
    config = PeftConfig.from_pretrained(str(adapter))
    config.inference_mode = True
    with torch.device("meta"):
        model = PeftModel(base, config)
    model.load_adapter(str(adapter), adapter_name="default", low_cpu_mem_usage=True)
    still_meta = [name for name, param in model.named_parameters() if param.is_meta]
    if still_meta:
        raise ExportError(
            f"the saved adapter has no weights for {len(still_meta)} of its layers, e.g. {still_meta[0]}",
            str(adapter),
            "train the run again, or export from its last checkpoint",
        )
    return model


def _merge(with_adapter):
    """Fold the adapter into the base weights (in place, fp32). One function so a test can break it."""
    return with_adapter.merge_and_unload()


def export_torch(
    run, tokenizer, base_path: str, is_peft: bool, trained_model=None, token: str | None = None
) -> dict[str, Any]:
    """Write ``adapter/`` (LoRA runs) and a checked ``merged/``; returns the figures for run.json.

    ``trained_model`` is the model still in memory after training. Without it (exporting an earlier
    run) the reference is the fp32 base with the saved adapter, or the last checkpoint of a full fine-tune.
    A full fine-tune in memory is cast to the saved dtype after its reference logits are taken.
    ``token`` is the run's, for a base model on the Hub (private or gated).
    """

    tmp = work_dir(run.path, "merged")
    ids = parity_ids(tokenizer)
    dtype = base_dtype(base_path, token)
    merge_check = None
    try:
        if is_peft:
            if trained_model is not None:
                adapter_tmp = work_dir(run.path, "adapter")
                trained_model.save_pretrained(adapter_tmp, safe_serialization=True)
                tokenizer.save_pretrained(adapter_tmp)
                shutil.rmtree(run.adapter, ignore_errors=True)
                adapter_tmp.replace(run.adapter)
            if not (run.adapter / "adapter_config.json").is_file():
                _adapter_from_last_checkpoint(run)
            with MODEL_LOADING:  # transformers' load patches are process-wide (concurrency.py)
                base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, token=token)
            with_adapter = _with_adapter(base, run.adapter)
            if trained_model is None or not _is_plain_fp32(trained_model):
                # A quantized or half-precision trained model differs from any fp32 export by its own rounding;
                # the merge itself is checked against the fp32 base + adapter, unmerged (read before merging,
                # which rewrites the base in place: one base load instead of two).
                reference = hf_reference(with_adapter, ids, "fp32 base + adapter (unmerged)")
            else:
                reference = hf_reference(trained_model, ids, "trained model in memory")
            merged = _merge(with_adapter)
            if dtype != torch.float32:
                # The merge itself, in fp32 before saving: held to the fp32 bound, so a merge error stays
                # visible under the rounding of a bf16/fp16 file (~1e-2 of the logits' scale).
                merge_check = judge("torch", "float32", reference, hf_logits(merged, ids), hf_greedy(merged, ids))
        else:
            kind = "trained model in memory"
            if trained_model is None:
                checkpoint = last_checkpoint(run.checkpoints)
                if checkpoint is None:
                    raise ExportError(
                        "the run has no checkpoint to export", str(run.checkpoints), "train the run first"
                    )
                with MODEL_LOADING:  # transformers' load patches are process-wide (concurrency.py)
                    trained_model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
                kind = f"checkpoint {checkpoint.name}"
            reference = hf_reference(trained_model, ids, kind)
            merged = trained_model
        merged.to(dtype)  # the merge was done in fp32; the file keeps the base's dtype
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del merged
        with MODEL_LOADING:  # transformers' load patches are process-wide (concurrency.py)
            reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        figures = judge("torch", _dtype_name(dtype), reference, hf_logits(reloaded, ids), hf_greedy(reloaded, ids))
        if merge_check is not None:
            also_require(figures, "merge_check_fp32", merge_check)
        del reloaded
        # Does a plain AutoTokenizer load give the same ids? (Users will load it that way.)
        try:
            auto_tok = AutoTokenizer.from_pretrained(tmp)
            text = tokenizer.apply_chat_template(PARITY_CONVERSATION, tokenize=False, add_generation_prompt=True)
            tokenizer_match = auto_tok(text, add_special_tokens=False)["input_ids"] == ids[0].tolist()
        except Exception as exc:  # a tokenizer class the environment lacks: report, do not fail the export
            log.warning("AutoTokenizer could not reload the exported tokenizer: %s", exc)
            tokenizer_match = False
        if not tokenizer_match:
            log.warning(
                "AutoTokenizer on %s encodes the check prompt differently from the training tokenizer", run.merged
            )
        where = install_export(tmp, run.merged, figures, fmt="torch", run_dir=run.path, primary="config.json")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(p.name for p in where.iterdir())
    size = sum(p.stat().st_size for p in where.iterdir() if p.is_file())
    return {
        "path": str(where),
        **figures,
        "dtype": _dtype_name(dtype),
        "autotokenizer_ids_match": tokenizer_match,
        "files": files,
        "bytes": size,
    }
