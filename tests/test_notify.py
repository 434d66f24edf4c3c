"""sd_notify: the messages systemd would receive, read from a real AF_UNIX datagram socket."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from livestack.live.notify import Notifier, watchdog_interval


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's, named in NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_messages_reach_systemd(systemd: socket.socket) -> None:
    notifier = Notifier()
    assert notifier.enabled
    assert notifier.ready()
    assert systemd.recv(4096) == b"READY=1"
    assert notifier.watchdog()
    assert systemd.recv(4096) == b"WATCHDOG=1"
    assert notifier.status("stacking M31: 12 frames\nqueue 0")
    assert systemd.recv(4096) == b"STATUS=stacking M31: 12 frames queue 0"
    assert notifier.stopping()
    assert systemd.recv(4096) == b"STOPPING=1"
    assert notifier.notify("STATUS=draining", "EXTEND_TIMEOUT_USEC=30000000")
    assert systemd.recv(4096) == b"STATUS=draining\nEXTEND_TIMEOUT_USEC=30000000"


def test_abstract_socket_names(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"livestack-test-{os.getpid()}-{id(monkeypatch)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert Notifier().ready()
        assert sock.recv(4096) == b"READY=1"


def test_nothing_happens_off_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert not notifier.status("idle")
    assert not notifier.stopping()
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled
    assert not Notifier({"NOTIFY_SOCKET": "relative/path"}).enabled


def test_a_failed_send_is_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.enabled
    with caplog.at_level("DEBUG", logger="livestack.live.notify"):
        assert notifier.ready() is False
    assert "could not notify systemd" in caplog.text


def test_a_socket_nobody_reads_never_blocks_the_sender(systemd: socket.socket) -> None:
    # A manager that stops reading (hung, or a test harness that reads afterwards) fills the socket's queue:
    # the thread that sends (the network loop, the watchdog) must go on, the message dropped and said so.
    notifier = Notifier()
    results: list[bool] = []
    sender = threading.Thread(
        target=lambda: results.extend(notifier.status(f"frame {i}") for i in range(2000)))
    sender.start()
    sender.join(timeout=10)
    blocked = sender.is_alive()
    systemd.close()  # unblocks a sender stuck in sendto (it then fails), so no thread is left behind
    sender.join()
    assert not blocked, "a full notify socket blocked the sending thread"
    assert results[0] is True and results[-1] is False


def test_watchdog_interval() -> None:
    pid = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "60000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": pid}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_watchdog_interval_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 1.0
