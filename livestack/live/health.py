"""The daemon's health, shared by its threads: disk stalls and threads that died.

A stall is a write the daemon cannot do now (the journal, a checkpoint: disk full, read-only, quota); the
thread that met it retries until it works and clears it. A dead thread is for good. ``status`` and the
systemd watchdog read both; any thread may write (a lock guards them).
"""

from __future__ import annotations

import errno
import threading

__all__ = ["STALL_RETRY", "Health", "disk_problem"]

#: Seconds between attempts to write again while stalled.
STALL_RETRY = 1.0


def disk_problem(what: str, exc: BaseException) -> str:
    """One sentence for a failed write: ``disk full: cannot write the journal (...)`` or the like.

    Parameters
    ----------
    what : str
        What could not be written ("the journal", "a checkpoint").
    exc : BaseException
        The error, or a ``StateError`` caused by an ``OSError``.

    Returns
    -------
    str
    """
    cause = exc if isinstance(exc, OSError) else exc.__cause__
    full = isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)
    detail = (cause.strerror or str(cause)) if isinstance(cause, OSError) else str(exc)
    return f"{'disk full' if full else 'cannot write'}: {what} could not be written ({detail})"


class Health:
    """Stalls and dead threads, by name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stalls: dict[str, str] = {}
        self._dead: dict[str, str] = {}

    def stall(self, what: str, problem: str) -> bool:
        """Record that ``what`` cannot be written now; True if it was not stalled already."""
        with self._lock:
            new = what not in self._stalls
            self._stalls[what] = problem
            return new

    def clear(self, what: str) -> bool:
        """``what`` was written again; True if it had been stalled."""
        with self._lock:
            return self._stalls.pop(what, None) is not None

    def died(self, thread: str, problem: str) -> None:
        """Record that a thread ended with an exception."""
        with self._lock:
            self._dead[thread] = problem

    @property
    def stalled(self) -> str | None:
        """Why writing is stalled, or None."""
        with self._lock:
            return "; ".join(self._stalls.values()) or None

    @property
    def failed(self) -> str | None:
        """Which threads died and why, or None."""
        with self._lock:
            return "; ".join(f"the {name} thread died ({why})" for name, why in self._dead.items()) or None
