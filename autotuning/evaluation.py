"""Answer-token metrics on the held-out split: loss, perplexity, token accuracy and token F1.

Logits at position t predict token t+1, so predictions are ``logits[:, :-1]`` compared with
``labels[:, 1:]`` (the seed compared them unshifted, which scores copying the input). Only answer
positions count (labels != -100). Each batch is reduced to predicted ids at answer positions
before the next one runs, so memory stays bounded by one batch of logits, never the eval set.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import re
import string
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "shifted_answer_predictions",
    "evaluate_answers",
    "save_eval_results",
    "load_metric",
    "normalize_answer",
    "exact_match",
    "squad_f1",
    "code_parses",
    "chosen_option",
    "generation_metrics",
    "evaluate_run",
]

_METRICS_DIR = Path(__file__).resolve().parent / "metrics"


def load_metric(name: str):
    """Load one of the evaluate metric modules shipped in autotuning/metrics (works offline)."""
    import evaluate

    return evaluate.load(str(_METRICS_DIR / f"{name}.py"))


def shifted_answer_predictions(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
            if any(key.startswith("base_") for key in results):
                # One row per metric with the fine-tuned and the base model's value side by side.
                writer.writerow(["metric", "tuned", "base"])
                for key, value in results.items():
                    if not key.startswith("base_"):
                        writer.writerow([key, value, results.get(f"base_{key}", "")])
            else:
                writer.writerow(["metric", "value"])
                for key, value in results.items():
                    writer.writerow([key, value])
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- generated answers

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_FENCE = re.compile(r"```[a-zA-Z0-9_+-]*\n(.*?)```", re.DOTALL)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: list[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(ref) for ref in references))


def squad_f1(prediction: str, references: list[str]) -> float:
    """Token-overlap F1 after normalisation, best over the references."""
    pred_tokens = normalize_answer(prediction).split()
    best = 0.0
    for ref in references:
        ref_tokens = normalize_answer(ref).split()
        if not pred_tokens or not ref_tokens:
            best = max(best, float(pred_tokens == ref_tokens))
            continue
        common = Counter(pred_tokens) & Counter(ref_tokens)
        overlap = sum(common.values())
        if overlap:
            precision, recall = overlap / len(pred_tokens), overlap / len(ref_tokens)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def code_parses(text: str) -> bool:
    """Whether the answer's Python (its fenced blocks, else the whole text) parses. Never executed."""
    blocks = _FENCE.findall(text)
    source = "\n".join(blocks) if blocks else text
    try:
        ast.parse(source)
        return True
    except (SyntaxError, ValueError):
        return False


def chosen_option(prediction: str, choices: list[str]) -> str | None:
    """The option a free-text answer picks: an exact (normalised) match, else the best-overlapping one."""
    if not choices:
        return None
    for choice in choices:
        if normalize_answer(prediction) == normalize_answer(choice):
            return choice
    scored = [(squad_f1(prediction, [choice]), choice) for choice in choices]
    score, choice = max(scored, key=lambda item: item[0])
    return choice if score > 0 else None


def generation_metrics(kind: str, samples: list[dict[str, Any]]) -> dict[str, float]:
    """Task metrics over generated answers; each sample has prediction, references and choices."""
    if not samples:
        return {}
    n = len(samples)
    out: dict[str, float] = {"samples": n}
    out["exact_match"] = sum(exact_match(s["prediction"], s["references"]) for s in samples) / n
    if kind in ("question_answering", "rag_fine_tuning"):
        out["f1"] = sum(squad_f1(s["prediction"], s["references"]) for s in samples) / n
        with_choices = [s for s in samples if s.get("choices")]
        if with_choices:
            correct = sum(chosen_option(s["prediction"], s["choices"]) == s["references"][0] for s in with_choices)
            out["choice_accuracy"] = correct / len(with_choices)
    else:
        rouge = load_metric("rouge_l")
        out["rougeL"] = rouge.compute(
            predictions=[s["prediction"] for s in samples], references=[s["references"] for s in samples]
        )["rougeL"]
        if kind == "code_generation":
            parsable = [s for s in samples if code_parses(s["references"][0])]
            if parsable:
                out["python_parses"] = sum(code_parses(s["prediction"]) for s in parsable) / len(parsable)
    return out


def evaluate_run(
    run_dir: str | Path,
    generations: int = 5,
    max_new_tokens: int = 64,
    compare_base: bool = True,
    tuned_answer_metrics: dict[str, Any] | None = None,
    rewrite_report: bool = True,
) -> dict[str, Any]:
    """Evaluate a finished run on its held-out rows (same deterministic split), with generated answers.

    With ``compare_base`` the base model is scored on the same rows: every metric gets a ``base_`` twin,
    so the gain from fine-tuning is visible in eval_results and predictions.jsonl. The training job passes
    the answer-token metrics it just computed as ``tuned_answer_metrics`` so they are not computed twice,
    and ``rewrite_report=False`` because it writes the report itself once the run is recorded as finished.
    """
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

        raise ConfigError(
            "this run has no held-out rows (eval_split is 0)", f"{run.config_path}", "train with eval_split > 0"
        )
    kind = config.data.fine_tuning_type.value
    rows = data.eval_rows[: max(0, generations)]
    samples = [
        {
            "prompt": row["prompt"][-1]["content"],
            "reference": row["completion"][0]["content"],
            "references": row["references"],
            "choices": row.get("choices") or [],
        }
        for row in rows
    ]
    models = [("", str(run.path))] + ([("base_", config.model.model_name)] if compare_base else [])
    results: dict[str, Any] = {}
    for prefix, source in models:
        model, gen_tokenizer = load_generation_model(source, like=config if prefix else None)
        if prefix == "" and tuned_answer_metrics:
            scores = dict(tuned_answer_metrics)
        else:
            scores = evaluate_answers(model, data.eval, tokenizer, config.training.per_device_eval_batch_size)
        for sample, row in zip(samples, rows):
            sample[f"{prefix}prediction"] = generate_reply(
                model, gen_tokenizer, row["prompt"], max_new_tokens=max_new_tokens
            )
        view = [dict(s, prediction=s[f"{prefix}prediction"]) for s in samples]
        scores.update({f"gen_{k}": v for k, v in generation_metrics(kind, view).items()})
        results.update({f"{prefix}{k}": v for k, v in scores.items()})
        del model
    path = save_eval_results(results, run.path, config.evaluation.eval_save_format.value)
    tmp = run.path / ".predictions.jsonl.tmp"
    tmp.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples), encoding="utf-8")
    tmp.replace(run.path / "predictions.jsonl")
    run.update(eval_results=results)
    if rewrite_report:
        try:
            from .report import write_report

            write_report(run.path)
        except Exception as exc:  # the results above are saved; the report is only a view of them
            import logging

            logging.getLogger("autotuning").warning("could not rewrite the run report: %s", exc)
    shown = ("prompt", "reference", "prediction", "base_prediction")
    return {"results": results, "samples": [{k: s[k] for k in shown if k in s} for s in samples], "path": str(path)}
