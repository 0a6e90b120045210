"""No borrowed token: a browser session never sends the server's Hugging Face token.

The Hub is replaced at the HTTP boundary by a stub that records every request's path and Authorization header
and answers 404 (repository not found). The real ``python app.py`` runs in a subprocess pointed at it
(``HF_ENDPOINT``, read by huggingface_hub when it is imported) with a sentinel ``HF_TOKEN`` and a sentinel
stored login, and a gradio_client session starts runs, asks for the estimate, previews a dataset, and evaluates
and exports a finished run whose base model is on the Hub. Each fails cleanly (not found); what matters is what
reached the stub. The contrasts keep the test honest: the same requests carry the sentinel when the app is
started with ``--lend-hf-token``, a session's typed token (or its Space login) is sent for that session, and the
CLI, the owner's own process, sends ``HF_TOKEN``.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from autotuning.config import Config, ModelConfig
from autotuning.runs import RunDir
from ui.config_tab import initial_config
from ui.form import FORM_FIELDS, SOURCE_HUB, config_to_form

gradio_client = pytest.importorskip("gradio_client")

SENTINEL = "hf_SENTINEL_server_env_token"
STORED_SENTINEL = "hf_SENTINEL_server_stored_login"
PRIVATE_MODEL = "someorg/private-model"
PRIVATE_DATASET = "someorg/private-data"
REPO = Path(__file__).resolve().parents[2]


class RecordingHub:
    """A stand-in for the Hub: records (method, path, Authorization) of each request and answers 404."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str | None]] = []
        self.headers_seen: list[str] = []  # every header of every request, to look for a token anywhere
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                hub.requests.append((self.command, self.path, self.headers.get("Authorization")))
                hub.headers_seen.append(str(self.headers))
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = b'{"error": "Repository Not Found"}'
                self.send_response(404)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Error-Code", "RepoNotFound")  # how the Hub says it; the client raises on it
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_POST = _answer

            def log_message(self, *args) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def since(self, start: int) -> list[tuple[str, str, str | None]]:
        return list(self.requests[start:])


def _authorizations(requests) -> set[str | None]:
    return {auth for _, _, auth in requests}


def _touching(requests, repo_id: str) -> list:
    return [r for r in requests if repo_id in r[1]]


def _write_local_model(target: Path) -> Path:
    """A model folder with a tokenizer and a config and no weights: enough to reach the dataset step."""
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<eos>", "<pad>", "hello", "world"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")
    tokenizer.save_pretrained(target)
    LlamaConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(target)
    return target


def _write_finished_run(run_dir: Path) -> Path:
    """A finished run (as far as the Evaluate and Export tabs can tell) whose base model is on the Hub."""
    run_dir.mkdir(parents=True)
    Config(model=ModelConfig(model_name=PRIVATE_MODEL)).save_yaml(RunDir(run_dir).config_path)
    RunDir(run_dir).update(status="finished")
    return run_dir


def _hub_env(hub: RecordingHub, home: Path) -> dict[str, str]:
    """The server owner's environment: a token in HF_TOKEN and another stored by `hf auth login`."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "token").write_text(STORED_SENTINEL)
    return {
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": SENTINEL,
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0",  # whatever this test process has: the app decides
        "GRADIO_ANALYTICS_ENABLED": "False",
    }


def _cli_train(hub: RecordingHub, base: Path) -> subprocess.CompletedProcess:
    """`python -m autotuning train` on a Hub model, as the server's owner runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **_hub_env(hub, base / "hf-home-cli")}
    return subprocess.run(
        [sys.executable, "-m", "autotuning", "train", "--quiet", "--set", f"model_name={PRIVATE_MODEL}"]
        + ["--set", f"output_dir={base / 'cli-run'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def owner(tmp_path_factory, module_app_launcher):
    """What the server's owner starts, each with its own recording Hub: "default" and "lend" apps as
    (url, hub, model dir, output root), and "cli" as (finished process, hub)."""
    base = tmp_path_factory.mktemp("borrowed-token")
    model_dir = _write_local_model(base / "data" / "local-model")
    flags = {"default": (), "lend": ("--lend-hf-token",)}
    hubs = {name: RecordingHub() for name in [*flags, "cli"]}

    def launch(name: str) -> str:
        root = base / f"runs-{name}"
        _write_finished_run(root / "finished-on-a-private-base")  # before the start: the run pickers list it
        env = _hub_env(hubs[name], base / f"hf-home-{name}")
        return module_app_launcher(root, "--data-dir", str(model_dir.parent), *flags[name], env=env)

    with ThreadPoolExecutor(3) as pool:  # all at once: most of the time is importing torch and gradio
        cli = pool.submit(_cli_train, hubs["cli"], base)
        urls = dict(zip(flags, pool.map(launch, flags)))
        started = {name: (urls[name], hubs[name], model_dir, base / f"runs-{name}") for name in flags}
        started["cli"] = (cli.result(), hubs["cli"])
    yield started
    for hub in hubs.values():
        hub.close()


def _form_args(**changes) -> list:
    values = config_to_form(initial_config())
    values.update(changes)
    return [values.get(name) for name in FORM_FIELDS]


def _hub_dataset(**changes) -> dict:
    return dict(dataset_source=SOURCE_HUB, hub_dataset=PRIVATE_DATASET, **changes)


def _train(client, **changes) -> str:
    """Start a run from the form and wait until it is over; returns the Train tab's status text."""
    started = client.predict(*_form_args(**changes), api_name="/on_start")[0]
    assert "Started" in started, started
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = client.predict(api_name="/train_view")[0]
        if any(f"`{s}`" in status for s in ("failed", "finished", "stopped")):
            return status
        time.sleep(0.2)
    raise AssertionError(f"the run did not end within 60 s: {status}")


def _evaluate_and_export(client, root: Path, typed: str = "") -> list[str]:
    """The Evaluate and Export tabs on the finished run; both fail at the base model. Returns their errors."""
    run_dir = str(root / "finished-on-a-private-base")
    errors = []
    for args, api_name in (
        ([run_dir, 1, typed], "/on_evaluate"),
        ([run_dir, ["torch"], ["q8_0"], typed], "/on_export"),
    ):
        with pytest.raises(gradio_client.exceptions.AppError) as err:
            client.predict(*args, api_name=api_name)
        errors.append(str(err.value))
    return errors


def test_a_browser_session_never_sends_the_servers_token(owner):
    url, hub, model_dir, root = owner["default"]
    session = gradio_client.Client(url, verbose=False)

    status = _train(session, model_name=PRIVATE_MODEL)
    assert "`failed`" in status and f"model '{PRIVATE_MODEL}' was not found" in status
    estimate = session.predict(*_form_args(model_name=PRIVATE_MODEL), api_name="/on_estimate")
    assert "No estimate" in estimate
    model_requests = hub.since(0)

    start = len(hub.requests)
    status = _train(session, model_name=str(model_dir), **_hub_dataset())
    assert "`failed`" in status and PRIVATE_DATASET in status
    preview = session.predict(*_form_args(model_name=str(model_dir), **_hub_dataset()), api_name="/on_preview")[0]
    assert "Cannot read the dataset" in preview and PRIVATE_DATASET in preview
    dataset_requests = hub.since(start)

    start = len(hub.requests)
    errors = _evaluate_and_export(session, root)
    assert all(PRIVATE_MODEL in e for e in errors), errors
    run_requests = hub.since(start)

    print(
        f"\ndefault app: {len(model_requests)} requests for start + estimate, {len(dataset_requests)} for the Hub "
        f"dataset (start + preview), {len(run_requests)} for evaluate + export; {len(hub.requests)} in all"
    )
    assert _touching(model_requests, PRIVATE_MODEL), model_requests  # the Hub was asked: not a vacuous pass
    assert _touching(dataset_requests, PRIVATE_DATASET), dataset_requests
    assert _touching(run_requests, PRIVATE_MODEL), run_requests
    assert _authorizations(hub.requests) == {None}, hub.requests  # neither HF_TOKEN nor the stored login
    assert not any(SENTINEL in h or STORED_SENTINEL in h for h in hub.headers_seen)


def test_a_token_typed_in_the_form_or_a_space_login_is_sent_for_that_session_only(owner):
    url, hub, _, root = owner["default"]
    typed, other = gradio_client.Client(url, verbose=False), gradio_client.Client(url, verbose=False)
    # What gradio injects as the session's gr.OAuthToken; on a Space it comes from "Sign in with Hugging Face".
    signed_in = gradio_client.Client(url, verbose=False, oauth_token="hf_space_login_of_visitor")

    start = len(hub.requests)
    _train(typed, model_name=PRIVATE_MODEL, hf_token="hf_typed_by_visitor")
    _evaluate_and_export(typed, root, typed="hf_typed_by_visitor")
    sent = hub.since(start)
    start = len(hub.requests)
    _train(signed_in, model_name=PRIVATE_MODEL)
    _evaluate_and_export(signed_in, root)
    login = hub.since(start)
    start = len(hub.requests)
    _train(other, model_name=PRIVATE_MODEL)  # another session of the same app, token field empty
    after = hub.since(start)

    print(f"\ntyped token: {len(sent)} requests; Space login: {len(login)}; the next session: {len(after)}")
    assert _touching(sent, PRIVATE_MODEL) and _authorizations(_touching(sent, "/")) == {"Bearer hf_typed_by_visitor"}
    assert _touching(login, PRIVATE_MODEL) and _authorizations(login) == {"Bearer hf_space_login_of_visitor"}
    assert _touching(after, PRIVATE_MODEL) and _authorizations(after) == {None}, after


def test_lend_hf_token_lends_the_servers_token(owner):
    url, hub, model_dir, _ = owner["lend"]
    session = gradio_client.Client(url, verbose=False)

    _train(session, model_name=PRIVATE_MODEL)
    session.predict(*_form_args(model_name=str(model_dir), **_hub_dataset()), api_name="/on_preview")

    print(f"\n--lend-hf-token: {len(hub.requests)} requests")
    for repo_id in (PRIVATE_MODEL, PRIVATE_DATASET):
        touching = _touching(hub.requests, repo_id)
        assert touching and _authorizations(touching) == {f"Bearer {SENTINEL}"}, hub.requests


def test_the_cli_sends_the_owners_token(owner):
    proc, hub = owner["cli"]
    print(f"\nCLI: {len(hub.requests)} requests")
    assert proc.returncode == 2 and "not found" in proc.stderr, proc.stderr[-2000:]
    touching = _touching(hub.requests, PRIVATE_MODEL)
    assert touching and _authorizations(touching) == {f"Bearer {SENTINEL}"}, hub.requests
