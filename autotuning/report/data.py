"""What a run report shows, gathered from the run directory into plain data (no markup).

Everything comes from what the run wrote (run.json, config.yaml, metrics.jsonl, eval results,
predictions.jsonl, export folders), so the report can be rebuilt at any time and it never shows anything the
run did not record. The token is never in those files; config values named like secrets are redacted again anyway.
Figures are kept as numbers where a template formats them, and as ready text where both formats show the
same sentence (an export's parity figures next to their bounds).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runs import RunDir, read_metrics, write_json_atomic

__all__ = ["Report", "build_report", "fmt_value"]

_SHOWN_PREDICTIONS = 10
_HASH_CACHE = ".checksums.json"
CARD_NAME = "README.md"  # the model card's file name (card.py)
# A config key is a secret when its last word is one of these: hf_token is, eval_max_new_tokens is not.
_SECRET_KEY = re.compile(r"(^|_)(token|secret|password)$")


def fmt_value(value: Any) -> str:
    """Floats to 4 significant digits, everything else as str(): one number style in both formats."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@dataclass
class Report:
    """Everything report.html and report.md show. Table rows are dicts keyed by column; None is "no value"."""

    name: str
    path: str
    status: str
    model_name: str
    fine_tuning_type: str
    training_method: str  # sft, or the preference method (dpo, orpo, simpo, kto)
    device: str
    precision: str
    global_step: Any
    started: str | None = None  # local time, "YYYY-mm-dd HH:MM:SS"
    took_s: float | None = None
    checkpoint: dict[str, Any] | None = None  # kept, why, restored, early_stopped
    oom_retries: list[dict[str, Any]] = field(default_factory=list)  # step, change
    train_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, value)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)
    learning_rate: list[tuple[int, float]] = field(default_factory=list)
    reward_margin: list[tuple[int, float]] = field(default_factory=list)  # preference runs
    reward_accuracy: list[tuple[int, float]] = field(default_factory=list)
    eval_reward_accuracy: list[tuple[int, float]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)  # metric, base, tuned, change
    predictions: list[dict[str, Any]] = field(default_factory=list)  # prompt, reference, rejected?, base, tuned
    predictions_total: int = 0
    dataset: dict[str, Any] | None = None  # fingerprint, rows_read, rows_skipped, splits, notes
    verification: list[dict[str, Any]] = field(default_factory=list)  # one row per export, see _verification
    files: list[dict[str, Any]] = field(default_factory=list)  # format, file, bytes, sha256
    timings: list[dict[str, Any]] = field(default_factory=list)  # what, value
    train_peak: dict[str, Any] | None = None  # what, bytes
    config_text: str = ""
    versions: list[dict[str, Any]] = field(default_factory=list)  # library, version

    @property
    def prediction_columns(self) -> list[tuple[str, str]]:
        """(heading, key) of the sample predictions table: a preference run's reference is its chosen answer, shown
        next to the rejected one."""
        if any("rejected" in p for p in self.predictions):
            return [
                ("prompt", "prompt"),
                ("chosen", "reference"),
                ("rejected", "rejected"),
                ("base", "base"),
                ("fine-tuned", "tuned"),
            ]
        return [("prompt", "prompt"), ("reference", "reference"), ("base", "base"), ("fine-tuned", "tuned")]

    @property
    def unverified(self) -> list[dict[str, Any]]:
        """Exports that are not verified: each gets a notice saying why and how to export again."""
        return [row for row in self.verification if row["status"] != "verified"]


def _sha256(path: Path, cache: dict[str, Any]) -> str:
    """sha256 of a file, cached by (size, mtime) so rewriting the report does not rehash gigabytes."""
    stat = path.stat()
    key = str(path)
    hit = cache.get(key)
    if hit and hit["size"] == stat.st_size and hit["mtime"] == stat.st_mtime:
        return hit["sha256"]
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    cache[key] = {"size": stat.st_size, "mtime": stat.st_mtime, "sha256": digest.hexdigest()}
    return cache[key]["sha256"]


def _export_files(run: RunDir) -> list[dict[str, Any]]:
    cache_path = run.path / _HASH_CACHE
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        cache = {}
    folders = {
        "torch": run.merged,
        "adapter": run.adapter,
        "gguf": run.path / "gguf",
        "tensorflow": run.path / "tensorflow",
        # Unverified exports kept beside a verified one (see autotuning/export/verify.py).
        "torch (unverified)": run.path / "merged.unverified",
        "gguf (unverified)": run.path / "gguf.unverified",
        "tensorflow (unverified)": run.path / "tensorflow.unverified",
    }
    rows = []
    for fmt, folder in folders.items():
        if not folder.is_dir():
            continue
        # The model card beside the weights (card.py) describes them and is rewritten after this table: not a file
        # of the export, so not listed with a checksum that its next rewrite would change.
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / CARD_NAME):
            rows.append(
                {
                    "format": fmt,
                    "file": str(path.relative_to(run.path)),
                    "bytes": path.stat().st_size,
                    "sha256": _sha256(path, cache),
                }
            )
    write_json_atomic(cache_path, cache)
    return rows


def _metric_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric; base is None where the base was not scored, change where either is not a number."""
    rows = []
    for key, tuned in results.items():
        if key.startswith("base_") or key == "global_step":
            continue
        base = results.get(f"base_{key}")
        numbers = isinstance(base, (int, float)) and isinstance(tuned, (int, float))
        rows.append({"metric": key, "base": base, "tuned": tuned, "change": tuned - base if numbers else None})
    return rows


_SHOWN_FIGURES = {
    "status",
    "verified",
    "reason",
    "variant",
    "rel_logit_diff",
    "max_abs_logit_diff",
    "reference_logit_scale",
    "top1_agreement",
    "greedy_agreement_tokens",
    "greedy_tokens",
    "bound",
    "path",
    "bytes",
    "positions",
}
_SECOND_CHECKS = ("merge_check_fp32", "conversion_check", "llama_cpp", "tokenizer_metadata")  # verify.also_require


def _second_check(sub: dict[str, Any]) -> str:
    if "rel_logit_diff" not in sub:
        return f"{sub.get('status', '')} {sub.get('reason', '')}".strip()
    return (
        f"{sub['status']}: rel {fmt_value(sub['rel_logit_diff'])}, top-1 {fmt_value(sub['top1_agreement'])}, "
        f"greedy {sub['greedy_agreement_tokens']}/{sub['greedy_tokens']}"
    )


def _verification_row(fmt: str, figures: dict[str, Any]) -> dict[str, Any]:
    bound = figures.get("bound") or {}
    rel, top1, greedy = (
        figures.get("rel_logit_diff"),
        figures.get("top1_agreement"),
        figures.get("greedy_agreement_tokens"),
    )
    abs_diff = figures.get("max_abs_logit_diff")
    details = {k: v for k, v in figures.items() if k not in _SHOWN_FIGURES and not isinstance(v, (list, dict))}
    for name in _SECOND_CHECKS:
        if isinstance(figures.get(name), dict):
            details[name] = _second_check(figures[name])
    return {
        "format": fmt,
        "status": figures.get("status", "verified"),
        "variant": figures.get("variant") or figures.get("dtype") or figures.get("type"),
        "rel": None if rel is None else f"{fmt_value(rel)} (≤ {fmt_value(bound.get('max_rel_logit_diff', '?'))})",
        "abs": None
        if abs_diff is None
        else f"{fmt_value(abs_diff)} / {fmt_value(figures.get('reference_logit_scale', '?'))}",
        "top1": None if top1 is None else f"{top1:.1%} (≥ {bound.get('min_top1_agreement', 0):.0%})",
        "greedy": None
        if greedy is None
        else f"{greedy}/{figures.get('greedy_tokens')} (≥ {bound.get('min_greedy_agreement_tokens', '?')})",
        "path": figures.get("path"),
        "reason": figures.get("reason") or "",
        "details": ", ".join(f"{k} {fmt_value(v)}" for k, v in details.items()),
    }


def _verification(exports: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per export: verdict, the parity figures next to their bounds, where the files are, and why
    an export is not verified. Records written before the bounds existed have no status: they were verified."""
    return [_verification_row(fmt, figures) for fmt, figures in exports.items() if isinstance(figures, dict)]


def _series(events: list[dict[str, Any]], kind: str, key: str) -> list[tuple[int, float]]:
    return [(e["step"], e[key]) for e in events if e.get("type") == kind and e.get(key) is not None]


def _dataset(ds: dict[str, Any]) -> dict[str, Any] | None:
    if not ds:
        return None
    splits = [
        {
            "split": split,
            "rows": s.get("rows"),
            "median_tokens": s.get("median_tokens"),
            "p95_tokens": s.get("p95_tokens"),
            "max_tokens": s.get("max_tokens"),
            "truncated_rows": s.get("truncated_rows"),
            "answer_lost_rows": s.get("answer_lost_rows"),
            "answer_tokens": s.get("answer_tokens"),
        }
        for split in ("train", "eval")
        if (s := ds.get(split) or {})
    ]
    return {
        "fingerprint": ds.get("fingerprint", ""),
        "rows_read": ds.get("rows_read", ""),
        "rows_skipped": ds.get("rows_skipped", 0),
        "splits": splits,
        "notes": list(ds.get("notes") or []),
    }


def _checkpoint(selection: dict[str, Any] | None) -> dict[str, Any] | None:
    if not selection:
        return None
    best = selection.get("best_checkpoint")
    return {
        "kept": Path(best).name if best else "none",
        "why": selection.get("why", ""),
        "restored": selection.get("restored"),
        "early_stopped": selection.get("early_stopped"),
    }


def _redacted_config(run: RunDir) -> str:
    text = run.config_path.read_text(encoding="utf-8") if run.config_path.is_file() else ""
    return "\n".join(
        line.split(":")[0] + ": ***" if _SECRET_KEY.search(line.split(":")[0].strip().lower()) else line
        for line in text.splitlines()
    )


def _predictions(run: RunDir) -> list[dict[str, Any]]:
    path = run.path / "predictions.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_report(run_dir: str | Path) -> Report:
    """Everything the report shows, read from the run directory."""
    run = RunDir(run_dir)
    r = run.read()
    events = read_metrics(run.metrics_path)
    predictions = _predictions(run)
    started, finished = r.get("started_at"), r.get("finished_at")
    exports = r.get("exports") or {}
    return Report(
        name=run.path.name,
        path=str(run.path),
        status=str(r.get("status", "unknown")),
        model_name=str(r.get("model_name", "")),
        fine_tuning_type=str(r.get("fine_tuning_type", "")),
        training_method=str(r.get("training_method") or "sft"),
        device=str(r.get("device", "")),
        precision=str(r.get("precision", "")),
        global_step=r.get("global_step", ""),
        started=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else None,
        took_s=finished - started if started and finished else None,
        checkpoint=_checkpoint(r.get("checkpoint_selection")),
        oom_retries=[{"step": o["step"], "change": o["change"]} for o in r.get("oom_retries") or []],
        train_loss=_series(events, "train", "loss"),
        eval_loss=_series(events, "eval", "eval_loss"),
        learning_rate=_series(events, "train", "learning_rate"),
        reward_margin=_series(events, "train", "reward_margin"),
        reward_accuracy=_series(events, "train", "reward_accuracy"),
        eval_reward_accuracy=_series(events, "eval", "eval_reward_accuracy"),
        metrics=_metric_rows(r.get("eval_results") or {}),
        predictions=[
            {
                "prompt": p.get("prompt", ""),
                "reference": p.get("reference", ""),
                **({"rejected": p["rejected"]} if "rejected" in p else {}),
                "base": p.get("base_prediction"),
                "tuned": p.get("prediction", ""),
            }
            for p in predictions[:_SHOWN_PREDICTIONS]
        ],
        predictions_total=len(predictions),
        dataset=_dataset(r.get("dataset") or {}),
        verification=_verification(exports),
        files=_export_files(run),
        timings=[{"what": k, "value": v} for k, v in (r.get("timings") or {}).items()],
        train_peak=r.get("train_peak_memory") or None,
        config_text=_redacted_config(run),
        versions=[{"library": k, "version": v} for k, v in (r.get("versions") or {}).items()],
    )
