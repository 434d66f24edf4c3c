"""Watch: decide which files in a watched folder are whole frames, and hand each over exactly once.

Capture programs write a FITS file per exposure in many ways: in place and slowly (over a network share),
to a temporary name renamed at the end, into dated subfolders made during the night. This module turns
all of them into one stream of "this file is complete" calls.

Public API:

- ``check_fits(path) -> FitsCheck``: is this file a complete FITS file (``COMPLETE``), one still being
  written (``INCOMPLETE``, wait), or not FITS at all (``INVALID``)? Reads headers only (plus, for gzip,
  the whole compressed stream). It lives in ``stages.fitscheck`` (the reader uses it too) and is
  re-exported here with ``fits_complete``, ``FitsCheck`` and ``FitsState``.
- ``WatchConfig``: frozen settings of one watch (folder, patterns, ignores, timings).
- ``Watcher(config, on_frame, on_problem=None)``: ``start()``, ``stop()``, context manager.

When a file is whole
--------------------
A file is handed to ``on_frame(path, completed)`` when ``check_fits`` says ``COMPLETE`` and one of these
says the writer is done with it:

- the writer closed it after writing (inotify's close-after-write, watchdog's ``FileClosedEvent``), or
  renamed it into its name (temp-then-rename, rsync). A metadata-only change after that (the chmod that
  ends ``shutil.copy`` and many copy tools and SMB servers, the utime of ``cp -p``) does not undo it;
- it appeared at once: moved in from outside the watched folder (``mv`` from beside it), or found in a
  folder that appeared (a new subfolder, the watched folder deleted and made again or swapped with ``mv``);
- its size and mtime stayed unchanged for ``settle`` seconds: polling mode (where no event proves the writer
  is done), and the fallback for files that never get a close event (e.g. written over a share).

``completed`` (wall clock, ``time.time()``) is the earliest moment the file was known whole: the time of
the close or rename event, the time it appeared; when it settled, the last change of the file (its ctime,
which every write, chmod and utime sets, bounded by when the watcher first saw that version). The daemon's
``latency`` starts there.

A file that is not FITS at all (``INVALID``: text, garbage) is delivered too once its size and mtime have
been unchanged for ``settle`` seconds, so the daemon's reader rejects it with a reason that gets journaled.

``on_problem(path, reason)`` is called once for what cannot become a frame as it is: a file its writer
closed (or renamed into place) while shorter than its header announces, at once ("truncated: ..."; if it
grows later and is closed again it is delivered); a file that stays ``INCOMPLETE`` and unchanged for
``stale_after`` seconds (an empty file too: some programs create it, close it, then write it); anything
named like a frame that is not a regular file (a FIFO, a device, a folder), a symbolic link to nothing or
in a loop, or one leading outside the watched folder (unless ``follow_symlinks``); a file that cannot be
read. Such files are never opened. They are left alone until they change.

The watched folder replaced
---------------------------
When the watched folder is deleted and made again, or another folder is moved to its path, the watcher
notices within milliseconds (a watch on its parent folder) or at most ``ROOT_CHECK`` seconds (a look at
the folder's identity, which also covers polling), starts watching the new folder, and takes what it
holds as files moved in.

Exactly once
------------
Each ``(path, size, mtime)`` is delivered at most once per ``Watcher``. A metadata-only change after the
delivery (a copy tool's final chmod or utime, a ``touch``) is the same content and is not delivered again
(with OS events; when polling nothing tells a utime from a write, and one made while the watcher has not yet
read the write's own events can look like a rewrite: the daemon's content hash drops such a repeat). A file
re-written later with a different size or mtime is delivered again (the daemon's journal dedupes by content
hash, across restarts too). Files present at start are delivered first, ordered by mtime then path; the daemon
re-orders by DATE-OBS if it wants to. A reconcile scan every ``reconcile_interval`` seconds picks up any file
the events missed (an inotify queue overflow, a remount, a share that dropped and came back).

Threads
-------
watchdog's observer threads only put events in a queue. One worker thread owns all state: it waits on that
queue with a timeout (the next due check, reconcile or look at the folder), checks candidates, re-arms the
observer when the folder is replaced, and calls the callbacks. The callbacks therefore run on the worker
thread and must be quick (the daemon puts the path in a queue).
"""

from __future__ import annotations

import enum
import errno
import fnmatch
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Self

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from livestack.errors import ConfigError
from livestack.stages.fitscheck import BLOCK_SIZE, FitsCheck, FitsState, check_fits, fits_complete
from livestack.stages.frames import FITS_SUFFIXES

__all__ = [
    "BLOCK_SIZE",
    "DEFAULT_IGNORE",
    "DEFAULT_PATTERNS",
    "FitsCheck",
    "FitsState",
    "WatchConfig",
    "Watcher",
    "check_fits",
    "fits_complete",
]

log = logging.getLogger(__name__)

#: File name patterns that are frames: every ending of ``FITS_SUFFIXES`` (matched case-insensitively).
DEFAULT_PATTERNS: tuple[str, ...] = tuple(f"*{suffix}" for suffix in FITS_SUFFIXES)

#: Names never delivered, matched case-insensitively against every part of the path below the root:
#: temporary files, dot files and folders, editor and capture-program tilde files.
DEFAULT_IGNORE: tuple[str, ...] = ("*.tmp", "*.part", ".*", "~*", "*~")

@dataclass(frozen=True)
class WatchConfig:
    """Settings of one watch.

    Attributes
    ----------
    root : Path
        The folder the capture program writes into.
    patterns : tuple of str
        Glob patterns (``fnmatch``) on file names that are frames, case-insensitive.
    recursive : bool
        Also watch subfolders, including ones made after the start.
    ignore : tuple of str
        Glob patterns, case-insensitive, matched against every part of a path below ``root``: a matching
        file is never delivered, a matching folder is not entered.
    ignore_dirs : tuple of Path
        Folders never entered, such as the daemon's own output and state folders when they lie inside
        ``root``.
    polling : bool
        Poll the folder (watchdog's PollingObserver) instead of OS events: for network shares, where
        inotify sees nothing of what other machines write.
    settle : float
        Seconds a file's size and mtime must stay unchanged before it is checked when no close event says
        the writer is done (polling mode, shares, files that are not FITS).
    poll_interval : float
        Seconds between polls in polling mode, and between re-checks of files still being written.
    reconcile_interval : float
        Seconds between full scans that deliver complete files the events missed.
    stale_after : float
        Seconds a file may stay incomplete and unchanged before it is reported to ``on_problem``.
    follow_symlinks : bool
        Follow symbolic links that lead outside ``root``; links inside it are always followed.
    """

    root: Path
    patterns: tuple[str, ...] = DEFAULT_PATTERNS
    recursive: bool = True
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    ignore_dirs: tuple[Path, ...] = ()
    polling: bool = False
    settle: float = 2.0
    poll_interval: float = 1.0
    reconcile_interval: float = 30.0
    stale_after: float = 120.0
    follow_symlinks: bool = False

    def __post_init__(self) -> None:
        # Normalise once at the boundary so that every path compared later is absolute and every
        # sequence is a tuple (the value must stay hashable and immutable across threads).
        object.__setattr__(self, "root", Path(os.path.abspath(self.root)))
        object.__setattr__(self, "patterns", tuple(self.patterns))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        object.__setattr__(self, "ignore_dirs", tuple(Path(os.path.abspath(d)) for d in self.ignore_dirs))
        if not self.patterns:
            raise ConfigError("watch patterns must name at least one file pattern.")
        if self.settle < 0:
            raise ConfigError(f"watch settle must be 0 seconds or more, not {self.settle}.")
        for name in ("poll_interval", "reconcile_interval", "stale_after"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"watch {name} must be more than 0 seconds, not {value}.")


class Watcher:
    """Watch a folder and call ``on_frame`` once for each complete frame (see the module docstring).

    Parameters
    ----------
    config : WatchConfig
    on_frame : callable
        ``on_frame(path, completed)``, called on the watcher's thread for each complete (or not-FITS) file;
        ``completed`` is the wall-clock time (``time.time()``) from which the file was known whole (see
        "When a file is whole" in the module docstring). Must return quickly. An exception it raises is
        logged and the file still counts as delivered.
    on_problem : callable, optional
        ``on_problem(path, reason)``, called once for a file that cannot become a frame as it is: closed by
        its writer while shorter than its header says, incomplete and unchanged for ``stale_after``
        seconds, unreadable, not a regular file, or a symbolic link that leads nowhere or outside the
        folder. ``reason`` is one sentence without the path. Logged as a warning when not given.
    on_scanned : callable, optional
        ``on_scanned()``, called once on the watcher's thread when the initial scan has delivered every
        file that was already whole at start, so that the daemon can order that backlog before it stacks
        any of it.
    """

    def __init__(
        self,
        config: WatchConfig,
        on_frame: Callable[[Path, float], None],
        on_problem: Callable[[Path, str], None] | None = None,
        on_scanned: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self._on_frame = on_frame
        self._on_problem = on_problem
        self._on_scanned = on_scanned
        self._matcher = _Matcher(config)
        self._events: queue.Queue[_Item] = queue.Queue()
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        # Created by start(), then owned by the worker thread (which re-arms them) until stop() joins it.
        self._observer: BaseObserver | None = None
        self._parent_observer: BaseObserver | None = None
        # Owned by the worker thread only.
        self._root_id: tuple[int, int] | None = None
        self._real_root = Path(os.path.realpath(config.root))
        self._pending: dict[Path, _Candidate] = {}
        self._delivered: set[tuple[Path, int, int]] = set()
        self._last_delivered: dict[Path, tuple[int, int]] = {}  # the version of each path delivered last
        self._reported: set[tuple[Path, int, int]] = set()

    def start(self) -> None:
        """Start watching: deliver the files already there (oldest first), then new ones as they complete.

        Returns at once; the initial scan runs on the watcher's thread.

        Raises
        ------
        ConfigError
            When the root is not a folder.
        RuntimeError
            When the watcher was started before.
        """
        if self._worker is not None:
            raise RuntimeError("a Watcher can be started only once.")
        root = self.config.root
        if not root.is_dir():
            raise ConfigError(f"watch folder {root} does not exist or is not a folder.")
        # Events first, scan second: a file written in between is seen twice and delivered once.
        self._parent_observer = self._start_parent_observer()
        self._arm()
        self._worker = threading.Thread(target=self._run, name="livestack-watch", daemon=True)
        self._worker.start()

    @property
    def alive(self) -> bool:
        """Whether the watcher's thread runs (False before ``start``, after ``stop``, or if it died)."""
        return self._worker is not None and self._worker.is_alive()

    def stop(self) -> None:
        """Stop watching and join every thread. Safe to call more than once."""
        self._stopping.set()
        if self._worker is not None:
            self._events.put(_STOP)
            self._worker.join()
        # After the worker: it is the one that replaces the observer when the folder is replaced.
        for observer in (self._observer, self._parent_observer):
            if observer is not None:
                observer.stop()
                observer.join()
        self._observer = self._parent_observer = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- event side (watchdog's dispatcher thread): classify and queue, nothing else ------------------

    def _event(self, kind: _Kind, path: Path) -> None:
        """Queue one filtered event for the worker, with the wall-clock time it was seen."""
        self._events.put((kind, path, time.time()))

    def _start_observer(self) -> BaseObserver:
        """Start watchdog on the root: OS events, or polling; fall back to polling when inotify fails."""
        handler = _Handler(self)
        if not self.config.polling:
            try:
                observer: BaseObserver = Observer()
            except OSError as exc:
                log.warning("cannot use OS events for %s (%s); polling instead", self.config.root, exc)
            else:
                # Started before scheduling, so that a failed schedule is cleaned up by stop and join.
                observer.start()
                try:
                    observer.schedule(handler, str(self.config.root), recursive=self.config.recursive,
                                      event_filter=list(_EVENT_TYPES))
                except OSError as exc:
                    # Typically the inotify watch limit on a big tree; polling still sees everything.
                    log.warning("cannot watch %s with OS events (%s); polling instead", self.config.root, exc)
                    observer.stop()
                    observer.join()
                else:
                    return observer
        observer = PollingObserver(timeout=self.config.poll_interval)
        observer.schedule(handler, str(self.config.root), recursive=self.config.recursive,
                          event_filter=list(_EVENT_TYPES))
        observer.start()
        return observer

    def _start_parent_observer(self) -> BaseObserver | None:
        """Watch the root's parent for the root being deleted, made again, or swapped with ``mv``.

        OS events only (when polling, the worker's periodic look at the root's identity does this job);
        None when the parent cannot be watched.
        """
        if self.config.polling:
            return None
        parent = self.config.root.parent
        if parent == self.config.root:
            return None  # the root is "/"
        try:
            observer: BaseObserver = Observer()
            observer.start()
        except OSError as exc:
            log.debug("cannot watch %s for the watched folder being replaced: %s", parent, exc)
            return None
        try:
            observer.schedule(_RootHandler(self), str(parent), recursive=False,
                              event_filter=[DirCreatedEvent, DirDeletedEvent, DirMovedEvent])
        except OSError as exc:
            log.debug("cannot watch %s for the watched folder being replaced: %s", parent, exc)
            observer.stop()
            observer.join()
            return None
        return observer

    # -- worker thread -------------------------------------------------------------------------------

    def _arm(self) -> bool:
        """(Re)start the observer on the root as it is now; False when the root is not a folder now.

        On the worker thread after ``start``: it owns the observer from then on.
        """
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
            self._observer = None
        try:
            st = os.stat(self.config.root)
        except OSError:
            st = None
        if st is None or not stat.S_ISDIR(st.st_mode):
            self._root_id = None
            return False
        self._observer = self._start_observer()
        self._root_id = (st.st_dev, st.st_ino)
        self._real_root = Path(os.path.realpath(self.config.root))
        return True

    def _root_replaced(self) -> bool:
        """True when the folder at the root's path is not the one being watched (gone, new or swapped)."""
        try:
            st = os.stat(self.config.root)
        except OSError:
            return self._root_id is not None
        if not stat.S_ISDIR(st.st_mode):
            return self._root_id is not None
        if (st.st_dev, st.st_ino) != self._root_id:
            return True
        # The same inode number can come back for a folder deleted and made again at once; a watch on the
        # deleted one has ended its emitter.
        observer = self._observer
        return observer is not None and not all(e.is_alive() for e in observer.emitters)

    def _rearm(self, forced: bool) -> None:
        """Follow the root to the folder now at its path; files found there count as moved in."""
        if not forced and not self._root_replaced():
            return
        had_root = self._root_id is not None
        self._pending.clear()  # events and signals of the old folder say nothing of the new one
        if not self._arm():
            if had_root:
                log.warning("the watched folder %s is gone; watching for it to come back", self.config.root)
            return
        log.info("the watched folder %s was replaced or made again; watching the new one", self.config.root)
        wall = time.time()
        now = time.monotonic()
        for path, st in self._scan(self.config.root):
            if self._stopping.is_set():
                return
            # When polling, a file a scan finds may still be written (no event will say): it settles.
            self._add(path, st, now, arrived=None if self.config.polling else min(st.st_ctime, wall))

    def _run(self) -> None:
        """The worker: initial scan, then events, due checks and reconcile scans until stopped."""
        try:
            self._initial_scan()
        finally:
            if self._on_scanned is not None:
                self._on_scanned()
        next_reconcile = time.monotonic() + self.config.reconcile_interval
        next_root_check = time.monotonic() + ROOT_CHECK
        while not self._stopping.is_set():
            wake = min((c.due for c in self._pending.values()), default=next_reconcile)
            timeout = max(0.0, min(wake, next_reconcile, next_root_check) - time.monotonic())
            root_event = False
            try:
                item = self._events.get(timeout=timeout)
            except queue.Empty:
                pass
            else:
                # A burst of events (one per write) costs one pass over the due candidates.
                while item is not _STOP:
                    if item[0] is _Kind.ROOT:
                        root_event = True
                    else:
                        self._apply(item)
                    try:
                        item = self._events.get_nowait()
                    except queue.Empty:
                        break
                if item is _STOP:
                    return
            now = time.monotonic()
            if root_event or now >= next_root_check:
                self._rearm(forced=root_event)
                next_root_check = time.monotonic() + ROOT_CHECK
            now = time.monotonic()
            for path in [p for p, c in self._pending.items() if c.due <= now]:
                if self._stopping.is_set():
                    return
                self._examine(path, now)
            if now >= next_reconcile:
                if self._root_id is not None:
                    self._reconcile()
                next_reconcile = time.monotonic() + self.config.reconcile_interval

    def _apply(self, item: _Item) -> None:
        """Update the candidates from one event."""
        kind, path, wall = item
        now = time.monotonic()
        if kind is _Kind.GONE:
            if self._pending.pop(path, None) is not None:
                log.debug("%s went away before it was complete", path)
            return
        if kind is _Kind.DIR:
            if self._matcher.wants_file(path):
                self._add(path, None, now)  # a folder named like a frame: reported as such
            # Files already in a new folder were written before its watch existed: like files moved in,
            # they are whole once their structure is. (watchdog also simulates events for them, but a scan
            # costs little and does not depend on that.)
            for file_path, st in self._scan(path):
                self._add(file_path, st, now, arrived=None if self.config.polling else min(st.st_ctime, wall))
            return
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._pending.pop(path, None)
            if os.path.islink(path):
                self._add(path, None, now)  # a dangling link: reported
            return
        except OSError:
            # Let the due check report it (a looping link, a permission change).
            self._pending.setdefault(path, _Candidate()).due = now
            return
        candidate = self._pending.get(path)
        fresh = candidate is None
        if candidate is None:
            candidate = self._pending[path] = _Candidate()
        key = _key(st)
        candidate.observe(key, now, wall)
        if kind is _Kind.META and self._touched_after_delivery(path, key, candidate, fresh):
            # Only the mtime moved on the content already delivered: remember the new version as delivered.
            self._delivered.add((path, *key))
            self._last_delivered[path] = key
            del self._pending[path]
            return
        if kind is _Kind.WRITTEN:
            candidate.signal = None
            candidate.due = now + self.config.settle
        elif kind is _Kind.META:
            # A metadata-only change (chmod, chown, utime: shutil.copy and cp -p end this way) leaves the
            # content as the writer closed it: the close still holds if the size is the same.
            signal = candidate.signal
            if signal is not None and signal.key[0] == key[0]:
                candidate.signal = replace(signal, key=key)
                candidate.due = now
            else:
                candidate.due = now + self.config.settle
        else:
            # CLOSED: closed after writing, or renamed into place: the writer says it is done.
            # ARRIVED: appeared at once (moved in from outside the folder, or the first event of a new
            # file): whole if its structure is complete now.
            candidate.signal = _Signal(kind is _Kind.CLOSED, key, wall)
            candidate.due = now

    def _touched_after_delivery(self, path: Path, key: tuple[int, int], candidate: _Candidate,
                                fresh: bool) -> bool:
        """True when a metadata-only event finds the content delivered last for ``path``, with a new mtime.

        Either no write was seen since the delivery (the event made the candidate), or the only close seen
        since is of the delivered version (the create event of a file already whole delivered it first).
        """
        last = self._last_delivered.get(path)
        if last is None or last[0] != key[0] or last == key:
            return False
        if fresh:
            return True
        signal = candidate.signal
        return signal is not None and (path, *signal.key) in self._delivered

    def _add(self, path: Path, st: os.stat_result | None, now: float, arrived: float | None = None) -> None:
        """Make a scanned file a candidate unless it is known already.

        ``st`` is None for a path to inspect for problems first (not a regular file, a link). With
        ``arrived`` (a wall-clock time) the file counts as moved in at that time: whole once its structure
        is complete, without waiting for it to settle.
        """
        if path in self._pending:
            return
        if st is None or not stat.S_ISREG(st.st_mode):
            self._pending[path] = _Candidate(due=now)  # the due check inspects and reports it
            return
        key = _key(st)
        if (path, *key) in self._delivered or (path, *key) in self._reported:
            return
        candidate = self._pending[path] = _Candidate()
        candidate.observe(key, now, time.time())
        if arrived is not None:
            candidate.signal = _Signal(False, key, arrived)
            candidate.due = now
        else:
            candidate.due = now + self.config.settle

    def _inspect(self, path: Path) -> tuple[os.stat_result | None, str | None]:
        """The file's status following an allowed link, or why it cannot be a frame; (None, None) if gone."""
        try:
            lst = os.lstat(path)
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            return None, f"cannot read the file: {exc.strerror or exc}"
        st = lst
        if stat.S_ISLNK(lst.st_mode):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return lst, "a symbolic link to nothing (its target does not exist)"
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    return lst, "a symbolic link that loops back on itself"
                return lst, f"a symbolic link that cannot be followed: {exc.strerror or exc}"
            target = Path(os.path.realpath(path))
            if not self.config.follow_symlinks and not target.is_relative_to(self._real_root):
                return lst, (f"a symbolic link to {target}, outside the watched folder (links are followed "
                             "only inside it unless watch.follow_symlinks is set)")
        if not stat.S_ISREG(st.st_mode):
            return st, f"not a regular file but {_file_kind(st.st_mode)}"
        return st, None

    def _examine(self, path: Path, now: float) -> None:
        """Check one due candidate: deliver it, report it, drop it or set when to look again."""
        candidate = self._pending[path]
        settle = self.config.settle
        st, problem = self._inspect(path)
        if st is None and problem is None:
            log.debug("%s went away before it was complete", path)
            del self._pending[path]
            return
        if problem is not None:
            self._problem(path, None if st is None else _key(st), problem)
            return
        assert st is not None
        key = _key(st)
        if (path, *key) in self._delivered or (path, *key) in self._reported:
            del self._pending[path]
            return
        if candidate.observe(key, now, time.time()):
            # Changed since its last event: the event on its way says what kind of change it was.
            candidate.due = now + settle
            return
        stable = now - candidate.since >= settle
        signal = candidate.signal if candidate.signal is not None and candidate.signal.key == key else None
        if not stable and signal is None:
            candidate.due = candidate.since + settle
            return
        if candidate.check is None:
            try:
                candidate.check = check_fits(path)
            except FileNotFoundError:
                log.debug("%s went away before it was complete", path)
                del self._pending[path]
                return
            except OSError as exc:
                self._problem(path, key, f"cannot read the file: {exc.strerror or exc}")
                return
        state = candidate.check.state
        if state is FitsState.COMPLETE:
            self._deliver(path, key, signal.at if signal is not None else candidate.last_change(st))
        elif state is FitsState.INVALID:
            if stable:
                log.debug("%s is not a FITS file (%s); delivered for rejection", path,
                          candidate.check.reason)
                self._deliver(path, key, candidate.last_change(st))
            else:
                candidate.due = candidate.since + settle
        elif signal is not None and signal.closed and key[0] > 0:
            # The writer is done with it and it is short: an interrupted copy. (An empty file is left to
            # wait: some programs create the file, close it, and open it again to write.)
            reason = candidate.check.reason
            counted = reason.removeprefix("still being written: ")
            self._problem(path, key, f"truncated: its writer closed it at {counted}" if counted != reason
                          else f"truncated: its writer closed it incomplete ({reason})")
        elif now - candidate.since >= self.config.stale_after:
            self._problem(path, key, f"truncated: incomplete and unchanged for {self.config.stale_after:g} s "
                                     f"({candidate.check.reason})")
        else:
            # Still being written (or moved in unfinished): look again soon; a change restarts the settle.
            candidate.signal = None
            candidate.due = now + self.config.poll_interval

    def _deliver(self, path: Path, key: tuple[int, int], completed: float) -> None:
        """Hand a file over, once."""
        self._delivered.add((path, *key))
        self._last_delivered[path] = key
        self._pending.pop(path, None)
        try:
            self._on_frame(path, completed)
        except Exception:
            # The callback belongs to the daemon; its failure must not stop the watch. Logged with the
            # traceback, not swallowed.
            log.exception("on_frame failed for %s", path)

    def _problem(self, path: Path, key: tuple[int, int] | None, reason: str) -> None:
        """Report a file that cannot become a frame as it is, and stop looking at it until it changes."""
        self._pending.pop(path, None)
        if key is not None:
            if (path, *key) in self._reported:
                return
            self._reported.add((path, *key))
        if self._on_problem is None:
            log.warning("%s: %s", path, reason)
            return
        try:
            self._on_problem(path, reason)
        except Exception:
            # As for on_frame: a failing callback must not stop the watch.
            log.exception("on_problem failed for %s", path)

    def _initial_scan(self) -> None:
        """Deliver the files already there, oldest first; younger or unfinished ones become candidates."""
        found = sorted(self._scan(self.config.root), key=lambda e: (e[1].st_mtime_ns, str(e[0])))
        wall = time.time()
        for path, st in found:
            if self._stopping.is_set():
                return
            now = time.monotonic()
            key = _key(st)
            # A file untouched for `settle` seconds by its mtime needs no further waiting. (A share whose
            # clock runs ahead only makes this slower: such files go the candidate way.)
            if stat.S_ISREG(st.st_mode) and wall - st.st_mtime >= self.config.settle:
                try:
                    result = check_fits(path)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    self._problem(path, key, f"cannot read the file: {exc.strerror or exc}")
                    continue
                if result.state is not FitsState.INCOMPLETE:
                    self._deliver(path, key, min(st.st_ctime, wall))
                    continue
                if wall - st.st_mtime >= self.config.stale_after:
                    self._problem(path, key, f"truncated: incomplete ({result.reason})")
                    continue
            self._add(path, st, now)

    def _reconcile(self) -> None:
        """Make every file not yet delivered a candidate: catches whatever the events missed."""
        now = time.monotonic()
        for path, st in self._scan(self.config.root):
            if self._stopping.is_set():
                return
            self._add(path, st, now)

    def _scan(self, top: Path) -> Iterator[tuple[Path, os.stat_result]]:
        """Yield what below ``top`` may be a frame (one level when not recursive), skipping ignored folders.

        Regular files come with their status (through a link); anything else named like a frame (a link
        that cannot be followed, a FIFO, a device, a folder) comes with its own status, for ``_add`` to
        report.
        """
        stack = [top]
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(folder) as entries:
                    listed = list(entries)
            except OSError as exc:
                # A folder removed or made unreadable mid-scan; the next reconcile tries again.
                log.debug("cannot list %s: %s", folder, exc)
                continue
            for entry in listed:
                path = folder / entry.name
                try:
                    own = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                # Symlinked folders are not entered (no loops); symlinked files are followed (or reported).
                if stat.S_ISDIR(own.st_mode) and self.config.recursive and self._matcher.wants_dir(path):
                    stack.append(path)
                if not self._matcher.wants_file(path):
                    continue
                if stat.S_ISLNK(own.st_mode):
                    try:
                        st = entry.stat()
                    except OSError:
                        yield path, own
                        continue
                    if stat.S_ISREG(st.st_mode) and self._inspect(path)[1] is None:
                        yield path, st
                    else:
                        yield path, own
                else:
                    yield path, own


# -- private helpers ------------------------------------------------------------------------------------

#: Seconds between looks at whether the watched folder is still the one being watched (deleted, made
#: again, swapped with ``mv``): what notices a replaced folder when its parent cannot be watched, or when
#: polling.
ROOT_CHECK = 0.5


class _Kind(enum.Enum):
    """What an event means for a candidate."""

    WRITTEN = "written"  # data written: wait for a close, or for it to settle
    META = "meta"  # metadata only (chmod, utime): a close before it still holds
    ARRIVED = "arrived"  # created, or moved in from outside: whole if its structure is complete now
    CLOSED = "closed"  # closed after writing, or renamed into place: check now
    GONE = "gone"  # deleted or renamed away
    DIR = "dir"  # a folder appeared: scan it
    ROOT = "root"  # the watched folder itself was deleted, made, or moved


_Item = tuple[_Kind, Path, float]
_STOP: _Item = (_Kind.GONE, Path(), 0.0)  # compared by identity; never a real event

_EVENT_TYPES = (
    FileCreatedEvent, FileModifiedEvent, FileAttribEvent, FileClosedEvent, FileMovedEvent,
    FileDeletedEvent, DirCreatedEvent, DirMovedEvent, DirDeletedEvent,
)


@dataclass(frozen=True)
class _Signal:
    """Why a version of a file counts as whole: the writer closed it or renamed it into place (``closed``),
    or it arrived at once; ``key`` is the version it holds for, ``at`` the wall-clock time it happened."""

    closed: bool
    key: tuple[int, int]
    at: float


@dataclass
class _Candidate:
    """A file that may become a frame; mutable, owned by the worker thread.

    ``since`` (monotonic) and ``seen_wall`` (wall clock) are when the current ``key`` (size, mtime_ns) was
    first seen; ``signal`` says it is whole (for the version it names); ``check`` is the completeness answer
    for ``key``.
    """

    key: tuple[int, int] | None = None
    since: float = 0.0
    seen_wall: float = 0.0
    signal: _Signal | None = None
    check: FitsCheck | None = None
    due: float = field(default=0.0)

    def observe(self, key: tuple[int, int], now: float, wall: float) -> bool:
        """Record the current size and mtime; True when they changed."""
        if key == self.key:
            return False
        self.key = key
        self.since = now
        self.seen_wall = wall
        self.check = None
        return True

    def last_change(self, st: os.stat_result) -> float:
        """When this version was last changed: its ctime (set by every write, chmod and utime, never by the
        writer's hand), but no later than it was first seen here (a share's clock may run ahead)."""
        return min(st.st_ctime, self.seen_wall)


def _key(st: os.stat_result) -> tuple[int, int]:
    """The identity of one version of a file: size and mtime in nanoseconds."""
    return st.st_size, st.st_mtime_ns


def _file_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


class _Matcher:
    """Which paths below the root are frames, after the patterns and ignores of a config."""

    def __init__(self, config: WatchConfig) -> None:
        self._root = config.root
        self._recursive = config.recursive
        self._patterns = tuple(p.lower() for p in config.patterns)
        self._ignore = tuple(p.lower() for p in config.ignore)
        self._ignore_dirs = config.ignore_dirs

    def _parts(self, path: Path) -> tuple[str, ...] | None:
        """The parts of ``path`` below the root, or None when it is outside or inside an ignored folder."""
        try:
            parts = path.relative_to(self._root).parts
        except ValueError:
            return None
        if not parts:
            return None
        if any(path == d or d in path.parents for d in self._ignore_dirs):
            return None
        if any(self._ignored(part) for part in parts):
            return None
        return parts

    def _ignored(self, name: str) -> bool:
        lowered = name.lower()
        return any(fnmatch.fnmatchcase(lowered, pattern) for pattern in self._ignore)

    def wants_dir(self, path: Path) -> bool:
        """True for a folder that is watched."""
        return self._parts(path) is not None

    def wants_file(self, path: Path) -> bool:
        """True for a file that may be a frame."""
        parts = self._parts(path)
        if parts is None or (not self._recursive and len(parts) > 1):
            return False
        lowered = parts[-1].lower()
        return any(fnmatch.fnmatchcase(lowered, pattern) for pattern in self._patterns)


class _Handler(FileSystemEventHandler):
    """Turns watchdog events into queued ``(_Kind, path, time)`` items; runs on watchdog's dispatcher thread.

    When polling, no event means the writer is done (a poll sees a rename or a new file long after it
    happened, and a file a poll finds may still be written): every change waits for the file to settle.
    """

    def __init__(self, watcher: Watcher) -> None:
        super().__init__()
        self._watcher = watcher
        self._matcher = watcher._matcher
        self._root = watcher.config.root
        self._polling = watcher.config.polling

    def _file(self, kind: _Kind, raw: bytes | str) -> None:
        if raw:
            path = Path(os.fsdecode(raw))
            if self._matcher.wants_file(path):
                self._watcher._event(_Kind.WRITTEN if self._polling and kind is not _Kind.GONE else kind,
                                     path)

    def _dir(self, raw: bytes | str) -> None:
        if raw:
            path = Path(os.fsdecode(raw))
            if self._matcher.wants_dir(path):
                self._watcher._event(_Kind.DIR, path)

    def on_created(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            self._dir(event.src_path)
        else:
            # Either a new file (its writes and close follow) or one moved in from outside the folder.
            self._file(_Kind.ARRIVED, event.src_path)

    def on_modified(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._file(_Kind.WRITTEN, event.src_path)

    def on_attrib(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._file(_Kind.META, event.src_path)

    def on_closed(self, event: FileSystemEvent) -> None:
        self._file(_Kind.CLOSED, event.src_path)

    def on_deleted(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._file(_Kind.GONE, event.src_path)
        elif Path(os.fsdecode(event.src_path)) == self._root:
            # The watched folder itself (watchdog ends that watch): follow whatever comes at its path.
            self._watcher._event(_Kind.ROOT, self._root)

    def on_moved(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            self._dir(event.dest_path)
            return
        self._file(_Kind.GONE, event.src_path)
        self._file(_Kind.CLOSED, event.dest_path)


class _RootHandler(FileSystemEventHandler):
    """On the root's parent: queues ``ROOT`` when a folder appears, goes or moves at the root's path."""

    def __init__(self, watcher: Watcher) -> None:
        super().__init__()
        self._watcher = watcher
        self._root = watcher.config.root

    def on_any_event(self, event: FileSystemEvent) -> None:
        paths = (event.src_path, getattr(event, "dest_path", b""))
        if any(raw and Path(os.fsdecode(raw)) == self._root for raw in paths):
            self._watcher._event(_Kind.ROOT, self._root)
