"""Training throughput with the app polling the run every second vs the same run headless.

    python bench/ui_overhead.py [--steps 150] [--pairs 2]

Headless = `run_job` in the foreground (what `python -m autotuning train` runs). UI = the same config
through `Pipeline.start` while a thread does what the Train tab's 1 s timer does on every tick:
`snapshot()` of the run and the three chart payloads built from all its events. Runs alternate
(UI, headless, UI, headless ...) so machine noise hits both. Tokens/s = trained tokens of the last
logged step / its elapsed training time. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
from pathlib import Path

from common import print_result


def _rate(events) -> float:
    last = [e for e in events if e.get("type") == "train" and e.get("tokens_seen")][-1]
    return last["tokens_seen"] / last["elapsed_s"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--pairs", type=int, default=2)
    args = parser.parse_args()

    from autotuning.config import load_config, quickstart_overrides
    from autotuning.job import run_job
    from autotuning.modeling import resolve_model_path
    from autotuning.training import MetricsSink
    from ui.charts import loss_figure, lr_figure, throughput_figure
    from ui.context import AppContext
    from ui.train_tab import snapshot

    resolve_model_path("builtin:tiny-llama")
    root = Path(tempfile.mkdtemp(prefix="autotuning-ui-overhead-"))
    ctx = AppContext.create(root / "runs")
    sets = [f"max_steps={args.steps}", "logging_steps=1", "eval_steps=0", "eval_split=0", "save_steps=100000"]
    ui_rates, cli_rates = [], []
    for i in range(args.pairs):
        config = load_config(None, sets + [f"output_dir={root / 'runs' / f'ui{i}'}"], defaults=quickstart_overrides())
        run = ctx.pipeline.start(config)
        done = threading.Event()

        def poll(done: threading.Event):
            while not done.wait(1.0):
                snap = snapshot(ctx)
                events = snap["events"]
                loss_figure(events), lr_figure(events), throughput_figure(events)

        poller = threading.Thread(target=poll, args=(done,))
        poller.start()
        run.wait()
        done.set()
        poller.join()
        ui_rates.append(_rate(run.events(0)))

        sink = MetricsSink()
        config = load_config(None, sets + [f"output_dir={root / f'cli{i}'}"], defaults=quickstart_overrides())
        run_job(config, sink=sink, show_progress=False)
        cli_rates.append(_rate(sink.events(0)))
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
