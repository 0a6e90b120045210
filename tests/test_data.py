"""Formats are detected and normalised into one schema; bad files are reported with file, line and field."""

from __future__ import annotations

import json

import pytest

from autotuning.config import FineTuningType, load_config
from autotuning.data import load_rows, normalise_rows, split_rows
from autotuning.data.loading import SAMPLE_FILES, sample_path
from autotuning.errors import DataError


def _normalise(path, kind="instruction", **extra):
    sets = [f"fine_tuning_type={kind}", f"dataset_path={path}"] + [f"{k}={v}" for k, v in extra.items()]
    config = load_config(None, sets)
    raw = load_rows(config.data.fine_tuning_type, str(path))
    return normalise_rows(raw, config)


def _turns(example):
    return [(m["role"], m["content"]) for m in example["prompt"] + example["completion"]]


def test_alpaca_with_and_without_input(jsonl):
    fmt, rows, _ = _normalise(
        jsonl(
            [
                {"instruction": "Translate", "input": "Hello", "output": "Bonjour"},
                {"instruction": "Hi", "output": "Hey"},
            ]
        )
    )
    assert fmt.name == "alpaca"
    assert _turns(rows[0]) == [("user", "Translate\n\nHello"), ("assistant", "Bonjour")]
    assert _turns(rows[1]) == [("user", "Hi"), ("assistant", "Hey")]


def test_prompt_completion_and_glaive_question_answer(jsonl):
    fmt, rows, _ = _normalise(jsonl([{"prompt": "2+2?", "completion": "4"}]), "code")
    assert fmt.name == "prompt_completion" and _turns(rows[0]) == [("user", "2+2?"), ("assistant", "4")]
    fmt, rows, _ = _normalise(jsonl([{"question": "Reverse a list?", "answer": "xs[::-1]"}], "g.jsonl"), "code")
    assert fmt.name == "question_answer" and rows[0]["completion"][0]["content"] == "xs[::-1]"


def test_openai_messages_and_sharegpt(jsonl):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "See you"},
    ]
    fmt, rows, _ = _normalise(jsonl([{"messages": messages}]), "chat")
    assert fmt.name == "messages"
    assert rows[0]["prompt"] == messages[:-1] and rows[0]["completion"] == [messages[-1]]
    share = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    fmt, rows, _ = _normalise(jsonl([{"conversations": share}], "s.jsonl"), "chat")
    assert fmt.name == "sharegpt" and _turns(rows[0]) == [("user", "Hi"), ("assistant", "Hello")]


@pytest.mark.parametrize(
    "answer,expected",
    [
        ("Paris", ["Paris"]),
        (["Paris", "paris, France"], ["Paris", "paris, France"]),
        ({"text": ["Paris"], "answer_start": [0]}, ["Paris"]),
    ],
)
def test_qa_answer_shapes(jsonl, answer, expected):
    fmt, rows, _ = _normalise(
        jsonl([{"context": "Paris is the capital of France.", "question": "Capital?", "answer": answer}]), "qa"
    )
    assert fmt.name == "qa" and rows[0]["references"] == expected
    assert "Context:\nParis is the capital" in rows[0]["prompt"][-1]["content"]


def test_rag_passages_and_ms_marco(jsonl):
    fmt, rows, _ = _normalise(
        jsonl([{"context": ["first passage", "second passage"], "question": "Q?", "answer": "A."}]), "rag"
    )
    user = rows[0]["prompt"][-1]["content"]
    assert fmt.name == "qa" and "[1] first passage" in user and "[2] second passage" in user
    marco = {
        "query": "what is x",
        "passages": {"is_selected": [0, 1], "passage_text": ["p one", "p two"], "url": ["u1", "u2"]},
        "answers": ["x is y"],
        "wellFormedAnswers": [],
    }
    fmt, rows, _ = _normalise(jsonl([marco], "m.jsonl"), "rag")
    assert fmt.name == "ms_marco" and rows[0]["completion"][0]["content"] == "x is y"


def test_csv_and_parquet(tmp_path):
    import pandas as pd

    frame = pd.DataFrame(
        [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}]
    )
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        fmt, rows, _ = _normalise(tmp_path / name)
        assert fmt.name == "alpaca" and len(rows) == 2


def test_directory_of_files_and_mixed_formats(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    (d / "a.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    (d / "b.jsonl").write_text(json.dumps({"instruction": "c", "output": "d"}) + "\n")
    _, rows, _ = _normalise(d)
    assert len(rows) == 2
    (d / "c.jsonl").write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    with pytest.raises(DataError, match="mixes data formats"):
        _normalise(d)


@pytest.mark.parametrize(
    "content,needles",
    [
        ("", ["empty"]),
        (b"\xff\xfe bad bytes", ["not UTF-8"]),
        ('{"instruction": "a", "output": "b"}\nnot json\n', ["invalid JSON", "line 2"]),
        ('["a", "b"]\n', ["JSON object"]),
    ],
)
def test_broken_files(tmp_path, content, needles):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(DataError) as err:
        _normalise(path)
    for needle in needles:
        assert needle in str(err.value)
    assert str(path) in str(err.value)


def test_csv_missing_column(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("instruction,input\nhello,\n")
    with pytest.raises(DataError) as err:
        _normalise(path)
    assert "['input', 'instruction']" in str(err.value) and "output" in str(err.value)


@pytest.mark.parametrize(
    "conversation,needle",
    [
        ([{"role": "user", "content": "Hi"}], "no assistant turn"),
        ([{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Yo"}], "no assistant turn that answers"),
        ([{"role": "wizard", "content": "Hi"}], "unknown role 'wizard'"),
        ([{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}], "messages[0].content"),
    ],
)
def test_bad_conversations_name_the_turn(jsonl, conversation, needle):
    with pytest.raises(DataError) as err:
        _normalise(
            jsonl(
                [
                    {"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "ok"}]},
                    {"messages": conversation},
                ]
            ),
            "chat",
        )
    assert needle in str(err.value) and "line 2" in str(err.value)


# Two user turns in a row, a leading assistant turn, a system turn mid-conversation, two assistant turns in a row
# and a trailing user turn: every case of the alternation rule (README, Data).
NON_ALTERNATING = [
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "I have a question."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "system", "content": "From now on, answer in words."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six."},
    {"role": "assistant", "content": "That is, six exactly."},
    {"role": "user", "content": "Thanks!"},
]
REPAIRED = [
    ("user", "I have a question.\n\nWhat is 2+2?"),
    ("assistant", "4."),
    ("user", "From now on, answer in words.\n\nAnd 3+3?"),
    ("assistant", "Six.\n\nThat is, six exactly."),
]


def test_non_alternating_conversations_are_repaired_by_the_documented_rule(jsonl, caplog):
    share_roles = {"user": "human", "assistant": "gpt", "system": "system"}
    sharegpt = [{"from": share_roles[t["role"]], "value": t["content"]} for t in NON_ALTERNATING]
    for path in (jsonl([{"messages": NON_ALTERNATING}]), jsonl([{"conversations": sharegpt}], "s.jsonl")):
        with caplog.at_level("WARNING", logger="autotuning.data"):
            _, rows, skipped = _normalise(path, "chat")
        assert skipped == 0 and _turns(rows[0]) == REPAIRED
        assert rows[0]["completion"] == [{"role": "assistant", "content": REPAIRED[-1][1]}]  # what evaluation asks for
        assert "turn_fixes" not in rows[0]  # counted, then removed from the normalised schema
    message = caplog.records[-1].getMessage()
    assert "1 conversations did not alternate" in message
    for count in ("system as user: 1", "leading assistant dropped: 1", "joined: 3", "trailing user dropped: 1"):
        assert count in message


def test_turn_fixes_are_in_the_data_stats(jsonl):
    ok = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path = jsonl([{"messages": NON_ALTERNATING}, {"messages": ok}, {"messages": ok + ok[-1:]}])
    data = _prepare(path, "builtin:tiny-llama", fine_tuning_type="chat", eval_split=0)
    assert data.stats["turn_fixes"] == {
        "rows": 2,
        "leading_assistant_dropped": 1,
        "joined": 4,
        "system_as_user": 1,
        "trailing_user_dropped": 1,
    }


def test_skip_bad_rows_counts_them(jsonl):
    path = jsonl(
        [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": ""}, {"instruction": "e", "output": "f"}]
    )
    _, rows, skipped = _normalise(path, skip_bad_rows="true")
    assert len(rows) == 2 and skipped == 1


def test_split_is_deterministic_and_disjoint():
    rows = [{"id": i} for i in range(50)]
    train, evaluation = split_rows(rows, 0.2, seed=3)
    again_train, again_eval = split_rows(rows, 0.2, seed=3)
    assert train == again_train and evaluation == again_eval
    assert len(evaluation) == 10 and not {r["id"] for r in train} & {r["id"] for r in evaluation}
    assert split_rows(rows, 0.2, seed=4)[1] != evaluation


@pytest.mark.parametrize("kind", list(FineTuningType))
def test_bundled_samples_have_100_rows_and_load_under_their_type(kind):
    assert sample_path(kind).name == SAMPLE_FILES[kind]
    lines = [line for line in sample_path(kind).read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(lines) >= 100
    config = load_config(None, [f"fine_tuning_type={kind.value}", "dataset_path=sample"])
    raw = load_rows(kind, "sample")
    _, rows, skipped = normalise_rows(raw, config)
    assert len(rows) == len(lines) and skipped == 0


def test_builtin_dataset_falls_back_to_sample_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    raw = load_rows(FineTuningType.RAG, "")
    assert raw.source == "sample:rag_fine_tuning"
    assert any("microsoft/ms_marco" in note for note in raw.notes)


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        load_rows(FineTuningType.INSTRUCTION, "someone/dataset")
    assert "someone/dataset" in str(err.value) and "dataset_path" in str(err.value)


def _prepare(path, model, **extra):
    from autotuning.data import prepare_data
    from autotuning.modeling import load_tokenizer

    sets = [f"dataset_path={path}", "eval_split=0.1"] + [f"{k}={v}" for k, v in extra.items()]
    config = load_config(None, sets)
    config.model.model_name = str(model)
    return prepare_data(config, load_tokenizer(config))


def test_tokenised_data_is_cached_and_reused_only_for_the_same_inputs(jsonl, monkeypatch, tmp_path):
    import autotuning.data as data
    from autotuning.modeling import resolve_model_path

    model = resolve_model_path("builtin:tiny-llama")  # built in the session's cache, before moving the cache
    monkeypatch.setenv("AUTOTUNING_CACHE", str(tmp_path / "cache"))
    path = jsonl([{"instruction": f"Say {i}", "output": f"{i} " * (i % 7 + 1)} for i in range(40)])
    calls = []
    real = data.encode_examples
    monkeypatch.setattr(data, "encode_examples", lambda *a, **k: calls.append(1) or real(*a, **k))

    first = _prepare(path, model)
    assert len(calls) == 2  # train and eval tokenised
    again = _prepare(path, model)
    assert len(calls) == 2  # read back, not tokenised
    assert again.train["input_ids"] == first.train["input_ids"]
    assert again.train["completion_mask"] == first.train["completion_mask"]
    assert again.eval["input_ids"] == first.eval["input_ids"]
    assert again.stats == first.stats and again.lengths == first.lengths

    _prepare(path, model, max_seq_length=64)  # another setting: tokenised again
    assert len(calls) == 4
    path.write_text(path.read_text().replace("Say 3", "Say three"))  # other rows: tokenised again
    _prepare(path, model)
    assert len(calls) == 6

    # A damaged entry is not trusted: the data is tokenised again, and the same result comes out.
    for meta in (tmp_path / "cache" / "data").glob("*/meta.json"):
        meta.write_text("{")
    path.write_text(path.read_text().replace("Say three", "Say 3"))
    redo = _prepare(path, model)
    assert len(calls) == 8
    assert redo.train["input_ids"] == first.train["input_ids"]


def test_batched_encoding_matches_row_by_row(jsonl):
    from autotuning.data import encode_example, encode_examples
    from autotuning.modeling import load_tokenizer

    config = load_config(None, ["max_seq_length=48"])
    tokenizer = load_tokenizer(config)
    _, rows, _ = _normalise(jsonl([{"instruction": "Q" * (i * 7), "output": "A " * (i * 5)} for i in range(1, 12)]))
    batched = encode_examples(tokenizer, rows, 48, chunk=4)
    assert [(e.input_ids, e.completion_mask, e.truncated, e.answer_lost) for e in batched] == [
        (e.input_ids, e.completion_mask, e.truncated, e.answer_lost)
        for e in (encode_example(tokenizer, r, 48) for r in rows)
    ]
    assert any(e.truncated for e in batched) and any(e.answer_lost for e in batched)
