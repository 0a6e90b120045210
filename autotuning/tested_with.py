"""The README's "Tested with" table, generated from what the real-model test tier recorded.

``tests/test_real_models.py`` (and the export tests on real models) record each run's figures; with
``AUTOTUNING_RECORD_TESTED_WITH=1`` the session writes them to ``docs/tested_with.json`` and re-renders the
table between the ``<!-- tested-with:start -->`` and ``<!-- tested-with:end -->`` markers in README.md.
``python -m autotuning.tested_with`` prints the table; ``--write`` re-renders it from the JSON file, and
``tests/test_docs.py`` checks that the README shows exactly what the JSON file holds. Nothing here is typed
by hand: a claim in the table is a test run's record.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .config_docs import README, replace_between_markers

__all__ = ["RECORDS", "START", "END", "load_records", "write_records", "render_table", "main"]

RECORDS = Path(__file__).resolve().parent.parent / "docs" / "tested_with.json"
START = "<!-- tested-with:start -->"
END = "<!-- tested-with:end -->"
_SHORT_TYPES = {
    "instruction_fine_tuning": "instruction",
    "code_generation": "code",
    "chat_fine_tuning": "chat",
    "question_answering": "QA",
    "rag_fine_tuning": "RAG",
}


def load_records(path: Path = RECORDS) -> dict[str, Any]:
    if not path.is_file():
        return {"entries": []}
    return json.loads(path.read_text(encoding="utf-8"))


def _key(entry: dict[str, Any]) -> tuple:
    return (entry["model_name"], entry["fine_tuning_type"], tuple(sorted(entry.get("exports") or {})))


def write_records(entries: list[dict[str, Any]], path: Path = RECORDS, readme: Path = README) -> None:
    """Merge a session's entries into the JSON file (a rerun of a case replaces its entry), then re-render README."""
    data = load_records(path)
    fresh = {_key(e): e for e in entries}
    kept = [e for e in data.get("entries", []) if _key(e) not in fresh]
    data = {
        "generated_by": "AUTOTUNING_RECORD_TESTED_WITH=1 python -m pytest -m real_model",
        "recorded_at": time.strftime("%Y-%m-%d"),
        "entries": sorted(kept + list(fresh.values()), key=lambda e: (e["model"], e["fine_tuning_type"])),
    }
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    text = readme.read_text(encoding="utf-8")
    readme.write_text(replace_between_markers(text, render_table(data), START, END), encoding="utf-8")


def _figure(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def _export_name(fmt: str, figures: dict[str, Any]) -> tuple[str, str]:
    fmt = fmt.split(":")[0]  # gguf:<type> for each further GGUF type
    variant = figures.get("type") if fmt == "gguf" else figures.get("variant")
    verdict = figures.get("status") or ("verified" if figures.get("verified") else "unverified")
    return (f"{fmt} {variant}" if variant else fmt), verdict


def _export_text(name: str, verdict: str, runs: list[dict[str, Any]]) -> str:
    """One export kind's verdict over the runs that made it, with its worst deciding figures (as run.json records
    them, see autotuning/export/verify.py)."""
    parts = []
    rel = [f["rel_logit_diff"] for f in runs if f.get("rel_logit_diff") is not None]
    top1 = [f["top1_agreement"] for f in runs if f.get("top1_agreement") is not None]
    greedy = [f for f in runs if f.get("greedy_agreement_tokens") is not None]
    if rel:
        parts.append(f"rel. logit diff {_figure(max(rel))}")
    if top1:
        parts.append(f"top-1 {min(top1):.0%}")
    if greedy:
        worst = min(greedy, key=lambda f: f["greedy_agreement_tokens"])
        parts.append(f"greedy {worst['greedy_agreement_tokens']}/{worst.get('greedy_tokens', '?')}")
    count = f" in {len(runs)} runs" if len(runs) > 1 else ""
    worst_of = "worst: " if len(runs) > 1 else ""
    return f"{name} {verdict}{count} ({worst_of}{', '.join(parts)})" if parts else f"{name} {verdict}{count}"


def _type_text(entry: dict[str, Any]) -> str:
    """'instruction 2.1 -> 0.3 (12 steps)', or for a preference method its held-out margin, base -> tuned."""
    kind = _SHORT_TYPES.get(entry["fine_tuning_type"], entry["fine_tuning_type"])
    if entry.get("eval_loss") is None and entry.get("preference_margin") is not None:
        base, tuned = entry.get("base_preference_margin"), entry["preference_margin"]
        return f"{kind} margin {_figure(base)} -> {_figure(tuned)} nats ({entry.get('steps')} steps)"
    return f"{kind} {_figure(entry.get('base_eval_loss'))} -> {_figure(entry.get('eval_loss'))} ({entry.get('steps')} steps)"


def render_table(data: dict[str, Any]) -> str:
    """One row per model: its fine-tuning types with base -> tuned answer-token loss, exports with figures, device."""
    by_model: dict[str, list[dict[str, Any]]] = {}
    for entry in data.get("entries", []):
        by_model.setdefault(entry["model"], []).append(entry)
    lines = [
        f"<!-- generated from {RECORDS.relative_to(RECORDS.parent.parent)} by `python -m autotuning.tested_with "
        "--write`; refresh both with AUTOTUNING_RECORD_TESTED_WITH=1 python -m pytest -m real_model -->",
        "",
        "| model | architecture | fine-tuning types (held-out answer loss, base -> tuned; preference methods: held-out"
        " log p(chosen) - log p(rejected)) | exports (checks) | device |",
        "| --- | --- | --- | --- | --- |",
    ]
    for model, entries in by_model.items():
        first = entries[0]
        params = f", {first['parameters'] / 1e6:.0f}M" if first.get("parameters") else ""
        source = f" (`{first['model_name']}`, from {first['source']})" if first.get("source") else ""
        types = "; ".join(_type_text(e) for e in entries)
        grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for e in entries:
            for fmt, fig in (e.get("exports") or {}).items():
                grouped.setdefault(_export_name(fmt, fig), []).append(fig)
        exports = [_export_text(name, verdict, runs) for (name, verdict), runs in sorted(grouped.items())]
        devices = sorted({f"{e.get('device')} {e.get('precision')}" for e in entries})
        lines.append(
            f"| {model}{source} | {first['architecture']}{params} | {types} | {'<br>'.join(exports) or 'n/a'} | "
            f"{', '.join(devices)} |"
        )
    recorded = data.get("recorded_at")
    if recorded:
        lines += ["", f"Recorded {recorded} by the real-model test tier (`pytest -m real_model`)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autotuning.tested_with", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"re-render the table in README.md from {RECORDS.name}")
    args = parser.parse_args(argv)
    table = render_table(load_records())
    if not args.write:
        sys.stdout.write(table)
        return 0
    text = README.read_text(encoding="utf-8")
    fresh = replace_between_markers(text, table, START, END)
    if fresh != text:
        README.write_text(fresh, encoding="utf-8")
        print(f"updated {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
