"""How capture programs and copy tools write frames, each through a live daemon to its ``accepted`` event.

For each write style the writer's own clock says when it finished (the moment its last call returned); a
listener on the daemon notes when the frame's ``accepted`` event goes out. That difference is what the user
waited; the daemon's reported ``latency`` must not be more than 0.1 s below it (it starts when the file was
known whole, which is never after the writer finished). With OS events the settle time is set to a minute:
a style that reaches ``accepted`` in seconds did not wait for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from livestack import events
from livestack.config import Config
from livestack.live.daemon import Daemon
from livestack.live.notify import Notifier
from livestack.simulate import SimConfig, simulate

LOOPBACK = "tcp://127.0.0.1:*"
SIZE = (480, 360)
#: Seconds any single wait may take before the test fails (two cores shared with other suites).
WAIT = 30.0
#: With OS events: far beyond any wait below, so that a style that waits for it fails.
LONG_SETTLE = 300.0
#: The reported latency may be below the writer's measurement by this much at most (clock reads, the hop
#: from the network thread to the listener).
TOLERANCE = 0.1


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four frames of one field (distinct content), rendered once."""
    folder = tmp_path_factory.mktemp("styles-staged")
    sim = SimConfig(frames=4, interval=10.0, size=SIZE, n_stars=250, seed=21)
    return simulate(folder, sim, sleep=lambda _s: None)


class Accepted:
    """A daemon listener: when each frame's verdict went out (wall clock), and the event itself."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.verdicts: dict[str, tuple[float, dict[str, Any]]] = {}

    def __call__(self, event: events.Event) -> None:
        if event.topic == "frame" and event["verdict"] != "received":
            with self._cond:
                self.verdicts[event["name"]] = (time.time(), dict(event.payload))
                self._cond.notify_all()

    def wait(self, name: str, timeout: float = WAIT) -> tuple[float, dict[str, Any]]:
        with self._cond:
            if not self._cond.wait_for(lambda: name in self.verdicts, timeout):
                pytest.fail(f"no verdict for {name} within {timeout:g} s; saw {sorted(self.verdicts)}")
            return self.verdicts[name]


@contextlib.contextmanager
def daemon_on(tmp_path: Path, polling: bool, listener: Accepted) -> Iterator[Daemon]:
    (tmp_path / "frames").mkdir()
    config = Config(base=tmp_path).with_overrides({
        "watch.folder": "frames", "output.folder": "out", "state.folder": "state",
        "watch.polling": polling, "watch.settle": 1.0 if polling else LONG_SETTLE,
        "watch.poll_interval": 0.1, "network.publish": LOOPBACK, "network.control": LOOPBACK,
        "output.every_frames": 0, "output.every_seconds": 0.0, "output.image_format": "png",
        "wcs.solve": "off"})
    daemon = Daemon(config, notifier=Notifier(environ={}), listeners=(listener,))
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


# -- the write styles: each writes ``source`` as ``name`` into ``watch`` and returns when it finished --------


def plain_copy_with_chmod(source: Path, watch: Path, name: str) -> Path:
    """shutil.copy: write, close, then chmod (a metadata event after the close)."""
    return Path(shutil.copy(source, watch / name))


def cp_preserve(source: Path, watch: Path, name: str) -> Path:
    """cp -p: the copy keeps the source's mode and times."""
    subprocess.run(["cp", "-p", str(source), str(watch / name)], check=True)
    return watch / name


def rsync_copy(source: Path, watch: Path, name: str) -> Path:
    """rsync: a hidden temporary name in the folder, times and mode set, renamed into place."""
    subprocess.run(["rsync", "-t", str(source), str(watch / name)], check=True)
    return watch / name


def moved_from_beside(source: Path, watch: Path, name: str) -> Path:
    """Written beside the watched folder, then moved into it (mv on one filesystem is a rename)."""
    beside = watch.parent / "beside"
    beside.mkdir(exist_ok=True)
    shutil.copyfile(source, beside / name)
    os.rename(beside / name, watch / name)
    return watch / name


def temp_then_rename(source: Path, watch: Path, name: str) -> Path:
    shutil.copyfile(source, watch / f"{name}.part")
    os.replace(watch / f"{name}.part", watch / name)
    return watch / name


def slow_megabyte_per_second(source: Path, watch: Path, name: str) -> Path:
    """Written in place at 1 MB/s, 64 kB at a time (a slow share or camera link)."""
    data = source.read_bytes()
    step = 65536
    start = time.monotonic()
    with open(watch / name, "wb") as handle:
        for offset in range(0, len(data), step):
            handle.write(data[offset:offset + step])
            handle.flush()
            time.sleep(max(0.0, start + (offset + step) / 1e6 - time.monotonic()))
    return watch / name


def new_subfolder(source: Path, watch: Path, name: str) -> Path:
    """A dated folder made for the night, the frame copied into it at once."""
    night = watch / "2026-11-30"
    night.mkdir()
    shutil.copyfile(source, night / name)
    return night / name


def folder_made_again(source: Path, watch: Path, name: str) -> Path:
    """The watched folder deleted and made again (a capture program clearing it), then a frame copied in."""
    shutil.rmtree(watch)
    watch.mkdir()
    shutil.copyfile(source, watch / name)
    return watch / name


def folder_swapped(source: Path, watch: Path, name: str) -> Path:
    """Another folder, holding the frame already, moved to the watched folder's path (mv)."""
    fresh = watch.parent / "fresh"
    fresh.mkdir()
    shutil.copyfile(source, fresh / name)
    os.rename(watch, watch.parent / "old")
    os.rename(fresh, watch)
    return watch / name


STYLES: dict[str, Callable[[Path, Path, str], Path]] = {
    "shutil.copy": plain_copy_with_chmod,
    "cp -p": cp_preserve,
    "rsync": rsync_copy,
    "mv from beside": moved_from_beside,
    "temp+rename": temp_then_rename,
    "1 MB/s": slow_megabyte_per_second,
    "new subfolder": new_subfolder,
    "folder made again": folder_made_again,
    "folder swapped": folder_swapped,
}


def run_style(tmp_path: Path, frames: list[Path], style: str, polling: bool) -> None:
    if style == "rsync" and shutil.which("rsync") is None:
        pytest.skip("rsync is not installed on this machine")
    listener = Accepted()
    with daemon_on(tmp_path, polling, listener) as daemon:
        watch = daemon.watch_dir
        # A first frame, the reference, through the quickest path (its wait is not what is measured).
        temp_then_rename(frames[0], watch, "first.fits")
        assert listener.wait("first.fits")[1]["verdict"] == "accepted"
        written = STYLES[style](frames[1], watch, "measured.fits")
        finished = time.time()
        sent, event = listener.wait("measured.fits")
    assert event["verdict"] == "accepted", event["reason"]
    assert event["path"] == str(written)
    waited = sent - finished
    assert event["latency"] >= waited - TOLERANCE, (
        f"{style}: reported latency {event['latency']:.3f} s, but the writer waited {waited:.3f} s")
    if not polling:
        assert waited < LONG_SETTLE / 10, f"{style}: {waited:.1f} s: waited for the settle time"
    # The journal's latency starts at the same moment (it is written just before the event is made).
    lines = (tmp_path / "state" / "journal.jsonl").read_text().splitlines()
    (entry,) = [e for e in map(json.loads, lines) if e["path"] == str(written)]
    assert event["latency"] - 0.5 <= entry["latency"] <= event["latency"]


@pytest.mark.parametrize("style", list(STYLES))
def test_each_write_style_is_accepted_without_the_settle_wait_and_latency_is_the_writers(
        tmp_path: Path, frames: list[Path], style: str) -> None:
    run_style(tmp_path, frames, style, polling=False)


@pytest.mark.parametrize("style", ["shutil.copy", "cp -p", "temp+rename", "1 MB/s", "folder made again"])
def test_when_polling_latency_counts_from_the_last_change_of_the_file(
        tmp_path: Path, frames: list[Path], style: str) -> None:
    run_style(tmp_path, frames, style, polling=True)
