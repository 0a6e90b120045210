"""Several people on one app: two API sessions, a login, and which files the server hands out."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from ui.config_tab import initial_config
from ui.form import FORM_FIELDS, config_to_form

gradio_client = pytest.importorskip("gradio_client")


def _start_args(**changes) -> list:
    values = config_to_form(initial_config())
    values.update(changes)
    return [values.get(name) for name in FORM_FIELDS]


def _status(root, name: str) -> dict:
    path = root / name / "run.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def test_second_session_start_is_refused_and_the_first_run_is_untouched(app):
    url, root = app
    first = gradio_client.Client(url, verbose=False)
    second = gradio_client.Client(url, verbose=False)
    out = first.predict(*_start_args(run_name="first", max_steps=300, logging_steps=1), api_name="/on_start")
    assert "Started" in out[0]
    deadline = time.monotonic() + 60
    while _status(root, "first").get("status") != "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    steps_before = (
        sum(1 for _ in (root / "first" / "metrics.jsonl").open()) if (root / "first" / "metrics.jsonl").exists() else 0
    )

    refused = second.predict(*_start_args(run_name="second", max_steps=5), api_name="/on_start")
    assert "Not started" in refused[0] and "already running" in refused[0]
    assert not (root / "second").exists()

    time.sleep(2)
    assert _status(root, "first")["status"] == "running"  # still training, charts still fed
    assert sum(1 for _ in (root / "first" / "metrics.jsonl").open()) > steps_before
    stopped = second.predict(api_name="/on_stop")  # any session may stop the one job; both see the same state
    assert "Stopping" in stopped[0]
    deadline = time.monotonic() + 60
    while _status(root, "first").get("status") != "stopped" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _status(root, "first")["status"] == "stopped"


def test_files_are_served_from_run_directories_only(app, tmp_path):
    url, root = app
    secret = tmp_path / "secret.txt"
    secret.write_text("not for you")
    workspace_file = root / ".workspace" / "uploads" / "someone-else.jsonl"
    workspace_file.parent.mkdir(parents=True, exist_ok=True)
    workspace_file.write_text('{"private": true}\n')
    for path in (secret, workspace_file, root.parent / "nothing-here"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + "gradio_api/file=" + urllib.parse.quote(str(path)), timeout=10)
        assert err.value.code in (403, 404)


def test_auth_refuses_unauthenticated_requests(launch_app):
    url = launch_app("--auth", "alice:wonderland")
    for path in ("config", "gradio_api/info"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + path, timeout=10)
        assert err.value.code == 401
    with pytest.raises(ValueError):
        gradio_client.Client(url, verbose=False)  # no login, no API
    with pytest.raises(ValueError, match="Could not login"):
        gradio_client.Client(url, auth=("alice", "wrong"), verbose=False)
    client = gradio_client.Client(url, auth=("alice", "wonderland"), verbose=False)
    assert "/on_start" in client.view_api(return_format="dict", print_info=False)["named_endpoints"]


def _wait_status(root, name: str, wanted: set[str], timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while _status(root, name).get("status") not in wanted and time.monotonic() < deadline:
        time.sleep(0.3)
    return _status(root, name)


def test_two_sessions_uploading_files_of_the_same_name_each_train_on_their_own(app, tmp_path):
    """Same file name, different rows: each session's run trains on its own upload (dataset fingerprints)."""
    from autotuning.data import prepare_data
    from autotuning.modeling import load_tokenizer
    from autotuning.runs import load_run_config

    url, root = app
    files = {}
    for who, topic in (("alice", "tides"), ("bob", "volcanoes")):
        folder = tmp_path / who
        folder.mkdir()
        rows = [
            {"instruction": f"Say one thing about {topic} (#{i}).", "output": f"{topic.title()} fact number {i}."}
            for i in range(24)
        ]
        files[who] = folder / "data.jsonl"
        files[who].write_text("".join(json.dumps(r) + "\n" for r in rows))
    clients = {who: gradio_client.Client(url, verbose=False) for who in files}
    staged = {
        who: clients[who].predict(gradio_client.handle_file(str(path)), api_name="/on_upload")
        for who, path in files.items()
    }
    for who in files:  # both uploaded before either trains: the second upload must not replace the first
        args = _start_args(
            run_name=f"upload-{who}", dataset_source="Upload a file", upload=staged[who], max_steps=2, eval_split=0
        )
        assert "Started" in clients[who].predict(*args, api_name="/on_start")[0]
        assert _wait_status(root, f"upload-{who}", {"finished", "failed"})["status"] == "finished"

    seen = {}
    for who, path in files.items():
        record = _status(root, f"upload-{who}")
        config = load_run_config(root / f"upload-{who}")
        assert Path(config.data.dataset_path).read_bytes() == path.read_bytes()  # its own staged copy
        own = prepare_data(config.replace(dataset_path=str(path)), load_tokenizer(config))
        assert record["dataset"]["fingerprint"] == own.fingerprint
        seen[who] = own.fingerprint
    assert seen["alice"] != seen["bob"]
