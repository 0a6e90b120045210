"""Download and slim the wheels a device call carries for bench/compare_gpu.py (run where pip can download).

    python bench/carry.py                 # .whl/ (ours, trl, trl_liger; bitsandbytes for QLoRA) and .whl-unsloth/
    python bench/carry.py --check         # only print what is there and the total against the 64 MiB limit

The GPU machine has Python 3.12, torch 2.11 (CUDA 13.0), transformers 5.17, accelerate, peft, triton and most
of the small packages (its image's package list: /work/.library/device/KINDS.md), but no trl, datasets,
liger-kernel, bitsandbytes or Unsloth, and it cannot download. Two folders travel (``carry``):

- ``.whl/``: installed with ``pip install --target /tmp/site``, first on PYTHONPATH for every process:
  what docs/BENCHMARKS.md's GPU figures ran on (transformers 5.24, trl 1.16, peft 0.21.2, datasets 5.2) plus
  liger-kernel 0.8.5 and bitsandbytes 0.50.2;
- ``.whl-unsloth/``: installed with ``--target /tmp/unsloth-site``, put in front of /tmp/site for the Unsloth
  process only (compare_gpu.py --unsloth-target): Unsloth 2026.10.9 and unsloth_zoo with the versions they pin
  (transformers 5.17.0, trl 1.15.0, datasets 4.8.5) and their small requirements missing from the image.

Two wheels are slimmed, because whole they would not fit (64 MiB per call, the repository included):
unsloth's (28.6 MB) is mostly ``studio/``, its web UI, which training never imports; bitsandbytes' (43 MB)
holds one native library per CUDA version, and only CUDA 13's (torch's ``+cu130``) is loaded there. Their
RECORD files are rewritten to match. Left out on purpose: xformers (Unsloth's optional attention backend,
built against one torch; Unsloth then uses torch's SDPA), hf_transfer (downloads only) and diffusers
(diffusion models only). Nothing here is committed: add ``/.whl*/`` to .git/info/exclude.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT = 64 * 1024**2

MAIN = [
    "transformers==5.24.0",
    "trl==1.16.0",
    "peft==0.21.2",
    "datasets==5.2.0",
    "dill==0.4.1",  # datasets' (datasets 5.2: dill < 0.4.2, multiprocess < 0.70.20); not in the image
    "multiprocess==0.70.19",
    "liger-kernel==0.8.5",
    "bitsandbytes==0.50.2",  # QLoRA only: --no-bnb leaves it out
]
UNSLOTH = [
    "unsloth==2026.10.9",
    "unsloth_zoo==2026.10.9",
    "transformers==5.17.0",  # Unsloth's pins: transformers <= 5.17, trl <= 1.15, datasets < 5
    "trl==1.15.0",
    "datasets==4.8.5",
    "tyro==1.0.17",
    "docstring_parser==0.18.0",
    "typeguard==4.6.1",
    "shtab==1.13.0",
    "msgspec==0.23.0",
    "cut_cross_entropy==25.1.1",
    "torchao==0.18.0",
    "pydantic==2.14.4",
    "pydantic_core==2.50.5",
    "annotated_types==0.8.0",
    "typing_inspection==0.4.5",
    "json5==0.17.3",
    "nest_asyncio==1.6.0",
    "structlog==26.1.0",
]
PLATFORM = [
    "--only-binary=:all:",
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    *(
        arg
        for tag in ("manylinux_2_28", "manylinux_2_27", "manylinux_2_24", "manylinux_2_17", "manylinux2014")
        for arg in ("--platform", f"{tag}_x86_64")
    ),
    "--platform",
    "manylinux1_x86_64",
]


def keep_unsloth(name: str) -> bool:
    return not name.startswith("studio/")


def keep_bitsandbytes(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    if not base.startswith("libbitsandbytes_"):
        return True
    return base.startswith(("libbitsandbytes_cuda13", "libbitsandbytes_cpu"))


SLIM = {"unsloth-": keep_unsloth, "bitsandbytes-": keep_bitsandbytes}


def slim(wheel: Path, keep) -> None:
    """Rewrite ``wheel`` without the files ``keep`` refuses, and its RECORD without their lines."""
    out = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        dropped = {n for n in src.namelist() if not keep(n)}
        if not dropped:
            out.unlink()
            return
        for info in src.infolist():
            if info.filename in dropped or info.filename == record_name:
                continue
            dst.writestr(info, src.read(info.filename))
        lines = [
            line
            for line in src.read(record_name).decode().splitlines()
            if line and line.split(",", 1)[0] not in dropped
        ]
        dst.writestr(record_name, "\n".join(lines) + "\n")
    out.replace(wheel)
    print(f"  slimmed {wheel.name}: {len(dropped)} files left out")


def record_ok(wheel: Path) -> bool:
    """Every file in the wheel is in its RECORD with the right hash (what pip would check)."""
    with zipfile.ZipFile(wheel) as z:
        record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        rows = {line.split(",")[0]: line.split(",")[1] for line in z.read(record).decode().splitlines() if line}
        for name in z.namelist():
            if name == record or name.endswith("/"):
                continue
            digest = base64.urlsafe_b64encode(hashlib.sha256(z.read(name)).digest()).rstrip(b"=").decode()
            if rows.get(name) != f"sha256={digest}":
                return False
    return True


def download(folder: Path, specs: list[str]) -> None:
    folder.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PLATFORM, "-d", str(folder), *specs]
    print("$", " ".join(cmd[1:]))
    subprocess.run(cmd, check=True)
    for wheel in folder.glob("*.whl"):
        for prefix, keep in SLIM.items():
            if wheel.name.startswith(prefix):
                slim(wheel, keep)


def tree_bytes() -> int:
    """What the working tree sends besides the carried folders: tracked and untracked-not-ignored files."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return sum((REPO / n.decode()).stat().st_size for n in names if n and (REPO / n.decode()).is_file())


def report(folders: list[Path]) -> int:
    total = tree_bytes()
    print(f"working tree (tracked + untracked, not ignored): {total / 2**20:.1f} MiB")
    for folder in folders:
        wheels = sorted(folder.glob("*.whl"))
        size = sum(w.stat().st_size for w in wheels)
        total += size
        print(f"{folder.name}/: {len(wheels)} wheels, {size / 2**20:.1f} MiB")
        for w in wheels:
            print(f"  {w.stat().st_size / 2**20:6.2f} MiB  {w.name}{'' if record_ok(w) else '  (RECORD mismatch!)'}")
    verdict = "fits" if total <= LIMIT else "does NOT fit"
    print(f"total {total / 2**20:.1f} MiB of 64 MiB: {verdict}")
    return 0 if total <= LIMIT else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report what is there")
    parser.add_argument("--no-bnb", action="store_true", help="leave bitsandbytes out (LoRA only)")
    parser.add_argument("--no-unsloth", action="store_true", help="leave Unsloth's stack out")
    parser.add_argument(
        "--dest", type=Path, default=REPO, help="where .whl/ and .whl-unsloth/ go (a scratch dir to try)"
    )
    args = parser.parse_args()
    dest = args.dest.resolve()
    main_dir, unsloth_dir = dest / ".whl", dest / ".whl-unsloth"
    folders = [main_dir] + ([] if args.no_unsloth else [unsloth_dir])
    if not args.check:
        inside = dest == REPO or REPO in dest.parents
        check = ["git", "check-ignore", "-q", str(main_dir / "x.whl")]
        if inside and subprocess.run(check, cwd=REPO).returncode != 0:
            print("the wheel folders would be committed: run  echo '/.whl*/' >> .git/info/exclude  first")
            return 1
        download(main_dir, [s for s in MAIN if not (args.no_bnb and s.startswith("bitsandbytes"))])
        if not args.no_unsloth:
            download(unsloth_dir, UNSLOTH)
    return report(folders)


if __name__ == "__main__":
    raise SystemExit(main())
