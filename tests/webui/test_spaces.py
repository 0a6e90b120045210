"""Running as a Hugging Face Space: the README's front matter, where the app listens, the CPU notice, sign-in."""

from __future__ import annotations

import re
from pathlib import Path

import gradio as gr
import gradio.routes
import pytest
import yaml

from ui import AppContext, build_app
from ui.config_tab import LOGIN_HINT
from ui.hardware import hardware_notice, is_space
from ui.identity import OAUTH_ENV, oauth_available

REPO = Path(__file__).resolve().parents[2]
LISTEN_ENV = ("PORT", "GRADIO_SERVER_PORT", "GRADIO_SERVER_NAME")


def _front_matter() -> dict:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.match(r"---\n(.*?)\n---\n", text, re.DOTALL)
    assert match, "README.md must start with the Spaces YAML block (--- at line 1)"
    return yaml.safe_load(match.group(1))


def _pin(name: str) -> str:
    for line in (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith(f"{name}=="):
            return line.split("==", 1)[1].split("#")[0].strip()
    raise AssertionError(f"{name} is not pinned in requirements.txt")


def test_readme_front_matter_matches_the_app():
    meta = _front_matter()
    assert meta["sdk"] == "gradio"
    assert str(meta["sdk_version"]) == _pin("gradio")
    assert (REPO / meta["app_file"]).is_file()
    assert meta["python_version"] == "3.11"  # quoted: unquoted 3.10 would read as 3.1
    assert meta["pinned"] is False
    assert len(meta.get("short_description", "")) <= 60  # the Hub's limit


@pytest.fixture
def clean_env(monkeypatch):
    for name in LISTEN_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_listen_address_from_the_environment_and_flags_win(clean_env):
    from app import parse_args

    args = parse_args([])
    assert (args.host, args.port) == ("127.0.0.1", 7860)
    clean_env.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    clean_env.setenv("GRADIO_SERVER_PORT", "7861")
    assert (parse_args([]).host, parse_args([]).port) == ("0.0.0.0", 7861)
    clean_env.setenv("PORT", "8080")  # container hosts set PORT; it wins over GRADIO_SERVER_PORT
    assert parse_args([]).port == 8080
    args = parse_args(["--host", "127.0.0.1", "--port", "9000"])
    assert (args.host, args.port) == ("127.0.0.1", 9000)


def test_bad_port_in_the_environment_is_a_usage_error_but_help_still_works(clean_env, capsys):
    from app import parse_args

    clean_env.setenv("PORT", "http")
    with pytest.raises(SystemExit) as exit_info:
        parse_args([])
    assert exit_info.value.code == 2 and "'http', not a port number" in capsys.readouterr().err
    assert parse_args(["--port", "7000"]).port == 7000
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0 and "env PORT or GRADIO_SERVER_PORT" in capsys.readouterr().out


def test_cpu_space_notice_names_what_needs_a_gpu():
    space = {"SPACE_ID": "someone/autotuning"}
    assert is_space(space) and not is_space({}) and not is_space({"SPACE_ID": ""})
    assert hardware_notice({}, cuda_available=False) == ""  # local CPU: whoever started it chose the machine
    assert hardware_notice(space, cuda_available=True) == ""  # a GPU Space
    notice = hardware_notice(space, cuda_available=False)
    for needle in ("CPU", "fp16", "fsdp", "4-bit", "8-bit", "builtin tiny models", "GPU hardware"):
        assert needle in notice, needle


def test_app_shows_the_notice_on_a_cpu_space_only(monkeypatch, tmp_path):
    import ui
    from ui import AppContext, build_app

    def notices(demo) -> list[str]:
        return [b.value for b in demo.blocks.values() if getattr(b, "elem_id", None) == "hardware-notice"]

    monkeypatch.setattr(ui, "_cuda_available", lambda: False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert notices(build_app(AppContext.create(tmp_path / "a"))) == []
    monkeypatch.setenv("SPACE_ID", "someone/autotuning")
    (shown,) = notices(build_app(AppContext.create(tmp_path / "b")))
    assert shown == hardware_notice({"SPACE_ID": "x"}, False)


OAUTH_SPACE = {"SYSTEM": "spaces", "SPACE_ID": "someone/autotuning", **dict.fromkeys(OAUTH_ENV, "set by the Space")}


def test_sign_in_with_hugging_face_only_on_a_space_with_oauth(monkeypatch, tmp_path):
    """Off a Space gradio would mock the login with this machine's stored `hf auth login`: no button, no routes."""
    without = {name: {k: v for k, v in OAUTH_SPACE.items() if k != name} for name in ("SYSTEM", "OAUTH_CLIENT_ID")}
    assert oauth_available(OAUTH_SPACE)
    assert not oauth_available({})  # local, Colab, a team box
    assert not oauth_available(without["SYSTEM"])  # SPACE_ID alone: gradio's get_space() says not a Space
    assert not oauth_available(without["OAUTH_CLIENT_ID"])  # a Space without hf_oauth: true

    attached = []  # gradio's own OAuth routes need its oauth extra (authlib), which the tests do not install
    monkeypatch.setattr(gradio.routes, "attach_oauth", attached.append)

    def login_buttons(env: dict) -> tuple[int, int, bool]:
        for name in OAUTH_SPACE:
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        attached.clear()
        demo = build_app(AppContext.create(tmp_path / str(len(env))))
        (token_box,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "cfg-hf_token"]
        buttons = sum(isinstance(b, gr.LoginButton) for b in demo.blocks.values())
        return buttons, len(attached), LOGIN_HINT in token_box.info

    assert login_buttons({}) == (0, 0, False)  # gradio adds login routes (mocked off a Space) only for a LoginButton
    assert login_buttons(without["SYSTEM"]) == (0, 0, False)
    assert login_buttons(OAUTH_SPACE) == (1, 1, True)  # and the token field says the login is used
