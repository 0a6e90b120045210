"""GGUF export time and peak memory for the ~110M Llama of bench/memory.py, to f16 and q8_0.

    python bench/gguf_export.py [--workdir DIR]

A 1-step LoRA run makes the run directory (its merged/ export is the model); then each GGUF type is
exported in a fresh process (write + the reload checks the export does), and that process reports its
wall time and the growth of its peak RSS (VmHWM, reset just before) over what it held before the export. The last line is one
JSON object; `peak_over_model` is that growth divided by the merged model's size on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import print_result


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _export_in_process(run_dir: Path, gtype: str) -> dict:
    from autotuning.export.gguf import export_gguf
    from autotuning.modeling import load_tokenizer
    from autotuning.runs import RunDir, load_run_config

    run = RunDir(run_dir)
    tokenizer = load_tokenizer(load_run_config(run.path))
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    before = _status_kib("VmRSS") * 1024
    started = time.perf_counter()
    figures = export_gguf(run, tokenizer, gtype)
    seconds = time.perf_counter() - started
    peak = _status_kib("VmHWM") * 1024
    return {
        "type": gtype,
        "seconds": round(seconds, 2),
        "peak_growth_bytes": peak - before,
        "bytes": Path(figures["path"]).stat().st_size,
        "max_abs_logit_diff": figures.get("max_abs_logit_diff"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "autotuning-bench-gguf")
    parser.add_argument("--type", help=argparse.SUPPRESS)
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.type:
        print(json.dumps(_export_in_process(args.run, args.type)))
        return 0

    from memory import build_llama_100m

    from autotuning.config import load_config
    from autotuning.job import run_job

    args.workdir.mkdir(parents=True, exist_ok=True)
    model = build_llama_100m(args.workdir / "llama-100m")
    config = load_config(
        None,
        [
            f"model_name={model}",
            "dataset_path=sample",
            "max_steps=1",
            "eval_split=0",
            f"output_dir={args.workdir / 'run'}",
            "overwrite_output_dir=true",
            "max_seq_length=128",
        ],
    )
    run_dir = run_job(config, show_progress=False).run_dir
    model_bytes = sum(p.stat().st_size for p in (run_dir / "merged").glob("*.safetensors"))
    out = {"model_bytes": model_bytes}
    for gtype in ("f16", "q8_0"):
        proc = subprocess.run(
            [sys.executable, __file__, "--type", gtype, "--run", str(run_dir)],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-2000:])
        r = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
        print(
            f"{gtype}: {r['seconds']} s, peak RSS +{r['peak_growth_bytes'] / 2**20:.0f} MiB, file {r['bytes'] / 2**20:.0f} MiB"
        )
        out[f"{gtype}_seconds"] = r["seconds"]
        out[f"{gtype}_peak_growth_bytes"] = r["peak_growth_bytes"]
        out[f"{gtype}_peak_over_model"] = round(r["peak_growth_bytes"] / model_bytes, 2)
        out[f"{gtype}_max_abs_logit_diff"] = r["max_abs_logit_diff"]
    print_result(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
