"""No message can silence a live daemon: each killer message against real sockets, then status and events.

Each of these once ended the daemon's network thread while the process lived on (no more events, no
control, nothing in the log): a request holding a 5000-digit integer, JSON nested 30,000 deep, 5,000 random
bytes over plain TCP to the control port; requests of 100 kB and 10 MB got no reply at all. Now each gets a
one-sentence error (or, for bytes that are not ZeroMQ at all, is dropped by ZeroMQ), and afterwards the
daemon answers ``status``, publishes events, and stacks the next frame.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from livestack.clients.bus import ControlClient, Subscriber
from livestack.config import Config
from livestack.live.daemon import Daemon
from livestack.live.notify import Notifier
from livestack.simulate import SimConfig, simulate

LOOPBACK = "tcp://127.0.0.1:*"
WAIT = 30.0


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("control-staged")
    return simulate(folder, SimConfig(frames=2, interval=10.0, size=(480, 360), n_stars=250, seed=41),
                    sleep=lambda _s: None)


@contextlib.contextmanager
def live_daemon(tmp_path: Path) -> Iterator[Daemon]:
    (tmp_path / "frames").mkdir()
    config = Config(base=tmp_path).with_overrides({
        "watch.folder": "frames", "output.folder": "out", "watch.settle": 0.3, "watch.poll_interval": 0.1,
        "network.publish": LOOPBACK, "network.control": LOOPBACK, "output.every_frames": 0,
        "output.every_seconds": 0.0, "output.image_format": "png", "wcs.solve": "off"})
    daemon = Daemon(config, notifier=Notifier(environ={}))
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


KILLERS: list[tuple[str, bytes, str]] = [
    ("5000-digit integer", b'{"cmd": "status", "n": ' + b"7" * 5000 + b"}", "number too long"),
    ("JSON nested 30,000 deep", b'{"cmd": "status", "n": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
     "nested too deeply"),
    ("100 kB request", b'{"cmd": "status", "pad": "' + b"x" * 100_000 + b'"}', "requests are at most"),
    ("10 MB request", b'{"cmd": "status", "pad": "' + b"x" * 10_000_000 + b'"}', "requests are at most"),
]


def test_killer_messages_get_a_sentence_and_the_daemon_goes_on(tmp_path: Path, frames: list[Path]) -> None:
    with (live_daemon(tmp_path) as daemon, Subscriber(daemon.publish_endpoint) as sub,
          ControlClient(daemon.control_endpoint, timeout=WAIT) as control):
        ctx = zmq.Context.instance()
        for name, message, words in KILLERS:
            req = ctx.socket(zmq.REQ)
            req.linger = 0
            try:
                req.connect(daemon.control_endpoint)
                req.send(message)
                assert req.poll(int(WAIT * 1000), zmq.POLLIN), f"no reply to the {name}"
                reply = _json(req.recv())
            finally:
                req.close()
            assert reply["ok"] is False and words in reply["error"], (name, reply)
            assert reply["error"].count(". ") == 0, f"not one sentence: {reply['error']}"
        # 5,000 random bytes over plain TCP: not ZeroMQ at all.
        host, port = daemon.control_endpoint.removeprefix("tcp://").rsplit(":", 1)
        garbage = np.random.default_rng(3).integers(0, 256, 5000, dtype=np.uint8).tobytes()
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            raw.sendall(garbage)
            time.sleep(0.3)
        # The daemon still answers, still publishes, still stacks.
        assert control.request("status")["ok"] is True
        assert all(t.is_alive() for t in threading.enumerate() if t.name == "livestack-network")
        shutil.copy(frames[0], daemon.watch_dir / "after.fits")
        deadline = time.monotonic() + WAIT
        seen: list[tuple[str, str | None]] = []
        while ("frame", "accepted") not in seen or ("status", None) not in seen:
            event = sub.recv(max(0.0, deadline - time.monotonic()))
            if event is None:
                pytest.fail(f"no accepted frame and status after the killer messages; saw {seen}")
            seen.append((event.topic, event.payload.get("verdict")))
            assert event.payload.get("verdict") != "rejected", event.payload["reason"]
        assert control.request("status")["result"]["frames"] == 1


def _json(raw: bytes) -> dict[str, Any]:
    value = json.loads(raw)
    assert isinstance(value, dict)
    return value
