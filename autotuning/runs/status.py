"""The one status vocabulary of a run: what run.json records, what the pipeline reports, what the Runs tab shows."""

from __future__ import annotations

import enum

__all__ = ["RunStatus", "ACTIVE", "ENDED"]


class RunStatus(str, enum.Enum):
    """A ``str`` enum: ``RunStatus.FINISHED == "finished"``, and run.json stores the plain value."""

    QUEUED = "queued"  # accepted by the pipeline, not started yet
    LAUNCHING = "launching"  # a multi-process run whose processes are starting
    RUNNING = "running"
    STOPPING = "stopping"  # Stop pressed; ends at the next step with a checkpoint
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"  # ended early by Stop, resumable
    INTERRUPTED = "interrupted"  # run.json says running but no live process holds the run's lock (a crash)
    UNKNOWN = "unknown"  # a run.json without a status

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: object) -> RunStatus:
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


ACTIVE = (RunStatus.QUEUED, RunStatus.LAUNCHING, RunStatus.RUNNING, RunStatus.STOPPING)
ENDED = (RunStatus.FINISHED, RunStatus.FAILED, RunStatus.STOPPED, RunStatus.INTERRUPTED)
