"""The worker's inbox: complete frames in observation order, and control commands, behind one condition.

The watcher's callbacks put frames in (any thread), the network thread puts commands in, the worker takes
them out with one blocking ``get``. Frames come out by observation time (DATE-OBS), then file mtime, name
and arrival, so frames that are waiting together are stacked in the order they were taken. A backlog found
at start-up is held back until the watcher has delivered all of it (``held`` until ``scanned``): the worker
never starts on whichever file the scan happened to deliver first.
"""

from __future__ import annotations

import heapq
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["Command", "Inbox", "Queued"]


@dataclass(order=True, frozen=True)
class Queued:
    """A complete file waiting in the inbox, ordered by observation time, then file time, name, arrival.

    Attributes
    ----------
    key : (float, int, str, int)
        Observation time (POSIX seconds; infinity when unknown), the file's mtime (ns; 0 when unknown), its
        name and the arrival number.
    path : Path
    completed : float
        ``time.time()`` when the file was known to be whole.
    problem : str or None
        Why the watcher gave up on the file, if it did (the worker rejects it with this reason).
    object : str or None
        Its OBJECT, when its header was read (the worker chooses a target's reference among its frames).
    """

    key: tuple[float, int, str, int]
    path: Path = field(compare=False)
    completed: float = field(compare=False)
    problem: str | None = field(default=None, compare=False)
    object: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Command:
    """A control request for the worker (``reset``, ``set_reference``), answered through ``future``."""

    name: str
    args: dict[str, Any]
    future: Future[dict[str, Any]]


class Inbox:
    """Frames in observation order plus control commands, with one blocking ``get``.

    Parameters
    ----------
    held : bool
        Give out no frame until ``scanned()`` (the start-up backlog is still being delivered).
    """

    def __init__(self, held: bool = False) -> None:
        self._cond = threading.Condition()
        self._held = held
        self._frames: list[Queued] = []
        self._commands: list[Command] = []
        self._arrivals = 0
        # Taken early by the worker (``take_ahead``) and not yet in hand: still counted as waiting.
        self._ahead: Queued | None = None
        # Read under the lock by ``get``: a frame arriving just after a pause must not slip through.
        self.paused = False

    def put_frame(self, path: Path, observed: datetime | None, problem: str | None = None,
                  completed: float | None = None, mtime_ns: int = 0, object: str | None = None) -> None:
        """Queue a complete file (any thread).

        Parameters
        ----------
        path : Path
        observed : datetime or None
            Its observation time; None sorts after every dated frame.
        problem : str, optional
            Why it cannot be stacked, when that is known already.
        completed : float, optional
            ``time.time()`` when it was known whole (now, by default).
        mtime_ns : int
            Its modification time, which orders frames of the same observation time (or none).
        object : str, optional
            Its OBJECT.
        """
        with self._cond:
            self._arrivals += 1
            t = observed.timestamp() if observed else float("inf")
            when = time.time() if completed is None else completed
            key = (t, mtime_ns, path.name, self._arrivals)
            heapq.heappush(self._frames, Queued(key, path, when, problem, object))
            self._cond.notify_all()

    def scanned(self) -> None:
        """The start-up backlog is all in: frames may be given out (any thread)."""
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def _closed(self) -> bool:
        """No frame may be given out now (paused, or the backlog still coming in); under the lock."""
        return self.paused or self._held

    def set_paused(self, paused: bool) -> None:
        with self._cond:
            self.paused = paused
            self._cond.notify_all()

    def put_command(self, command: Command) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def get(self, timeout: float) -> Queued | Command | None:
        """The next command, else the next frame unless paused; None after ``timeout`` seconds."""
        with self._cond:
            if not self._commands and (self._closed() or not self._frames):
                self._cond.wait(timeout)
            if self._commands:
                return self._commands.pop(0)
            if self._frames and not self._closed():
                return heapq.heappop(self._frames)
            return None

    def peek(self, n: int) -> list[Queued]:
        """The next ``n`` frames in order, left waiting; none while paused or held (not blocking)."""
        with self._cond:
            if self._closed() or self._ahead is not None:
                return []
            return heapq.nsmallest(n, self._frames)

    def take(self, item: Queued) -> bool:
        """Take a frame seen by ``peek`` out of turn; False if it is no longer waiting."""
        with self._cond:
            try:
                self._frames.remove(item)
            except ValueError:
                return False
            heapq.heapify(self._frames)
            return True

    def wait_for(self, count: int, timeout: float) -> None:
        """Block until ``count`` frames can be given out, a command waits, or ``timeout`` seconds pass."""
        with self._cond:
            self._cond.wait_for(lambda: bool(self._commands)
                                or (not self._closed() and len(self._frames) >= count), timeout)

    def take_ahead(self) -> Queued | None:
        """The next frame in order if one is waiting and the inbox is not paused, taken early (not blocking).

        It still counts as waiting until ``release_ahead`` (the worker has it in hand) or ``put_back``.
        """
        with self._cond:
            if self._closed() or not self._frames or self._ahead is not None:
                return None
            self._ahead = heapq.heappop(self._frames)
            return self._ahead

    def release_ahead(self) -> None:
        with self._cond:
            self._ahead = None

    def put_back(self, item: Queued) -> None:
        """Return a frame taken early, with its place in the order and its completion time."""
        with self._cond:
            if self._ahead is item:
                self._ahead = None
            heapq.heappush(self._frames, item)
            self._cond.notify()

    def get_command(self) -> Command | None:
        """The oldest waiting command, if any (not blocking)."""
        with self._cond:
            return self._commands.pop(0) if self._commands else None

    def has_commands(self) -> bool:
        with self._cond:
            return bool(self._commands)

    def depth_and_lag(self) -> tuple[int, float]:
        """Frames waiting (the one taken early included) and the seconds the oldest has waited."""
        with self._cond:
            waiting = [*self._frames, *([self._ahead] if self._ahead is not None else [])]
            if not waiting:
                return 0, 0.0
            return len(waiting), time.time() - min(q.completed for q in waiting)
