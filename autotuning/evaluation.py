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
import logging
import math
import re
import string
import threading
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import evaluate
import torch

from .data import encode_answer, prepare_data, prepare_preference_data
from .errors import ConfigError, JobCancelled
from .inference import generate_reply, load_generation_model
from .modeling import load_tokenizer
from .report import write_report
from .runs import Operation, RunDir, RunLock, load_run_config

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
    "answer_logps",
    "preference_scores",
    "compare_preferences",
]

log = logging.getLogger("autotuning")

_METRICS_DIR = Path(__file__).resolve().parent / "metrics"


def load_metric(name: str):
    """Load one of the evaluate metric modules shipped in autotuning/metrics (works offline)."""
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


@torch.no_grad()
def answer_logps(model, tokenizer, examples: list[tuple[list[dict], list[dict]]], max_length: int, batch_size: int = 8):
    """Sum of log p(answer token | everything before it) for each (prompt, answer): the sequence log-likelihood
    that DPO's implicit reward compares, over the answer tokens only."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [encode_answer(tokenizer, prompt, answer, max_length) for prompt, answer in examples]
    out: list[float] = []
    try:
        for begin in range(0, len(encoded), batch_size):
            chunk = encoded[begin : begin + batch_size]
            longest = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
            attention = torch.zeros_like(ids)
            labels = torch.full_like(ids, -100)
            for i, (row, start) in enumerate(chunk):
                ids[i, : len(row)] = torch.tensor(row)
                attention[i, : len(row)] = 1
                labels[i, start : len(row)] = ids[i, start : len(row)]
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float()
            targets = labels[:, 1:].to(device)
            logps = torch.log_softmax(logits[:, :-1], dim=-1)
            picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            out.extend((picked * (targets != -100)).sum(-1).tolist())
    finally:
        model.train(was_training)
    return out


def preference_scores(model, tokenizer, rows: list[dict], max_length: int, batch_size: int = 8) -> dict[str, Any]:
    """How the model ranks held-out answers, from log-likelihoods of the answer tokens.

    Pairs: ``preference_accuracy`` is the share of pairs where log p(chosen) > log p(rejected), and
    ``preference_margin`` the mean of log p(chosen) - log p(rejected) (nats). Unpaired (KTO):
    ``preference_margin`` is the mean log p of desirable answers minus that of undesirable ones.
    Per-row margins come back under ``margins`` so that a tuned model can be compared with its base row by row.
    """
    if rows and "chosen" in rows[0]:
        chosen = answer_logps(model, tokenizer, [(r["prompt"], r["chosen"]) for r in rows], max_length, batch_size)
        rejected = answer_logps(model, tokenizer, [(r["prompt"], r["rejected"]) for r in rows], max_length, batch_size)
        margins = [c - r for c, r in zip(chosen, rejected)]
        return {
            "preference_accuracy": sum(m > 0 for m in margins) / len(margins),
            "preference_margin": sum(margins) / len(margins),
            "chosen_logp": sum(chosen) / len(chosen),
            "rejected_logp": sum(rejected) / len(rejected),
            "eval_pairs": len(margins),
            "margins": margins,
        }
    logps = answer_logps(model, tokenizer, [(r["prompt"], r["completion"]) for r in rows], max_length, batch_size)
    good = [lp for lp, r in zip(logps, rows) if r["label"]]
    bad = [lp for lp, r in zip(logps, rows) if not r["label"]]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {
        "preference_margin": mean(good) - mean(bad),
        "desirable_logp": mean(good),
        "undesirable_logp": mean(bad),
        "eval_rows": len(rows),
        "margins": [],
    }


def compare_preferences(tuned: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Tuned vs base scores, flat: base_ twins, and the implicit reward with the base as reference.

    DPO's reward of an answer is beta * (log p_tuned - log p_base); a pair is ranked right when the chosen answer's
    reward is the higher, i.e. when the tuned margin exceeds the base margin. ``reward_accuracy`` is that share,
    ``reward_margin`` the mean of (tuned margin - base margin) in nats (TRL's rewards/margins divided by beta).
    """
    out = {k: v for k, v in tuned.items() if k != "margins"}
    out.update({f"base_{k}": v for k, v in base.items() if k != "margins"})
    pairs = list(zip(tuned.get("margins", []), base.get("margins", [])))
    if pairs:
        out["reward_accuracy"] = sum(t > b for t, b in pairs) / len(pairs)
        out["reward_margin"] = sum(t - b for t, b in pairs) / len(pairs)
    else:
        out["reward_margin"] = tuned["preference_margin"] - base["preference_margin"]
    return out


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


def _describe_placement(model) -> str:
    """'torch.float32 on cpu', 'torch.bfloat16 on cuda:0, 4-bit', ...: how a scored model was loaded."""
    param = next(model.parameters())
    quant = " 4-bit" if getattr(model, "is_loaded_in_4bit", False) else ""
    quant = quant or (" 8-bit" if getattr(model, "is_loaded_in_8bit", False) else "")
    dtype = getattr(model, "dtype", param.dtype)
    return f"{dtype} on {param.device}{',' + quant if quant else ''}"


def evaluate_run(
    run_dir: str | Path,
    generations: int = 5,
    max_new_tokens: int = 64,
    compare_base: bool = True,
    rewrite_report: bool = True,
    *,
    hf_token: str = "",
    locked: bool = False,
    progress: Callable[[float, str], None] | None = None,
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """Evaluate a finished run on its held-out rows (same deterministic split), with generated answers.

    With ``compare_base`` the base model is scored on the same rows: every metric gets a ``base_`` twin,
    so the gain from fine-tuning is visible in eval_results and predictions.jsonl. Both models are loaded the
    same way (precision, quantization, device: see ``inference.load_generation_model``) and scored by the same
    code, so the difference between them is the fine-tune and nothing else; that is why the answer-token
    metrics the training job computed on the model still in memory (under autocast) are computed again here.

    The evaluation holds the run's lock (it waits for an export of the run, and refuses a run being trained)
    unless ``locked``: the training job, which holds it already, passes that and ``rewrite_report=False``
    (it writes the report itself once the run is finished). ``progress(fraction, what)`` is called after
    each model load and each generated answer; ``cancel`` is checked between them. ``hf_token`` reads a
    private base model or dataset again (a run's token is never saved with it).
    """
    run = RunDir(run_dir)
    lock = RunLock(run.path, Operation.EVALUATE)
    if not locked:
        lock.acquire(
            wait=True, cancel=cancel, on_wait=lambda owner: _say(progress, 0.0, "waiting for the run's export")
        )
    try:
        config = load_run_config(run.path, hf_token)
        results, samples, path = _evaluate_locked(
            run, config, generations, max_new_tokens, compare_base, progress, cancel
        )
        if rewrite_report:
            try:
                write_report(run.path)
            except Exception as exc:  # the results above are saved; the report is only a view of them
                log.warning("could not rewrite the run report: %s", exc)
    finally:
        lock.release()
    shown = ("prompt", "reference", "rejected", "prediction", "base_prediction")
    return {"results": results, "samples": [{k: s[k] for k in shown if k in s} for s in samples], "path": str(path)}


def _say(progress: Callable[[float, str], None] | None, fraction: float, what: str) -> None:
    if progress is not None:
        progress(fraction, what)


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise JobCancelled("evaluation cancelled", "", "nothing was recorded; start it again when you want")


@dataclass
class _Plan:
    """What an evaluation does with each model (tuned, then base): score the held-out rows, answer ``prompts``
    into ``samples``, then ``combine`` the per-model scores (keyed by prefix: "" or "base_") into flat results."""

    kind: str  # the fine-tuning type whose task metrics the generated answers get
    score_what: str  # the progress line while scoring, with {name}
    score: Callable[[Any], dict[str, Any]]
    prompts: list[list[dict]]
    samples: list[dict[str, Any]]
    combine: Callable[[dict[str, dict[str, Any]]], dict[str, Any]]


def _sft_plan(run: RunDir, config, tokenizer, generations: int) -> _Plan:
    data = prepare_data(config, tokenizer)
    _need_eval_rows(data, run)
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
    return _Plan(
        kind=config.data.fine_tuning_type.value,
        score_what="answer-token metrics of the {name}",
        score=lambda model: evaluate_answers(model, data.eval, tokenizer, config.training.per_device_eval_batch_size),
        prompts=[row["prompt"] for row in rows],
        samples=samples,
        combine=lambda scores: {f"{prefix}{k}": v for prefix, got in scores.items() for k, v in got.items()},
    )


def _preference_plan(run: RunDir, config, tokenizer, generations: int) -> _Plan:
    """How tuned and base rank the held-out answers, and answers generated by both next to the chosen one."""
    data = prepare_preference_data(config, tokenizer)
    _need_eval_rows(data, run)
    rows = [r for r in data.eval_rows if "chosen" in r or r.get("label")][: max(0, generations)]
    samples = []
    for r in rows:
        chosen = (r.get("chosen") or r["completion"])[0]["content"]
        rejected = {"rejected": r["rejected"][0]["content"]} if "rejected" in r else {}
        samples.append({"prompt": r["prompt"][-1]["content"], "reference": chosen, "references": [chosen], **rejected})

    def combine(scores):
        if "base_" in scores:
            return compare_preferences(scores[""], scores["base_"])
        return {k: v for k, v in scores[""].items() if k != "margins"}

    return _Plan(
        kind="instruction_fine_tuning",  # the chosen answer is the reference text
        score_what="how the {name} ranks the held-out answers",
        score=lambda model: preference_scores(
            model, tokenizer, data.eval_rows, config.data.max_seq_length, config.training.per_device_eval_batch_size
        ),
        prompts=[r["prompt"] for r in rows],
        samples=samples,
        combine=combine,
    )


def _need_eval_rows(data, run: RunDir) -> None:
    if data.eval is None:
        raise ConfigError(
            "this run has no held-out rows (eval_split is 0)", f"{run.config_path}", "train with eval_split > 0"
        )


def _evaluate_locked(run: RunDir, config, generations, max_new_tokens, compare_base, progress, cancel):
    tokenizer = load_tokenizer(config)
    make_plan = _preference_plan if config.preference.training_method.is_preference else _sft_plan
    plan = make_plan(run, config, tokenizer, generations)
    models = [("", str(run.path))] + ([("base_", config.model.model_name)] if compare_base else [])
    scores: dict[str, dict[str, Any]] = {}
    placement: dict[str, str] = {}
    steps, done = len(models) * (2 + len(plan.prompts)), 0
    for prefix, source in models:
        name = "base model" if prefix else "fine-tuned model"
        _check_cancel(cancel)
        _say(progress, done / steps, f"loading the {name}")
        model, gen_tokenizer = load_generation_model(source, like=config if prefix else None)
        placement[f"{prefix or 'tuned_'}model"] = _describe_placement(model)
        done += 1
        _say(progress, done / steps, plan.score_what.format(name=name))
        scores[prefix] = plan.score(model)
        done += 1
        for i, (sample, prompt) in enumerate(zip(plan.samples, plan.prompts)):
            _check_cancel(cancel)
            _say(progress, done / steps, f"{name}: answer {i + 1}/{len(plan.prompts)}")
            sample[f"{prefix}prediction"] = generate_reply(model, gen_tokenizer, prompt, max_new_tokens=max_new_tokens)
            done += 1
        view = [dict(s, prediction=s[f"{prefix}prediction"]) for s in plan.samples]
        scores[prefix].update({f"gen_{k}": v for k, v in generation_metrics(plan.kind, view).items()})
        del model
    results = plan.combine(scores)
    path = save_eval_results(results, run.path, config.evaluation.eval_save_format.value)
    tmp = run.path / ".predictions.jsonl.tmp"
    tmp.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in plan.samples), encoding="utf-8")
    tmp.replace(run.path / "predictions.jsonl")
    run.update(eval_results=results, evaluation_placement=placement)
    _say(progress, 1.0, "done")
    return results, plan.samples, path
