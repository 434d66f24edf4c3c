"""Files that could hang, exhaust or fool the live daemon: each rejected with a reason, journaled, published.

A FIFO, a link to /dev/urandom, a folder named like a frame, links to nothing or in a loop: never opened, each
a ``rejected`` frame event and a journal line with the reason, and stacking goes on. A frame its writer closed
short is rejected at once and taken when completed. A sparse file whose header claims 20000 x 20000 pixels is
rejected from its header, without the memory its pixels would take.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from astropy.io import fits

from livestack import events
from livestack.config import Config
from livestack.errors import FrameError
from livestack.live.daemon import Daemon
from livestack.live.notify import Notifier
from livestack.pipeline import Stacker
from livestack.simulate import SimConfig, simulate
from livestack.stages.frames import read_frame

LOOPBACK = "tcp://127.0.0.1:*"
SIZE = (480, 360)
WAIT = 30.0


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("hostile-staged")
    return simulate(folder, SimConfig(frames=3, interval=10.0, size=SIZE, n_stars=250, seed=31),
                    sleep=lambda _s: None)


class Verdicts:
    """A daemon listener: the last verdict event of each file name."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.by_name: dict[str, dict[str, Any]] = {}

    def __call__(self, event: events.Event) -> None:
        if event.topic == "frame" and event["verdict"] != "received":
            with self._cond:
                self.by_name[event["name"]] = dict(event.payload)
                self._cond.notify_all()

    def wait(self, condition: Callable[[dict[str, dict[str, Any]]], bool], what: str,
             timeout: float = WAIT) -> dict[str, dict[str, Any]]:
        with self._cond:
            if not self._cond.wait_for(lambda: condition(self.by_name), timeout):
                pytest.fail(f"no {what} within {timeout:g} s; verdicts: "
                            f"{ {n: (p['verdict'], p['reason']) for n, p in self.by_name.items()} }")
            return dict(self.by_name)


@contextlib.contextmanager
def daemon_on(tmp_path: Path, verdicts: Verdicts, **overrides: Any) -> Iterator[Daemon]:
    (tmp_path / "frames").mkdir(exist_ok=True)
    values: dict[str, Any] = {
        "watch.folder": "frames", "output.folder": "out", "state.folder": "state", "watch.settle": 0.3,
        "watch.poll_interval": 0.1, "network.publish": LOOPBACK, "network.control": LOOPBACK,
        "output.every_frames": 0, "output.every_seconds": 0.0, "output.image_format": "png",
        "wcs.solve": "off"}
    values.update(overrides)
    daemon = Daemon(Config(base=tmp_path).with_overrides(values), notifier=Notifier(environ={}),
                    listeners=(verdicts,))
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


def journal(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "state" / "journal.jsonl").read_text().splitlines()]


def test_what_is_not_a_regular_file_is_rejected_with_a_reason_and_stacking_goes_on(
        tmp_path: Path, frames: list[Path]) -> None:
    verdicts = Verdicts()
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(frames[2], outside / "elsewhere.fits")
    with daemon_on(tmp_path, verdicts) as daemon:
        watch = daemon.watch_dir
        shutil.copy(frames[0], watch / "good-1.fits")
        os.mkfifo(watch / "pipe.fits")
        os.symlink("/dev/urandom", watch / "random.fits")
        (watch / "folder.fits").mkdir()
        os.symlink(watch / "nothing-here", watch / "dangling.fits")
        os.symlink("loop.fits", watch / "loop.fits")  # a link to itself: a loop from the start
        os.symlink(outside / "elsewhere.fits", watch / "outside.fits")
        shutil.copy(frames[1], watch / "good-2.fits")
        hostile = {"pipe.fits": "FIFO", "random.fits": "outside the watched folder", "folder.fits": "folder",
                   "dangling.fits": "to nothing", "loop.fits": "loops",
                   "outside.fits": "outside the watched folder"}
        got = verdicts.wait(lambda v: set(v) >= {*hostile, "good-1.fits", "good-2.fits"}, "every verdict")
        assert daemon.stacker.count == 2
    assert got["good-1.fits"]["verdict"] == got["good-2.fits"]["verdict"] == "accepted"
    entries = {Path(e["path"]).name: e for e in journal(tmp_path)}
    for name, words in hostile.items():
        assert got[name]["verdict"] == "rejected" and words in got[name]["reason"], got[name]
        assert entries[name]["verdict"] == "rejected" and entries[name]["reason"] == got[name]["reason"]
    assert len(entries) == len(hostile) + 2  # each reported once


def test_a_frame_closed_short_is_rejected_at_once_and_taken_when_completed(
        tmp_path: Path, frames: list[Path]) -> None:
    verdicts = Verdicts()
    data = frames[1].read_bytes()
    with daemon_on(tmp_path, verdicts) as daemon:
        watch = daemon.watch_dir
        shutil.copy(frames[0], watch / "first.fits")
        verdicts.wait(lambda v: "first.fits" in v, "the first frame")
        (watch / "cut.fits").write_bytes(data[: len(data) // 2])  # an interrupted copy
        closed = time.monotonic()
        rejected = verdicts.wait(lambda v: "cut.fits" in v, "a verdict on the cut frame")["cut.fits"]
        assert time.monotonic() - closed < 10.0  # at once, not after the 120 s for a hung writer
        assert rejected["verdict"] == "rejected"
        assert rejected["reason"].startswith("truncated: its writer closed it at")
        with open(watch / "cut.fits", "ab") as handle:  # the copy is resumed and finished
            handle.write(data[len(data) // 2:])
        verdicts.wait(lambda v: v["cut.fits"]["verdict"] == "accepted", "the completed frame accepted")
        assert daemon.stacker.count == 2
    assert [(Path(e["path"]).name, e["verdict"]) for e in journal(tmp_path)] == [
        ("first.fits", "accepted"), ("cut.fits", "rejected"), ("cut.fits", "accepted")]


# -- the reader: sizes from the header, never a read that cannot end ----------------------------------------


def sparse_fits(path: Path, width: int, height: int) -> Path:
    """A FITS file whose header claims ``width`` x ``height`` 16-bit pixels, made sparse: no block written."""
    header = fits.Header([("SIMPLE", True), ("BITPIX", 16), ("NAXIS", 2), ("NAXIS1", width),
                          ("NAXIS2", height), ("EXPTIME", 10.0)])
    raw = header.tostring().encode("ascii")
    data = width * height * 2
    with open(path, "wb") as handle:
        handle.write(raw)
        handle.truncate(len(raw) + -(-data // 2880) * 2880)
    return path


def test_a_sparse_file_claiming_20000_by_20000_is_refused_from_its_header_with_little_memory(
        tmp_path: Path) -> None:
    path = sparse_fits(tmp_path / "huge.fits", 20000, 20000)
    assert path.stat().st_size > 800_000_000 and path.stat().st_blocks * 512 < 1_000_000
    # In a process of its own, so that its peak memory is its own: the growth over the imports' peak.
    probe = (
        "import resource, sys, time\n"
        "from livestack.stages.frames import read_frame\n"
        "from livestack.errors import FrameError\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "start = time.perf_counter()\n"
        "try:\n"
        "    read_frame(sys.argv[1])\n"
        "except FrameError as exc:\n"
        "    print(exc)\n"
        "print(time.perf_counter() - start)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True,
                          timeout=120, check=True)
    message, seconds, grown_kib = done.stdout.splitlines()
    assert "20000 x 20000 image (400 megapixels), more than the 100 megapixels" in message
    assert float(seconds) < 5.0
    assert int(grown_kib) < 50 * 1024, f"the peak memory grew by {int(grown_kib) / 1024:.0f} MB"


def test_the_size_limit_is_configurable_and_checked_before_reading(
        tmp_path: Path, frames: list[Path]) -> None:
    width, height = SIZE
    with pytest.raises(FrameError, match=r"480 x 360 image \(0 megapixels\), more than the 0.1 megapixels"):
        read_frame(frames[0], max_pixels=100_000)
    assert read_frame(frames[0], max_pixels=width * height).data.shape == (height, width)
    config = Config(base=tmp_path).with_overrides({"frames.max_megapixels": 0.1})
    result = Stacker(config).process(frames[0])
    assert not result.accepted and "frames.max_megapixels" in (result.reason or "")


@pytest.mark.parametrize("kind", ["FIFO", "link to /dev/urandom", "folder"])
def test_the_reader_refuses_what_is_not_a_regular_file_without_opening_it(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "odd.fits"
    if kind == "FIFO":
        os.mkfifo(path)  # opening it would block until a writer came
    elif kind == "folder":
        path.mkdir()
    else:
        os.symlink("/dev/urandom", path)  # reading it would never end
    outcome: list[BaseException] = []
    reader = threading.Thread(target=lambda: _catch(outcome, path), name="test-reader", daemon=True)
    reader.start()
    reader.join(10.0)
    if reader.is_alive():
        with open(path, "wb"):  # release the blocked open (a FIFO) so that the thread ends
            pass
        reader.join(5.0)
        pytest.fail(f"read_frame blocked on a {kind}")
    (exc,) = outcome
    assert isinstance(exc, FrameError) and "is not a regular file" in str(exc), exc


def _catch(outcome: list[BaseException], path: Path) -> None:
    try:
        read_frame(path)
    except BaseException as exc:
        outcome.append(exc)


def test_the_daemon_rejects_a_sparse_giant_from_its_header_and_goes_on(
        tmp_path: Path, frames: list[Path]) -> None:
    verdicts = Verdicts()
    with daemon_on(tmp_path, verdicts) as daemon:
        sparse_fits(daemon.watch_dir / "huge.fits", 20000, 20000)
        shutil.copy(frames[0], daemon.watch_dir / "good.fits")
        got = verdicts.wait(lambda v: {"huge.fits", "good.fits"} <= set(v), "both verdicts")
    assert got["good.fits"]["verdict"] == "accepted"
    assert got["huge.fits"]["verdict"] == "rejected"
    assert "400 megapixels" in got["huge.fits"]["reason"]
