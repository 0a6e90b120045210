"""Training throughput with the app polling the run every second vs the same run headless.

    python bench/ui_overhead.py [--steps 16] [--pairs 3]

Workload: the 30M Llama and mixed-length rows of bench/common.py (batch 8, max_seq_length 512), so a
step takes about a second, like a real run's; the UI's work per tick is then measured against real steps
rather than against the noise of a tiny model's ~50 ms steps.

Headless = `run_job` in the foreground (what `python -m autotuning train` runs). UI = the same config
through `Pipeline.start`, trained on the main thread as `python app.py` does (the pipeline's
`MainThreadExecutor`), while a thread does what the Train tab's 1 s timer does on every tick:
`snapshot()` of the run and the three chart payloads built from all its events. Each pair runs both,
the first of the pair alternating, so machine noise hits both; the medians are compared. Tokens/s = trained tokens of the last
logged step / its elapsed training time. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
from pathlib import Path

from common import bench_config, print_result


def _rate(events) -> float:
    last = [e for e in events if e.get("type") == "train" and e.get("tokens_seen")][-1]
    return last["tokens_seen"] / last["elapsed_s"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()

    from autotuning.pipeline import MainThreadExecutor
    from autotuning.recipe import run_job
    from autotuning.runs import MetricsSink
    from ui.charts import loss_figure, lr_figure, throughput_figure
    from ui.context import AppContext
    from ui.train_tab import snapshot

    root = Path(tempfile.mkdtemp(prefix="autotuning-ui-overhead-"))
    workdir = Path(tempfile.gettempdir()) / "autotuning-bench"
    ctx = AppContext.create(root / "runs")
    ctx.pipeline.executor = MainThreadExecutor()  # as `python app.py` does: its main thread trains
    sets = {"max_steps": args.steps, "save_format": "torch", "save_steps": 100000}

    def through_ui(i: int) -> float:
        run = ctx.pipeline.start(bench_config(workdir, **sets, output_dir=root / "runs" / f"ui{i}"))
        done = threading.Event()

        def poll(done: threading.Event):
            while not done.wait(1.0):  # what the Train tab's 1 s timer does on every tick
                events = snapshot(ctx)["events"]
                loss_figure(events), lr_figure(events), throughput_figure(events)

        poller = threading.Thread(target=poll, args=(done,))
        poller.start()
        ctx.pipeline.executor.serve(keep_going=lambda: not run.wait(0))
        done.set()
        poller.join()
        return _rate(run.events(0))

    def headless(i: int) -> float:
        sink = MetricsSink()
        run_job(bench_config(workdir, **sets, output_dir=root / f"cli{i}"), sink=sink, show_progress=False)
        return _rate(sink.events(0))

    ui_rates, cli_rates = [], []
    for i in range(args.pairs):
        # Alternate which goes first, so neither always runs on a machine the other just warmed up.
        order = [("ui", through_ui), ("cli", headless)][:: 1 if i % 2 == 0 else -1]
        for name, fn in order:
            (ui_rates if name == "ui" else cli_rates).append(fn(i))
        print(f"pair {i}: ui {ui_rates[-1]:.0f} tok/s, headless {cli_rates[-1]:.0f} tok/s")
    ui, cli = statistics.median(ui_rates), statistics.median(cli_rates)
    print_result(
        {
            "ui_tok_s": round(ui, 1),
            "cli_tok_s": round(cli, 1),
            "ratio": round(ui / cli, 3),
            "steps": args.steps,
            "pairs": args.pairs,
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
