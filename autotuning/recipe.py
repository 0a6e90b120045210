"""The fine-tuning job as named steps: plan -> tokenizer -> data -> model -> train -> gather -> evaluate -> export -> record.

This is the recipe the CLI runs in the foreground and the pipeline runs as a job. :func:`run_job` reads
top to bottom in dependency order (the tokenizer before the data, whose prompts use its chat template;
the model before the trainer; the merged export before the generated-answer evaluation, which loads it).
Everything that can fail on bad input (config, output dir, model id, dataset) is checked *before* the run
directory is written, so a mistake never leaves a half-written run behind. The job holds the run's lock
(:class:`autotuning.runs.RunLock`) from the first check to the end: no other job resumes, exports or
replaces a run while it trains.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import resource
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import release_memory
from peft import PeftModel
from transformers import AutoModelForCausalLM

from .concurrency import MODEL_LOADING
from .config import Config, Distributed, PeftType, Precision, Quantization, SaveFormat
from .data import chat_token_ids, prepare_data, prepare_preference_data
from .distributed import STOP_FILE, Role, check_distributed
from .errors import ConfigError, UserError
from .evaluation import evaluate_answers, evaluate_run, preference_scores, save_eval_results
from .export import run_exports
from .export.gguf import check_gguf_supported, check_gguf_type
from .export.tensorflow import check_tensorflow_supported
from .modeling import (
    apply_peft,
    base_model_license,
    check_cpu_bf16,
    cpu_bf16_kind,
    hub_model_id,
    load_model,
    load_tokenizer,
)
from .report import write_report
from .runs import (
    MetricsSink,
    Operation,
    RunDir,
    RunLock,
    RunStatus,
    base_run_model,
    checkpoint_step,
    clear_run_dir,
    last_checkpoint,
    library_versions,
    resolve_run_dir,
    resume_checkpoint,
    truncate_metrics,
)
from .training import FinalCheckpointCallback, MetricsCallback, StopCallback, build_trainer
from .training.oom import TrainedState, train_with_oom_policy
from .training.preference import build_preference_trainer
from .training.speedups import check_speedups
from .training.trackers import check_trackers

__all__ = ["JobResult", "run_job", "preflight", "export_preflight", "evaluation_device"]

log = logging.getLogger("autotuning")
trace_log = logging.getLogger("autotuning.trace")  # file only: the console never shows tracebacks


@dataclass
class JobResult:
    status: str  # a RunStatus value: finished | stopped
    run_dir: Path
    global_step: int = 0
    eval_results: dict[str, Any] = field(default_factory=dict)
    exports: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def run_job(
    config: Config,
    *,
    stop_event: threading.Event | None = None,
    sink: MetricsSink | None = None,
    show_progress: bool = True,
) -> JobResult:
    """Run the whole job. Raises UserError for bad input (nothing written); returns a JobResult otherwise."""
    sink = sink if sink is not None else MetricsSink()
    with _RunLog() as run_log, _Job(config, stop_event or threading.Event(), sink, show_progress) as job:
        # 1. Everything that can reject the input, before any file is written.
        job.plan()
        job.setup_tokenizer()
        job.setup_data()
        job.setup_model()
        # 2. The run directory. From here on a failure is recorded in run.json instead of raised as bad input.
        job.open_run(run_log)
        try:
            trained = job.train()
            if job.stopped_early(trained):
                return job.record_stopped(trained)
            model = job.gather(trained)
            if model is None:  # a rank other than 0: its part ends with the save
                return JobResult(RunStatus.FINISHED.value, job.run.path, trained.trainer.state.global_step)
            # 3. Evaluation on the held-out rows (answer tokens only, shifted), on the model still in memory.
            job.evaluate(model, trained)
            # 4. Exports: the merged torch model first (GGUF and TensorFlow are converted from it).
            job.export(model)
            # 5. Generated answers, base vs fine-tuned, from merged/ (what users will ship).
            job.evaluate_generations(trained)
            return job.record_finished(trained)
        except BaseException as exc:
            replacement = job.record_failure(exc)
            if replacement is not None:
                raise replacement from None
            raise


def preflight(config: Config) -> None:
    """Refuse what cannot run before any work starts."""
    if config.training.distributed is not Distributed.NONE and not Role().launched:
        raise ConfigError(
            f"distributed: {config.training.distributed} needs several processes, which run_job does not start",
            "field 'distributed'",
            "start the run with 'python -m autotuning train' or the app (both launch it with accelerate), "
            "or set distributed: none",
        )
    check_distributed(config)
    check_trackers(config)  # a missing tracker package: its extra named now, not a traceback mid-run
    check_speedups(config)  # Liger's kernels on a machine without CUDA or without the package


def export_preflight(config: Config, hf_config) -> None:
    """Formats that cannot handle this architecture fail here, before training, not after hours of it."""
    formats = config.export.save_format
    model_type = hf_config.model_type
    if SaveFormat.GGUF in formats:
        check_gguf_supported(getattr(hf_config, "architectures", None))
        for gtype in config.export.gguf_type:
            check_gguf_type(gtype.value)
    if SaveFormat.TENSORFLOW in formats:
        check_tensorflow_supported(model_type)
        missing = [m for m in ("tensorflow", "keras_hub") if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(
                f"TensorFlow export needs {', '.join(missing)}",
                "field 'save_format'",
                "pip install -r requirements.txt",
            )


class _Job:
    """The state the steps of :func:`run_job` share, and the steps themselves, in the order they run."""

    def __init__(self, config: Config, stop_event: threading.Event, sink: MetricsSink, show_progress: bool):
        self.config = config
        self.stop_event = stop_event
        self.sink = sink
        self.show_progress = show_progress
        self.role = Role()
        self.started = time.time()
        self.timings: dict[str, float] = {}
        self.lock: RunLock | None = None
        self.resume_from: Path | None = None
        self.stopper: StopCallback | None = None
        self.results: dict[str, Any] = {}
        self.exports: dict[str, Any] = {}
        self.preference = config.preference.training_method.is_preference

    def __enter__(self) -> _Job:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.lock is not None:
            self.lock.release()

    # -- 1. before anything is written ------------------------------------------------

    def plan(self) -> None:
        preflight(self.config)
        if self.config.preference.base_run:
            # A chained run: the base run's merged model is this run's base (and, for dpo/kto, its reference).
            merged = base_run_model(self.config.preference.base_run)
            self.config = self.config.replace(model_name=str(merged.resolve()))
        self.run: RunDir = resolve_run_dir(self.config)
        if self.role.holds_lock:
            # An existing run (to resume or replace) is locked now, before it is read; a new one once created.
            self.lock = RunLock(self.run.path, Operation.TRAIN).acquire_if_present()

    def setup_tokenizer(self) -> None:
        self._t0 = time.time()
        self.tokenizer = load_tokenizer(self.config)  # the data step needs it: prompts use its chat template

    def setup_data(self) -> None:
        prepare = prepare_preference_data if self.preference else prepare_data
        data = self.data = prepare(self.config, self.tokenizer)
        for note in data.notes:
            log.warning(note)
        self.timings["data_s"] = round(time.time() - self._t0, 2)
        train = data.stats["train"]
        log.info(
            "data: %s (%s format), %d train / %d eval rows, median %s tokens, %d truncated, %d dropped (answer lost)",
            data.source,
            data.format,
            train["rows"] - train["answer_lost_rows"],
            len(data.eval) if data.eval is not None else 0,
            train["median_tokens"],
            train["truncated_rows"],
            train["answer_lost_rows"],
        )

    def setup_model(self) -> None:
        t0 = time.time()
        self.loaded = load_model(self.config)
        export_preflight(self.config, self.loaded.model.config)
        self.precision_check = _maybe_check_cpu_bf16(self.config, self.loaded, self.data, self.tokenizer)
        self.model = apply_peft(self.loaded.model, self.config)
        self.timings["model_s"] = round(time.time() - t0, 2)
        self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.total = sum(p.numel() for p in self.model.parameters())
        log.info(
            "model: %s, %d trainable of %d parameters, precision %s",
            self.config.model.model_name,
            self.trainable,
            self.total,
            self.loaded.precision,
        )

    # -- 2. the run directory ---------------------------------------------------------

    def open_run(self, run_log: _RunLog) -> None:
        run, config = self.run, self.config
        if config.training.resume:
            self.resume_from = resume_checkpoint(run.checkpoints)
        elif run.path.exists() and config.run.overwrite_output_dir and self.role.prepares_directory:
            clear_run_dir(run.path)
        if self.role.writes:
            run.path.mkdir(parents=True, exist_ok=True)
            if self.role.holds_lock and not self.lock.held:
                self.lock.acquire()
            run_log.attach(run.log_path)
            config.save_yaml(run.config_path)
            if self.resume_from is not None:
                truncate_metrics(run.metrics_path, checkpoint_step(self.resume_from))
            self.sink.attach(run.metrics_path)
            self._record_start()
        log.info("run directory: %s", run.path)

    def _record_start(self) -> None:
        previous = self.run.read()
        self.run.update(
            status=RunStatus.RUNNING.value,
            started_at=previous.get("started_at", self.started),
            resumed_from=str(self.resume_from) if self.resume_from else None,
            model_name=self.config.model.model_name,
            # The model card's base_model and license (report/card.py).
            base_model_id=hub_model_id(self.config.model.model_name),
            base_license=base_model_license(self.config.model.model_name, self.config.model.hf_token or None),
            fine_tuning_type=self.config.data.fine_tuning_type.value,
            training_method=self.config.preference.training_method.value,
            base_run=self.config.preference.base_run or None,
            device=_device_name(self.role),
            precision=self.loaded.precision,
            precision_check=self.precision_check,
            versions=library_versions(),
            dataset={"fingerprint": self.data.fingerprint, **self.data.stats, "notes": self.data.notes},
            parameters={"trainable": self.trainable, "total": self.total},
            error=None,
        )

    # -- 3. training ------------------------------------------------------------------

    def train(self) -> TrainedState:
        t0 = time.time()
        stop_file = self.run.path / STOP_FILE if self.role.launched else None
        self.stopper = StopCallback(self.stop_event, stop_file=stop_file)
        callbacks = [MetricsCallback(self.sink), self.stopper, FinalCheckpointCallback()]

        def make_trainer(attempt: Config, model):
            return (build_preference_trainer if self.preference else build_trainer)(
                attempt,
                model,
                self.tokenizer,
                self.data.train,
                self.data.eval,
                self.run.checkpoints,
                self.loaded.precision,
                callbacks=callbacks,
                show_progress=self.show_progress,
            )

        def reload_model(attempt: Config):
            # The failed attempt's weights go before the new ones load: never two models resident at once.
            self.model = self.loaded.model = None
            release_memory()
            self.loaded = load_model(attempt)
            return apply_peft(self.loaded.model, attempt)

        def on_retry(attempt: Config, retries: list[dict[str, Any]]) -> None:
            if self.role.writes:
                self.run.update(oom_retries=retries, effective_config=attempt.to_flat_dict())
                attempt.save_yaml(self.run.config_path)  # a resume continues with the settings that fit

        trained = train_with_oom_policy(
            self.config,
            self.model,
            build_trainer=make_trainer,
            reload_model=reload_model,
            checkpoints=self.run.checkpoints,
            resume_from=self.resume_from,
            sink=self.sink,
            may_retry=self.role.may_retry_out_of_memory,
            on_retry=on_retry,
        )
        self.model = trained.model
        self.timings["train_s"] = round(time.time() - t0, 2)
        if self.role.writes:
            self.run.update(train_peak_memory=_peak_memory())  # before evaluation/export add their own
        return trained

    def stopped_early(self, trained: TrainedState) -> bool:
        state = trained.trainer.state
        return self.stopper.stopped_at is not None and state.global_step < state.max_steps

    def record_stopped(self, trained: TrainedState) -> JobResult:
        step = trained.trainer.state.global_step
        checkpoint = last_checkpoint(self.run.checkpoints)
        if self.role.writes:
            self.run.update(
                status=RunStatus.STOPPED.value, global_step=step, checkpoint=str(checkpoint), timings=self.timings
            )
            log.info("stopped at step %d; checkpoint %s; resume with --resume", step, checkpoint)
            _write_report(self.run.path)
        return JobResult(RunStatus.STOPPED.value, self.run.path, step)

    def gather(self, trained: TrainedState):
        """The trained model, whole, on the process that evaluates and exports (None on the other ranks)."""
        trainer = trained.trainer
        if self.role.launched:
            # Every rank takes part in saving (FSDP gathers the full state dict); rank 0 then reloads the
            # result unsharded and carries on alone with evaluation and export.
            saved = self.run.path / ".trained"
            trainer.save_model(str(saved))
            if not self.role.writes:
                return None
            return _reload_trained(saved, self.loaded.path, self.config)
        # Accelerate patches forward() with autocast for mixed precision; unwrap so evaluation and the
        # export check see the model's own fp32 forward.
        return trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)

    # -- 4. evaluation and exports ----------------------------------------------------

    def evaluate(self, model, trained: TrainedState) -> None:
        if self.data.eval is None:
            return
        if self.preference:
            return self._evaluate_preferences(model, trained)
        t0 = time.time()
        step = trained.trainer.state.global_step
        batch = trained.config.training.per_device_eval_batch_size
        results = evaluate_answers(model, self.data.eval, self.tokenizer, batch, self.loaded.precision)
        results["global_step"] = step
        save_eval_results(results, self.run.path, self.config.evaluation.eval_save_format.value)
        self.timings["eval_s"] = round(time.time() - t0, 2)
        log.info(
            "eval: loss %.4f, perplexity %.2f, token accuracy %.4f, token F1 %.4f over %d answer tokens",
            results["eval_loss"],
            results["perplexity"],
            results["accuracy"],
            results["f1"],
            results["eval_tokens"],
        )
        self.sink.emit({"type": "final_eval", "step": step, "time": time.time(), **results})
        self.results = results

    def _evaluate_preferences(self, model, trained: TrainedState) -> None:
        """How the tuned model (still in memory) ranks the held-out answers; the base's ranking, and the reward
        with the base as reference, come with the generated answers (:meth:`evaluate_generations`)."""
        t0 = time.time()
        step = trained.trainer.state.global_step
        batch = trained.config.training.per_device_eval_batch_size
        scores = preference_scores(model, self.tokenizer, self.data.eval_rows, self.config.data.max_seq_length, batch)
        results = {k: v for k, v in scores.items() if k != "margins"}
        results["global_step"] = step
        save_eval_results(results, self.run.path, self.config.evaluation.eval_save_format.value)
        self.timings["eval_s"] = round(time.time() - t0, 2)
        log.info(
            "eval: log p(chosen) - log p(rejected) %.3f nats on average%s",
            results["preference_margin"],
            f", chosen ranked first in {results['preference_accuracy']:.0%} of {results['eval_pairs']} pairs"
            if "preference_accuracy" in results
            else "",
        )
        self.sink.emit({"type": "final_eval", "step": step, "time": time.time(), **results})
        self.results = results

    def export(self, model) -> None:
        """The training is done and saved by now: a failed check keeps that export unverified, and any other
        error in an export is recorded as that export's failure, never as a failed (or bad-input) run."""
        t0 = time.time()
        config = self.config
        if config.export.save_format:
            self.exports = run_exports(
                self.run,
                [SaveFormat.TORCH, *config.export.save_format],
                self.tokenizer,
                base_path=self.loaded.path,
                is_peft=config.peft.peft_type is not PeftType.NONE,
                gguf_type=[t.value for t in config.export.gguf_type],
                trained_model=model,
                after_training=True,
                token=config.model.hf_token or None,
            )
            self.run.update(exports=self.exports)
        if self.role.launched:
            _remove_tree(self.run.path / ".trained")
        self.timings["export_s"] = round(time.time() - t0, 2)

    def evaluate_generations(self, trained: TrainedState) -> None:
        gens = self.config.evaluation.eval_generations
        # A preference run is always scored against its base (the reward needs both), answers generated or not.
        wanted = gens > 0 or self.preference
        if self.data.eval is None or not wanted or not (self.run.merged / "config.json").is_file():
            return
        t0 = time.time()
        generated = evaluate_run(
            self.run.path,
            generations=gens,
            max_new_tokens=self.config.evaluation.eval_max_new_tokens,
            compare_base=True,
            rewrite_report=False,  # written by record_finished, once run.json says finished
            locked=True,  # this job holds the run's lock
            hf_token=self.config.model.hf_token,  # the run's token is not in its saved config
        )
        self.results = {**generated["results"], "global_step": trained.trainer.state.global_step}
        save_eval_results(self.results, self.run.path, self.config.evaluation.eval_save_format.value)
        self.timings["generation_eval_s"] = round(time.time() - t0, 2)
        shown = {
            k: round(v, 4)
            for k, v in self.results.items()
            if k.startswith(("gen_", "base_gen_")) and isinstance(v, float)
        }
        log.info("generated answers on %d held-out rows, base vs tuned: %s", min(gens, len(self.data.eval_rows)), shown)

    # -- 5. the record ----------------------------------------------------------------

    def record_finished(self, trained: TrainedState) -> JobResult:
        step = trained.trainer.state.global_step
        self.timings["total_s"] = round(time.time() - self.started, 2)
        self.run.update(
            status=RunStatus.FINISHED.value,
            finished_at=time.time(),
            checkpoint_selection=_checkpoint_selection(trained.trainer),
            global_step=step,
            eval_results=self.results,
            exports=self.exports,
            timings=self.timings,
        )
        _write_report(self.run.path)
        return JobResult(RunStatus.FINISHED.value, self.run.path, step, self.results, self.exports)

    def record_failure(self, exc: BaseException) -> UserError | None:
        """Record a failure after the run directory exists; returns the UserError to raise instead, if any."""
        if not self.role.writes:
            return None
        user_error = exc if isinstance(exc, UserError) else _storage_error(exc, self.run.path)
        message = user_error.message if user_error is not None else f"{type(exc).__name__}: {exc}"
        lost = _lost_peer(exc, self.role, self.run.path)
        message = lost or message
        if isinstance(exc, KeyboardInterrupt):
            message = "interrupted"
        log.error("run failed: %s", message)
        trace_log.error("traceback:\n%s", traceback.format_exc())
        self.run.update(status=RunStatus.FAILED.value, error=message, timings=self.timings)
        return user_error if user_error is not None and user_error is not exc else None


class _RunLog:
    """Buffers the job's log records until the run directory exists, then writes them all to train.log.

    Only records from the job's own thread are kept: an export, an evaluation or a chat started beside the
    run in the same process logs to the same loggers, and its lines do not belong in this run's train.log.
    """

    def __init__(self) -> None:
        self.records: list[logging.LogRecord] = []
        self.file_handler: logging.FileHandler | None = None
        self.buffer = _BufferHandler(self.records)
        self.formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.only_this_thread = _ThreadFilter(threading.get_ident())
        self.buffer.addFilter(self.only_this_thread)
        # transformers/trl warnings go to train.log too; their INFO chatter does not.
        self._loggers = [logging.getLogger("autotuning"), logging.getLogger("transformers"), logging.getLogger("trl")]

    def __enter__(self) -> _RunLog:
        for lg in self._loggers:
            lg.addHandler(self.buffer)
        if self._loggers[0].getEffectiveLevel() > logging.INFO:
            # Set once and left: restoring it on exit would change it under a job still running beside this one.
            self._loggers[0].setLevel(logging.INFO)
        return self

    def attach(self, path: Path) -> None:
        self.file_handler = logging.FileHandler(path, encoding="utf-8")
        self.file_handler.setFormatter(self.formatter)
        self.file_handler.addFilter(self.only_this_thread)
        for record in self.records:
            self.file_handler.emit(record)
        for lg in self._loggers:
            lg.addHandler(self.file_handler)
            lg.removeHandler(self.buffer)

    def __exit__(self, *exc: Any) -> None:
        for lg in self._loggers:
            lg.removeHandler(self.buffer)
            if self.file_handler is not None:
                lg.removeHandler(self.file_handler)
        if self.file_handler is not None:
            self.file_handler.close()


class _ThreadFilter(logging.Filter):
    def __init__(self, thread_id: int):
        super().__init__()
        self.thread_id = thread_id

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread == self.thread_id


class _BufferHandler(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]):
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _maybe_check_cpu_bf16(config: Config, loaded, data, tokenizer) -> dict[str, Any] | None:
    """precision: auto chose bf16 on a CPU: check this CPU's bf16 kernels on the run's rows; fall back to fp32 if off.

    An explicit ``precision: bf16`` is the user's choice and is not second-guessed.
    """
    if (
        torch.cuda.is_available()
        or loaded.precision != "bf16"
        or config.training.precision is not Precision.AUTO
        or config.quantization.quantization is not Quantization.NONE
    ):
        return None
    if "input_ids" in data.train.column_names:
        rows = [list(data.train[i]["input_ids"]) for i in range(min(2, len(data.train)))]
    else:  # preference rows: TRL tokenises them later; the check needs token ids now
        rows = [
            chat_token_ids(tokenizer, r["prompt"] + (r.get("chosen") or r["completion"])) for r in data.train_rows[:2]
        ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    check = check_cpu_bf16(loaded.model, rows, pad)
    if check["ok"]:
        log.info(
            "bf16 autocast on this CPU matches fp32 (max relative logit diff %.2g, top-1 agreement %.2f)",
            check["max_relative_logit_diff"],
            check["top1_agreement"],
        )
    else:
        loaded.precision = "fp32"
        log.warning(
            "bf16 autocast on this CPU does not match fp32 (max relative logit diff %.3g > %.2g or top-1 agreement "
            "%.2f < %.2f): training in fp32 instead; set precision: bf16 to force it",
            check["max_relative_logit_diff"],
            check["max_relative_bound"],
            check["top1_agreement"],
            check["min_top1"],
        )
    return {**check, "cpu_bf16": cpu_bf16_kind(), "precision": loaded.precision}


def _device_name(role: Role) -> str:
    name = "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    if role.launched:
        machines = int(os.environ.get("GROUP_WORLD_SIZE", "1"))  # torchrun: the number of machines (nodes)
        per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        processes = f"{per_machine} process{'es' if per_machine != 1 else ''}"
        name += f" x {processes}" if machines == 1 else f", {machines} machines x {processes}"
    return name


def _reload_trained(saved: Path, base_path: str, config: Config):
    """The trained model from what a multi-process run saved: fp32 base + adapter, or the full weights."""
    if config.peft.peft_type is PeftType.NONE:
        with MODEL_LOADING:  # transformers' load patches are process-wide (concurrency.py)
            model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    else:
        with MODEL_LOADING:  # transformers' load patches are process-wide (concurrency.py)
            base = AutoModelForCausalLM.from_pretrained(
                base_path, dtype=torch.float32, token=config.model.hf_token or None
            )
        model = PeftModel.from_pretrained(base, str(saved))
    device = evaluation_device(model)
    if device != "cpu":
        model.to(device)
    else:
        log.info("the trained model (fp32) does not fit this GPU's free memory: evaluating and exporting on the CPU")
    return model.eval()


# Room left on the GPU beside the fp32 weights, for activations and logits while evaluating.
_EVAL_GPU_HEADROOM = 1.25


def evaluation_device(model) -> str:
    """Where rank 0 evaluates and exports the reloaded fp32 model of a multi-process run: its GPU when the
    weights fit there with headroom, else the CPU. An FSDP run exists for models that do not fit one GPU, so
    their whole fp32 copy must not be forced onto rank 0's."""
    if not torch.cuda.is_available():
        return "cpu"
    index = int(os.environ.get("LOCAL_RANK", "0"))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    free, _total = torch.cuda.mem_get_info(index)
    return f"cuda:{index}" if weights * _EVAL_GPU_HEADROOM <= free else "cpu"


def _peak_memory() -> dict[str, Any]:
    """This process's peak so far: GPU bytes allocated by torch, or peak resident memory on CPU."""
    if torch.cuda.is_available():
        return {"bytes": int(torch.cuda.max_memory_allocated()), "what": "torch.cuda.max_memory_allocated"}
    return {"bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "what": "peak RSS (ru_maxrss)"}


def _write_report(run_dir: Path) -> None:
    """report.html/report.md; a failure here is logged, never turned into a failed run."""
    try:
        html_path, _md = write_report(run_dir)
        log.info("report: %s", html_path)
    except Exception as exc:  # the run's results are already saved; the report is a view of them
        log.warning("could not write the run report: %s: %s", type(exc).__name__, exc)
        trace_log.warning("report traceback:\n%s", traceback.format_exc())


_PEER_LOST_SIGNS = ("connection reset by peer", "connection closed by peer", "timed out", "broken pipe", "nccl")


def _lost_peer(exc: BaseException, role: Role, run_dir: Path) -> str | None:
    """A collective that failed because another process (often on another machine) died or stopped answering:
    the message for run.json, saying what to do. The process group's timeout is ddp_timeout."""
    if not role.launched or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    text = str(exc).lower()
    if not (
        isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and any(s in text for s in _PEER_LOST_SIGNS))
    ):
        return None
    first_line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return (
        f"lost contact with another process of this run ({first_line}). Check the other machines' logs; when every "
        f"machine is up again, run the same command with --resume on each (resume reads {run_dir / 'checkpoints'}, "
        "which every machine must see: a shared filesystem, or a copy at the same path)"
    )


def _storage_error(exc: BaseException, run_dir: Path) -> UserError | None:
    """A full disk or a write refused while saving is the user's to fix, not a bug: say so, keep what was saved."""
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


def _checkpoint_selection(trainer) -> dict[str, Any] | None:
    """Which checkpoint the run ended on when a best-checkpoint metric is set, and why."""
    if not trainer.args.metric_for_best_model:
        return None
    state, args = trainer.state, trainer.args
    best = state.best_model_checkpoint
    # The Trainer's names (eval_loss, eval_rewards/accuracies, eval_accuracy) as the metric events call them.
    metric = "eval_reward_accuracy" if args.metric_for_best_model.endswith("rewards/accuracies") else None
    metric = metric or args.metric_for_best_model
    selection = {
        "best_checkpoint": best,
        "metric": metric,
        "best_value": state.best_metric,
        "restored": bool(args.load_best_model_at_end and best),
        "early_stopped": state.global_step < state.max_steps,
        "why": (
            f"{'highest' if args.greater_is_better else 'lowest'} {metric.removeprefix('eval_').replace('_', ' ')}"
            f" {state.best_metric:.4f} at {Path(best).name}"
            if best and state.best_metric is not None
            else "no evaluation produced a checkpoint"
        ),
    }
    log.info("best checkpoint: %s", selection["why"])
    return selection


def _remove_tree(path: Path) -> None:
    if path.exists():
        clear_run_dir(path)
        path.rmdir()
