"""The Colab quickstart notebook: a valid notebook whose every cell is Python, and whose offline cells run.

The cells tagged ``gpu``/``hub`` (CUDA, Hub downloads), ``install`` (pip) and ``ui`` (a web server) cannot run
here; they are syntax-checked. Every other cell is executed in a real kernel, in order, with the builtin tiny
model: that is the same flow (config, estimate, train, loss chart, evaluation, export, a reply) the GPU run takes.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "colab_quickstart.ipynb"
SKIPPED_TAGS = {"gpu", "hub", "install", "ui"}


def _read():
    return nbformat.read(NOTEBOOK, as_version=4)


def _tags(cell) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


def test_notebook_is_valid_and_clean():
    nb = _read()
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:
        ast.parse(cell.source)  # plain Python everywhere (no ! or % magics), so every cell is checked here
        assert not cell.outputs and cell.execution_count is None, "commit the notebook without outputs"
        assert _tags(cell) <= SKIPPED_TAGS, f"unknown tag in {_tags(cell)}"
    gpu = [c for c in code if "gpu" in _tags(c)]
    assert len(gpu) == 1 and "hub" in _tags(gpu[0])
    for text in ('"HuggingFaceTB/SmolLM2-135M-Instruct"', 'peft_type="qlora"', 'quantization="4bit"'):
        assert text in gpu[0].source
    assert _tags(code[-1]) == {"ui"}, "the app launch is the last cell"
    assert "--share" in code[-1].source and "--auth" in code[-1].source


def test_install_cell_keeps_the_runtime_torch_and_jupyter(monkeypatch):
    """Run the install cell with pip replaced by a recorder: what would Colab be asked to install?"""
    (cell,) = [c for c in _read().cells if "install" in _tags(c)]
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda args, **kwargs: calls.append(args))
    exec(compile(cell.source, "install-cell", "exec"), {"REPO": REPO, "sys": sys, "print": lambda *a: None})
    (args,) = calls
    assert args[:4] == [sys.executable, "-m", "pip", "install"]
    names = {a.split("==")[0] for a in args[4:] if "==" in a}
    assert {"transformers", "trl", "peft", "bitsandbytes", "gradio", "gguf"} <= names
    # torch is importable here, as on Colab: its CUDA build stays; TF and the test tools would clash with Colab's.
    assert not names & {"torch", "tensorflow-cpu", "keras", "keras-hub", "ipykernel", "nbclient", "nbformat", "pytest"}


def test_offline_cells_run_the_whole_flow(tmp_path, monkeypatch):
    nb = _read()
    nb.cells = [c for c in nb.cells if not _tags(c) & SKIPPED_TAGS]
    # The kernel inherits this environment: runs go to tmp_path, builtin models to the test session's cache.
    monkeypatch.setenv("AUTOTUNING_OUTPUT_ROOT", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    assert os.environ.get("AUTOTUNING_CACHE")  # conftest's per-session cache, never the user's
    client = NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(REPO)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails

    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    record = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    assert record["status"] == "finished"
    assert record["global_step"] == 12
    results = json.loads((run_dir / "eval_results.json").read_text(encoding="utf-8"))
    assert results["eval_loss"] > 0 and "base_eval_loss" in results
    assert (run_dir / "merged" / "model.safetensors").is_file()
    assert (run_dir / "gguf" / "model-q8_0.gguf").is_file() and (run_dir / "gguf" / "Modelfile").is_file()
    assert record["exports"]["gguf"]["tokenizer_ids_match"] is True

    text = "\n".join(
        o.get("text", "") if o.output_type == "stream" else json.dumps(o.get("data", {}))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    assert "loss" in text and "finished in" in text
    assert "eval_loss" in text and "fine-tuned" in text  # the metrics table
    assert "greedy agreement" in text
