"""Daemon: owns the threads, sockets, signals, state folder and systemd notifications.

Threads, each with one job, talking through queues (values crossing them are immutable or copies):

- the watcher (``watch.Watcher``) hands complete files to the inbox;
- the worker takes frames from the inbox in observation order, de-duplicates them by content against the
  journal, runs them through ``pipeline.Stacker``, journals the verdict, and queues events, snapshots and
  checkpoints; it is the only thread that changes the stack (``_stack_lock`` lets the writer read it);
- the read-ahead thread (``livestack-readahead``), when frames are waiting, hashes and reads the next one and
  finds its stars (``Stacker.prepare``, which touches no stack state) while the worker aligns, warps and
  accumulates the current one; the worker still decides, commits and journals every frame itself, in order;
- the writer computes and writes snapshots, previews and checkpoints, off the critical path;
- the network thread publishes events (never blocking), answers control requests, sends ``status`` every
  second and pings systemd's watchdog while the worker's heartbeat is fresh.

Exactly once: a frame is journaled (fsync) right after it is stacked; checkpoints hold the accumulators as of
a journal sequence number. On start the last checkpoint is loaded and the accepted frames journaled after it
are stacked again from their files, in order; anything never journaled is simply new.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import heapq
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from livestack import events
from livestack.config import Config
from livestack.errors import LivestackError
from livestack.live import watch
from livestack.live.net import Security, SocketHub
from livestack.live.notify import Notifier, watchdog_interval
from livestack.live.state import CheckpointStore, Journal, JournalEntry, content_hash, recover
from livestack.pipeline import REJECTED, FrameResult, Prepared, Stacker, frame_facts
from livestack.stages.frames import read_meta
from livestack.stages.snapshot import preview_array, write_fits, write_preview

__all__ = ["Daemon", "DaemonStats"]

log = logging.getLogger("livestack.live.daemon")

#: Seconds between ``status`` events.
STATUS_PERIOD = 1.0
#: The worker's heartbeat older than this (seconds, beyond a frame in hand) stops systemd watchdog pings.
HEARTBEAT_LIMIT = 30.0
#: Seconds a control request waits for the worker or writer before replying with an error.
CONTROL_TIMEOUT = 20.0
#: Events waiting for the network thread; beyond this the oldest are dropped (and counted).
EVENT_BACKLOG = 10_000
#: Milliseconds the network thread waits for a control request before publishing queued events: the most an
#: event waits to go out (was 50). Waking 100 times a second costs an idle daemon about 0.7 % of one core.
NETWORK_POLL_MS = 10
#: Seconds a frame file may stay incomplete and unchanged before it is rejected as truncated (an interrupted
#: copy); if it grows again later it is taken as a new file.
STALE_AFTER = 120.0


@dataclass
class DaemonStats:
    """Counters the daemon publishes (mutated by the worker only; read by others)."""

    received: int = 0
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    #: Frames stacked (or rejected) whose read and star search ran ahead, on the read-ahead thread.
    read_ahead: int = 0
    last_latency: float | None = None
    latencies: list[float] = field(default_factory=list)


@dataclass(order=True, frozen=True)
class _Queued:
    """A complete file waiting in the inbox, ordered by observation time then arrival."""

    key: tuple[float, int]
    path: Path = field(compare=False)
    completed: float = field(compare=False)  # time.time() when the watcher found it complete
    problem: str | None = field(default=None, compare=False)  # why the watcher gave up on it, if it did


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
class _Ahead:
    """A frame taken from the inbox early, its first half under way on the read-ahead thread."""

    item: _Queued
    front: Future[_Front]


@dataclass(frozen=True)
class _Command:
    name: str
    args: dict[str, Any]
    future: Future[dict[str, Any]]


class _Inbox:
    """Frames in observation order plus control commands, with one blocking ``get``."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frames: list[_Queued] = []
        self._commands: list[_Command] = []
        self._arrivals = 0
        # Taken early by the worker (``take_ahead``) and not yet in hand: still counted as waiting.
        self._ahead: _Queued | None = None
        # Read under the lock by ``get``: a frame arriving just after a pause must not slip through.
        self.paused = False

    def put_frame(self, path: Path, observed: datetime | None, problem: str | None = None) -> None:
        with self._cond:
            self._arrivals += 1
            t = observed.timestamp() if observed else float("inf")
            heapq.heappush(self._frames, _Queued((t, self._arrivals), path, time.time(), problem))
            self._cond.notify()

    def set_paused(self, paused: bool) -> None:
        with self._cond:
            self.paused = paused
            self._cond.notify_all()

    def put_command(self, command: _Command) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def get(self, timeout: float) -> _Queued | _Command | None:
        with self._cond:
            if not self._commands and (self.paused or not self._frames):
                self._cond.wait(timeout)
            if self._commands:
                return self._commands.pop(0)
            if self._frames and not self.paused:
                return heapq.heappop(self._frames)
            return None

    def take_ahead(self) -> _Queued | None:
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

    def put_back(self, item: _Queued) -> None:
        """Return a frame taken early, with its place in the order and its completion time."""
        with self._cond:
            if self._ahead is item:
                self._ahead = None
            heapq.heappush(self._frames, item)
            self._cond.notify()

    def get_command(self) -> _Command | None:
        """The oldest waiting command, if any (not blocking)."""
        with self._cond:
            return self._commands.pop(0) if self._commands else None

    def depth_and_lag(self) -> tuple[int, float]:
        with self._cond:
            waiting = [*self._frames, *([self._ahead] if self._ahead is not None else [])]
            if not waiting:
                return 0, 0.0
            return len(waiting), time.time() - min(q.completed for q in waiting)


class _EventLogHandler(logging.Handler):
    """Turns warnings and errors into ``log`` events."""

    def __init__(self, emit: Callable[[events.Event], None]) -> None:
        super().__init__(level=logging.WARNING)
        self._emit = emit

    def emit(self, record: logging.LogRecord) -> None:
        level = "error" if record.levelno >= logging.ERROR else "warning"
        with contextlib.suppress(events.SchemaError):
            self._emit(events.make_event("log", level=level, message=record.getMessage(),
                                         logger=record.name))


class Daemon:
    """The live stacker: watch, stack, publish, snapshot, checkpoint.

    Parameters
    ----------
    config : Config
    notifier : Notifier, optional
        systemd notifications (default: from the environment; does nothing off systemd).
    listeners : sequence of callables, optional
        Called with every event on the network thread (the demo prints progress this way).

    Notes
    -----
    Use ``start()`` then ``wait()``/``stop()``, or ``run()`` for both. ``request_stop()`` is safe from a
    signal handler.
    """

    def __init__(self, config: Config, notifier: Notifier | None = None,
                 listeners: Sequence[Callable[[events.Event], None]] = ()) -> None:
        self.config = config
        self.watch_dir = config.path(config.watch.folder)
        self.output_dir = config.path(config.output.folder)
        self.state_dir = (config.path(config.state.folder) if config.state.folder
                          else self.output_dir / ".livestack-state")
        self.notifier = notifier or Notifier()
        self.stats = DaemonStats()
        self._listeners = list(listeners)
        self._stop = threading.Event()
        self._stopped = threading.Event()
        # Resolved by stop() once the worker and the writer are gone: control requests stop waiting for them.
        self._closed: Future[None] = Future()
        self._state = "starting"
        self._inbox = _Inbox()
        self._events: queue.Queue[events.Event] = queue.Queue(EVENT_BACKLOG)
        self._writer_jobs: queue.Queue[Callable[[], object] | None] = queue.Queue()
        self._stack_lock = threading.Lock()
        self._heartbeat = time.monotonic()
        self._busy_since: float | None = None
        self._started = time.time()
        self._started_iso = events.utc_now_iso()
        self._threads: list[threading.Thread] = []
        # Reads the next frame while the worker stacks this one (its thread starts with the first job).
        self._readahead = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, initializer=_name_thread, initargs=("livestack-readahead",))
        self._ahead: _Ahead | None = None  # the worker's frame taken early; only the worker touches it
        self._hub: SocketHub | None = None
        self._watcher: watch.Watcher | None = None
        self._journal: Journal | None = None
        self._store: CheckpointStore | None = None
        self._known: dict[tuple[str, int, int], str] = {}
        self._hashes: set[str] = set()
        self._session = 1
        self._checkpointed_session = 1  # session 1, empty, is where a fresh state folder starts anyway
        self._seq = 0
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._since_snapshot = 0
        self._last_snapshot = time.monotonic()
        self._last_preview = 0.0
        self._snapshot_count = 0
        self._log_handler = _EventLogHandler(self._emit)
        self.insecure = False
        self.stacker = self._new_stacker()

    # -- life -----------------------------------------------------------------------------------------

    @property
    def publish_endpoint(self) -> str:
        """The bound PUB endpoint (with the real port when configured as ``*``)."""
        return self._hub.publisher.endpoint if self._hub else self.config.network.publish

    @property
    def control_endpoint(self) -> str:
        """The bound REP endpoint."""
        return self._hub.control.endpoint if self._hub else self.config.network.control

    def start(self) -> None:
        """Open the state folder, bind sockets, recover, and start watching.

        Raises
        ------
        LivestackError
            When the watched folder is missing, the state is unusable or a socket cannot be bound.
        """
        if not self.watch_dir.is_dir():
            raise LivestackError(f"the watched folder {self.watch_dir} does not exist")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        n = self.config.network
        secret = self.config.path(n.server_secret_key) if n.server_secret_key else None
        authorized = self.config.path(n.authorized_keys) if n.authorized_keys else None
        security = Security(server_secret_key=secret, authorized_keys=authorized,
                            insecure_remote=n.insecure_remote)
        self._hub = SocketHub(n.publish, n.control, security)
        self.insecure = self._hub.insecure
        if self.insecure:
            log.warning("INSECURE: sockets bound beyond loopback without CURVE keys; anyone who can reach "
                        "%s and %s can watch and control this daemon", n.publish, n.control)
        logging.getLogger("livestack").addHandler(self._log_handler)
        try:
            self._recover()
        except BaseException:
            self._close_hub()
            logging.getLogger("livestack").removeHandler(self._log_handler)
            raise
        self._spawn("livestack-network", self._network_loop)
        self._spawn("livestack-writer", self._writer_loop)
        self._spawn("livestack-worker", self._worker_loop)
        w = self.config.watch
        ignore_dirs = tuple(p for p in (self.output_dir, self.state_dir) if _inside(p, self.watch_dir))
        self._watcher = watch.Watcher(
            watch.WatchConfig(root=self.watch_dir, patterns=w.patterns, recursive=w.recursive,
                              polling=w.polling, settle=w.settle, poll_interval=w.poll_interval,
                              reconcile_interval=w.reconcile_interval, stale_after=STALE_AFTER,
                              ignore_dirs=ignore_dirs),
            on_frame=self._on_file, on_problem=self._on_problem)
        self._watcher.start()
        self._state = "waiting"
        self.notifier.ready()
        log.info("watching %s; snapshots in %s; events on %s, control on %s", self.watch_dir,
                 self.output_dir, self.publish_endpoint, self.control_endpoint)

    def _remove_stale_temporaries(self) -> None:
        """Snapshot files half-written when the last run was killed (``.stack*.tmp``, ours only)."""
        for stale in self.output_dir.rglob(".stack*.tmp"):
            try:
                stale.unlink()
            except OSError as exc:
                log.warning("cannot remove %s, left by an interrupted snapshot: %s", stale, exc)
            else:
                log.info("removed %s, left by an interrupted snapshot", stale)

    def request_stop(self) -> None:
        """Ask for a clean stop: finish the frame in hand, checkpoint, snapshot, exit (signal-safe)."""
        self._stop.set()
        self._inbox.wake()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until a stop is requested; True if it was."""
        return self._stop.wait(timeout)

    def stop(self) -> None:
        """Stop cleanly: the worker finishes its frame, then the final checkpoint and snapshot are written."""
        if self._stopped.is_set():
            return
        self.request_stop()
        self._state = "stopping"
        self.notifier.stopping()
        if self._watcher is not None:
            self._watcher.stop()
        for t in self._threads:
            if t.name == "livestack-worker":
                t.join()
        # A frame read ahead but not stacked was not journaled: the next start's scan finds it again.
        self._readahead.shutdown(wait=True, cancel_futures=True)
        self._ahead = None
        self._writer_jobs.put(None)
        for t in self._threads:
            if t.name == "livestack-writer":
                t.join()
        # Nothing will answer a request still waiting for the worker or the writer now.
        self._closed.set_result(None)
        self._network_done = True
        for t in self._threads:
            t.join()
        self._close_hub()
        logging.getLogger("livestack").removeHandler(self._log_handler)
        if self._journal is not None:
            self._journal.close()
        self._stopped.set()

    def run(self) -> int:
        """Start, wait for a stop request, stop; the exit status."""
        self.start()
        try:
            while not self.wait(1.0):
                pass
        finally:
            self.stop()
        return 0

    # -- control --------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The ``status`` event's fields."""
        depth, lag = self._inbox.depth_and_lag()
        ref = self.stacker.reference_meta
        if self._stop.is_set():
            state = "stopping"  # the worker may still finish a frame, but it is not "waiting" any more
        elif self._inbox.paused and self._state in ("waiting", "running"):
            state = "paused"
        else:
            state = self._state
        return {"state": state, "queue": depth, "lag": lag, "received": self.stats.received,
                "accepted": self.stats.accepted, "rejected": self.stats.rejected,
                "exptime": self.stacker.exptime, "frames": self.stacker.count,
                "uptime": time.time() - self._started, "started": self._started_iso,
                "watch": str(self.watch_dir), "output": str(self.session_dir), "method": self.stacker.method,
                "object": ref.object if ref else None, "filter": ref.filter if ref else None,
                "session": self._session, "last_latency": self.stats.last_latency, "insecure": self.insecure}

    def handle(self, request: dict[str, Any]) -> bytes:
        """Answer one control request (called on the network thread)."""
        cmd = request["cmd"]
        if cmd == "status":
            return events.ok_reply(**self.status())
        if cmd in ("pause", "resume"):
            self._inbox.set_paused(cmd == "pause")
            log.info("%s by control request", "paused" if cmd == "pause" else "resumed")
            return events.ok_reply(state=self.status()["state"])
        if cmd == "shutdown":
            self.request_stop()
            return events.ok_reply(state="stopping")
        if self._stop.is_set():
            return events.error_reply("the daemon is stopping")
        future: Future[dict[str, Any]] = Future()
        if cmd == "snapshot":
            self._writer_jobs.put(lambda: self._requested_snapshot(future))
        else:
            self._inbox.put_command(_Command(cmd, request, future))
        waited: list[Future[Any]] = [future, self._closed]
        concurrent.futures.wait(waited, timeout=CONTROL_TIMEOUT,
                                return_when=concurrent.futures.FIRST_COMPLETED)
        if not future.done():
            if self._closed.done():
                return events.error_reply(f"the daemon stopped before {cmd} was done")
            return events.error_reply(f"{cmd} did not finish within {CONTROL_TIMEOUT:g} s")
        try:
            return events.ok_reply(**future.result())
        except (LivestackError, OSError) as exc:
            return events.error_reply(str(exc))

    def _requested_snapshot(self, future: Future[dict[str, Any]]) -> None:
        """Writer thread: a snapshot for a control request; a failure is the reply, not a lost request."""
        try:
            future.set_result(self._write_snapshot("request"))
        except (LivestackError, OSError) as exc:
            future.set_exception(exc)

    # -- the worker -----------------------------------------------------------------------------------

    @property
    def session_dir(self) -> Path:
        """Where the current stack's snapshots go: a subfolder per OBJECT when sessions follow objects."""
        ref = self.stacker.reference_meta
        if self.config.stack.new_session_on_object and ref is not None and ref.object:
            return self.output_dir / _safe_name(ref.object)
        return self.output_dir

    def _on_file(self, path: Path) -> None:
        """Watcher callback: queue a complete file in observation order."""
        try:
            observed = read_meta(path, self.config.frames.bayer_pattern or None).time_utc
        except Exception:
            # The time only orders the inbox; the worker rejects a file that cannot be read, with the reason.
            observed = None
        self._inbox.put_frame(path, observed)

    def _on_problem(self, path: Path, reason: str) -> None:
        """Watcher callback: a file stayed incomplete (an interrupted copy); the worker rejects it."""
        self._inbox.put_frame(path, None, problem=f"truncated: {reason}")

    def _worker_loop(self) -> None:
        """Take frames and commands in order; with a backlog, the next frame is read while this one stacks.

        A frame taken early (``_ahead``) is the next in observation order when it is taken: a frame arriving
        afterwards with an earlier DATE-OBS comes after it, as it would if it arrived while that frame was
        being stacked. Commands waiting go before it (a reset or a new reference: it is stacked into the new
        session; its first half does not depend on the stack). A pause puts it back into the inbox, its
        read dropped: it is read again after the resume, in order among whatever arrived meanwhile. A stop
        leaves it unstacked and unjournaled, to be found again by the next start's scan.
        """
        while not self._stop.is_set():
            self._heartbeat = time.monotonic()
            ahead = self._ahead
            front: Future[_Front] | None = None
            if ahead is not None:
                command = self._inbox.get_command()
                if command is not None:
                    self._run_command(command)
                    continue
                self._ahead = None
                if self._inbox.paused:
                    ahead.front.cancel()
                    self._inbox.put_back(ahead.item)
                    continue
                self._inbox.release_ahead()
                item, front = ahead.item, ahead.front
            else:
                got = self._inbox.get(0.5)
                if got is None:
                    self._maybe_checkpoint(idle=True)
                    continue
                if isinstance(got, _Command):
                    self._run_command(got)
                    continue
                item = got
            self._busy_since = time.monotonic()
            try:
                self._take(item, front)
            except (OSError, LivestackError) as exc:
                log.error("%s could not be processed: %s", item.path, exc)
            finally:
                self._busy_since = None
        self._final()

    def _front(self, item: _Queued, stacker: Stacker) -> _Front:
        """Stat, hash and prepare a frame unless it is known or a duplicate by now (any thread).

        On the read-ahead thread this reads ``_known`` and ``_hashes`` while the worker may add to them
        (single lookups, safe); it only skips work, the worker checks again before stacking.
        """
        try:
            st = item.path.stat()
        except FileNotFoundError:
            return _Front(None)
        if (str(item.path), st.st_size, st.st_mtime_ns) in self._known:
            return _Front(st)
        digest = content_hash(item.path)
        if digest in self._hashes:
            return _Front(st, digest)
        return _Front(st, digest, self._prepare(item, stacker))

    def _read_ahead(self) -> None:
        """Worker: take the next waiting frame, if any, and start its first half on the read-ahead thread."""
        if self._ahead is not None or self._stop.is_set():
            return
        item = self._inbox.take_ahead()
        if item is not None:
            self._ahead = _Ahead(item, self._readahead.submit(self._front, item, self.stacker))

    def _take(self, item: _Queued, front: Future[_Front] | None = None) -> None:
        path = item.path
        first = front.result() if front is not None else self._front(item, self.stacker)
        st = first.st
        if st is None:
            log.warning("%s disappeared before it could be stacked", path)
            return
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key in self._known:
            return
        digest = first.digest if first.digest is not None else content_hash(path)
        if digest in self._hashes:  # again: the frame just before this one may have had its content
            self.stats.duplicates += 1
            log.info("%s has the content of a frame already seen; counted once", path.name)
            self._known[key] = digest
            return
        self._state = "running"
        self.stats.received += 1
        seq = self._seq + 1
        self._emit(self._frame_event(seq, path, "received", None, None, item.completed))
        prepared = first.prepared
        if prepared is None:
            prepared = self._prepare(item, self.stacker)
        elif front is not None:
            self.stats.read_ahead += 1
        # While this frame is aligned, warped and accumulated (which release the GIL), read the next one.
        self._read_ahead()
        if isinstance(prepared, Prepared):
            self._maybe_new_session(prepared)
        with self._stack_lock:
            result = self.stacker.commit(prepared)
        self._seq = seq
        self._journal_result(seq, path, st, digest, result, item.completed)
        self._known[key] = digest
        self._hashes.add(digest)
        if result.accepted:
            self.stats.accepted += 1
        else:
            self.stats.rejected += 1
        latency = time.time() - item.completed
        self.stats.last_latency = latency
        self.stats.latencies.append(latency)
        self._emit(self._frame_event(seq, path, result.verdict, result, latency, item.completed))
        if result.accepted:
            self._since_snapshot += 1
            self._since_checkpoint += 1
            self._emit_stack_event()
            self._maybe_snapshot()
        self._maybe_checkpoint(idle=False)
        depth, _ = self._inbox.depth_and_lag()
        if depth == 0:
            self._state = "waiting"

    def _prepare(self, item: _Queued, stacker: Stacker) -> Prepared | FrameResult:
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

    def _journal_result(self, seq: int, path: Path, st: Any, digest: str, result: FrameResult,
                        completed: float) -> None:
        assert self._journal is not None
        q = result.quality
        quality: dict[str, float | int | None] = {} if q is None else {
            "stars": q.stars, "fwhm": _finite(q.fwhm), "ellipticity": _finite(q.ellipticity),
            "background": _finite(q.background), "noise": _finite(q.noise),
            "sharpness": None if result.sharpness is None else _finite(result.sharpness)}
        self._journal.append(JournalEntry(
            seq=seq, path=str(path), size=st.st_size, mtime_ns=st.st_mtime_ns, hash=digest,
            verdict="accepted" if result.accepted else "rejected", reason=result.reason,
            session=self._session,
            transform=[float(v) for v in result.transform.matrix.ravel()] if result.transform else None,
            quality=quality, timings=dict(result.timings), latency=time.time() - completed,
            time=events.utc_now_iso(), reference=result.reference, facts=frame_facts(result)))

    def _maybe_new_session(self, prepared: Prepared) -> None:
        ref = self.stacker.reference_meta
        obj = prepared.frame.meta.object
        if (self.config.stack.new_session_on_object and ref is not None and self.stacker.count > 0
                and obj and ref.object and obj.strip().lower() != ref.object.strip().lower()):
            log.warning("OBJECT changed from %s to %s: starting a new stack", ref.object, obj)
            self._new_session(None)

    def _run_command(self, command: _Command) -> None:
        try:
            if command.name == "reset":
                self._new_session(None)
                command.future.set_result({"session": self._session})
            elif command.name == "set_reference":
                path = Path(command.args["path"])
                self._new_session(path)
                command.future.set_result({"session": self._session, "reference": str(path)})
            else:
                command.future.set_exception(LivestackError(f"unknown command {command.name}"))
        except LivestackError as exc:
            command.future.set_exception(exc)

    def _new_session(self, reference: Path | None) -> None:
        """Close the current stack (final snapshot) and start an empty one."""
        fresh = self._new_stacker(session=self._session + 1)
        if reference is not None:
            problem = fresh.use_reference(reference)
            if problem:
                raise LivestackError(f"{reference} cannot be the reference: {problem}")
        if self.stacker.count > 0:
            self._queue_snapshot("session end")
        old = self.stacker
        with self._stack_lock:
            self.stacker = fresh
            self._session += 1
        self._since_snapshot = 0
        self._checkpoint()
        # After the old stack's last snapshot and the new session's checkpoint (the writer runs jobs in
        # order): the old median cube is no longer needed by anything.
        self._writer_jobs.put(old.discard)
        self._emit_stack_event()
        log.info("session %d started%s", self._session, f" with reference {reference}" if reference else "")

    def _final(self) -> None:
        self._checkpoint()
        if self.stacker.count > 0:
            self._queue_snapshot("shutdown")

    # -- snapshots, previews, checkpoints -------------------------------------------------------------

    def _maybe_snapshot(self) -> None:
        o = self.config.output
        due_frames = o.every_frames > 0 and self._since_snapshot >= o.every_frames
        due_time = o.every_seconds > 0 and time.monotonic() - self._last_snapshot >= o.every_seconds
        if due_frames or due_time:
            self._queue_snapshot("interval")

    def _queue_snapshot(self, reason: str) -> None:
        self._since_snapshot = 0
        self._last_snapshot = time.monotonic()
        stacker, session_dir, session = self.stacker, self.session_dir, self._session
        self._writer_jobs.put(lambda: self._write_snapshot(reason, stacker, session_dir, session))

    def _write_snapshot(self, reason: str, stacker: Stacker | None = None,
                        folder: Path | None = None, session: int | None = None) -> dict[str, Any]:
        """Writer thread: compute the stack under the lock, write FITS and picture outside it."""
        if stacker is None or folder is None or session is None:
            with self._stack_lock:  # the worker swaps the stacker and the session together under this lock
                stacker, folder, session = self.stacker, self.session_dir, self._session
        with self._stack_lock:
            image = stacker.result()
            info = stacker.info()
        if image is None or info.ncombine == 0:
            raise LivestackError("the stack is empty: nothing to snapshot yet")
        folder.mkdir(parents=True, exist_ok=True)
        fits_path = folder / "stack.fits"
        suffix = ".jpg" if self.config.output.image_format == "jpeg" else ".png"
        image_path = folder / f"stack{suffix}"
        write_fits(fits_path, image, info)
        write_preview(image_path, image, flatten=self.config.output.flatten_background,
                      surface=stacker.path == "surface")
        if self.config.output.history:
            self._snapshot_count += 1
            history = folder / "history"
            history.mkdir(exist_ok=True)
            stem = f"stack-{info.ncombine:04d}"
            write_fits(history / f"{stem}.fits", image, info)
            write_preview(history / f"{stem}{suffix}", image, flatten=self.config.output.flatten_background,
                          surface=stacker.path == "surface")
        self._emit(events.make_event("snapshot", fits=str(fits_path), image=str(image_path),
                                     frames=info.ncombine, session=session, reason=reason))
        return {"fits": str(fits_path), "image": str(image_path), "frames": info.ncombine}

    def _emit_stack_event(self) -> None:
        interval = self.config.network.preview_interval
        now = time.monotonic()
        if interval > 0 and self.stacker.count > 0 and now - self._last_preview >= interval:
            self._last_preview = now
            stacker = self.stacker
            self._writer_jobs.put(lambda: self._emit(self._stack_event(stacker, with_preview=True)))
        else:
            self._emit(self._stack_event(self.stacker, with_preview=False))

    def _stack_event(self, stacker: Stacker, with_preview: bool) -> events.Event:
        preview = None
        snr = None
        if with_preview:
            with self._stack_lock:
                image = stacker.result()
            if image is not None:
                preview = preview_array(image, max_side=self.config.network.preview_size,
                                        flatten=self.config.output.flatten_background,
                                        surface=stacker.path == "surface")
                snr = stacker.snr(image)
        info = stacker.info()
        return events.make_event(
            "stack", preview=preview, frames=info.ncombine, exptime=info.exptime, method=info.method,
            rejected_fraction=float(stacker.rejected_fraction), snr=snr, object=info.object,
            filter=info.filter, reference=info.reference, session=self._session)

    def _maybe_checkpoint(self, idle: bool) -> None:
        s = self.config.state
        if self._since_checkpoint == 0:
            return
        if (self._since_checkpoint >= s.checkpoint_every_frames
                or time.monotonic() - self._last_checkpoint >= s.checkpoint_every_seconds or idle):
            self._checkpoint()

    def _checkpoint(self) -> None:
        """Copy the stack's state now (consistent with the journal) and let the writer save it."""
        assert self._store is not None
        with self._stack_lock:
            arrays, meta = self.stacker.checkpoint()  # copies of the accumulators' arrays
        meta = {**meta, "session": self._session}
        seq, session, store = self._seq, self._session, self._store
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        if not arrays:
            if session == self._checkpointed_session:
                return  # an empty stack, and its session is on disk already: nothing the journal lacks
            # A new, still empty session (a reset): record it, or a restart would resume the old stack.
            arrays = _EMPTY_STACK
        self._checkpointed_session = session
        self._writer_jobs.put(lambda: store.save(seq, session, arrays, meta))

    def _writer_loop(self) -> None:
        while True:
            job = self._writer_jobs.get()
            if job is None:
                return
            try:
                job()
            except LivestackError as exc:
                log.warning("%s", exc)
            except OSError as exc:
                log.error("could not write to disk: %s", exc)
            except ValueError as exc:
                log.error("a snapshot or checkpoint failed: %s", exc, exc_info=True)

    # -- recovery -------------------------------------------------------------------------------------

    def _recover(self) -> None:
        self._journal = Journal(self.state_dir / "journal.jsonl")
        self._store = CheckpointStore(self.state_dir / "checkpoints")
        entries = self._journal.entries()
        for e in entries:
            self._known[(e.path, e.size, e.mtime_ns)] = e.hash
            self._hashes.add(e.hash)
            self.stats.received += 1
            if e.verdict == "accepted":
                self.stats.accepted += 1
            else:
                self.stats.rejected += 1
        self._seq = max((e.seq for e in entries), default=0)
        plan = recover(self._journal, self._store)
        # The plan's session, not only the checkpoint's: after a reset whose empty checkpoint a crash
        # prevented, the journal may already be in the new session with nothing accepted to replay; going
        # on in the old one would make every later journal line "older than the session before it".
        self._session = max(plan.session, self._session)
        if plan.checkpoint is not None or self._session != 1:
            self.stacker = self._new_stacker(session=self._session)
        if plan.checkpoint is not None:
            arrays = self._store.load(plan.checkpoint)
            self.stacker.restore(arrays, plan.checkpoint.meta)
        replayed = 0
        for entry in plan.replay:
            if entry.session != self._session:
                self._session = entry.session
                self.stacker = self._new_stacker(session=self._session)
            path = Path(entry.path)
            try:
                same = content_hash(path) == entry.hash
            except OSError:
                same = False
            if not same:
                log.error("%s was stacked before the restart but is gone or changed; the stack lacks it",
                          path)
                continue
            result = self.stacker.process(path)
            if not result.accepted:
                log.error("%s was accepted before the restart but not now: %s", path, result.reason)
            replayed += 1
        if plan.checkpoint is not None or replayed:
            log.info("resumed session %d: %d frames from the checkpoint, %d stacked again from files",
                     self._session, self.stacker.count - replayed, replayed)
            self._checkpoint_now()
        workdir = self.stacker.workdir
        if plan.checkpoint is None and self.config.stack.method == "median" and workdir and workdir.is_dir():
            # A crash before the session's first checkpoint leaves a median cube that nothing names: its
            # frames were just stacked again into a new cube. Left alone, each such crash costs the disk up
            # to checkpoint_every_frames frames.
            current = self.stacker.checkpoint()[1].get("acc_text", {}).get("cube")
            for stray in workdir.glob("median-*.cube"):
                if stray.name != current:
                    try:
                        stray.unlink()
                    except OSError as exc:
                        log.warning("cannot remove %s, a median cube no checkpoint names: %s", stray, exc)
                    else:
                        log.info("removed %s, a median cube no checkpoint names (left by a crash)", stray)

    def _checkpoint_now(self) -> None:
        assert self._store is not None
        arrays, meta = self.stacker.checkpoint()
        self._store.save(self._seq, self._session, arrays or _EMPTY_STACK, {**meta, "session": self._session})
        self._checkpointed_session = self._session

    def _new_stacker(self, session: int = 1) -> Stacker:
        workdir = self.state_dir / "work" / f"session-{session}"
        if self.config.stack.method == "median":
            workdir.mkdir(parents=True, exist_ok=True)
        return Stacker(self.config, workdir=workdir)

    # -- the network thread ---------------------------------------------------------------------------

    _network_done = False

    def _network_loop(self) -> None:
        assert self._hub is not None
        hub = self._hub
        next_status = 0.0
        ping = watchdog_interval()
        next_ping = 0.0
        while True:
            hub.control.poll_once(self._safe_handle, timeout_ms=NETWORK_POLL_MS)
            self._drain_events(hub)
            now = time.monotonic()
            if now >= next_status:
                next_status = now + STATUS_PERIOD
                status = self.status()
                self._publish(hub, events.make_event("status", **status))
                self.notifier.status(_status_line(status))
            if ping is not None and now >= next_ping and self._healthy():
                next_ping = now + ping
                self.notifier.watchdog()
            if self._network_done:
                self._drain_events(hub)
                self._publish(hub, events.make_event("status", **self.status()))
                return

    def _safe_handle(self, request: dict[str, Any]) -> bytes:
        try:
            return self.handle(request)
        except (LivestackError, ValueError, KeyError) as exc:
            return events.error_reply(str(exc))

    def _healthy(self) -> bool:
        """The pipeline's own health: the worker looped recently, or is inside one frame."""
        now = time.monotonic()
        if self._stop.is_set():
            return True
        if not all(t.is_alive() for t in self._threads if t.name == "livestack-writer"):
            return False  # no more snapshots or checkpoints: let systemd restart us
        if now - self._heartbeat < HEARTBEAT_LIMIT:
            return True
        busy = self._busy_since
        return busy is not None and now - busy < HEARTBEAT_LIMIT * 4

    def _drain_events(self, hub: SocketHub) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            self._publish(hub, event)

    def _publish(self, hub: SocketHub, event: events.Event) -> None:
        hub.publisher.send(event)
        for listener in self._listeners:
            listener(event)

    def _emit(self, event: events.Event) -> None:
        try:
            self._events.put_nowait(event)
        except queue.Full:
            with contextlib.suppress(queue.Empty):
                self._events.get_nowait()
            with contextlib.suppress(queue.Full):
                self._events.put_nowait(event)

    def _frame_event(self, seq: int, path: Path, verdict: str, result: FrameResult | None,
                     latency: float | None, completed: float) -> events.Event:
        meta = result.meta if result else None
        q = result.quality if result else None
        t = result.transform if result else None
        transform = None
        if t is not None and meta is not None:
            dx, dy = t.centre_shift(meta.shape)
            transform = {"matrix": t.matrix.tolist(), "dx": dx, "dy": dy,
                         "rotation": t.rotation, "scale": t.scale, "inliers": t.inliers, "rms": t.rms,
                         "method": t.method}
        return events.make_event(
            "frame", seq=seq, path=str(path), name=path.name, verdict=verdict,
            reason=result.reason if result else None,
            date_obs=meta.time_utc.isoformat() if meta and meta.time_utc else None,
            exptime=meta.exptime if meta else None, object=meta.object if meta else None,
            filter=meta.filter if meta else None, stars=q.stars if q else None,
            fwhm=_finite(q.fwhm) if q else None, ellipticity=_finite(q.ellipticity) if q else None,
            background=_finite(q.background) if q else None, noise=_finite(q.noise) if q else None,
            sharpness=_finite(result.sharpness) if result and result.sharpness is not None else None,
            transform=transform, timings=dict(result.timings) if result else {},
            latency=latency, session=self._session)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _close_hub(self) -> None:
        if self._hub is not None:
            self._hub.close()
            self._hub = None


#: What a checkpoint of an empty stack holds (the store wants at least one array; ``meta`` says empty).
_EMPTY_STACK = {"empty": np.zeros(1, dtype=np.uint8)}


def _name_thread(name: str) -> None:
    threading.current_thread().name = name


def _status_line(status: dict[str, Any]) -> str:
    return (f"{status['state']}: {status['frames']} stacked, {status['rejected']} rejected, "
            f"queue {status['queue']}")


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", text.strip()).strip("._")
    return name or "object"


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True

