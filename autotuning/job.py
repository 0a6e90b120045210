"""The fine-tuning job, top to bottom: config -> tokenizer -> data -> model -> trainer -> eval -> export.

This is the recipe the CLI runs in the foreground and the pipeline facade runs in a thread. It
reads in dependency order; comments mark where the order matters. Everything that can fail on
bad input (config, output dir, model id, dataset) is checked *before* the run directory is
created, so a mistake never leaves a half-written run behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config, Distributed, PeftType, SaveFormat
from .errors import ConfigError, UserError

__all__ = ["JobResult", "run_job", "preflight", "export_preflight", "is_out_of_memory", "oom_fallback"]

log = logging.getLogger("autotuning")
trace_log = logging.getLogger("autotuning.trace")  # file only: the console never shows tracebacks


@dataclass
class JobResult:
    status: str  # finished | stopped | failed
    run_dir: Path
    global_step: int = 0
    eval_results: dict[str, Any] = field(default_factory=dict)
    exports: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def preflight(config: Config) -> None:
    """Refuse what cannot run before any work starts."""
    from .distributed import check_distributed, is_launched_worker

    if config.training.distributed is not Distributed.NONE and not is_launched_worker():
        raise ConfigError(
            f"distributed: {config.training.distributed} needs several processes, which run_job does not start",
            "field 'distributed'",
            "start the run with 'python -m autotuning train' or the app (both launch it with accelerate), "
            "or set distributed: none",
        )
    check_distributed(config)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM, or the CPU allocator giving up (which PyTorch raises as a plain RuntimeError)."""
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def oom_fallback(config: Config) -> tuple[Config, str] | None:
    """The next, cheaper way to run the same training after an out-of-memory error, or None if none is left.

    First halve the micro-batch and double gradient accumulation (same effective batch, same curve up to
    noise); at micro-batch 1, turn gradient checkpointing on (recompute activations, ~30% slower).
    """
    t = config.training
    if t.per_device_train_batch_size > 1:
        batch = t.per_device_train_batch_size // 2
        accumulation = t.gradient_accumulation_steps * t.per_device_train_batch_size // batch
        changed = config.replace(
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            per_device_eval_batch_size=max(1, t.per_device_eval_batch_size // 2),
        )
        return changed, (
            f"per_device_train_batch_size {t.per_device_train_batch_size} -> {batch}, gradient_accumulation_steps "
            f"{t.gradient_accumulation_steps} -> {accumulation} (effective batch unchanged), "
            f"per_device_eval_batch_size {t.per_device_eval_batch_size} -> {changed.training.per_device_eval_batch_size}"
        )
    if not t.gradient_checkpointing:
        return config.replace(gradient_checkpointing=True), "gradient_checkpointing false -> true"
    return None


def export_preflight(config: Config, model_type: str) -> None:
    """Formats that cannot handle this architecture fail here, before training, not after hours of it."""
    import importlib.util

    from .export.gguf import K_QUANT_FIX, check_gguf_supported
    from .export.tensorflow import check_tensorflow_supported

    formats = config.export.save_format
    if SaveFormat.GGUF in formats:
        check_gguf_supported(model_type)
        if (
            config.export.gguf_type.value in ("q4_k_m", "q5_k_m", "q6_k")
            and importlib.util.find_spec("llama_cpp") is None
        ):
            raise ConfigError(
                f"GGUF type {config.export.gguf_type.value} needs the optional llama-cpp-python package",
                "field 'gguf_type'",
                K_QUANT_FIX,
            )
    if SaveFormat.TENSORFLOW in formats:
        check_tensorflow_supported(model_type)
        missing = [m for m in ("tensorflow", "keras_hub") if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(
                f"TensorFlow export needs {', '.join(missing)}",
                "field 'save_format'",
                "pip install -r requirements.txt",
            )


class _RunLog:
    """Buffers log records until the run directory exists, then writes everything to train.log."""

    def __init__(self) -> None:
        self.records: list[logging.LogRecord] = []
        self.file_handler: logging.FileHandler | None = None
        self.buffer = _BufferHandler(self.records)
        self.formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        # transformers/trl warnings go to train.log too; their INFO chatter does not.
        self._loggers = [logging.getLogger("autotuning"), logging.getLogger("transformers"), logging.getLogger("trl")]
        self._levels = [lg.level for lg in self._loggers]

    def __enter__(self) -> _RunLog:
        for lg in self._loggers:
            lg.addHandler(self.buffer)
        self._loggers[0].setLevel(logging.INFO)
        return self

    def attach(self, path: Path) -> None:
        self.file_handler = logging.FileHandler(path, encoding="utf-8")
        self.file_handler.setFormatter(self.formatter)
        for record in self.records:
            self.file_handler.emit(record)
        for lg in self._loggers:
            lg.addHandler(self.file_handler)
            lg.removeHandler(self.buffer)

    def __exit__(self, *exc: Any) -> None:
        for lg, level in zip(self._loggers, self._levels):
            lg.removeHandler(self.buffer)
            if self.file_handler is not None:
                lg.removeHandler(self.file_handler)
            lg.setLevel(level)
        if self.file_handler is not None:
            self.file_handler.close()


class _BufferHandler(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]):
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def run_job(
    config: Config,
    *,
    stop_event: threading.Event | None = None,
    sink=None,
    show_progress: bool = True,
) -> JobResult:
    """Run the whole job. Raises UserError for bad input (nothing written); returns a JobResult otherwise."""
    # Heavy imports here, not at module import: `python -m autotuning --help` stays instant.

    from .data import prepare_data
    from .distributed import STOP_FILE, is_launched_worker, process_rank
    from .evaluation import evaluate_answers, save_eval_results
    from .export import export_torch
    from .modeling import apply_peft, load_model, load_tokenizer
    from .runs import library_versions, resolve_run_dir
    from .training import (
        FinalCheckpointCallback,
        MetricsCallback,
        MetricsSink,
        StopCallback,
        build_trainer,
        last_checkpoint,
        resume_checkpoint,
        truncate_metrics,
    )

    launched = is_launched_worker()  # one rank of a multi-process run started by distributed.launch
    main = process_rank() == 0  # only rank 0 writes run.json, metrics.jsonl, evaluates and exports
    stop_event = stop_event if stop_event is not None else threading.Event()
    sink = sink if sink is not None else MetricsSink()
    started = time.time()
    timings: dict[str, float] = {}

    with _RunLog() as run_log:
        # 1. Everything that can reject the input, before any file is written.
        preflight(config)
        run = resolve_run_dir(config)
        t0 = time.time()
        tokenizer = load_tokenizer(config)  # the data step needs it: prompts use its chat template
        data = prepare_data(config, tokenizer)
        for note in data.notes:
            log.warning(note)
        timings["data_s"] = round(time.time() - t0, 2)
        log.info(
            "data: %s (%s format), %d train / %d eval rows, median %s tokens, %d truncated, %d dropped (answer lost)",
            data.source,
            data.format,
            data.stats["train"]["rows"] - data.stats["train"]["answer_lost_rows"],
            len(data.eval) if data.eval is not None else 0,
            data.stats["train"]["median_tokens"],
            data.stats["train"]["truncated_rows"],
            data.stats["train"]["answer_lost_rows"],
        )
        t0 = time.time()
        loaded = load_model(config)
        export_preflight(config, loaded.model.config.model_type)
        model = apply_peft(loaded.model, config)
        timings["model_s"] = round(time.time() - t0, 2)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        log.info(
            "model: %s, %d trainable of %d parameters, precision %s",
            config.model.model_name,
            trainable,
            total,
            loaded.precision,
        )

        # 2. The run directory. From here on a failure is recorded in run.json instead of raised as bad input.
        resume_from = None
        if config.training.resume:
            resume_from = resume_checkpoint(run.checkpoints)
        elif run.path.exists() and config.run.overwrite_output_dir and not launched:
            shutil.rmtree(run.path)  # (a launched run's parent already did this, before writing the launch files)
        if main:
            run.path.mkdir(parents=True, exist_ok=True)
            run_log.attach(run.log_path)
            config.save_yaml(run.config_path)
            if resume_from is not None:
                truncate_metrics(run.metrics_path, int(resume_from.name.split("-")[1]))
            sink.attach(run.metrics_path)
            previous = run.read()
            run.update(
                status="running",
                started_at=previous.get("started_at", started),
                resumed_from=str(resume_from) if resume_from else None,
                model_name=config.model.model_name,
                fine_tuning_type=config.data.fine_tuning_type.value,
                device=_device_name(),
                precision=loaded.precision,
                versions=library_versions(),
                dataset={"fingerprint": data.fingerprint, **data.stats, "notes": data.notes},
                parameters={"trainable": trainable, "total": total},
                error=None,
            )
        log.info("run directory: %s", run.path)

        try:
            t0 = time.time()
            stopper = StopCallback(stop_event, stop_file=run.path / STOP_FILE if launched else None)
            callbacks = [MetricsCallback(sink), stopper, FinalCheckpointCallback()]
            attempt = config
            oom_retries: list[dict[str, Any]] = []
            while True:
                trainer = build_trainer(
                    attempt,
                    model,
                    tokenizer,
                    data.train,
                    data.eval,
                    run.checkpoints,
                    loaded.precision,
                    callbacks=callbacks,
                    show_progress=show_progress,
                )
                try:
                    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
                    break
                except Exception as exc:
                    # One rank cannot change the batch size alone: a multi-process run fails with the advice.
                    fallback = oom_fallback(attempt) if is_out_of_memory(exc) and not launched else None
                    if fallback is None:
                        if is_out_of_memory(exc):
                            raise ConfigError(
                                f"out of memory during training ({str(exc).splitlines()[0][:200]})",
                                "fields 'per_device_train_batch_size'/'max_seq_length'",
                                "run 'python -m autotuning estimate' and apply its suggestion (4-bit, shorter "
                                "sequences, a smaller model)",
                            ) from None
                        raise
                    attempt, change = fallback
                    failed_step = trainer.state.global_step
                    del trainer
                    _free_memory()
                    # Steps finished before the error changed the weights in place: continue from the last
                    # checkpoint (it restores weights and optimizer), or start over from freshly loaded weights.
                    resume_from = last_checkpoint(run.checkpoints)
                    restart_step = int(resume_from.name.split("-")[1]) if resume_from else 0
                    if resume_from is None:
                        del model
                        _free_memory()
                        loaded = load_model(attempt)
                        model = apply_peft(loaded.model, attempt)
                    sink.truncate(restart_step)
                    message = f"out of memory at step {failed_step}; retrying from step {restart_step} with {change}"
                    log.warning(message)
                    retry = {"step": failed_step, "restart_step": restart_step, "change": change}
                    oom_retries.append(retry)
                    sink.emit({"type": "notice", "kind": "oom_retry", "time": time.time(), "message": message, **retry})
                    if main:
                        run.update(oom_retries=oom_retries, effective_config=attempt.to_flat_dict())
                        attempt.save_yaml(run.config_path)  # a resume continues with the settings that fit
            step = trainer.state.global_step
            timings["train_s"] = round(time.time() - t0, 2)
            if main:
                run.update(train_peak_memory=_peak_memory())  # before evaluation/export add their own
            if stopper.stopped_at is not None and step < trainer.state.max_steps:
                checkpoint = last_checkpoint(run.checkpoints)
                if main:
                    run.update(status="stopped", global_step=step, checkpoint=str(checkpoint), timings=timings)
                    log.info("stopped at step %d; checkpoint %s; resume with --resume", step, checkpoint)
                    _write_report(run.path)
                return JobResult("stopped", run.path, step)

            if launched:
                # Every rank takes part in saving (FSDP gathers the full state dict); rank 0 then reloads the
                # result unsharded and carries on alone with evaluation and export.
                saved = run.path / ".trained"
                trainer.save_model(str(saved))
                if not main:
                    return JobResult("finished", run.path, step)
                trained = _reload_trained(saved, loaded.path, config)
            else:
                # Accelerate patches forward() with autocast for mixed precision; unwrap so evaluation and the
                # export check see the model's own fp32 forward.
                trained = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)

            # 3. Evaluation on the held-out rows (answer tokens only, shifted).
            results: dict[str, Any] = {}
            if data.eval is not None:
                t0 = time.time()
                results = evaluate_answers(
                    trained, data.eval, tokenizer, attempt.training.per_device_eval_batch_size, loaded.precision
                )
                results["global_step"] = step
                save_eval_results(results, run.path, config.evaluation.eval_save_format.value)
                timings["eval_s"] = round(time.time() - t0, 2)
                log.info(
                    "eval: loss %.4f, perplexity %.2f, token accuracy %.4f, token F1 %.4f over %d answer tokens",
                    results["eval_loss"],
                    results["perplexity"],
                    results["accuracy"],
                    results["f1"],
                    results["eval_tokens"],
                )
                sink.emit({"type": "final_eval", "step": step, "time": time.time(), **results})

            # 4. Exports. The merged torch model comes first: GGUF and TensorFlow are converted from it.
            t0 = time.time()
            exports: dict[str, Any] = {}
            if config.export.save_format:
                exports["torch"] = export_torch(
                    run,
                    tokenizer,
                    loaded.path,
                    is_peft=config.peft.peft_type is not PeftType.NONE,
                    trained_model=trained,
                )
                log.info("export torch: %s (max |logit diff| %.2e)", run.merged, exports["torch"]["max_abs_logit_diff"])
            if SaveFormat.GGUF in config.export.save_format:
                from .export.gguf import export_gguf

                exports["gguf"] = export_gguf(run, tokenizer, config.export.gguf_type.value)
                log.info(
                    "export gguf: %s (%s, max |logit diff| %.2e, greedy agreement %d/%d)",
                    exports["gguf"]["path"],
                    exports["gguf"]["type"],
                    exports["gguf"]["max_abs_logit_diff"],
                    exports["gguf"]["greedy_agreement_tokens"],
                    exports["gguf"]["greedy_tokens"],
                )
            if SaveFormat.TENSORFLOW in config.export.save_format:
                from .export.tensorflow import export_tensorflow

                exports["tensorflow"] = export_tensorflow(run)
                log.info(
                    "export tensorflow: %s (max |logit diff| %.2e)",
                    exports["tensorflow"]["path"],
                    exports["tensorflow"]["max_abs_logit_diff"],
                )
            if launched:
                shutil.rmtree(run.path / ".trained", ignore_errors=True)
            timings["export_s"] = round(time.time() - t0, 2)

            # 5. Generated answers, base vs fine-tuned, on held-out rows (from merged/: what users will ship).
            gens = config.evaluation.eval_generations
            if data.eval is not None and gens > 0 and (run.merged / "config.json").is_file():
                from .evaluation import evaluate_run

                t0 = time.time()
                generated = evaluate_run(
                    run.path,
                    generations=gens,
                    max_new_tokens=config.evaluation.eval_max_new_tokens,
                    compare_base=True,
                    tuned_answer_metrics={k: v for k, v in results.items() if k != "global_step"},
                    rewrite_report=False,  # written below, once run.json says finished
                )
                results = {**generated["results"], "global_step": step}
                save_eval_results(results, run.path, config.evaluation.eval_save_format.value)
                timings["generation_eval_s"] = round(time.time() - t0, 2)
                shown = {
                    k: round(v, 4)
                    for k, v in results.items()
                    if k.startswith(("gen_", "base_gen_")) and isinstance(v, float)
                }
                log.info(
                    "generated answers on %d held-out rows, base vs tuned: %s", min(gens, len(data.eval_rows)), shown
                )
            timings["total_s"] = round(time.time() - started, 2)
            best = trainer.state.best_model_checkpoint
            selection = None
            if trainer.args.metric_for_best_model:
                selection = {
                    "best_checkpoint": best,
                    "best_eval_loss": trainer.state.best_metric,
                    "restored": bool(trainer.args.load_best_model_at_end and best),
                    "early_stopped": step < trainer.state.max_steps,
                    "why": (
                        f"lowest eval loss {trainer.state.best_metric:.4f} at {Path(best).name}"
                        if best and trainer.state.best_metric is not None
                        else "no evaluation produced a checkpoint"
                    ),
                }
                log.info("best checkpoint: %s", selection["why"])
            run.update(
                status="finished",
                finished_at=time.time(),
                checkpoint_selection=selection,
                global_step=step,
                eval_results=results,
                exports=exports,
                timings=timings,
            )
            _write_report(run.path)
            return JobResult("finished", run.path, step, results, exports)
        except BaseException as exc:
            if not main:
                raise
            user_error = exc if isinstance(exc, UserError) else _storage_error(exc, run.path)
            message = user_error.message if user_error is not None else f"{type(exc).__name__}: {exc}"
            if isinstance(exc, KeyboardInterrupt):
                message = "interrupted"
            log.error("run failed: %s", message)
            trace_log.error("traceback:\n%s", traceback.format_exc())
            run.update(status="failed", error=message, timings=timings)
            if user_error is not None and user_error is not exc:
                raise user_error from None
            raise


def _device_name() -> str:
    import torch

    from .distributed import is_launched_worker

    name = "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    if is_launched_worker():
        name += f" x {os.environ.get('WORLD_SIZE', '1')} processes"
    return name


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _reload_trained(saved: Path, base_path: str, config: Config):
    """The trained model from what a multi-process run saved: fp32 base + adapter, or the full weights."""
    import torch
    from transformers import AutoModelForCausalLM

    if config.peft.peft_type is PeftType.NONE:
        model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(saved))
    if torch.cuda.is_available():
        model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return model.eval()


def _peak_memory() -> dict[str, Any]:
    """This process's peak so far: GPU bytes allocated by torch, or peak resident memory on CPU."""
    import resource

    import torch

    if torch.cuda.is_available():
        return {"bytes": int(torch.cuda.max_memory_allocated()), "what": "torch.cuda.max_memory_allocated"}
    return {"bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "what": "peak RSS (ru_maxrss)"}


def _write_report(run_dir: Path) -> None:
    """report.html/report.md; a failure here is logged, never turned into a failed run."""
    try:
        from .report import write_report

        html_path, _md = write_report(run_dir)
        log.info("report: %s", html_path)
    except Exception as exc:  # the run's results are already saved; the report is a view of them
        log.warning("could not write the run report: %s: %s", type(exc).__name__, exc)
        trace_log.warning("report traceback:\n%s", traceback.format_exc())


def _storage_error(exc: BaseException, run_dir: Path) -> UserError | None:
    """A full disk or a write refused while saving is the user's to fix, not a bug: say so, keep what was saved."""
    import errno

    if not isinstance(exc, OSError) or exc.errno is None:
        return None
    where = str(exc.filename or run_dir)
    resume = f"python -m autotuning train --resume --set output_dir={run_dir}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(
            "no space left on the device while saving",
            where,
            f"free some space, then continue with '{resume}' (the checkpoints already saved are intact)",
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(
            f"writing was refused ({exc.strerror})", where, f"make the run directory writable, then '{resume}'"
        )
    return None
