"""Snapshots, previews, pictures and checkpoints: decided on the worker thread, made on the writer's.

- ``Writer``: the writer thread; runs jobs in the order they were queued, so a session's last snapshot and
  the next session's first checkpoint land in order. A job's failure is logged, never the end of the thread.
- ``Outputs``: owned by the worker; counts frames and seconds since the last snapshot and checkpoint, copies
  what must be consistent with the journal (a checkpoint's arrays) while it holds the stack, and queues the
  rest (stacking the snapshot, stretching the preview and the viewers' picture) for the writer. When frames
  come faster than the writer writes, an interval snapshot or a checkpoint still waiting in the queue takes
  the newer one's place instead of a second job: the queue (and the copies of the stack it holds) stays
  bounded, and a stop waits for one snapshot and one checkpoint, not for an evening's backlog.
- ``ColourSnapshots``: owned by the writer thread; what it last wrote of each target's filters and when it
  last rebuilt a target's colour composite (at most every ``[compose] every_seconds``, and only when a
  channel changed: a composite costs about a second at 8.3 MP, never on the frame path).

A target with one filter (or none) snapshots to ``<target>/stack.fits`` as it always did. With two or more,
each filter's stack goes to ``<target>/<filter>/stack.fits`` and ``<target>/stack.fits`` holds the colour
composite (3 planes, the recipe in its header).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from livestack import events
from livestack.config import Config
from livestack.errors import LivestackError, StateError
from livestack.live.health import STALL_RETRY, Health, disk_problem
from livestack.live.reports import safe_name, stack_event
from livestack.live.stacks import Stacks
from livestack.live.state import CheckpointStore
from livestack.pipeline import Stacker, build_composite, composite_info
from livestack.stages.provenance import FrameRow
from livestack.stages.snapshot import StackInfo, encode_image, picture_suffix, preview_array, write_snapshot

__all__ = ["EMPTY_STACK", "ColourSnapshots", "Outputs", "Writer"]

log = logging.getLogger("livestack.live.writer")

#: Seconds after which the last ``display`` picture is published again when nothing newer came: a viewer
#: that starts (or restarts) while the stack is quiet gets the picture without waiting for a frame.
DISPLAY_REPEAT = 15.0

#: An idle checkpoint waits until the frames have paused for this many times the last interval between
#: two stacked frames (and at least ``IDLE_CHECKPOINT_WAIT`` seconds): at a steady cadence of short
#: exposures the accumulators (160 MB at 8.3 MP, 500 MB at 26 MP) are not written after every frame, where
#: the writing and its fsync ran into the next frame's read and journal; the frame-count and time rules
#: still apply, and a pause or the end of the frames still gets its checkpoint.
IDLE_CHECKPOINT_CADENCES = 2.0
#: The least idle time, seconds, before an idle checkpoint (the worker's idle tick is 0.5 s).
IDLE_CHECKPOINT_WAIT = 0.5

#: What a checkpoint of an empty stack holds (the store wants at least one array; ``meta`` says empty).
EMPTY_STACK = {"empty": np.zeros(1, dtype=np.uint8)}

Job = Callable[[], object]


class Writer:
    """The writer thread: runs queued jobs one after the other until ``close``."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        #: Set by ``close``: a job retrying a write gives up (the journal has what it would have saved).
        self.closing = threading.Event()

    def submit(self, job: Job) -> None:
        """Queue a job (any thread)."""
        self._jobs.put(job)

    def close(self) -> None:
        """Let the thread finish the jobs queued so far, then return."""
        self.closing.set()
        self._jobs.put(None)

    def run(self) -> None:
        """The thread's body."""
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except LivestackError as exc:
                log.warning("%s", exc)
            except OSError as exc:
                log.error("could not write to disk: %s", exc)
            except Exception as exc:
                # A snapshot, preview or checkpoint that fails in a stage (OpenCV, astropy, numpy) is lost,
                # not the writer: the next one may work, and the journal keeps what a checkpoint would.
                log.error("a snapshot, preview or checkpoint failed (%s: %s)", type(exc).__name__, exc,
                          exc_info=True)


class ColourSnapshots:
    """What the writer last wrote of each target's filters; touched by writer-thread jobs only.

    Parameters
    ----------
    every_seconds : float
        Least seconds between two composites of a target on ``interval`` snapshots (0: only on request and
        at shutdown).
    clock : callable
        Monotonic seconds (injectable for tests).
    """

    def __init__(self, every_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_seconds = every_seconds
        self._clock = clock
        self._written: dict[tuple[Path, str], int] = {}
        self._composed: dict[Path, tuple[float, tuple[tuple[str, int], ...]]] = {}
        self._warned: set[tuple[Path, str]] = set()

    def filter_changed(self, folder: Path, name: str, frames: int) -> bool:
        """Whether a filter's stack has frames its last snapshot (``filter_written``) lacks."""
        return self._written.get((folder, name)) != frames

    def filter_written(self, folder: Path, name: str, frames: int) -> None:
        """Note that a filter's snapshot of ``frames`` frames is on disk."""
        self._written[(folder, name)] = frames

    def composite_failed(self, folder: Path) -> None:
        """Forget a target's last composite (its files could not be written): the next snapshot retries."""
        self._composed.pop(folder, None)

    def composite_due(self, folder: Path, counts: tuple[tuple[str, int], ...], forced: bool) -> bool:
        """Whether to rebuild a target's composite: a channel changed and (forced, or the interval passed)."""
        last = self._composed.get(folder)
        if last is not None and last[1] == counts:
            return False
        now = self._clock()
        if not forced:
            if self.every_seconds <= 0:
                return False
            if last is not None and now - last[0] < self.every_seconds:
                return False
        self._composed[folder] = (now, counts)
        return True

    def first_warning(self, folder: Path, message: str) -> bool:
        """True the first time a target's composite fails for this reason (so the log is not flooded)."""
        key = (folder, message)
        if key in self._warned:
            return False
        self._warned.add(key)
        return True


class Outputs:
    """When to snapshot and checkpoint, and the jobs that do it; used by the worker thread only.

    Parameters
    ----------
    config : Config
    stacks : Stacks
    store : CheckpointStore
    writer : Writer
    emit : callable
        Queues an event for publication.
    health : Health
        Where a checkpoint that cannot be written stalls the daemon.
    """

    def __init__(self, config: Config, stacks: Stacks, store: CheckpointStore, writer: Writer,
                 emit: Callable[[events.Event], None], health: Health) -> None:
        self.config = config
        self.health = health
        self.stacks = stacks
        self.store = store
        self.writer = writer
        self.emit = emit
        #: The journal seq of the last frame decided (checkpoints are taken as of it).
        self.seq = 0
        #: The FRAMES table of a session's stack (of one filter's), from the journal (``Removals.rows``);
        #: any thread. None writes snapshots without the table.
        self.frame_rows: Callable[[int, str | None], tuple[FrameRow, ...]] | None = None
        #: Session 1, empty, is where a fresh state folder starts anyway.
        self.checkpointed_session = 1
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        # time.monotonic() when the last frame was stacked, and the interval before it (None: one frame).
        self._last_stacked: float | None = None
        self._cadence: float | None = None
        self._since_snapshot = 0
        self._last_snapshot = time.monotonic()
        self._last_preview = 0.0
        # The viewers' picture: due after a change (the worker decides), made by the writer, which keeps
        # the last one to repeat. None until the first: a stack restored at start is pictured too.
        self._display_due = False
        self._last_display = 0.0
        self._display: events.Event | None = None
        #: True while the stack holds a frame whose journal line is not durable yet (set by the worker).
        self.unjournaled = False
        #: The writer thread's record of per-filter snapshots and composites.
        self.colour = ColourSnapshots(config.compose.every_seconds)
        # Stack events queued on the writer and not yet published (the worker adds, the writer subtracts).
        self._routed = 0
        self._routed_lock = threading.Lock()
        # Jobs queued on the writer and not started yet that a newer request joins instead of queueing
        # another (the worker adds, the writer takes them out as it starts them): interval snapshots by
        # (stack, session), and the last checkpoint queued.
        self._waiting_lock = threading.Lock()
        self._waiting_snapshots: set[tuple[Stacker, int]] = set()
        self._waiting_checkpoint: _CheckpointJob | None = None
        # The array the whole stack is written in under the lock for a snapshot or the viewers' picture,
        # kept from one to the next (writer thread only: its jobs run one at a time and keep no image).
        self._stack_buffer = _Buffer()

    # -- after each frame -----------------------------------------------------------------------------

    def stacked(self) -> None:
        """A frame was added: publish the stack, snapshot and checkpoint when due."""
        now = time.monotonic()
        if self._last_stacked is not None:
            self._cadence = now - self._last_stacked
        self._last_stacked = now
        self._since_snapshot += 1
        self._since_checkpoint += 1
        self.stack_event()
        self._display_due = True
        self.maybe_display()
        self.maybe_snapshot()

    def maybe_snapshot(self) -> None:
        o = self.config.output
        due_frames = o.every_frames > 0 and self._since_snapshot >= o.every_frames
        due_time = o.every_seconds > 0 and time.monotonic() - self._last_snapshot >= o.every_seconds
        if due_frames or due_time:
            self.queue_snapshot("interval")

    def maybe_checkpoint(self, idle: bool) -> None:
        """Checkpoint when due: every ``checkpoint_every_frames`` frames or ``checkpoint_every_seconds``,
        or when ``idle`` and the frames have paused (``IDLE_CHECKPOINT_CADENCES``)."""
        s = self.config.state
        if self._since_checkpoint == 0:
            return
        now = time.monotonic()
        if idle and self._last_stacked is not None:
            wait = max(IDLE_CHECKPOINT_WAIT, IDLE_CHECKPOINT_CADENCES * (self._cadence or 0.0))
            idle = now - self._last_stacked >= wait
        if (self._since_checkpoint >= s.checkpoint_every_frames
                or now - self._last_checkpoint >= s.checkpoint_every_seconds or idle):
            self.checkpoint()

    # -- snapshots ------------------------------------------------------------------------------------

    def queue_snapshot(self, reason: str, stacker: Stacker | None = None) -> None:
        """Snapshot a stack (the current target's by default) on the writer thread, as it will be then.

        An interval snapshot of a stack whose interval snapshot is still waiting in the writer's queue is
        that one: it takes the stack as it is when it starts, so it holds this one's frames too.
        """
        if stacker is None:
            self._since_snapshot = 0
            self._last_snapshot = time.monotonic()
            stacker = self.stacks.stacker
        session = self.stacks.session
        chosen = stacker
        if reason != "interval":
            self.writer.submit(lambda: self.write_snapshot(reason, chosen, session))
            return
        key = (chosen, session)
        with self._waiting_lock:
            if key in self._waiting_snapshots:
                return
            self._waiting_snapshots.add(key)

        def job() -> None:
            with self._waiting_lock:
                self._waiting_snapshots.discard(key)
            self.write_snapshot(reason, chosen, session)

        self.writer.submit(job)

    def session_started(self) -> None:
        self._since_snapshot = 0

    def write_snapshot(self, reason: str, stacker: Stacker | None = None,
                       session: int | None = None) -> dict[str, Any]:
        """Writer thread: take the stack under the lock, write FITS and picture outside it."""
        if stacker is None or session is None:
            with self.stacks.lock:  # the worker swaps the stacker and the session together under it
                stacker, session = self.stacks.stacker, self.stacks.session
        view = self.stacks.view(stacker, session, image=True, into=self._stack_buffer)
        info = view.info
        if view.image is None or info.ncombine == 0:
            raise LivestackError("the stack is empty: nothing to snapshot yet")
        stalled = self.health.stalled
        if stalled:
            raise LivestackError(f"no snapshot while stalled ({stalled}); the last good one is kept")
        folder = self.stacks.folder(stacker)
        folder.mkdir(parents=True, exist_ok=True)
        if len(view.filters) > 1:
            return self._write_filters(reason, stacker, view.session, folder)
        if self.frame_rows is not None:
            info = replace(info, frames=self.frame_rows(view.session, info.filter))
        o = self.config.output
        files = write_snapshot(folder / "stack.fits", view.image, info, image_format=o.image_format,
                               flatten=o.flatten_background, history=o.history,
                               surface=stacker.path == "surface", frames_csv=o.frames_csv,
                               crop=o.crop_coverage)
        self.emit(events.make_event("snapshot", fits=str(files.fits), image=str(files.picture),
                                    frames=info.ncombine, session=view.session, reason=reason))
        return {"fits": str(files.fits), "image": str(files.picture), "frames": info.ncombine}

    def _write_filters(self, reason: str, stacker: Stacker, session: int, folder: Path) -> dict[str, Any]:
        """Writer thread: each filter's stack that changed into ``<target>/<filter>/``, then the composite
        into ``<target>/`` when it is due (always on request and at shutdown, if a channel changed)."""
        channels = self.stacks.channels(stacker)
        o = self.config.output
        forced = reason != "interval"
        surface = stacker.path == "surface"
        for name, (info, image) in channels.items():
            if not forced and not self.colour.filter_changed(folder, name, info.ncombine):
                continue
            sub = folder / safe_name(name or "unfiltered")
            sub.mkdir(exist_ok=True)
            if self.frame_rows is not None:
                info = replace(info, frames=self.frame_rows(session, name))
            files = write_snapshot(sub / "stack.fits", image, info, image_format=o.image_format,
                                   flatten=o.flatten_background, history=o.history, surface=surface,
                                   frames_csv=o.frames_csv, crop=o.crop_coverage)
            self.colour.filter_written(folder, name, info.ncombine)
            self.emit(events.make_event("snapshot", fits=str(files.fits), image=str(files.picture),
                                        frames=info.ncombine, session=session, reason=reason,
                                        filter=name or None, recipe=None))
        target = folder / "stack.fits"
        frames = sum(info.ncombine for info, _ in channels.values())
        counts = tuple((name, info.ncombine) for name, (info, _) in channels.items())
        if channels and self.colour.composite_due(folder, counts, forced):
            self._write_composite(reason, channels, session, folder, target)
        return {"fits": str(target), "image": str(target.with_suffix(picture_suffix(o.image_format))),
                "frames": frames}

    def _write_composite(self, reason: str, channels: dict[str, tuple[StackInfo, np.ndarray]], session: int,
                         folder: Path, target: Path) -> None:
        o = self.config.output
        try:
            result = build_composite({name: image for name, (_, image) in channels.items()},
                                     self.config.compose)
        except ValueError as exc:
            if self.colour.first_warning(folder, str(exc)):
                log.warning("no colour composite of %s yet: %s", folder.name or "the target", exc)
            return
        info = replace(composite_info((info for info, _ in channels.values()), result.recipe),
                       cards=result.cards,
                       frames=self.frame_rows(session, None) if self.frame_rows is not None else None)
        try:
            files = write_snapshot(target, result.image, info, image_format=o.image_format,
                                   flatten=o.flatten_background, history=o.history, picture=result.picture,
                                   frames_csv=o.frames_csv)
        except OSError:
            self.colour.composite_failed(folder)
            raise
        self.emit(events.make_event("snapshot", fits=str(files.fits), image=str(files.picture),
                                    frames=info.ncombine, session=session, reason=reason, filter=None,
                                    recipe=result.recipe))
        if self.config.web.display_interval > 0:
            # Viewers key pictures by target and filter: the composite shows beside each channel, under
            # its recipe's name.
            side = self.config.web.display_size or max(result.image.shape[:2])
            if result.picture is not None:
                pixels = _fit(result.picture, side)
            else:
                pixels = preview_array(result.image, max_side=side, flatten=o.flatten_background)
            self.emit(events.make_event(
                "display", picture=encode_image(pixels, "jpeg"), object=info.object, filter=result.recipe,
                session=session, frames=info.ncombine, exptime=info.exptime, width=pixels.shape[1],
                height=pixels.shape[0]))

    def requested_snapshot(self, future: Future[dict[str, Any]]) -> None:
        """Writer thread: a snapshot for a control request; a failure is the reply, not a lost request."""
        try:
            future.set_result(self.write_snapshot("request"))
        except Exception as exc:
            future.set_exception(exc)

    # -- stack events ---------------------------------------------------------------------------------

    def stack_event(self) -> None:
        """Publish the stack: at once without a preview, or with one from the writer every so often.

        While a preview is on its way, later stack events go through the writer too (cheap jobs, no
        picture): the writer runs jobs in order and takes each view after the last, so subscribers see the
        counts of a session only grow.
        """
        interval = self.config.network.preview_interval
        now = time.monotonic()
        stacker, session = self.stacks.stacker, self.stacks.session
        preview = interval > 0 and stacker.count > 0 and now - self._last_preview >= interval
        if preview:
            self._last_preview = now
        with self._routed_lock:
            routed = preview or self._routed > 0
            if routed:
                self._routed += 1
        if routed:
            self.writer.submit(lambda: self._routed_event(stacker, session, preview))
        else:
            self.emit(stack_event(self.stacks.view(stacker, session)))

    def _routed_event(self, stacker: Stacker, session: int, with_preview: bool) -> None:
        """Writer thread: a stack event (with its preview when asked), counts and picture from one view."""
        try:
            side = self.config.network.preview_size
            view = self.stacks.view(stacker, session, image=with_preview, coverage=False, side=side,
                                    sample=with_preview)
            preview = snr = None
            if view.image is not None:
                preview = preview_array(view.image, max_side=side,
                                        flatten=self.config.output.flatten_background,
                                        surface=stacker.path == "surface")
                snr = stacker.snr(view.sample)
            self.emit(stack_event(view, preview, snr))
        finally:
            with self._routed_lock:
                self._routed -= 1

    # -- the viewers' picture -------------------------------------------------------------------------

    def maybe_display(self) -> None:
        """Queue the stack's picture for viewers when it changed and ``[web] display_interval`` allows (the
        last change of a burst is pictured once the interval has passed: call this when idle too); repeat
        the last picture of this session every ``DISPLAY_REPEAT`` seconds while nothing changes."""
        interval = self.config.web.display_interval
        now = time.monotonic()
        if interval <= 0 or now - self._last_display < interval:
            return
        stacker, session = self.stacks.stacker, self.stacks.session
        last = self._display
        if stacker.count > 0 and (self._display_due or last is None):
            self._display_due = False
            self._last_display = now
            self.writer.submit(lambda: self._make_display(stacker, session))
        elif last is not None and last["session"] == session and now - self._last_display >= DISPLAY_REPEAT:
            self._last_display = now
            self.emit(last)

    def _make_display(self, stacker: Stacker, session: int) -> None:
        """Writer thread: the stretched stack as a JPEG (at most ``[web] display_size`` pixels), published."""
        side = self.config.web.display_size
        view = self.stacks.view(stacker, session, image=True, coverage=False, side=side,
                                into=self._stack_buffer)
        if view.image is None or view.info.ncombine == 0:
            return
        pixels = preview_array(view.image, max_side=side or max(view.image.shape[:2]),
                               flatten=self.config.output.flatten_background,
                               surface=stacker.path == "surface")
        info = view.info
        self._display = events.make_event(
            "display", picture=encode_image(pixels, "jpeg"), object=info.object, filter=info.filter,
            session=session, frames=info.ncombine, exptime=info.exptime, width=pixels.shape[1],
            height=pixels.shape[0])
        self.emit(self._display)

    # -- checkpoints ----------------------------------------------------------------------------------

    def stack_changed(self, old: Stacker | None) -> None:
        """A removal changed the stack (worker): publish, checkpoint, snapshot it; drop the replaced one."""
        self.stacks.changed()
        self.checkpoint()
        if old is not None:
            # After the checkpoint that no longer names its median cube (the writer runs jobs in order).
            self.writer.submit(old.discard)
        if self.stacks.stacker.count > 0:
            self.queue_snapshot("removal")
        self.stack_event()

    def checkpoint(self) -> None:
        """Copy the stack's state now (consistent with the journal) and let the writer save it."""
        with self.stacks.lock:
            arrays, meta = self.stacks.checkpoint()  # copies of every target's accumulators
        session = self.stacks.session
        meta = {**meta, "session": session}
        seq, store = self.seq, self.store
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        if not arrays:
            if session == self.checkpointed_session:
                return  # an empty stack, and its session is on disk already: nothing the journal lacks
            # A new, still empty session (a reset): record it, or a restart would resume the old stack.
            arrays = EMPTY_STACK
        self.checkpointed_session = session
        with self._waiting_lock:
            waiting = self._waiting_checkpoint
            if waiting is not None and waiting.session == session:
                # Not started yet: it saves this newer copy instead (same session, so the order of the
                # writer's jobs is kept: a session's last snapshot still comes before the next session's
                # first checkpoint).
                waiting.seq, waiting.arrays, waiting.meta = seq, arrays, meta
                return
            job = self._waiting_checkpoint = _CheckpointJob(seq, session, arrays, meta)
        self.writer.submit(lambda: self._save_waiting(store, job))

    def _save_waiting(self, store: CheckpointStore, job: _CheckpointJob) -> None:
        """Writer thread: save a queued checkpoint as it is when the writer comes to it."""
        with self._waiting_lock:
            if self._waiting_checkpoint is job:
                self._waiting_checkpoint = None
            seq, arrays, meta = job.seq, job.arrays, job.meta
        self._save(store, seq, job.session, arrays, meta)

    def _save(self, store: CheckpointStore, seq: int, session: int, arrays: dict[str, np.ndarray],
              meta: dict[str, Any]) -> None:
        """Writer thread: save a checkpoint, retrying while the disk refuses it (the daemon stalls)."""
        while True:
            try:
                store.save(seq, session, arrays, meta)
            except StateError as exc:
                if not isinstance(exc.__cause__, OSError):
                    raise
                problem = disk_problem("a checkpoint", exc)
                if self.health.stall("checkpoint", problem):
                    log.error("stalled: %s; no frame is taken until it can be written", problem)
                if self.writer.closing.wait(STALL_RETRY):
                    log.warning("stopping with checkpoint %d unsaved: the journal has its frames", seq)
                    self.health.clear("checkpoint")
                    return
                continue
            if self.health.clear("checkpoint"):
                log.warning("a checkpoint could be written again: resuming")
            return

    def checkpoint_now(self) -> bool:
        """Save a checkpoint on this thread (after recovery, before any other thread runs); True if saved."""
        arrays, meta = self.stacks.checkpoint()
        session = self.stacks.session
        try:
            self.store.save(self.seq, session, arrays or EMPTY_STACK, {**meta, "session": session})
        except StateError as exc:
            if not isinstance(exc.__cause__, OSError):
                raise
            # The journal holds everything this would: the next start replays the same frames.
            log.warning("the recovered stack's checkpoint was not saved: %s", disk_problem("it", exc))
            return False
        self.checkpointed_session = session
        return True

    def final(self) -> None:
        """At the worker's end: the last checkpoint and snapshot."""
        if self.unjournaled:
            # The stack holds a frame whose journal line never became durable: saving it would count the
            # frame twice after the restart finds its file again.
            log.warning("stopping without a final checkpoint or snapshot: the journal could not be written")
            return
        self.checkpoint()
        for stacker in self.stacks.targets():
            if stacker.count > 0:
                self.queue_snapshot("shutdown", stacker)


class _CheckpointJob:
    """A checkpoint queued on the writer: a newer copy of the same session replaces its content until the
    writer starts it (under ``Outputs._waiting_lock``)."""

    def __init__(self, seq: int, session: int, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.seq = seq
        self.session = session
        self.arrays = arrays
        self.meta = meta


class _Buffer:
    """One float32 array handed out again for the same shape (a new one for another shape).

    The whole stack is made under the stack's lock; written into memory kept from the last time it costs
    8-10 ms at 26 MP (mono), into a new array 30 ms, and up to ~200 ms of page faults on a virtual machine
    that hands freed memory back to its host. Whoever calls it must be done with the last array first.
    """

    def __init__(self) -> None:
        self._array: np.ndarray | None = None

    def __call__(self, shape: tuple[int, ...]) -> np.ndarray:
        if self._array is None or self._array.shape != tuple(shape):
            self._array = None  # the old one goes back before the new one is taken
            self._array = np.empty(shape, dtype=np.float32)
        return self._array


def _fit(picture: np.ndarray, side: int) -> np.ndarray:
    """A rendered uint8 picture shrunk (area average) so that its longest side is at most ``side``."""
    rows, cols = picture.shape[:2]
    factor = side / max(rows, cols)
    if factor >= 1.0:
        return picture
    size = (max(1, round(cols * factor)), max(1, round(rows * factor)))
    return np.asarray(cv2.resize(picture, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)
