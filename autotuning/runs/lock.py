"""One lock per run directory, held by the job that works on it: train, resume, export, evaluate, chat load, push.

It is an ``flock`` on ``<run>/.lock``: the kernel drops it when the holder's process exits, however it exits,
so a crashed owner's lock is free for the next job (taken over), and a live owner's is respected. ``flock``
locks belong to an open file, not to a process, so two jobs of one app (two threads) exclude each other too.
The holder writes who it is (pid, host, operation, since) into the file, for the message others get.

A training job never waits: a run another job is training is refused (:class:`RunBusyError`, exit 2 in the
CLI). Export, evaluation, chat loads and pushes wait for each other (the second export of a run starts when the
first ends) but never for training.
"""

from __future__ import annotations

import enum
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import RunBusyError

__all__ = ["Operation", "RunLock", "lock_owner", "is_locked", "LOCK_FILE"]

LOCK_FILE = ".lock"


class Operation(str, enum.Enum):
    TRAIN = "train"
    EXPORT = "export"
    EVALUATE = "evaluate"
    CHAT = "chat"
    PUSH = "push"  # to the Hub (publish.py): reads the exports, so it waits for an export to end

    def __str__(self) -> str:
        return self.value


_DOING = {Operation.TRAIN: "trained", Operation.EXPORT: "exported", Operation.EVALUATE: "evaluated"}
_DOING[Operation.CHAT] = "loaded for chat"
_DOING[Operation.PUSH] = "pushed to the Hub"


class RunLock:
    """``with RunLock(run_dir, Operation.EXPORT).acquire(wait=True): ...``"""

    def __init__(self, run_dir: str | Path, operation: Operation):
        self.run_dir = Path(run_dir)
        self.operation = Operation(operation)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(
        self,
        wait: bool = False,
        cancel: threading.Event | None = None,
        on_wait: Callable[[dict[str, Any]], None] | None = None,
        poll_s: float = 0.2,
    ) -> RunLock:
        """Take the lock, or raise :class:`RunBusyError`. With ``wait``, queue behind a job that is not training.

        A training job that another job holds is always refused: two writers of one run are never allowed,
        and training waits for no one (its start would be minutes late with nothing on screen). The run
        directory must exist (a new run takes its lock right after creating it).
        """
        fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        told = False
        try:
            while True:
                # A probe by lock_owner (a shared lock held for microseconds) can make one try fail: retry briefly.
                if _try_lock(fd, fcntl.LOCK_EX, tries=5):
                    break
                owner = _read_owner(self.run_dir) or {}
                if not wait or self.operation is Operation.TRAIN or owner.get("operation") == Operation.TRAIN.value:
                    raise RunBusyError(*_busy_message(self.run_dir, owner, self.operation))
                if cancel is not None and cancel.is_set():
                    raise RunBusyError(
                        "cancelled while waiting for the run to be free", str(self.run_dir), "start it again later"
                    )
                if on_wait is not None and not told:
                    on_wait(owner)
                    told = True
                time.sleep(poll_s)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "operation": self.operation.value,
            "since": time.time(),
            "thread": threading.current_thread().name,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        return self

    def acquire_if_present(self) -> RunLock:
        """Take the lock now if the run directory exists (an existing run to resume or replace); else later."""
        if self.run_dir.is_dir() and not self.held:
            self.acquire()
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunLock:
        if not self.held:
            self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _try_lock(fd: int, mode: int, tries: int = 1) -> bool:
    for attempt in range(tries):
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < tries:
                time.sleep(0.01)
    return False


def _read_owner(run_dir: Path) -> dict[str, Any] | None:
    try:
        text = (run_dir / LOCK_FILE).read_text(encoding="utf-8")
        return json.loads(text) if text.strip() else None
    except (OSError, json.JSONDecodeError):
        return None


def lock_owner(run_dir: str | Path) -> dict[str, Any] | None:
    """Who holds the run's lock now (pid, host, operation, since), or None when no live job does.

    The file's record alone proves nothing (a crashed holder leaves it behind): the lock itself is probed.
    """
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if _try_lock(fd, fcntl.LOCK_SH):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        return _read_owner(Path(run_dir)) or {"operation": "unknown"}
    finally:
        os.close(fd)


def is_locked(run_dir: str | Path) -> bool:
    return lock_owner(run_dir) is not None


def _busy_message(run_dir: Path, owner: dict[str, Any], wanted: Operation) -> tuple[str, str, str]:
    operation = owner.get("operation", "")
    doing = _DOING.get(Operation(operation), "used") if operation in Operation._value2member_map_ else "used"
    who = f"process {owner['pid']} on {owner.get('host', '?')}" if owner.get("pid") else "another job"
    if owner.get("since"):
        who += time.strftime(" since %H:%M:%S", time.localtime(owner["since"]))
    if operation == Operation.TRAIN.value:
        fix = "wait for that training to end (or press Stop in its app / send it Ctrl-C) and try again"
        if wanted is Operation.TRAIN:
            fix += "; to train anew, pick another output_dir"
    else:
        fix = "wait for it to finish and try again"
    return f"the run is being {doing} by {who}", str(run_dir), fix
