"""``python -m autotuning``: the same job as the app, without a browser.

Exit codes: 0 done (an export after training that failed its check or crashed is recorded in
run.json and the summary's ``unverified``, with a warning line on stderr; the training is kept),
2 bad input (one ``error: ...`` line on stderr, nothing written; also a run that another live process is
training, for ``train --resume`` and ``export``: the live run is left alone),
130 stopped with Ctrl-C (checkpoint saved; continue with ``--resume``), 1 unexpected failure
(the traceback is in the run's train.log).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from huggingface_hub import get_token

from .config import (
    QUICKSTART_DATASET,
    SWEEP_METRICS,
    Config,
    Distributed,
    FineTuningType,
    GgufType,
    SaveFormat,
    iter_fields,
    load_config,
    quickstart_overrides,
)
from .data import encode_example, prepare_data
from .distributed import Role, leave_process_group
from .errors import UserError
from .estimate import describe, estimate_memory
from .evaluation import evaluate_run
from .export import export_run, unverified_exports
from .launcher import launch, prepare_launch
from .modeling import load_tokenizer
from .publish import push_run
from .recipe import run_job
from .runs import (
    RunDir,
    RunStatus,
    compare_runs,
    default_run_name,
    describe_comparison,
    is_sweep,
    load_sweep_config,
    run_sweep,
    sweep_trial_dirs,
)

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, 2, 130


def _options_text() -> str:
    lines = []
    group_seen = None
    defaults = Config().to_flat_dict(redact=True)  # the real defaults, default_factory fields included
    for group, f in iter_fields():
        if group != group_seen:
            lines.append(f"\n[{group}]")
            group_seen = group
        default = "$HF_TOKEN" if f.name == "hf_token" else defaults[f.name]
        lines.append(f"  {f.name} (default: {default})")
        lines.extend(textwrap.wrap(f.metadata["help"], width=96, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    # The installed `autotuning` command and `python -m autotuning` are the same program: name the one used.
    prog = "autotuning" if Path(sys.argv[0]).name == "autotuning" else "python -m autotuning"
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune Hugging Face causal language models with LoRA/QLoRA, evaluate and export them.",
        epilog=f"Run '{prog} options' for every config option with its help.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add_config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config", metavar="FILE.yaml", help="YAML config (flat or grouped keys; seed aliases accepted)"
        )
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override one option, e.g. --set learning_rate=1e-4 --set save_format=torch (repeatable)",
        )

    train = sub.add_parser(
        "train",
        help="run the whole job: data -> training -> evaluation -> export",
        description="Run the whole job. Without --config: the offline quickstart (builtin tiny Llama, bundled "
        "instruction sample, 40 steps); --set options apply on top of it.",
    )
    add_config_args(train)
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in output_dir from its last checkpoint (its saved config is used unless --config)",
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar, warnings and errors only")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (log lines still printed)")

    inspect = sub.add_parser(
        "inspect-data",
        help="show detected format, row counts, token lengths, truncation and one masked example",
        description="Load and tokenise the dataset as training would, without training.",
    )
    add_config_args(inspect)
    inspect.add_argument("--rows", type=int, default=1, help="how many examples to print (default 1)")

    export = sub.add_parser(
        "export",
        help="export a finished run (torch, gguf, tensorflow), each reloaded and checked",
        description="Export a finished run. GGUF and TensorFlow are converted from the merged torch export, "
        "which is made first when missing. Figures are printed and recorded in the run's run.json.",
    )
    export.add_argument("--run", required=True, metavar="DIR", help="the run directory (its output_dir)")
    export.add_argument(
        "--format",
        dest="formats",
        action="append",
        required=True,
        choices=[f.value for f in SaveFormat],
        help="format to export (repeatable)",
    )
    export.add_argument(
        "--gguf-type",
        action="append",
        choices=GgufType.values(),
        help="GGUF tensor type, repeatable: one conversion makes them all (default: the run's gguf_type)",
    )

    evaluate = sub.add_parser(
        "evaluate",
        help="re-evaluate a finished run: answer-token metrics plus task metrics on generated answers",
        description="Answer-token loss, perplexity, accuracy and F1 on the run's held-out rows, plus metrics on "
        "greedy-generated answers (QA/RAG: exact match, F1, multiple-choice accuracy; others: ROUGE-L, exact "
        "match; code: whether the Python parses). Writes eval_results.json|csv and predictions.jsonl.",
    )
    evaluate.add_argument("--run", required=True, metavar="DIR", help="the run directory (its output_dir)")
    evaluate.add_argument(
        "--generations", type=int, default=32, help="held-out rows to generate answers for (default 32)"
    )
    evaluate.add_argument("--max-new-tokens", type=int, default=128, help="generation length limit (default 128)")

    estimate = sub.add_parser(
        "estimate",
        help="estimate peak training memory, compare it with the free memory, suggest what makes it fit",
        description="Estimate the peak memory of training this config (weights, LoRA, gradients, optimizer state, "
        "activations, logits) from the model's shapes, without loading weights. Prints the breakdown, the "
        "device's free memory and the verdict (fits / tight / will not fit) with suggestions, then one JSON "
        "line with estimate_bytes, free_bytes and verdict.",
    )
    add_config_args(estimate)
    estimate.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="estimate for this device (default: auto)"
    )
    estimate.add_argument(
        "--free-gib",
        type=float,
        metavar="GIB",
        help="compare with this much free memory instead of this machine's (e.g. 24 for the GPU you plan to rent)",
    )

    compare = sub.add_parser(
        "compare",
        help="compare runs side by side: the options that differ, results, exports, the best run",
        description="Compare two or more runs (or every trial of a sweep folder): the config options that differ, "
        "a metrics table (final eval loss, perplexity, task metrics and their gain over the base model, train "
        "time, peak memory), the export figures, and the best run by --metric. Ends with one JSON line.",
    )
    compare.add_argument("runs", nargs="+", metavar="RUN", help="run directories, or a sweep's folder")
    compare.add_argument(
        "--metric",
        default="eval_loss",
        choices=SWEEP_METRICS,
        help="what picks the best run (default eval_loss; lower is better for a loss or perplexity)",
    )

    push = sub.add_parser(
        "push",
        help="push a finished run (merged model, LoRA adapter, GGUF files) to a Hugging Face Hub repo",
        description="Upload a finished run's exports to a Hub model repo, with a model card (README.md) at its "
        "root: the first part in the order merged, adapter, gguf goes at the repo's root, the others in folders "
        "named after them. The repo is created if missing, private unless --public (an existing repo keeps its "
        "visibility). The token is HF_TOKEN, else your saved `hf auth login`; the Hub's address is HF_ENDPOINT "
        "(default huggingface.co). Prints the repo, its url and the files uploaded as one JSON line.",
    )
    push.add_argument("--run", required=True, metavar="DIR", help="the run directory (its output_dir)")
    push.add_argument(
        "--repo",
        required=True,
        metavar="USER/NAME",
        help="the Hub repo id, owner/name (a bare name goes under the token's user)",
    )
    push.add_argument(
        "--what",
        metavar="PARTS",
        help="what to push, comma-separated: adapter, merged, gguf (default: all the run has; a part the run "
        "lacks is an error that says how to export it)",
    )
    push.add_argument(
        "--public",
        action="store_true",
        help="create a new repo public (default: private; an existing repo is left as it is)",
    )

    sub.add_parser("options", help="list every config option with its default and help")
    show = sub.add_parser("show-config", help="print the resolved config as YAML (token redacted)")
    add_config_args(show)
    return parser


def _resolve_config(args: argparse.Namespace, resume: bool = False) -> Config:
    """--config file, else the offline quickstart; --set on top. Resuming without --config reuses the run's config."""
    overrides = list(args.overrides) + (["resume=true"] if resume else [])
    if args.config:
        return load_config(args.config, overrides)
    config = load_config(None, overrides, defaults=quickstart_overrides())
    if (
        config.data.dataset_path == QUICKSTART_DATASET
        and config.data.fine_tuning_type is not FineTuningType.INSTRUCTION
    ):
        # The quickstart's templated rows are instructions: another type given with --set gets its own bundled sample.
        config = config.replace(dataset_path="sample")
    saved = Path(config.run.output_dir) / "config.yaml"
    if resume and config.run.output_dir and saved.is_file():
        # The continued run trains exactly as before unless --set says otherwise.
        return load_config(saved, overrides)
    if resume and config.run.output_dir and is_sweep(config.run.output_dir):
        return load_sweep_config(config.run.output_dir, overrides)
    return config


def _setup_console_logging(quiet: bool) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    # Tracebacks and the failure line go to train.log; the console gets the one 'error:' line from main().
    handler.addFilter(lambda record: not record.name.startswith("autotuning.trace") and record.levelno < logging.ERROR)
    logger = logging.getLogger("autotuning")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


@contextlib.contextmanager
def _ctrl_c_stops(stop_event: threading.Event, stopping: str) -> Iterator[None]:
    """While inside: the first Ctrl-C sets ``stop_event`` (the job ends at its next step, checkpoint saved) and
    prints ``stopping``; a second raises KeyboardInterrupt, which aborts without saving."""

    def on_sigint(signum, frame):
        if stop_event.is_set():
            raise KeyboardInterrupt
        stop_event.set()
        print(f"\n{stopping} (Ctrl-C again to abort without saving)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _cmd_train_launched(config: Config, quiet: bool) -> int:
    """distributed: ddp|fsdp: prepare the run, print the launch command, run it and wait."""
    plan = prepare_launch(config, extra_args=["--quiet"] if quiet else [])
    print(f"launch: {plan.command_line}", file=sys.stderr)
    stop_event, abort_event = threading.Event(), threading.Event()

    def on_sigint(signum, frame):
        if stop_event.is_set():
            abort_event.set()
            return
        stop_event.set()
        if not plan.writes_run:
            print(
                "\nending this machine's processes; the run fails on machine 0 (a stop from machine 0 saves a "
                "checkpoint for every machine)",
                file=sys.stderr,
            )
            return
        print(
            "\nstopping all processes at the next step and saving a checkpoint (Ctrl-C again to abort without saving)",
            file=sys.stderr,
        )

    previous = signal.signal(signal.SIGINT, on_sigint)
    if not plan.writes_run:
        t = config.training
        print(
            f"machine {t.machine_rank} of {t.num_machines}: training with machine 0 at {t.main_process_ip}; "
            "machine 0 writes the run, metrics, evaluation and exports to its output_dir",
            file=sys.stderr,
        )
    try:
        rc = launch(plan, config, stop_event, abort_event)
    finally:
        signal.signal(signal.SIGINT, previous)
    if not plan.writes_run:
        if rc == 0:
            return EXIT_OK
        print(f"error: this machine's processes ended with exit {rc}; machine 0's train.log says why", file=sys.stderr)
        return EXIT_BAD_INPUT if rc == EXIT_BAD_INPUT else EXIT_FAILED
    record = RunDir(plan.run_dir).read()
    status = record.get("status")
    if status == RunStatus.FINISHED and rc == 0:
        return EXIT_OK
    if status == RunStatus.STOPPED:
        return EXIT_STOPPED
    if abort_event.is_set():
        print("error: aborted without saving", file=sys.stderr)
        return EXIT_STOPPED
    if rc == EXIT_BAD_INPUT:
        return EXIT_BAD_INPUT  # a rank printed the error line already
    reason = f": {record['error']}" if record.get("error") else ""
    print(
        f"error: the launched run ended with status {status or 'unknown'} (exit {rc}){reason}; "
        f"see {plan.run_dir / 'train.log'}",
        file=sys.stderr,
    )
    return EXIT_FAILED


def _cmd_sweep(config: Config, args: argparse.Namespace) -> int:
    """A config with a sweep: each trial is trained as ``train`` would train it, one after another."""
    if not config.run.output_dir:
        config = config.replace(output_dir=str(Path("runs") / f"{default_run_name(config)}-sweep"))
    stop_event = threading.Event()

    def run_trial(trial_config: Config) -> RunStatus:
        if trial_config.training.distributed is not Distributed.NONE:
            _cmd_train_launched(trial_config, args.quiet)  # reports its own errors; run.json has the status
        else:
            try:
                run_job(trial_config, stop_event=stop_event, show_progress=not (args.quiet or args.no_progress))
            except UserError as err:  # this trial's input (e.g. its batch does not fit): the others may still run
                print(f"error: {err.message}", file=sys.stderr)
                return RunStatus.FAILED
        return RunStatus.parse(RunDir(trial_config.run.output_dir).read().get("status"))

    def on_trial(trial, number: int, total: int) -> None:
        shown = ", ".join(f"{k}={v}" for k, v in trial.params.items())
        print(f"sweep: {trial.name} ({number} of {total}): {shown}", file=sys.stderr)

    with _ctrl_c_stops(stop_event, "stopping this trial at the next step and saving a checkpoint, then the sweep"):
        record = run_sweep(config, run_trial, stopped=stop_event.is_set, on_trial=on_trial)
    root = config.run.output_dir
    if record["status"] == RunStatus.STOPPED:
        print(
            f"sweep stopped; continue with: python -m autotuning train --resume --set output_dir={root}",
            file=sys.stderr,
        )
        return EXIT_STOPPED
    trials = sweep_trial_dirs(root)
    if len(trials) >= 2:  # the sweep ends on its comparison
        for line in describe_comparison(compare_runs(trials, config.search.sweep_metric)):
            print(line, file=sys.stderr)
    summary = {"status": record["status"], "sweep_dir": str(root), "best": record.get("best")}
    summary["trials"] = {t["name"]: {"status": t["status"], "value": t.get("value")} for t in record["trials"]}
    print(json.dumps(summary, default=str))
    failed = [t for t in record["trials"] if t["status"] != RunStatus.FINISHED]
    return EXIT_FAILED if len(failed) == len(record["trials"]) else EXIT_OK


def _cmd_compare(args: argparse.Namespace) -> int:
    paths: list[Path] = []
    for raw in args.runs:
        paths += sweep_trial_dirs(raw) if is_sweep(raw) else [Path(raw)]
    comparison = compare_runs(paths, args.metric)
    for line in describe_comparison(comparison):
        print(line)
    print(json.dumps(comparison.to_dict(), default=str))
    return EXIT_OK


def _cmd_train(args: argparse.Namespace) -> int:
    config = _resolve_config(args, resume=args.resume)
    role = Role()
    launched = role.launched
    if config.search.sweep and not launched:
        return _cmd_sweep(config, args)
    if config.training.distributed is not Distributed.NONE and not launched:
        return _cmd_train_launched(config, args.quiet)
    stop_event = threading.Event()
    try:
        with _ctrl_c_stops(stop_event, "stopping at the next step and saving a checkpoint"):
            result = run_job(config, stop_event=stop_event, show_progress=not (args.quiet or args.no_progress))
    finally:
        if launched:
            leave_process_group()
    if not role.writes:
        return EXIT_OK  # rank 0 reports for the run
    if result.status == RunStatus.STOPPED:
        if launched:
            return EXIT_OK  # the launching parent reads run.json and reports the stop
        print(
            f"stopped at step {result.global_step}; continue with: python -m autotuning train --resume "
            f"--set output_dir={result.run_dir}",
            file=sys.stderr,
        )
        return EXIT_STOPPED
    summary = {"status": result.status, "run_dir": str(result.run_dir), "global_step": result.global_step}
    summary.update(
        {k: result.eval_results[k] for k in ("eval_loss", "perplexity", "accuracy", "f1") if k in result.eval_results}
    )
    if "torch" in result.exports:
        summary["merged"] = result.exports["torch"].get("path")
        summary["max_abs_logit_diff"] = result.exports["torch"].get("max_abs_logit_diff")
    summary.update(_exports_summary(result.exports))
    print(json.dumps(summary, default=str))
    return EXIT_OK


def _exports_summary(exports: dict) -> dict:
    """Each export's verdict and figures, and the ones that are not verified with why (the warning lines on
    stderr, logged by the exporter, say the same and how to export again)."""
    shown = {
        fmt: {k: v for k, v in figures.items() if not isinstance(v, list)}
        for fmt, figures in exports.items()
        if isinstance(figures, dict)
    }
    return {"exports": shown, "unverified": unverified_exports(exports)} if exports else {}


def _cmd_inspect(args: argparse.Namespace) -> int:
    config = _resolve_config(args)
    tokenizer = load_tokenizer(config)
    data = prepare_data(config, tokenizer)
    stats = data.stats
    print(f"source: {data.source}")
    print(f"format: {data.format} (fine-tuning type {config.data.fine_tuning_type.value})")
    print(
        f"rows: {stats['rows_read']} read, {stats['rows_skipped']} skipped, {len(data.train_rows)} train, {len(data.eval_rows)} eval"
    )
    for note in data.notes:
        print(f"note: {note}")
    fixes = stats.get("turn_fixes") or {}
    if fixes:
        changes = ", ".join(f"{rule.replace('_', ' ')} {n}" for rule, n in fixes.items() if rule != "rows")
        print(f"conversations repaired to alternate user/assistant: {fixes['rows']} ({changes})")
    for split in ("train", "eval"):
        s = stats[split]
        if not s:
            continue
        print(
            f"{split} tokens: min {s['min_tokens']}, median {s['median_tokens']}, p95 {s['p95_tokens']}, "
            f"max {s['max_tokens']}; max_seq_length {config.data.max_seq_length}: {s['truncated_rows']} rows "
            f"truncated, {s['answer_lost_rows']} dropped (answer lost); {s['answer_tokens']} trained answer tokens"
        )
    for row in data.train_rows[: max(0, args.rows)]:
        enc = encode_example(tokenizer, row, config.data.max_seq_length, config.data.trained_turns)
        prompt_ids = [t for t, m in zip(enc.input_ids, enc.completion_mask) if not m]
        answer_ids = [t for t, m in zip(enc.input_ids, enc.completion_mask) if m]
        print("\n--- example: prompt tokens (masked, no loss) ---")
        print(tokenizer.decode(prompt_ids))
        print("--- answer tokens (trained) ---")
        print(tokenizer.decode(answer_ids))
        print(f"--- {len(prompt_ids)} masked + {len(answer_ids)} trained tokens ---")
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    results = export_run(args.run, args.formats, args.gguf_type)
    done = _exports_summary({fmt: figures for fmt, figures in results.items() if fmt.split(":")[0] in args.formats})
    summary = {**done.get("exports", {}), "unverified": done.get("unverified", {})}
    print(json.dumps(summary, default=str))
    return EXIT_OK


def _cmd_push(args: argparse.Namespace) -> int:
    # The CLI is its owner's own process: HF_TOKEN, else the token `hf auth login` saved (get_token reads both).
    result = push_run(args.run, args.repo, get_token(), args.what, private=not args.public)
    print(json.dumps(result, default=str))
    return EXIT_OK


def _cmd_estimate(args: argparse.Namespace) -> int:
    config = _resolve_config(args)
    device = None if args.device == "auto" else args.device
    if device == "cuda" and args.free_gib is None:
        if not torch.cuda.is_available():
            raise UserError(
                "this machine has no CUDA GPU to read free memory from", "--device cuda", "add --free-gib N"
            )
    free = int(args.free_gib * 1024**3) if args.free_gib is not None else None
    estimate = estimate_memory(config, device=device, free_bytes=free)
    for line in describe(estimate):
        print(line)
    print(json.dumps({k: estimate.to_dict()[k] for k in ("estimate_bytes", "free_bytes", "verdict")}))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "options":
        print(_options_text().lstrip("\n"))
        return EXIT_OK
    # In a multi-process run, rank 0 speaks for all of them.
    quiet = getattr(args, "quiet", False) or not Role().writes
    handler = _setup_console_logging(quiet=quiet)
    try:
        if args.command == "show-config":
            print(_resolve_config(args).to_yaml(), end="")
            return EXIT_OK
        if args.command == "inspect-data":
            return _cmd_inspect(args)
        if args.command == "export":
            return _cmd_export(args)
        if args.command == "estimate":
            return _cmd_estimate(args)
        if args.command == "compare":
            return _cmd_compare(args)
        if args.command == "push":
            return _cmd_push(args)
        if args.command == "evaluate":
            report = evaluate_run(args.run, generations=args.generations, max_new_tokens=args.max_new_tokens)
            print(json.dumps(report["results"]))
            return EXIT_OK
        return _cmd_train(args)
    except UserError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("error: aborted without saving", file=sys.stderr)
        return EXIT_STOPPED
    except Exception as exc:  # a bug: one line here, the traceback in train.log
        logging.getLogger("autotuning").debug("unexpected error", exc_info=True)
        print(
            f"error: internal error ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}), "
            "see train.log in the run directory, please report it",
            file=sys.stderr,
        )
        if os.environ.get("AUTOTUNING_DEBUG"):
            raise
        return EXIT_FAILED
    finally:
        logging.getLogger("autotuning").removeHandler(handler)
