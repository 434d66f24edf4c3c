"""The daemon end to end: real files, watchdog observers, ZeroMQ sockets, threads and processes.

Each test runs a ``Daemon`` on its own folders with loopback sockets on ephemeral ports (or ``livestack run``
as a subprocess where the point is the process: its exit status, signals, stderr, systemd notifications).
Waits are bounded and wake on events (the daemon's listener, a subscriber, a notify socket) wherever the
daemon says something; the few things it does silently (a duplicate) are polled for with a deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from astropy.io import fits

from livestack import events
from livestack.clients.bus import ClientKeys, ControlClient, Subscriber
from livestack.config import Config
from livestack.errors import NetworkError
from livestack.live import daemon as daemon_module
from livestack.live.daemon import Daemon
from livestack.live.net import generate_keys
from livestack.live.notify import Notifier
from livestack.pipeline import Stacker, expand_paths, order_by_time
from livestack.simulate import SUBDIR_NAME, SimConfig, render_frame, simulate

LOOPBACK = "tcp://127.0.0.1:*"
#: Small frames: a chunked write of one (about 350 kB at 1 MB/s) still takes a third of a second.
SIZE = (480, 360)
N_STARS = 250
#: Seconds any single wait may take before the test fails (generous: two cores shared with other suites).
WAIT = 30.0


# -- helpers ---------------------------------------------------------------------------------------------


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    """A configuration on the test's own folders, loopback sockets on free ports, fast settling."""
    watch = tmp_path / "frames"
    watch.mkdir(exist_ok=True)
    values: dict[str, Any] = {
        "watch.folder": str(watch), "output.folder": str(tmp_path / "out"),
        "watch.settle": 0.3, "watch.poll_interval": 0.1,
        "network.publish": LOOPBACK, "network.control": LOOPBACK, "network.preview_interval": 0.5,
        "output.image_format": "png",
        # The start-up warm-up costs about a second of CPU per daemon and the suite starts dozens: it is on
        # in test_warmup and in every daemon the command line starts (crash soak, demo).
        "watch.warm_up": False,
    }
    values.update(overrides)
    return Config(base=tmp_path).with_overrides(values)


@contextlib.contextmanager
def running(config: Config, listeners: tuple[Callable[[events.Event], None], ...] = ()) -> Iterator[Daemon]:
    """A started daemon (never talking to a systemd the test runner might have), stopped on exit."""
    daemon = Daemon(config, notifier=Notifier(environ={}), listeners=listeners)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


class Recorder:
    """A daemon listener: keeps every event published and wakes waiters (runs on the network thread)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.events: list[events.Event] = []

    def __call__(self, event: events.Event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[events.Event]], bool], what: str,
                 timeout: float = WAIT) -> list[events.Event]:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.events), timeout):
                pytest.fail(f"no {what} within {timeout:g} s; frames: {self._frames_text()}")
            return list(self.events)

    def frames(self, verdict: str | None = None) -> list[dict[str, Any]]:
        """Payloads of the frame events with a verdict (not 'received'), or with the given one."""
        with self._cond:
            return [e.payload for e in self.events if e.topic == "frame"
                    and (e["verdict"] == verdict if verdict else e["verdict"] != "received")]

    def topic(self, topic: str) -> list[dict[str, Any]]:
        with self._cond:
            return [e.payload for e in self.events if e.topic == topic]

    def _frames_text(self) -> str:
        return "; ".join(f"{e['name']} {e['verdict']} {e['reason'] or ''}" for e in self.events
                         if e.topic == "frame" and e["verdict"] != "received")


def assert_equals_batch(live: np.ndarray, config: Config, paths: Sequence[Path]) -> None:
    """The daemon's stack equals ``Stacker`` over the same files in this order: NaN mask, 1e-6 relative."""
    batch = Stacker(config)
    for path in paths:
        assert batch.process(path).accepted
    expected = batch.result()
    assert expected is not None
    np.testing.assert_array_equal(np.isnan(live), np.isnan(expected))
    covered = ~np.isnan(expected)
    np.testing.assert_allclose(live[covered], expected[covered], rtol=1e-6)


def assert_no_error_logged(recorder: Recorder) -> None:
    errors = [e["message"] for e in recorder.events if e.topic == "log" and e["level"] == "error"]
    assert not errors


def decided(n: int) -> Callable[[list[events.Event]], bool]:
    """Predicate: ``n`` frames have been accepted or rejected."""
    return lambda evs: sum(e.topic == "frame" and e["verdict"] != "received" for e in evs) >= n


class Stream:
    """A subscriber read from the test's thread, remembering everything it saw."""

    def __init__(self, subscriber: Subscriber) -> None:
        self.subscriber = subscriber
        self.seen: list[events.Event] = []

    def wait_for(self, topic: str, predicate: Callable[[dict[str, Any]], bool] = lambda _p: True,
                 what: str = "", timeout: float = WAIT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            event = self.subscriber.recv(max(0.0, deadline - time.monotonic()))
            if event is None:
                pytest.fail(f"no {topic} event {what} within {timeout:g} s; saw "
                            f"{[(e.topic, e.payload.get('frames')) for e in self.seen[-10:]]}")
            events.validate(event.payload)
            self.seen.append(event)
            if event.topic == topic and predicate(event.payload):
                return event.payload


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """For what the daemon does without an event: poll briefly, fail after a deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:g} s")
        time.sleep(0.05)


class _CameraStoppedError(Exception):
    """Raised in the simulated camera's sleep when the test is over."""


class Camera:
    """``simulate`` on a thread, as a capture program next to the daemon; records how long writes took."""

    def __init__(self, folder: Path, sim: SimConfig) -> None:
        self.folder, self.sim = folder, sim
        self.paths: list[Path] = []
        self.chunk_sleeps: list[float] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-camera")

    def _sleep(self, seconds: float) -> None:
        if seconds != self.sim.interval:
            self.chunk_sleeps.append(seconds)
        if self._stop.wait(seconds):
            raise _CameraStoppedError

    def _run(self) -> None:
        try:
            self.paths = simulate(self.folder, self.sim, sleep=self._sleep)
        except _CameraStoppedError:
            pass
        except BaseException as exc:  # handed to the test's thread by join()
            self.error = exc

    def __enter__(self) -> Camera:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(WAIT)

    def join(self) -> list[Path]:
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "the simulated camera did not finish"
        if self.error is not None:
            raise self.error
        return self.paths


def place(source: Path, folder: Path, name: str | None = None) -> Path:
    """Copy a frame into the watched folder the way careful capture programs do: hidden name, then rename."""
    target = folder / (name or source.name)
    hidden = folder / f".{target.name}.tmp"
    shutil.copyfile(source, hidden)
    os.replace(hidden, target)
    return target


def journal(config: Config) -> list[dict[str, Any]]:
    path = config.path(config.output.folder) / ".livestack-state" / "journal.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_whole_fits(path: Path, ncombine: int) -> np.ndarray:
    """The file is a complete FITS snapshot of ``ncombine`` frames; returns its image."""
    assert path.stat().st_size % 2880 == 0
    with fits.open(path) as hdul:
        hdul.verify("exception")
        assert hdul[0].header["NCOMBINE"] == ncombine
        data = np.array(hdul[0].data)
    assert data.shape == (SIZE[1], SIZE[0])
    return data


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Ten frames rendered once (10 s apart in DATE-OBS), to be copied into watched folders."""
    folder = tmp_path_factory.mktemp("staged")
    sim = SimConfig(frames=10, interval=10.0, size=SIZE, n_stars=N_STARS, seed=5)
    return simulate(folder, sim, sleep=lambda _s: None)


# -- 1. end to end: every frame, whatever the write, equals the batch stack -------------------------------


@pytest.mark.parametrize("polling", [False, True], ids=["os-events", "polling"])
def test_live_stack_of_a_simulated_night_equals_the_batch_stack(tmp_path: Path, polling: bool) -> None:
    # The settle time outlasts the pause between a chunked write's pieces (0.25 s), or a file still empty
    # would count as finished (and be rejected as not FITS). Frames come faster than any camera's, but each
    # is delivered (when polling: settled) before the next is written, so the live stack sees them in the
    # order the batch command sorts them into.
    config = make_config(tmp_path, **{"watch.polling": polling, "watch.settle": 0.4,
                                      "watch.poll_interval": 0.1, "output.every_frames": 10})
    watch = config.path(config.watch.folder)
    sim = SimConfig(frames=30, interval=0.7 if polling else 0.3, size=SIZE, n_stars=N_STARS, seed=11,
                    write_mode="mixed", chunk_rate=1e6, subdir_every=4)
    recorder = Recorder()
    with running(config, (recorder,)) as daemon, Camera(watch, sim) as camera:
        recorder.wait_for(decided(30), "30 frames decided", timeout=90)
        written = camera.join()
    # Each chunked frame (every third) really trickled in over a noticeable time.
    assert sum(camera.chunk_sleeps) >= 10 * 0.3
    assert sum(p.parent.name == SUBDIR_NAME for p in written) == 7

    stats = daemon.stats
    assert (stats.received, stats.accepted, stats.rejected, stats.duplicates) == (30, 30, 0, 0)
    entries = journal(config)
    assert [e["verdict"] for e in entries] == ["accepted"] * 30
    assert {e["path"] for e in entries} == {str(p) for p in written}
    # Stacked in observation order, which is also how the batch command orders them.
    batch_order = order_by_time(expand_paths([str(watch)]))
    assert [e["path"] for e in entries] == [str(p) for p in batch_order]

    final = [s for s in recorder.topic("snapshot") if s["reason"] == "shutdown"]
    assert len(final) == 1 and final[0]["frames"] == 30
    live = assert_whole_fits(Path(final[0]["fits"]), 30)
    assert Path(final[0]["fits"]) == config.path(config.output.folder) / "SIM-FIELD" / "stack.fits"

    assert_equals_batch(live, config, batch_order)


# -- 2. events and control --------------------------------------------------------------------------------


def test_events_follow_the_schema_and_control_pauses_resumes_snapshots_and_resets(
        tmp_path: Path, staged: list[Path]) -> None:
    config = make_config(tmp_path, **{"output.every_frames": 3})
    watch = config.path(config.watch.folder)
    truth = SimConfig(frames=10, interval=10.0, size=SIZE, n_stars=N_STARS, seed=5)
    recorder = Recorder()
    with (running(config, (recorder,)) as daemon, Subscriber(daemon.publish_endpoint) as sub,
          ControlClient(daemon.control_endpoint, timeout=WAIT) as control):
        stream = Stream(sub)
        status = stream.wait_for("status", what="before any frame")
        assert status["state"] == "waiting" and status["insecure"] is False
        assert (status["queue"], status["received"], status["frames"], status["session"]) == (0, 0, 0, 1)
        assert status["watch"] == str(watch)

        for path in staged[:3]:
            place(path, watch)
        stream.wait_for("frame", lambda p: p["name"] == staged[2].name and p["verdict"] == "accepted")
        stream.wait_for("stack", lambda p: p["frames"] == 3, "with 3 frames")
        accepted = [e.payload for e in stream.seen if e.topic == "frame" and e["verdict"] == "accepted"]
        assert [p["name"] for p in accepted] == [p.name for p in staged[:3]]
        for index, frame in enumerate(accepted):
            t = frame["transform"]
            assert np.array(t["matrix"]).shape == (2, 3)
            assert t["inliers"] >= 8 if index else t["method"] == "reference"
            dx, dy = render_frame(truth, index).centre_shift
            assert (t["dx"], t["dy"]) == (pytest.approx(dx, abs=0.2), pytest.approx(dy, abs=0.2))
            assert frame["stars"] >= 15 and frame["fwhm"] > 1 and frame["latency"] >= 0
            assert frame["session"] == 1 and frame["object"] == "SIM-FIELD" and frame["reason"] is None
        stacks = [e["frames"] for e in stream.seen if e.topic == "stack"]
        assert stacks == sorted(stacks) and stacks[-1] == 3
        interval = stream.wait_for("snapshot", lambda p: p["reason"] == "interval")
        assert interval["frames"] == 3
        assert Path(interval["fits"]).is_file() and Path(interval["image"]).is_file()
        status = stream.wait_for("status", lambda p: p["frames"] == 3)
        assert (status["received"], status["accepted"], status["rejected"]) == (3, 3, 0)
        assert status["object"] == "SIM-FIELD" and status["exptime"] == pytest.approx(30.0)

        # Paused: new frames queue up and are not stacked.
        reply = control.request("pause")
        assert reply == {"ok": True, "result": {"state": "paused"}}
        for path in staged[3:6]:
            place(path, watch)
        queued = stream.wait_for("status", lambda p: p["queue"] == 3, "with 3 frames queued")
        assert queued["state"] == "paused" and queued["frames"] == 3 and queued["lag"] > 0
        reply = control.request("status")
        assert reply["ok"] and reply["result"]["state"] == "paused" and reply["result"]["queue"] == 3
        assert daemon.stacker.count == 3 and daemon.stats.received == 3

        # Resumed: they are stacked.
        assert control.request("resume")["result"]["state"] in ("waiting", "running")
        stream.wait_for("stack", lambda p: p["frames"] == 6, "with 6 frames after resuming")

        # A snapshot on request: whole files, and the event says so.
        reply = control.request("snapshot")
        assert reply["ok"], reply
        result = reply["result"]
        assert result["frames"] == 6
        assert_whole_fits(Path(result["fits"]), 6)
        assert Path(result["image"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        requested = stream.wait_for("snapshot", lambda p: p["reason"] == "request")
        assert requested["fits"] == result["fits"] and requested["session"] == 1

        # Reset: a new session, an empty stack that grows again.
        reply = control.request("reset")
        assert reply == {"ok": True, "result": {"session": 2}}
        empty = stream.wait_for("stack", lambda p: p["session"] == 2)
        assert empty["frames"] == 0
        status = stream.wait_for("status", lambda p: p["session"] == 2)
        assert status["frames"] == 0 and status["exptime"] == 0
        started = time.monotonic()
        reply = control.request("snapshot")  # nothing to snapshot: an answer, at once
        assert reply["ok"] is False and "empty" in reply["error"]
        assert time.monotonic() - started < 5
        for path in staged[6:8]:
            place(path, watch)
        grown = stream.wait_for("stack", lambda p: p["frames"] == 2, "with 2 frames in session 2")
        assert grown["session"] == 2

        # Malformed requests get an error reply; the daemon keeps answering.
        with zmq.Context() as context, context.socket(zmq.REQ) as raw:
            raw.linger = 0
            raw.connect(daemon.control_endpoint)
            for request, error in ((b"not json", "not JSON"), (b'{"cmd": "fly"}', "unknown command 'fly'")):
                raw.send(request)
                assert raw.poll(int(WAIT * 1000)), f"no reply to {request!r}"
                reply = json.loads(raw.recv())
                assert reply["ok"] is False and error in reply["error"]
        reply = control.request("status")
        assert reply["ok"] and reply["result"]["frames"] == 2
    assert sub.skipped == 0
    # Every event published validates, and the very last one says the daemon is stopping.
    for event in recorder.events:
        events.validate(event.payload)
    last = recorder.events[-1]
    assert last.topic == "status" and last["state"] == "stopping" and last["frames"] == 2
    shutdown = [s for s in recorder.topic("snapshot") if s["reason"] == "shutdown"]
    assert [(s["frames"], s["session"]) for s in shutdown] == [(2, 2)]
    assert_no_error_logged(recorder)


# -- 3. security ------------------------------------------------------------------------------------------


def _run_cli(*args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "livestack.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def test_run_refuses_to_bind_beyond_loopback_without_keys(tmp_path: Path) -> None:
    (tmp_path / "frames").mkdir()
    port = _free_port()
    (tmp_path / "livestack.toml").write_text(
        f'[watch]\nfolder = "frames"\n[output]\nfolder = "out"\n'
        f'[network]\npublish = "tcp://0.0.0.0:{port}"\ncontrol = "{LOOPBACK}"\n')
    started = time.monotonic()
    proc = _run_cli("run", "--config", str(tmp_path / "livestack.toml"))
    _, stderr = proc.communicate(timeout=WAIT)
    assert time.monotonic() - started < 15
    assert proc.returncode != 0
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "loopback" in lines[0] and "keys" in lines[0] and f"0.0.0.0:{port}" in lines[0]


def test_curve_keys_admit_the_authorised_client_only(tmp_path: Path) -> None:
    generate_keys(tmp_path / "server", "server")
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    folders = {}
    for who in ("alice", "mallory"):
        folders[who] = tmp_path / who
        generate_keys(folders[who], "client")
        shutil.copyfile(tmp_path / "server" / "server.key", folders[who] / "server.key")
    shutil.copyfile(folders["alice"] / "client.key", authorized / "alice.key")
    config = make_config(tmp_path, **{
        "network.publish": "tcp://127.0.0.1:*", "network.control": "tcp://127.0.0.1:*",
        "network.server_secret_key": str(tmp_path / "server" / "server.key_secret"),
        "network.authorized_keys": str(authorized)})
    alice, mallory = ClientKeys.load(folders["alice"]), ClientKeys.load(folders["mallory"])
    recorder = Recorder()
    with (running(config, (recorder,)) as daemon,
          Subscriber(daemon.publish_endpoint, keys=mallory) as intruder,
          Subscriber(daemon.publish_endpoint) as plain,
          Subscriber(daemon.publish_endpoint, keys=alice) as friend):
        status = friend.recv(WAIT)
        assert status is not None and status.topic == "status" and status["insecure"] is False
        with ControlClient(daemon.control_endpoint, keys=alice, timeout=WAIT) as control:
            reply = control.request("status")
            assert reply["ok"] and reply["result"]["state"] == "waiting"
        # Status goes out every second: two seconds of silence mean the door stayed shut.
        assert intruder.recv(2.0) is None
        assert plain.recv(0.1) is None
        with ControlClient(daemon.control_endpoint, keys=mallory, timeout=1.0) as control:
            with pytest.raises(NetworkError, match="no reply"):
                control.request("status")
            with pytest.raises(NetworkError, match="no reply"):
                control.request("shutdown")
        assert not daemon.wait(0)  # mallory's shutdown never arrived
        assert friend.recv(WAIT) is not None
    assert_no_error_logged(recorder)  # stopping with an empty stack is no error either


# -- 4. systemd --------------------------------------------------------------------------------------------


class NotifySocket:
    """The datagram socket systemd would listen on, bound in the test's folder."""

    def __init__(self, path: Path) -> None:
        assert len(str(path)) < 100, "AF_UNIX paths are limited to 108 bytes"
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, predicate: Callable[[list[str]], bool], what: str, proc: subprocess.Popen[bytes],
                 timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.messages):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or proc.poll() is not None:
                pytest.fail(f"no {what} from the daemon (exit {proc.poll()}); got {self.messages}")
            self.sock.settimeout(min(remaining, 0.5))
            with contextlib.suppress(TimeoutError):
                self.messages.extend(self.sock.recv(4096).decode().splitlines())

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_systemd_is_told_ready_watchdog_status_and_stopping(tmp_path: Path, staged: list[Path],
                                                             signum: int) -> None:
    watch = tmp_path / "frames"
    watch.mkdir()
    for path in staged[:3]:
        place(path, watch)
    (tmp_path / "livestack.toml").write_text(
        f'[watch]\nfolder = "frames"\nsettle = 0.3\npoll_interval = 0.1\n[output]\nfolder = "out"\n'
        f'every_frames = 0\nevery_seconds = 0\n'
        f'[network]\npublish = "{LOOPBACK}"\ncontrol = "{LOOPBACK}"\n')
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_PID", "JOURNAL_STREAM")}
    env.update(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="2000000")
    proc = _run_cli("run", "--config", str(tmp_path / "livestack.toml"), env=env)
    try:
        notify.wait_for(lambda m: "READY=1" in m, "READY=1", proc)
        notify.wait_for(lambda m: any(s.startswith("STATUS=") and "3 stacked" in s for s in m),
                        "STATUS with 3 frames stacked", proc)
        # Pings every WATCHDOG_USEC / 2 = 1 s while the pipeline is healthy.
        notify.wait_for(lambda m: m.count("WATCHDOG=1") >= 3, "three WATCHDOG=1 pings", proc)
        proc.send_signal(signum)
        notify.wait_for(lambda m: "STOPPING=1" in m, "STOPPING=1", proc, timeout=WAIT)
        _, stderr = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        notify.close()
    text = stderr.decode()
    assert proc.returncode == 0, text
    assert f"{signal.Signals(signum).name} received" in text and "Traceback" not in text
    messages = notify.messages
    assert messages.index("READY=1") < messages.index("WATCHDOG=1") < messages.index("STOPPING=1")
    assert messages.index("READY=1") < next(i for i, m in enumerate(messages) if m.startswith("STATUS="))
    assert_whole_fits(tmp_path / "out" / "SIM-FIELD" / "stack.fits", 3)


# -- 5. bad input ----------------------------------------------------------------------------------------


def _write_bad_frames(folder: Path, good: Path, other_size: Path) -> dict[str, str]:
    """Drop files that cannot be stacked; returns name -> what the rejection reason must mention."""
    rng = np.random.default_rng(3)
    rows, cols = SIZE[1], SIZE[0]
    data = good.read_bytes()
    (folder / "empty.fits").write_bytes(b"")
    (folder / "notes.fits").write_text("observing log: clouds at 23:10, dew heater on\n" * 20)
    fits.PrimaryHDU(rng.normal(1000, 10, (5, rows, cols)).astype(np.float32)).writeto(folder / "cube.fits")
    fits.PrimaryHDU(np.full((rows, cols), np.nan, np.float32)).writeto(folder / "nan.fits")
    fits.PrimaryHDU(rng.normal(1000, 10, (rows, cols)).astype(np.float32)).writeto(folder / "starless.fits")
    shutil.copyfile(other_size, folder / "small.fits")
    # Complete by FITS structure, but a header card no reader can parse.
    start = data.index(b"DATE-OBS=")
    broken = data[:start] + b"DATE-OBS= 'yesterday' evening".ljust(80) + data[start + 80:]
    (folder / "broken.fits").write_bytes(broken)
    # An interrupted copy: half a frame that never grows again.
    (folder / "truncated.fits").write_bytes(data[: len(data) // 2])
    return {"empty.fits": "empty", "notes.fits": "FITS", "cube.fits": "2-D", "nan.fits": "NaN",
            "starless.fits": "no stars", "small.fits": "240x320", "broken.fits": "DATE-OBS",
            "truncated.fits": "truncated"}


def test_bad_files_are_rejected_with_a_reason_and_stacking_goes_on(
        tmp_path: Path, staged: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # A file incomplete and unchanged this long is an interrupted copy (120 s in production).
    monkeypatch.setattr(daemon_module, "STALE_AFTER", 1.5)
    config = make_config(tmp_path)
    watch = config.path(config.watch.folder)
    small = simulate(tmp_path / "small", SimConfig(frames=1, size=(320, 240), n_stars=100, seed=5),
                     sleep=lambda _s: None)[0]
    recorder = Recorder()
    with running(config, (recorder,)) as daemon:
        for path in staged[:2]:
            place(path, watch)
        recorder.wait_for(decided(2), "the first two frames")
        expected = _write_bad_frames(watch, staged[9], small)
        recorder.wait_for(decided(2 + len(expected)), "a verdict on every bad file")
        place(staged[2], watch)
        recorder.wait_for(lambda evs: daemon.stacker.count == 3 and decided(3 + len(expected))(evs),
                          "the good frame after the bad ones")
    assert (daemon.stats.accepted, daemon.stats.rejected) == (3, len(expected))
    rejected = {p["name"]: p for p in recorder.frames("rejected")}
    assert set(rejected) == set(expected)
    journaled = {Path(e["path"]).name: e for e in journal(config)}
    for name, mention in expected.items():
        reason = rejected[name]["reason"]
        assert reason and "\n" not in reason and mention in reason, (name, reason)
        assert journaled[name]["verdict"] == "rejected" and journaled[name]["reason"] == reason
    assert [p["name"] for p in recorder.frames("accepted")] == [p.name for p in staged[:3]]
    final = [s for s in recorder.topic("snapshot") if s["reason"] == "shutdown"]
    assert [s["frames"] for s in final] == [3]


# -- 6. exactly once on content ------------------------------------------------------------------------


def test_a_copied_or_touched_frame_is_counted_once(tmp_path: Path, staged: list[Path]) -> None:
    config = make_config(tmp_path)
    watch = config.path(config.watch.folder)
    recorder = Recorder()
    with running(config, (recorder,)) as daemon:
        placed = [place(path, watch) for path in staged[:3]]
        recorder.wait_for(decided(3), "three frames")
        # A touch (a new mtime on the same content) is not even delivered again by the watcher; a copy is,
        # and its content hash makes it a duplicate.
        later = time.time() + 5
        os.utime(placed[2], (later, later))
        shutil.copyfile(placed[1], watch / "copy-of-sim_0002.fits")
        wait_until(lambda: daemon.stats.duplicates == 1, "the copy counted as a duplicate")
        place(staged[3], watch)
        recorder.wait_for(decided(4), "the next new frame")
        status = daemon.status()
    assert (daemon.stats.received, daemon.stats.accepted, daemon.stats.duplicates) == (4, 4, 1)
    assert status["frames"] == 4 and status["received"] == 4
    entries = journal(config)
    assert [Path(e["path"]).name for e in entries] == [p.name for p in staged[:4]]
    assert len({e["hash"] for e in entries}) == 4
    assert [p["name"] for p in recorder.frames()] == [p.name for p in staged[:4]]


def test_a_journal_from_before_xxh3_still_recognises_its_frames(tmp_path: Path, staged: list[Path]) -> None:
    # Journals and checkpoints of earlier versions hold BLAKE2b-128 digests. After an upgrade, a copy of a
    # frame they recorded is still a duplicate, and the frames replayed after the checkpoint still match.
    config = make_config(tmp_path, **{"state.checkpoint_every_frames": 2})
    watch = config.path(config.watch.folder)
    with running(config) as daemon:
        placed = [place(path, watch) for path in staged[:3]]
        wait_until(lambda: daemon.stats.accepted == 3, "three frames")
    path = config.path(config.output.folder) / ".livestack-state" / "journal.jsonl"
    lines = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if "hash" in entry:
            entry["hash"] = hashlib.blake2b(Path(entry["path"]).read_bytes(), digest_size=16).hexdigest()
        lines.append(json.dumps(entry))
    path.write_text("\n".join(lines) + "\n")
    with running(config) as daemon:
        assert daemon.stacker.count == 3  # the third, after the checkpoint, replayed: its file matched
        shutil.copyfile(placed[0], watch / "copy-of-sim_0001.fits")
        wait_until(lambda: daemon.stats.duplicates == 1, "the copy recognised")
        place(staged[3], watch)
        wait_until(lambda: daemon.stats.accepted == 4, "the next new frame")
        assert daemon.stacker.count == 4
    entries = journal(config)
    assert [Path(e["path"]).name for e in entries] == [p.name for p in staged[:4]]
    assert entries[-1]["hash"].startswith("xxh3:")


# -- 7. a new OBJECT, a new session in its own folder ------------------------------------------------------


def test_each_object_keeps_its_own_stack_and_folder_across_a_restart(tmp_path: Path) -> None:
    # M 42, then M31, then M 42 again: the first stack goes on (never overwritten by the second), each in
    # its own folder with its own reference; a restart restores both from the checkpoint and the journal.
    config = make_config(tmp_path, **{"state.checkpoint_every_frames": 4})
    watch = config.path(config.watch.folder)
    out = config.path(config.output.folder)
    m42 = simulate(tmp_path / "m42", SimConfig(frames=5, interval=10, size=SIZE, n_stars=N_STARS, seed=7,
                                                object_name="M 42"), sleep=lambda _s: None)
    m31 = simulate(tmp_path / "m31", SimConfig(frames=4, interval=10, size=SIZE, n_stars=N_STARS, seed=8,
                                                object_name="M31", start=SimConfig().start.replace(hour=23)),
                   sleep=lambda _s: None)
    recorder = Recorder()
    with running(config, (recorder,)) as daemon:
        for path in m42[:3]:
            place(path, watch, "m42-" + path.name)
        recorder.wait_for(decided(3), "the first M 42 frames")
        assert daemon.status()["output"] == str(out / "M_42")
        for path in m31[:3]:
            place(path, watch, "m31-" + path.name)
        recorder.wait_for(decided(6), "the M31 frames")
        assert daemon.status()["output"] == str(out / "M31") and daemon.status()["frames"] == 3
        for path in m42[3:]:
            place(path, watch, "m42-" + path.name)
        recorder.wait_for(decided(8), "M 42 again")
        status = daemon.status()
    assert status["session"] == 1 and status["object"] == "M 42" and status["frames"] == 5
    assert [(p["object"], p["session"], p["verdict"]) for p in recorder.frames()] == (
        [("M 42", 1, "accepted")] * 3 + [("M31", 1, "accepted")] * 3 + [("M 42", 1, "accepted")] * 2)
    assert [e["session"] for e in journal(config)] == [1] * 8
    reasons = {(s["reason"], Path(s["fits"]).parent.name) for s in recorder.topic("snapshot")}
    assert {("target change", "M_42"), ("target change", "M31"), ("shutdown", "M_42"),
            ("shutdown", "M31")} <= reasons
    for folder, name, n in (("M_42", "M 42", 5), ("M31", "M31", 3)):
        assert_whole_fits(out / folder / "stack.fits", n)
        header = fits.getheader(out / folder / "stack.fits")
        assert header["OBJECT"] == name and header["REFFRAME"].startswith(name.replace(" ", "").lower()[:3])
    m42_alone = Stacker(config)
    for path in m42:
        assert m42_alone.process(path).accepted
    assert np.array_equal(fits.getdata(out / "M_42" / "stack.fits"), m42_alone.result(), equal_nan=True)
    assert_no_error_logged(recorder)

    # Restarted: both stacks come back; M31's next frame goes on from its 3.
    recorder = Recorder()
    with running(config, (recorder,)) as daemon:
        place(m31[3], watch, "m31-" + m31[3].name)
        recorder.wait_for(decided(1), "the last M31 frame")
        status = daemon.status()
    assert status["object"] == "M31" and status["frames"] == 4
    assert_whole_fits(out / "M31" / "stack.fits", 4)
    assert_whole_fits(out / "M_42" / "stack.fits", 5)


def test_a_stray_frame_of_another_object_rejected_changes_no_stack(tmp_path: Path,
                                                                  staged: list[Path]) -> None:
    config = make_config(tmp_path)
    watch = config.path(config.watch.folder)
    out = config.path(config.output.folder)
    stray = tmp_path / "stray.fits"
    rng = np.random.default_rng(3)
    header = fits.Header({"OBJECT": "FLAT PANEL", "EXPTIME": 1.0,
                          "DATE-OBS": fits.getheader(staged[4])["DATE-OBS"]})
    fits.PrimaryHDU(rng.normal(1000, 5, (64, 64)).astype(np.float32), header).writeto(stray)
    recorder = Recorder()
    with running(config, (recorder,)) as daemon:
        for path in staged[:5]:
            place(path, watch)
        recorder.wait_for(decided(5), "five frames")
        place(stray, watch, "zz-stray.fits")
        recorder.wait_for(decided(6), "the stray frame")
        assert daemon.status()["object"] == "SIM-FIELD" and daemon.status()["frames"] == 5
        for path in staged[5:]:
            place(path, watch)
        recorder.wait_for(decided(11), "the other five frames")
        status = daemon.status()
    rejected = recorder.frames("rejected")
    assert [p["name"] for p in rejected] == ["zz-stray.fits"] and rejected[0]["object"] == "FLAT PANEL"
    assert status["session"] == 1 and status["frames"] == 10 and status["object"] == "SIM-FIELD"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["SIM-FIELD"]
    assert_whole_fits(out / "SIM-FIELD" / "stack.fits", 10)
    assert {s["session"] for s in recorder.topic("stack")} == {1}


# -- 8. a reset survives a restart; leftovers of interrupted runs are cleared --------------------------------

def test_a_reset_survives_a_restart_and_the_old_median_cube_goes(tmp_path: Path, staged: list[Path]) -> None:
    config = make_config(tmp_path, **{"stack.method": "median", "state.folder": str(tmp_path / "state")})
    watch = config.path(config.watch.folder)
    recorder = Recorder()
    with running(config, (recorder,)) as daemon:
        for path in staged[:3]:
            shutil.copy(path, watch / path.name)
        recorder.wait_for(decided(3), "3 frames")
        cubes = sorted((tmp_path / "state" / "work").rglob("median-*.cube"))
        assert len(cubes) == 1
        with ControlClient(daemon.control_endpoint, timeout=10.0) as control:
            assert control.request("reset")["ok"]
        recorder.wait_for(lambda evs: any(e.topic == "snapshot" and e["reason"] == "session end"
                                          for e in evs), "the old session's last snapshot")
    # The writer ran the old stack's last snapshot, the new session's checkpoint, then dropped the cube.
    assert not cubes[0].exists()
    stale = tmp_path / "out" / "SIM-FIELD" / ".stack.fits.x1y2.tmp"
    stale.write_bytes(b"half a snapshot")
    with running(config) as daemon:
        status = daemon.status()
        assert status["session"] == 2 and status["frames"] == 0
        assert not stale.exists()


# -- 9. a backlog: the next frame is read while this one is stacked -----------------------------------------

def test_a_backlog_is_read_ahead_and_stacks_like_the_batch(tmp_path: Path, staged: list[Path]) -> None:
    # Paused while the backlog is queued, so every frame is waiting, in order, when the worker starts on it:
    # from the second frame on each is read on the read-ahead thread while the one before it is stacked.
    # The copy of the fifth frame has its DATE-OBS, so it comes right next to it: read ahead while its twin
    # is being stacked (before its hash is journaled), it must still be caught as a duplicate at its turn.
    config = make_config(tmp_path)
    watch = config.path(config.watch.folder)
    recorder = Recorder()
    with (running(config, (recorder,)) as daemon,
          ControlClient(daemon.control_endpoint, timeout=WAIT) as control):
        assert control.request("pause")["ok"]
        for path in staged:
            place(path, watch)
        place(staged[4], watch, "copy-of-" + staged[4].name)
        wait_until(lambda: daemon.status()["queue"] == len(staged) + 1, "the backlog queued")
        assert daemon.stats.received == 0
        assert control.request("resume")["ok"]
        recorder.wait_for(decided(len(staged)), "the backlog decided")
        wait_until(lambda: daemon.stats.duplicates == 1, "the copy counted once")
        assert any(t.name == "livestack-readahead" for t in threading.enumerate())
    assert not any(t.name == "livestack-readahead" for t in threading.enumerate())

    stats = daemon.stats
    assert (stats.received, stats.accepted, stats.rejected, stats.duplicates) == (10, 10, 0, 1)
    # Frames 2-10 went through the read-ahead, except the one after the duplicate: the worker takes it
    # itself (a duplicate is not stacked, so there is nothing to overlap its reading with).
    assert stats.read_ahead == len(staged) - 2
    entries = journal(config)
    assert [e["verdict"] for e in entries] == ["accepted"] * 10
    assert len({e["hash"] for e in entries}) == 10
    frames = recorder.frames()
    assert [p["seq"] for p in frames] == list(range(1, 11))
    for frame in frames:
        assert {"read", "detect", "warp"} <= set(frame["timings"])
        assert all(v >= 0 for v in frame["timings"].values())
        assert frame["latency"] > 0
    assert frames[-1]["latency"] > frames[0]["latency"]  # all complete at once, stacked one after another

    final = [s for s in recorder.topic("snapshot") if s["reason"] == "shutdown"]
    assert len(final) == 1 and final[0]["frames"] == 10
    live = assert_whole_fits(Path(final[0]["fits"]), 10)
    assert_equals_batch(live, config, staged)
    assert_no_error_logged(recorder)


def test_a_frame_read_ahead_waits_for_commands_and_a_pause(tmp_path: Path, staged: list[Path],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # The first frame's stacking is held until the second one has been read ahead, a pause has come and a
    # reset is waiting: the reset goes first, then the pause puts the second frame back (its read dropped);
    # after the resume it is read again and stacked into the new session, in order.
    gate = threading.Event()
    commits: list[Any] = []
    real_commit = Stacker.commit

    def held_commit(self: Stacker, prepared: Any, owned: bool = False) -> Any:
        commits.append(prepared)
        if len(commits) == 1:
            assert gate.wait(WAIT)
        return real_commit(self, prepared, owned=owned)

    monkeypatch.setattr(Stacker, "commit", held_commit)
    config = make_config(tmp_path)  # no warm-up: its frames would be the first commits
    watch = config.path(config.watch.folder)
    recorder = Recorder()
    replies: list[dict[str, Any]] = []
    with (running(config, (recorder,)) as daemon,
          ControlClient(daemon.control_endpoint, timeout=WAIT) as control):
        assert control.request("pause")["ok"]
        for path in staged[:3]:
            place(path, watch)
        wait_until(lambda: daemon.status()["queue"] == 3, "three frames queued")
        assert control.request("resume")["ok"]
        wait_until(lambda: daemon._worker.ahead is not None and daemon._worker.ahead.front.done(),
                   "the second frame read ahead while the first is held")
        assert daemon._worker.ahead is not None and daemon._worker.ahead.item.path.name == staged[1].name
        assert daemon.status()["queue"] == 2  # read, not stacked: still waiting
        assert control.request("pause")["ok"]

        def reset() -> None:
            with ControlClient(daemon.control_endpoint, timeout=WAIT) as other:
                replies.append(other.request("reset"))

        resetter = threading.Thread(target=reset, name="test-reset")
        resetter.start()
        wait_until(lambda: bool(daemon._inbox._commands), "the reset queued")
        gate.set()
        resetter.join(WAIT)
        assert replies == [{"ok": True, "result": {"session": 2}}]
        wait_until(lambda: daemon._worker.ahead is None and daemon.status()["queue"] == 2,
                   "the frame put back")
        assert daemon.stacker.count == 0 and daemon.stats.received == 1
        assert control.request("resume")["ok"]
        recorder.wait_for(decided(3), "all three frames")
    stats = daemon.stats
    assert (stats.received, stats.accepted, stats.duplicates) == (3, 3, 0)
    # The second frame was read again by the worker itself after the resume; the third was read ahead.
    assert stats.read_ahead == 1
    entries = journal(config)
    assert [(Path(e["path"]).name, e["session"]) for e in entries] == [
        (staged[0].name, 1), (staged[1].name, 2), (staged[2].name, 2)]
    assert [(p["name"], p["session"], p["seq"]) for p in recorder.frames()] == [
        (staged[0].name, 1, 1), (staged[1].name, 2, 2), (staged[2].name, 2, 3)]
    assert_no_error_logged(recorder)


@pytest.mark.parametrize("photometry", [False, True])
def test_frames_are_handed_to_the_stack_unless_photometry_reads_them_afterwards(
        tmp_path: Path, staged: list[Path], monkeypatch: pytest.MonkeyPatch, photometry: bool) -> None:
    # Without photometry nothing reads a frame's pixels after it is stacked: its defects are replaced in
    # place, not in a copy of the whole frame. With photometry, its stamps are cut from the frame as read.
    handed: list[bool] = []
    commit = Stacker.commit

    def spy(self: Stacker, prepared: Any, owned: bool = False) -> Any:
        handed.append(owned)
        return commit(self, prepared, owned=owned)

    monkeypatch.setattr(Stacker, "commit", spy)
    overrides = {"photometry.targets": ["star=240.0,180.0"]} if photometry else {}
    config = make_config(tmp_path, **overrides)
    watch = config.path(config.watch.folder)
    recorder = Recorder()
    with running(config, (recorder,)):
        for path in staged[:4]:
            place(path, watch)
        recorder.wait_for(decided(4), "four frames")
    assert len(handed) == 4 and set(handed) == {not photometry}
    assert all(p["verdict"] == "accepted" for p in recorder.frames())
