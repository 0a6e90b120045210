"""Tab handlers called as plain functions: config conversion, validation, YAML, the pipeline facade."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from autotuning.config import Config, ConfigError, load_config
from autotuning.errors import UserError
from autotuning.pipeline import BusyError, RunStatus
from ui.config_tab import initial_config
from ui.context import AppContext
from ui.dataset_tab import inspect_form
from ui.form import (
    FORM_FIELDS,
    SOURCE_HUB,
    SOURCE_SAMPLE,
    SOURCE_UPLOAD,
    cli_command,
    config_to_form,
    form_to_config,
    validate_form,
)
from ui.train_tab import _status_markdown, memory_markdown, resume_latest, snapshot, start_from_form


@pytest.fixture
def ctx(tmp_path):
    return AppContext.create(tmp_path / "runs")


def _form(**changes) -> dict:
    values = config_to_form(initial_config())
    values.update(changes)
    return {name: values.get(name) for name in FORM_FIELDS}


def test_form_round_trips_the_initial_config(ctx):
    config = form_to_config(_form(), ctx.output_root)
    assert config == initial_config().replace(output_dir="")
    assert config.data.dataset_path == "sample"


def test_form_types_and_run_name(ctx):
    config = form_to_config(
        _form(lora_target_modules="q_proj, v_proj", max_steps=7.0, run_name="exp-1", save_format=["torch"]),
        ctx.output_root,
    )
    assert config.peft.lora_target_modules == ["q_proj", "v_proj"]
    assert config.training.max_steps == 7
    assert config.run.output_dir == str(ctx.output_root / "exp-1")


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"peft_type": "qlora"}, "4bit"),
        ({"max_seq_length": 0}, "max_seq_length"),
        ({"run_name": "../escape"}, "run name"),
        ({"dataset_source": SOURCE_HUB, "hub_dataset": ""}, "Hub dataset id"),
        ({"dataset_source": SOURCE_UPLOAD, "upload": None}, "no file uploaded"),
        ({"save_format": []}, "save_format"),
    ],
)
def test_validation_messages_name_the_problem(ctx, changes, needle):
    config, message = validate_form(_form(**changes), ctx.output_root)
    assert config is None and needle in message


def test_yaml_round_trip_through_the_form(ctx, tmp_path):
    config = form_to_config(
        _form(learning_rate=3e-4, fine_tuning_type="chat_fine_tuning", run_name="r"), ctx.output_root
    )
    path = tmp_path / "c.yaml"
    config.save_yaml(path)
    again = form_to_config(
        {k: v for k, v in config_to_form(load_config(path)).items() if k in FORM_FIELDS} | {"upload": None},
        ctx.output_root,
    )
    assert again == config


def test_token_is_not_put_back_in_the_form_or_the_cli_line(ctx):
    config = form_to_config(_form(hf_token="hf_SENTINEL_42"), ctx.output_root)
    assert config.model.hf_token == "hf_SENTINEL_42"
    assert "hf_SENTINEL_42" not in cli_command(config)
    assert "hf_token" not in config_to_form(config)  # loading a YAML never touches the password field


def test_cli_command_reproduces_the_config(ctx):
    config = form_to_config(_form(max_steps=9, run_name="cli"), ctx.output_root)
    line = cli_command(config).replace("\\\n", " ")
    sets = [part.strip("'") for part in line.split("--set ")[1:]]
    again = load_config(None, [s.strip().strip("'") for s in sets])
    assert again == config


def test_dataset_preview(ctx):
    summary, figure, table, example = inspect_form(_form(dataset_source=SOURCE_SAMPLE), ctx)
    assert "alpaca" in summary and "120 read" in summary and "truncated" in summary
    assert figure.layout.shapes  # the max_seq_length line
    assert {"user", "answer"} <= set(table.columns) and len(table) == 20
    assert 'class="at-trained"' in example and 'class="at-masked"' in example


def test_dataset_preview_error_is_a_user_error(ctx, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no answer column"}\n')
    with pytest.raises(UserError) as err:
        inspect_form(_form(dataset_source=SOURCE_UPLOAD, upload=str(bad)), ctx)
    assert str(bad) in str(err.value)


def _wait(run, statuses, timeout=120):
    deadline = time.monotonic() + timeout
    while run.status.value not in statuses and time.monotonic() < deadline:
        time.sleep(0.1)
    assert run.status.value in statuses, (run.status, run.error)


def test_start_stop_resume_through_the_facade(ctx):
    start_from_form(ctx, _form(max_steps=60, logging_steps=1, eval_steps=0, run_name="facade"))
    run = ctx.pipeline.current
    # A second Start while one runs is refused and leaves the first alone.
    with pytest.raises(BusyError) as err:
        start_from_form(ctx, _form(run_name="other"))
    assert "already running" in str(err.value)
    deadline = time.monotonic() + 60
    while len([e for e in run.events(0) if e["type"] == "train"]) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    run.stop()
    _wait(run, {"stopped"})
    snap = snapshot(ctx)
    assert snap["status"] == "stopped" and snap["checkpoints"]
    stopped_step = run.progress()["step"]
    assert 0 < stopped_step < 60
    resume_latest(ctx)
    resumed = ctx.pipeline.current
    assert resumed is not run
    _wait(resumed, {"finished"})
    steps = [e["step"] for e in resumed.events(0) if e["type"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # one curve across the stop
    assert json.loads((resumed.run_dir / "run.json").read_text())["status"] == "finished"
    assert "finished" in [r["status"] for r in ctx.runs() if r["name"] == "facade"]


def test_failed_start_reports_the_error_without_a_traceback(ctx):
    run = ctx.pipeline.start(
        load_config(
            None, ["model_name=nobody/nothing-here", "dataset_path=sample", f"output_dir={ctx.output_root / 'bad'}"]
        )
    )
    _wait(run, {"failed"}, timeout=60)
    assert "nobody/nothing-here" in run.error and "Traceback" not in run.error
    assert run.status is RunStatus.FAILED
    assert not (ctx.output_root / "bad").exists()


def test_interrupted_runs_are_listed_as_such(ctx):
    run_dir = ctx.output_root / "crashed"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"status": "running", "started_at": 1}))
    assert [r["status"] for r in ctx.runs() if r["name"] == "crashed"] == ["interrupted"]


def test_config_tab_starts_on_the_offline_quickstart():
    config = initial_config()
    assert isinstance(config, Config) and config.model.model_name == "builtin:tiny-llama"
    with pytest.raises(ConfigError):
        form_to_config(_form(fine_tuning_type="nonsense"), "/tmp")


def test_memory_estimate_before_start(ctx):
    text = memory_markdown(ctx, _form())
    assert "Memory estimate" in text and "fits" in text
    for part in ("weights", "activations", "logits", "total"):
        assert part in text
    assert "**No estimate:**" in memory_markdown(ctx, _form(learning_rate=-1))


def test_multi_process_options_reach_the_config_and_the_cli_line(ctx):
    config = form_to_config(_form(distributed="ddp", num_processes=2), ctx.output_root)
    assert config.training.distributed.value == "ddp" and config.training.num_processes == 2
    line = cli_command(config)
    assert "distributed=ddp" in line and "num_processes=2" in line and "fsdp" not in line


def test_out_of_memory_changes_are_shown_in_the_status():
    snap = {"status": "running", "run_dir": "runs/x", "error": "", "notices": ["out of memory at step 2; retrying"]}
    assert "Changed to fit in memory:** out of memory at step 2" in _status_markdown(snap)


def test_paths_typed_in_the_app_stay_inside_its_folders(ctx, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    # A typed local path outside the output root and --data-dir folders is refused, whatever the source widget.
    for form in (
        _form(dataset_source=SOURCE_HUB, hub_dataset=str(outside / "data.jsonl")),
        _form(dataset_source=SOURCE_HUB, hub_dataset="/etc"),
        _form(dataset_source=SOURCE_UPLOAD, upload=str(outside / "data.jsonl")),
    ):
        with pytest.raises(ConfigError, match="--data-dir"):
            form_to_config(form, ctx.output_root, ctx.data_dirs)
    # Allowed with --data-dir; a Hub id is never mistaken for a path.
    config = form_to_config(
        _form(dataset_source=SOURCE_HUB, hub_dataset=str(outside / "data.jsonl")), ctx.output_root, [outside]
    )
    assert config.data.dataset_path == str((outside / "data.jsonl").resolve())
    assert (
        form_to_config(
            _form(dataset_source=SOURCE_HUB, hub_dataset="yahma/alpaca-cleaned"), ctx.output_root
        ).data.dataset_path
        == "yahma/alpaca-cleaned"
    )
    # Run names cannot climb out or follow a link out of the output root.
    for name in ("../escape", "/abs/path", "a/b"):
        with pytest.raises(ConfigError, match="run name"):
            form_to_config(_form(run_name=name), ctx.output_root)
    (ctx.output_root / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ConfigError, match="leads out of the output root"):
        form_to_config(_form(run_name="linked"), ctx.output_root)


def test_uploads_are_staged_inside_the_workspace(ctx, tmp_path):
    from ui.form import stage_upload

    src = tmp_path / "my data (1).jsonl"
    src.write_text('{"instruction": "a", "output": "b"}\n')
    staged = Path(stage_upload(str(src), ctx.workspace))
    assert staged.parent == ctx.workspace / "uploads" and staged.name == "my_data__1_.jsonl"
    assert form_to_config(
        _form(dataset_source=SOURCE_UPLOAD, upload=str(staged)), ctx.output_root
    ).data.dataset_path == str(staged)


def test_options_that_run_code_show_a_warning():
    from ui.config_tab import code_safety_notice

    assert code_safety_notice(False, False) == ""
    assert "Trust remote code" in code_safety_notice(True, False)
    assert "pickle" in code_safety_notice(False, True) and "trust" in code_safety_notice(False, True)
    assert initial_config().model.trust_remote_code is False and initial_config().model.allow_pickle_weights is False


def test_share_or_open_host_without_auth_warns():
    from app import check_access, parse_args

    auth, warnings = check_access(parse_args(["--share"]))
    assert auth is None and any("--share without --auth" in w for w in warnings)
    auth, warnings = check_access(parse_args(["--share", "--auth", "u:p"]))
    assert auth == ("u", "p") and warnings == []
    assert check_access(parse_args([]))[1] == []  # local only: no warning
    assert any("--host 0.0.0.0" in w for w in check_access(parse_args(["--host", "0.0.0.0"]))[1])
    with pytest.raises(ValueError, match="user:password"):
        check_access(parse_args(["--auth", "nopassword"]))
