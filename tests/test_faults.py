"""The daemon under faults: a full disk, a stage that throws, a thread that dies, a damaged journal.

Each test runs a real ``Daemon`` (threads, loopback sockets) on real files; the full disk is a real 30 MB
tmpfs (mounting one needs root: the test is skipped with the reason otherwise).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits
from test_daemon import (
    WAIT,
    Recorder,
    assert_whole_fits,
    decided,
    make_config,
    place,
    running,
    staged,
    wait_until,
)

from livestack import events, pipeline
from livestack.errors import StateError
from livestack.live import worker as worker_module
from livestack.live.state import Journal, content_hash

__all__ = ["staged"]  # the fixture, shared with test_daemon


# -- 1. a full disk: stall, keep the last good snapshot, resume by itself, count every frame once ------------


@contextlib.contextmanager
def small_disk(folder: Path, size: str = "30m") -> Iterator[Path]:
    folder.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {exc}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True, timeout=30)


def fill(disk: Path) -> Path:
    """Write a ballast file until the disk refuses even one more byte, and stays full.

    The daemon writes on the same disk meanwhile: a snapshot that fails there removes its temporary file
    and so gives space back. The ballast grows until a probe written after it is refused too.
    """
    ballast = disk / "ballast"
    for _ in range(20):
        fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for chunk in (1 << 20, 1 << 16, 1 << 12, 1):
                block = b"\0" * chunk
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, block)
        finally:
            os.close(fd)
        try:
            with open(disk / "probe", "wb") as fh:
                fh.write(b"x" * 8192)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            return ballast
        finally:
            (disk / "probe").unlink(missing_ok=True)
    raise AssertionError("the disk never stayed full: something kept giving space back")


def statuses(recorder: Recorder) -> list[dict[str, Any]]:
    return recorder.topic("status")


@pytest.mark.parametrize("stop_while_stalled", [False, True], ids=["resumes", "stopped-while-stalled"])
def test_a_full_disk_stalls_the_daemon_which_resumes_and_counts_every_frame_once(
        tmp_path: Path, staged: list[Path], stop_while_stalled: bool) -> None:
    with small_disk(tmp_path / "disk") as disk:
        config = make_config(tmp_path, **{"output.folder": str(disk / "out"), "output.every_frames": 2,
                                          "state.checkpoint_every_frames": 2})
        watch = config.path(config.watch.folder)
        out = disk / "out"
        recorder = Recorder()
        with running(config, (recorder,)) as daemon:
            for path in staged[:4]:
                place(path, watch)
            recorder.wait_for(decided(4), "the first four frames")
            wait_until(lambda: (out / "stack.fits").is_file() if not (out / "SIM-FIELD").is_dir()
                       else (out / "SIM-FIELD" / "stack.fits").is_file(), "a first snapshot")
            ballast = fill(disk)
            for path in staged[4:]:
                place(path, watch)
            recorder.wait_for(lambda evs: any(e.topic == "status" and e["state"] == "stalled" for e in evs),
                              "a stalled status")
            stalled = next(s for s in statuses(recorder) if s["state"] == "stalled")
            assert "disk full" in stalled["problem"]
            assert any(e["level"] == "error" and "stalled: disk full" in e["message"]
                       for e in recorder.topic("log"))
            assert daemon.status()["state"] == "stalled"
            folder = Path(daemon.status()["output"])
            before = fits.getheader(folder / "stack.fits")["NCOMBINE"]
            assert_whole_fits(folder / "stack.fits", before)  # the last good snapshot, whole
            if not stop_while_stalled:
                ballast.unlink()
                recorder.wait_for(decided(10), "every frame after the space came back", timeout=2 * WAIT)
                wait_until(lambda: daemon.status()["state"] == "waiting", "the stall to end")
        if stop_while_stalled:
            ballast.unlink()
        accepted = [e["hash"] for e in _journal(out) if e["verdict"] == "accepted"]
        assert len(accepted) == len(set(accepted))
        # Restarted with the disk free: whatever the journal lacks is found again and stacked once.
        recorder = Recorder()
        with running(config, (recorder,)) as daemon:
            wait_until(lambda: daemon.status()["accepted"] == 10 and daemon.status()["queue"] == 0,
                       "all ten frames journaled")
            folder = Path(daemon.status()["output"])
        assert_whole_fits(folder / "stack.fits", 10)
        hashes = [e["hash"] for e in _journal(out) if e["verdict"] == "accepted"]
        assert sorted(hashes) == sorted({content_hash(p) for p in staged})
        assert not list(out.rglob("*.tmp"))


def _journal(out: Path) -> list[dict[str, Any]]:
    import json

    return [json.loads(line) for line in (out / ".livestack-state" / "journal.jsonl").read_text().splitlines()
            if '"kind"' not in line]


# -- 3. an exception in a stage rejects that frame only ----------------------------------------------------


def test_an_exception_inside_a_stage_rejects_the_frame_and_the_next_one_stacks(
        tmp_path: Path, staged: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    real_warp = pipeline.warp
    calls = [0]

    def failing_warp(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:  # the second frame (the reference is warped too, by the identity)
            raise RuntimeError("OpenCV(4.10.0) error: (-215:Assertion failed) in function 'warpAffine'")
        return real_warp(*args, **kwargs)

    monkeypatch.setattr(pipeline, "warp", failing_warp)
    config = make_config(tmp_path, **{"watch.warm_up": False})  # its frames would count warp's calls
    watch = config.path(config.watch.folder)
    recorder = Recorder()
    with running(config, (recorder,)) as daemon:
        for path in staged[:4]:
            place(path, watch)
        recorder.wait_for(decided(4), "four verdicts")
        status = daemon.status()
    verdicts = [(p["name"], p["verdict"]) for p in recorder.frames()]
    assert verdicts == [(p.name, "rejected" if i == 1 else "accepted") for i, p in enumerate(staged[:4])]
    rejected = recorder.frames("rejected")[0]
    assert "RuntimeError" in rejected["reason"] and "warpAffine" in rejected["reason"]
    assert status["frames"] == 3 and status["state"] != "failed"
    lines = _journal(config.path(config.output.folder))
    assert [e["verdict"] for e in lines] == ["accepted", "rejected", "accepted", "accepted"]
    assert "RuntimeError" in lines[1]["reason"]


def test_a_failing_snapshot_is_the_reply_and_the_writer_goes_on(
        tmp_path: Path, staged: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from livestack.clients.bus import ControlClient
    from livestack.live import writer as writer_module

    real = writer_module.write_snapshot
    failures = [1]

    def flaky(*args: Any, **kwargs: Any) -> Any:
        if failures[0]:
            failures[0] -= 1
            raise ValueError("numpy: operands could not be broadcast together")
        return real(*args, **kwargs)

    monkeypatch.setattr(writer_module, "write_snapshot", flaky)
    config = make_config(tmp_path, **{"output.every_frames": 0, "output.every_seconds": 0})
    watch = config.path(config.watch.folder)
    recorder = Recorder()
    with (running(config, (recorder,)) as daemon,
          ControlClient(daemon.control_endpoint, timeout=WAIT) as control):
        for path in staged[:2]:
            place(path, watch)
        recorder.wait_for(decided(2), "two verdicts")
        first = control.request("snapshot")
        second = control.request("snapshot")
        assert daemon.status()["state"] != "failed"
    assert first["ok"] is False and "ValueError" in first["error"] and "broadcast" in first["error"]
    assert second["ok"] is True and second["result"]["frames"] == 2


# -- 2. a thread that dies anyway is named, and the watchdog is no longer fed ------------------------------


class _Fatal(BaseException):
    """Escapes every ``except Exception``: what a thread's loop cannot survive."""


def test_a_dead_thread_is_named_in_status_and_stops_the_watchdog(
        tmp_path: Path, staged: list[Path], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from livestack.live.daemon import Daemon
    from livestack.live.notify import Notifier

    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a ping every 0.2 s while healthy
    real_take = worker_module.Worker._take

    def take(self: Any, item: Any, front: Any = None) -> None:
        if item.path.name == staged[2].name:
            raise _Fatal("a fault no loop can catch")
        real_take(self, item, front)

    monkeypatch.setattr(worker_module.Worker, "_take", take)
    # Frames stacked as they come (no reference window): the notify socket is read only once the worker is
    # dead, and a datagram socket holds ten messages (five watchdog periods) before the sender blocks.
    config = make_config(tmp_path, **{"align.reference_window": 1})
    watch = config.path(config.watch.folder)
    recorder = Recorder()
    with tempfile.TemporaryDirectory(dir="/tmp") as short, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(f"{short}/notify")
        sock.settimeout(0.1)
        messages: list[str] = []

        def receive(seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    messages.extend(sock.recv(4096).decode().splitlines())

        daemon = Daemon(config, notifier=Notifier(environ={"NOTIFY_SOCKET": f"{short}/notify"}),
                        listeners=(recorder,))
        daemon.start()
        try:
            for path in staged[:3]:
                place(path, watch)
            recorder.wait_for(lambda evs: any(e.topic == "status" and e["state"] == "failed" for e in evs),
                              "a failed status")
            status = daemon.status()
            receive(1.0)
            pings_then = messages.count("WATCHDOG=1")
            receive(1.5)  # seven ping periods
            pings_later = messages.count("WATCHDOG=1")
        finally:
            daemon.stop()
    assert status["state"] == "failed" and "livestack-worker" in status["problem"]
    assert "_Fatal" in status["problem"]
    assert messages.index("READY=1") < messages.index("WATCHDOG=1")
    assert any(m.startswith("STATUS=failed: the livestack-worker thread died") for m in messages)
    assert pings_later == pings_then
    died = [r for r in caplog.records if "thread died" in r.getMessage()]
    assert died and died[0].exc_info is not None and died[0].exc_info[0] is _Fatal


# -- the journal and state files ---------------------------------------------------------------------------


def test_a_journal_damaged_in_the_middle_is_refused_untouched(tmp_path: Path, staged: list[Path]) -> None:
    path = tmp_path / "state" / "journal.jsonl"
    from livestack.live.state import JournalEntry

    with Journal(path) as journal:
        for seq, frame in enumerate(staged[:3], start=1):
            journal.append(JournalEntry(seq=seq, path=str(frame), size=1, mtime_ns=1, hash=f"h{seq}",
                                        verdict="accepted", session=1))
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1][:20] + b"#" + lines[1][21:]  # damaged in the middle
    damaged = b"\n".join(lines) + b'{"v":1,"seq":4,"pa'  # and a torn end
    path.write_bytes(damaged)
    with pytest.raises(StateError, match="damaged at line 2"):
        Journal(path)
    assert path.read_bytes() == damaged


def test_the_journal_and_checkpoints_are_not_world_readable(tmp_path: Path, staged: list[Path]) -> None:
    config = make_config(tmp_path)
    watch = config.path(config.watch.folder)
    recorder = Recorder()
    with running(config, (recorder,)):
        for path in staged[:2]:
            place(path, watch)
        recorder.wait_for(decided(2), "two verdicts")
    state = config.path(config.output.folder) / ".livestack-state"
    files = [state / "journal.jsonl", *sorted((state / "checkpoints").glob("ckpt-*"))]
    assert len(files) >= 3
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f


def test_status_event_accepts_the_new_states() -> None:
    for state, problem in (("stalled", "disk full: the journal could not be written (No space left)"),
                           ("failed", "the livestack-worker thread died (_Fatal: x)")):
        event = events.make_event("status", state=state, queue=0, lag=0.0, received=0, accepted=0, rejected=0,
                                  exptime=0.0, frames=0, uptime=1.0, started="2026-01-01T00:00:00+00:00",
                                  watch="w", output="o", method="mean", object=None, filter=None, session=1,
                                  last_latency=None, insecure=False, problem=problem)
        assert event["state"] == state and event["problem"] == problem
    assert np.isfinite(1.0)


# -- 8. set_reference: frames in the watched folder only, and nothing said about other paths ----------------


def test_set_reference_takes_only_frames_in_the_watched_folder(tmp_path: Path, staged: list[Path]) -> None:
    from livestack.clients.bus import ControlClient

    config = make_config(tmp_path)
    watch = config.path(config.watch.folder)
    secret = tmp_path / "secret.fits"
    secret.write_bytes(staged[0].read_bytes())
    (watch / "sub").mkdir()
    (watch / "sub" / "link.fits").symlink_to(secret)
    inside = place(staged[1], watch)
    with (running(config) as daemon, ControlClient(daemon.control_endpoint, timeout=WAIT) as control):
        wait_until(lambda: daemon.status()["accepted"] == 1, "the frame in the folder stacked")
        replies = [control.request("set_reference", path=p) for p in
                   ("/etc/shadow", "/etc/no-such-file", str(secret), str(watch / "sub" / "link.fits"),
                    str(watch / "nothing.fits"), str(watch / ".." / "secret.fits"))]
        good = control.request("set_reference", path=str(inside))
    assert all(r["ok"] is False for r in replies)
    assert len({r["error"] for r in replies}) == 1  # the same sentence, whether the file exists or not
    assert "shadow" not in replies[0]["error"] and str(watch) in replies[0]["error"]
    assert good["ok"] is True and good["result"]["reference"] == str(inside.resolve())
