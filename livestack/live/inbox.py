"""The worker's inbox: complete frames in observation order, and control commands, behind one condition.

The watcher's callbacks put frames in (any thread), the network thread puts commands in, the worker takes
them out with one blocking ``get``. Frames come out by observation time (DATE-OBS), then arrival, so a
backlog found at start-up and frames that arrive together are stacked in the order they were taken.
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
    """A complete file waiting in the inbox, ordered by observation time then arrival.

    Attributes
    ----------
    key : (float, int)
        Observation time (POSIX seconds; infinity when unknown) and arrival number.
    path : Path
    completed : float
        ``time.time()`` when the file was known to be whole.
    problem : str or None
        Why the watcher gave up on the file, if it did (the worker rejects it with this reason).
    """

    key: tuple[float, int]
    path: Path = field(compare=False)
    completed: float = field(compare=False)
    problem: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Command:
    """A control request for the worker (``reset``, ``set_reference``), answered through ``future``."""

    name: str
    args: dict[str, Any]
    future: Future[dict[str, Any]]


class Inbox:
    """Frames in observation order plus control commands, with one blocking ``get``."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frames: list[Queued] = []
        self._commands: list[Command] = []
        self._arrivals = 0
        # Taken early by the worker (``take_ahead``) and not yet in hand: still counted as waiting.
        self._ahead: Queued | None = None
        # Read under the lock by ``get``: a frame arriving just after a pause must not slip through.
        self.paused = False

    def put_frame(self, path: Path, observed: datetime | None, problem: str | None = None,
                  completed: float | None = None) -> None:
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
        """
        with self._cond:
            self._arrivals += 1
            t = observed.timestamp() if observed else float("inf")
            when = time.time() if completed is None else completed
            heapq.heappush(self._frames, Queued((t, self._arrivals), path, when, problem))
            self._cond.notify()

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
            if not self._commands and (self.paused or not self._frames):
                self._cond.wait(timeout)
            if self._commands:
                return self._commands.pop(0)
            if self._frames and not self.paused:
                return heapq.heappop(self._frames)
            return None

    def take_ahead(self) -> Queued | None:
        """The next frame in order if one is waiting and the inbox is not paused, taken early (not blocking).

        It still counts as waiting until ``release_ahead`` (the worker has it in hand) or ``put_back``.
        """
        with self._cond:
            if self.paused or not self._frames or self._ahead is not None:
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
