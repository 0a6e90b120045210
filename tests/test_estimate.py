"""The memory estimate: exact parameter counts, sensible directions, advice that fits, and measured CPU peaks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from autotuning.cli import main
from autotuning.config import load_config, quickstart_overrides
from autotuning.estimate import estimate_memory
from autotuning.modeling import apply_peft, load_model

REPO = Path(__file__).resolve().parents[1]

GiB = 1024**3


def _quick(*sets: str):
    return load_config(None, list(sets), defaults=quickstart_overrides())


@pytest.mark.parametrize("model", ["builtin:tiny-llama", "builtin:tiny-gpt2", "builtin:tiny-qwen2"])
@pytest.mark.parametrize("sets", [[], ["lora_target_modules=q_proj,v_proj"], ["peft_type=none"]])
def test_parameter_counts_match_the_loaded_model(model, sets):
    if "gpt2" in model and sets == ["lora_target_modules=q_proj,v_proj"]:
        sets = ["lora_target_modules=c_attn"]  # GPT-2 names its fused projection differently
    config = _quick(f"model_name={model}", *sets)
    estimate = estimate_memory(config, free_bytes=64 * GiB)
    model_ = apply_peft(load_model(config).model, config)
    assert estimate.facts["parameters"] == sum(p.numel() for p in load_model(config).model.parameters())
    assert estimate.facts["trainable_parameters"] == sum(p.numel() for p in model_.parameters() if p.requires_grad)


def test_estimate_moves_the_right_way():
    base = estimate_memory(_quick("max_seq_length=512", "per_device_train_batch_size=2"), "cuda", 64 * GiB)
    bigger_batch = estimate_memory(_quick("max_seq_length=512", "per_device_train_batch_size=4"), "cuda", 64 * GiB)
    checkpointed = estimate_memory(
        _quick("max_seq_length=512", "per_device_train_batch_size=2", "gradient_checkpointing=true"), "cuda", 64 * GiB
    )
    full = estimate_memory(_quick("max_seq_length=512", "peft_type=none"), "cuda", 64 * GiB)
    # On CPU the base is fp32 (on a GPU it is bf16, which 4-bit beats only where projections outweigh the
    # embeddings, which prepare_model_for_kbit_training keeps in fp32: not in a 0.8M-parameter model).
    fp32_base = estimate_memory(_quick("max_seq_length=512"), "cpu", 64 * GiB)
    four_bit = estimate_memory(_quick("max_seq_length=512", "quantization=4bit", "peft_type=qlora"), "cpu", 64 * GiB)
    assert bigger_batch.parts["activations"] == pytest.approx(2 * base.parts["activations"], rel=0.01)
    # Two layers: checkpointing keeps the layer inputs (fp32, 4h bytes per token each) plus one layer's
    # activations instead of two layers' activations (7424 instead of 11776 bytes per token for this model).
    assert checkpointed.parts["activations"] < 0.65 * base.parts["activations"]
    assert full.parts["optimizer_state"] == 8 * full.facts["parameters"]
    assert base.parts["optimizer_state"] == 8 * base.facts["trainable_parameters"]
    assert four_bit.parts["weights"] < fp32_base.parts["weights"]


def test_verdicts_and_a_suggestion_that_fits():
    config = _quick("per_device_train_batch_size=16", "max_seq_length=2048")
    need = estimate_memory(config, device="cuda", free_bytes=64 * GiB).total_bytes
    assert estimate_memory(config, "cuda", free_bytes=2 * need).verdict == "fits"
    assert estimate_memory(config, "cuda", free_bytes=int(need * 1.05)).verdict == "tight"
    short = estimate_memory(config, "cuda", free_bytes=int(need * 0.5))
    assert short.verdict == "will not fit"
    assert short.suggestions and short.suggestions[-1]["verdict"] == "fits"
    assert "gradient_accumulation_steps" in short.suggestions[0]["change"]  # same effective batch
    # Applying every suggested change gives a config whose estimate fits.
    changes = {k: v for s in short.suggestions for k, v in s["set"].items()}
    assert estimate_memory(config.replace(**changes), "cuda", free_bytes=int(need * 0.5)).verdict == "fits"


def test_cli_estimate_prints_breakdown_and_a_json_line(capsys):
    rc = main(
        [
            "estimate",
            "--set",
            "per_device_train_batch_size=16",
            "--set",
            "max_seq_length=2048",
            "--device",
            "cuda",
            "--free-gib",
            "1",
        ]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    summary = json.loads(out[-1])
    assert set(summary) == {"estimate_bytes", "free_bytes", "verdict"}
    assert summary["free_bytes"] == GiB and summary["verdict"] == "will not fit"
    text = "\n".join(out)
    for part in ("weights", "activations", "logits", "optimizer state", "suggestion:"):
        assert part in text


@pytest.mark.parametrize("case", ["tiny-llama-lora", "llama-100m-lora"])
def test_estimate_is_within_25_percent_of_the_measured_cpu_peak(case, tmp_path):
    """bench/memory.py trains the case in a fresh process and reads its peak RSS after training."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "memory.py"), "--case", case, "--workdir", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert result["status"] == "finished"
    assert abs(result["error"]) <= 0.25, result
