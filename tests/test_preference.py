"""Preference tuning (DPO, ORPO, SimPO, KTO): config checks, TRL trainers on the bundled samples, the reference
model as the disabled adapter, and the answer-token mask of chosen and rejected."""

from __future__ import annotations

import json
import math

import pytest
import torch

from autotuning.config import ConfigError, load_config
from autotuning.data import encode_answer, prepare_preference_data
from autotuning.errors import DataError
from autotuning.modeling import apply_peft, load_model, load_tokenizer
from autotuning.recipe import run_job
from autotuning.runs import read_metrics
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
