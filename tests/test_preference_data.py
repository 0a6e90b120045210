"""Preference data (issue 17's data layer): the layouts are detected and normalised, bad rows are refused with the
file, row and field, and SFT and preference files are never mistaken for each other."""

from __future__ import annotations

import pytest

from autotuning.config import FineTuningType, load_config
from autotuning.data import prepare_data
from autotuning.data.loading import ASSETS, load_rows
from autotuning.data.preference import detect_preference_format, normalise_preference_rows
from autotuning.errors import DataError
from autotuning.modeling import load_tokenizer

PAIR = {"prompt": "What is 2 plus 3?", "chosen": "2 plus 3 is 5.", "rejected": "It is 6, obviously."}


def _raw(path):
    return load_rows(FineTuningType.INSTRUCTION, str(path))


def test_the_bundled_samples_are_ours_and_normalise():
    name, pairs, skipped = normalise_preference_rows(_raw(ASSETS / "preference_sample.jsonl"), paired=True)
    assert name == "pair_text" and len(pairs) >= 100 and skipped == 0
    assert pairs[0]["prompt"][-1]["role"] == "user" and pairs[0]["chosen"][0]["role"] == "assistant"
    name, rows, _ = normalise_preference_rows(_raw(ASSETS / "kto_sample.jsonl"), paired=False)
    assert name == "kto" and len(rows) >= 100 and {r["label"] for r in rows} == {True, False}


def test_the_three_paired_layouts_give_the_same_pair(jsonl):
    expected = {
        "prompt": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": PAIR["prompt"]}],
        "chosen": [{"role": "assistant", "content": PAIR["chosen"]}],
        "rejected": [{"role": "assistant", "content": PAIR["rejected"]}],
    }
    system = {"role": "system", "content": "Be exact."}
    user = {"role": "user", "content": PAIR["prompt"]}
    messages = {
        "prompt": [system, user],
        "chosen": [{"role": "assistant", "content": PAIR["chosen"]}],
        "rejected": [{"role": "assistant", "content": PAIR["rejected"]}],
    }
    conversations = {  # UltraFeedback style: two whole conversations
        "chosen": [system, user, {"role": "assistant", "content": PAIR["chosen"]}],
        "rejected": [system, user, {"role": "assistant", "content": PAIR["rejected"]}],
    }
    for layout, row in (("pair_messages", messages), ("pair_conversations", conversations)):
        name, rows, _ = normalise_preference_rows(_raw(jsonl([row], f"{layout}.jsonl")), paired=True)
        assert name == layout and rows == [expected]
    name, rows, _ = normalise_preference_rows(_raw(jsonl([PAIR], "text.jsonl")), paired=True)
    assert name == "pair_text" and rows[0]["chosen"] == expected["chosen"]


@pytest.mark.parametrize(
    "row,paired,field,says",
    [
        ({**PAIR, "rejected": PAIR["chosen"]}, True, "chosen", "is identical to 'rejected'"),
        ({**PAIR, "rejected": "  "}, True, "rejected", "is empty"),
        ({**PAIR, "chosen": None}, True, "chosen", "is missing or null"),
        ({"prompt": "Hi?", "completion": "Hello!", "label": None}, False, "label", "is missing (true for a desirable"),
        ({"prompt": "Hi?", "completion": "Hello!", "label": "maybe"}, False, "label", "must be true or false"),
        (
            {
                "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}],
                "rejected": [{"role": "user", "content": "Bye?"}, {"role": "assistant", "content": "Go away."}],
            },
            True,
            "chosen",
            "differs from 'rejected' before the last assistant turn (at message 1)",
        ),
    ],
)
def test_a_bad_row_names_file_row_and_field(jsonl, row, paired, field, says):
    good = PAIR if paired else {"prompt": "Hi?", "completion": "Hello!", "label": True}
    if paired and "prompt" not in row:  # the conversations layout: the good row in the same layout
        good = {
            "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hm."}],
        }
    path = jsonl([good, row])
    with pytest.raises(DataError) as err:
        normalise_preference_rows(_raw(path), paired=paired)
    message = err.value.message
    assert f"field '{field}' {says}" in message and f"{path}" in message and "line 2" in message
    assert "Traceback" not in message
    _, rows, skipped = normalise_preference_rows(_raw(path), paired=paired, skip_bad_rows=True)
    assert len(rows) == 1 and skipped == 1


def test_an_sft_file_given_to_preference_tuning_and_pairs_given_to_kto_are_refused(jsonl):
    sft = _raw(ASSETS / "instruction_sample.jsonl")
    with pytest.raises(DataError, match="holds SFT data in the alpaca format, with no preference between answers"):
        normalise_preference_rows(sft, paired=True)
    with pytest.raises(DataError, match="needs unpaired labelled completions, and this file holds paired data"):
        detect_preference_format(set(PAIR), paired=False, source="pairs.jsonl")
    with pytest.raises(DataError, match="needs pairs, and this file holds unpaired KTO data"):
        detect_preference_format({"prompt", "completion", "label"}, paired=True, source="kto.jsonl")


def test_a_preference_file_given_to_supervised_fine_tuning_is_refused_before_anything_is_written(tmp_path):
    for name, held in (("preference_sample.jsonl", "preference pairs"), ("kto_sample.jsonl", "labelled completions")):
        config = load_config(None, [f"dataset_path={ASSETS / name}", f"output_dir={tmp_path / 'run'}"])
        with pytest.raises(DataError, match=f"this file holds .*{held}.*it would train on the rejected answers"):
            prepare_data(config, load_tokenizer(config))
    assert not (tmp_path / "run").exists()


def test_an_sft_file_with_a_non_boolean_label_column_still_trains(jsonl):
    """prompt/completion/label is also SFT data with a category label: only boolean labels make it KTO data."""
    rows = [{"prompt": f"Name a fruit ({i}).", "completion": "An apple.", "label": "fruit"} for i in range(12)]
    config = load_config(None, [f"dataset_path={jsonl(rows)}", "eval_split=0"])
    data = prepare_data(config, load_tokenizer(config))
    assert data.format == "prompt_completion" and len(data.train) == 12
