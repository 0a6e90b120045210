"""The facade a UI talks to: every operation on a run is a job started here.

``start(config) -> Run`` runs the training job (on the thread serving the executor, else a background
thread); ``export``, ``evaluate`` and ``load_model`` start a :class:`Task` in a thread of its own and
return at once. Both kinds are safe to poll from any thread: status, progress (fraction and what is
being done), the error message; a training :class:`Run` also has metric events and the log tail. UI
handlers only start jobs and read their state.

One training job at a time per process: a second ``start`` while one runs raises :class:`BusyError`
and leaves the running job alone. A config with a ``sweep`` starts a :class:`Sweep`, which trains its
trials one after another, each a :class:`Run` that ``current`` follows (``job`` is what Stop stops). Tasks run beside a training job: an export or evaluation of another
run goes ahead at once; one of the run being trained is refused by the run's lock
(:class:`autotuning.runs.RunLock`), and two exports of one run queue behind each other on it.

Example::

    pipeline = Pipeline(output_root="runs")
    run = pipeline.start(config)
    events = run.events(0)        # poll with the count already drawn
    run.stop()                    # ends at the next step, saves a checkpoint, status "stopped"
    task = pipeline.export(run.run_dir, ["gguf"])
    task.progress()               # {"status": "running", "fraction": 0.5, "what": "exporting gguf (2/2)", ...}
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import Config, Distributed
from .errors import ConfigError, JobCancelled, UserError
from .evaluation import evaluate_run
from .export import export_run
from .inference import ModelCache
from .launcher import launch, prepare_launch
from .publish import push_run
from .recipe import JobResult, run_job
from .runs import (
    ACTIVE,
    MetricsSink,
    Operation,
    RunDir,
    RunLock,
    RunStatus,
    SweepDir,
    default_run_name,
    prepare_sweep,
    read_metrics,
    run_sweep,
)

__all__ = ["RunStatus", "Run", "Sweep", "Task", "Pipeline", "BusyError", "MainThreadExecutor"]


class BusyError(UserError):
    """A job is already running in this process."""


class _ThreadLogHandler(logging.Handler):
    """Collects log lines emitted by one thread (the job's) into a bounded deque."""

    def __init__(self, thread_id: int, lines: deque):
        super().__init__(level=logging.INFO)
        self.thread_id = thread_id
        self.lines = lines
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread_id or record.name.startswith("autotuning.trace"):
            return
        self.lines.append(self.format(record))


class _Job:
    """What Run, Sweep and Task share: a status any thread may read (kept under a lock), a request to stop that
    the job honours at its next safe point, and a wait for the thread doing the work."""

    def __init__(self) -> None:
        self.id = uuid.uuid4().hex[:8]
        self.error: str = ""
        self._status = RunStatus.QUEUED
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def status(self) -> RunStatus:
        with self._lock:
            return self._status

    def _set_status(self, status: RunStatus) -> None:
        with self._lock:
            self._status = status

    def _begin(self) -> None:
        """queued -> running; a job stopped before its thread began stays 'stopping'."""
        with self._lock:
            if self._status is RunStatus.QUEUED:
                self._status = RunStatus.RUNNING

    def is_active(self) -> bool:
        return self.status in ACTIVE

    def _request_stop(self, event: threading.Event) -> None:
        """Set the event the job's thread checks, and show 'stopping' until it has ended."""
        event.set()
        with self._lock:
            if self._status in (RunStatus.QUEUED, RunStatus.RUNNING):
                self._status = RunStatus.STOPPING

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the job's thread; True once it has ended (or never started)."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()


class Run(_Job):
    """One job: its config, status, metric events, log tail and error."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.run_dir = Path(config.run.output_dir)
        self.sink = MetricsSink()
        self.stop_event = threading.Event()
        self.log_lines: deque[str] = deque(maxlen=400)
        self.result: Any = None
        self.created_at = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self._done: threading.Event | None = None  # set when the job ran through an executor

    # -- state ----------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the job to end at the next step boundary; it saves a checkpoint and ends as 'stopped'."""
        self._request_stop(self.stop_event)

    def wait(self, timeout: float | None = None) -> bool:
        if self._done is not None:
            return self._done.wait(timeout)
        return super().wait(timeout)

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        """Metric events from index ``since`` on (the history survives page reloads: it lives here)."""
        return self.sink.events(since)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(list(self.log_lines)[-lines:])

    def progress(self, events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Step, max steps, elapsed and ETA from the latest training event (pass ``events`` if already fetched)."""
        events = self.sink.events(0) if events is None else events
        last = next((e for e in reversed(events) if e.get("type") in ("train", "eval")), {})
        elapsed = (self.finished_at or time.time()) - self.started_at if self.started_at else 0.0
        step = last.get("step", 0)
        if self.result is not None:  # after a stop the checkpoint step may be past the last logged one
            step = max(step, self.result.global_step)
        return {
            "status": self.status.value,
            "step": step,
            "max_steps": last.get("max_steps", 0),
            "elapsed_s": round(elapsed, 1),
            "eta_s": last.get("eta_s") if self.is_active() else 0.0,
            "error": self.error,
            "run_dir": str(self.run_dir),
        }

    # -- the thread -----------------------------------------------------------------

    def _target(self) -> None:
        if self.config.training.distributed is not Distributed.NONE:
            return self._target_launched()
        handler = _ThreadLogHandler(threading.get_ident(), self.log_lines)
        loggers = [logging.getLogger(n) for n in ("autotuning", "transformers", "trl")]
        for lg in loggers:
            lg.addHandler(handler)
        self.started_at = time.time()
        self._begin()
        try:
            self.result = run_job(self.config, stop_event=self.stop_event, sink=self.sink, show_progress=False)
            self._set_status(RunStatus(self.result.status))
        except UserError as err:
            self.error = err.message
            self.log_lines.append(f"error: {err.message}")
            self._set_status(RunStatus.FAILED)
        except KeyboardInterrupt:  # Ctrl-C reaches a job only on the main thread: the app is closing
            self.error = "interrupted (Ctrl-C)"
            self.log_lines.append(f"error: {self.error}")
            self._set_status(RunStatus.FAILED)
            raise
        except BaseException as exc:  # a bug: the message here, the traceback in train.log
            self.error = (
                f"internal error ({type(exc).__name__}: {exc}); the traceback is in {self.run_dir / 'train.log'}"
            )
            self.log_lines.append(f"error: {self.error}")
            self._set_status(RunStatus.FAILED)
        finally:
            self.finished_at = time.time()
            for lg in loggers:
                lg.removeHandler(handler)

    def _target_launched(self) -> None:
        """distributed: ddp|fsdp: the job runs in processes started by ``accelerate launch``; follow it from here.

        Metrics come from the ``metrics.jsonl`` rank 0 writes (tailed into this run's sink, so the charts
        work as for a single-process run); the processes' output becomes the log tail.
        """
        self.started_at = time.time()
        self._begin()
        tail = None
        try:
            plan = prepare_launch(self.config, extra_args=["--no-progress"])
            self.log_lines.append(f"launch: {plan.command_line}")
            tail = _MetricsTail(plan.run_dir / "metrics.jsonl", self.sink)
            tail.start()
            rc = launch(plan, self.config, self.stop_event, on_output=self.log_lines.append)
            tail.stop()
            record = RunDir(plan.run_dir).read()
            status = record.get("status")
            if status in (RunStatus.FINISHED, RunStatus.STOPPED) and rc == 0:
                self.result = JobResult(
                    status,
                    plan.run_dir,
                    record.get("global_step") or 0,
                    record.get("eval_results") or {},
                    record.get("exports") or {},
                )
                self._set_status(RunStatus(status))
            else:
                self.error = record.get("error") or (
                    f"the launched processes exited with status {rc}; see {plan.run_dir / 'train.log'}"
                )
                self.log_lines.append(f"error: {self.error}")
                self._set_status(RunStatus.FAILED)
        except UserError as err:
            self.error = err.message
            self.log_lines.append(f"error: {err.message}")
            self._set_status(RunStatus.FAILED)
        except BaseException as exc:  # a bug in the parent
            self.error = f"internal error ({type(exc).__name__}: {exc})"
            self.log_lines.append(f"error: {self.error}")
            self._set_status(RunStatus.FAILED)
        finally:
            if tail is not None:
                tail.stop()
            self.finished_at = time.time()

    def _start(self, executor: MainThreadExecutor | None = None) -> None:
        if executor is not None:
            self._done = executor.submit(self._target)
            return
        self._thread = threading.Thread(target=self._target, name=f"autotuning-run-{self.id}", daemon=True)
        self._thread.start()


class Sweep(_Job):
    """A sweep job: its trials trained one after another, each a :class:`Run` the pipeline follows as current.

    ``stop()`` stops the trial being trained (it saves a checkpoint) and with it the sweep; resuming the sweep
    (its config with ``resume``) continues that trial and then the ones not run yet.
    """

    def __init__(self, pipeline: Pipeline, config: Config, total: int):
        super().__init__()
        self.config = config
        self.run_dir = Path(config.run.output_dir)
        self.total = total
        self.stop_event = threading.Event()
        self.record: dict[str, Any] = {}
        self.trial: Run | None = None  # the trial being (or last) trained
        self.number = 0  # its place in the sweep, from 1
        self._pipeline = pipeline
        self._thread = threading.Thread(target=self._target, name=f"autotuning-sweep-{self.id}", daemon=True)

    def stop(self) -> None:
        """End the current trial at its next step (checkpoint saved) and the sweep after it."""
        self._request_stop(self.stop_event)
        with self._lock:
            trial = self.trial  # read after the event is set: a trial begun later sees the event itself
        if trial is not None:
            trial.stop()

    def progress(self) -> dict[str, Any]:
        """Which trial of how many, its folder, and the best so far (from sweep.json's record)."""
        with self._lock:
            trial, number, status = self.trial, self.number, self._status
        return {
            "status": status.value,
            "sweep_dir": str(self.run_dir),
            "trial": number,
            "trials": self.total,
            "trial_dir": str(trial.run_dir) if trial is not None else "",
            "best": SweepDir(self.run_dir).read().get("best"),
            "error": self.error,
        }

    def _run_trial(self, config: Config) -> RunStatus:
        run = Run(config)
        with self._lock:
            self.trial = run
        if self.stop_event.is_set():  # Stop pressed while the previous trial was closing
            run.stop()
        self._pipeline._follow(run)
        run._start(self._pipeline.executor)
        run.wait()
        return run.status

    def _on_trial(self, trial, number: int, total: int) -> None:
        with self._lock:
            self.number = number

    def _target(self) -> None:
        self._begin()
        try:
            record = run_sweep(
                self.config,
                self._run_trial,
                stopped=self.stop_event.is_set,
                on_trial=self._on_trial,
            )
            self.record = record
            status = RunStatus(record["status"])
        except UserError as err:
            self.error = err.message
            status = RunStatus.FAILED
        except BaseException as exc:  # a bug: say so on the Train tab rather than die silently in the thread
            self.error = f"internal error ({type(exc).__name__}: {exc})"
            status = RunStatus.FAILED
        self._set_status(status)


class Task(_Job):
    """A job on a run that is not training: an export, an evaluation, loading a model for chat.

    ``fn(progress, cancel)`` does the work in a thread of its own; it reports ``progress(fraction, what)``
    and checks ``cancel`` (a ``threading.Event``) where stopping early is safe. The functions it runs take
    the run's lock themselves (``export_run``, ``evaluate_run``; chat loads through :meth:`Pipeline.load_model`).
    """

    def __init__(self, kind: Operation, run_dir: str | Path | None, fn: Callable[..., Any]):
        super().__init__()
        self.kind = Operation(kind)
        self.run_dir = Path(run_dir) if run_dir else None
        self.cancel_event = threading.Event()
        self.result: Any = None
        self.created_at = time.time()
        self.finished_at: float | None = None
        self._fn = fn
        self._fraction = 0.0
        self._what = "queued"
        self._thread = threading.Thread(target=self._target, name=f"autotuning-{self.kind}-{self.id}", daemon=True)

    def cancel(self) -> None:
        """Ask the task to end at its next safe point (between exported formats, between generated answers)."""
        self._request_stop(self.cancel_event)

    def progress(self) -> dict[str, Any]:
        with self._lock:
            return {
                "id": self.id,
                "kind": self.kind.value,
                "status": self._status.value,
                "fraction": self._fraction,
                "what": self._what,
                "error": self.error,
                "run_dir": str(self.run_dir or ""),
            }

    def _report(self, fraction: float, what: str) -> None:
        with self._lock:
            self._fraction = max(0.0, min(1.0, float(fraction)))
            self._what = what

    def _target(self) -> None:
        self._set_status(RunStatus.RUNNING)  # even after a cancel while queued: fn sees the event and ends
        try:
            self.result = self._fn(self._report, self.cancel_event)
            ended = RunStatus.FINISHED
        except JobCancelled as err:
            self.error, ended = err.message, RunStatus.STOPPED
        except UserError as err:
            self.error, ended = err.message, RunStatus.FAILED
        except BaseException as exc:  # a bug: said plainly, with the traceback in the app's log
            logging.getLogger("autotuning.trace").exception("%s task failed", self.kind)
            self.error, ended = f"internal error ({type(exc).__name__}: {exc})", RunStatus.FAILED
        with self._lock:
            self._status = ended
            if ended is RunStatus.FINISHED:
                self._fraction, self._what = 1.0, "done"
        self.finished_at = time.time()


class _MetricsTail:
    """Follows a metrics.jsonl another process appends to, feeding complete lines into a sink."""

    def __init__(self, path: Path, sink: MetricsSink, interval_s: float = 0.25):
        self.path = path
        self.sink = sink
        self.interval_s = interval_s
        self._offset = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="autotuning-metrics-tail", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Read what is left and stop following (idempotent)."""
        self._done.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        self._read()

    def _loop(self) -> None:
        while not self._done.wait(self.interval_s):
            self._read()

    def _read(self) -> None:
        with self._lock:
            try:
                with self.path.open("rb") as fh:
                    fh.seek(self._offset)
                    chunk = fh.read()
            except OSError:
                return
            end = chunk.rfind(b"\n")
            if end < 0:
                return  # no complete line yet
            self._offset += end + 1
            for line in chunk[: end + 1].decode("utf-8", errors="replace").splitlines():
                try:
                    self.sink.emit(json.loads(line))
                except json.JSONDecodeError:
                    continue


class MainThreadExecutor:
    """Runs jobs on the thread that calls :meth:`serve`: the app gives its main thread to training.

    On a CPU a training step is slower in any other thread of the process (about 10% on the 30M
    benchmark, bench/ui_overhead.py): glibc gives each new thread its own malloc arena, whose heaps are
    capped at 64 MB and trimmed eagerly, so the step's large tensors are mapped and faulted in again and
    again (86k vs 50k page faults per step measured, with twice the system time). The main thread
    allocates from the main heap and keeps its pages.
    """

    def __init__(self):
        self._jobs: queue.Queue = queue.Queue()

    def submit(self, fn: Callable[[], None]) -> threading.Event:
        done = threading.Event()
        self._jobs.put((fn, done))
        return done

    def serve(self, keep_going: Callable[[], bool] = lambda: True, poll_s: float = 0.2) -> None:
        """Run submitted jobs one after another until ``keep_going()`` turns false (checked between jobs)."""
        while keep_going():
            try:
                fn, done = self._jobs.get(timeout=poll_s)
            except queue.Empty:
                continue
            try:
                fn()
            finally:
                done.set()


class Pipeline:
    """Owns the one running job of this process and knows where runs live.

    Jobs run in a background thread, or on the thread serving ``executor`` when one is set (the app's
    main thread: see :class:`MainThreadExecutor`).
    """

    def __init__(self, output_root: str | Path = "runs", executor: MainThreadExecutor | None = None):
        self.output_root = Path(output_root)
        self.executor = executor
        self._lock = threading.Lock()
        self._current: Run | None = None
        self._sweep: Sweep | None = None  # the latest sweep started here
        self._tasks: OrderedDict[str, Task] = OrderedDict()

    @property
    def current(self) -> Run | None:
        with self._lock:
            return self._current

    @property
    def sweep(self) -> Sweep | None:
        """The latest sweep started here (running or ended), or None."""
        with self._lock:
            return self._sweep

    @property
    def job(self) -> Run | Sweep | None:
        """What a Stop button stops: the running sweep (between trials too), else the current run."""
        with self._lock:
            if self._sweep is not None and self._sweep.is_active():
                return self._sweep
            return self._current

    def _follow(self, run: Run) -> None:
        with self._lock:
            self._current = run

    def _refuse_if_busy(self) -> None:
        for job in (self._sweep, self._current):
            if job is not None and job.is_active():
                raise BusyError(
                    f"a training job is already running ({job.run_dir.name}, {job.status.value})",
                    "Train tab",
                    "wait for it to finish or press Stop first; it was not disturbed",
                )

    def start(self, config: Config) -> Run | Sweep:
        """Launch the job in a background thread and return at once (a config with a sweep starts a :class:`Sweep`)."""
        if config.training.machine_rank > 0:
            raise ConfigError(
                f"machine_rank {config.training.machine_rank} joins a run that machine 0 writes; there is nothing to "
                "follow here",
                "field 'machine_rank'",
                "start machine 0's run here (or on the CLI) and run the other machines with "
                "'python -m autotuning train --config run.yaml --set machine_rank=N'",
            )
        if config.search.sweep:
            return self._start_sweep(config)
        with self._lock:
            self._refuse_if_busy()
            if not config.run.output_dir:
                config = config.replace(output_dir=str(self.output_root / default_run_name(config)))
            run = Run(config)
            self._current = run
            run._start(self.executor)
            return run

    def _start_sweep(self, config: Config) -> Sweep:
        if not config.run.output_dir:
            config = config.replace(output_dir=str(self.output_root / f"{default_run_name(config)}-sweep"))
        with self._lock:
            self._refuse_if_busy()
            trials = prepare_sweep(config)  # a bad option or folder is this call's error, not the thread's
            sweep = Sweep(self, config, len(trials))
            self._sweep = sweep
            sweep._thread.start()
            return sweep

    def history(self, run_dir: str | Path) -> list[dict[str, Any]]:
        """Metric events of any run: the live one from memory, others from their metrics.jsonl."""
        current = self.current
        if current is not None and Path(run_dir).resolve() == current.run_dir.resolve():
            return current.events(0)
        return read_metrics(Path(run_dir) / "metrics.jsonl")

    def is_live(self, run_dir: str | Path) -> bool:
        current = self.current
        return current is not None and current.is_active() and Path(run_dir).resolve() == current.run_dir.resolve()

    # -- tasks: every other operation on a run -------------------------------------------

    def submit(self, kind: Operation, run_dir: str | Path | None, fn: Callable[..., Any]) -> Task:
        """Start ``fn(progress, cancel)`` as a task and return at once (see :class:`Task`)."""
        task = Task(kind, run_dir, fn)
        with self._lock:
            self._tasks[task.id] = task
            finished = [k for k, t in self._tasks.items() if not t.is_active()]
            for key in finished[: max(0, len(self._tasks) - 32)]:  # keep the last few ended ones for pollers
                del self._tasks[key]
        task._thread.start()
        return task

    def task(self, task_id: str) -> Task | None:
        with self._lock:
            return self._tasks.get(task_id)

    def export(self, run_dir: str | Path, formats, gguf_type=None, hf_token: str = "") -> Task:
        """Export a finished run as a task (waits behind another export of it; refused while it trains)."""
        return self.submit(
            Operation.EXPORT,
            run_dir,
            lambda progress, cancel: export_run(
                run_dir, formats, gguf_type, hf_token=hf_token, progress=progress, cancel=cancel
            ),
        )

    def evaluate(self, run_dir: str | Path, **options: Any) -> Task:
        """``evaluation.evaluate_run`` as a task (base vs fine-tuned, generated answers)."""
        return self.submit(
            Operation.EVALUATE,
            run_dir,
            lambda progress, cancel: evaluate_run(run_dir, progress=progress, cancel=cancel, **options),
        )

    def push(self, run_dir: str | Path, repo_id: str, what, *, hf_token: str, private: bool = True) -> Task:
        """``publish.push_run`` as a task: a finished run's parts to a Hub repo with the caller's own token."""
        return self.submit(
            Operation.PUSH,
            run_dir,
            lambda progress, cancel: push_run(
                run_dir, repo_id, hf_token, what, private=private, progress=progress, cancel=cancel
            ),
        )

    def load_model(self, models: ModelCache, source: str, like: Config | None = None) -> Task:
        """Load a model for chat into ``models`` as a task: a run's merged/ under the run's lock, or a base model."""

        def load(progress, cancel):
            progress(0.0, f"loading {Path(source).name if Path(source).exists() else source}")
            if (Path(source) / "config.yaml").is_file():  # a run: hold its lock while its files are read
                waiting = lambda owner: progress(0.0, "waiting for the run's export to finish")  # noqa: E731
                with RunLock(source, Operation.CHAT).acquire(wait=True, cancel=cancel, on_wait=waiting):
                    return models.get(source, like=like)
            return models.get(source, like=like)

        return self.submit(Operation.CHAT, source if Path(source).exists() else None, load)
