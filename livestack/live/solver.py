"""Plate solving in the daemon: a WCS for each new reference, found on a thread of its own.

The worker calls ``Solver.reference`` when a stack's reference is chosen; if ``[wcs] solve`` asks for it, the
stacker is queued, and the solver thread runs the plate solver (seconds to a minute) without holding anything
the frame path needs. A solution goes into the stacker under the stacks' lock, so every later snapshot of that
target carries it, and out as a ``wcs`` event; a missing solver is said once, a failed solve once per
reference, and stacking goes on as before either way.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from livestack import events
from livestack.config import Config
from livestack.pipeline import Stacker, solve_reference, wants_solution
from livestack.stages.solve import SolveFailure

__all__ = ["Solver"]

log = logging.getLogger("livestack.solve")


@dataclass(frozen=True, eq=False)
class _Request:
    stacker: Stacker
    session: int
    image: np.ndarray | None


class Solver:
    """Plate-solves references on its own thread.

    Parameters
    ----------
    config : Config
        Uses ``[wcs]``.
    lock : threading.Lock
        The stacks' lock, held while a solution is given to a stacker.
    emit : callable
        Queues an event for publication.
    """

    def __init__(self, config: Config, lock: threading.Lock, emit: Callable[[events.Event], None]) -> None:
        self.config = config
        self._lock = lock
        self._emit = emit
        self._requests: queue.Queue[_Request | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._missing_said = False
        self._cancel = threading.Event()

    def start(self) -> None:
        """Start the thread, unless solving is off."""
        if self.config.wcs.solve != "off" and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="livestack-solver", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Drop what is queued, stop the solver in hand, end the thread."""
        if self._thread is not None:
            self._cancel.set()
            while True:
                try:
                    self._requests.get_nowait()
                except queue.Empty:
                    break
            self._requests.put(None)
            self._thread.join(10.0)
            self._thread = None

    def reference(self, stacker: Stacker, session: int, image: np.ndarray | None = None) -> None:
        """A stack has a new reference: solve it if the configuration asks (worker thread; cheap)."""
        if self._thread is not None and wants_solution(self.config, stacker.reference_meta):
            wanted = image if "{image}" in self.config.wcs.command else None
            self._requests.put(_Request(stacker, session, wanted))

    def _run(self) -> None:
        while True:
            request = self._requests.get()
            if request is None:
                return
            try:
                self._solve(request)
            except Exception:
                log.exception("plate solving failed")

    def _solve(self, request: _Request) -> None:
        meta = request.stacker.reference_meta
        assert meta is not None
        outcome = solve_reference(self.config, request.stacker, request.image, self._cancel)
        if isinstance(outcome, SolveFailure):
            if outcome.kind == "cancelled":
                return
            if outcome.kind == "missing":
                if not self._missing_said:
                    log.warning("%s: stacks keep the reference's own WCS, if any", outcome.reason)
                    self._missing_said = True
                return
            log.warning("%s could not be plate-solved: %s", meta.path, outcome.reason)
            return
        with self._lock:
            request.stacker.use_wcs(outcome.wcs_header)
        log.info("%s solved in %.1f s: centre RA %.5f Dec %+.5f, %.3f\"/px, up %.1f deg E of N", meta.path,
                 outcome.seconds, outcome.ra, outcome.dec, outcome.scale, outcome.rotation)
        self._emit(events.make_event(
            "wcs", object=meta.object, session=request.session, reference=meta.path, ra=outcome.ra,
            dec=outcome.dec, scale=outcome.scale, rotation=outcome.rotation, stars=len(outcome.matches),
            solver=outcome.solver, seconds=outcome.seconds))
