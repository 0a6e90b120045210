"""Answer-token metrics on the held-out split: loss, perplexity, token accuracy and token F1.

Logits at position t predict token t+1, so predictions are ``logits[:, :-1]`` compared with
``labels[:, 1:]`` (the seed compared them unshifted, which scores copying the input). Only answer
positions count (labels != -100). Each batch is reduced to predicted ids at answer positions
before the next one runs, so memory stays bounded by one batch of logits, never the eval set.
"""

from __future__ import annotations

import csv
import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

__all__ = ["shifted_answer_predictions", "evaluate_answers", "save_eval_results", "load_metric"]

_METRICS_DIR = Path(__file__).resolve().parent / "metrics"


def load_metric(name: str):
    """Load one of the evaluate metric modules shipped in autotuning/metrics (works offline)."""
    import evaluate

    return evaluate.load(str(_METRICS_DIR / f"{name}.py"))


def shifted_answer_predictions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(predicted ids, reference ids, per-token loss) at answer positions, with the causal shift.

    Position t's logits are scored against label t+1; positions whose next label is -100 are skipped.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    picked_logits = shift_logits[mask]
    refs = shift_labels[mask]
    losses = torch.nn.functional.cross_entropy(picked_logits, refs, reduction="none")
    return picked_logits.argmax(dim=-1), refs, losses


def _pad(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    longest = max(len(r["input_ids"]) for r in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), longest), dtype=torch.long)
    labels = torch.full((len(batch), longest), -100, dtype=torch.long)
    for i, row in enumerate(batch):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        attn[i, :n] = 1
        mask = torch.tensor(row["completion_mask"], dtype=torch.bool)
        labels[i, :n] = torch.where(mask, ids[i, :n], torch.tensor(-100))
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


@torch.no_grad()
def evaluate_answers(model, dataset, tokenizer, batch_size: int = 8, precision: str = "fp32") -> dict[str, Any]:
    """Metrics over the answer tokens of ``dataset`` (rows with input_ids and completion_mask)."""
    accuracy = load_metric("token_accuracy")
    f1 = load_metric("token_f1")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
        if precision in ("bf16", "fp16")
        else nullcontext()
    )
    total_loss, total_tokens = 0.0, 0
    rows = [dataset[i] for i in range(len(dataset))]
    # Length-sorted batches waste little on padding.
    rows.sort(key=lambda r: len(r["input_ids"]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        for start in range(0, len(rows), batch_size):
            batch = _pad(rows[start : start + batch_size], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            preds, refs, losses = shifted_answer_predictions(logits, batch["labels"])
            del logits
            total_loss += float(losses.sum())
            total_tokens += int(refs.numel())
            accuracy.add_batch(predictions=preds.tolist(), references=refs.tolist())
            f1.add_batch(predictions=preds.tolist(), references=refs.tolist())
    finally:
        if was_training:
            model.train()
    if total_tokens == 0:
        return {"eval_loss": float("nan"), "perplexity": float("nan"), "accuracy": 0.0, "f1": 0.0, "eval_tokens": 0}
    mean_loss = total_loss / total_tokens  # token-weighted mean over answer tokens
    return {
        "eval_loss": mean_loss,
        "perplexity": math.exp(min(mean_loss, 700.0)),
        "accuracy": accuracy.compute()["accuracy"],
        "f1": f1.compute()["f1"],
        "eval_tokens": total_tokens,
        "eval_rows": len(rows),
    }


def save_eval_results(results: dict[str, Any], run_dir: Path, fmt: str) -> Path:
    """eval_results.json (one object) or eval_results.csv (metric,value rows); written atomically."""
    path = run_dir / f"eval_results.{fmt}"
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "json":
        tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    else:
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["metric", "value"])
            for key, value in results.items():
                writer.writerow([key, value])
    tmp.replace(path)
    return path


def evaluate_run(run_dir: str | Path, generations: int = 5, max_new_tokens: int = 64) -> dict[str, Any]:
    """Re-evaluate a finished run on its held-out rows (same deterministic split) and sample a few answers."""
    from .data import prepare_data
    from .inference import generate_reply, load_generation_model
    from .modeling import load_tokenizer
    from .runs import RunDir, load_run_config

    run = RunDir(run_dir)
    config = load_run_config(run.path)
    tokenizer = load_tokenizer(config)
    data = prepare_data(config, tokenizer)
    if data.eval is None:
        from .errors import ConfigError

        raise ConfigError("this run has no held-out rows (eval_split is 0)", f"{run.config_path}", "train with eval_split > 0")
    model, gen_tokenizer = load_generation_model(str(run.path))
    results = evaluate_answers(model, data.eval, tokenizer, config.training.per_device_eval_batch_size)
    samples = []
    for row in data.eval_rows[: max(0, generations)]:
        samples.append(
            {
                "prompt": row["prompt"][-1]["content"],
                "reference": row["completion"][0]["content"],
                "prediction": generate_reply(model, gen_tokenizer, row["prompt"], max_new_tokens=max_new_tokens),
            }
        )
    path = save_eval_results(results, run.path, config.evaluation.eval_save_format.value)
    run.update(eval_results=results)
    return {"results": results, "samples": samples, "path": str(path)}
