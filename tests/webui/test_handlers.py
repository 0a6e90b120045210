"""Tab handlers called as plain functions: config conversion, validation, YAML, the pipeline facade."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import gradio as gr
import pytest
from gradio.helpers import special_args

import ui.dataset_tab
import ui.evaluate_tab
import ui.export_tab
import ui.train_tab
from autotuning.config import Config, ConfigError, load_config
from autotuning.errors import UserError
from autotuning.pipeline import BusyError, RunStatus
from ui import build_app
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
from ui.train_tab import _status_markdown, memory_markdown, resumable_runs, resume_run, snapshot, start_from_form


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
    assert config.data.dataset_path == "sample:quickstart"


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
    # No generated answers at the end: nothing here reads them (the quickstart's 8 base + 8 tuned cost seconds).
    start_from_form(ctx, _form(max_steps=60, logging_steps=1, eval_steps=0, eval_generations=0, run_name="facade"))
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
    assert [path for _, path in resumable_runs(ctx)] == [str(run.run_dir)]
    resume_run(ctx, None)  # nothing picked: the stopped run the Train tab shows, never another run
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


_UNVERIFIED_TORCH = {
    "status": "unverified",
    "verified": False,
    "reason": "relative logit diff 0.065 > 0.0001 (max |Δ| 2.79 on logits up to 42.9)",
    "path": "runs/x/merged",
    "variant": "float32",
    "rel_logit_diff": 0.065,
    "max_abs_logit_diff": 2.79,
    "reference_logit_scale": 42.9,
    "top1_agreement": 1.0,
    "greedy_agreement_tokens": 6,
    "greedy_tokens": 16,
    "bound": {"max_rel_logit_diff": 1e-4, "min_top1_agreement": 0.98, "min_greedy_agreement_tokens": 12},
}


def test_an_unverified_export_is_shown_with_its_reason_and_files(ctx):
    """Train tab (a finished run's result), Export tab lines and the Runs table all say it."""
    from ui.export_tab import export_line
    from ui.runs_tab import runs_table

    exports = {"torch": _UNVERIFIED_TORCH, "gguf": {"status": "skipped", "verified": False, "reason": "torch failed"}}
    snap = {"status": "finished", "run_dir": "runs/x", "error": "", "notices": [], "exports": exports}
    text = _status_markdown(snap)
    assert "**torch UNVERIFIED**" in text and "relative logit diff 0.065 > 0.0001" in text
    assert "`runs/x/merged`" in text and "gguf skipped" in text
    line = export_line("torch", _UNVERIFIED_TORCH)
    assert "greedy 6/16 (bound 12)" in line and "verified" not in line  # the browser test counts "verified"
    run_dir = ctx.output_root / "done"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"status": "finished", "started_at": 1, "exports": exports}))
    row = runs_table(ctx).set_index("name").loc["done"]
    assert row["status"] == "finished" and row["exports"] == "torch ⚠️ unverified, gguf ⛔ skipped"


def test_a_finished_sweeps_comparison_is_rebuilt_only_when_its_records_change(ctx, monkeypatch):
    """The Train tab's timer redraws a finished sweep every second: compare_runs (every trial's metrics.jsonl) runs
    again only when sweep.json or a trial's run.json changed."""
    import ui.context

    sweep = ctx.output_root / "grid"
    trials = []
    for i, loss in enumerate([2.0, 1.5], start=1):
        trial = sweep / f"trial-0{i}"
        trial.mkdir(parents=True)
        (trial / "run.json").write_text(json.dumps({"status": "finished", "eval_results": {"eval_loss": loss}}))
        trials.append({"name": trial.name, "path": str(trial), "status": "finished"})
    (sweep / "sweep.json").write_text(json.dumps({"status": "finished", "metric": "eval_loss", "trials": trials}))
    calls = []
    real = ui.context.compare_runs

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(ui.context, "compare_runs", counting)

    def touch(path: Path) -> None:
        stamp = path.stat().st_mtime_ns + 1_000_000
        os.utime(path, ns=(stamp, stamp))

    first = ctx.sweep_comparison(sweep)
    assert first is not None and first.best == "trial-02" and len(calls) == 1
    assert ctx.sweep_comparison(sweep) is first and len(calls) == 1  # the next tick: nothing read again
    touch(sweep / "sweep.json")
    assert ctx.sweep_comparison(sweep) is not first and len(calls) == 2
    assert ctx.sweep_comparison(sweep) is ctx.sweep_comparison(sweep) and len(calls) == 2
    touch(sweep / "trial-01" / "run.json")  # e.g. a trial exported from the Export tab afterwards
    ctx.sweep_comparison(sweep)
    assert len(calls) == 3


def test_the_runs_tabs_markdown_and_the_clis_text_show_the_same_comparison():
    """Both draw comparison_tables: the same options, figures, gains and exports, each in its own frame."""
    from autotuning.runs import Comparison, comparison_tables, describe_comparison
    from ui.runs_tab import comparison_markdown

    c = Comparison(
        names=["a", "b"],
        paths=["runs/a", "runs/b"],
        status=["finished", "stopped"],
        differs={"learning_rate": [0.001, 0.02], "lora_target_modules": [["q_proj", "v_proj"], None]},
        metrics=[
            {"name": "a", "eval_loss": 1.23456, "eval_loss_gain": 0.5, "peak_memory_bytes": 3 * 1024**3, "step": 4},
            {"name": "b", "eval_loss": None, "accuracy": 0.25, "step": 2},
        ],
        metric_keys=["eval_loss", "accuracy", "peak_memory_bytes"],
        exports=[{"torch": "verified (rel 1.4e-05)"}, {}],
        metric="eval_loss",
        best="a",
    )
    text, markdown = "\n".join(describe_comparison(c)), comparison_markdown(c)
    tables = comparison_tables(c)
    cells = {cell for table in (tables.differs, tables.metrics, tables.exports) for row in table for cell in row}
    cells -= {"-", "status", "stopped", "finished"}  # no value: "–" in Markdown; the status: in the text's run list
    assert {"1.235 (+0.5)", "3.00 GiB", "[q_proj, v_proj]", "verified (rel 1.4e-05)"} <= cells
    for cell in cells:
        assert cell in text and f"| {cell} |" in markdown, cell
    assert "* a" in text and "⭐ a (best)" in markdown and "| b | stopped | – | 0.25 | – |" in markdown


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
    assert staged.parent.parent == ctx.workspace / "uploads" and staged.name == "my_data__1_.jsonl"
    # Another session uploading a file of the same name gets its own copy; the first is untouched.
    other = tmp_path / "other" / "my data (1).jsonl"
    other.parent.mkdir()
    other.write_text('{"instruction": "c", "output": "d"}\n')
    second = Path(stage_upload(str(other), ctx.workspace))
    assert second != staged and second.name == staged.name
    assert '"a"' in staged.read_text() and '"c"' in second.read_text()
    assert form_to_config(
        _form(dataset_source=SOURCE_UPLOAD, upload=str(staged)), ctx.output_root
    ).data.dataset_path == str(staged)


def test_saved_configs_are_one_file_per_save_never_shared_between_sessions(ctx):
    from ui import build_app

    demo = build_app(ctx)
    fns = demo.fns.values() if isinstance(demo.fns, dict) else demo.fns
    (save,) = [f for f in fns if getattr(f.fn, "__name__", "") == "on_save"]
    values = [getattr(component, "value", None) for component in save.inputs]
    first, second = Path(save.fn(*values)), Path(save.fn(*values))  # two sessions pressing Save
    assert first != second and first.name == second.name == "config.yaml"
    assert (
        first.is_relative_to(ctx.workspace) and load_config(first).model.model_name == initial_config().model.model_name
    )


def test_options_that_run_code_show_a_warning():
    from ui.config_tab import code_safety_notice

    assert code_safety_notice(False, False) == ""
    assert "Trust remote code" in code_safety_notice(True, False)
    assert "pickle" in code_safety_notice(False, True) and "trust" in code_safety_notice(False, True)
    assert initial_config().model.trust_remote_code is False and initial_config().model.allow_pickle_weights is False


def test_the_servers_hf_token_is_lent_to_browser_sessions_only_with_the_flag(monkeypatch, tmp_path):
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers

    import autotuning.config as config_module
    from app import apply_token_policy, parse_args
    from autotuning.config import Config
    from ui.form import SOURCE_SAMPLE, form_to_config

    monkeypatch.setitem(config_module._ENVIRONMENT_TOKEN, "lent", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    monkeypatch.setenv("HF_TOKEN", "hf_server_owner")
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "0")  # restored after the test
    assert Config().model.hf_token == "hf_server_owner"  # the CLI: the owner's own process
    note = apply_token_policy(parse_args([]))
    assert "not lent" in note and "--lend-hf-token" in note
    assert Config().model.hf_token == "" and os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] == "1"
    assert "authorization" not in {k.lower() for k in build_hf_headers()}  # the Hub client sends no token either
    assert build_hf_headers(token="hf_visitor")["authorization"] == "Bearer hf_visitor"
    typed = form_to_config({"hf_token": "hf_visitor", "dataset_source": SOURCE_SAMPLE}, tmp_path)
    assert typed.model.hf_token == "hf_visitor"  # a visitor's own token still works
    assert apply_token_policy(parse_args(["--lend-hf-token"])) is None
    assert Config().model.hf_token == "hf_server_owner"


def test_code_running_options_and_local_model_folders_are_the_servers_to_lend(tmp_path):
    from ui.form import SOURCE_SAMPLE, form_to_config

    root = tmp_path / "runs"
    root.mkdir()
    base = {"dataset_source": SOURCE_SAMPLE}
    for name in ("trust_remote_code", "allow_pickle_weights"):
        with pytest.raises(ConfigError, match=f"does not let browser sessions turn on {name}") as err:
            form_to_config({**base, name: True}, root)
        assert "--allow-remote-code" in err.value.fix
        assert getattr(form_to_config({**base, name: True}, root, allow_code=True).model, name) is True
    outside = tmp_path / "elsewhere" / "model"
    outside.mkdir(parents=True)
    with pytest.raises(ConfigError, match="only from its own folders") as err:
        form_to_config({**base, "model_name": str(outside)}, root)
    assert "model_name" in err.value.where and "--data-dir" in err.value.fix
    inside = root / "my-run" / "merged"
    inside.mkdir(parents=True)
    assert form_to_config({**base, "model_name": str(inside)}, root).model.model_name == str(inside.resolve())
    assert form_to_config({**base, "model_name": str(outside)}, root, [outside.parent]).model.model_name
    for name in ("builtin:tiny-llama", "HuggingFaceTB/SmolLM2-135M-Instruct"):  # not paths: as typed
        assert form_to_config({**base, "model_name": name}, root).model.model_name == name


def test_share_without_auth_is_refused_and_an_open_host_warns():
    from app import check_access, main, parse_args

    with pytest.raises(ValueError, match="--share without --auth .* add --auth user:password"):
        check_access(parse_args(["--share"]))
    with pytest.raises(SystemExit, match="--auth"):  # `python app.py --share` stops before building anything
        main(["--share"])
    auth, warnings = check_access(parse_args(["--share", "--insecure"]))
    assert auth is None and any("--share without --auth (--insecure)" in w for w in warnings)
    auth, warnings = check_access(parse_args(["--share", "--auth", "u:p"]))
    assert auth == ("u", "p") and warnings == []
    assert check_access(parse_args([]))[1] == []  # local only: no warning
    assert any("--host 0.0.0.0" in w for w in check_access(parse_args(["--host", "0.0.0.0"]))[1])
    with pytest.raises(ValueError, match="user:password"):
        check_access(parse_args(["--auth", "nopassword"]))


def test_model_picker_offers_the_real_models_only_when_their_packages_are_installed(monkeypatch):
    from autotuning.packaged import PACKAGED_MODELS, PackagedModel
    from ui.config_tab import model_choices

    monkeypatch.setattr(PackagedModel, "installed", lambda self: self.name == "gemma3-270m")
    choices = model_choices()
    assert "pkg:gemma3-270m" in choices and "pkg:smollm2-135m-instruct" not in choices
    assert (
        choices.index("builtin:tiny-llama")
        < choices.index("pkg:gemma3-270m")
        < choices.index("HuggingFaceTB/SmolLM2-135M-Instruct")
    )
    monkeypatch.setattr(PackagedModel, "installed", lambda self: True)
    assert {m.model_name for m in PACKAGED_MODELS.values()} <= set(model_choices())


def _wired(demo: gr.Blocks, api_name: str):
    (fn,) = [f.fn for f in demo.fns.values() if f.api_name == api_name]
    return fn


def _call_as_gradio(fn, inputs: list, login: gr.OAuthToken | None):
    """Call a wired handler as gradio does for a request, which fills its gr.OAuthToken parameter with ``login``."""
    args, *_ = special_args(fn, list(inputs), token=login)
    return fn(*args)


@pytest.mark.parametrize("typed,used", [("", "hf_space_login"), ("hf_typed_in_form", "hf_typed_in_form")])
def test_handlers_read_the_hub_with_the_space_login_unless_a_token_is_typed(ctx, monkeypatch, typed, used):
    """Every handler that reads from the Hub (Start, Estimate, Preview, Resume, Evaluate, Export) gets the
    session's Space login when the form's token field is empty; a typed token wins. It is never echoed."""
    login = gr.OAuthToken(token="hf_space_login", scope="openid profile read-repos", expires_at=0)
    seen: dict[str, str] = {}

    def record(name: str, token: str):
        seen[name] = token
        raise UserError("stopped here by the test", "test", "")

    monkeypatch.setattr(ctx.pipeline, "start", lambda config: record("start", config.model.hf_token))
    monkeypatch.setattr(ui.train_tab, "estimate_memory", lambda config: record("estimate", config.model.hf_token))
    monkeypatch.setattr(ui.dataset_tab, "load_tokenizer", lambda config: record("preview", config.model.hf_token))
    monkeypatch.setattr(ctx.pipeline, "evaluate", lambda run, generations, hf_token: record("evaluate", hf_token))
    monkeypatch.setattr(ctx.pipeline, "export", lambda run, f, g, hf_token: record("export", hf_token))
    stopped = ctx.output_root / "stopped-run"
    monkeypatch.setattr(ctx, "runs", lambda: [{"name": stopped.name, "path": str(stopped), "status": "stopped"}])
    monkeypatch.setattr(ui.train_tab, "last_checkpoint", lambda checkpoints: checkpoints / "checkpoint-1")
    monkeypatch.setattr(ui.train_tab, "load_run_config", lambda run_dir, hf_token: record("resume", hf_token))

    demo = build_app(ctx)
    form = [_form(hf_token=typed)[name] for name in FORM_FIELDS]
    run_dir = str(ctx.output_root / "finished-run")
    shown = [
        _call_as_gradio(_wired(demo, "on_start"), [-1, *form], login),
        _call_as_gradio(_wired(demo, "on_estimate"), form, login),
        _call_as_gradio(_wired(demo, "on_preview"), form, login),
        _call_as_gradio(_wired(demo, "on_resume"), [-1, str(stopped), typed], login),
    ]
    for api_name, inputs in (
        ("on_evaluate", [run_dir, 3, typed]),
        ("on_export", [run_dir, ["torch"], ["q8_0"], typed]),
    ):
        with pytest.raises(gr.Error, match="stopped here by the test"):
            list(_call_as_gradio(_wired(demo, api_name), inputs, login))  # a generator: it runs as it is drawn
    assert seen == dict.fromkeys(("start", "estimate", "preview", "resume", "evaluate", "export"), used)
    assert "stopped here by the test" in str(shown) and used not in str(shown)

    seen.clear()  # not signed in (and always off a Space): no token at all, never the server's
    _call_as_gradio(_wired(demo, "on_start"), [-1, *[_form()[name] for name in FORM_FIELDS]], None)
    assert seen == {"start": ""}
