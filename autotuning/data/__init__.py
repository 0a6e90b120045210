"""Data: load -> detect format -> normalise -> split -> tokenise with the answer mask.

Example::

    data = prepare_data(config, tokenizer)
    data.train  # datasets.Dataset with input_ids + completion_mask
    data.stats["train"]["truncated_rows"]
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from ..config import Config, TrainedTurns
from ..errors import DataError
from ..hub import hub_reachable
from ..resources import cache_root
from .encoding import (
    EncodedExample,
    EncodingStats,
    chat_token_ids,
    encode_answer,
    encode_example,
    encode_examples,
    end_of_turn_token_ids,
    render_prompt,
)
from .formats import ACCEPTED_FORMATS, FORMATS, TURN_FIXES, Format, RowError, detect_format, normalise_row
from .loading import ASSETS as SAMPLES_DIR
from .loading import BUILTIN_HUB_DATASETS, SAMPLE_FILES, RawData, load_rows, sample_path
from .preference import normalise_preference_rows, preference_layout

__all__ = [
    "PreparedData",
    "mask_segments",
    "preview_rows",
    "prepare_data",
    "prepare_preference_data",
    "preference_sample",
    "normalise_rows",
    "split_rows",
    "encode_rows",
    "load_rows",
    "encode_example",
    "encode_examples",
    "end_of_turn_token_ids",
    "render_prompt",
    "chat_token_ids",
    "encode_answer",
    "detect_format",
    "sample_path",
    "EncodedExample",
    "ACCEPTED_FORMATS",
    "FORMATS",
    "BUILTIN_HUB_DATASETS",
    "SAMPLE_FILES",
]

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    source: str
    format: str
    train_rows: list[dict]  # normalised rows (see formats.py)
    eval_rows: list[dict]
    train: Any  # datasets.Dataset: input_ids, completion_mask
    eval: Any | None
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    fingerprint: str = ""
    lengths: list[int] = field(default_factory=list)  # untruncated token count of every row (train + eval)


def normalise_rows(raw: RawData, config: Config) -> tuple[Format, list[dict], int]:
    """Convert every row; returns (format, rows, skipped). Bad rows stop the run unless skip_bad_rows.

    Conversations that do not alternate are repaired by the rule in formats.make_alternating; what it changed is
    logged (and counted in :func:`prepare_data`'s stats).
    """
    fmt, rows, skipped, _ = _normalise_counting(raw, config)
    return fmt, rows, skipped


def _normalise_counting(raw: RawData, config: Config) -> tuple[Format, list[dict], int, dict[str, int]]:
    """:func:`normalise_rows`, plus the totals of the turn fixes (rule -> turns changed, and rows changed)."""
    kind = config.data.fine_tuning_type
    columns: set[str] = set()
    for row in raw.rows[:200]:
        columns.update(row)
    preference = preference_layout(columns, raw.rows)
    if preference is not None:
        held = "preference pairs (chosen / rejected)" if preference.paired else "KTO's labelled completions"
        raise DataError(
            f"this file holds {held}, and supervised fine-tuning learns one answer per prompt: it would train on "
            "the rejected answers too",
            raw.source,
            "use a file with one answer per prompt (e.g. instruction/output, or prompt/completion)",
        )
    fmt = detect_format(columns, kind, raw.source)
    rows: list[dict] = []
    skipped = 0
    fixes: dict[str, int] = {}
    for index, row in enumerate(raw.rows):
        try:
            example = normalise_row(fmt, row, kind, config.data.system_prompt)
        except RowError as err:
            if config.data.skip_bad_rows:
                skipped += 1
                continue
            raise err.at(raw.where(index)) from None
        row_fixes = example.pop(TURN_FIXES, None)
        if row_fixes:
            fixes["rows"] = fixes.get("rows", 0) + 1
            for rule, count in row_fixes.items():
                fixes[rule] = fixes.get(rule, 0) + count
        rows.append(example)
    if skipped:
        log.warning("skipped %d bad rows of %d (skip_bad_rows)", skipped, len(raw.rows))
    if not rows:
        raise DataError("no usable rows", raw.source, "every row was skipped as bad; check the file format")
    if fixes:
        log.warning(
            "%d conversations did not alternate user/assistant and were repaired (%s; see README, Data)",
            fixes["rows"],
            ", ".join(f"{rule.replace('_', ' ')}: {n}" for rule, n in fixes.items() if rule != "rows"),
        )
    return fmt, rows, skipped, fixes


def split_rows(rows: list[dict], eval_split: float, seed: int, max_samples: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic shuffle (seeded), optional cap, then hold out the eval fraction."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    if max_samples:
        order = order[:max_samples]
    n_eval = 0
    if eval_split > 0 and len(order) >= 2:
        n_eval = min(len(order) - 1, max(1, round(len(order) * eval_split)))
    eval_idx, train_idx = order[:n_eval], order[n_eval:]
    return [rows[i] for i in train_idx], [rows[i] for i in eval_idx]


def encode_rows(
    tokenizer, rows: list[dict], max_seq_length: int, name: str, trained_turns: TrainedTurns = TrainedTurns.ALL
):
    """Tokenise rows into a datasets.Dataset; drops (and counts) rows whose answer truncation removed."""

    stats = EncodingStats()
    kept: list[dict] = []
    for enc in encode_examples(tokenizer, rows, max_seq_length, trained_turns):
        stats.add(enc)
        if not enc.answer_lost:
            kept.append(enc.as_row())
    summary = stats.summary()
    _log_encoding(name, summary, max_seq_length)
    dataset = datasets.Dataset.from_dict(_columns(kept)) if kept else None
    summary["lengths"] = stats.lengths
    return dataset, summary


def _columns(rows: list[dict]) -> dict[str, list]:
    return {"input_ids": [r["input_ids"] for r in rows], "completion_mask": [r["completion_mask"] for r in rows]}


def _log_encoding(name: str, summary: dict, max_seq_length: int) -> None:
    if summary["answer_lost_rows"]:
        log.warning(
            "%s: %d of %d rows dropped because their prompt alone fills max_seq_length=%d (no answer left to "
            "train on); raise max_seq_length to keep them",
            name,
            summary["answer_lost_rows"],
            summary["rows"],
            max_seq_length,
        )
    if summary["truncated_rows"]:
        log.info(
            "%s: %d rows had the end of their answer truncated to max_seq_length=%d",
            name,
            summary["truncated_rows"],
            max_seq_length,
        )
    if summary.get("untrained_turns"):
        log.warning(
            "%s: %d assistant turns not trained: the chat template renders earlier turns differently inside a "
            "longer conversation (e.g. it drops their reasoning), so their tokens cannot be located; the last "
            "answer of every row is trained",
            name,
            summary["untrained_turns"],
        )


# Bump when encoding changes what it produces: older cache entries are then never read.
_ENCODING_VERSION = 2  # 2: the whole conversation tokenised once, every assistant turn trained
_CACHE_ENTRIES = 8  # tokenised datasets kept; the least recently used go first


def _tokenizer_identity(tokenizer) -> str | None:
    """A hash of everything that decides token ids: vocabulary, merges, normaliser, template, EOS."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None  # a slow (Python) tokenizer: no stable serialisation to hash, so no cache
    h = hashlib.sha256(backend.to_str().encode())
    h.update(json.dumps([tokenizer.chat_template, tokenizer.eos_token_id], default=str).encode())
    return h.hexdigest()


def _cache_dir(rows_fingerprint: str, tokenizer, config: Config):
    identity = _tokenizer_identity(tokenizer)
    if identity is None:
        return None
    d = config.data
    key = json.dumps(
        [
            _ENCODING_VERSION,
            rows_fingerprint,
            identity,
            d.max_seq_length,
            d.trained_turns.value,
            d.eval_split,
            d.max_samples,
            config.training.seed,
        ]
    )
    return cache_root() / "data" / hashlib.sha256(key.encode()).hexdigest()[:24]


def _load_cached(path):
    """(train, eval, train_stats, eval_stats) from a cache entry, or None when there is none (or it is unreadable)."""

    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        train = datasets.load_from_disk(str(path / "train"))
        evaluation = datasets.load_from_disk(str(path / "eval")) if (path / "eval").is_dir() else None
        path.touch()  # recently used
    except (OSError, ValueError, KeyError) as exc:  # missing, half-written or from an older layout
        if path.exists():
            log.info("tokenised-data cache entry %s unreadable (%s): tokenising again", path, exc)
        return None
    return train, evaluation, meta["train"], meta["eval"]


def _store_cached(path, train, evaluation, train_stats, eval_stats) -> None:
    """Write the entry to a temporary folder, then rename: a reader never sees half an entry. Best effort."""

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=path.parent))
        train.save_to_disk(str(tmp / "train"))
        if evaluation is not None:
            evaluation.save_to_disk(str(tmp / "eval"))
        (tmp / "meta.json").write_text(json.dumps({"train": train_stats, "eval": eval_stats}), encoding="utf-8")
        try:
            tmp.rename(path)
        except OSError:  # another process stored the same entry first
            shutil.rmtree(tmp, ignore_errors=True)
        entries = sorted(
            (p for p in path.parent.iterdir() if p.is_dir() and not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime,
        )
        for old in entries[:-_CACHE_ENTRIES]:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:  # a full or read-only cache must not stop a run
        log.info("tokenised data not cached (%s)", exc)


def _fingerprint(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def prepare_data(config: Config, tokenizer) -> PreparedData:
    d = config.data
    raw = load_rows(
        d.fine_tuning_type,
        d.dataset_path,
        d.dataset_config,
        d.dataset_split,
        token=config.model.hf_token or None,
        max_samples=d.max_samples,
    )
    fmt, rows, skipped, turn_fixes = _normalise_counting(raw, config)
    train_rows, eval_rows = split_rows(rows, d.eval_split, config.training.seed, d.max_samples)
    fingerprint = _fingerprint(rows)
    # Tokenising is the slow part of preparing data: a second run (or the evaluation after training, or Start
    # after the Dataset tab's preview) on the same rows, tokenizer and settings reads it back from the cache.
    cache = _cache_dir(fingerprint, tokenizer, config)
    cached = _load_cached(cache) if cache is not None else None
    if cached is not None:
        train, evaluation, train_stats, eval_stats = cached
        _log_encoding("train", train_stats, d.max_seq_length)
        if eval_stats:
            _log_encoding("eval", eval_stats, d.max_seq_length)
    else:
        train, train_stats = encode_rows(tokenizer, train_rows, d.max_seq_length, "train", d.trained_turns)
        evaluation, eval_stats = (None, None)
        if eval_rows and train is not None:
            evaluation, eval_stats = encode_rows(tokenizer, eval_rows, d.max_seq_length, "eval", d.trained_turns)
        if cache is not None and train is not None:
            _store_cached(cache, train, evaluation, train_stats, eval_stats)
    if train is None:
        raise DataError(
            f"no training row fits max_seq_length={d.max_seq_length} with any of its answer",
            f"field 'max_seq_length' ({raw.source})",
            "raise max_seq_length",
        )
    lengths = train_stats.pop("lengths") + (eval_stats.pop("lengths") if eval_stats else [])
    stats = {
        "source": raw.source,
        "format": fmt.name,
        "rows_read": len(raw.rows),
        "rows_skipped": skipped,
        "turn_fixes": turn_fixes,  # what the alternation rule changed: {"rows": n, rule: turns}
        "train": train_stats,
        "eval": eval_stats,
    }
    return PreparedData(
        source=raw.source,
        format=fmt.name,
        train_rows=train_rows,
        eval_rows=eval_rows,
        train=train,
        eval=evaluation,
        stats=stats,
        notes=list(raw.notes),
        fingerprint=fingerprint,
        lengths=lengths,
    )


def mask_segments(
    tokenizer, example: dict, max_seq_length: int, trained_turns: TrainedTurns = TrainedTurns.ALL
) -> list[tuple[str, bool]]:
    """(text, trained) runs of one encoded example: what is masked and what the loss sees."""
    enc = encode_example(tokenizer, example, max_seq_length, trained_turns)
    segments: list[tuple[str, bool]] = []
    run: list[int] = []
    current = None
    for token, trained in zip(enc.input_ids, enc.completion_mask):
        if current is not None and bool(trained) != current:
            segments.append((tokenizer.decode(run), current))
            run = []
        current = bool(trained)
        run.append(token)
    if run:
        segments.append((tokenizer.decode(run), bool(current)))
    return segments


def preview_rows(rows: list[dict], limit: int = 20) -> list[dict[str, str]]:
    """Normalised rows flattened for a table: system, conversation before the answer, user turn, answer."""
    out = []
    for row in rows[:limit]:
        turns = row["prompt"]
        system = turns[0]["content"] if turns and turns[0]["role"] == "system" else ""
        history = [t for t in turns if t["role"] != "system"][:-1]
        out.append(
            {
                "system": system,
                "history": " | ".join(f"{t['role']}: {t['content'][:80]}" for t in history),
                "user": turns[-1]["content"],
                "answer": row["completion"][0]["content"],
                "choices": " | ".join(row.get("choices") or []),
            }
        )
    return out


# Bundled preference samples (our own writing: scripts/make_preference_samples.py), and the Hub datasets used when
# dataset_path is empty and the Hub is reachable.
_PREFERENCE_SAMPLES = {True: "preference_sample.jsonl", False: "kto_sample.jsonl"}
_PREFERENCE_HUB = {True: "trl-lib/ultrafeedback_binarized", False: "trl-lib/kto-mix-14k"}


def preference_sample(paired: bool) -> Path:
    """The bundled pairs (dpo, orpo, simpo) or labelled answers (kto)."""
    return SAMPLES_DIR / _PREFERENCE_SAMPLES[paired]


def _load_preference_rows(config: Config) -> RawData:
    d, paired = config.data, config.preference.training_method.paired
    name = "sample:preference" if paired else "sample:kto"
    if d.dataset_path in ("sample", name):
        raw = load_rows(d.fine_tuning_type, str(preference_sample(paired)))
        raw.source = name
        return raw
    if not d.dataset_path:
        if hub_reachable():
            return load_rows(d.fine_tuning_type, _PREFERENCE_HUB[paired], "", "train", config.model.hf_token or None)
        raw = load_rows(d.fine_tuning_type, str(preference_sample(paired)))
        raw.source = name
        raw.notes.append(f"the Hub is unreachable, so the bundled {name} is used instead of {_PREFERENCE_HUB[paired]}")
        return raw
    return load_rows(
        d.fine_tuning_type,
        d.dataset_path,
        d.dataset_config,
        d.dataset_split,
        token=config.model.hf_token or None,
        max_samples=d.max_samples,
    )


def _with_system(rows: list[dict], system_prompt: str) -> list[dict]:
    if not system_prompt:
        return rows
    return [
        r
        if r["prompt"][0]["role"] == "system"
        else {**r, "prompt": [{"role": "system", "content": system_prompt}, *r["prompt"]]}
        for r in rows
    ]


def _answers(row: dict) -> list[list[dict]]:
    return [row[k] for k in ("chosen", "rejected", "completion") if k in row]


def _preference_lengths(tokenizer, rows: list[dict]) -> list[int]:
    """Tokens of prompt + answer through the chat template, for every answer of every row (the longest per row)."""
    lengths = []
    for row in rows:
        lengths.append(max(len(chat_token_ids(tokenizer, row["prompt"] + answer)) for answer in _answers(row)))
    return lengths


def prepare_preference_data(config: Config, tokenizer) -> PreparedData:
    """Preference rows, normalised to TRL's conversational schema and split; TRL tokenises them with the chat template.

    ``train`` / ``eval`` are datasets of ``prompt`` / ``chosen`` / ``rejected`` message lists (or ``prompt`` /
    ``completion`` / ``label`` for KTO). Every error names the file, row and field, before anything is written.
    """
    d = config.data
    paired = config.preference.training_method.paired
    raw = _load_preference_rows(config)
    fmt, rows, skipped = normalise_preference_rows(raw, paired, d.skip_bad_rows)
    if skipped:
        log.warning("skipped %d bad rows of %d (skip_bad_rows)", skipped, len(raw.rows))
    rows = _with_system(rows, d.system_prompt)
    train_rows, eval_rows = split_rows(rows, d.eval_split, config.training.seed, d.max_samples)
    if not paired and len({r["label"] for r in train_rows}) < 2:
        raise DataError(
            "kto needs both desirable (label true) and undesirable (label false) answers in the training rows",
            raw.source,
            "add rows of the missing kind",
        )
    lengths = _preference_lengths(tokenizer, train_rows + eval_rows)
    too_long = sum(n > d.max_seq_length for n in lengths)
    if too_long:
        log.warning(
            "%d of %d rows are longer than max_seq_length=%d with their longest answer: the end of that answer is "
            "cut off",
            too_long,
            len(lengths),
            d.max_seq_length,
        )

    def stats(part: list[dict], part_lengths: list[int]) -> dict[str, Any]:
        ordered = sorted(part_lengths)
        out = {
            "rows": len(part),
            "median_tokens": ordered[len(ordered) // 2] if ordered else 0,
            "truncated_rows": sum(n > d.max_seq_length for n in part_lengths),
            "answer_lost_rows": 0,
        }
        if not paired:
            out["desirable_rows"] = sum(bool(r["label"]) for r in part)
        return out

    n_train = len(train_rows)
    return PreparedData(
        source=raw.source,
        format=fmt,
        train_rows=train_rows,
        eval_rows=eval_rows,
        train=datasets.Dataset.from_list(train_rows),
        eval=datasets.Dataset.from_list(eval_rows) if eval_rows else None,
        stats={
            "source": raw.source,
            "format": fmt,
            "rows_read": len(raw.rows),
            "rows_skipped": skipped,
            "train": stats(train_rows, lengths[:n_train]),
            "eval": stats(eval_rows, lengths[n_train:]) if eval_rows else None,
        },
        notes=list(raw.notes),
        fingerprint=_fingerprint(rows),
        lengths=lengths,
    )
