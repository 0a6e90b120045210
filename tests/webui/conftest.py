"""A real `python app.py` on a free port, driven by Debian's Chromium through Playwright."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(root: Path, *extra: str, env: dict[str, str] | None = None):
    """Start `python app.py` on a free port with ``root`` as output root; returns (process, url, log file).

    The app runs offline unless ``env`` (added to this process's environment) says otherwise."""
    port = _free_port()
    log = open(root.parent / f"app-{port}.log", "w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "app.py", "--port", str(port), "--output-root", str(root), *extra],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}; see {log.name}")
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except urllib.error.HTTPError:
            break  # it answers (e.g. 401 behind --auth)
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("app.py did not start within 90 s")
    return proc, url, log


def stop_app(proc, log) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """(url, output root) of a running app."""
    root = tmp_path_factory.mktemp("app-runs")
    proc, url, log = start_app(root)
    yield url, root
    stop_app(proc, log)


@pytest.fixture(scope="module")
def app_url(app):
    return app[0]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app_url):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(app_url)
    page.wait_for_selector("#cfg-max_steps input")
    yield page
    context.close()


@pytest.fixture
def shots(tmp_path):
    """Where screenshots go: $AUTOTUNING_SCREENSHOTS (e.g. docs/screenshots) or a temp dir."""
    target = Path(os.environ.get("AUTOTUNING_SCREENSHOTS") or tmp_path)
    target.mkdir(parents=True, exist_ok=True)
    return target


@pytest.fixture
def launch_app(tmp_path):
    """Start extra apps (e.g. with --auth) for one test; they are stopped afterwards. Returns url."""
    started = []

    def launch(*extra: str) -> str:
        root = tmp_path / f"runs-{len(started)}"
        root.mkdir()
        proc, url, log = start_app(root, *extra)
        started.append((proc, log))
        return url

    yield launch
    for proc, log in started:
        stop_app(proc, log)


@pytest.fixture(scope="module")
def module_app_launcher():
    """``launch(root, *flags, env=...) -> url`` for apps one test module shares; all stopped after the module."""
    started = []

    def launch(root: Path, *extra: str, env: dict[str, str] | None = None) -> str:
        proc, url, log = start_app(root, *extra, env=env)
        started.append((proc, log))
        return url

    yield launch
    for proc, log in started:
        stop_app(proc, log)
