"""The frame worker: takes frames and commands from the inbox, in order, and is the only thread that stacks.

Per frame: stat and hash the file, skip it if its content was judged before (the journal's memory), read it
and find its stars (``Stacker.prepare``, ahead of time on the read-ahead thread when frames are waiting),
then align, warp and accumulate it (``Stacker.commit``), journal the verdict (fsync), and publish it. Before
a stack has a reference, its first frames wait briefly and the best of them is stacked first (the reference
window, ``_reference_window``). The worker owns everything here: the inbox's frame taken early, the
journal's memory of judged frames, the counters, and the stack's changes (through ``Stacks``, whose lock
lets the writer read it).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from livestack import events
from livestack.config import Config
from livestack.errors import LivestackError, StateError
from livestack.live.health import STALL_RETRY, Health, disk_problem
from livestack.live.inbox import Command, Inbox, Queued
from livestack.live.photometry import Photometry
from livestack.live.recovery import Resumed
from livestack.live.removal import COMMANDS as REMOVAL_COMMANDS
from livestack.live.removal import SWITCH, Removals
from livestack.live.reports import frame_event, journal_entry
from livestack.live.solver import Solver
from livestack.live.stacks import Stacks
from livestack.live.state import Journal, JournalEntry, content_hash
from livestack.live.writer import Outputs
from livestack.pipeline import (
    REJECTED,
    UNALIGNED_METHODS,
    FrameResult,
    Prepared,
    ReferenceCandidate,
    Stacker,
    choose_reference,
)

__all__ = ["DaemonStats", "Worker"]

log = logging.getLogger("livestack.live.worker")


@dataclass
class DaemonStats:
    """Counters the daemon publishes (changed by the worker only; read by others)."""

    received: int = 0
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    #: Frames stacked (or rejected) whose read and star search ran ahead, on the read-ahead thread.
    read_ahead: int = 0
    last_latency: float | None = None


@dataclass(frozen=True)
class _Front:
    """The first half of a frame's work, which can run ahead: its file's identity, content and stars.

    ``st`` is None when the file disappeared; ``digest`` is None when (path, size, mtime) was known, and
    ``prepared`` None when the frame was known or a duplicate when this was computed (the worker decides
    again when it commits the frame: the frame before it may have had the same content).
    """

    st: os.stat_result | None
    digest: str | None = None
    prepared: Prepared | FrameResult | None = None


@dataclass(frozen=True)
class Ahead:
    """A frame taken from the inbox early, its first half under way on the read-ahead thread."""

    item: Queued
    front: Future[_Front]


class Worker:
    """The worker thread's state and loop.

    Parameters
    ----------
    config : Config
    inbox : Inbox
    stacks : Stacks
    outputs : Outputs
    journal : Journal
    memory : Resumed
        What the journal says about frames already judged; the worker owns it from now on.
    emit : callable
        Queues an event for publication.
    stop : threading.Event
        Set when the daemon is asked to stop: the worker finishes the frame in hand and returns.
    photometry : Photometry, optional
        Given each accepted frame's stamps; it measures them on its own thread.
    removals : Removals, optional
        Answers ``remove``, ``reinclude`` and ``undo_last`` (and switches to a re-integrated stack).
    health : Health, optional
        Where a journal that cannot be written stalls the daemon.
    solver : Solver, optional
        Told of each new reference; it plate-solves on its own thread.
    """

    def __init__(self, config: Config, inbox: Inbox, stacks: Stacks, outputs: Outputs, journal: Journal,
                 memory: Resumed, emit: Callable[[events.Event], None], stop: threading.Event,
                 photometry: Photometry | None = None, removals: Removals | None = None,
                 health: Health | None = None, solver: Solver | None = None) -> None:
        self.config = config
        self.health = health if health is not None else Health()
        self.inbox = inbox
        self.stacks = stacks
        self.outputs = outputs
        self.journal = journal
        self.emit = emit
        self._stop = stop
        self.photometry = photometry
        self.removals = removals
        self.solver = solver
        #: (session, reference path) already handed to the solver.
        self._solving: set[tuple[int, str]] = set()
        self._known = memory.known
        self._hashes = memory.hashes
        self._legacy_hash = memory.legacy_hash
        self.stats = DaemonStats(received=memory.received, accepted=memory.accepted, rejected=memory.rejected)
        #: "waiting", "choosing" (a reference window is open) or "running"; read by ``status``.
        self.state = "waiting"
        #: While a reference window is open: its target, the frames of it at hand, and the time.time() at
        #: which the window closes whatever comes (read by ``status`` through ``choosing``).
        self._choosing: tuple[str, int, float] | None = None
        #: time.monotonic() of the loop's last turn, and of the start of the frame in hand (None between).
        self.heartbeat = time.monotonic()
        self.busy_since: float | None = None
        # Reads the next frame while this one is stacked (its thread starts with the first job).
        self._readahead = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, initializer=_name_thread, initargs=("livestack-readahead",))
        #: The frame taken early; only the worker touches it.
        self.ahead: Ahead | None = None
        #: (session, target) whose reference window has closed: their reference was chosen (or none could be).
        self._windowed: set[tuple[int, str]] = set()
        #: (session, target) whose open reference window was logged.
        self._window_logged: set[tuple[int, str]] = set()

    # -- the loop -------------------------------------------------------------------------------------

    def run(self) -> None:
        """Take frames and commands in order; with a backlog, the next frame is read while this one stacks.

        A frame taken early (``ahead``) is the next in observation order when it is taken: a frame arriving
        afterwards with an earlier DATE-OBS comes after it, as it would if it arrived while that frame was
        being stacked. Commands waiting go before it (a reset or a new reference: it is stacked into the new
        session; its first half does not depend on the stack). A pause puts it back into the inbox, its
        read dropped: it is read again after the resume, in order among whatever arrived meanwhile. A stop
        leaves it unstacked and unjournaled, to be found again by the next start's scan.
        """
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            if self.health.stalled:
                # A checkpoint cannot be written: take nothing new until the writer manages it.
                self._stop.wait(STALL_RETRY)
                continue
            try:
                self._turn()
            except Exception as exc:
                # Whatever a frame or a command throws, the worker goes on with the next one.
                log.error("the worker met an unexpected error and goes on (%s: %s)", type(exc).__name__, exc,
                          exc_info=True)
        self.outputs.final()

    def _turn(self) -> None:
        """One turn of the loop: a command, or a frame (taken early or from the inbox), or an idle tick."""
        ahead = self.ahead
        front: Future[_Front] | None = None
        if ahead is not None and self._window_key(ahead.item) is not None:
            # Read ahead while the frame before it stacked, but its target has no reference yet: it goes
            # back to its place, and the reference window chooses among its target's first frames, as it
            # would had the frame not been read ahead.
            self.ahead = None
            ahead.front.cancel()
            self.inbox.put_back(ahead.item)
            ahead = None
        if ahead is None and self._reference_window():
            return
        if ahead is not None:
            command = self.inbox.get_command()
            if command is not None:
                self._run_command(command)
                return
            self.ahead = None
            if self.inbox.paused:
                ahead.front.cancel()
                self.inbox.put_back(ahead.item)
                return
            self.inbox.release_ahead()
            item, front = ahead.item, ahead.front
        else:
            got = self.inbox.get(0.5)
            if got is None:
                self.outputs.maybe_checkpoint(idle=True)
                self.outputs.maybe_display()
                return
            if isinstance(got, Command):
                self._run_command(got)
                return
            if self._window_key(got) is not None:
                # It came in while the worker waited: the reference window sees it first, next turn.
                self.inbox.put_back(got)
                return
            item = got
        self._take_one(item, front)

    def _take_one(self, item: Queued, front: Future[_Front] | None = None) -> None:
        self.busy_since = time.monotonic()
        try:
            self._take(item, front)
        except (OSError, LivestackError) as exc:
            log.error("%s could not be processed: %s", item.path, exc)
        finally:
            self.busy_since = None

    def close(self) -> None:
        """After the thread ended: drop a frame read ahead (not journaled: the next start finds it again)."""
        self._readahead.shutdown(wait=True, cancel_futures=True)
        self.ahead = None

    # -- one frame ------------------------------------------------------------------------------------

    def _front(self, item: Queued, stacker: Stacker) -> _Front:
        """Stat, hash and prepare a frame unless it is known or a duplicate by now (any thread).

        On the read-ahead thread this reads ``_known`` and ``_hashes`` while the worker may add to them
        (single lookups, safe); it only skips work, the worker checks again before stacking.
        """
        if item.problem is not None:
            # Never opened: it may be a FIFO, a device or a link to one. Its identity is its name, its
            # status and the problem, so that the same problem is journaled once.
            try:
                st = item.path.lstat()
            except FileNotFoundError:
                return _Front(None)
            if (str(item.path), st.st_size, st.st_mtime_ns) in self._known:
                return _Front(st)
            return _Front(st, _problem_digest(item.path, st, item.problem), self._prepare(item, stacker))
        try:
            st = item.path.stat()
        except FileNotFoundError:
            return _Front(None)
        if (str(item.path), st.st_size, st.st_mtime_ns) in self._known:
            return _Front(st)
        if not stat.S_ISREG(st.st_mode):
            # Replaced by something else since the watcher looked: reading it could block or never end.
            reason = "not a regular file any more"
            rejected = FrameResult(str(item.path), REJECTED, reason, None, None, None, MappingProxyType({}))
            return _Front(st, _problem_digest(item.path, st, reason), rejected)
        digest = content_hash(item.path)
        if self._seen(item.path, digest):
            return _Front(st, digest)
        return _Front(st, digest, self._prepare(item, stacker))

    def _seen(self, path: Path, digest: str) -> bool:
        """Whether a file with this content hash was judged before (any thread, like ``_front``).

        A journal written before XXH3 holds BLAKE2b digests: then the file is also hashed that way.
        """
        if digest in self._hashes:
            return True
        return self._legacy_hash is not None and content_hash(path, like=self._legacy_hash) in self._hashes

    def _read_ahead(self) -> None:
        """Take the next waiting frame, if any, and start its first half on the read-ahead thread."""
        if self.ahead is not None or self._stop.is_set():
            return
        item = self.inbox.take_ahead()
        if item is not None:
            self.ahead = Ahead(item, self._readahead.submit(self._front, item, self.stacks.stacker))

    def _take(self, item: Queued, front: Future[_Front] | None = None) -> None:
        path = item.path
        first = front.result() if front is not None else self._front(item, self.stacks.stacker)
        st = first.st
        if st is None:
            log.warning("%s disappeared before it could be stacked", path)
            return
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key in self._known:
            return
        digest = first.digest if first.digest is not None else content_hash(path)
        if self._seen(path, digest):  # again: the frame just before this one may have had its content
            self.stats.duplicates += 1
            log.info("%s has the content of a frame already seen; counted once", path.name)
            self._known[key] = digest
            return
        self.state = "running"
        self.stats.received += 1
        seq = self.outputs.seq + 1
        self.emit(frame_event(seq, path, "received", None, None, self.stacks.session))
        prepared = first.prepared
        if prepared is None:
            prepared = self._prepare(item, self.stacks.stacker)
        elif front is not None:
            self.stats.read_ahead += 1
        # While this frame is aligned, warped and accumulated (which release the GIL), read the next one.
        self._read_ahead()
        previous, previous_stack = self.stacks.current, self.stacks.stacker
        target, new_target = previous, False
        if isinstance(prepared, Prepared):
            target = self.stacks.key_of(prepared.frame.meta.object)
            new_target = self.stacks.select(target)
        # The frame's verdict is journaled and published before the lock lets the writer see the stack with
        # it: a snapshot or a preview never counts a frame whose event has not gone out.
        with self.stacks.lock:
            result = self._commit(prepared, path)
            self.outputs.seq = seq
            entry = journal_entry(seq, path, st, digest, result, self.stacks.session,
                                  time.time() - item.completed)
            durable = self._append(entry)
            if durable:
                self._decided(key, digest, seq, path, result, item.completed)
        if not durable:
            # Out of the lock, so that status, snapshots on request and the writer carry on meanwhile.
            self.outputs.unjournaled = True
            if not self._append_when_possible(entry):
                return  # stopping: the frame is in no checkpoint, the next start stacks it once
            self.outputs.unjournaled = False
            self._decided(key, digest, seq, path, result, item.completed)
        if target != previous:
            self._target_decided(target, previous, previous_stack, new_target, result)
        self.stacks.changed()
        # A kappa-sigma warm-up that this frame filled is judged now that the frame's event is out and the
        # status counts it, not before (the costliest step of a stack's life, about 0.3 s at 8.3 MP).
        # It waits for a picture being made of the warm-up's frames (``Stacks.computing``), not the frame.
        settled = False
        if not self.stacks.stacker.settled:
            with self.stacks.computing, self.stacks.lock:
                settled = self.stacks.stacker.settle()
        if settled:
            self.stacks.changed()
        retired = self.stacks.stacker.take_retired()
        if retired:
            # A median folded into kappa-sigma at its disk budget: its cube goes once a checkpoint that no
            # longer names it is saved (the writer runs jobs in order).
            self.outputs.checkpoint()
            for cube in retired:
                self.outputs.writer.submit(cube.discard)
        if result.accepted:
            self.outputs.stacked()
            if self.photometry is not None and isinstance(prepared, Prepared):
                self._measure(seq, prepared, result)
            self._maybe_solve(prepared if result.reference and isinstance(prepared, Prepared) else None)
        self.outputs.maybe_checkpoint(idle=False)
        depth, _ = self.inbox.depth_and_lag()
        if depth == 0:
            self.state = "waiting"

    def _reference_window(self) -> bool:
        """Choose a stack's reference among its first frames waiting; True when this turn was spent on it.

        While the next frame's target has no reference yet (and none is named), its frames wait until
        ``[align] reference_window`` of them are in the inbox or the oldest has waited ``reference_wait``
        seconds (a backlog or a burst fills the window at once). Then each is read and judged
        (``choose_reference``: most stars, then smallest FWHM), and the chosen one is stacked first, out of
        turn: it sets the grid, the sky and the star count and FWHM that later frames are judged by. The
        others follow in observation order. The journal keeps that order, so recovery stacks the same
        reference first again.
        """
        a = self.config.align
        waiting = self.inbox.peek(a.reference_window)
        key = self._window_key(waiting[0]) if waiting else None
        if key is None:
            self._window_closed()
            return False
        command = self.inbox.get_command()
        if command is not None:
            self._run_command(command)
            return True
        same = [q for q in waiting if q.problem is None and self.stacks.key_of(q.object) == key]
        age = time.time() - min(q.completed for q in waiting)
        if len(same) < a.reference_window and age < a.reference_wait:
            name = waiting[0].object or "the stack"
            if (self.stacks.session, key) not in self._window_logged:
                self._window_logged.add((self.stacks.session, key))
                message = (f"choosing the reference of {name}: its first frames wait up to "
                           f"{a.reference_wait:g} s for {a.reference_window} of them")
                log.info("%s", message)
                # Info lines are not published as events by themselves: this one says why frames wait.
                self.emit(events.make_event("log", level="info", message=message, logger=log.name))
            self.state = "choosing"
            self._choosing = (name, len(same), time.time() + a.reference_wait - age)
            # Until one more frame comes in (of whatever target), a command, or the wait is over.
            depth, _ = self.inbox.depth_and_lag()
            self.inbox.wait_for(depth + 1, min(0.5, a.reference_wait - age))
            return True
        self._windowed.add((self.stacks.session, key))
        self._window_closed()
        candidates = [self._candidate(q) for q in same]
        chosen = choose_reference(candidates)
        if chosen is None or same[chosen] is waiting[0]:
            return False  # the next frame in order is the one: it goes the usual way
        item = same[chosen]
        best = candidates[chosen]
        assert best is not None
        log.info("%s becomes the reference (%d stars, FWHM %.2f px), the best of the first %d frames; it is "
                 "stacked first", item.path.name, best.stars, best.fwhm, len(same))
        if self.inbox.take(item):
            self._take_one(item)
        return True

    def _window_closed(self) -> None:
        if self._choosing is not None:
            self._choosing = None
            if self.state == "choosing":
                self.state = "waiting"

    def choosing(self) -> str | None:
        """While a reference window is open, what it waits for in words (any thread; None otherwise)."""
        choosing = self._choosing
        if choosing is None:
            return None
        name, frames, closes = choosing
        left = max(0.0, closes - time.time())
        return (f"{name}: {frames} of {self.config.align.reference_window} first frames, "
                f"at most {left:.1f} s more")

    def _window_key(self, item: Queued) -> str | None:
        """The target whose reference is to be chosen before ``item`` is stacked, if any."""
        if self.config.align.reference_window <= 1 or item.problem is not None:
            return None  # a file the watcher gave up on is rejected without a stack
        key = self.stacks.key_of(item.object)
        if (self.stacks.session, key) in self._windowed:
            return None
        stacker = self.stacks.get(key)
        if stacker is None:
            empty = self.stacks.get("")
            if self.stacks.current == "" and empty is not None and empty.count == 0:
                stacker = empty  # the first target takes it over (with a reference set for it)
            else:
                aligns = self.config.stack.method not in UNALIGNED_METHODS
                return key if aligns and not self.config.align.reference else None
        return key if stacker.chooses_reference else None

    def _candidate(self, item: Queued) -> ReferenceCandidate | None:
        """How a waiting frame would serve as the reference; None if it cannot (unreadable, judged before)."""
        first = self._front(item, self.stacks.stacker)
        if first.prepared is None:
            return None
        return self.stacks.stacker.reference_candidate(first.prepared)

    def _maybe_solve(self, reference: Prepared | None) -> None:
        """Hand a stack's reference to the plate solver once (the frame itself when it is the reference)."""
        ref = self.stacks.stacker.reference_meta
        if self.solver is None or ref is None or (self.stacks.session, ref.path) in self._solving:
            return
        self._solving.add((self.stacks.session, ref.path))
        self.solver.reference(self.stacks.stacker, self.stacks.session,
                              reference.frame.luminance if reference is not None else None)

    def _measure(self, seq: int, prepared: Prepared, result: FrameResult) -> None:
        """Hand an accepted frame's stars to the photometry thread; a failure costs a point, not the frame."""
        assert self.photometry is not None
        ref = self.stacks.stacker.reference_meta
        try:
            self.photometry.frame(seq, prepared, result, self.stacks.session, self.stacks.folder(),
                                  ref.wcs_header if ref is not None else None)
        except Exception:
            log.exception("photometry of %s could not be started", prepared.frame.meta.path)

    def _commit(self, prepared: Prepared | FrameResult, path: Path) -> FrameResult:
        """Align, warp and accumulate; a stage that throws (OpenCV, numba, numpy ...) rejects the frame.

        The frame is handed over (``owned``) unless photometry will cut its stamps afterwards: the defects
        found in consecutive frames are then replaced in its own pixels instead of in a copy of the whole
        frame (33 MB at 8.3 MP, 104 MB at 26 MP, with its page faults). The plate solver may still get the
        reference's luminance: replaced defects are no loss to it.
        """
        owned = self.photometry is None or not self.photometry.enabled
        try:
            return self.stacks.stacker.commit(prepared, owned=owned)
        except Exception as exc:
            log.error("%s could not be stacked: %s", path, exc, exc_info=True)
            reason = " ".join(f"could not be stacked ({type(exc).__name__}: {exc})".split())
            frame = prepared.frame if isinstance(prepared, Prepared) else None
            quality = prepared.quality if isinstance(prepared, Prepared) else None
            return FrameResult(str(path), REJECTED, reason, frame.meta if frame else None, quality, None,
                               MappingProxyType(dict(prepared.timings)))

    def _append(self, entry: JournalEntry) -> bool:
        """Journal a verdict; False when the disk refuses it (the daemon then stalls until it can)."""
        try:
            self.journal.append(entry)
        except StateError as exc:
            if not isinstance(exc.__cause__, OSError):
                raise
            problem = disk_problem("the journal", exc)
            if self.health.stall("journal", problem):
                log.error("stalled: %s; %s waits, and no frame is taken until it is journaled", problem,
                          Path(entry.path).name)
            return False
        if self.health.clear("journal"):
            log.warning("the journal can be written again: resuming")
        return True

    def _append_when_possible(self, entry: JournalEntry) -> bool:
        """Retry journaling until it works (True) or the daemon stops (False)."""
        while not self._stop.wait(STALL_RETRY):
            self.heartbeat = time.monotonic()
            if self._append(entry):
                return True
        return False

    def _decided(self, key: tuple[str, int, int], digest: str, seq: int, path: Path, result: FrameResult,
                 completed: float) -> None:
        """A verdict is durable: remember the content, count it, publish it."""
        self._known[key] = digest
        self._hashes.add(digest)
        if result.accepted:
            self.stats.accepted += 1
        else:
            self.stats.rejected += 1
        latency = time.time() - completed
        self.stats.last_latency = latency
        self.emit(frame_event(seq, path, result.verdict, result, latency, self.stacks.session))

    def _prepare(self, item: Queued, stacker: Stacker) -> Prepared | FrameResult:
        """Read a frame and find its stars; anything wrong with the file rejects it with a reason.

        Any thread: ``Stacker.prepare`` uses only the configuration, never the stack.
        """
        if item.problem is not None:
            return FrameResult(str(item.path), REJECTED, item.problem, None, None, None, MappingProxyType({}))
        try:
            return stacker.prepare(item.path)
        except Exception as exc:
            # A file the reader or the star finder chokes on is a bad frame, not the end of the worker
            # (which would stop stacking for good, and again after every restart).
            log.error("%s could not be read: %s", item.path, exc, exc_info=True)
            reason = " ".join(f"{item.path} cannot be read ({type(exc).__name__}: {exc})".split())
            return FrameResult(str(item.path), REJECTED, reason, None, None, None, MappingProxyType({}))

    # -- sessions and commands ------------------------------------------------------------------------

    def _target_decided(self, target: str, previous: str, previous_stack: Stacker, new: bool,
                        result: FrameResult) -> None:
        """A frame of another target than the last was decided: keep its stack, or forget a stray."""
        if not result.accepted:
            # A rejected frame changes no stack: a target it started goes, and the last one stays current.
            if new and self.stacks.stacker.count == 0:
                self.outputs.writer.submit(self.stacks.drop(target, previous).discard)
            else:
                self.stacks.select(previous)
            return
        if previous_stack is self.stacks.stacker:
            return  # the session's first target, which took over its empty stack
        log.info("%s goes to %s stack in %s", Path(result.path).name, "a new" if new else "its own",
                 self.stacks.folder())
        if previous_stack.count > 0:
            # The stack left behind is saved as it is now; it goes on when its target's frames come back.
            self.outputs.queue_snapshot("target change", previous_stack)

    def _run_command(self, command: Command) -> None:
        try:
            if command.name == "reset":
                self._new_session(None)
                command.future.set_result({"session": self.stacks.session})
            elif command.name == "set_reference":
                path = self._reference_path(command.args.get("path"))
                self._new_session(path)
                command.future.set_result({"session": self.stacks.session, "reference": str(path)})
            elif (command.name in REMOVAL_COMMANDS or command.name == SWITCH) and self.removals is not None:
                command.future.set_result(self.removals.handle(command.name, command.args))
            else:
                command.future.set_exception(LivestackError(f"unknown command {command.name}"))
        except LivestackError as exc:
            command.future.set_exception(exc)

    def _reference_path(self, requested: object) -> Path:
        """The frame a ``set_reference`` request names, if it lies in the watched or the reference folder.

        Anything else gets the same answer whether it exists or not: a client learns nothing about the
        daemon's other files.
        """
        roots = [self.config.path(self.config.watch.folder)]
        if self.config.align.reference_folder:
            roots.append(self.config.path(self.config.align.reference_folder))
        where = " or ".join(str(r) for r in roots)
        refusal = LivestackError(f"set_reference takes a frame file inside {where}")
        if not isinstance(requested, str) or not requested or "\0" in requested:
            raise refusal
        path = Path(requested)
        try:
            resolved = path.resolve()
            inside = any(resolved.is_relative_to(root.resolve()) for root in roots)
            if not inside or not resolved.is_file():
                raise refusal
        except (OSError, RuntimeError, ValueError) as exc:
            raise refusal from exc
        return resolved

    def _new_session(self, reference: Path | None) -> None:
        """Close the current stack (final snapshot) and start an empty one."""
        session = self.stacks.session + 1
        fresh = self.stacks.new_stacker(session)
        if reference is not None:
            problem = fresh.use_reference(reference)
            if problem:
                raise LivestackError(f"{reference} cannot be the reference: {problem}")
        for stacker in self.stacks.targets():
            if stacker.count > 0:
                self.outputs.queue_snapshot("session end", stacker)
        old = self.stacks.reset(fresh, session)
        if self.removals is not None:
            self.removals.session_changed()
        self.outputs.session_started()
        self.outputs.checkpoint()
        # After the old stacks' last snapshots and the new session's checkpoint (the writer runs jobs in
        # order): their median cubes are no longer needed by anything.
        for stacker in old:
            self.outputs.writer.submit(stacker.discard)
        self.outputs.stack_event()
        log.info("session %d started%s", session, f" with reference {reference}" if reference else "")


def _problem_digest(path: Path, st: os.stat_result, reason: str) -> str:
    """The journal identity of a file rejected without being read: its name, status and the problem."""
    identity = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{reason}".encode()
    return "problem-" + hashlib.blake2b(identity, digest_size=16).hexdigest()


def _name_thread(name: str) -> None:
    threading.current_thread().name = name
