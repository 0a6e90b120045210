"""Several people on one app: two API sessions, a login, and which files the server hands out."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request

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
