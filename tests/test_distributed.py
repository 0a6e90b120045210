"""Multi-process training through accelerate: DDP on CPU (gloo) for real, FSDP config checks, FSDP on GPUs."""

from __future__ import annotations

import collections
import json
import sys
import threading
import time

import pytest
import torch
import yaml

import autotuning.config as config_module
from autotuning.cli import main
from autotuning.config import Config, ConfigError, ModelConfig, load_config, quickstart_overrides
from autotuning.distributed import check_distributed
from autotuning.launcher import LaunchPlan, build_accelerate_config, launch, transformer_layer_class
from autotuning.modeling import resolve_model_path
from autotuning.pipeline import Pipeline, RunStatus
from autotuning.recipe import run_job
from autotuning.runs import read_metrics


def _quick(tmp_path, *sets: str):
    return load_config(None, [f"output_dir={tmp_path / 'run'}", *sets], defaults=quickstart_overrides())


def test_cli_ddp_two_processes_on_cpu(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--set",
            "distributed=ddp",
            "--set",
            "num_processes=2",
            "--set",
            f"output_dir={out}",
            "--set",
            "max_steps=12",
            "--set",
            "logging_steps=2",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "launch: " in err and "accelerate.commands.launch --config_file" in err and "-m autotuning train" in err
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "finished" and record["num_processes"] == 2
    assert record["device"] == "cpu x 2 processes"
    # Rank 0 alone writes the curve: every (kind, step) point appears once, not once per process.
    events = read_metrics(out / "metrics.jsonl")
    counts = collections.Counter((e["type"], e["step"]) for e in events if e["type"] in ("train", "eval"))
    assert counts and max(counts.values()) == 1
    assert [e["step"] for e in events if e["type"] == "train"][-1] == 12
    accelerate = yaml.safe_load((out / "accelerate_config.yaml").read_text())
    assert accelerate["num_processes"] == 2 and accelerate["distributed_type"] == "MULTI_GPU"
    assert (out / "merged" / "config.json").is_file() and not (out / ".trained").exists()
    assert record["exports"]["torch"]["max_abs_logit_diff"] <= 1e-4


def test_pipeline_streams_stops_and_resumes_a_ddp_run(tmp_path):
    config = _quick(
        tmp_path, "distributed=ddp", "num_processes=2", "max_steps=400", "save_steps=1000", "logging_steps=1"
    )
    pipeline = Pipeline(tmp_path)
    run = pipeline.start(config)
    deadline = time.time() + 180
    while not any(e.get("type") == "train" for e in run.events(0)) and time.time() < deadline and run.is_active():
        time.sleep(0.2)
    assert any(e.get("type") == "train" for e in run.events(0)), run.log_tail()
    assert any(line.startswith("launch: ") for line in run.log_tail(400).splitlines())
    run.stop()
    assert run.wait(180)
    assert run.status is RunStatus.STOPPED, run.error
    stopped_at = run.result.global_step
    assert 0 < stopped_at < 400
    assert (tmp_path / "run" / "checkpoints" / f"checkpoint-{stopped_at}").is_dir()
    assert not (tmp_path / "run" / "STOP").exists()

    resumed = pipeline.start(config.replace(resume=True, max_steps=stopped_at + 4))
    assert resumed.wait(240)
    assert resumed.status is RunStatus.FINISHED, resumed.error
    steps = [e["step"] for e in resumed.events(0) if e.get("type") == "train"]
    assert steps == list(range(1, stopped_at + 5))  # one curve, continued


def test_fsdp_is_refused_on_cpu_with_the_alternative():
    config = load_config(None, ["fsdp=true", "num_processes=2"])
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has GPUs")
    with pytest.raises(ConfigError, match="ddp"):
        check_distributed(config)
    with pytest.raises(ConfigError, match="set num_processes"):
        check_distributed(load_config(None, ["distributed=ddp"]))
    with pytest.raises(ConfigError, match="run_job does not start"):
        run_job(load_config(None, ["distributed=ddp", "num_processes=2"]))


def test_fsdp_accelerate_config_names_the_models_layer_class():
    config = load_config(None, ["distributed=fsdp", "num_processes=2"])
    llama = build_accelerate_config(config, resolve_model_path("builtin:tiny-llama"), 2)
    assert llama["distributed_type"] == "FSDP"
    fsdp = llama["fsdp_config"]
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_reshard_after_forward"] is True  # full shard
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # checkpoints load unsharded for merge/export
    assert transformer_layer_class(resolve_model_path("builtin:tiny-gpt2")) == "GPT2Block"
    assert transformer_layer_class(resolve_model_path("builtin:tiny-qwen2")) == "Qwen2DecoderLayer"


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_gradient_checkpointing_is_fsdps_own_under_fsdp_and_the_trainers_otherwise(mode, tmp_path):
    """transformers raises on FSDP activation checkpointing and Trainer gradient checkpointing together: use one."""
    from autotuning.training import build_sft_config

    config = load_config(None, [f"distributed={mode}", "num_processes=2", "gradient_checkpointing=true"])
    args = build_sft_config(config, tmp_path, "fp32", has_eval=False, show_progress=False)
    if mode == "fsdp":
        accelerate = build_accelerate_config(config, resolve_model_path("builtin:tiny-llama"), 2)
        assert accelerate["fsdp_config"]["fsdp_activation_checkpointing"] is True
        assert args.gradient_checkpointing is False
    else:
        assert args.gradient_checkpointing is True


def test_seed_fsdp_flag_is_distributed_fsdp():
    assert load_config(None, ["fsdp=true"]).training.distributed.value == "fsdp"
    with pytest.raises(ConfigError, match="fsdp"):
        load_config(None, ["fsdp=true", "distributed=ddp"])
    with pytest.raises(ConfigError, match="ddp"):
        load_config(None, ["distributed=fsdp", "quantization=4bit", "peft_type=qlora"])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP needs 2 CUDA GPUs")
def test_fsdp_two_gpus_trains_and_exports(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--set",
            "distributed=fsdp",
            "--set",
            "num_processes=2",
            "--set",
            f"output_dir={out}",
            "--set",
            "max_steps=10",
            "--quiet",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "finished"
    assert record["exports"]["torch"]["max_abs_logit_diff"] <= 1e-4


@pytest.mark.parametrize(
    "lent,typed,seen",
    [
        (False, "", "- -"),  # the app: a session without a token gets none, not the server's
        (False, "hf_visitor", "hf_visitor -"),  # the app: the session's own token
        (True, "", "hf_server_owner hf_server_owner"),  # the CLI (or --lend-hf-token): the owner's, as before
    ],
)
def test_workers_get_the_sessions_token_never_the_servers(monkeypatch, tmp_path, lent, typed, seen):
    monkeypatch.setitem(config_module._ENVIRONMENT_TOKEN, "lent", lent)
    monkeypatch.setenv("HF_TOKEN", "hf_server_owner")
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_server_owner")
    show = "import os; print(os.environ.get('HF_TOKEN', '-'), os.environ.get('HUGGING_FACE_HUB_TOKEN', '-'))"
    plan = LaunchPlan(tmp_path, tmp_path / "accelerate_config.yaml", [sys.executable, "-c", show], 1)
    lines: list[str] = []
    assert launch(plan, Config(model=ModelConfig(hf_token=typed)), threading.Event(), on_output=lines.append) == 0
    assert lines == [seen]
