"""Rows per second for preparing a dataset: load + normalise + tokenise 50,000 synthetic alpaca rows.

    python bench/data_prep.py [--rows 50000]

The rows are built from the bundled instruction sample (1-4 rows joined, then numbered so that every row
is unique) and written once as JSONL. `prepare_data` runs twice in fresh processes on the same file, with
the 30M workload's tokenizer and a cache folder that starts empty: the first run tokenises and stores the
result, the second must read it back from the cache. Each run reports its stages (load, normalise,
tokenise or cache read) from a timing of the same functions `prepare_data` calls. The last line is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, print_result, workload

_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import autotuning.data as data
from autotuning.config import load_config
from autotuning.modeling import load_tokenizer

config = load_config(None, [f"model_name={sys.argv[2]}", f"dataset_path={sys.argv[3]}", "max_seq_length=512",
                            "eval_split=0.02"])
tokenizer = load_tokenizer(config)
stages = {}

def timed(name, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            stages[name] = stages.get(name, 0.0) + time.perf_counter() - start
    return wrapper

data.load_rows = timed("load", data.load_rows)
data.normalise_rows = timed("normalise", data.normalise_rows)
data.encode_rows = timed("tokenise", data.encode_rows)
data._load_cached = timed("cache_read", data._load_cached)
data._store_cached = timed("cache_write", data._store_cached)
start = time.perf_counter()
prepared = data.prepare_data(config, tokenizer)
total = time.perf_counter() - start
rows = prepared.stats["rows_read"]
print(json.dumps({"seconds": total, "rows": rows, "train_rows": len(prepared.train),
                  "tokenised": "tokenise" in stages, "stages": {k: round(v, 2) for k, v in stages.items()}}))
"""


def build_rows(path: Path, rows: int) -> Path:
    if path.is_file() and sum(1 for _ in path.open(encoding="utf-8")) == rows:
        return path
    sample_file = REPO / "assets" / "datasets" / "instruction_sample.jsonl"
    sample = [json.loads(line) for line in sample_file.read_text().splitlines()]
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as out:
        for i in range(rows):
            parts = rng.sample(sample, k=rng.choice([1, 1, 1, 1, 1, 1, 2, 2, 3, 4]))
            row = {
                "instruction": f"({i}) " + " ".join(p["instruction"] for p in parts),
                "input": " ".join(p.get("input", "") for p in parts).strip(),
                "output": "\n\n".join(p["output"] for p in parts),
            }
            out.write(json.dumps(row) + "\n")
    return path


def run_once(model: Path, rows: Path, cache: Path) -> dict:
    env = {**os.environ, "AUTOTUNING_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(REPO), str(model), str(rows)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "autotuning-bench")
    args = parser.parse_args()
    model, _ = workload(args.workdir)
    rows = build_rows(args.workdir / f"rows-{args.rows}.jsonl", args.rows)
    cache = Path(tempfile.mkdtemp(prefix="autotuning-data-cache-"))
    start = time.perf_counter()
    first = run_once(model, rows, cache)
    second = run_once(model, rows, cache)
    print(
        f"first run: {first['seconds']:.1f} s, {first['rows'] / first['seconds']:.0f} rows/s, stages {first['stages']}"
    )
    print(
        f"second run: {second['seconds']:.1f} s, {second['rows'] / second['seconds']:.0f} rows/s, "
        f"stages {second['stages']}"
    )
    print(f"(both runs with process start-up: {time.perf_counter() - start:.0f} s)")
    print_result(
        {
            "rows": first["rows"],
            "first_run_s": round(first["seconds"], 2),
            "first_run_rows_s": round(first["rows"] / first["seconds"], 1),
            "first_run_stages_s": first["stages"],
            "second_run_s": round(second["seconds"], 2),
            "second_run_rows_s": round(second["rows"] / second["seconds"], 1),
            "second_run_stages_s": second["stages"],
            "second_run_hit_cache": not second["tokenised"] and "cache_read" in second["stages"],
            "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "(unset: on)"),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
