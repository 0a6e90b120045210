"""Errors the user can fix, kept apart from bugs.

Every message a user sees follows one shape, so the CLI, the UI and the log read the same:
``<what is wrong>, <where: file/line/row/field>, <what to do>``.
Anything that is *not* a :class:`UserError` is a bug in autotuning (or a library) and is shown
with a pointer to the log file rather than a bare traceback.
"""

from __future__ import annotations

__all__ = ["UserError", "ConfigError", "DataError", "ModelError", "ExportError", "RunBusyError", "JobCancelled"]


class UserError(Exception):
    """A problem with the user's input that they can fix.

    ``what`` says what is wrong, ``where`` points at the offending file/line/row/field (may be
    empty), ``fix`` says what to do. ``str(err)`` joins them into the one-line message.
    """

    def __init__(self, what: str, where: str = "", fix: str = ""):
        self.what = what.strip().rstrip(".")
        self.where = where.strip()
        self.fix = fix.strip().rstrip(".")
        super().__init__(self.message)

    @property
    def message(self) -> str:
        parts = [self.what]
        if self.where:
            parts.append(self.where)
        if self.fix:
            parts.append(self.fix)
        return ", ".join(parts)


class ConfigError(UserError):
    """An invalid option or combination of options."""


class DataError(UserError):
    """A dataset that cannot be read or does not fit the chosen fine-tuning type."""


class ModelError(UserError):
    """A model or tokenizer that cannot be found or loaded as configured."""


class ExportError(UserError):
    """An export that cannot be produced or failed its verification."""


class RunBusyError(UserError):
    """The run is held by another live job: a training in progress cannot be resumed, exported or overwritten."""


class JobCancelled(UserError):
    """The user cancelled a job (an export, an evaluation) before it finished."""
