"""The web viewer without a browser: the display event, what the viewer folds from events, and its HTTP API
served by uvicorn on loopback in front of a real daemon fed with simulated frames.

The page itself, in Chromium, is in ``test_web_browser.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from livestack import events
from livestack.clients.bus import Subscriber
from livestack.clients.web.app import WebSettings
from livestack.clients.web.model import PICTURES_KEPT, Viewer, stack_key
from livestack.clients.web.server import WebServer, is_loopback_host, parse_listen
from livestack.config import Config
from livestack.errors import NetworkError
from livestack.live.daemon import Daemon
from livestack.live.notify import Notifier
from livestack.simulate import SimConfig, simulate

LOOPBACK = "tcp://127.0.0.1:*"
WAIT = 30.0
TOKEN = "correct-horse-battery-staple"


def jpeg(rows: int = 12, cols: int = 16, value: int = 90) -> bytes:
    ok, data = cv2.imencode(".jpg", np.full((rows, cols), value, np.uint8))
    assert ok
    return bytes(data.tobytes())


def display(frames: int, obj: str | None = "M 31", flt: str | None = "L", session: int = 1,
            picture: bytes | None = None) -> events.Event:
    data = picture if picture is not None else jpeg(value=frames)
    return events.make_event("display", picture=data, object=obj, filter=flt, session=session, frames=frames,
                             exptime=30.0 * frames, width=16, height=12)


# -- the display event -----------------------------------------------------------------------------------


def test_display_event_carries_a_whole_jpeg_through_the_wire() -> None:
    event = display(3)
    parts = events.encode(event)
    assert len(parts) == 3 and parts[2] == event.picture
    back = events.decode(parts)
    assert back.picture == event.picture and back["bytes"] == len(event.picture or b"")
    decoded = cv2.imdecode(np.frombuffer(back.picture or b"", np.uint8), cv2.IMREAD_GRAYSCALE)
    assert decoded.shape == (12, 16)
    # A cut picture, a missing one, or one whose length the payload does not give, is refused.
    with pytest.raises(events.SchemaError, match="whole JPEG"):
        events.decode([parts[0], parts[1].replace(b'"bytes":', b'"bytes":'), parts[2][:-1] + b"\x00"])
    with pytest.raises(events.SchemaError, match="3rd part"):
        events.decode(parts[:2])
    with pytest.raises(events.SchemaError, match="3rd part"):
        events.decode([parts[0], parts[1], parts[2] + b"\xff\xd9"])
    with pytest.raises(events.SchemaError, match="carries a picture"):
        events.make_event("display", object=None, filter=None, session=1, frames=1, exptime=1.0, width=1,
                          height=1)
    with pytest.raises(events.SchemaError, match="carries a picture"):
        events.make_event("log", picture=jpeg(), level="info", message="x", logger="y")


# -- the model -------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def status(frames: int, session: int = 1, obj: str | None = "M 31", rejected: int = 0) -> events.Event:
    return events.make_event(
        "status", state="running", queue=0, lag=0.0, received=frames + rejected, accepted=frames,
        rejected=rejected, exptime=30.0 * frames, frames=frames, uptime=5.0, started="2024-01-01T00:00:00",
        watch="/w", output="/o", method="mean", object=obj, filter="L", session=session, last_latency=None,
        insecure=False)


def frame(seq: int, verdict: str, obj: str | None = "M 31", session: int = 1,
          fwhm: float | None = 2.5) -> events.Event:
    return events.make_event(
        "frame", seq=seq, path=f"/w/f{seq}.fits", name=f"f{seq}.fits", verdict=verdict,
        reason="clouds" if verdict == "rejected" else None, date_obs=None, exptime=30.0, object=obj,
        filter="L", stars=100, fwhm=fwhm, ellipticity=0.1, background=1000.0 + seq, noise=10.0,
        transform=None, timings={}, latency=0.1, session=session)


def stack(frames: int, obj: str | None = "M 31", session: int = 1) -> events.Event:
    return events.make_event("stack", frames=frames, exptime=30.0 * frames, method="mean",
                             rejected_fraction=0.0, snr=None, object=obj, filter="L", reference=None,
                             session=session)


def test_viewer_keeps_the_latest_pictures_per_stack_under_ids_never_reused() -> None:
    clock = Clock()
    viewer = Viewer(clock=clock)
    idents = []
    for n in range(1, 5):
        (name, data), = viewer.apply(display(n))
        assert name == "picture" and data["picture"]["frames"] == n
        idents.append(data["picture"]["url"].removeprefix("pictures/").removesuffix(".jpg"))
    assert len(set(idents)) == 4
    assert [viewer.picture(i) is not None for i in idents] == [False] * (4 - PICTURES_KEPT) + [True] * 2
    assert viewer.picture(idents[-1]).data == display(4).picture  # type: ignore[union-attr]
    # Another viewer (the server started again) never hands out the same identifiers.
    other = Viewer(clock=clock)
    (_, data), = other.apply(display(1))
    assert data["picture"]["url"].removeprefix("pictures/").removesuffix(".jpg") not in idents
    # A second target is a second stack; each keeps its own pictures.
    viewer.apply(display(7, obj="M 42"))
    assert set(viewer.stacks) == {stack_key("M 31", "L"), stack_key("M 42", "L")}
    assert viewer.picture(idents[-1]) is not None


def test_a_repeated_picture_keeps_its_address_so_pages_fetch_nothing_again() -> None:
    viewer = Viewer(clock=Clock())
    (_, first), = viewer.apply(display(3))
    # The daemon publishes its last picture again while the stack is quiet: same bytes, same frames.
    (_, again), = viewer.apply(display(3))
    assert again["picture"]["url"] == first["picture"]["url"]
    # A new picture of the same stack, even of as many frames (a new stretch), gets a new address.
    (_, other), = viewer.apply(display(3, picture=jpeg(value=200)))
    assert other["picture"]["url"] != first["picture"]["url"]
    (_, more), = viewer.apply(display(4, picture=jpeg(value=200)))
    assert more["picture"]["url"] not in (first["picture"]["url"], other["picture"]["url"])
    # A new session of the stack (a reset) starts over, whatever its picture.
    (_, reset), = viewer.apply(display(4, session=2, picture=jpeg(value=200)))
    assert reset["picture"]["url"] != more["picture"]["url"]


def test_viewer_folds_counts_history_and_the_daemons_silence() -> None:
    clock = Clock()
    viewer = Viewer(caption="Welcome to the star party", clock=clock)
    assert viewer.bus_state() == "connecting"
    viewer.apply(status(0, obj=None))
    assert viewer.stacks == {}  # nothing stacked yet: no stack to show
    assert viewer.apply(frame(1, "received")) == []
    out = viewer.apply(frame(1, "accepted"))
    assert out[0][0] == "frame" and out[0][1]["key"] == stack_key("M 31", "L")
    viewer.apply(stack(1))
    viewer.apply(frame(2, "accepted", fwhm=None))
    viewer.apply(stack(2))
    clock.now += 2.0
    # A rejected frame of a target never stacked belongs to no stack; of this one, it is its last frame.
    assert viewer.apply(frame(3, "rejected", obj=None))[0][1]["key"] is None
    viewer.apply(frame(4, "rejected"))
    clock.now += 1.0
    hello = viewer.hello(control=False)
    (view,) = hello["stacks"]
    assert (view["frames"], view["exptime"], view["fwhm"]) == (2, 60.0, [2.5, None])
    assert view["background"] == [1001.0, 1002.0]
    assert view["last_frame_age"] == pytest.approx(1.0)
    assert hello["caption"] == "Welcome to the star party" and hello["control"] is False
    # status keeps the current stack's count true even without stack events (a viewer started late).
    out = viewer.apply(status(5, rejected=2))
    assert [name for name, _ in out] == ["status", "stack"] and out[1][1]["frames"] == 5
    assert viewer.bus_state() == "live"
    clock.now += 5.0
    assert viewer.bus_state() == "reconnecting"
    # A new session of the same target (a reset) starts the stack over: no old picture, no old history.
    viewer.apply(display(5))
    viewer.apply(frame(9, "accepted", session=2))
    ((_, data),) = viewer.apply(stack(1, session=2))
    assert data["frames"] == 1 and data["picture"] is None
    assert viewer.hello(control=True)["stacks"][0]["fwhm"] == [2.5]


# -- the HTTP API in front of a real daemon -----------------------------------------------------------------


def make_config(tmp_path: Path) -> Config:
    watch = tmp_path / "frames"
    watch.mkdir()
    return Config(base=tmp_path).with_overrides({
        "watch.folder": str(watch), "output.folder": str(tmp_path / "out"),
        "watch.settle": 0.3, "watch.poll_interval": 0.1,
        "network.publish": LOOPBACK, "network.control": LOOPBACK, "network.preview_interval": 0,
        "output.image_format": "png", "output.every_frames": 0, "output.every_seconds": 0,
        "web.display_interval": 0.2, "web.display_size": 256,
    })


@contextlib.contextmanager
def serving(daemon: Daemon, token: str | None) -> Iterator[WebServer]:
    server = WebServer(WebSettings(daemon.publish_endpoint, daemon.control_endpoint, control_token=token,
                                   caption="Clear skies"), "127.0.0.1:0")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    running = Daemon(make_config(tmp_path), notifier=Notifier(environ={}))
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def frames(tmp_path: Path) -> list[Path]:
    staging = tmp_path / "staging"
    simulate(staging, SimConfig(frames=3, interval=0, size=(480, 360), n_stars=250, seed=5),
             sleep=lambda _s: None)
    return sorted(staging.glob("*.fits"))


def http(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str],
                                                                                          bytes]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as reply:
            return reply.status, dict(reply.headers.items()), reply.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers.items()), exc.read()


def wait_for(condition: Any, what: str) -> Any:
    deadline = time.monotonic() + WAIT
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_api_serves_pictures_for_good_and_refuses_control_without_the_token(
        daemon: Daemon, frames: list[Path]) -> None:
    with serving(daemon, TOKEN) as server:
        base = server.url
        for path in frames[:2]:
            os.replace(path, daemon.watch_dir / path.name)

        def stacked_picture() -> dict[str, Any] | None:
            state = json.loads(http(base + "api/state")[2])
            stacks = [s for s in state["stacks"] if s["picture"] and s["picture"]["frames"] == 2]
            return stacks[0] if stacks else None

        view = wait_for(stacked_picture, "a picture of the 2-frame stack")
        assert view["target"] == "SIM-FIELD"
        code, headers, body = http(base + view["picture"]["url"])
        assert code == 200 and headers["content-type"] == "image/jpeg"
        assert "immutable" in headers["cache-control"] and "max-age=31536000" in headers["cache-control"]
        image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)
        assert max(image.shape[:2]) == 256 and image.shape[:2] == (view["picture"]["height"],
                                                                   view["picture"]["width"])
        assert http(base + view["picture"]["url"], headers={"If-None-Match": headers["etag"]})[0] == 304
        assert http(base + "pictures/0000-1.jpg")[0] == 404
        page = http(base)
        assert page[0] == 200 and b"viewer.js" in page[2]
        assert "script-src 'self'" in page[1]["content-security-policy"]
        assert http(base + "static/viewer.js")[0] == 200

        # Control: nothing without the token, a wrong one, or a GET; the daemon keeps stacking.
        for headers_ in ({}, {"Authorization": "Bearer wrong-token-here"}, {"Authorization": TOKEN},
                         {"Authorization": f"Basic {TOKEN}"}):
            code, _, body = http(base + "api/control/pause", "POST", headers_)
            assert code == 401 and json.loads(body)["ok"] is False
        assert http(base + "api/control/pause")[0] == 405
        assert json.loads(http(base + "api/session")[2]) == {"control": False}
        assert daemon.status()["state"] != "paused"
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert json.loads(http(base + "api/session", headers=bearer)[2]) == {"control": True}
        assert http(base + "api/control/shutdown", "POST", bearer)[0] == 404  # not a web command
        code, _, body = http(base + "api/control/pause", "POST", bearer)
        assert code == 200 and json.loads(body)["ok"] is True
        assert daemon.status()["state"] == "paused"
        assert http(base + "api/control/resume", "POST", bearer)[0] == 200
        assert daemon.status()["state"] != "paused"

    # A server given no token refuses control to everyone, whatever they send.
    with serving(daemon, None) as server:
        code, _, body = http(server.url + "api/control/pause", "POST", {"Authorization": f"Bearer {TOKEN}"})
        assert code == 403 and "control is off" in json.loads(body)["error"]
        assert daemon.status()["state"] != "paused"


def test_event_stream_says_hello_then_follows_the_daemon(daemon: Daemon, frames: list[Path]) -> None:
    with serving(daemon, None) as server:
        host, port = server.url.removeprefix("http://").rstrip("/").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=WAIT) as conn:
            conn.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
            reader = conn.makefile("rb")
            head = reader.readline()
            assert head.startswith(b"HTTP/1.1 200")
            seen: dict[str, list[dict[str, Any]]] = {}
            name = ""
            deadline = time.monotonic() + WAIT

            def read_until(done: Callable[[], bool]) -> None:
                nonlocal name
                while not done():
                    assert time.monotonic() < deadline, f"stream gave only {sorted(seen)}"
                    line = reader.readline().rstrip(b"\r\n")
                    if line.startswith(b"event: "):
                        name = line[7:].decode()
                    elif line.startswith(b"data: "):
                        seen.setdefault(name, []).append(json.loads(line[6:]))

            read_until(lambda: "status" in seen)  # the server hears the daemon: the frame will not be missed
            os.replace(frames[0], daemon.watch_dir / frames[0].name)
            read_until(lambda: "picture" in seen
                       and any(f["verdict"] == "accepted" for f in seen.get("frame", [])))
            assert seen["hello"][0]["caption"] == "Clear skies" and seen["hello"][0]["control"] is False
            assert seen["picture"][-1]["picture"]["url"].startswith("pictures/")


def test_listen_addresses_are_checked_and_beyond_loopback_warned_about(
        caplog: pytest.LogCaptureFixture) -> None:
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("8080", "localhost", "host:port", ":80", "h:70000"):
        with pytest.raises(NetworkError, match="not HOST:PORT"):
            parse_listen(bad)
    assert is_loopback_host("localhost") and is_loopback_host("127.0.0.2") and is_loopback_host("::1")
    assert not is_loopback_host("0.0.0.0") and not is_loopback_host("192.168.1.5")
    assert not is_loopback_host("scope.local")
    settings = WebSettings("tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
    with caplog.at_level("WARNING", logger="livestack.clients.web"):
        quiet = WebServer(settings, "127.0.0.1:0")
        quiet.stop()
        assert not caplog.records
        # Bound, never started, so no traffic leaves loopback.
        loud = WebServer(settings, "0.0.0.0:0")
        loud.stop()
    assert "anyone who can reach this network can read the page" in caplog.text
    taken = WebServer(settings, "127.0.0.1:0")
    try:
        port = taken.url.rstrip("/").rsplit(":", 1)[1]
        with pytest.raises(NetworkError, match="cannot serve the viewer"):
            WebServer(settings, f"127.0.0.1:{port}")
    finally:
        taken.stop()


def test_web_command_checks_its_token_and_address(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "LIVESTACK_CONTROL_TOKEN": ""}
        return subprocess.run([sys.executable, "-m", "livestack.cli", "web", *args], capture_output=True,
                              text=True, timeout=WAIT, env=env)

    short = run("--listen", "127.0.0.1:0", "--control-token", "abc")
    assert short.returncode == 2 and "at least 12 characters" in short.stderr
    bad = run("--listen", "nowhere")
    assert bad.returncode == 2 and "not HOST:PORT" in bad.stderr


def test_subscriber_can_leave_out_the_pictures(daemon: Daemon, frames: list[Path]) -> None:
    with (Subscriber(daemon.publish_endpoint, topics=("frame", "stack", "status")) as sub,
          Subscriber(daemon.publish_endpoint) as everything):
        for subscriber in (sub, everything):  # both hear the daemon before the frame arrives
            wait_for(lambda s=subscriber: (e := s.recv(0.5)) is not None and e.topic == "status",
                     "the daemon's status")
        os.replace(frames[0], daemon.watch_dir / frames[0].name)
        seen: set[str] = set()
        deadline = time.monotonic() + WAIT
        while "display" not in seen:
            assert time.monotonic() < deadline, f"no display event, only {seen}"
            event = everything.recv(0.2)
            if event is not None:
                seen.add(event.topic)
        topics = set()
        while (event := sub.recv(0.3)) is not None:
            topics.add(event.topic)
        assert "frame" in topics and "display" not in topics
    with pytest.raises(Exception, match="unknown topics pictures"):
        Subscriber("tcp://127.0.0.1:1", topics=("pictures",))
    # The dashboard leaves out the pictures and only them: every other topic is something it shows.
    from livestack.clients.tui.app import _TOPICS

    assert set(_TOPICS) == set(events.TOPICS) - {"display"}


def _viewer_url(process: subprocess.Popen[str]) -> str:
    """The viewer's address, from the ``viewer: URL`` line the command prints when it serves."""
    assert process.stderr is not None
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if line.startswith("viewer: "):
            return line.split()[1]
        if not line and process.poll() is not None:
            break
    raise AssertionError("the command never said where the viewer is")


def _stop(process: subprocess.Popen[str], sig: int) -> int:
    process.send_signal(sig)
    try:
        # The final checkpoint and snapshot come from the writer thread, which yields the CPU to everything
        # else (niceness 10): on a loaded machine the stop takes a while.
        return process.wait(timeout=3 * WAIT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


@pytest.mark.parametrize("command", ["demo", "run"])
def test_demo_and_run_serve_the_viewer_beside_their_daemon(tmp_path: Path, command: str) -> None:
    import signal

    config = tmp_path / "site.toml"
    config.write_text('[network]\npublish = "tcp://127.0.0.1:*"\ncontrol = "tcp://127.0.0.1:*"\n'
                      '[web]\ncaption = "From the command line"\ndisplay_interval = 0.3\n'
                      '[watch]\nsettle = 0.3\n')
    if command == "demo":
        args = ["demo", "--plain", "--frames", "3", "--interval", "0.2", "--size", "320x240",
                "--output", str(tmp_path / "out")]
    else:
        (tmp_path / "frames").mkdir()
        simulate(tmp_path / "frames", SimConfig(frames=2, interval=0, size=(320, 240), seed=4),
                 sleep=lambda _s: None)
        args = ["run", "--watch", str(tmp_path / "frames"), "--output", str(tmp_path / "out")]
    process = subprocess.Popen([sys.executable, "-m", "livestack.cli", *args, "--config", str(config),
                                "--web", "127.0.0.1:0"], stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "LIVESTACK_CONTROL_TOKEN": ""})
    try:
        url = _viewer_url(process)
        assert url.startswith("http://127.0.0.1:")

        def pictured() -> dict[str, Any] | None:
            state = json.loads(http(url + "api/state")[2])
            return state if any(s["picture"] for s in state["stacks"]) else None

        state = wait_for(pictured, "a picture in the viewer")
        assert state["caption"] == "From the command line" and state["control"] is False
        assert all(s["frames"] >= 1 for s in state["stacks"] if s["picture"])
        # The demo's camera finishes, and the viewer stays for the audience until a signal.
        if command == "demo":
            wait_for(lambda: (json.loads(http(url + "api/state")[2])["status"] or {}).get("received") == 3,
                     "the demo's three frames")
            time.sleep(0.5)
            assert process.poll() is None
    finally:
        status = _stop(process, signal.SIGINT if command == "demo" else signal.SIGTERM)
    assert status == 0
    assert list((tmp_path / "out").rglob("stack.fits"))


def _read_events(conn: socket.socket, until: str, seconds: float) -> list[tuple[str, str]]:
    """(event, data) pairs from a raw event stream, until a data line holds ``until`` or time is up."""
    conn.settimeout(0.5)
    buffer = b""
    out: list[tuple[str, str]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = conn.recv(1 << 16)
        except TimeoutError:
            continue
        if not chunk:
            break
        buffer += chunk
        *messages, buffer = buffer.split(b"\n\n")
        for message in messages:
            lines = dict(line.split(": ", 1) for line in message.decode().splitlines() if ": " in line)
            if "event" in lines:
                out.append((lines["event"], lines.get("data", "")))
        if out and until in out[-1][1]:
            break
    return out


def test_a_page_that_stops_reading_holds_up_no_other(tmp_path: Path) -> None:
    import zmq

    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.bind("tcp://127.0.0.1:*")
    endpoint = pub.getsockopt(zmq.LAST_ENDPOINT).decode()
    server = WebServer(WebSettings(endpoint, "tcp://127.0.0.1:1"), "127.0.0.1:0")
    server.start()
    host, port = server.url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    stalled = socket.socket()
    reader = socket.socket()
    try:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        for conn in (stalled, reader):
            conn.connect((host, int(port)))
            conn.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        # ZeroMQ's subscription takes a moment: publish heartbeats until the reading page hears one.
        heard: list[tuple[str, str]] = []
        while not any(name == "status" for name, _ in heard):
            pub.send_multipart(events.encode(status(1)))
            heard = _read_events(reader, '"state"', 1.0)
        # About 8 MB of warnings, far beyond what the kernel buffers for the page that does not read.
        blob = "x" * 2000
        for i in range(4000):
            pub.send_multipart(events.encode(events.make_event("log", level="warning",
                                                               message=f"{i} {blob}", logger="t")))
            if i % 50 == 49:
                time.sleep(0.005)  # within the subscriber's queue, as a real daemon's pace is
        time.sleep(0.3)
        pub.send_multipart(events.encode(events.make_event("log", level="warning", message="the end",
                                                           logger="t")))
        started = time.monotonic()
        got = _read_events(reader, "the end", WAIT)
        assert got and "the end" in got[-1][1], "the reading page never got the last message"
        assert time.monotonic() - started < 5.0
        # The page that stopped reading was dropped behind, not queued for: when it reads again it gets a
        # fresh hello instead of the whole backlog.
        late = _read_events(stalled, "the end", 10.0)
        names = [name for name, _ in late]
        assert names.count("hello") >= 2, names[:5]
        assert names.count("log") < sum(name == "log" for name, _ in got) - 500
    finally:
        stalled.close()
        reader.close()
        server.stop()
        pub.close(linger=0)
        context.term()


def test_the_viewer_imports_the_event_schema_and_no_processing_stage() -> None:
    probe = ("import sys, livestack.clients.web.app, livestack.clients.web.server, "
             "livestack.clients.web.model; "
             "print(' '.join(sorted(m for m in sys.modules if m.startswith('livestack.'))))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=WAIT,
                            check=True).stdout.split()
    assert "livestack.events" in loaded and "livestack.clients.bus" in loaded
    processing = ("livestack.stages", "livestack.pipeline", "livestack.live")
    forbidden = [m for m in loaded if m.startswith(processing)]
    assert forbidden == []
