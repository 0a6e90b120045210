"""Merged safetensors export: adapter merged into an unquantized base, reloaded and checked.

The merge always happens on a freshly loaded fp32 base: merging into 4/8-bit layers would keep
them quantized, which is not the model users want to ship. The export is written under a
temporary name, reloaded with ``AutoModelForCausalLM`` and compared with the trained model on a
fixed prompt; only if the logits agree (max abs diff <= 1e-4) does it replace ``merged/``.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

import torch

from ..errors import ExportError

__all__ = ["export_torch", "logits_on", "PARITY_TOLERANCE", "PARITY_PROMPT"]

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
PARITY_PROMPT = [{"role": "user", "content": "Explain in one sentence why the sky looks blue. Ça va? 你好"}]


def _parity_ids(tokenizer) -> torch.Tensor:
    text = tokenizer.apply_chat_template(PARITY_PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


@torch.no_grad()
def logits_on(model, input_ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits of ``model`` on ``input_ids`` in eval mode (training mode restored afterwards), on CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = model(input_ids=input_ids.to(device)).logits.float().cpu()
    if was_training:
        model.train()
    return out


def _is_plain_fp32(model) -> bool:
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return False
    base = getattr(model, "base_model", model)
    if getattr(getattr(base, "model", base), "is_quantized", False):
        return False
    return all(p.dtype == torch.float32 for p in model.parameters())


def export_torch(run, tokenizer, base_path: str, is_peft: bool, trained_model=None) -> dict[str, Any]:
    """Write ``adapter/`` (LoRA runs) and a verified ``merged/``; returns the figures for run.json.

    ``trained_model`` is the model still in memory after training. Without it (exporting an earlier
    run) the reference is the fp32 base with the saved adapter, or the last checkpoint of a full fine-tune.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = run.path / ".merged.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ids = _parity_ids(tokenizer)
    reference_kind = "trained model in memory"
    try:
        if is_peft:
            if trained_model is not None:
                adapter_tmp = run.path / ".adapter.tmp"
                shutil.rmtree(adapter_tmp, ignore_errors=True)
                trained_model.save_pretrained(adapter_tmp, safe_serialization=True)
                tokenizer.save_pretrained(adapter_tmp)
                shutil.rmtree(run.adapter, ignore_errors=True)
                adapter_tmp.replace(run.adapter)
            if not (run.adapter / "adapter_config.json").is_file():
                raise ExportError("the run has no trained adapter", str(run.adapter), "train the run to the end first")
            base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
            with_adapter = PeftModel.from_pretrained(base, str(run.adapter))
            if trained_model is None or not _is_plain_fp32(trained_model):
                # A quantized or half-precision trained model differs from any fp32 export by its own rounding;
                # the merge itself is checked against the fp32 base + adapter, unmerged (read before merging,
                # which rewrites the base in place: one base load instead of two).
                reference_logits = logits_on(with_adapter, ids)
                reference_kind = "fp32 base + adapter (unmerged)"
            else:
                reference_logits = logits_on(trained_model, ids)
            merged = with_adapter.merge_and_unload()
        else:
            if trained_model is None:
                from ..training import last_checkpoint

                checkpoint = last_checkpoint(run.checkpoints)
                if checkpoint is None:
                    raise ExportError(
                        "the run has no checkpoint to export", str(run.checkpoints), "train the run first"
                    )
                trained_model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
                reference_kind = f"checkpoint {checkpoint.name}"
            reference_logits = logits_on(trained_model, ids)
            merged = trained_model
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del merged
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        diff = float((reference_logits - logits_on(reloaded, ids)).abs().max())
        if not diff <= PARITY_TOLERANCE:
            raise ExportError(
                f"the merged model's logits differ from the trained model's by {diff:.3g} (> {PARITY_TOLERANCE})",
                f"{run.merged}",
                "report this as a bug with train.log; the adapter in adapter/ is intact",
            )
        # Does a plain AutoTokenizer load give the same ids? (Users will load it that way.)
        try:
            auto_tok = AutoTokenizer.from_pretrained(tmp)
            text = tokenizer.apply_chat_template(PARITY_PROMPT, tokenize=False, add_generation_prompt=True)
            tokenizer_match = auto_tok(text, add_special_tokens=False)["input_ids"] == ids[0].tolist()
        except Exception as exc:  # a tokenizer class the environment lacks: report, do not fail the export
            log.warning("AutoTokenizer could not reload the exported tokenizer: %s", exc)
            tokenizer_match = False
        if not tokenizer_match:
            log.warning(
                "AutoTokenizer on %s encodes the check prompt differently from the training tokenizer", run.merged
            )
        shutil.rmtree(run.merged, ignore_errors=True)
        tmp.replace(run.merged)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(p.name for p in run.merged.iterdir())
    size = sum(p.stat().st_size for p in run.merged.iterdir() if p.is_file())
    return {
        "path": str(run.merged),
        "max_abs_logit_diff": diff,
        "tolerance": PARITY_TOLERANCE,
        "reference": reference_kind,
        "autotokenizer_ids_match": tokenizer_match,
        "files": files,
        "bytes": size,
    }
