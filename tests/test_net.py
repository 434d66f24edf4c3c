"""The daemon's sockets: security policy, keys, publishing that never blocks, and a control server that
always answers, checked with real ZeroMQ sockets on loopback.

Client sockets are written here directly with pyzmq so these tests do not depend on livestack.clients.bus.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from socket import create_connection
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.auth

from livestack import events
from livestack.errors import LivestackError, NetworkError
from livestack.live.net import (
    CONTROL_MAX_MESSAGE,
    CONTROL_MAX_REQUEST,
    PUBLISH_HWM,
    Security,
    SocketHub,
    check_security,
    generate_keys,
    is_loopback,
)

ANY = "tcp://127.0.0.1:*"
REFUSAL = ("refusing to bind tcp://0.0.0.0:{port} beyond loopback without CURVE keys; "
           "set server_secret_key and authorized_keys, or insecure_remote = true")


class Clients:
    """Client sockets in their own context, separate from the daemon's, all closed at teardown."""

    def __init__(self) -> None:
        self.context: zmq.Context[Any] = zmq.Context()
        self.sockets: list[zmq.Socket[Any]] = []

    def socket(self, kind: int, folder: Path | None) -> zmq.Socket[Any]:
        socket = self.context.socket(kind)
        self.sockets.append(socket)
        socket.linger = 0
        if folder is not None:
            curve_client(socket, folder)
        return socket

    def close(self) -> None:
        for socket in self.sockets:
            socket.close(linger=0)
        self.context.term()


@pytest.fixture
def ctx() -> Iterator[Clients]:
    clients = Clients()
    yield clients
    clients.close()


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """A server pair, an authorised client's folder, and an intruder's pair not in authorized_keys."""
    server_public, server_secret = generate_keys(tmp_path / "server")
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    client_dir = tmp_path / "client"
    client_public, _ = generate_keys(client_dir, "client")
    shutil.copy(client_public, authorized / "client.key")
    shutil.copy(server_public, client_dir / "server.key")
    intruder_dir = tmp_path / "intruder"
    generate_keys(intruder_dir, "client")
    shutil.copy(server_public, intruder_dir / "server.key")
    return {"server_secret": server_secret, "authorized": authorized, "client": client_dir,
            "intruder": intruder_dir}


def status_event(**changes: Any) -> events.Event:
    fields: dict[str, Any] = {
        "state": "running", "queue": 0, "lag": 0.0, "received": 3, "accepted": 2, "rejected": 1,
        "exptime": 120.0, "frames": 2, "uptime": 5.0, "started": events.utc_now_iso(), "watch": "/data/in",
        "output": "/data/out", "method": "mean", "object": "M31", "filter": None, "session": 1,
        "last_latency": 0.5, "insecure": False,
    }
    fields.update(changes)
    return events.make_event("status", **fields)


def curve_client(socket: zmq.Socket[Any], folder: Path) -> None:
    """Make a client socket speak CURVE with the pair and server key of a client folder."""
    public, secret = zmq.auth.load_certificate(folder / "client.key_secret")
    server_public, _ = zmq.auth.load_certificate(folder / "server.key")
    socket.curve_publickey = public
    socket.curve_secretkey = secret
    socket.curve_serverkey = server_public


def subscriber(ctx: Clients, endpoint: str, folder: Path | None = None,
               rcvhwm: int = 1000) -> zmq.Socket[Any]:
    sub = ctx.socket(zmq.SUB, folder)
    sub.rcvhwm = rcvhwm
    sub.subscribe(b"")
    sub.connect(endpoint)
    return sub


def requester(ctx: Clients, endpoint: str, folder: Path | None = None) -> zmq.Socket[Any]:
    req = ctx.socket(zmq.REQ, folder)
    req.connect(endpoint)
    return req


def publish_until_received(hub: SocketHub, sub: zmq.Socket[Any], event: events.Event,
                           within: float = 5.0) -> events.Event | None:
    """Publish repeatedly until the subscriber gets one (it may join late), or give up."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        hub.publisher.send(event)
        if sub.poll(50, zmq.POLLIN):
            return events.decode(sub.recv_multipart())
    return None


def ask(req: zmq.Socket[Any], *parts: bytes, timeout_ms: int = 5000) -> dict[str, Any] | None:
    req.send_multipart(list(parts))
    if not req.poll(timeout_ms, zmq.POLLIN):
        return None
    reply = json.loads(req.recv())
    assert isinstance(reply, dict)
    return reply


class Daemon:
    """A control handler like the daemon's, recording what it was asked."""

    def __init__(self) -> None:
        self.paused = False

    def __call__(self, request: dict[str, Any]) -> bytes:
        if request["cmd"] == "status":
            return events.ok_reply(state="paused" if self.paused else "running")
        if request["cmd"] == "pause":
            self.paused = True
            return events.ok_reply(state="paused")
        if request["cmd"] == "reset":
            raise LivestackError("nothing to reset yet")
        if request["cmd"] == "set_reference":
            raise ValueError(f"{request['path']} is not an accepted frame")
        if request["cmd"] == "shutdown":
            raise RuntimeError("a bug in the handler")
        return events.ok_reply()


class Serving:
    """Runs ControlServer.serve in a thread for the duration of a with block."""

    def __init__(self, hub: SocketHub, handler: Daemon) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=hub.control.serve, args=(handler, self.stop, 20))

    def __enter__(self) -> Serving:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive()


# -- endpoints and policy ------------------------------------------------------------------------------------

@pytest.mark.parametrize("endpoint", [
    "tcp://127.0.0.1:5555", "tcp://127.1.2.3:1", "tcp://localhost:5555", "tcp://LOCALHOST:*",
    "tcp://[::1]:5555", "tcp://[::ffff:127.0.0.1]:5555", "tcp://127.0.0.1:*",
    "ipc:///run/livestack/events", "ipc://@livestack", "inproc://events",
])
def test_loopback_endpoints(endpoint: str) -> None:
    assert is_loopback(endpoint)


@pytest.mark.parametrize("endpoint", [
    "tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://*:*", "tcp://eth0:5555", "tcp://192.168.1.20:5555",
    "tcp://[::]:5555", "tcp://[fe80::1]:5555", "tcp://observatory.local:5555",
])
def test_endpoints_beyond_loopback(endpoint: str) -> None:
    assert not is_loopback(endpoint)


@pytest.mark.parametrize("endpoint", [
    "", "127.0.0.1:5555", "tcp://", "tcp://127.0.0.1", "tcp://127.0.0.1:", "tcp://127.0.0.1:http",
    "tcp://127.0.0.1:70000", "tcp://:5555", "tcp://::1:5555", "tcp://[::1]5555", "tcp://[nonsense]:5555",
    "tcp://127.0.0.300:5555", "tcp://bad host:5555", "udp://127.0.0.1:5555", "ipc://", "inproc://",
])
def test_malformed_endpoints_are_refused_with_a_sentence(endpoint: str) -> None:
    with pytest.raises(NetworkError, match="endpoint"):
        is_loopback(endpoint)


def test_policy_refuses_remote_binding_without_keys() -> None:
    with pytest.raises(NetworkError) as info:
        check_security(["tcp://127.0.0.1:5556", "tcp://0.0.0.0:5555"], Security())
    assert str(info.value) == REFUSAL.format(port=5555)
    assert check_security(["tcp://127.0.0.1:5555", "ipc:///tmp/x"], Security()) is False
    assert check_security(["tcp://0.0.0.0:5555"], Security(insecure_remote=True)) is True


def test_hub_refuses_remote_binding_before_binding_anything() -> None:
    with pytest.raises(NetworkError) as info:
        SocketHub("tcp://0.0.0.0:5599", ANY)
    assert str(info.value) == REFUSAL.format(port=5599)


def test_policy_with_keys(keys: dict[str, Path], tmp_path: Path) -> None:
    secure = Security(keys["server_secret"], keys["authorized"])
    # Keys make a remote endpoint acceptable, and the daemon is not insecure.
    assert check_security(["tcp://0.0.0.0:5555"], secure) is False
    with pytest.raises(NetworkError, match="both server_secret_key and authorized_keys"):
        check_security([ANY], Security(keys["server_secret"], None))
    with pytest.raises(NetworkError, match="cannot be read"):
        check_security([ANY], Security(tmp_path / "missing.key_secret", keys["authorized"]))
    with pytest.raises(NetworkError, match="holds no secret key"):
        check_security([ANY], Security(keys["client"] / "server.key", keys["authorized"]))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NetworkError, match=r"holds no \*\.key file"):
        check_security([ANY], Security(keys["server_secret"], empty))
    with pytest.raises(NetworkError, match="is not a folder"):
        check_security([ANY], Security(keys["server_secret"], tmp_path / "nowhere"))
    (empty / "broken.key").write_text("not a certificate\n")
    with pytest.raises(NetworkError, match=r"broken\.key is not a ZeroMQ public certificate"):
        check_security([ANY], Security(keys["server_secret"], empty))


# -- keys ----------------------------------------------------------------------------------------------------

def test_generate_keys_writes_a_private_pair_and_never_overwrites(tmp_path: Path) -> None:
    folder = tmp_path / "deep" / "keys"
    public, secret = generate_keys(folder)
    assert (public, secret) == (folder / "server.key", folder / "server.key_secret")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    public_key, no_secret = zmq.auth.load_certificate(public)
    pair_public, pair_secret = zmq.auth.load_certificate(secret)
    assert no_secret is None and pair_secret is not None and pair_public == public_key
    assert sorted(p.name for p in folder.iterdir()) == ["server.key", "server.key_secret"]

    before = secret.read_bytes()
    with pytest.raises(NetworkError, match="already exists; livestack never overwrites keys"):
        generate_keys(folder)
    assert secret.read_bytes() == before
    public.unlink()
    with pytest.raises(NetworkError, match=r"server\.key_secret already exists"):
        generate_keys(folder)
    assert generate_keys(folder, "client")[0] == folder / "client.key"
    with pytest.raises(NetworkError, match="not a plain file name"):
        generate_keys(folder, "../escape")


# -- publishing ----------------------------------------------------------------------------------------------

def test_subscriber_receives_valid_events(ctx: Clients) -> None:
    with SocketHub(ANY, ANY) as hub:
        assert hub.insecure is False
        assert hub.publisher.endpoint.startswith("tcp://127.0.0.1:")
        sub = subscriber(ctx, hub.publisher.endpoint)
        first = publish_until_received(hub, sub, status_event())
        assert first is not None and first.topic == "status" and first["state"] == "running"

        preview = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
        stack = events.make_event("stack", preview=preview, frames=2, exptime=120.0, method="mean",
                                  rejected_fraction=0.0, snr=12.5, object="M31", filter=None,
                                  reference="/data/in/a.fits", session=1)
        assert hub.publisher.send(stack)
        # Status events published while joining may still be queued ahead of the stack event.
        received = events.decode(sub.recv_multipart())
        while received.topic == "status":
            assert sub.poll(5000, zmq.POLLIN)
            received = events.decode(sub.recv_multipart())
        assert received.topic == "stack" and received["frames"] == 2
        assert received.preview is not None and np.array_equal(received.preview, preview)
        assert hub.publisher.dropped == 0


def test_publishing_without_subscribers_never_blocks() -> None:
    event = status_event()
    with SocketHub(ANY, ANY) as hub:
        start = time.monotonic()
        results = [hub.publisher.send(event) for _ in range(100_000)]
        assert time.monotonic() - start < 10
    assert all(results)


def test_a_stalled_subscriber_never_blocks_the_publisher(ctx: Clients) -> None:
    # Large events, so that what ZeroMQ and the kernel can buffer is far less than what is published.
    event = events.make_event("log", level="info", message="x" * 2000, logger="test")
    with SocketHub(ANY, ANY) as hub:
        sub = subscriber(ctx, hub.publisher.endpoint, rcvhwm=10)
        assert publish_until_received(hub, sub, event) is not None
        # From now on the subscriber reads nothing while 100 000 events go out.
        start = time.monotonic()
        for _ in range(100_000):
            hub.publisher.send(event)
        assert time.monotonic() - start < 10
        assert hub.publisher.sent + hub.publisher.dropped >= 100_000

        received = 0
        while sub.poll(500, zmq.POLLIN):
            sub.recv_multipart()
            received += 1
        # The queues were bounded: most events were dropped for this subscriber, not buffered.
        assert 0 < received < 50_000, received
        # And the subscriber is served again as soon as it reads.
        marker = status_event(state="waiting")
        assert hub.publisher.send(marker)
        assert sub.poll(5000, zmq.POLLIN)
        assert events.decode(sub.recv_multipart())["state"] == "waiting"
    assert PUBLISH_HWM <= 10_000


def test_publisher_refuses_events_after_close() -> None:
    hub = SocketHub(ANY, ANY)
    hub.close()
    hub.close()
    with pytest.raises(NetworkError, match="closed"):
        hub.publisher.send(status_event())
    with pytest.raises(NetworkError, match="closed"):
        hub.control.poll_once(Daemon(), 0)


# -- control -------------------------------------------------------------------------------------------------

def test_control_answers_every_request_and_survives_bad_input(ctx: Clients) -> None:
    daemon = Daemon()
    with SocketHub(ANY, ANY) as hub, Serving(hub, daemon):
        req = requester(ctx, hub.control.endpoint)
        assert ask(req, b'{"cmd": "status"}') == {"ok": True, "result": {"state": "running"}}
        assert ask(req, b'{"cmd": "pause"}') == {"ok": True, "result": {"state": "paused"}}
        assert daemon.paused

        bad: list[tuple[list[bytes], str]] = [
            ([b'{"cmd": "status"'], "the request is not JSON"),
            ([b'["status"]'], "the request is not a JSON object"),
            ([b'{"cmd": "explode"}'], "unknown command 'explode'"),
            ([b'{"cmd": "set_reference"}'], "set_reference needs a 'path'"),
            ([bytes(range(256))], "the request is not JSON"),
            ([b"\xff\xfe\x00\x81garbage"], "the request is not JSON"),
            ([b""], "the request is not JSON"),
            ([b'{"cmd": "status"}', b"extra"], "this one has 2 parts"),
            ([b'{"cmd": "reset"}'], "nothing to reset yet"),
            ([b'{"cmd": "set_reference", "path": "/x.fits"}'], "/x.fits is not an accepted frame"),
        ]
        for parts, message in bad:
            reply = ask(req, *parts)
            assert reply is not None and reply["ok"] is False, parts
            assert message in reply["error"], (parts, reply)
        # Still answering, with the state the good requests left.
        assert ask(req, b'{"cmd": "status"}') == {"ok": True, "result": {"state": "paused"}}


def test_an_oversized_request_gets_an_error_reply_and_others_still_served(ctx: Clients) -> None:
    with SocketHub(ANY, ANY) as hub, Serving(hub, Daemon()):
        req = requester(ctx, hub.control.endpoint)
        for size in (CONTROL_MAX_REQUEST + 1, 100_000, 10_000_000):
            big = b'{"cmd": "status", "pad": "' + b"x" * size + b'"}'
            reply = ask(req, big, timeout_ms=10_000)
            assert reply == {"ok": False, "error": f"the request is {len(big):,} bytes; requests are at "
                                                   f"most {CONTROL_MAX_REQUEST:,} bytes"}
        assert ask(req, b'{"cmd": "status"}') == {"ok": True, "result": {"state": "running"}}


def test_a_request_beyond_what_zeromq_takes_is_cut_off_and_others_still_served(ctx: Clients) -> None:
    with SocketHub(ANY, ANY) as hub, Serving(hub, Daemon()):
        flood = requester(ctx, hub.control.endpoint)
        assert ask(flood, b"x" * (CONTROL_MAX_MESSAGE + 1), timeout_ms=1000) is None
        req = requester(ctx, hub.control.endpoint)
        assert ask(req, b'{"cmd": "status"}') == {"ok": True, "result": {"state": "running"}}


def test_a_handler_bug_gets_a_reply_and_its_traceback_is_logged(
        ctx: Clients, caplog: pytest.LogCaptureFixture) -> None:
    with SocketHub(ANY, ANY) as hub:
        req = requester(ctx, hub.control.endpoint)
        assert hub.control.poll_once(Daemon(), 0) is False
        req.send(b'{"cmd": "shutdown"}')
        assert hub.control.poll_once(Daemon(), 5000) is True
        assert req.poll(5000, zmq.POLLIN)
        assert json.loads(req.recv()) == {
            "ok": False, "error": "the daemon failed to answer this request (RuntimeError)"}
        assert "a bug in the handler" in caplog.text and "Traceback" in caplog.text
        # The REP socket is back to receiving.
        req.send(b'{"cmd": "status"}')
        assert hub.control.poll_once(Daemon(), 5000) is True
        assert json.loads(req.recv())["ok"] is True


def test_killer_messages_get_a_sentence_and_the_server_goes_on(ctx: Clients) -> None:
    killers: list[tuple[bytes, str]] = [
        (b'{"cmd": "status", "n": ' + b"9" * 5000 + b"}", "the request holds a number too long to be read"),
        (b'{"cmd": "status", "n": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
         "the request is nested too deeply to be read"),
        (b"[" * 30_000, "the request"),
    ]
    with SocketHub(ANY, ANY) as hub, Serving(hub, Daemon()) as serving:
        req = requester(ctx, hub.control.endpoint)
        for message, error in killers:
            reply = ask(req, message)
            assert reply is not None and reply["ok"] is False and reply["error"].startswith(error), reply
        # Plain TCP garbage to the control port: not ZeroMQ at all.
        host, port = hub.control.endpoint.removeprefix("tcp://").rsplit(":", 1)
        rng = np.random.default_rng(7)
        with create_connection((host, int(port)), timeout=5) as raw:
            raw.sendall(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
            time.sleep(0.2)
        assert serving.thread.is_alive()
        assert ask(req, b'{"cmd": "status"}') == {"ok": True, "result": {"state": "running"}}


def test_bind_failures_name_the_endpoint(tmp_path: Path) -> None:
    with SocketHub(ANY, ANY) as hub:
        taken = hub.control.endpoint
        with pytest.raises(NetworkError, match=re.escape(f"cannot bind {taken}: Address already in use")):
            SocketHub(ANY, taken)
    missing = f"ipc://{tmp_path}/no/such/folder/events"
    with pytest.raises(NetworkError, match=re.escape(f"cannot bind {missing}")):
        SocketHub(missing, ANY)


# -- CURVE ---------------------------------------------------------------------------------------------------

def test_authorised_client_is_served_over_curve(ctx: Clients, keys: dict[str, Path]) -> None:
    with SocketHub(ANY, ANY, Security(keys["server_secret"], keys["authorized"])) as hub, \
            Serving(hub, Daemon()):
        assert hub.insecure is False
        sub = subscriber(ctx, hub.publisher.endpoint, keys["client"])
        received = publish_until_received(hub, sub, status_event())
        assert received is not None and received["object"] == "M31"
        req = requester(ctx, hub.control.endpoint, keys["client"])
        assert ask(req, b'{"cmd": "status"}') == {"ok": True, "result": {"state": "running"}}


@pytest.mark.parametrize("who", ["intruder", "plain"])
def test_unauthorised_clients_get_nothing(ctx: Clients, keys: dict[str, Path], who: str) -> None:
    folder = keys["intruder"] if who == "intruder" else None
    with SocketHub(ANY, ANY, Security(keys["server_secret"], keys["authorized"])) as hub, \
            Serving(hub, Daemon()):
        outsider = subscriber(ctx, hub.publisher.endpoint, folder)
        insider = subscriber(ctx, hub.publisher.endpoint, keys["client"])
        # The authorised subscriber proves events are flowing while the outsider hears nothing.
        assert publish_until_received(hub, insider, status_event()) is not None
        assert publish_until_received(hub, outsider, status_event(), within=1.5) is None
        req = requester(ctx, hub.control.endpoint, folder)
        assert ask(req, b'{"cmd": "status"}', timeout_ms=1500) is None
