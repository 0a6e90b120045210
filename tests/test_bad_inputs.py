"""Every bad input, through the CLI and through the UI: one clear error naming where, no traceback, nothing written.

The corpus lives in tests/data/bad/ (one file per case); cases that need a generated file (a 50 MB
line, an unsupported architecture, a read-only directory, a full disk) are made here.
"""

from __future__ import annotations

import errno
import io
import json
import os
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from autotuning.cli import main
from autotuning.errors import UserError
from ui.config_tab import form_values_from_yaml, initial_config
from ui.context import AppContext
from ui.form import FORM_FIELDS, SOURCE_HUB, SOURCE_UPLOAD, config_to_form, stage_upload
from ui.train_tab import start_from_form

BAD = Path(__file__).resolve().parent / "data" / "bad"

# file -> (fine-tuning type, what the message must also name besides the file)
DATA_CASES: dict[str, tuple[str, str]] = {
    "empty.jsonl": ("instruction", "empty"),
    "whitespace_only.jsonl": ("instruction", "no rows"),
    "invalid_json_line.jsonl": ("instruction", "line 3"),
    "truncated_array.json": ("instruction", "line 1, column 66"),
    "line_is_a_list.jsonl": ("instruction", "line 2"),
    "missing_columns.csv": ("instruction", "columns ['bar', 'foo']"),
    "header_only.csv": ("instruction", "no rows"),
    "unterminated_quote.csv": ("instruction", "cannot parse"),
    "wrong_columns.jsonl": ("instruction", "columns ['text']"),
    "number_answer.jsonl": ("instruction", "field 'output'"),
    "null_answer.jsonl": ("instruction", "line 3"),
    "nested_instruction.jsonl": ("instruction", "field 'instruction'"),
    "list_answer.jsonl": ("instruction", "field 'output'"),
    "empty_answer.jsonl": ("instruction", "line 2"),
    "empty_instruction.jsonl": ("instruction", "field 'instruction'"),
    "chat_no_assistant.jsonl": ("chat", "no assistant turn"),
    "chat_assistant_answers_nothing.jsonl": ("chat", "field 'messages' has no assistant turn that answers"),
    "chat_unknown_role.jsonl": ("chat", "wizard"),
    "chat_content_not_text.jsonl": ("chat", "messages[0].content"),
    "chat_messages_not_list.jsonl": ("chat", "field 'messages'"),
    "chat_message_missing_content.jsonl": ("chat", "messages[0].content"),
    "chat_empty_conversation.jsonl": ("chat", "field 'messages'"),
    "sharegpt_unknown_speaker.jsonl": ("chat", "narrator"),
    "not_utf8.jsonl": ("instruction", "UTF-8"),
    "rag_without_context.jsonl": ("rag", "rag_fine_tuning"),
    "qa_empty_answer_list.jsonl": ("qa", "field 'answer'"),
    "rag_context_not_text.jsonl": ("rag", "field 'context'"),
    "mixed_formats": ("instruction", "mixes file types"),
    "no_data_files": ("instruction", "no data files"),
    "notes.txt": ("instruction", ".txt"),
}

# config file -> what the message must name
CONFIG_CASES: dict[str, str] = {
    "config_unknown_key.yaml": "learning_rat",
    "config_wrong_type.yaml": "max_steps",
    "config_out_of_range.yaml": "learning_rate",
    "config_qlora_without_4bit.yaml": "quantization",
    "config_fsdp_on_cpu.yaml": "distributed",
    "config_not_yaml.yaml": "line 2",
    "config_top_level_list.yaml": "mapping",
    "config_bad_choice.yaml": "fine_tuning_type",
    "config_eval_split_range.yaml": "eval_split",
    "config_early_stop_without_eval.yaml": "eval_steps",
}


def test_the_corpus_has_every_case_and_at_least_30():
    on_disk = {p.name for p in BAD.iterdir()}
    assert set(DATA_CASES) | set(CONFIG_CASES) == on_disk
    assert len(on_disk) >= 30


def _cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        rc = main(argv)
    return rc, err.getvalue()


def _assert_one_clear_error(rc: int, stderr: str, *needles: str) -> str:
    assert rc == 2, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def _entries(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


@pytest.mark.parametrize("name", sorted(DATA_CASES))
def test_bad_dataset_through_the_cli(name, tmp_path):
    kind, needle = DATA_CASES[name]
    root = tmp_path / "runs"
    root.mkdir()
    rc, err = _cli(
        [
            "train",
            "--set",
            f"dataset_path={BAD / name}",
            "--set",
            f"fine_tuning_type={kind}",
            "--set",
            f"output_dir={root / 'run'}",
            "--set",
            "max_seq_length=512",
            "--quiet",
        ]
    )
    _assert_one_clear_error(rc, err, name, needle)
    assert _entries(root) == set()  # nothing written


@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_bad_config_through_the_cli(name, tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    rc, err = _cli(["train", "--config", str(BAD / name), "--set", f"output_dir={root / 'run'}", "--quiet"])
    line = _assert_one_clear_error(rc, err, CONFIG_CASES[name])
    if name not in ("config_fsdp_on_cpu.yaml",):  # that one is refused by the machine check, not the file
        assert name in line
    assert _entries(root) == set()


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return AppContext.create(tmp_path_factory.mktemp("ui") / "runs", data_dirs=[BAD])


def _form(**changes) -> dict:
    values = config_to_form(initial_config())
    values.update(changes)
    return {name: values.get(name) for name in FORM_FIELDS}


def _wait(run, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while run.is_active() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not run.is_active()


@pytest.mark.parametrize("name", sorted(DATA_CASES))
def test_bad_dataset_through_the_ui(name, ctx):
    kind, needle = DATA_CASES[name]
    path = BAD / name
    if path.is_dir():  # a directory is typed as a path (allowed by --data-dir); files go through the upload widget
        form = _form(dataset_source=SOURCE_HUB, hub_dataset=str(path))
    else:
        form = _form(dataset_source=SOURCE_UPLOAD, upload=stage_upload(str(path), ctx.workspace))
    form.update(
        fine_tuning_type={
            "instruction": "instruction_fine_tuning",
            "chat": "chat_fine_tuning",
            "qa": "question_answering",
            "rag": "rag_fine_tuning",
        }[kind],
        max_seq_length=512,
        run_name=f"bad-{path.stem}",
    )
    before = _entries(ctx.output_root)
    start_from_form(ctx, form)
    run = ctx.pipeline.current
    _wait(run)
    assert run.status.value == "failed"
    assert "Traceback" not in run.error and "internal error" not in run.error
    assert path.name.replace(" ", "_") in run.error and needle in run.error, run.error
    assert _entries(ctx.output_root) == before  # no run directory (uploads are staged in .workspace)


@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_bad_config_through_the_ui(name):
    if name == "config_fsdp_on_cpu.yaml":
        # A valid file: the machine check refuses it at Start, like the CLI.
        values = form_values_from_yaml(str(BAD / name))
        assert values["distributed"] == "fsdp"
        return
    with pytest.raises(UserError) as err:
        form_values_from_yaml(str(BAD / name))
    assert CONFIG_CASES[name] in err.value.message and name in err.value.message


# --------------------------------------------------------------------------- generated cases


def test_a_50_mb_line(tmp_path):
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"instruction": "Say it.", "output": "word " * 10_000_000}) + "\n", encoding="utf-8")
    started = time.monotonic()
    rc, err = _cli(["train", "--set", f"dataset_path={path}", "--set", f"output_dir={tmp_path / 'run'}", "--quiet"])
    _assert_one_clear_error(rc, err, "huge.jsonl", "line 1", "50.0M characters")
    assert time.monotonic() - started < 60  # refused, not tokenised for minutes
    assert not (tmp_path / "run").exists()


def test_hub_dataset_and_model_that_do_not_exist(tmp_path):
    rc, err = _cli(["train", "--set", "dataset_path=nobody/no-such-dataset", "--set", f"output_dir={tmp_path / 'a'}"])
    _assert_one_clear_error(rc, err, "nobody/no-such-dataset", "dataset_path")
    rc, err = _cli(["train", "--set", "model_name=nobody/no-such-model", "--set", f"output_dir={tmp_path / 'b'}"])
    _assert_one_clear_error(rc, err, "nobody/no-such-model", "model_name")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_output_dir_that_is_a_file_or_read_only(tmp_path):
    file = tmp_path / "taken"
    file.write_text("x")
    rc, err = _cli(["train", "--set", f"output_dir={file}"])
    _assert_one_clear_error(rc, err, "output_dir", "is a file")
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        target = locked / "run"
    else:  # permission bits do not stop root; a read-only filesystem does
        target = Path("/sys/autotuning-read-only-check/run")
        if os.access("/sys", os.W_OK) and Path("/sys").stat().st_dev == 0:
            pytest.skip("no read-only location on this machine")
    rc, err = _cli(["train", "--set", f"output_dir={target}"])
    _assert_one_clear_error(rc, err, "output_dir", "cannot write")
    assert not target.exists()


def test_tensorflow_export_of_an_unsupported_architecture_is_refused_before_training(tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    from autotuning.modeling import resolve_model_path

    tokenizer = PreTrainedTokenizerFast.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    model_dir = tmp_path / "neox"
    GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128
        )
    ).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rc, err = _cli(
        [
            "train",
            "--set",
            f"model_name={model_dir}",
            "--set",
            "save_format=torch,tensorflow",
            "--set",
            f"output_dir={tmp_path / 'run'}",
            "--quiet",
        ]
    )
    _assert_one_clear_error(rc, err, "gpt_neox", "save_format")
    assert not (tmp_path / "run").exists()


def test_full_disk_while_exporting_keeps_the_training_and_leaves_no_half_export(tmp_path, monkeypatch):
    """After training, a full disk costs only the export: the run finishes (exit 0, not 2: the input was fine),
    the export is recorded as failed with the reason, and a warning line says how to export again."""
    from transformers import PreTrainedModel

    from autotuning.modeling import resolve_model_path

    resolve_model_path("builtin:tiny-llama")  # built (with save_pretrained) before the disk "fills up"

    def full_disk(self, save_directory, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(save_directory))

    # LoRA checkpoints go through peft's save_pretrained; the merged export through transformers': that one fails.
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    out = tmp_path / "run"
    sets = [f"output_dir={out}", "max_steps=4", "eval_split=0", "peft_type=lora"]
    rc, err = _cli(["train", *(arg for s in sets for arg in ("--set", s)), "--quiet"])
    assert rc == 0 and "Traceback" not in err and not [line for line in err.splitlines() if line.startswith("error:")]
    (warning,) = [line for line in err.splitlines() if "export torch FAILED" in line]
    assert "no space left on the device" in warning and f"export --run {out} --format torch" in warning
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "finished" and record["exports"]["torch"]["status"] == "failed"
    assert "no space left" in record["exports"]["torch"]["reason"]
    assert (out / "checkpoints" / "checkpoint-4" / "trainer_state.json").is_file()  # training is not lost
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / ".merged.tmp").exists() and not (out / "merged").exists()  # no half-written export


def test_pickle_weights_need_an_explicit_opt_in(tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from autotuning.modeling import resolve_model_path

    source = resolve_model_path("builtin:tiny-llama")
    model_dir = tmp_path / "pickled"
    AutoModelForCausalLM.from_pretrained(source).save_pretrained(model_dir)
    PreTrainedTokenizerFast.from_pretrained(source).save_pretrained(model_dir)
    torch.save(load_file(str(model_dir / "model.safetensors")), model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()

    rc, err = _cli(["train", "--set", f"model_name={model_dir}", "--set", f"output_dir={tmp_path / 'a'}", "--quiet"])
    _assert_one_clear_error(rc, err, "pickle", "allow_pickle_weights")
    assert not (tmp_path / "a").exists()
    rc, err = _cli(
        [
            "train",
            "--set",
            f"model_name={model_dir}",
            "--set",
            "allow_pickle_weights=true",
            "--set",
            f"output_dir={tmp_path / 'b'}",
            "--set",
            "max_steps=2",
            "--set",
            "eval_generations=0",  # what is checked is the weights written, not generated answers
            "--quiet",
        ]
    )
    assert rc == 0, err
    assert {p.suffix for p in (tmp_path / "b" / "merged").iterdir()} >= {".safetensors"}  # we only write safetensors
    # Weights we write are safetensors everywhere (checkpoints too); the Trainer's own state files are not weights.
    weights = [
        p.name for p in (tmp_path / "b").rglob("*") if p.name.startswith(("model", "adapter_model", "pytorch_model"))
    ]
    assert weights and all(name.endswith(".safetensors") for name in weights), weights


def test_the_token_is_not_echoed_by_errors_or_printed_configs(tmp_path, monkeypatch):
    sentinel = "hf_SENTINEL_never_print_me_987654321"
    monkeypatch.setenv("HF_TOKEN", sentinel)
    for argv in (
        ["train", "--set", "model_name=nobody/no-such-model", "--set", f"output_dir={tmp_path / 'a'}"],
        ["train", "--set", "dataset_path=nobody/no-such-dataset", "--set", f"output_dir={tmp_path / 'b'}"],
        ["train", "--set", f"hf_token={sentinel}", "--set", "learning_rate=-1"],
    ):
        rc, err = _cli(argv)
        assert rc == 2 and sentinel not in err
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        assert main(["show-config", "--set", f"hf_token={sentinel}"]) == 0
    assert sentinel not in out.getvalue() and "model_name" in out.getvalue()
