"""User errors and exit codes, shared by the CLI and the Ray modules; Ray-free on purpose, so
the CLI can catch them without importing Ray."""
from __future__ import annotations

# What `raycnn run` exits with: a finished run, one with failed trials, bad input, a run complete
# except the cells it skipped (pretrained without ImageNet weights), an interrupted (resumable) run.
EXIT = {"ok": 0, "errors": 3, "usage": 2, "skipped": 4, "interrupted": 130}


class UserError(Exception):
    """A mistake of the user's (or of their cluster) that stops a run before it starts; the
    message is one line, printed as `raycnn: error: ...` with exit code EXIT["usage"]."""


class RunError(UserError):
    """A run that cannot start: an unreachable cluster, a request no node can ever satisfy."""


class LockedError(UserError):
    """Another driver holds the run folder's lock."""


class NodeDied(Exception):
    """The Ray node under the driver died mid-run; the rows so far are intact and resumable."""
