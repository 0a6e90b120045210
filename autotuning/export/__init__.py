"""Exports of a trained run. One module per format; each checks what it wrote (:mod:`.verify`) and keeps it
verified or, when the check fails, unverified with the reason."""

from __future__ import annotations

import errno
import logging
import threading
import traceback
from collections.abc import Callable
from typing import Any

from ..config import PeftType, SaveFormat
from ..errors import JobCancelled, UserError
from ..modeling import load_tokenizer, resolve_model_path
from ..report import write_report
from ..runs import Operation, RunDir, RunLock, load_run_config
from .gguf import export_gguf_types
from .tensorflow import export_tensorflow
from .torch import export_torch
from .verify import describe

__all__ = ["export_torch", "export_run", "run_exports", "unverified_exports", "ORDER"]

log = logging.getLogger("autotuning")
trace_log = logging.getLogger("autotuning.trace")  # file only

# GGUF and TensorFlow are converted from merged/, so torch comes first.
ORDER = ("torch", "gguf", "tensorflow")


def _retry_command(run_dir, fmt: str) -> str:
    if fmt.startswith("gguf:"):  # a further GGUF type (exports["gguf:<type>"])
        return f"python -m autotuning export --run {run_dir} --format gguf --gguf-type {fmt.split(':', 1)[1]}"
    return f"python -m autotuning export --run {run_dir} --format {fmt}"


def _announce(run_dir, fmt: str, figures: dict[str, Any]) -> None:
    """One log line per export: the figures when verified, a warning with the reason and the way out when not."""
    status = figures.get("status")
    if status == "verified":
        log.info("export %s: %s verified: %s", fmt, figures.get("path"), describe(figures))
    elif status == "unverified":
        log.warning(
            "export %s UNVERIFIED (kept in %s, see its UNVERIFIED note): %s; figures: %s; export again with: %s",
            fmt,
            figures.get("path"),
            figures.get("reason"),
            describe(figures),
            _retry_command(run_dir, fmt),
        )
    else:
        log.warning(
            "export %s %s: %s; the training is intact, export again with: %s",
            fmt,
            str(status).upper(),
            figures.get("reason"),
            _retry_command(run_dir, fmt),
        )


def _failure_message(exc: Exception) -> str:
    """A full disk or a refused write is the user's to fix: say so plainly. Anything else is shown as it is."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device while writing {exc.filename or 'the export'}; free some space"
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"writing {exc.filename or 'the export'} was refused ({exc.strerror}); make the run directory writable"
    return f"{type(exc).__name__}: {exc}"


def unverified_exports(exports: dict[str, Any]) -> dict[str, str]:
    """format -> reason, for every export that is not verified (unverified, failed or skipped)."""
    return {
        fmt: f"{figures.get('status', 'unknown')}: {figures.get('reason', '')}"
        for fmt, figures in exports.items()
        if isinstance(figures, dict) and figures.get("status", "verified") != "verified"
    }


def run_exports(
    run,
    formats,
    tokenizer,
    *,
    base_path: str,
    is_peft: bool,
    gguf_type: str | list[str],
    trained_model=None,
    after_training: bool = False,
    results: dict[str, Any] | None = None,
    progress: Callable[[float, str], None] | None = None,
    cancel: threading.Event | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """Export ``run`` in ``formats`` (torch first); returns format -> figures.

    A failed check never raises: the export comes back ``unverified``. ``after_training=True`` (the job)
    goes further: any exception in one export is recorded as ``status: failed`` with its message (the
    traceback goes to train.log) and the next formats still run, so a finished training is never lost to an
    export. Otherwise (``export --run``) the exception propagates after what was done is returned in
    ``results``, which the caller passes in to have it filled. ``progress(fraction, what)`` is called as each
    format starts; ``cancel`` is checked between formats (a format in progress runs to its end). ``token``
    reads a private Hub base model.
    """
    results = results if results is not None else {}
    wanted = [getattr(f, "value", f) for f in formats]
    todo = [fmt for fmt in ORDER if fmt in wanted]
    for i, fmt in enumerate(todo):
        if cancel is not None and cancel.is_set():
            raise JobCancelled(
                f"export cancelled before {fmt}", str(run.path), "what was exported before is kept and recorded"
            )
        if progress is not None:
            progress(i / len(todo), f"exporting {fmt} ({i + 1}/{len(todo)})")
        if fmt != "torch" and after_training and (results.get("torch") or {}).get("status") in ("failed", "skipped"):
            results[fmt] = {
                "status": "skipped",
                "verified": False,
                "reason": "the merged torch export it is converted from failed",
            }
            _announce(run.path, fmt, results[fmt])
            continue
        try:
            if fmt == "torch":
                figures = export_torch(run, tokenizer, base_path, is_peft, trained_model=trained_model, token=token)
            elif fmt == "gguf":
                # One conversion, every type from it: the first type's figures under "gguf", the others under
                # "gguf:<type>", each with its own verdict.
                types = [gguf_type] if isinstance(gguf_type, str) else list(gguf_type)
                per_type = export_gguf_types(run, tokenizer, types)
                for extra in types[1:]:
                    results[f"gguf:{extra}"] = per_type[extra]
                    _announce(run.path, f"gguf:{extra}", per_type[extra])
                figures = per_type[types[0]]
            else:
                figures = export_tensorflow(run, tokenizer)
        except Exception as exc:
            if not after_training:
                raise
            message = exc.message if isinstance(exc, UserError) else _failure_message(exc)
            trace_log.error("export %s traceback:\n%s", fmt, traceback.format_exc())
            figures = {"status": "failed", "verified": False, "reason": message}
        results[fmt] = figures
        _announce(run.path, fmt, figures)
    return results


def export_run(
    run_dir,
    formats=("torch",),
    gguf_type: str | list[str] | None = None,
    *,
    hf_token: str = "",
    progress: Callable[[float, str], None] | None = None,
    cancel: threading.Event | None = None,
) -> dict:
    """Export an existing run in the given formats; records the figures in its run.json.

    The merged torch export is (re)made first whenever it is missing or torch is asked for, since
    GGUF and TensorFlow are converted from it. A verified export replaces an unverified one. The export
    holds the run's lock: a run being trained is refused (RunBusyError), and a second export of the
    same run waits for the first to end, then makes its own files. ``hf_token`` reads a private base model
    again (a run's token is never saved with it).
    """
    run = RunDir(run_dir)
    config = load_run_config(run.path, hf_token)
    waiting = (lambda owner: progress(0.0, "waiting for another export of this run")) if progress else None
    with RunLock(run.path, Operation.EXPORT).acquire(wait=True, cancel=cancel, on_wait=waiting):
        results = dict(run.read().get("exports") or {})
        wanted = [SaveFormat(f) if not isinstance(f, SaveFormat) else f for f in formats]
        if SaveFormat.TORCH not in wanted and not (run.merged / "config.json").is_file():
            wanted.insert(0, SaveFormat.TORCH)
        tokenizer = load_tokenizer(config)
        try:
            run_exports(
                run,
                wanted,
                tokenizer,
                base_path=resolve_model_path(config.model.model_name),
                is_peft=config.peft.peft_type is not PeftType.NONE,
                gguf_type=gguf_type or [t.value for t in config.export.gguf_type],
                results=results,
                progress=progress,
                cancel=cancel,
                token=config.model.hf_token or None,
            )
        finally:
            run.update(exports=results)  # what was exported before an error is recorded too
        try:
            write_report(run.path)  # new files and checksums in the report
        except Exception as exc:  # the exports above are done and recorded; the report is only a view
            log.warning("could not rewrite the run report: %s", exc)
    if progress is not None:
        progress(1.0, "done")
    return results
