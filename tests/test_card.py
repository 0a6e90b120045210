"""The model card (README.md) a run writes beside merged/ and adapter/: Hub metadata, checksums, refreshed on export."""

from __future__ import annotations

import hashlib
import logging
import re

import pytest
from huggingface_hub import ModelCard

from autotuning.export import export_run
from autotuning.modeling import base_model_license, hub_model_id
from autotuning.report import write_report
from autotuning.runs import RunDir

TOKEN = "hf_SENTINEL_card_4242"


@pytest.fixture
def run(exported_tiny_run) -> RunDir:
    """The session's 2-step tiny Llama run, evaluated, exported to torch and GGUF (tests/conftest.py)."""
    return exported_tiny_run


def _card_files(text: str) -> dict[str, str]:
    """file -> sha256, from the card's Files table."""
    return dict(re.findall(r"^\| (\S+) \| \d+ \| ([0-9a-f]{64}) \|$", text, flags=re.M))


def test_the_run_writes_a_card_the_hub_library_reads(run):
    merged, adapter = ModelCard.load(run.merged / "README.md"), ModelCard.load(run.adapter / "README.md")
    for card in (merged, adapter):
        assert card.data.pipeline_tag == "text-generation"
        assert {"autotuning", "sft", "lora", "gguf"} <= set(card.data.tags)
        assert card.data.base_model is None  # a builtin model is no Hub model: named in the text only
        assert "`builtin:tiny-llama` (not a Hub model)" in card.text
        assert "Dataset fingerprint: `" in card.text and run.read()["dataset"]["fingerprint"] in card.text
        assert "supervised fine-tuning (SFT) of the instruction_fine_tuning kind, LoRA (r 16" in card.text
    assert merged.data.library_name == "transformers" and adapter.data.library_name == "peft"
    # How to load it: transformers, peft, llama.cpp and Ollama (this run has a GGUF).
    for snippet in (
        "AutoModelForCausalLM.from_pretrained(",
        "PeftModel.from_pretrained(",
        "llama-cli -m ",
        "ollama create",
    ):
        assert snippet in merged.text
    # Base vs fine-tuned from eval_results.json, and the verification figures from run.json.
    results = run.read()["eval_results"]
    assert re.search(
        rf"^\| eval_loss \| {results['base_eval_loss']:.4g} \| {results['eval_loss']:.4g} \|", merged.text, re.M
    )
    assert re.search(r"^\| torch \| verified \| float32 \| [0-9.e-]+ \(≤ ", merged.text, re.M)
    assert re.search(r"^\| gguf \| \w+ \| q8_0 \|", merged.text, re.M)


def test_checksums_in_the_card_are_the_files_real_sha256(run):
    listed = _card_files((run.merged / "README.md").read_text(encoding="utf-8"))
    on_disk = {
        str(p.relative_to(run.path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for folder in (run.merged, run.adapter, run.path / "gguf")
        for p in folder.rglob("*")
        if p.is_file() and p.name != "README.md"
    }
    assert listed == on_disk
    assert "merged/model.safetensors" in listed and "gguf/model-q8_0.gguf" in listed


def test_metadata_names_hub_ids_and_the_license_and_never_the_token(run, monkeypatch):
    """What the job records about a Hub base (base_model_id, base_license) and a Hub dataset reaches the YAML."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the CLI's configs take it: it must still never reach a card
    record = run.read()
    run.update(
        base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        base_license="apache-2.0",
        dataset={**record["dataset"], "source": "hub:tatsu-lab/alpaca"},
    )
    try:
        write_report(run.path)
        card = ModelCard.load(run.merged / "README.md")
        assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert card.data.license == "apache-2.0"
        assert card.data.datasets == ["tatsu-lab/alpaca"]
        assert card.data.eval_results and card.data.eval_results[0].dataset_type == "tatsu-lab/alpaca"
        assert "from_pretrained('HuggingFaceTB/SmolLM2-135M-Instruct')" in card.text  # the adapter's base
        for path in (run.merged / "README.md", run.adapter / "README.md"):
            text = path.read_text(encoding="utf-8")
            assert TOKEN not in text and "hf_token" not in text
    finally:
        run.update(**{k: record.get(k) for k in ("base_model_id", "base_license", "dataset")})
        write_report(run.path)


def test_a_reexport_refreshes_the_card(run):
    before = _card_files((run.merged / "README.md").read_text(encoding="utf-8"))
    (run.merged / "README.md").unlink()
    export_run(run.path, ["torch"])
    after = _card_files((run.merged / "README.md").read_text(encoding="utf-8"))
    assert after.keys() == before.keys()
    assert (
        after["merged/model.safetensors"] == hashlib.sha256((run.merged / "model.safetensors").read_bytes()).hexdigest()
    )


def test_a_card_that_cannot_be_written_is_a_warning_not_a_failure(run, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("disk says no")

    monkeypatch.setattr("autotuning.report.render.write_model_cards", broken)
    with caplog.at_level(logging.WARNING):
        html_path, md_path = write_report(run.path)
    assert html_path.is_file() and md_path.is_file()
    assert "could not write the model card" in caplog.text and "disk says no" in caplog.text


def test_base_model_id_and_license_of_each_kind_of_model_name(tmp_path):
    assert hub_model_id("builtin:tiny-llama") is None and base_model_license("builtin:tiny-llama") is None
    assert hub_model_id("pkg:smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_license("pkg:smollm2-135m-instruct") == "apache-2.0"
    assert hub_model_id("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert base_model_license("someone/not-in-the-cache") is None  # offline and not cached: not known
    local = tmp_path / "model"
    local.mkdir()
    assert hub_model_id(str(local)) is None and base_model_license(str(local)) is None
    (local / "README.md").write_text("---\nlicense: mit\n---\n# a model\n", encoding="utf-8")
    assert base_model_license(str(local)) == "mit"  # e.g. an earlier run's merged/, whose card carries it
