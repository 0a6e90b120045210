"""The loss mask: only the answer tokens (and the EOS that ends them) are trained, for every type."""

from __future__ import annotations

import pytest

from autotuning.config import FineTuningType, load_config
from autotuning.data import encode_example, load_rows, normalise_rows, prepare_data
from autotuning.modeling import load_model, load_tokenizer
from autotuning.training import build_trainer


def _cfg(kind: FineTuningType, model: str = "builtin:tiny-llama", **extra):
    sets = [f"fine_tuning_type={kind.value}", f"model_name={model}", "dataset_path=sample", "max_seq_length=1024"]
    sets += [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, sets)


@pytest.mark.parametrize("kind", list(FineTuningType))
def test_trained_tokens_decode_to_exactly_the_answer(kind, tmp_path):
    import datasets

    config = _cfg(kind)
    tokenizer = load_tokenizer(config)
    raw = load_rows(kind, "sample")
    _, rows, _ = normalise_rows(raw, config)
    example = rows[0]
    answer = example["completion"][0]["content"]
    enc = encode_example(tokenizer, example, 1024)
    assert not enc.truncated
    # Through TRL: the labels SFTTrainer builds from our completion mask.
    model = load_model(config).model
    trainer = build_trainer(
        config,
        model,
        tokenizer,
        datasets.Dataset.from_list([enc.as_row()]),
        None,
        tmp_path,
        "fp32",
        callbacks=[],
        show_progress=False,
    )
    labels = trainer.train_dataset[0]["labels"]
    trained = [t for t in labels if t != -100]
    assert tokenizer.decode(trained) == answer + tokenizer.eos_token
    assert trained[-1] == tokenizer.eos_token_id
    # ...and the collated batch agrees (what the loss actually sees).
    batch = trainer.data_collator([trainer.train_dataset[0]])
    seen = [t for t in batch["labels"][0].tolist() if t != -100]
    assert seen == trained
    # The prompt part is exactly what inference renders (chat template + generation prompt).
    prompt = tokenizer.apply_chat_template(example["prompt"], tokenize=False, add_generation_prompt=True)
    masked = [t for t, lab in zip(trainer.train_dataset[0]["input_ids"], labels) if lab == -100]
    assert tokenizer.decode(masked) == prompt


@pytest.mark.parametrize("model", ["builtin:tiny-gpt2", "builtin:tiny-qwen2"])
def test_mask_for_other_builtin_families(model):
    config = _cfg(FineTuningType.CHAT, model=model)
    tokenizer = load_tokenizer(config)
    _, rows, _ = normalise_rows(load_rows(FineTuningType.CHAT, "sample"), config)
    multi_turn = next(r for r in rows if len(r["prompt"]) >= 3)  # earlier assistant turns stay in the prompt
    enc = encode_example(tokenizer, multi_turn, 1024)
    trained = [t for t, m in zip(enc.input_ids, enc.completion_mask) if m]
    assert tokenizer.decode(trained) == multi_turn["completion"][0]["content"] + tokenizer.eos_token


def test_truncation_never_silently_drops_the_answer(jsonl):
    long_prompt = "word " * 400
    path = jsonl(
        [
            {"instruction": long_prompt, "input": "", "output": "lost"},
            {"instruction": "short", "input": "", "output": "kept " * 100},
            {"instruction": "fine", "input": "", "output": "ok"},
        ]
    )
    config = load_config(None, [f"dataset_path={path}", "max_seq_length=64", "eval_split=0"])
    tokenizer = load_tokenizer(config)
    data = prepare_data(config, tokenizer)
    stats = data.stats["train"]
    assert stats["answer_lost_rows"] == 1  # counted and dropped, not trained as a no-op
    assert stats["truncated_rows"] == 1  # the long answer was cut, still trained
    assert len(data.train) == 2
    for row in data.train:
        assert len(row["input_ids"]) <= 64 and sum(row["completion_mask"]) > 0
