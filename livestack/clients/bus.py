"""The client side of the daemon's sockets: a subscriber to its events and a client of its control socket.

Used by the terminal UI and by scripts; it imports the event schema and nothing of the processing stages.

Keys (ZeroMQ CURVE) follow the files written by ``zmq.auth.create_certificates(directory, name)``:
``NAME.key`` holds a public key, ``NAME.key_secret`` a public and secret pair. A client's key folder holds
``client.key_secret`` (its own pair) and ``server.key`` (the daemon's public certificate). Without keys the
sockets are plain, which the daemon accepts only on loopback unless told otherwise.

Both classes own their socket (and, unless given one, their ZeroMQ context) and are meant to be used from
one thread at a time, like the ZeroMQ sockets inside them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import zmq
import zmq.auth

from livestack import events
from livestack.errors import LivestackError, NetworkError

__all__ = ["CLIENT_SECRET_FILE", "SERVER_PUBLIC_FILE", "ClientKeys", "ControlClient", "Subscriber"]

#: The client's own key pair, in a ``--keys`` folder.
CLIENT_SECRET_FILE = "client.key_secret"
#: The daemon's public certificate, in a ``--keys`` folder.
SERVER_PUBLIC_FILE = "server.key"

#: Messages a subscriber queues before ZeroMQ drops new ones; previews are large, and a UI that falls
#: this far behind is better served by the next ``status`` than by a backlog.
_SUB_RCVHWM = 200
#: How soon a lost connection is retried, and the ceiling of ZeroMQ's back-off between retries (ms).
_RECONNECT_IVL_MS = 250
_RECONNECT_IVL_MAX_MS = 4000
#: ZMTP heartbeats let a silent TCP peer (a daemon whose host vanished) be noticed and reconnected to.
_HEARTBEAT_IVL_MS = 1000
_HEARTBEAT_TIMEOUT_MS = 3000


@dataclass(frozen=True)
class ClientKeys:
    """The CURVE keys a client needs: its own pair and the daemon's public key (Z85-encoded bytes).

    Attributes
    ----------
    public : bytes
        The client's public key.
    secret : bytes
        The client's secret key.
    server_public : bytes
        The daemon's public key; the connection is refused unless the daemon proves it holds the secret.
    """

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def load(cls, directory: str | Path) -> ClientKeys:
        """Read ``client.key_secret`` and ``server.key`` from a folder.

        Parameters
        ----------
        directory : str or Path
            A folder holding the client's key pair and the daemon's public certificate.

        Returns
        -------
        ClientKeys

        Raises
        ------
        NetworkError
            When the folder or a file is missing or is not a ZeroMQ certificate.
        """
        folder = Path(directory)
        if not folder.is_dir():
            raise NetworkError(f"the key folder {folder} does not exist")
        own = folder / CLIENT_SECRET_FILE
        server = folder / SERVER_PUBLIC_FILE
        if not own.is_file():
            raise NetworkError(
                f"the key folder {folder} has no {CLIENT_SECRET_FILE} (the client's own key pair, "
                "as written by zmq.auth.create_certificates(folder, 'client'))"
            )
        if not server.is_file():
            raise NetworkError(
                f"the key folder {folder} has no {SERVER_PUBLIC_FILE} (a copy of the daemon's public "
                "certificate)"
            )
        public, secret = _read_certificate(own)
        server_public, _ = _read_certificate(server)
        if secret is None:
            raise NetworkError(f"{own} holds no secret key; it should be a .key_secret certificate")
        return cls(public=public, secret=secret, server_public=server_public)

    def apply(self, socket: zmq.Socket[Any]) -> None:
        """Make a socket a CURVE client of the daemon; call before ``connect``.

        Parameters
        ----------
        socket : zmq.Socket
            A socket not yet connected.
        """
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_serverkey = self.server_public


class Subscriber:
    """A SUB socket on the daemon's events, subscribed to every topic or to the ones named.

    ZeroMQ reconnects by itself when the daemon restarts or the network comes back; the caller tells a
    live connection from a stale one by the daemon's ``status`` heartbeat (one a second).

    Parameters
    ----------
    endpoint : str
        The daemon's PUB endpoint, e.g. ``tcp://127.0.0.1:5555``.
    keys : ClientKeys, optional
        CURVE keys; plain TCP without them.
    context : zmq.Context, optional
        A context to share; by default the subscriber makes its own and terminates it on ``close``.
    topics : sequence of str, optional
        Receive only these topics (``events.TOPICS``); the daemon then sends nothing else to this
        subscriber, which spares a slow link the ``display`` pictures a dashboard does not show.

    Attributes
    ----------
    skipped : int
        Messages dropped because they did not follow the event schema (another version, garbage).
    last_error : str or None
        Why the last of those was dropped.

    Notes
    -----
    Not thread-safe: use an instance from one thread at a time.
    """

    def __init__(
        self, endpoint: str, keys: ClientKeys | None = None, context: zmq.Context[Any] | None = None,
        topics: Sequence[str] | None = None,
    ) -> None:
        unknown = [t for t in topics or () if t not in events.TOPICS]
        if unknown:
            raise LivestackError(f"unknown topics {', '.join(unknown)}; "
                                 f"topics are {', '.join(events.TOPICS)}")
        self.endpoint = endpoint
        self.skipped = 0
        self.last_error: str | None = None
        self._own_context = context is None
        self._context: zmq.Context[Any] = zmq.Context() if context is None else context
        self._socket: zmq.Socket[Any] = self._context.socket(zmq.SUB)
        try:
            self._socket.linger = 0
            self._socket.rcvhwm = _SUB_RCVHWM
            _tune_reconnects(self._socket)
            if keys is not None:
                keys.apply(self._socket)
            # ZeroMQ filters by prefix on the daemon's side; no topic is a prefix of another.
            for topic in topics if topics is not None else ("",):
                self._socket.setsockopt(zmq.SUBSCRIBE, topic.encode("ascii"))
            self._socket.connect(endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise NetworkError(f"cannot subscribe to {endpoint}: {exc}") from exc

    def recv(self, timeout: float) -> events.Event | None:
        """Wait for the next valid event.

        Parameters
        ----------
        timeout : float
            Seconds to wait at most.

        Returns
        -------
        Event or None
            The event, or None when none came in time. Malformed messages are counted in ``skipped``
            and waited past, never raised.
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not self._socket.poll(remaining_ms, zmq.POLLIN):
                return None
            parts = self._socket.recv_multipart(zmq.NOBLOCK)
            try:
                return events.decode(parts)
            except events.SchemaError as exc:
                self.skipped += 1
                self.last_error = str(exc)
            if time.monotonic() >= deadline:
                return None

    def close(self) -> None:
        """Close the socket (and the context, when the subscriber made it). Safe to call twice."""
        self._socket.close(linger=0)
        if self._own_context:
            self._context.term()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class ControlClient:
    """A REQ client of the daemon's control socket, with the lazy-pirate recovery on timeouts.

    Parameters
    ----------
    endpoint : str
        The daemon's REP endpoint, e.g. ``tcp://127.0.0.1:5556``.
    keys : ClientKeys, optional
        CURVE keys; plain TCP without them.
    timeout : float
        Seconds to wait for a reply.
    context : zmq.Context, optional
        A context to share; by default the client makes its own and terminates it on ``close``.

    Notes
    -----
    Not thread-safe: use an instance from one thread at a time (a REQ socket must alternate send and
    receive, and a ZeroMQ socket must not be used by two threads at once).
    """

    def __init__(
        self,
        endpoint: str,
        keys: ClientKeys | None = None,
        timeout: float = 2.0,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        if timeout <= 0:
            raise LivestackError(f"a control timeout must be positive, not {timeout}")
        self.endpoint = endpoint
        self.timeout = timeout
        self._keys = keys
        self._own_context = context is None
        self._context: zmq.Context[Any] = zmq.Context() if context is None else context
        self._socket: zmq.Socket[Any] | None = None
        try:
            self._socket = self._new_socket()
        except NetworkError:
            self.close()
            raise

    def request(self, cmd: str, **fields: Any) -> dict[str, Any]:
        """Send a command and wait for the daemon's reply.

        Parameters
        ----------
        cmd : str
            One of ``events.COMMANDS``.
        **fields
            Extra fields of the request (``path`` for ``set_reference``).

        Returns
        -------
        dict
            The reply: ``{"ok": True, "result": {...}}`` or ``{"ok": False, "error": "..."}``.

        Raises
        ------
        LivestackError
            When the request itself is invalid (an unknown command, a missing field).
        NetworkError
            When no reply came within ``timeout`` (the socket is then replaced, so the next request can
            succeed once the daemon is back), or the reply is not a JSON object.
        """
        raw = json.dumps({**fields, "cmd": cmd}).encode()
        try:
            events.decode_request(raw)
        except events.SchemaError as exc:
            raise LivestackError(str(exc)) from exc
        if self._socket is None:
            self._socket = self._new_socket()
        self._socket.send(raw)
        if not self._socket.poll(int(self.timeout * 1000), zmq.POLLIN):
            # A REQ socket that sent without a reply is stuck in its send-receive cycle: throw it away
            # (dropping the unsent request) and start over, so the next request has a fresh chance.
            self._socket.close(linger=0)
            self._socket = None
            self._socket = self._new_socket()
            raise NetworkError(f"no reply from {self.endpoint} within {self.timeout:g} s")
        reply_raw = self._socket.recv()
        try:
            reply = json.loads(reply_raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise NetworkError(f"the reply from {self.endpoint} is not JSON") from exc
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            raise NetworkError(f'the reply from {self.endpoint} is not an object with "ok"')
        return reply

    def close(self) -> None:
        """Close the socket (and the context, when the client made it). Safe to call twice."""
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        if self._own_context:
            self._context.term()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _new_socket(self) -> zmq.Socket[Any]:
        socket: zmq.Socket[Any] = self._context.socket(zmq.REQ)
        try:
            socket.linger = 0
            _tune_reconnects(socket)
            if self._keys is not None:
                self._keys.apply(socket)
            socket.connect(self.endpoint)
        except zmq.ZMQError as exc:
            socket.close(linger=0)
            raise NetworkError(f"cannot connect to {self.endpoint}: {exc}") from exc
        return socket


def _read_certificate(path: Path) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise NetworkError(f"{path} is not a ZeroMQ certificate: {exc}") from exc
    if public is None:
        raise NetworkError(f"{path} holds no public key")
    return public, secret


def _tune_reconnects(socket: zmq.Socket[Any]) -> None:
    socket.reconnect_ivl = _RECONNECT_IVL_MS
    socket.reconnect_ivl_max = _RECONNECT_IVL_MAX_MS
    socket.heartbeat_ivl = _HEARTBEAT_IVL_MS
    socket.heartbeat_timeout = _HEARTBEAT_TIMEOUT_MS
