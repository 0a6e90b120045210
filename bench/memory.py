"""Estimated vs measured peak memory of short training runs (CPU peak RSS; GPU max allocated when present).

    python bench/memory.py                 # every case, a table for docs/BENCHMARKS.md
    python bench/memory.py --case llama-100m-lora --json

Each case trains 3 steps in a fresh process (so its peak is its own) on rows long enough to fill
max_seq_length. The measurement is the training peak the job records in run.json right after training,
before the export (which holds a second copy of the weights on CPU) adds its own.
The ~110M Llama (hidden 768, 12 layers, vocab 32000, tied embeddings) is built locally with random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BASE = {
    "max_steps": 3,
    "max_seq_length": 256,
    "eval_split": 0,
    "logging_steps": 1,
    "save_steps": 1000,
    "per_device_train_batch_size": 4,
}
CASES: dict[str, dict] = {
    "tiny-llama-lora": {"model_name": "builtin:tiny-llama"},
    "tiny-llama-full": {"model_name": "builtin:tiny-llama", "peft_type": "none", "learning_rate": 2e-5},
    "llama-100m-lora": {"model_name": "llama-100m"},
    "llama-100m-lora-checkpointing": {"model_name": "llama-100m", "gradient_checkpointing": True},
    "llama-100m-qlora": {"model_name": "llama-100m", "quantization": "4bit", "peft_type": "qlora"},
    "llama-100m-full-batch2": {
        "model_name": "llama-100m",
        "peft_type": "none",
        "per_device_train_batch_size": 2,
        "learning_rate": 2e-5,
    },
}


def build_llama_100m(path: Path) -> Path:
    """A ~110M-parameter Llama with random weights and the builtin tokenizer (sizes multiples of 64 for 4-bit)."""
    from common import build_local_llama

    return build_local_llama(
        path,
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )


def long_rows(path: Path, rows: int = 48) -> Path:
    """Rows whose answers run past max_seq_length, so every micro-batch is batch x max_seq_length tokens."""
    rng = random.Random(0)
    words = "model data train loss token layer memory batch answer question river stone light paper".split()
    lines = []
    for i in range(rows):
        answer = " ".join(rng.choice(words) for _ in range(700))
        lines.append(json.dumps({"instruction": f"Write about topic {i}.", "output": answer}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _config(case: str, workdir: Path):
    from autotuning.config import load_config

    sets = {**BASE, **CASES[case]}
    if sets["model_name"] == "llama-100m":
        sets["model_name"] = str(build_llama_100m(workdir / "llama-100m"))
    sets["dataset_path"] = str(long_rows(workdir / "long.jsonl"))
    sets["output_dir"] = str(workdir / f"run-{case}")
    sets["overwrite_output_dir"] = True
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


def measure(case: str, workdir: Path) -> dict:
    """Run in this (fresh) process: train, then report the peak."""
    import torch

    from autotuning.estimate import estimate_memory
    from autotuning.recipe import run_job

    config = _config(case, workdir)
    estimate = estimate_memory(config, suggest=False)
    result = run_job(config, show_progress=False)
    out = {
        "case": case,
        "status": result.status,
        "estimate_bytes": estimate.total_bytes,
        "parts": estimate.parts,
        "parameters": estimate.facts["parameters"],
        "device": estimate.device,
    }
    peak = json.loads((result.run_dir / "run.json").read_text())["train_peak_memory"]
    out["measured_what"] = peak["what"]
    out["measured_bytes"] = peak["bytes"]
    if torch.cuda.is_available():
        out["measured_bytes"] += estimate.parts["runtime"]  # allocated bytes exclude the CUDA context
        out["measured_what"] += " + runtime constant"
    out["error"] = (out["estimate_bytes"] - out["measured_bytes"]) / out["measured_bytes"]
    return out


def run_case(case: str, workdir: Path) -> dict:
    """The case in a fresh interpreter, so the peak is its own."""
    proc = subprocess.run(
        [sys.executable, __file__, "--case", case, "--workdir", str(workdir), "--json", "--in-process"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=list(CASES), action="append")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", action="store_true", help="one JSON line per case")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="autotuning-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.in_process:
        print(json.dumps(measure(args.case[0], workdir)))
        return 0
    results = [run_case(case, workdir) for case in (args.case or list(CASES))]
    if args.json:
        for r in results:
            print(json.dumps(r))
        return 0
    print("| case | parameters | estimate | measured | error |")
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['case']} | {r['parameters'] / 1e6:.1f}M | {r['estimate_bytes'] / 2**20:.0f} MiB | "
            f"{r['measured_bytes'] / 2**20:.0f} MiB | {r['error']:+.0%} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
