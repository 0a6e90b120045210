"""The loss mask: only the answer tokens (and the EOS that ends them) are trained, for every type."""

from __future__ import annotations

import pytest

from autotuning.config import FineTuningType, TrainedTurns, load_config
from autotuning.data import encode_example, end_of_turn_token_ids, load_rows, normalise_rows, prepare_data
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


def _trained_runs(tokenizer, ids: list[int], trained: list) -> list[str]:
    """The decoded runs of consecutive trained tokens (mask 1, or a label other than -100)."""
    runs: list[list[int]] = []
    previous = False
    for token, flag in zip(ids, trained):
        if flag and not previous:
            runs.append([])
        if flag:
            runs[-1].append(token)
        previous = bool(flag)
    return [tokenizer.decode(run) for run in runs]


@pytest.mark.parametrize("model", ["builtin:tiny-gpt2", "builtin:tiny-qwen2"])
def test_every_assistant_turn_is_trained_for_other_builtin_families(model):
    config = _cfg(FineTuningType.CHAT, model=model)
    tokenizer = load_tokenizer(config)
    _, rows, _ = normalise_rows(load_rows(FineTuningType.CHAT, "sample"), config)
    multi_turn = next(r for r in rows if len(r["prompt"]) >= 3)
    answers = [t["content"] for t in multi_turn["prompt"] + multi_turn["completion"] if t["role"] == "assistant"]
    assert len(answers) >= 2
    enc = encode_example(tokenizer, multi_turn, 1024)
    assert _trained_runs(tokenizer, enc.input_ids, enc.completion_mask) == [a + tokenizer.eos_token for a in answers]
    last = encode_example(tokenizer, multi_turn, 1024, TrainedTurns.LAST)
    assert last.input_ids == enc.input_ids
    assert _trained_runs(tokenizer, last.input_ids, last.completion_mask) == [answers[-1] + tokenizer.eos_token]


TWO_ANSWERS = {
    "prompt": [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi there."},
        {"role": "user", "content": "Say bye."},
    ],
    "completion": [{"role": "assistant", "content": "Bye now."}],
}


def test_a_slow_tokenizer_without_offsets_gets_the_same_mask(monkeypatch):
    tokenizer = load_tokenizer(_cfg(FineTuningType.CHAT))
    fast = encode_example(tokenizer, TWO_ANSWERS, 1024)
    monkeypatch.setattr(type(tokenizer), "is_fast", property(lambda self: False))
    slow = encode_example(tokenizer, TWO_ANSWERS, 1024)  # each rendered piece tokenised on its own
    assert (slow.input_ids, slow.completion_mask) == (fast.input_ids, fast.completion_mask)
    eos = tokenizer.eos_token
    assert _trained_runs(tokenizer, slow.input_ids, slow.completion_mask) == ["Hi there." + eos, "Bye now." + eos]


def test_a_template_that_rewrites_earlier_turns_trains_the_last_answer_and_counts_the_rest(jsonl):
    # Like templates that drop the reasoning of earlier answers: an answer renders differently once it is not last.
    from autotuning.modeling import CHATML_TEMPLATE

    tokenizer = load_tokenizer(_cfg(FineTuningType.CHAT))
    answer = "{% generation %}{{- message['content']"
    assert CHATML_TEMPLATE.count(answer) == 1
    tokenizer.chat_template = CHATML_TEMPLATE.replace(
        answer, "{% generation %}{{- (message['content'] if loop.last else '...')"
    )
    enc = encode_example(tokenizer, TWO_ANSWERS, 1024)
    assert _trained_runs(tokenizer, enc.input_ids, enc.completion_mask) == ["Bye now." + tokenizer.eos_token]
    assert enc.untrained_turns == 1
    # A template whose prompt alone renders differently (here: a colon in the generation header only) still trains
    # the last answer, by the longest common token prefix.
    generation = "'<|im_start|>assistant\n'"
    assert generation in CHATML_TEMPLATE
    tokenizer.chat_template = CHATML_TEMPLATE.replace(generation, "'<|im_start|>assistant:\n'")
    enc = encode_example(tokenizer, TWO_ANSWERS, 1024)
    assert tokenizer.decode([t for t, m in zip(enc.input_ids, enc.completion_mask) if m]).endswith(
        "Bye now." + tokenizer.eos_token
    )
    assert enc.untrained_turns == 1 and not enc.answer_lost


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


# --------------------------------------------------------------------------- real tokenizers

ANSWERS = ["Paris is the capital of France.", "Rome, on the Tiber.", "A spider has eight legs."]
QUESTIONS = ["What is the capital of France?", "And the capital of Italy?", "How many legs does a spider have?"]
SYSTEM = "You answer in one short sentence."
# The template's end-of-turn token, which every trained answer must end on.
END_OF_TURN = {"smollm2": "<|im_end|>", "gemma3": "<end_of_turn>"}


def _conversation(system: bool = True) -> list[dict]:
    turns = [{"role": "system", "content": SYSTEM}] if system else []
    for question, answer in zip(QUESTIONS, ANSWERS):
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return turns


@pytest.fixture(scope="module")
def real(smollm2_dir, gemma3_dir):
    """(name, model dir, tokenizer) of both real models; each tokenizer loaded once for the module."""
    loaded = {}
    for name, path in (("smollm2", smollm2_dir), ("gemma3", gemma3_dir)):
        loaded[name] = (path, load_tokenizer(load_config(None, [f"model_name={path}"])))
    return loaded


def _prepare_real(jsonl, path, tokenizer, conversation, **extra):
    sets = [
        "fine_tuning_type=chat",
        f"model_name={path}",
        "eval_split=0",
        f"dataset_path={jsonl([{'messages': conversation}])}",
    ]
    config = load_config(None, sets + [f"{k}={v}" for k, v in extra.items()])
    return config, prepare_data(config, tokenizer)


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
@pytest.mark.parametrize("system", [True, False], ids=["system-turn", "no-system-turn"])
def test_real_templates_train_every_answer_through_its_end_of_turn_token(real, name, system, jsonl):
    path, tokenizer = real[name]
    conversation = _conversation(system)
    _, data = _prepare_real(jsonl, path, tokenizer, conversation, max_seq_length=512)
    row = data.train[0]
    eot = END_OF_TURN[name]
    # Exactly the three answers, each ending on the end-of-turn token; nothing of the system prompt (SmolLM2 inserts
    # its default one when the row has none), the questions or the turn headers.
    assert _trained_runs(tokenizer, row["input_ids"], row["completion_mask"]) == [a + eot for a in ANSWERS]
    assert end_of_turn_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids(eot)]
    # No drift: the ids are those of the rendered conversation, tokenised as one text.
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert row["input_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    if name == "smollm2" and not system:
        assert "named SmolLM" in rendered  # the default system prompt is there, and masked
    assert data.stats["train"]["untrained_turns"] == 0 and data.stats["train"]["truncated_rows"] == 0


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_real_templates_last_turn_only_and_truncation(real, name, jsonl):
    path, tokenizer = real[name]
    eot = END_OF_TURN[name]
    _, last = _prepare_real(jsonl, path, tokenizer, _conversation(), max_seq_length=512, trained_turns="last")
    assert _trained_runs(tokenizer, last.train[0]["input_ids"], last.train[0]["completion_mask"]) == [ANSWERS[2] + eot]

    # Cut three tokens into the third answer: the first two stay whole, the third is trained up to the cut.
    _, whole = _prepare_real(jsonl, path, tokenizer, _conversation(), max_seq_length=512)
    mask = whole.train[0]["completion_mask"]
    third = [i for i, m in enumerate(mask) if m and i > 0 and not mask[i - 1]][2]
    cut = third + 3
    _, data = _prepare_real(jsonl, path, tokenizer, _conversation(), max_seq_length=cut)
    row = data.train[0]
    assert len(row["input_ids"]) == cut
    head = tokenizer.decode(whole.train[0]["input_ids"][third:cut])
    assert ANSWERS[2].startswith(head) and head != ANSWERS[2]
    assert _trained_runs(tokenizer, row["input_ids"], row["completion_mask"]) == [
        ANSWERS[0] + eot,
        ANSWERS[1] + eot,
        head,
    ]
    assert data.stats["train"]["truncated_rows"] == 1 and data.stats["train"]["answer_lost_rows"] == 0


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_real_model_labels_through_trl_are_the_three_answers(real, name, jsonl, tmp_path):
    path, tokenizer = real[name]
    config, data = _prepare_real(jsonl, path, tokenizer, _conversation(), max_seq_length=512)
    model = load_model(config).model
    trainer = build_trainer(
        config, model, tokenizer, data.train, None, tmp_path, "fp32", callbacks=[], show_progress=False
    )
    example = trainer.train_dataset[0]
    expected = [a + END_OF_TURN[name] for a in ANSWERS]
    assert _trained_runs(tokenizer, example["input_ids"], [lab != -100 for lab in example["labels"]]) == expected
    batch = trainer.data_collator([example])  # what the loss actually sees
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert _trained_runs(tokenizer, ids, [lab != -100 for lab in labels]) == expected


# Gemma's turn format with the strict check of the template Gemma publishes on the Hub (the packaged model's own
# template is lenient): roles after an optional system turn must alternate, else rendering raises.
STRICT_GEMMA_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set offset = 1 if messages[0]['role'] == 'system' else 0 -%}"
    "{%- for message in messages[offset:] -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{{- '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\\n' -}}"
    "{{- (messages[0]['content'] + '\\n\\n') if (offset and loop.first) else '' -}}"
    "{{- message['content'] + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)


NON_ALTERNATING = [
    {"role": "assistant", "content": "Welcome back!"},  # answers nothing: dropped
    {"role": "user", "content": "I am planning a trip."},
    {"role": "user", "content": "Where is the Louvre?"},  # joined with the turn before
    {"role": "assistant", "content": "The Louvre is in Paris."},
    {"role": "user", "content": "Thanks, bye."},  # nothing answers it: dropped
]
REPAIRED = [("user", "I am planning a trip.\n\nWhere is the Louvre?"), ("assistant", "The Louvre is in Paris.")]


@pytest.mark.real_model
def test_non_alternating_rows_render_with_gemma_after_the_rule(real, jsonl):
    from jinja2.exceptions import TemplateError

    path, tokenizer = real["gemma3"]
    with pytest.raises(TemplateError, match="alternate"):
        tokenizer.apply_chat_template(NON_ALTERNATING, chat_template=STRICT_GEMMA_TEMPLATE, tokenize=False)
    _, data = _prepare_real(jsonl, path, tokenizer, NON_ALTERNATING, max_seq_length=512)
    turns = data.train_rows[0]["prompt"] + data.train_rows[0]["completion"]
    assert [(t["role"], t["content"]) for t in turns] == REPAIRED
    strict = tokenizer.apply_chat_template(turns, chat_template=STRICT_GEMMA_TEMPLATE, tokenize=False)
    assert strict == tokenizer.apply_chat_template(turns, tokenize=False)  # the packaged template renders the same
    row = data.train[0]
    answers = [content + "<end_of_turn>" for role, content in REPAIRED if role == "assistant"]
    assert _trained_runs(tokenizer, row["input_ids"], row["completion_mask"]) == answers
