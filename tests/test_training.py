"""Tiny-model runs: every fine-tuning type trains on its bundled sample, and the pieces around it work."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from autotuning.config import ConfigError, FineTuningType, load_config
from autotuning.recipe import run_job
from autotuning.runs import MetricsSink, read_metrics

# QA and RAG prompts carry passages: the tiny tokenizer needs ~750 tokens for the longest.
_SEQ = {FineTuningType.QA: 512, FineTuningType.RAG: 768}


def _config(tmp_path, kind: FineTuningType, **extra):
    sets = {
        "fine_tuning_type": kind.value,
        "dataset_path": "sample",
        "output_dir": str(tmp_path / kind.value),
        "max_seq_length": _SEQ.get(kind, 384),
        "max_steps": 20,
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-3,
        "logging_steps": 2,
        "save_steps": 10,
        "eval_split": 0.1,
    }
    sets.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


@pytest.mark.parametrize("kind", list(FineTuningType))
def test_each_type_trains_on_its_sample(kind, tmp_path):
    config = _config(tmp_path, kind)
    result = run_job(config, show_progress=False)
    assert result.status == "finished" and result.global_step == 20
    # LoRA B matrices start at zero: any non-zero value means the adapter learned something.
    adapter = load_file(str(result.run_dir / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(float(v.abs().sum()) > 0 for v in lora_b)
    results = json.loads((result.run_dir / "eval_results.json").read_text())
    assert math.isfinite(results["eval_loss"]) and results["eval_tokens"] > 0
    assert 0.0 <= results["accuracy"] <= 1.0 and 0.0 <= results["f1"] <= 1.0
    assert results["perplexity"] == pytest.approx(math.exp(results["eval_loss"]))
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["status"] == "finished"
    assert run["exports"]["torch"]["max_abs_logit_diff"] <= 1e-4
    events = read_metrics(result.run_dir / "metrics.jsonl")
    assert [e for e in events if e["type"] == "train" and math.isfinite(e["loss"])]


def test_stop_saves_checkpoint_and_resume_continues_the_same_curve(tmp_path):
    config = _config(tmp_path, FineTuningType.INSTRUCTION, max_steps=16, save_steps=100, logging_steps=1, eval_split=0)
    stop = threading.Event()
    sink = MetricsSink()

    class StopAt:
        """Request a stop once step 6 has been logged (as a user pressing Stop would)."""

        def __init__(self, inner):
            self.inner = inner

        def emit(self, event):
            self.inner.emit(event)
            if event.get("step", 0) >= 6:
                stop.set()

        def __getattr__(self, name):
            return getattr(self.inner, name)

    first = run_job(config, stop_event=stop, sink=StopAt(sink), show_progress=False)
    assert first.status == "stopped"
    stopped_step = first.global_step
    assert 6 <= stopped_step < 16
    run = json.loads((first.run_dir / "run.json").read_text())
    assert run["status"] == "stopped"
    checkpoint = first.run_dir / "checkpoints" / f"checkpoint-{stopped_step}"
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    assert not (first.run_dir / "merged").exists()

    resumed = run_job(config.replace(resume=True), show_progress=False)
    assert resumed.status == "finished" and resumed.global_step == 16
    steps = [e["step"] for e in read_metrics(resumed.run_dir / "metrics.jsonl") if e["type"] == "train"]
    # One continuous curve: every step once, in order, across the stop.
    assert steps == sorted(set(steps)) and steps[-1] == 16 and stopped_step + 1 in steps


def test_full_fine_tune_exports_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    config = _config(
        tmp_path, FineTuningType.INSTRUCTION, peft_type="none", max_steps=4, learning_rate=1e-3, eval_split=0
    )
    result = run_job(config, show_progress=False)
    assert result.status == "finished"
    assert not (result.run_dir / "adapter").exists()
    model = AutoModelForCausalLM.from_pretrained(result.run_dir / "merged", dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("quant", [{"quantization": "4bit", "peft_type": "qlora"}, {"quantization": "8bit"}])
def test_quantized_lora_trains_and_merges_into_an_unquantized_model(tmp_path, jsonl, quant):
    from transformers import AutoModelForCausalLM

    # A few rows repeated: the loss must fall clearly within 12 steps (noise between random rows would hide it).
    facts = [
        ("Name the capital of France.", "Paris is the capital of France."),
        ("What colour is the sky on a clear day?", "The sky is blue on a clear day."),
        ("How many legs does a spider have?", "A spider has eight legs."),
        ("What do bees make?", "Bees make honey."),
    ]
    path = jsonl([{"instruction": q, "output": a} for q, a in facts] * 10)
    # The builtin models' sizes are multiples of 64, which bitsandbytes' 4-bit CPU kernels need.
    config = _config(
        tmp_path,
        FineTuningType.INSTRUCTION,
        dataset_path=str(path),
        max_steps=12,
        logging_steps=1,
        eval_split=0,
        learning_rate=1e-2,
        warmup_ratio=0,
        **quant,
    )
    result = run_job(config, show_progress=False)
    assert result.status == "finished"
    losses = [e["loss"] for e in read_metrics(result.run_dir / "metrics.jsonl") if e.get("type") == "train"]
    assert len(losses) >= 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    merged = AutoModelForCausalLM.from_pretrained(result.run_dir / "merged", dtype=torch.float32)
    assert not getattr(merged, "is_quantized", False)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert result.exports["torch"]["max_abs_logit_diff"] <= 1e-4
    assert result.exports["torch"]["reference"] == "fp32 base + adapter (unmerged)"


def test_out_of_memory_retries_with_a_smaller_batch_then_checkpointing(tmp_path, monkeypatch):
    """An injected OOM: batch 4 -> 2 -> 1 (accumulation 1 -> 2 -> 4), then gradient checkpointing; same effective batch."""
    from transformers import TrainerCallback

    import autotuning.recipe as recipe

    seen = []

    class InjectOOM(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen.append(
                (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.gradient_checkpointing)
            )
            if state.global_step == 2 and not args.gradient_checkpointing:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")

    real_build = recipe.build_trainer

    def build_with_injection(*args, **kwargs):
        kwargs["callbacks"] = [*kwargs["callbacks"], InjectOOM()]
        return real_build(*args, **kwargs)

    monkeypatch.setattr(recipe, "build_trainer", build_with_injection)
    sink = MetricsSink()
    config = _config(tmp_path, FineTuningType.INSTRUCTION, max_steps=6, eval_split=0, logging_steps=1)
    result = run_job(config, sink=sink, show_progress=False)

    assert result.status == "finished" and result.global_step == 6
    attempts = sorted({s for s in seen}, key=lambda s: (-s[0], s[2]))
    assert attempts == [(4, 1, False), (2, 2, False), (1, 4, False), (1, 4, True)]
    notices = [e for e in sink.events(0) if e.get("type") == "notice"]
    assert [n["kind"] for n in notices] == ["oom_retry"] * 3
    assert "per_device_train_batch_size 4 -> 2" in notices[0]["message"]
    assert "gradient_checkpointing false -> true" in notices[2]["message"]
    record = json.loads((result.run_dir / "run.json").read_text())
    assert [r["change"] for r in record["oom_retries"]] == [n["change"] for n in notices]
    assert record["effective_config"]["gradient_checkpointing"] is True
    # The retry restarted from fresh weights (no checkpoint yet): the curve has one point per step, in order.
    steps = [e["step"] for e in read_metrics(result.run_dir / "metrics.jsonl") if e.get("type") == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    assert "out of memory at step 2" in (result.run_dir / "train.log").read_text()


def test_an_out_of_memory_retry_frees_the_failed_model_before_loading_the_next(tmp_path, monkeypatch):
    """After an OOM with no checkpoint yet, the retry reloads the weights: the failed attempt's model is gone by
    then (the traceback's frames freed outside the except block, the job's own references dropped)."""
    import gc

    from transformers import PreTrainedModel, TrainerCallback

    import autotuning.recipe as recipe

    class InjectOOM(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1 and args.per_device_train_batch_size == 4:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")

    real_build, real_load = recipe.build_trainer, recipe.load_model
    resident = []

    def build_with_injection(*args, **kwargs):
        kwargs["callbacks"] = [*kwargs["callbacks"], InjectOOM()]
        return real_build(*args, **kwargs)

    def counting_load(*args, **kwargs):
        gc.collect()
        resident.append(sum(isinstance(o, PreTrainedModel) for o in gc.get_objects()))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(recipe, "build_trainer", build_with_injection)
    monkeypatch.setattr(recipe, "load_model", counting_load)
    config = _config(tmp_path, FineTuningType.INSTRUCTION, max_steps=3, eval_split=0, logging_steps=1)
    result = run_job(config.replace(peft_type="lora", save_steps=100), show_progress=False)
    assert result.status == "finished" and result.global_step == 3
    assert resident == [0, 0]  # the first load, and the retry's: no model of the failed attempt left alive


def test_token_never_reaches_the_run_directory(tmp_path, monkeypatch):
    sentinel = "hf_SENTINEL_do_not_write_0123456789"
    monkeypatch.setenv("HF_TOKEN", sentinel)
    config = _config(tmp_path, FineTuningType.INSTRUCTION, max_steps=2, eval_split=0.1)
    assert config.model.hf_token == sentinel
    result = run_job(config, show_progress=False)
    assert result.status == "finished"
    for path in result.run_dir.rglob("*"):
        if path.is_file():
            assert sentinel.encode() not in path.read_bytes(), f"token written to {path}"


def test_early_stopping_restores_the_best_checkpoint(tmp_path):
    # A learning rate far too high makes the eval loss get worse after the first evaluation.
    config = _config(
        tmp_path,
        FineTuningType.INSTRUCTION,
        max_steps=40,
        learning_rate=3.0,
        warmup_ratio=0.0,
        lr_scheduler_type="constant",
        eval_steps=2,
        early_stopping_patience=1,
        load_best_model_at_end="true",
        save_total_limit=5,
    )
    result = run_job(config, show_progress=False)
    assert result.status == "finished" and result.global_step < 40
    run = json.loads((result.run_dir / "run.json").read_text())
    selection = run["checkpoint_selection"]
    assert selection["early_stopped"] and selection["restored"]
    evals = [e for e in read_metrics(result.run_dir / "metrics.jsonl") if e["type"] == "eval"]
    best = min(evals, key=lambda e: e["eval_loss"] if math.isfinite(e["eval_loss"]) else float("inf"))
    assert selection["best_checkpoint"].endswith(f"checkpoint-{best['step']}")
    # The exported adapter is the restored best checkpoint's, not the last step's.
    best_adapter = load_file(str(Path(selection["best_checkpoint"]) / "adapter_model.safetensors"))
    final_adapter = load_file(str(result.run_dir / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(best_adapter[k], final_adapter[k]) for k in best_adapter)


def test_best_checkpoint_options_need_evaluation():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["early_stopping_patience=2", "eval_steps=0"])
    assert "eval_steps" in str(err.value)


def test_evaluate_run_writes_task_metrics_and_predictions(tmp_path):
    from autotuning.evaluation import evaluate_run

    config = _config(tmp_path, FineTuningType.QA, max_steps=4)
    result = run_job(config, show_progress=False)
    report = evaluate_run(result.run_dir, generations=3, max_new_tokens=8)
    results = report["results"]
    assert results["gen_samples"] == 3 and 0 <= results["gen_exact_match"] <= 1 and 0 <= results["gen_f1"] <= 1
    assert 0 <= results["gen_choice_accuracy"] <= 1  # the QA sample has choices
    predictions = [json.loads(line) for line in (result.run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 3 and {"prompt", "references", "prediction"} <= set(predictions[0])
    saved = json.loads((result.run_dir / "eval_results.json").read_text())
    assert saved["gen_samples"] == 3
    # The base model is scored on the same rows, next to the fine-tuned one.
    assert {"base_eval_loss", "base_accuracy", "base_gen_exact_match", "base_gen_f1"} <= set(saved)
    assert saved["base_eval_loss"] != saved["eval_loss"]
    assert "base_prediction" in predictions[0]


def test_default_batches_are_not_padded_to_max_seq_length(tmp_path, jsonl):
    """Rows are padded to the longest in their batch (never to max_seq_length) and length grouping cuts padding."""
    from autotuning.data import prepare_data
    from autotuning.data.loading import sample_path

    sample = [json.loads(line) for line in sample_path(FineTuningType.INSTRUCTION).read_text().splitlines()]
    path = jsonl(sample * 8)  # 960 rows: enough for the sampler's length-sorted megabatches
    from autotuning.modeling import apply_peft, load_model, load_tokenizer
    from autotuning.training import build_trainer

    def padding(**extra):
        config = _config(
            tmp_path,
            FineTuningType.INSTRUCTION,
            dataset_path=path,
            max_seq_length=1024,
            per_device_train_batch_size=8,
            eval_split=0,
            **extra,
        )
        tokenizer = load_tokenizer(config)
        data = prepare_data(config, tokenizer)
        loaded = load_model(config)
        trainer = build_trainer(
            config,
            apply_peft(loaded.model, config),
            tokenizer,
            data.train,
            None,
            tmp_path / "ckpt",
            loaded.precision,
            callbacks=[],
            show_progress=False,
        )
        real = total = 0
        widths = []
        for batch in trainer.get_train_dataloader():  # one epoch
            real += int(batch["attention_mask"].sum())
            total += batch["input_ids"].numel()
            widths.append(batch["input_ids"].shape[1])
        return 1 - real / total, max(widths)

    grouped, widest = padding()
    shuffled, _ = padding(group_by_length=False)
    assert widest < 1024  # the longest sample row is far shorter than max_seq_length: no padding up to it
    assert grouped < 0.5 * shuffled, (grouped, shuffled)


def test_auto_precision_falls_back_to_fp32_when_this_cpus_bf16_is_off(tmp_path, monkeypatch):
    """precision: auto picks bf16 on a CPU with bf16 instructions only if the model computes the same with it."""
    import autotuning.modeling as modeling
    import autotuning.recipe as recipe

    monkeypatch.setattr(modeling, "cpu_supports_bf16", lambda: True)
    real_check = modeling.check_cpu_bf16
    monkeypatch.setattr(  # where the recipe looks it up
        recipe, "check_cpu_bf16", lambda *a, **k: {**real_check(*a, **k), "max_relative_logit_diff": 0.9, "ok": False}
    )
    config = _config(tmp_path, FineTuningType.INSTRUCTION, max_steps=2, eval_split=0, eval_generations=0)
    result = run_job(config, show_progress=False)
    run = json.loads((result.run_dir / "run.json").read_text())
    assert result.status == "finished" and run["precision"] == "fp32"
    assert run["precision_check"]["ok"] is False and run["precision_check"]["precision"] == "fp32"
    assert "training in fp32 instead" in (result.run_dir / "train.log").read_text()
