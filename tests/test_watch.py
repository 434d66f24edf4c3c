"""Tests of livestack.live.watch: completeness of real FITS files, and delivery by real watchdog observers."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from livestack.errors import ConfigError
from livestack.live.watch import (
    BLOCK_SIZE,
    DEFAULT_PATTERNS,
    FitsState,
    WatchConfig,
    Watcher,
    _Kind,
    check_fits,
    fits_complete,
)
from livestack.stages.frames import FITS_SUFFIXES

#: Short timings keep the suite fast; every wait below is a blocking get with a deadline.
SETTLE = 0.2
POLL = 0.1
#: Longest a test waits for one delivery before failing.
DEADLINE = 10.0
#: How long "nothing more arrives" is watched for: several settle periods.
QUIET = 3 * SETTLE

MODES = pytest.param(False, id="inotify"), pytest.param(True, id="polling")


# -- fixtures and helpers ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Stricter than conftest's check: no grace period, since ``Watcher.stop()`` must have joined."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leaked, f"threads left running: {leaked}"


def fits_bytes(shape: tuple[int, int] = (120, 160), seed: int = 0) -> bytes:
    """A real single-HDU FITS image, as bytes."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 60000, size=shape, dtype=np.uint16)
    header = fits.Header()
    header["EXPTIME"] = 10.0
    buffer = io.BytesIO()
    fits.PrimaryHDU(data, header=header).writeto(buffer)
    return buffer.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a dot-temp name in the same folder, then rename into place (how careful writers work)."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_bytes(data)
    os.replace(temp, path)


@dataclass(frozen=True)
class Delivery:
    path: Path
    size: int  # the file's size when the callback ran
    state: FitsState  # what check_fits said when the callback ran
    at: float  # time.monotonic() of the callback
    completed: float  # the watcher's "known whole since" (wall clock)
    wall: float  # time.time() of the callback


class Recorder:
    """Callbacks that record what the watcher hands over, into queues the test blocks on."""

    def __init__(self) -> None:
        self.frames: queue.Queue[Delivery] = queue.Queue()
        self.problems: queue.Queue[tuple[Path, str]] = queue.Queue()

    def on_frame(self, path: Path, completed: float) -> None:
        self.frames.put(Delivery(path, path.stat().st_size, check_fits(path).state, time.monotonic(),
                                 completed, time.time()))

    def on_problem(self, path: Path, reason: str) -> None:
        self.problems.put((path, reason))

    def take(self, count: int = 1, timeout: float = DEADLINE) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        got = []
        for _ in range(count):
            try:
                got.append(self.frames.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                pytest.fail(f"only {len(got)} of {count} deliveries within {timeout} s: {got}")
        return got

    def drain(self, period: float) -> list[Delivery]:
        """Every delivery that comes within ``period`` seconds."""
        deadline = time.monotonic() + period
        got = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                got.append(self.frames.get(timeout=left))
            except queue.Empty:
                break
        return got

    def assert_quiet(self, period: float = QUIET) -> None:
        with pytest.raises(queue.Empty):
            extra = self.frames.get(timeout=period)
            pytest.fail(f"unexpected delivery: {extra}")


#: The ``watch`` fixture: starts a watcher on ``tmp_path`` with test timings, returns it and its recorder.
Start = Callable[..., "tuple[Watcher, Recorder]"]


def make_config(root: Path, polling: bool = False, **overrides: object) -> WatchConfig:
    settings: dict[str, object] = {"settle": SETTLE, "poll_interval": POLL, "reconcile_interval": 60.0}
    settings.update(overrides)
    return WatchConfig(root, polling=polling, **settings)  # type: ignore[arg-type]


@pytest.fixture
def watch(tmp_path: Path) -> Iterator[Start]:
    """Start watchers on demand; every one is stopped (and its threads joined) at the end of the test."""
    started: list[Watcher] = []

    def start(polling: bool = False, root: Path | None = None,
              **overrides: object) -> tuple[Watcher, Recorder]:
        recorder = Recorder()
        watcher = Watcher(make_config(root or tmp_path, polling, **overrides), recorder.on_frame,
                          recorder.on_problem)
        watcher.start()
        started.append(watcher)
        return watcher, recorder

    yield start
    for watcher in started:
        watcher.stop()


class ChunkedWriter(threading.Thread):
    """Writes a file in place, chunk by chunk, pausing between chunks (a slow camera or share)."""

    def __init__(self, path: Path, data: bytes, chunks: int, pause: float, long_pause: float) -> None:
        super().__init__(name="test-chunked-writer")
        self.path, self.data, self.chunks = path, data, chunks
        self.pause, self.long_pause = pause, long_pause
        self.done = threading.Event()
        self._stop_now = threading.Event()

    def run(self) -> None:
        step = -(-len(self.data) // self.chunks)
        with open(self.path, "wb") as handle:
            for index, start in enumerate(range(0, len(self.data), step)):
                handle.write(self.data[start:start + step])
                handle.flush()
                # One pause longer than settle, mid-file: only the completeness check can hold it back.
                pause = self.long_pause if index == self.chunks // 2 else self.pause
                if start + step < len(self.data) and self._stop_now.wait(pause):
                    return
        self.done.set()

    def finish(self) -> None:
        self._stop_now.set()
        self.join()


# -- check_fits on real files ---------------------------------------------------------------------------


def test_complete_primary_image(tmp_path: Path) -> None:
    path = tmp_path / "a.fits"
    path.write_bytes(fits_bytes())
    result = check_fits(path)
    assert result.state is FitsState.COMPLETE and result.complete and result.reason == ""
    assert fits_complete(path) is None


def test_complete_tile_compressed_fz(tmp_path: Path) -> None:
    path = tmp_path / "a.fits.fz"
    data = np.random.default_rng(1).integers(0, 4000, size=(100, 130), dtype=np.int32)
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data)]).writeto(path)
    with fits.open(path) as hdus:  # the primary has no data: the walk must go on to the extension
        assert hdus[0].header["NAXIS"] == 0 and len(hdus) == 2
    assert check_fits(path).state is FitsState.COMPLETE
    raw = path.read_bytes()
    (tmp_path / "cut.fits.fz").write_bytes(raw[:-BLOCK_SIZE])
    cut = check_fits(tmp_path / "cut.fits.fz")
    assert cut.state is FitsState.INCOMPLETE
    assert cut.reason == f"still being written: {len(raw) - BLOCK_SIZE:,} of {len(raw):,} bytes"


def test_complete_multi_extension_with_heap(tmp_path: Path) -> None:
    path = tmp_path / "multi.fits"
    image = np.ones((30, 40), dtype=np.float32)
    column = fits.Column(name="v", format="PJ()", array=np.array([[1, 2, 3], [4]], dtype=object))
    fits.HDUList([fits.PrimaryHDU(image), fits.ImageHDU(image * 2),
                  fits.BinTableHDU.from_columns([column])]).writeto(path)
    assert check_fits(path).state is FitsState.COMPLETE


@pytest.mark.parametrize("cut", [1, 100, BLOCK_SIZE, BLOCK_SIZE + 1, 0.5])
def test_truncated_is_incomplete(tmp_path: Path, cut: float) -> None:
    raw = fits_bytes()
    keep = int(len(raw) * cut) if cut < 1 else len(raw) - int(cut)
    path = tmp_path / "cut.fits"
    path.write_bytes(raw[:keep])
    result = check_fits(path)
    assert result.state is FitsState.INCOMPLETE
    assert fits_complete(path) == result.reason


def test_truncated_reason_counts_bytes(tmp_path: Path) -> None:
    raw = fits_bytes()
    path = tmp_path / "cut.fits"
    path.write_bytes(raw[:len(raw) // 2])
    assert check_fits(path).reason == f"still being written: {len(raw) // 2:,} of {len(raw):,} bytes"


def test_header_without_end_is_incomplete(tmp_path: Path) -> None:
    header = fits.Header()
    header["SIMPLE"], header["BITPIX"], header["NAXIS"] = True, 16, 0
    cards = "".join(card.image for card in header.cards).encode("ascii")
    path = tmp_path / "noend.fits"
    path.write_bytes(cards.ljust(BLOCK_SIZE, b" "))  # a full record, padded, but no END card
    assert check_fits(path).state is FitsState.INCOMPLETE
    assert check_fits(path).reason == "no END card yet"
    path.write_bytes(cards)  # a partial record
    assert check_fits(path).reason == "no END card yet"


def test_partial_extension_header_is_incomplete(tmp_path: Path) -> None:
    path = tmp_path / "two.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((10, 10), np.int16))]).writeto(path)
    raw = path.read_bytes()
    path.write_bytes(raw[:BLOCK_SIZE + 40])  # primary whole, the extension's first card half written
    assert check_fits(path).state is FitsState.INCOMPLETE


def test_text_is_invalid_and_empty_is_incomplete(tmp_path: Path) -> None:
    text = tmp_path / "notes.fits"
    text.write_text("observing log: clouds at 23:10\n")
    empty = tmp_path / "empty.fits"
    empty.write_bytes(b"")
    assert check_fits(text).state is FitsState.INVALID
    assert check_fits(text).reason.startswith("not a FITS file")
    # Empty is "not written yet": capture programs create the file first.
    assert check_fits(empty).state is FitsState.INCOMPLETE
    assert check_fits(empty).reason == "empty: nothing written yet"


def test_broken_headers_are_invalid(tmp_path: Path) -> None:
    raw = bytearray(fits_bytes())
    bitpix = raw.index(b"BITPIX  =")
    bad_bitpix = bytes(raw[:bitpix]) + b"BITPIX  =                   12".ljust(80) + bytes(raw[bitpix + 80:])
    (tmp_path / "bitpix.fits").write_bytes(bad_bitpix)
    assert check_fits(tmp_path / "bitpix.fits").state is FitsState.INVALID
    assert "BITPIX" in check_fits(tmp_path / "bitpix.fits").reason
    raw[200] = 0x00  # a NUL inside the header: not a text card
    (tmp_path / "binary.fits").write_bytes(bytes(raw))
    assert check_fits(tmp_path / "binary.fits").state is FitsState.INVALID


def test_gzip(tmp_path: Path) -> None:
    path = tmp_path / "a.fits.gz"
    fits.PrimaryHDU(np.arange(200 * 150, dtype=np.int32).reshape(200, 150)).writeto(path)
    assert check_fits(path).state is FitsState.COMPLETE
    raw = path.read_bytes()
    for keep in (1, 10, len(raw) // 2, len(raw) - 4):  # the last cut removes only part of the trailer
        cut = tmp_path / f"cut{keep}.fits.gz"
        cut.write_bytes(raw[:keep])
        assert check_fits(cut).state is FitsState.INCOMPLETE, keep
    short_fits = tmp_path / "short.fits.gz"  # a whole gzip stream of half a FITS file
    short_fits.write_bytes(gzip.compress(fits_bytes()[:10000]))
    assert check_fits(short_fits).state is FitsState.INCOMPLETE
    text = tmp_path / "text.fits.gz"
    text.write_bytes(gzip.compress(b"not an image"))
    assert check_fits(text).state is FitsState.INVALID


def test_check_leaves_the_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "a.fits.gz"
    path.write_bytes(gzip.compress(fits_bytes()))
    before = path.stat()
    check_fits(path)
    after = path.stat()
    assert (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns)


def test_check_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        check_fits(tmp_path / "gone.fits")


# -- WatchConfig ------------------------------------------------------------------------------------------


def test_config_defaults_and_normalisation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = WatchConfig(Path("frames"), ignore_dirs=[Path("frames/out")])  # type: ignore[arg-type]
    assert config.root == tmp_path / "frames"
    assert config.ignore_dirs == (tmp_path / "frames" / "out",)
    assert tuple(f"*{s}" for s in FITS_SUFFIXES) == DEFAULT_PATTERNS
    assert (config.recursive, config.polling, config.settle) == (True, False, 2.0)
    assert (config.poll_interval, config.reconcile_interval) == (1.0, 30.0)


@pytest.mark.parametrize("bad", [{"settle": -1.0}, {"poll_interval": 0.0}, {"reconcile_interval": 0.0},
                                 {"stale_after": -5.0}, {"patterns": ()}])
def test_config_rejects_bad_values(tmp_path: Path, bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        WatchConfig(tmp_path, **bad)  # type: ignore[arg-type]


def test_start_on_missing_folder(tmp_path: Path) -> None:
    watcher = Watcher(WatchConfig(tmp_path / "nowhere"), lambda path: None)
    with pytest.raises(ConfigError, match="does not exist"):
        watcher.start()
    watcher.stop()


# -- the watcher, with real observers --------------------------------------------------------------------


@pytest.mark.parametrize("polling", MODES)
def test_atomic_writes_delivered_once(tmp_path: Path, watch: Start,
                                      polling: bool) -> None:
    # Reconcile scans run during the quiet period too: they must not deliver again.
    _, recorder = watch(polling, reconcile_interval=SETTLE)
    names = ["l1.fits", "l2.FIT", "l3.fts.fz"]
    for seed, name in enumerate(names):
        write_atomic(tmp_path / name, fits_bytes(seed=seed))
    got = recorder.take(len(names))
    os.chmod(tmp_path / names[0], 0o600)  # an event for a file already delivered, unchanged
    recorder.assert_quiet()
    assert sorted(d.path.name for d in got) == sorted(names)
    assert all(d.state is FitsState.COMPLETE for d in got)


@pytest.mark.parametrize("polling", MODES)
def test_chunked_write_delivered_only_when_complete(
        tmp_path: Path, watch: Start, polling: bool) -> None:
    _, recorder = watch(polling)
    data = fits_bytes(shape=(300, 400))
    writer = ChunkedWriter(tmp_path / "slow.fits", data, chunks=10, pause=0.06, long_pause=3 * SETTLE)
    writer.start()
    try:
        (delivery,) = recorder.take()
    finally:
        writer.finish()
    assert writer.done.is_set(), "delivered before the writer finished"
    assert delivery.size == len(data)
    assert delivery.state is FitsState.COMPLETE
    recorder.assert_quiet()


@pytest.mark.parametrize("polling", MODES)
def test_temp_then_rename_delivered_under_final_name(
        tmp_path: Path, watch: Start, polling: bool) -> None:
    _, recorder = watch(polling)
    part = tmp_path / "x.fits.part"
    part.write_bytes(fits_bytes())
    os.rename(part, tmp_path / "x.fits")
    (delivery,) = recorder.take()
    assert delivery.path == tmp_path / "x.fits"
    recorder.assert_quiet()


# Nested folders made at once race inside watchdog's inotify emitter: it adds the watch on the inner
# folder twice (walking the new outer folder, and on the inner folder's own create event) and warns that
# it overwrites the first; harmless, but filterwarnings=error would kill watchdog's thread over it.
@pytest.mark.filterwarnings("ignore:Callback with id .* already exists:RuntimeWarning")
@pytest.mark.parametrize("polling", MODES)
def test_subfolder_made_after_start(tmp_path: Path, watch: Start,
                                    polling: bool) -> None:
    _, recorder = watch(polling)
    night = tmp_path / "2024-03-09" / "M42"
    night.mkdir(parents=True)
    # Written at once, racing the watch that watchdog adds for the new folder.
    write_atomic(night / "a.fits", fits_bytes(seed=1))
    (first,) = recorder.take()
    write_atomic(night / "b.fits", fits_bytes(seed=2))
    (second,) = recorder.take()
    assert (first.path, second.path) == (night / "a.fits", night / "b.fits")


def test_ignored_names_never_delivered(tmp_path: Path, watch: Start) -> None:
    out = tmp_path / "out"
    state = tmp_path / "state"
    for folder in (out, state, tmp_path / ".cache"):
        folder.mkdir()
    (state / "journal.fits").write_bytes(fits_bytes())  # there before the start: the scan skips it
    (tmp_path / ".cache" / "thumb.fits").write_bytes(fits_bytes())
    _, recorder = watch(ignore_dirs=(out, state))
    ignored = [".x.fits", "x.fits.part", "X.FITS.TMP", "~x.fits", "x.fits~", "notes.txt",
               "out/stack.fits", "state/checkpoint.fits", ".hidden/y.fits"]
    for name in ignored:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(fits_bytes())
    write_atomic(tmp_path / "Z.FITS", fits_bytes())  # matched case-insensitively
    (delivery,) = recorder.take()
    recorder.assert_quiet()
    assert delivery.path == tmp_path / "Z.FITS"


@pytest.mark.parametrize("polling", MODES)
def test_existing_files_delivered_in_time_order(
        tmp_path: Path, watch: Start, polling: bool) -> None:
    now = time.time()
    ages = {"a.fits": 100, "b.fits": 300, "sub/c.fits": 200, "d.fits": 300}  # b and d tie: by name
    for name, age in ages.items():
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(fits_bytes())
        os.utime(path, (now - age, now - age))
    write_atomic(tmp_path / "young.fits", fits_bytes())  # just written: waits for settle, comes last
    _, recorder = watch(polling)
    got = [d.path.relative_to(tmp_path).as_posix() for d in recorder.take(5)]
    assert got == ["b.fits", "d.fits", "sub/c.fits", "a.fits", "young.fits"]
    recorder.assert_quiet()


def test_close_event_delivers_without_settle(tmp_path: Path,
                                             watch: Start) -> None:
    # With settle at 30 s only inotify's close-after-write (watchdog's FileClosedEvent) can deliver
    # within the deadline: this checks that watchdog reports it on this platform.
    _, recorder = watch(settle=30.0)
    written = time.monotonic()
    (tmp_path / "closed.fits").write_bytes(fits_bytes())
    (delivery,) = recorder.take(timeout=5.0)
    assert delivery.at - written < 5.0


def test_garbage_delivered_after_settle(tmp_path: Path, watch: Start) -> None:
    _, recorder = watch()
    path = tmp_path / "junk.fits"
    path.write_text("this is not an image\n")
    written = time.monotonic()
    (delivery,) = recorder.take()
    assert delivery.path == path and delivery.state is FitsState.INVALID
    assert delivery.at - written >= SETTLE * 0.9  # invalid files wait for settle even after a close
    recorder.assert_quiet()


def test_rewritten_file_delivered_again(tmp_path: Path, watch: Start) -> None:
    _, recorder = watch()
    path = tmp_path / "again.fits"
    write_atomic(path, fits_bytes(shape=(50, 60)))
    (first,) = recorder.take()
    write_atomic(path, fits_bytes(shape=(150, 60)))  # another size: another version of the file
    (second,) = recorder.take()
    assert first.path == second.path == path and first.size != second.size
    recorder.assert_quiet()


def test_reconcile_delivers_missed_files(tmp_path: Path, watch: Start,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    watcher, recorder = watch(reconcile_interval=0.5)
    forward = watcher._event
    dropped = threading.Event()

    def lossy(kind: _Kind, path: Path) -> None:
        # As if the inotify queue overflowed for this file: its events never reach the watcher.
        if path.name.startswith("missed"):
            dropped.set()
            return
        forward(kind, path)

    monkeypatch.setattr(watcher, "_event", lossy)
    write_atomic(tmp_path / "missed.fits", fits_bytes())
    write_atomic(tmp_path / "seen.fits", fits_bytes(seed=3))
    got = {d.path.name for d in recorder.take(2)}
    assert got == {"missed.fits", "seen.fits"}
    assert dropped.is_set()
    recorder.assert_quiet()


def test_stale_incomplete_file_reported_then_delivered_when_finished(
        tmp_path: Path, watch: Start) -> None:
    _, recorder = watch(stale_after=0.6)
    data = fits_bytes()
    path = tmp_path / "stalled.fits"
    with open(path, "wb") as handle:  # the writer stalls with the file open
        handle.write(data[:5000])
        handle.flush()
        problem_path, reason = recorder.problems.get(timeout=DEADLINE)
        assert problem_path == path and "still being written: 5,000 of" in reason
        assert reason.startswith("truncated: incomplete and unchanged for 0.6 s")
        recorder.assert_quiet(0.1)
        handle.write(data[5000:])  # the writer comes back and finishes
    (delivery,) = recorder.take()
    assert delivery.size == len(data)


@pytest.mark.parametrize("how", ["closed", "renamed"])
def test_a_file_closed_short_is_reported_at_once_and_delivered_when_completed(
        tmp_path: Path, watch: Start, how: str) -> None:
    # stale_after far beyond the deadline: only the writer's close can make the report come in time.
    _, recorder = watch(stale_after=600.0)
    data = fits_bytes()
    path = tmp_path / "cut.fits"
    if how == "closed":
        path.write_bytes(data[:5000])
    else:
        write_atomic(path, data[:5000])
    started = time.monotonic()
    problem_path, reason = recorder.problems.get(timeout=DEADLINE)
    assert time.monotonic() - started < 5.0
    assert problem_path == path
    assert reason == f"truncated: its writer closed it at 5,000 of {len(data):,} bytes"
    recorder.assert_quiet(0.2)
    with open(path, "ab") as handle:  # the copy is resumed and finished
        handle.write(data[5000:])
    (delivery,) = recorder.take(timeout=5.0)
    assert delivery.path == path and delivery.size == len(data) and delivery.state is FitsState.COMPLETE
    assert recorder.problems.empty()


def test_file_removed_before_complete_is_dropped(tmp_path: Path,
                                                 watch: Start) -> None:
    _, recorder = watch(stale_after=0.5)
    path = tmp_path / "aborted.fits"
    with open(path, "wb") as handle:  # the writer gives up and removes its file before closing it
        handle.write(fits_bytes()[:4000])
        handle.flush()
        path.unlink()
    write_atomic(tmp_path / "next.fits", fits_bytes())
    (delivery,) = recorder.take()
    assert delivery.path.name == "next.fits"
    recorder.assert_quiet()
    assert recorder.problems.empty()


def test_failing_callback_does_not_stop_the_watch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    delivered: queue.Queue[Path] = queue.Queue()

    def on_frame(path: Path, completed: float) -> None:
        delivered.put(path)
        if path.name == "first.fits":
            raise RuntimeError("the daemon's queue is full")

    with Watcher(make_config(tmp_path), on_frame):
        write_atomic(tmp_path / "first.fits", fits_bytes())
        assert delivered.get(timeout=DEADLINE).name == "first.fits"
        write_atomic(tmp_path / "second.fits", fits_bytes())
        assert delivered.get(timeout=DEADLINE).name == "second.fits"
    assert "on_frame failed" in caplog.text


@pytest.mark.parametrize("polling", MODES)
def test_stop_joins_promptly(tmp_path: Path, polling: bool) -> None:
    before = set(threading.enumerate())
    # Default timings (1 s polls, 2 s settle, 30 s reconcile) with a candidate pending: stop must not
    # wait for any of them.
    watcher = Watcher(WatchConfig(tmp_path, polling=polling), lambda path, completed: None)
    with watcher:
        (tmp_path / "pending.fits").write_bytes(fits_bytes()[:3000])
        assert len(set(threading.enumerate()) - before) >= 2  # an observer and the worker at least
        started = time.monotonic()
    assert time.monotonic() - started < 1.0
    assert set(threading.enumerate()) <= before
    watcher.stop()  # a second stop is harmless
    with pytest.raises(RuntimeError):
        watcher.start()


# -- what the writer's completion means, and the watched folder replaced ------------------------------------


@pytest.mark.parametrize("style", ["chmod after close", "utime after close"])
def test_a_metadata_change_after_the_close_does_not_restart_the_settle_wait(
        tmp_path: Path, watch: Start, style: str) -> None:
    # shutil.copy ends with a chmod, shutil.copy2 and some copy tools with a utime, after the close.
    _, recorder = watch(settle=30.0)
    path = tmp_path / "copied.fits"
    path.write_bytes(fits_bytes())
    closed = time.time()
    if style == "chmod after close":
        os.chmod(path, 0o640)
    else:
        os.utime(path, (1_000_000_000, 1_000_000_000))
    (delivery,) = recorder.take(timeout=5.0)
    assert delivery.size == path.stat().st_size and delivery.state is FitsState.COMPLETE
    # Whole from the close: not later than the writer's last call returned (plus the event's trip).
    assert delivery.completed <= time.time() and delivery.completed - closed < 0.1
    # When the watcher lags behind its events, the create event can find the file whole and deliver it before
    # the write's own events are read, which then stat the utime'd file: that version may come once more (the
    # daemon's content hash counts it once). Never a third time, and never another size.
    extra = recorder.drain(QUIET)
    assert len(extra) <= 1 and all((e.path, e.size) == (path, delivery.size) for e in extra), extra


@pytest.mark.parametrize("style", ["chmod", "utime", "touch"])
def test_a_metadata_change_after_the_delivery_does_not_deliver_it_again(
        tmp_path: Path, watch: Start, style: str) -> None:
    # A frame moved in whole is delivered at once; a chmod, utime or touch afterwards (a copy tool's last act,
    # a backup tool, a user) is the same content with a new mtime, not a new version of the file.
    root, beside = tmp_path / "frames", tmp_path / "beside"
    root.mkdir()
    beside.mkdir()
    _, recorder = watch(root=root)
    (beside / "copied.fits").write_bytes(fits_bytes())
    path = root / "copied.fits"
    os.rename(beside / "copied.fits", path)
    (delivery,) = recorder.take()
    if style == "chmod":
        os.chmod(path, 0o640)
    elif style == "utime":
        os.utime(path, (1_000_000_000, 1_000_000_000))
    else:
        os.utime(path)
    recorder.assert_quiet(period=5 * SETTLE)
    # A real rewrite afterwards (same size, new mtime) is still a new version, delivered again.
    path.write_bytes(fits_bytes())
    (again,) = recorder.take()
    assert again.path == delivery.path


def test_a_file_moved_in_from_outside_is_whole_at_once(tmp_path: Path, watch: Start) -> None:
    root = tmp_path / "frames"
    beside = tmp_path / "beside"
    root.mkdir()
    beside.mkdir()
    _, recorder = watch(root=root, settle=30.0)
    (beside / "m.fits").write_bytes(fits_bytes())
    os.rename(beside / "m.fits", root / "m.fits")
    moved = time.time()
    (delivery,) = recorder.take(timeout=5.0)
    assert delivery.path == root / "m.fits"
    assert moved - 0.5 < delivery.completed <= moved + 0.1


def test_when_polling_completed_is_the_last_change_not_the_end_of_the_settle_wait(
        tmp_path: Path, watch: Start) -> None:
    _, recorder = watch(polling=True, settle=1.0)
    path = tmp_path / "polled.fits"
    path.write_bytes(fits_bytes())
    written = time.time()
    (delivery,) = recorder.take()
    assert delivery.wall - written >= 1.0  # it did wait for the settle time, and says so
    assert written - 0.1 <= delivery.completed <= written + 0.05


@pytest.mark.parametrize("polling", MODES)
@pytest.mark.parametrize("how", ["deleted and made again", "swapped with mv"])
def test_the_watched_folder_replaced_is_followed(tmp_path: Path, watch: Start, polling: bool,
                                                 how: str) -> None:
    root = tmp_path / "frames"
    root.mkdir()
    _, recorder = watch(polling, root=root, settle=SETTLE if polling else 30.0)
    write_atomic(root / "before.fits", fits_bytes(seed=1))
    assert recorder.take()[0].path == root / "before.fits"
    if how == "deleted and made again":
        for child in root.iterdir():
            child.unlink()
        root.rmdir()
        root.mkdir()
        (root / "after.fits").write_bytes(fits_bytes(seed=2))
    else:
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        (fresh / "after.fits").write_bytes(fits_bytes(seed=2))
        os.rename(root, tmp_path / "old")
        os.rename(fresh, root)
    replaced = time.monotonic()
    (delivery,) = recorder.take(timeout=5.0)
    assert delivery.path == root / "after.fits" and delivery.state is FitsState.COMPLETE
    if not polling:
        assert delivery.at - replaced < 2.0  # noticed within a second or two, not at a reconcile
    # And the new folder is watched from then on.
    write_atomic(root / "later.fits", fits_bytes(seed=3))
    assert recorder.take()[0].path == root / "later.fits"
    recorder.assert_quiet()


def test_the_watched_folder_gone_for_a_while_is_watched_again(tmp_path: Path, watch: Start,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "frames"
    root.mkdir()
    _, recorder = watch(root=root)
    root.rmdir()
    time.sleep(1.0)  # several looks at the folder while it is missing: nothing breaks
    root.mkdir()
    write_atomic(root / "back.fits", fits_bytes())
    assert recorder.take()[0].path == root / "back.fits"
    assert "is gone" in caplog.text


# -- what is not a regular file --------------------------------------------------------------------------


def _make_hostile(root: Path, outside: Path) -> dict[str, str]:
    """Things named like frames that must never be opened; each with the words its report must hold."""
    os.mkfifo(root / "pipe.fits")
    (root / "folder.fits").mkdir()
    os.symlink(root / "missing.fits.nothing", root / "dangling.fits")
    os.symlink("loop.fits", root / "loop.fits")  # a link to itself: a loop from the start
    os.symlink("/dev/urandom", root / "random.fits")
    (outside / "elsewhere.fits").write_bytes(fits_bytes(seed=4))
    os.symlink(outside / "elsewhere.fits", root / "outside.fits")
    return {"pipe.fits": "FIFO", "folder.fits": "a folder", "dangling.fits": "to nothing",
            "loop.fits": "loops", "random.fits": "outside the watched folder",
            "outside.fits": "outside the watched folder"}


@pytest.mark.parametrize("when", ["at start", "while watching"])
def test_what_is_not_a_regular_file_is_reported_never_opened(tmp_path: Path, watch: Start, when: str) -> None:
    root = tmp_path / "frames"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    expected: dict[str, str] = {}
    if when == "at start":
        expected = _make_hostile(root, outside)
    _, recorder = watch(root=root)
    if when == "while watching":
        expected = _make_hostile(root, outside)
    # A link inside the folder to a frame inside it is followed.
    write_atomic(root / "real.fits", fits_bytes(seed=5))
    os.symlink(root / "real.fits", root / "alias.fits")
    got = {d.path.name for d in recorder.take(2)}
    assert got == {"real.fits", "alias.fits"}
    reports: dict[str, str] = {}
    deadline = time.monotonic() + DEADLINE
    while len(reports) < len(expected) and time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            path, reason = recorder.problems.get(timeout=0.2)
            assert path.name not in reports, f"{path.name} reported twice"
            reports[path.name] = reason
    assert sorted(reports) == sorted(expected)
    for name, words in expected.items():
        assert words in reports[name], (name, reports[name])
    recorder.assert_quiet()
    assert recorder.problems.empty()


def test_a_link_outside_is_followed_when_configured(tmp_path: Path, watch: Start) -> None:
    root = tmp_path / "frames"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    _, recorder = watch(root=root, follow_symlinks=True)
    (outside / "elsewhere.fits").write_bytes(fits_bytes())
    os.symlink(outside / "elsewhere.fits", root / "outside.fits")
    (delivery,) = recorder.take()
    assert delivery.path == root / "outside.fits" and delivery.state is FitsState.COMPLETE
    assert recorder.problems.empty()
