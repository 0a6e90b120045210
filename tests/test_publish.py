"""Pushing a run to the Hub, against a local server that records what huggingface_hub sends (tests/hubserver.py).

The real huggingface.co is never contacted: these tests check our side (the repo created, the files and the card
committed, the token sent) and the errors a user meets before anything is uploaded. The server takes every file
as a regular (base64, in-commit) file, so the LFS/Xet transfer of large files on the real Hub is not exercised.
"""

from __future__ import annotations

import json
import shutil

import gradio as gr
import pytest
from gradio.helpers import special_args
from hubserver import RecordingHub
from huggingface_hub import ModelCard, constants

from autotuning.cli import main
from autotuning.config import lend_environment_token
from autotuning.errors import UserError
from autotuning.publish import push_run, repo_layout
from autotuning.runs import RunDir
from ui import build_app
from ui.context import AppContext

TOKEN = "hf_push_test_token_1234"


@pytest.fixture
def run(exported_tiny_run) -> RunDir:
    """The session's 2-step tiny Llama run with merged/, adapter/ and gguf/ (tests/conftest.py)."""
    return exported_tiny_run


@pytest.fixture
def hub(monkeypatch):
    """The recording server as the Hub: online (the suite runs with HF_HUB_OFFLINE=1), HF_ENDPOINT pointing at it,
    and hf_xet off so upload_folder makes one plain commit (with hf_xet it streams large files to Xet storage)."""
    with RecordingHub(TOKEN) as server:
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        yield server


def _local_files(folder) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != "README.md" and not p.name.startswith(".")
    }


def test_push_command_creates_a_private_repo_and_uploads_every_part_with_a_card(run, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["push", "--run", str(run.path), "--repo", "someone/tiny-model"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert hub.created == [{"name": "tiny-model", "organization": "someone", "visibility": "private", "type": "model"}]
    # Every call of the push carries the user's token (a GET of huggingface_hub's own agent registry does not).
    assert {r["authorization"] for r in hub.requests if r["method"] == "POST"} == {f"Bearer {TOKEN}"}
    assert [c["repo"] for c in hub.commits] == ["someone/tiny-model"] * 4
    assert [c["summary"].split(" of ")[0] for c in hub.commits] == [
        "Upload merged",
        "Upload adapter",
        "Upload gguf",
        "Model card",
    ]  # one commit per part, the card last
    assert all(not c["other"] for c in hub.commits)  # all regular files: no LFS pointers, no deletions

    expected = dict(_local_files(run.merged))  # merged at the root, the others in folders of their name
    expected |= {f"adapter/{k}": v for k, v in _local_files(run.adapter).items()}
    expected |= {f"gguf/{k}": v for k, v in _local_files(run.path / "gguf").items()}
    uploaded = hub.files
    assert set(uploaded) == set(expected) | {"README.md"}
    assert all(uploaded[path] == data for path, data in expected.items())
    assert {"model.safetensors", "adapter/adapter_model.safetensors", "gguf/model-q8_0.gguf", "gguf/Modelfile"} <= set(
        uploaded
    )

    card = ModelCard(uploaded["README.md"].decode("utf-8"))  # the repo's own card, not a run folder's
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "from_pretrained('someone/tiny-model')" in card.text
    assert "PeftModel.from_pretrained(base, 'someone/tiny-model', subfolder='adapter')" in card.text
    assert "hf download someone/tiny-model gguf/" in card.text and str(run.path) not in card.text
    assert TOKEN not in card.text

    assert result["repo"] == "someone/tiny-model" and result["private"] is True
    assert result["uploaded"] == {"merged": "/", "adapter": "adapter", "gguf": "gguf"}
    assert sorted(result["files"]) == sorted(uploaded)
    assert run.read()["hub_pushes"][-1]["repo"] == "someone/tiny-model"


def test_push_of_chosen_parts_public_puts_the_first_at_the_root(run, hub):
    result = push_run(run.path, "someone/tiny-gguf", TOKEN, "gguf,adapter", private=False, endpoint=hub.endpoint)
    assert hub.created[-1]["visibility"] == "public"
    assert result["uploaded"] == {"adapter": "/", "gguf": "gguf"}
    assert "adapter_config.json" in hub.files and "gguf/model-q8_0.gguf" in hub.files
    assert not any(path.endswith(".safetensors") and "adapter" not in path for path in hub.files)  # no merged
    card = ModelCard(hub.files["README.md"].decode("utf-8"))
    assert card.data.library_name == "peft"


def test_a_name_without_owner_goes_to_the_tokens_user(run, hub):
    result = push_run(run.path, "tiny-solo", TOKEN, "merged", endpoint=hub.endpoint)
    assert hub.created[-1]["organization"] is None and result["repo"] == "me/tiny-solo"


def test_a_refused_token_is_a_clear_error(run, hub):
    with pytest.raises(UserError, match="the Hub refused the token"):
        push_run(run.path, "someone/tiny-model", "hf_wrong", endpoint=hub.endpoint)
    assert hub.commits == []


def test_errors_before_anything_is_sent(run, tmp_path, monkeypatch, capsys):
    """Offline (the suite's HF_HUB_OFFLINE=1) nothing could be sent anyway: each of these is refused first."""
    with pytest.raises(UserError, match="not a Hub repo id"):
        push_run(run.path, "bad repo!", TOKEN)
    with pytest.raises(UserError, match="not a Hub repo id"):
        push_run(run.path, "a/b/c", TOKEN)
    with pytest.raises(UserError, match="no Hugging Face token"):
        push_run(run.path, "someone/x", "")
    with pytest.raises(UserError, match="unknown part to push: weights"):
        push_run(run.path, "someone/x", TOKEN, "merged,weights")

    bare = tmp_path / "no-gguf"
    shutil.copytree(run.path, bare, ignore=shutil.ignore_patterns("gguf", "checkpoints", ".lock"))
    with pytest.raises(UserError) as err:
        push_run(bare, "someone/x", TOKEN, "gguf")
    assert err.value.message == (
        f"no gguf/ to push in {bare}, export it first with: python -m autotuning export --run {bare} --format gguf"
    )
    RunDir(bare).update(status="stopped")
    with pytest.raises(UserError, match="the run is stopped: only a finished run is pushed"):
        push_run(bare, "someone/x", TOKEN)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
        push_run(run.path, "someone/x", TOKEN)

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["push", "--run", str(bare), "--repo", "someone/x", "--what", "merged"]) == 2
    assert "error: the run is stopped" in capsys.readouterr().err


def test_repo_layout_orders_parts_merged_adapter_gguf():
    assert repo_layout(["gguf", "merged"]) == {"merged": "", "gguf": "gguf"}
    assert repo_layout(["gguf"]) == {"gguf": ""}


def _wired(demo: gr.Blocks, api_name: str):
    (fn,) = [f.fn for f in demo.fns.values() if f.api_name == api_name]
    return fn


def test_export_tab_pushes_as_a_task_with_the_sessions_token(run, hub, tmp_path, monkeypatch):
    """The Export tab's Push runs publish.push_run as a pipeline task with the token typed in the form."""
    ctx = AppContext.create(tmp_path / "runs")
    on_push = _wired(build_app(ctx), "on_push")
    args, *_ = special_args(on_push, [str(run.path), "someone/from-ui", ["merged"], False, TOKEN], token=None)
    shown = list(on_push(*args))
    task = ctx.pipeline.task(next(iter(shown[0].values())))
    assert task is not None and task.kind.value == "push" and task.status.value == "finished"
    summary = next(iter(shown[-1].values()))
    assert "Pushed to [someone/from-ui]" in summary and "merged → `/`" in summary and TOKEN not in summary
    assert hub.created[-1]["visibility"] == "private" and "config.json" in hub.files
    assert {r["authorization"] for r in hub.requests if r["method"] == "POST"} == {f"Bearer {TOKEN}"}

    # An empty token field and no Space login: the task fails saying so; this machine's token is not lent (as
    # app.py without --lend-hf-token), even with HF_TOKEN set.
    monkeypatch.setenv("HF_TOKEN", "hf_the_servers_own")
    lend_environment_token(False)
    try:
        args, *_ = special_args(on_push, [str(run.path), "someone/from-ui", ["merged"], False, ""], token=None)
        with pytest.raises(gr.Error, match="no Hugging Face token"):
            list(on_push(*args))
    finally:
        lend_environment_token(True)
    assert "Bearer hf_the_servers_own" not in {r["authorization"] for r in hub.requests}
