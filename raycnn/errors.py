"""Every error a user can cause, and the exit codes of `raycnn`; Ray-free and torch-free, so
any module can raise them and the command line catches one class.

Each error is raised by the module that finds the mistake, with a one-line message; the CLI
prints it as `raycnn: error: ...` and exits with the error's `exit_code`.
"""
from __future__ import annotations

# What `raycnn run` exits with: a finished run, one with failed trials, bad input, a run complete
# except the cells it skipped (pretrained without ImageNet weights), an interrupted (resumable) run.
EXIT = {"ok": 0, "errors": 3, "usage": 2, "skipped": 4, "interrupted": 130}


class UserError(Exception):
    """A mistake of the user's (or of their data, cluster or disk) that stops a command before
    it changes anything; the message is one line."""
    exit_code = EXIT["usage"]


class ConfigError(UserError):
    """A training configuration that cannot run (raycnn.config)."""


class SuiteError(UserError):
    """A suite file that cannot be read, or a selection of it that is empty (raycnn.suites)."""


class OptionError(UserError):
    """A command-line option that cannot be honoured (raycnn.cli)."""


class DataError(UserError):
    """Data files missing or malformed (raycnn.datafiles)."""


class ResultsError(UserError):
    """Results that cannot be read, shown or written (raycnn.results, raycnn.tables)."""


class StorageError(UserError):
    """A results location that cannot be opened, reached or written (raycnn.storage)."""


class CheckpointError(UserError):
    """A checkpoint that will not be loaded: unreadable, or holding more than tensors and
    plain values (raycnn.checkpoint)."""


class RunError(UserError):
    """A run that cannot start or resume: an unreachable cluster, a request no node can ever
    satisfy, a resume with options that would change its results."""


class LockedError(UserError):
    """Another driver holds the run folder's lock (raycnn.lock)."""


class NodeDied(Exception):
    """The Ray node under the driver died mid-run; the rows so far are intact and resumable."""
