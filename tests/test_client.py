"""The client side of the daemon's sockets, against real ZeroMQ sockets on loopback."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth

from livestack import events
from livestack.clients.bus import ClientKeys, ControlClient, Subscriber
from livestack.errors import LivestackError, NetworkError


@pytest.fixture
def context() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def key_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """A daemon's key folder and a client's (its pair plus a copy of the daemon's public certificate)."""
    server_dir, client_dir = tmp_path / "server", tmp_path / "client"
    server_dir.mkdir()
    client_dir.mkdir()
    zmq.auth.create_certificates(server_dir, "server")
    zmq.auth.create_certificates(client_dir, "client")
    shutil.copy(server_dir / "server.key", client_dir / "server.key")
    return server_dir, client_dir


def _bind(socket: zmq.Socket[Any]) -> str:
    socket.bind("tcp://127.0.0.1:*")
    return str(socket.getsockopt_string(zmq.LAST_ENDPOINT))


def _status(**changes: Any) -> events.Event:
    fields: dict[str, Any] = {
        "state": "running", "queue": 0, "lag": 0.0, "received": 3, "accepted": 2, "rejected": 1,
        "exptime": 60.0, "frames": 2, "uptime": 100.0, "started": "2024-10-05T21:00:00+00:00",
        "watch": "/data", "output": "/out", "method": "mean", "object": "M 31", "filter": "L",
        "session": 1, "last_latency": 1.5, "insecure": False,
    }
    fields.update(changes)
    return events.make_event("status", **fields)


def _receive_while_publishing(
    pub: zmq.Socket[Any], sub: Subscriber, parts: list[bytes], within: float = 5.0
) -> events.Event | None:
    # PUB drops what it sends before the subscription reaches it (the slow joiner): repeat until seen.
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        pub.send_multipart(parts)
        event = sub.recv(timeout=0.05)
        if event is not None:
            return event
    return None


# Keys.


def test_keys_load_the_client_pair_and_the_server_public_key(key_dirs: tuple[Path, Path]) -> None:
    server_dir, client_dir = key_dirs
    keys = ClientKeys.load(client_dir)
    public, secret = zmq.auth.load_certificate(client_dir / "client.key_secret")
    server_public, _ = zmq.auth.load_certificate(server_dir / "server.key")
    assert (keys.public, keys.secret, keys.server_public) == (public, secret, server_public)
    with pytest.raises(AttributeError):
        keys.public = b"x"  # type: ignore[misc]


def test_keys_missing_files_are_named(key_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    _, client_dir = key_dirs
    with pytest.raises(NetworkError, match="does not exist"):
        ClientKeys.load(tmp_path / "nowhere")
    (client_dir / "server.key").unlink()
    with pytest.raises(NetworkError, match=r"no server\.key"):
        ClientKeys.load(client_dir)
    (client_dir / "client.key_secret").unlink()
    with pytest.raises(NetworkError, match=r"no client\.key_secret"):
        ClientKeys.load(client_dir)


def test_keys_reject_a_file_that_is_not_a_certificate(key_dirs: tuple[Path, Path]) -> None:
    _, client_dir = key_dirs
    (client_dir / "server.key").write_text("not a certificate\n")
    with pytest.raises(NetworkError, match=r"server\.key"):
        ClientKeys.load(client_dir)


# Subscriber.


def test_subscriber_receives_events_with_their_preview(context: zmq.Context[Any]) -> None:
    import numpy as np

    pub = context.socket(zmq.PUB)
    endpoint = _bind(pub)
    with Subscriber(endpoint) as sub:
        status = _status()
        got = _receive_while_publishing(pub, sub, events.encode(status))
        assert got is not None and got.topic == "status" and got["received"] == 3
        image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
        stack = events.make_event(
            "stack", preview=image, frames=2, exptime=60.0, method="mean", rejected_fraction=0.0,
            snr=None, object=None, filter=None, reference=None, session=1,
        )
        pub.send_multipart(events.encode(stack))
        got = sub.recv(timeout=2.0)
        while got is not None and got.topic != "stack":  # statuses still in flight
            got = sub.recv(timeout=2.0)
        assert got is not None and got.preview is not None
        assert np.array_equal(got.preview, image)
    pub.close(linger=0)


def test_subscriber_skips_malformed_messages_and_counts_them(context: zmq.Context[Any]) -> None:
    pub = context.socket(zmq.PUB)
    endpoint = _bind(pub)
    with Subscriber(endpoint) as sub:
        assert _receive_while_publishing(pub, sub, events.encode(_status())) is not None
        while sub.recv(timeout=0.1) is not None:  # drain the repeats
            pass
        bad_version = json.dumps({"v": 99, "topic": "status", "time": "x"}).encode()
        pub.send_multipart([b"status", b"{not json"])
        pub.send_multipart([b"status", bad_version])
        pub.send_multipart([b"only one part"])
        pub.send_multipart(events.encode(_status(received=4)))
        got = sub.recv(timeout=2.0)
        assert got is not None and got["received"] == 4
        assert sub.skipped == 3
        assert sub.last_error is not None and "2 or 3 parts" in sub.last_error
    pub.close(linger=0)


def test_subscriber_times_out_with_none() -> None:
    with Subscriber("tcp://127.0.0.1:1") as sub:  # nobody there: ZeroMQ keeps retrying quietly
        started = time.monotonic()
        assert sub.recv(timeout=0.2) is None
        assert 0.15 <= time.monotonic() - started < 1.0


def test_subscriber_with_curve_keys(context: zmq.Context[Any], key_dirs: tuple[Path, Path]) -> None:
    server_dir, client_dir = key_dirs
    server_public, server_secret = zmq.auth.load_certificate(server_dir / "server.key_secret")
    pub = context.socket(zmq.PUB)
    pub.curve_secretkey = server_secret
    pub.curve_publickey = server_public
    pub.curve_server = True
    endpoint = _bind(pub)
    with Subscriber(endpoint, ClientKeys.load(client_dir)) as sub:
        got = _receive_while_publishing(pub, sub, events.encode(_status()))
        assert got is not None and got.topic == "status"
    # A client that trusts another server key never completes the handshake: it hears nothing.
    zmq.auth.create_certificates(client_dir, "impostor")
    impostor_public, _ = zmq.auth.load_certificate(client_dir / "impostor.key")
    good = ClientKeys.load(client_dir)
    wrong = ClientKeys(good.public, good.secret, impostor_public)
    with Subscriber(endpoint, wrong) as sub:
        assert _receive_while_publishing(pub, sub, events.encode(_status()), within=0.5) is None
    pub.close(linger=0)


def test_subscriber_plain_cannot_hear_a_curve_server(
    context: zmq.Context[Any], key_dirs: tuple[Path, Path]
) -> None:
    server_dir, _ = key_dirs
    server_public, server_secret = zmq.auth.load_certificate(server_dir / "server.key_secret")
    pub = context.socket(zmq.PUB)
    pub.curve_secretkey = server_secret
    pub.curve_publickey = server_public
    pub.curve_server = True
    endpoint = _bind(pub)
    with Subscriber(endpoint) as sub:
        assert _receive_while_publishing(pub, sub, events.encode(_status()), within=0.5) is None
    pub.close(linger=0)


# Control.


class _Router:
    """A stand-in for the daemon's REP socket that can stay silent: a ROUTER answering when told to."""

    def __init__(self, context: zmq.Context[Any]) -> None:
        self.socket = context.socket(zmq.ROUTER)
        self.endpoint = _bind(self.socket)
        self.requests: list[dict[str, Any]] = []
        self.silent = 0  # how many of the next requests go unanswered
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake-control")
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.socket.poll(20, zmq.POLLIN):
                continue
            identity, empty, body = self.socket.recv_multipart()
            request = events.decode_request(body)
            self.requests.append(request)
            if self.silent:
                self.silent -= 1
                continue
            reply = events.ok_reply(state="paused") if request["cmd"] == "pause" else events.error_reply(
                f"{request['cmd']} is not allowed here"
            )
            self.socket.send_multipart([identity, empty, reply])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.socket.close(linger=0)


@pytest.fixture
def router(context: zmq.Context[Any]) -> Iterator[_Router]:
    server = _Router(context)
    yield server
    server.close()


def test_control_request_returns_the_reply(router: _Router) -> None:
    with ControlClient(router.endpoint, timeout=2.0) as control:
        assert control.request("pause") == {"ok": True, "result": {"state": "paused"}}
        assert control.request("reset") == {"ok": False, "error": "reset is not allowed here"}
    assert [r["cmd"] for r in router.requests] == ["pause", "reset"]


def test_control_rejects_a_bad_request_before_sending(router: _Router) -> None:
    with ControlClient(router.endpoint) as control:
        with pytest.raises(LivestackError, match="unknown command 'dance'"):
            control.request("dance")
        with pytest.raises(LivestackError, match="set_reference needs a 'path'"):
            control.request("set_reference")
    assert router.requests == []


def test_control_timeout_recovers_with_a_new_socket(router: _Router) -> None:
    router.silent = 1
    with ControlClient(router.endpoint, timeout=0.3) as control:
        started = time.monotonic()
        with pytest.raises(NetworkError, match=rf"no reply from {router.endpoint} within 0\.3 s"):
            control.request("pause")
        assert time.monotonic() - started < 1.5
        # The stuck REQ socket was replaced: the next request goes out and is answered.
        assert control.request("pause")["ok"] is True
    assert [r["cmd"] for r in router.requests] == ["pause", "pause"]


def test_control_with_curve_keys(context: zmq.Context[Any], key_dirs: tuple[Path, Path]) -> None:
    server_dir, client_dir = key_dirs
    server_public, server_secret = zmq.auth.load_certificate(server_dir / "server.key_secret")
    rep = context.socket(zmq.REP)
    rep.curve_secretkey = server_secret
    rep.curve_publickey = server_public
    rep.curve_server = True
    endpoint = _bind(rep)

    def answer_once() -> None:
        if rep.poll(5000, zmq.POLLIN):
            events.decode_request(rep.recv())
            rep.send(events.ok_reply(frames=7))

    server = threading.Thread(target=answer_once, name="fake-curve-control")
    server.start()
    try:
        with ControlClient(endpoint, ClientKeys.load(client_dir), timeout=3.0) as control:
            assert control.request("status") == {"ok": True, "result": {"frames": 7}}
    finally:
        server.join(timeout=6)
        rep.close(linger=0)


def test_control_reports_a_reply_that_is_not_json(context: zmq.Context[Any]) -> None:
    rep = context.socket(zmq.REP)
    endpoint = _bind(rep)

    def answer_garbage() -> None:
        if rep.poll(5000, zmq.POLLIN):
            rep.recv()
            rep.send(b"\xff garbage")

    server = threading.Thread(target=answer_garbage, name="fake-garbage-control")
    server.start()
    try:
        with ControlClient(endpoint, timeout=3.0) as control, pytest.raises(NetworkError, match="not JSON"):
            control.request("status")
    finally:
        server.join(timeout=6)
        rep.close(linger=0)


def test_control_rejects_a_non_positive_timeout() -> None:
    with pytest.raises(LivestackError, match="must be positive"):
        ControlClient("tcp://127.0.0.1:1", timeout=0)
