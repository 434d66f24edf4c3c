"""The dashboard, driven by Textual's pilot against a fake daemon on real loopback sockets."""

from __future__ import annotations

import asyncio
import io
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from rich.console import Console
from textual.pilot import Pilot
from textual.widgets import DataTable, RichLog, Static

from livestack import events
from livestack.clients.tui.app import ConfirmScreen, HelpScreen, LivestackApp
from livestack.clients.tui.demo import demo_events, demo_preview
from livestack.clients.tui.model import Dashboard, format_duration
from livestack.clients.tui.widgets import HALF_BLOCK, Plot, PreviewView, fit_preview
from livestack.errors import NetworkError


class FakeDaemon:
    """A PUB and a REP socket on loopback ephemeral ports, served by one thread.

    It publishes ``status`` every 0.1 s while ``publishing`` is set (so a late subscriber catches up, as
    with the real daemon's heartbeat), publishes what is put in ``outbox``, and answers control requests,
    recording them; ``pause`` and ``resume`` change the state it reports.
    """

    def __init__(self) -> None:
        self.context: zmq.Context[Any] = zmq.Context()
        self.pub = self.context.socket(zmq.PUB)
        self.rep = self.context.socket(zmq.REP)
        self.pub.bind("tcp://127.0.0.1:*")
        self.rep.bind("tcp://127.0.0.1:*")
        self.pub_endpoint = str(self.pub.getsockopt_string(zmq.LAST_ENDPOINT))
        self.rep_endpoint = str(self.rep.getsockopt_string(zmq.LAST_ENDPOINT))
        self.state = "running"
        self.received = 5
        self.requests: list[dict[str, Any]] = []
        self.publishing = threading.Event()
        self.publishing.set()
        self.outbox: queue.Queue[events.Event] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake-daemon")
        self._thread.start()

    def status(self) -> events.Event:
        return events.make_event(
            "status", state=self.state, queue=1, lag=4.0, received=self.received, accepted=self.received - 1,
            rejected=1, exptime=120.0 * (self.received - 1), frames=self.received - 1, uptime=3725.0,
            started="2024-10-05T21:00:00+00:00", watch="/data", output="/out", method="kappa-sigma",
            object="NGC 7000", filter="Ha", session=1, last_latency=2.5, insecure=False,
        )

    def _serve(self) -> None:
        next_status = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if self.publishing.is_set() and now >= next_status:
                self.pub.send_multipart(events.encode(self.status()))
                next_status = now + 0.1
            while True:
                try:
                    self.pub.send_multipart(events.encode(self.outbox.get_nowait()))
                except queue.Empty:
                    break
            if self.rep.poll(20, zmq.POLLIN):
                request = events.decode_request(self.rep.recv())
                self.requests.append(request)
                if request["cmd"] == "pause":
                    self.state = "paused"
                elif request["cmd"] == "resume":
                    self.state = "running"
                self.rep.send(events.ok_reply(state=self.state))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.pub.close(linger=0)
        self.rep.close(linger=0)
        self.context.term()


@pytest.fixture
def daemon() -> Iterator[FakeDaemon]:
    fake = FakeDaemon()
    yield fake
    fake.close()


def _text(widget: Static) -> str:
    console = Console(width=max(widget.size.width, 60), file=io.StringIO(), record=True)
    console.print(widget.content)
    return console.export_text()


def _header(app: LivestackApp) -> str:
    return _text(app.query_one("#header", Static))


def _counters(app: LivestackApp) -> str:
    return " ".join(_text(app.query_one("#counters", Static)).split())


def _log_text(app: LivestackApp) -> str:
    return "\n".join(strip.text for strip in app.query_one("#log", RichLog).lines)


async def _wait_for(pilot: Pilot[Any], condition: Callable[[], bool], what: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def _frame(seq: int, verdict: str, **changes: Any) -> events.Event:
    fields: dict[str, Any] = {
        "seq": seq, "path": f"/data/f{seq:03d}.fits", "name": f"f{seq:03d}.fits", "verdict": verdict,
        "reason": None, "date_obs": None, "exptime": 120.0, "object": "NGC 7000", "filter": "Ha",
        "stars": 250 + seq, "fwhm": 2.5, "ellipticity": 0.1, "background": 900.0 + seq, "noise": 10.0,
        "sharpness": None,
        "transform": {"matrix": [[1, 0, 3], [0, 1, 4]], "dx": 3.0, "dy": 4.0, "rotation": 0.5,
                      "scale": 1.0, "inliers": 80, "rms": 0.21, "method": "fast"},
        "timings": {"read": 0.1}, "latency": 1.8, "session": 1,
    }
    fields.update(changes)
    return events.make_event("frame", **fields)


def _app(daemon: FakeDaemon, **options: Any) -> LivestackApp:
    return LivestackApp(daemon.pub_endpoint, daemon.rep_endpoint, None, tz=UTC, **options)


# Events to widgets.


def test_counters_frame_table_plots_and_log_follow_events(daemon: FakeDaemon) -> None:
    async def scenario() -> None:
        app = _app(daemon)
        async with app.run_test(size=(120, 40)) as pilot:
            # "connected" shows on the first message of any topic; the header fills in with the first status.
            await _wait_for(pilot, lambda: "connected" in _header(app) and "NGC 7000" in _header(app),
                            "the first status")
            header = _header(app)
            assert "NGC 7000" in header and "Ha" in header and "kappa-sigma" in header
            assert "running" in header
            counters = _counters(app)
            for expected in ("received 5", "stacked 4", "rejected 1", "exposure 8m 00s",
                             "elapsed 1h 02m 05s", "queue 1 (4s)", "latency 2.5 s"):
                assert expected in counters, (expected, counters)

            daemon.received = 6
            await _wait_for(pilot, lambda: "received 6" in _counters(app), "the counters to follow status")

            daemon.outbox.put(_frame(1, "accepted"))
            daemon.outbox.put(_frame(2, "rejected", reason="no stars", stars=None, fwhm=None, transform=None))
            daemon.outbox.put(_frame(3, "received", stars=None, fwhm=None, transform=None, latency=None))
            table = app.query_one("#frames", DataTable)
            await _wait_for(pilot, lambda: table.row_count == 3, "three frame rows")
            # Newest first; the verdict's reason is in the last column.
            newest, middle, oldest = (table.get_row_at(i) for i in range(3))
            assert str(newest[2]) == "f003.fits" and str(newest[-1]) == "received"
            assert str(middle[2]) == "f002.fits" and str(middle[-1]) == "rejected: no stars"
            assert [str(cell) for cell in oldest[2:]] == [
                "f001.fits", "251", "2.50", "5.0", "+0.50°", "0.21", "accepted",
            ]
            # The receipt of frame 3 becomes its verdict in place.
            daemon.outbox.put(_frame(3, "accepted", stars=300))
            await _wait_for(pilot, lambda: str(table.get_row_at(0)[-1]) == "accepted", "frame 3's verdict")
            assert table.row_count == 3 and str(table.get_row_at(0)[3]) == "300"

            assert app.query_one("#plot-stars", Plot).data == [251.0, 300.0]
            assert app.query_one("#plot-fwhm", Plot).data == [2.5, 2.5]
            assert "rejected f002.fits: no stars" in _log_text(app)

            daemon.outbox.put(events.make_event("log", level="error", message="disk full", logger="snapshot"))
            daemon.outbox.put(events.make_event("log", level="info", message="chatty", logger="watch"))
            await _wait_for(pilot, lambda: "snapshot: disk full" in _log_text(app), "the error in the log")
            assert "chatty" not in _log_text(app)

    asyncio.run(scenario())


def test_preview_event_draws_coloured_half_blocks(daemon: FakeDaemon) -> None:
    async def scenario() -> None:
        app = _app(daemon)
        async with app.run_test(size=(120, 40)) as pilot:
            # "connected" shows on the first message of any topic; the header fills in with the first status.
            await _wait_for(pilot, lambda: "connected" in _header(app) and "NGC 7000" in _header(app),
                            "the first status")
            preview = app.query_one("#preview", PreviewView)
            assert preview.image is None
            image = demo_preview(depth=10)
            daemon.outbox.put(events.make_event(
                "stack", preview=image, frames=10, exptime=1200.0, method="kappa-sigma",
                rejected_fraction=0.01, snr=20.0, object="NGC 7000", filter="Ha", reference=None, session=1,
            ))
            await _wait_for(pilot, lambda: preview.image is not None, "the preview")
            await pilot.pause()
            cells = [
                segment.style
                for y in range(preview.size.height)
                for segment in preview.render_line(y)
                if segment.text.strip() == HALF_BLOCK and segment.style is not None
            ]
            colours = {(style.color, style.bgcolor) for style in cells if style.color and style.bgcolor}
            assert len(cells) > 200 and len(colours) > 20
            greys = [c.triplet is not None and len({*c.triplet}) == 1 for c, _ in colours]
            assert not all(greys), "a 3-channel preview is drawn in colour"

    asyncio.run(scenario())


# Keys to control requests.


def test_pause_resume_snapshot_and_reset_keys_send_requests(daemon: FakeDaemon) -> None:
    async def scenario() -> None:
        app = _app(daemon)
        async with app.run_test(size=(120, 40)) as pilot:
            await _wait_for(pilot, lambda: "running" in _header(app), "status running")
            await pilot.press("p")
            await _wait_for(pilot, lambda: len(daemon.requests) == 1, "the pause request")
            assert daemon.requests[-1] == {"cmd": "pause"}
            await _wait_for(pilot, lambda: "paused" in _header(app), "status paused")
            await pilot.press("p")
            await _wait_for(pilot, lambda: len(daemon.requests) == 2, "the resume request")
            assert daemon.requests[-1] == {"cmd": "resume"}
            await _wait_for(pilot, lambda: "pause: done" in _log_text(app), "the reply in the log")

            await pilot.press("s")
            await _wait_for(pilot, lambda: len(daemon.requests) == 3, "the snapshot request")
            assert daemon.requests[-1] == {"cmd": "snapshot"}

            await pilot.press("r")
            await _wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
            await pilot.press("n")
            await _wait_for(pilot, lambda: not isinstance(app.screen, ConfirmScreen), "the answer")
            await pilot.pause(0.3)
            assert len(daemon.requests) == 3, "no reset after n"

            await pilot.press("r")
            await _wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
            await pilot.press("y")
            await _wait_for(pilot, lambda: len(daemon.requests) == 4, "the reset request")
            assert daemon.requests[-1] == {"cmd": "reset"}

            await pilot.press("question_mark")
            await _wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), "the help")
            await pilot.press("escape")
            await _wait_for(pilot, lambda: not isinstance(app.screen, HelpScreen), "the help to close")
            assert len(daemon.requests) == 4

    asyncio.run(scenario())


def test_x_chooses_a_frame_asks_then_removes_it_and_the_table_shows_it_removed(daemon: FakeDaemon) -> None:
    async def scenario() -> None:
        app = _app(daemon)
        async with app.run_test(size=(120, 40)) as pilot:
            app.apply_events([_frame(1, "accepted"), _frame(2, "rejected", reason="clouds"),
                              _frame(3, "accepted"), _frame(4, "accepted")])
            table = app.query_one("#frames", DataTable)
            await pilot.press("x")  # a cursor on the newest frame, nothing sent yet
            await _wait_for(pilot, lambda: table.cursor_type == "row", "the cursor")
            assert table.cursor_row == 0 and daemon.requests == []
            await pilot.press("down", "down")  # f004 -> f003 -> f002 (rejected: not in the stack)
            await _wait_for(pilot, lambda: table.cursor_row == 2, "the cursor on f002")
            await pilot.press("x")
            await pilot.pause(0.2)
            assert not isinstance(app.screen, ConfirmScreen) and daemon.requests == []
            app.apply_events([_frame(5, "accepted")])  # a new frame arrives: the choice stays on f002
            await _wait_for(pilot, lambda: table.row_count == 5 and table.cursor_row == 3, "f002 pushed down")
            await pilot.press("down")  # f001
            await _wait_for(pilot, lambda: table.cursor_row == 4, "the cursor on f001")
            await pilot.press("x")
            await _wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
            assert "f001.fits (frame 1)" in app.screen.question
            await pilot.press("n")
            await pilot.pause(0.3)
            assert daemon.requests == [], "nothing removed after n"
            await pilot.press("x")
            await _wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
            await pilot.press("y")
            await _wait_for(pilot, lambda: len(daemon.requests) == 1, "the remove request")
            assert daemon.requests[-1] == {"cmd": "remove", "seq": 1}
            assert table.cursor_type == "none"
            app.apply_events([events.make_event(
                "removal", id=1, action="remove", seqs=[1], names=["f001.fits"], state="done",
                how="subtracted", frames=3, reason=None, session=1, problems=[])])
            await pilot.pause(0.1)
            assert "removal of f001.fits: done (subtracted)" in " ".join(_log_text(app).split())
            rows = app.model.rows()
            assert [r.status for r in rows if r.key[0] == 1] == ["removed"]

    asyncio.run(scenario())


def test_control_without_reply_is_reported_in_the_log() -> None:
    # A REP endpoint where nobody answers: a bound ROUTER that never replies.
    context: zmq.Context[Any] = zmq.Context()
    silent = context.socket(zmq.ROUTER)
    silent.bind("tcp://127.0.0.1:*")
    endpoint = str(silent.getsockopt_string(zmq.LAST_ENDPOINT))

    async def scenario() -> None:
        app = LivestackApp(None, endpoint, None, tz=UTC, control_timeout=0.3)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("s")
            await _wait_for(pilot, lambda: "snapshot failed" in _log_text(app), "the control error")
            assert f"no reply from {endpoint} within 0.3 s" in " ".join(_log_text(app).split())
            await pilot.press("p")  # no status yet: nothing to decide from
            await pilot.pause(0.1)
            assert "offline" in _header(app)

    try:
        asyncio.run(scenario())
    finally:
        silent.close(linger=0)
        context.term()


# Connection.


def test_header_shows_stale_then_connected_again(daemon: FakeDaemon) -> None:
    async def scenario() -> None:
        app = _app(daemon, stale_after=0.6)
        async with app.run_test(size=(120, 40)) as pilot:
            # "connected" shows on the first message of any topic; the header fills in with the first status.
            await _wait_for(pilot, lambda: "connected" in _header(app) and "NGC 7000" in _header(app),
                            "the first status")
            daemon.publishing.clear()
            await _wait_for(pilot, lambda: "stale since" in _header(app), "staleness")
            header = _header(app)
            match = re.search(r"stale since (\d\d):(\d\d):(\d\d)", header)
            assert match is not None, header
            assert app.stale_since is not None and time.time() - app.stale_since < 5
            assert "running" in header and "NGC 7000" in header, "the last known state stays"
            assert "received 5" in _counters(app)

            daemon.received = 9
            daemon.publishing.set()
            await _wait_for(pilot, lambda: "connected" in _header(app), "the connection back")
            await _wait_for(pilot, lambda: "received 9" in _counters(app), "the counters to catch up")
            assert "stale" not in _header(app)

    asyncio.run(scenario())


def test_header_says_connecting_before_the_first_message() -> None:
    async def scenario() -> None:
        app = LivestackApp("tcp://127.0.0.1:1", None, None, tz=UTC)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause(0.3)
            assert "connecting to tcp://127.0.0.1:1" in _header(app)
            assert "no status yet" in _header(app)

    asyncio.run(scenario())


def test_an_unusable_endpoint_is_shown_not_raised() -> None:
    async def scenario() -> None:
        app = LivestackApp("no-such-transport://x", None, None, tz=UTC)
        async with app.run_test(size=(80, 24)) as pilot:
            await _wait_for(pilot, lambda: "no connection" in _header(app), "the failure in the header")
            assert "cannot subscribe to no-such-transport://x" in " ".join(_log_text(app).split())

    asyncio.run(scenario())


def test_missing_keys_fail_before_the_app_starts(tmp_path: Path) -> None:
    with pytest.raises(NetworkError, match=r"client\.key_secret"):
        LivestackApp("tcp://127.0.0.1:1", None, tmp_path)


# The model and the preview resampling, without a terminal.


def test_dashboard_folds_the_demo_night() -> None:
    model = Dashboard(UTC)
    log = [line for event in demo_events(frames=24) for line in model.apply(event)]
    assert model.state == "running" and model.target == "M 31" and model.filter == "L"
    counters = model.counters()
    assert counters["received"] == "24" and counters["rejected"] == "3" and counters["stacked"] == "21"
    # One frame every 32 s is 1.9 a minute.
    assert counters["frames/min"] == "1.9"
    assert len(model.series["fwhm"]) == 21
    assert [line.level for line in log] == ["warning"] * 4
    assert model.rows()[0].name.endswith("_0024.fits")


def test_dashboard_notices_a_daemon_restart() -> None:
    model = Dashboard(UTC)
    first = demo_events(frames=1)[-2]  # a status
    assert first.topic == "status"
    model.apply(first)
    fields = {k: v for k, v in first.payload.items() if k not in ("v", "topic", "time")}
    again = events.make_event("status", **{**fields, "started": "2024-10-06T01:00:00+00:00"})
    assert [line.text for line in model.apply(again)] == ["the daemon restarted"]


def test_format_duration() -> None:
    assert format_duration(3.9) == "3s"
    assert format_duration(125) == "2m 05s"
    assert format_duration(3 * 3600 + 7) == "3h 00m 07s"


def test_fit_preview_keeps_the_aspect_and_averages() -> None:
    image = np.zeros((100, 200, 1), np.uint8)
    image[:, :100] = 200
    fitted = fit_preview(image, 40, 40)
    assert fitted.shape == (20, 40, 3)  # limited by the width; 2 pixels per cell row
    assert (fitted[:, :20] == 200).all() and (fitted[:, 20:] == 0).all()
    assert (fitted[..., 0] == fitted[..., 2]).all(), "one channel is grey"
    # Averaging, not picking: a fine checkerboard shrinks to its mean.
    checker = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)[:, :, None]
    assert np.all(np.abs(fit_preview(checker, 8, 4).astype(int) - 128) <= 1)
    # Enlarging repeats pixels.
    tiny = np.array([[[10], [20]]], np.uint8)
    assert fit_preview(tiny, 4, 1)[..., 0].tolist() == [[10, 10, 20, 20], [10, 10, 20, 20]]
    assert fit_preview(tiny, 0, 5).size == 0


def test_events_arriving_while_a_dialog_is_open_still_reach_the_dashboard(daemon: FakeDaemon) -> None:
    # The daemon keeps talking while the visitor reads the help or a confirmation: nothing may look for the
    # dashboard's widgets in the dialog.
    async def scenario() -> None:
        app = _app(daemon)
        async with app.run_test(size=(120, 40)) as pilot:
            await _wait_for(pilot, lambda: "NGC 7000" in _header(app), "the first status")
            for key, screen in (("question_mark", HelpScreen), ("r", ConfirmScreen)):
                await pilot.press(key)
                await _wait_for(pilot, lambda s=screen: isinstance(app.screen, s), "the dialog")
                before = daemon.received
                daemon.received = before + 3
                app.apply_events([daemon.status(), _frame(before + 10, "accepted")])
                await pilot.pause(0.3)  # the receiving worker delivers more status events meanwhile
                await pilot.press("escape" if screen is HelpScreen else "n")
                await _wait_for(pilot, lambda s=screen: not isinstance(app.screen, s), "the dialog to close")
                await _wait_for(pilot, lambda n=before + 3: f"received {n}" in _counters(app), "the counters")
            assert daemon.requests == []

    asyncio.run(scenario())
