"""Seconds from Start to the first metric event the UI can draw, with the builtin tiny model (cached).

    python bench/first_point.py [--repeats 5]

Start = `Pipeline.start(config)` (what the Train tab's Start button calls), with the main thread training
as in `python app.py`; the clock stops when the run's event list, read from another thread, holds its
first train-loss event (what the 1 s UI timer reads). The model is built once before
timing (a fresh machine builds it on first use, ~5 s). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from common import print_result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from autotuning.config import load_config, quickstart_overrides
    from autotuning.modeling import resolve_model_path
    from autotuning.pipeline import MainThreadExecutor, Pipeline

    resolve_model_path("builtin:tiny-llama")
    root = Path(tempfile.mkdtemp(prefix="autotuning-first-point-"))
    executor = MainThreadExecutor()
    pipeline = Pipeline(root, executor=executor)  # as `python app.py`: the main thread trains
    times = []

    def watch(run, started: float) -> None:  # what the UI's timer sees, from another thread
        while not any(e.get("type") == "train" for e in run.events(0)):
            if run.wait(0):
                return
            time.sleep(0.01)
        times.append(time.perf_counter() - started)
        run.stop()

    for i in range(args.repeats):
        config = load_config(None, [f"output_dir={root / f'r{i}'}", "max_steps=400"], defaults=quickstart_overrides())
        started = time.perf_counter()
        run = pipeline.start(config)
        watcher = threading.Thread(target=watch, args=(run, started))
        watcher.start()
        executor.serve(keep_going=lambda run=run: not run.wait(0))
        watcher.join()
        if len(times) <= i:
            raise SystemExit(f"run ended before its first point: {run.error}")
        print(f"run {i}: first point after {times[-1]:.2f} s")
    print_result(
        {
            "seconds": round(statistics.median(times), 2),
            "min_s": round(min(times), 2),
            "max_s": round(max(times), 2),
            "repeats": len(times),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
