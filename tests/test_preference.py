"""Preference tuning (DPO, ORPO, SimPO, KTO): config checks, TRL trainers on the bundled samples, the reference
model as the disabled adapter, and the answer-token mask of chosen and rejected."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from autotuning.cli import main as cli_main
from autotuning.config import ConfigError, load_config
from autotuning.data import encode_answer, prepare_preference_data
from autotuning.errors import DataError
from autotuning.modeling import apply_peft, load_model, load_tokenizer
from autotuning.recipe import run_job
from autotuning.runs import load_run_config, read_metrics
from autotuning.training.preference import REFERENCE_ADAPTER, build_preference_trainer


def _config(tmp_path, method: str, **sets):
    values = {
        "model_name": "builtin:tiny-llama",
        "training_method": method,
        "dataset_path": "sample",
        "output_dir": tmp_path / "run",
        "peft_type": "lora",
        "max_steps": 10,
        "learning_rate": 5e-3,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "max_seq_length": 128,
        "eval_split": 0.1,
        "eval_generations": 1,
        "eval_max_new_tokens": 4,
        **sets,
    }
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


@pytest.mark.parametrize(
    ("sets", "field"),
    [
        ({"dpo_loss_type": "ipo"}, "dpo_loss_type"),  # a DPO knob on an SFT run
        ({"training_method": "orpo", "simpo_gamma": 1.0}, "simpo_gamma"),
        ({"training_method": "dpo", "desirable_weight": 2.0}, "desirable_weight"),
        ({"training_method": "kto", "best_metric": "reward_accuracy"}, "best_metric"),
        ({"training_method": "dpo", "beta": -1}, "beta"),
        ({"training_method": "dpo", "packing": True}, "packing"),
    ],
)
def test_a_knob_the_method_does_not_use_is_refused_naming_it(sets, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{k}={v}" for k, v in sets.items()])
    assert field in err.value.where or field in err.value.message


def test_beta_zero_means_the_methods_own_default():
    assert load_config(None, ["training_method=simpo"]).preference.resolved_beta() == 2.0
    assert load_config(None, ["training_method=dpo"]).preference.resolved_beta() == 0.1
    assert load_config(None, ["training_method=dpo", "beta=0.3"]).preference.resolved_beta() == 0.3


def test_an_sft_file_given_to_dpo_is_refused_before_anything_is_written(tmp_path):
    from autotuning.config import FineTuningType
    from autotuning.data import sample_path

    config = _config(tmp_path, "dpo", dataset_path=sample_path(FineTuningType.INSTRUCTION))
    with pytest.raises(DataError) as err:
        prepare_preference_data(config, load_tokenizer(config))
    assert "no preference between answers" in err.value.message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["dpo", "orpo", "simpo", "kto"])
def test_each_method_trains_ten_steps_on_the_bundled_sample_and_exports(tmp_path, method):
    result = run_job(_config(tmp_path, method), show_progress=False)
    assert result.status == "finished" and result.global_step == 10
    events = read_metrics(result.run_dir / "metrics.jsonl")
    losses = [e["loss"] for e in events if e["type"] == "train"]
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    # The reward charts' series: every step of a paired method; KTO logs a margin when a batch holds both kinds.
    rewarded = ["reward_chosen" in e and "reward_margin" in e for e in events if e["type"] == "train"]
    assert all(rewarded) if method != "kto" else any(rewarded)
    assert result.exports["torch"]["status"] == "verified"
    results = json.loads((result.run_dir / "eval_results.json").read_text())
    assert "preference_margin" in results and "base_preference_margin" in results and "reward_margin" in results
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["training_method"] == method


def _trainer(tmp_path, method="dpo"):
    config = _config(tmp_path, method)
    tokenizer = load_tokenizer(config)
    data = prepare_preference_data(config, tokenizer)
    loaded = load_model(config)
    model = apply_peft(loaded.model, config)
    trainer = build_preference_trainer(
        config, model, tokenizer, data.train, None, tmp_path / "ckpt", "fp32", callbacks=[], show_progress=False
    )
    return config, tokenizer, data, trainer


def test_the_reference_is_the_base_with_the_adapter_disabled(tmp_path):
    config, _tokenizer, _data, trainer = _trainer(tmp_path, "dpo")
    model = trainer.model
    assert REFERENCE_ADAPTER not in model.peft_config  # TRL's copy of the adapter is dropped
    pristine = load_model(config).model.eval()
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    trainer.train()  # the adapter moves away from zero
    model.eval()
    with torch.no_grad():
        expected = pristine(input_ids=ids).logits
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            reference = model(input_ids=ids).logits
    assert torch.allclose(reference, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(tuned, expected, atol=1e-4, rtol=0)  # the adapter did train


def _collated_mask_text(trainer, tokenizer, index: int = 0) -> tuple[str, str]:
    """The text of the tokens TRL's collator marks as completion, for chosen and rejected of one row."""
    batch = trainer.data_collator([trainer.train_dataset[index]])
    ids, mask = batch["input_ids"], batch["completion_mask"]
    chosen, rejected = (tokenizer.decode(ids[i][mask[i].bool()]) for i in (0, 1))
    return chosen, rejected


def _check_mask(trainer, tokenizer, data) -> None:
    row = data.train_rows[0]
    chosen, rejected = _collated_mask_text(trainer, tokenizer)
    assert row["chosen"][0]["content"] in chosen and row["rejected"][0]["content"] in rejected
    assert row["prompt"][-1]["content"] not in chosen + rejected  # the prompt is never in the loss
    # The evaluation and the Dataset tab's preview mark the same tokens as trained.
    ids, start = encode_answer(tokenizer, row["prompt"], row["chosen"], 10_000)
    assert tokenizer.decode(ids[start:]) == chosen


def test_only_the_answer_tokens_of_chosen_and_rejected_count(tmp_path):
    _config_, tokenizer, data, trainer = _trainer(tmp_path, "dpo")
    _check_mask(trainer, tokenizer, data)


@pytest.mark.real_model
def test_only_the_answer_tokens_count_with_a_real_tokenizer(tmp_path, smollm2_dir):
    config = _config(tmp_path, "dpo", model_name=smollm2_dir)
    tokenizer = load_tokenizer(config)
    data = prepare_preference_data(config, tokenizer)
    from trl import DPOConfig, DPOTrainer

    # The collator's mask comes from TRL's tokenisation; a tiny stand-in model is enough to build the trainer.
    tiny = _config(tmp_path, "dpo")
    model = apply_peft(load_model(tiny).model, tiny)
    args = DPOConfig(output_dir=str(tmp_path / "ckpt"), report_to="none", use_cpu=True, bf16=False)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data.train, processing_class=tokenizer)
    _check_mask(trainer, tokenizer, data)
    chosen, _ = _collated_mask_text(trainer, tokenizer)
    assert chosen.rstrip().endswith("<|im_end|>")  # the end of the turn is trained: the model learns to stop


# Memorisable pairs: every chosen answer names a word of one set, every rejected one a word of the other, each word
# one token of the tiny tokenizer. The held-out pairs are new pairings of words seen in training, so a model that
# learns the preference ranks them right, and the base, which has no reason to prefer either set, is near chance.
_GOOD = ["blue", "book", "clean", "cool", "easy", "code", "cup", "car", "air", "day"]
_BAD = ["acid", "burn", "cold", "dry", "death", "empty", "break", "black", "ban", "blood"]


def _memorisable_pairs(path) -> str:
    rng = random.Random(0)
    rows = []
    for good in _GOOD:
        for bad in _BAD:
            first, second = (good, bad) if rng.random() < 0.5 else (bad, good)
            rows.append(
                {"prompt": f"Pick one: {first} or {second}.", "chosen": f"I pick {good}.", "rejected": f"I pick {bad}."}
            )
    rng.shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_dpo_learns_memorisable_pairs_on_held_out_pairs(tmp_path):
    # 40 steps at 5e-3 ranked 19 or 20 of the 20 held-out pairs right at seeds 42, 1, 2, 3 and 7 (base 0.55 to 0.75).
    data = _memorisable_pairs(tmp_path / "pairs.jsonl")
    config = _config(tmp_path, "dpo", dataset_path=data, max_steps=40, per_device_train_batch_size=8, eval_split=0.2)
    assert all(len(load_tokenizer(config).tokenize(f" {w}")) == 1 for w in _GOOD + _BAD)
    result = run_job(config, show_progress=False)
    assert result.status == "finished"
    results = json.loads((result.run_dir / "eval_results.json").read_text())
    assert results["eval_pairs"] == 20
    assert results["base_preference_accuracy"] <= 0.8  # the base does not already know the preference
    assert results["preference_accuracy"] >= 0.9
    assert results["reward_accuracy"] >= 0.9
    assert results["preference_margin"] - results["base_preference_margin"] > 1.0  # nats, mean over held-out pairs


def test_early_stopping_and_the_best_checkpoint_on_reward_accuracy(tmp_path):
    # Held-out reward accuracy climbs to its ceiling within a few evaluations, then cannot improve: early stopping
    # ends the run, and the checkpoint kept is the first evaluation that reached the highest accuracy.
    data = _memorisable_pairs(tmp_path / "pairs.jsonl")
    config = _config(
        tmp_path,
        "dpo",
        dataset_path=data,
        max_steps=60,
        per_device_train_batch_size=8,
        eval_split=0.2,
        eval_steps=2,
        best_metric="reward_accuracy",
        early_stopping_patience=2,
        load_best_model_at_end="true",
        save_total_limit=10,
    )
    result = run_job(config, show_progress=False)
    assert result.status == "finished" and result.global_step < 60
    selection = json.loads((result.run_dir / "run.json").read_text())["checkpoint_selection"]
    assert selection["metric"] == "eval_reward_accuracy" and selection["early_stopped"] and selection["restored"]
    evals = [e for e in read_metrics(result.run_dir / "metrics.jsonl") if e["type"] == "eval"]
    accuracies = [e["eval_reward_accuracy"] for e in evals]
    best = evals[accuracies.index(max(accuracies))]  # the first at the highest: a tie is no improvement
    assert selection["best_checkpoint"].endswith(f"checkpoint-{best['step']}")
    assert selection["best_value"] == pytest.approx(best["eval_reward_accuracy"])
    assert "highest reward accuracy" in selection["why"]
    best_adapter = load_file(str(Path(selection["best_checkpoint"]) / "adapter_model.safetensors"))
    final_adapter = load_file(str(result.run_dir / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(best_adapter[k], final_adapter[k]) for k in best_adapter)


def test_an_sft_run_chained_into_dpo_starts_from_its_merged_model(tmp_path):
    from autotuning.config import FineTuningType
    from autotuning.data import sample_path

    sft = _config(tmp_path / "sft", "sft", dataset_path=sample_path(FineTuningType.INSTRUCTION), max_steps=6)
    sft_result = run_job(sft, show_progress=False)
    assert sft_result.exports["torch"]["status"] == "verified"
    settings = {
        "model_name": "builtin:tiny-llama",
        "training_method": "dpo",
        "base_run": str(sft_result.run_dir),
        "dataset_path": "sample",
        "max_steps": 6,
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-3,
        "max_seq_length": 128,
        "eval_split": 0.1,
        "eval_generations": 1,
        "eval_max_new_tokens": 4,
        "save_format": ["torch", "gguf"],
        "gguf_type": "q8_0",
        "output_dir": str(tmp_path / "dpo"),
    }
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    assert cli_main(["train", "--config", str(path), "--quiet"]) == 0
    record = json.loads((tmp_path / "dpo" / "run.json").read_text())
    assert record["status"] == "finished" and record["base_run"] == str(sft_result.run_dir)
    assert {fmt: record["exports"][fmt]["status"] for fmt in ("torch", "gguf")} == dict.fromkeys(
        ("torch", "gguf"), "verified"
    )
    # The SFT model is this run's base: the reference of DPO, and the model the evaluation compares with.
    saved = load_run_config(tmp_path / "dpo")
    assert Path(saved.model.model_name) == (sft_result.run_dir / "merged").resolve()
    results = json.loads((tmp_path / "dpo" / "eval_results.json").read_text())
    assert math.isfinite(results["reward_margin"]) and "base_preference_margin" in results


@pytest.mark.real_model
def test_dpo_trains_smollm2_through_the_cli_and_its_exports_verify(tmp_path, smollm2_dir, tested_with):
    settings = {
        "model_name": str(smollm2_dir),
        "training_method": "dpo",
        "dataset_path": "sample",
        "max_seq_length": 128,
        "peft_type": "lora",
        "lora_r": 16,
        "lora_alpha": 32,
        "max_steps": 12,
        "learning_rate": 5e-5,
        "warmup_ratio": 0.0,
        "lr_scheduler_type": "constant",
        "per_device_train_batch_size": 4,
        "logging_steps": 2,
        "eval_split": 0.1,
        "eval_generations": 2,
        "eval_max_new_tokens": 8,
        "save_format": ["torch", "gguf"],
        "gguf_type": "q8_0",
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    started = time.monotonic()
    assert cli_main(["train", "--config", str(path), "--quiet"]) == 0
    elapsed = time.monotonic() - started
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert record["status"] == "finished" and record["training_method"] == "dpo"
    assert {fmt: record["exports"][fmt]["status"] for fmt in ("torch", "gguf")} == dict.fromkeys(
        ("torch", "gguf"), "verified"
    )
    # On held-out pairs (not trained on), the tuned model prefers the chosen answers by more than the base does.
    assert results["preference_margin"] > results["base_preference_margin"]
    assert results["reward_accuracy"] >= 0.9
    tested_with.record(smollm2_dir, "dpo", record, results, elapsed)
