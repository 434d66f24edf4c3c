"""Daemon: starts and stops the threads that watch, stack, write and publish; one owner per thread's state.

Threads, each with one job, talking through queues (values crossing them are immutable or copies):

- the watcher (``watch.Watcher``) hands complete files to the inbox (``inbox.Inbox``);
- the worker (``worker.Worker``) takes frames from the inbox in observation order, de-duplicates them by
  content against the journal, runs them through ``pipeline.Stacker``, journals the verdict, and queues
  events, snapshots and checkpoints; it is the only thread that changes the stack (``stacks.Stacks``);
- the read-ahead thread (``livestack-readahead``, the worker's), when frames are waiting, hashes and reads the
  next one and finds its stars while the worker aligns, warps and accumulates the current one;
- the writer (``writer.Writer``) computes and writes snapshots, previews and checkpoints, off the critical
  path, in the order the worker asked for them (``writer.Outputs``);
- the network thread (``network.Network``) publishes events (never blocking), answers control requests,
  sends ``status`` every second and pings systemd's watchdog while the worker's heartbeat is fresh.

Exactly once: a frame is journaled (fsync) right after it is stacked; checkpoints hold the accumulators as of
a journal sequence number. On start the last checkpoint is loaded and the accepted frames journaled after it
are stacked again from their files, in order (``recovery.resume``); anything never journaled is simply new.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from livestack import events
from livestack.config import Config
from livestack.errors import LivestackError
from livestack.live import watch
from livestack.live.health import Health
from livestack.live.inbox import Command, Inbox
from livestack.live.net import Security, SocketHub
from livestack.live.network import EventQueue, Network
from livestack.live.notify import Notifier
from livestack.live.photometry import Photometry
from livestack.live.recovery import resume
from livestack.live.removal import Removals
from livestack.live.reports import filter_list
from livestack.live.solver import Solver
from livestack.live.stacks import Stacks
from livestack.live.state import CheckpointStore, Journal
from livestack.live.warmup import warm_up
from livestack.live.worker import DaemonStats, Worker
from livestack.live.writer import Outputs, Writer
from livestack.pipeline import Stacker
from livestack.stages.frames import read_meta
from livestack.stages.stack import load_compiled

__all__ = ["Daemon", "DaemonStats"]

log = logging.getLogger("livestack.live.daemon")

#: The worker's heartbeat older than this (seconds, beyond a frame in hand) stops systemd watchdog pings.
HEARTBEAT_LIMIT = 30.0
#: Seconds a control request waits for the worker or writer before replying with an error.
CONTROL_TIMEOUT = 20.0
#: Seconds a frame file may stay incomplete, unchanged and not closed by its writer before it is rejected as
#: truncated (a writer that hung; one its writer closed short is rejected at once); if it grows again later it
#: is taken as a new file.
STALE_AFTER = 120.0


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
        self.insecure = False
        self._listeners = list(listeners)
        self._stop = threading.Event()
        self._stopped = threading.Event()
        # Resolved by stop() once the worker and the writer are gone: control requests stop waiting for them.
        self._closed: Future[None] = Future()
        self._state = "starting"
        self._started = time.time()
        self._started_iso = events.utc_now_iso()
        self._threads: list[threading.Thread] = []
        self._events = EventQueue()
        # Held until the watcher has delivered the files already there: that backlog is stacked in
        # observation order, not from whichever file the scan found first.
        self._inbox = Inbox(held=True)
        self._writer = Writer()
        self._health = Health()
        self.stacks = Stacks(config, self.state_dir, self.output_dir)
        self._hub: SocketHub | None = None
        self._watcher: watch.Watcher | None = None
        self._warm: threading.Thread | None = None
        self._journal: Journal | None = None
        self._outputs: Outputs | None = None
        self._worker: Worker | None = None
        self._removals: Removals | None = None
        self._network: Network | None = None
        self._photometry = Photometry(config, self._events.emit)
        self._solver = Solver(config, self.stacks.lock, self._events.emit)
        self._log_handler = _EventLogHandler(self._events.emit)

    # -- what others read -----------------------------------------------------------------------------

    @property
    def publish_endpoint(self) -> str:
        """The bound PUB endpoint (with the real port when configured as ``*``)."""
        return self._hub.publisher.endpoint if self._hub else self.config.network.publish

    @property
    def control_endpoint(self) -> str:
        """The bound REP endpoint."""
        return self._hub.control.endpoint if self._hub else self.config.network.control

    @property
    def stacker(self) -> Stacker:
        """The current stack."""
        return self.stacks.stacker

    @property
    def session_dir(self) -> Path:
        """Where the current stack's snapshots go: a subfolder per OBJECT when sessions follow objects."""
        return self.stacks.summary.folder

    @property
    def stats(self) -> DaemonStats:
        """The worker's counters (empty before recovery)."""
        return self._worker.stats if self._worker is not None else DaemonStats()

    # -- life -----------------------------------------------------------------------------------------

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
            worker = self._recover()
            load_compiled()  # before READY: numba's first-call loading is no frame's wait
        except BaseException:
            self._close_hub()
            logging.getLogger("livestack").removeHandler(self._log_handler)
            raise
        network = Network(self._hub, self._events, self._safe_handle, self.status, self._healthy,
                          self.notifier, self._listeners)
        self._network = network
        self._spawn("livestack-network", network.run)
        self._spawn("livestack-writer", self._writer.run)
        self._spawn("livestack-worker", worker.run)
        self._photometry.start()
        self._solver.start()
        w = self.config.watch
        if w.warm_up:
            # Before the watch starts, on a thread of its own: the first frame no longer pays for first calls,
            # and nothing waits for it.
            self._warm = threading.Thread(target=self._warm_up, name="livestack-warm-up", daemon=True)
            self._warm.start()
        ignore_dirs = tuple(p for p in (self.output_dir, self.state_dir) if _inside(p, self.watch_dir))
        self._watcher = watch.Watcher(
            watch.WatchConfig(root=self.watch_dir, patterns=w.patterns, recursive=w.recursive,
                              polling=w.polling, settle=w.settle, poll_interval=w.poll_interval,
                              reconcile_interval=w.reconcile_interval, stale_after=STALE_AFTER,
                              ignore_dirs=ignore_dirs, follow_symlinks=w.follow_symlinks),
            on_frame=self._on_file, on_problem=self._on_problem, on_scanned=self._inbox.scanned)
        self._watcher.start()
        self._state = "running"
        self.notifier.ready()
        network.ready.set()
        log.info("watching %s; snapshots in %s; events on %s, control on %s", self.watch_dir,
                 self.output_dir, self.publish_endpoint, self.control_endpoint)

    def _recover(self) -> Worker:
        """Open the journal and checkpoints, rebuild the stack, and make the worker (not yet running)."""
        self._journal = Journal(self.state_dir / "journal.jsonl")
        store = CheckpointStore(self.state_dir / "checkpoints")
        self._outputs = Outputs(self.config, self.stacks, store, self._writer, self._events.emit,
                                self._health)
        memory = resume(self.config, self._journal, store, self.stacks, self._outputs)
        removals = Removals(self.config, self._journal, self.stacks, self._events.emit, self._post,
                            self._outputs.stack_changed)
        self._removals = removals
        self._outputs.frame_rows = removals.rows
        self._worker = Worker(self.config, self._inbox, self.stacks, self._outputs, self._journal, memory,
                              self._events.emit, self._stop, self._photometry, removals,
                              self._health, self._solver)
        # A removal the stop interrupted finishes now (a re-integration asks the worker to switch once it
        # runs).
        removals.resume()
        return self._worker

    def _post(self, name: str, args: dict[str, Any]) -> None:
        """Queue an internal command for the worker (a finished re-integration asks it to switch stacks)."""
        self._inbox.put_command(Command(name, args, Future()))

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
        if self._warm is not None:
            self._warm.join()  # it looks at the stop between frames
        self._join("livestack-worker")
        if self._removals is not None:
            self._removals.close()  # a re-integration under way is done again by the next start
        if self._worker is not None:
            self._worker.close()
        self._writer.close()
        self._join("livestack-writer")
        self._photometry.stop()  # the last points measured and published, the light curves written
        self._solver.stop()
        # Nothing will answer a request still waiting for the worker or the writer now.
        self._closed.set_result(None)
        if self._network is not None:
            self._network.finish()
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
        stack = self.stacks.summary
        stats = self.stats
        worker_state = self._worker.state if self._worker is not None else "waiting"
        failed, stalled = self._health.failed or self._dead_threads(), self._health.stalled
        if failed:
            state = "failed"  # for good: systemd's watchdog is no longer fed, a restart is due
        elif self._stop.is_set():
            state = "stopping"  # the worker may still finish a frame, but it is not "waiting" any more
        elif self._state != "running":
            state = self._state
        elif stalled:
            state = "stalled"
        elif self._inbox.paused:
            state = "paused"
        else:
            state = worker_state
        return {"state": state, "queue": depth, "lag": lag, "received": stats.received,
                "accepted": stats.accepted, "rejected": stats.rejected,
                "exptime": stack.exptime, "frames": stack.frames,
                "uptime": time.time() - self._started, "started": self._started_iso,
                "watch": str(self.watch_dir), "output": str(stack.folder), "method": stack.method,
                "object": stack.object, "filter": stack.filter,
                "session": stack.session, "last_latency": stats.last_latency, "insecure": self.insecure,
                "problem": failed or stalled, "filters": filter_list(stack.filters),
                "choosing": self._worker.choosing() if state == "choosing" and self._worker else None}

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
            outputs = self._outputs
            assert outputs is not None
            self._writer.submit(lambda: outputs.requested_snapshot(future))
        else:
            self._inbox.put_command(Command(cmd, request, future))
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
        except Exception as exc:
            return events.error_reply(f"{cmd} failed ({type(exc).__name__}: {exc})")

    def _safe_handle(self, request: dict[str, Any]) -> bytes:
        """``handle`` for the network thread: whatever goes wrong is the reply, never the thread's end."""
        try:
            return self.handle(request)
        except (LivestackError, ValueError, KeyError) as exc:
            return events.error_reply(str(exc))
        except Exception as exc:
            log.error("a control request failed: %s", exc, exc_info=True)
            return events.error_reply(f"the request failed ({type(exc).__name__}: {exc})")

    def _healthy(self) -> bool:
        """The pipeline's own health: no thread died, the worker looped recently or is inside one frame."""
        now = time.monotonic()
        if self._stop.is_set():
            return True
        if self._health.failed or self._dead_threads():
            return False  # let systemd restart us
        worker = self._worker
        if worker is None or now - worker.heartbeat < HEARTBEAT_LIMIT:
            return True
        busy = worker.busy_since
        return busy is not None and now - busy < HEARTBEAT_LIMIT * 4

    def _dead_threads(self) -> str | None:
        """Essential threads that ended although no stop was asked for (their exception is in the log)."""
        if self._stop.is_set() or self._state != "running":
            return None
        dead = [t.name for t in self._threads if not t.is_alive()]
        if self._watcher is not None and not self._watcher.alive:
            dead.append("livestack-watch")
        return "; ".join(f"the {name} thread ended" for name in dead) or None

    # -- the watcher's callbacks ----------------------------------------------------------------------

    def _on_file(self, path: Path, completed: float) -> None:
        """Watcher callback: queue a complete file in observation order, with when it was known whole."""
        try:
            meta = read_meta(path, self.config.frames.bayer_pattern or None)
            observed, target = meta.time_utc, meta.object
        except Exception:
            # The time only orders the inbox; the worker rejects a file that cannot be read, with the reason.
            observed, target = None, None
        try:
            mtime_ns = path.stat().st_mtime_ns
        except OSError:
            mtime_ns = 0
        self._inbox.put_frame(path, observed, completed=completed, mtime_ns=mtime_ns, object=target)

    def _on_problem(self, path: Path, reason: str) -> None:
        """Watcher callback: a file that cannot be a frame as it is (truncated, not a regular file ...)."""
        self._inbox.put_frame(path, None, problem=reason)

    # -- threads --------------------------------------------------------------------------------------

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        t = threading.Thread(target=self._supervised, args=(name, target), name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _supervised(self, name: str, target: Callable[[], None]) -> None:
        """A thread's body: an exception that escapes its loop is logged with its traceback and recorded,
        so that ``status`` names the thread and the watchdog stops being fed."""
        try:
            target()
        except BaseException as exc:
            log.critical("the %s thread died: %s", name, exc, exc_info=True)
            self._health.died(name, f"{type(exc).__name__}: {exc}")

    def _warm_up(self) -> None:
        """The warm-up thread's body: a failure costs the first frame its first calls, nothing else."""
        try:
            seconds = warm_up(self.config, self.state_dir / "warm-up", self._stop)
        except Exception as exc:
            log.warning("the warm-up failed (%s: %s); the first frame makes the first calls",
                        type(exc).__name__, exc, exc_info=True)
        else:
            log.info("warmed up in %.1f s", seconds)

    def _join(self, name: str) -> None:
        for t in self._threads:
            if t.name == name:
                t.join()

    def _close_hub(self) -> None:
        if self._hub is not None:
            self._hub.close()
            self._hub = None


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True
