"""The dashboard attached to a real daemon in this process, as ``livestack run --tui`` and the demo run it.

A ``Daemon`` watches a temporary folder with loopback sockets on ephemeral ports; simulated frames are
moved into the folder; Textual's pilot reads the widgets and presses the keys. No fake on either side.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from textual.pilot import Pilot
from textual.widgets import DataTable, RichLog, Static

from livestack.clients.tui.app import LivestackApp, run_app
from livestack.clients.tui.widgets import PreviewView
from livestack.config import Config
from livestack.live.daemon import Daemon
from livestack.live.notify import Notifier
from livestack.simulate import SimConfig, simulate

LOOPBACK = "tcp://127.0.0.1:*"
#: Seconds any one wait may take (two cores shared with other suites).
WAIT = 20.0


@pytest.fixture
def frames(tmp_path: Path) -> list[Path]:
    """Five small simulated frames in a staging folder, to be moved into the watched one when wanted."""
    staging = tmp_path / "staging"
    simulate(staging, SimConfig(frames=5, interval=0, size=(480, 360), n_stars=250, seed=5),
             sleep=lambda _s: None)
    return sorted(staging.glob("*.fits"))


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    watch = tmp_path / "frames"
    watch.mkdir()
    config = Config(base=tmp_path).with_overrides({
        "watch.folder": str(watch), "output.folder": str(tmp_path / "out"),
        "watch.settle": 0.3, "watch.poll_interval": 0.1,
        "network.publish": LOOPBACK, "network.control": LOOPBACK, "network.preview_interval": 0.5,
        "output.image_format": "png", "output.every_frames": 0, "output.every_seconds": 0,
    })
    running = Daemon(config, notifier=Notifier(environ={}))
    running.start()
    try:
        yield running
    finally:
        running.stop()


def _arrive(paths: list[Path], daemon: Daemon) -> None:
    # A rename is how a capture program finishing a file looks: complete at once.
    for path in paths:
        os.replace(path, daemon.watch_dir / path.name)


def _text(widget: Static) -> str:
    console = Console(width=max(widget.size.width, 60), file=io.StringIO(), record=True)
    console.print(widget.content)
    return " ".join(console.export_text().split())


def _log_text(app: LivestackApp) -> str:
    return "\n".join(strip.text for strip in app.query_one("#log", RichLog).lines)


async def _wait_for(pilot: Pilot[Any], condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def test_dashboard_follows_and_controls_a_real_daemon(daemon: Daemon, frames: list[Path]) -> None:
    async def scenario() -> None:
        app = LivestackApp(daemon.publish_endpoint, daemon.control_endpoint, attached=True,
                           control_timeout=WAIT)
        async with app.run_test(size=(120, 40)) as pilot:
            def counters() -> str:
                return _text(app.query_one("#counters", Static))

            def header() -> str:
                return _text(app.query_one("#header", Static))

            table = app.query_one("#frames", DataTable)

            # The heartbeat reaches a dashboard that connected after the daemon started.
            await _wait_for(pilot, app.heard.is_set, "the daemon's first event")
            await _wait_for(pilot, lambda: "connected" in header() and "waiting for frames" in header(),
                            "the header to show a connected, waiting daemon")

            # Frames arrive: the table and the counters follow, the preview comes with a stack event.
            _arrive(frames[:4], daemon)
            await _wait_for(pilot, lambda: "stacked 4" in counters() and "received 4" in counters(),
                            "four frames in the counters")
            await _wait_for(pilot, lambda: table.row_count == 4
                            and all(str(table.get_row_at(i)[-1]) == "accepted" for i in range(4)),
                            "four accepted rows")
            assert [str(table.get_row_at(i)[2]) for i in range(4)] == [p.name for p in reversed(frames[:4])]
            assert "SIM-FIELD" in header()
            await _wait_for(pilot, lambda: app.query_one("#preview", PreviewView).image is not None,
                            "the stack preview")

            # p pauses the daemon itself: a new frame waits in its queue.
            await pilot.press("p")
            await _wait_for(pilot, lambda: daemon.status()["state"] == "paused", "the daemon to pause")
            await _wait_for(pilot, lambda: "paused" in header(), "the header to say paused")
            assert "pause: done" in _log_text(app)
            _arrive(frames[4:], daemon)
            await _wait_for(pilot, lambda: "queue 1" in counters(), "the new frame queued")
            assert daemon.stats.received == 4 and "stacked 4" in counters()

            # p again resumes, and the queued frame is stacked.
            await pilot.press("p")
            await _wait_for(pilot, lambda: "stacked 5" in counters(), "the fifth frame stacked")
            assert daemon.status()["state"] != "paused"

            # s writes a snapshot now (none is scheduled), and the log says where.
            out = daemon.output_dir
            assert not list(out.rglob("stack.fits"))
            await pilot.press("s")
            await _wait_for(pilot, lambda: "snapshot: done" in _log_text(app), "the snapshot's reply")
            await _wait_for(pilot, lambda: "snapshot of 5 frames (request)" in _log_text(app),
                            "the snapshot event in the log")
            assert sorted(p.name for p in out.rglob("stack.*")) == ["stack.fits", "stack.png"]

    asyncio.run(scenario())


def test_run_app_sets_terminal_logging_aside_and_closes_when_the_daemon_stops() -> None:
    root = logging.getLogger()
    handlers_before = root.handlers[:]
    seen: list[list[logging.Handler]] = []

    def stop_requested(timeout: float) -> bool:
        # Asked from the watching thread while the dashboard owns the terminal: record what a log call
        # would reach, then say that the daemon is stopping, at once (before the app may even be up).
        seen.append(root.handlers[:])
        return True

    started = time.monotonic()
    run_app(LivestackApp(None, None, attached=True), stop_requested=stop_requested, headless=True)
    assert time.monotonic() - started < WAIT
    assert len(seen) == 1 and all(isinstance(h, logging.NullHandler) for h in seen[0])
    assert root.handlers == handlers_before
