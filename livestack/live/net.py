"""The daemon's side of its ZeroMQ sockets: the event publisher, the control server and their security.

Two sockets face the world. A PUB socket publishes events (see :mod:`livestack.events`) and never blocks the
daemon: a slow or stalled subscriber loses events, the pipeline never waits. A REP socket answers control
requests, one reply per request, whatever arrives on it.

Security policy, checked once before anything binds (:func:`check_security`):

* endpoints on loopback (``tcp://127.0.0.1``, ``tcp://localhost``, ``tcp://[::1]``, ``ipc://``,
  ``inproc://``) need nothing;
* an endpoint beyond loopback needs CURVE keys: the server's secret certificate and a folder of authorised
  clients' public certificates. Without them the daemon refuses to start, unless ``insecure_remote`` is set,
  which the daemon then reports loudly and in every ``status`` event.

Key files follow ``zmq.auth.create_certificates``: ``NAME.key`` holds a public key, ``NAME.key_secret`` the
pair. The daemon reads ``server.key_secret`` and every ``*.key`` of the authorised folder; a client keeps its
own ``client.key_secret`` and the daemon's ``server.key`` (see :func:`generate_keys`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from livestack import events
from livestack.errors import LivestackError, NetworkError

__all__ = [
    "CONTROL_MAX_MESSAGE",
    "CONTROL_MAX_REQUEST",
    "PUBLISH_HWM",
    "ControlServer",
    "Publisher",
    "Security",
    "SocketHub",
    "check_security",
    "generate_keys",
    "is_loopback",
]

#: Events queued per subscriber before ZeroMQ drops new ones for that subscriber. At a few events per frame
#: this is minutes of history; a larger queue only delays how soon a stalled viewer catches up.
PUBLISH_HWM = 1000

#: Largest control request read, in bytes. Requests are tiny JSON objects; a larger one gets an error reply
#: without being parsed.
CONTROL_MAX_REQUEST = 64 * 1024

#: Largest message ZeroMQ takes on the control socket, in bytes: a peer that sends more is disconnected
#: before the daemon allocates the message (no reply can reach it). Between ``CONTROL_MAX_REQUEST`` and this
#: a request still gets its error reply.
CONTROL_MAX_MESSAGE = 16 * 1024 * 1024

#: Messages ZeroMQ queues per control peer before it stops reading from that peer: with
#: ``CONTROL_MAX_MESSAGE`` this bounds what one peer can make the daemon hold.
CONTROL_RCVHWM = 4

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Security:
    """How the daemon's sockets are secured.

    Attributes
    ----------
    server_secret_key : Path or None
        The daemon's secret certificate (``server.key_secret``), for CURVE.
    authorized_keys : Path or None
        A folder of authorised clients' public certificates (every ``*.key`` in it).
    insecure_remote : bool
        Allow binding beyond loopback without keys (anyone who can reach the port can control the daemon).
    """

    server_secret_key: Path | None = None
    authorized_keys: Path | None = None
    insecure_remote: bool = False

    @property
    def curve(self) -> bool:
        """Whether CURVE keys are configured (both paths set)."""
        return self.server_secret_key is not None and self.authorized_keys is not None


def generate_keys(directory: str | os.PathLike[str], name: str = "server") -> tuple[Path, Path]:
    """Create a CURVE key pair as ``NAME.key`` (public) and ``NAME.key_secret`` (secret).

    The folder is created with mode 0o700 when missing; the secret file gets mode 0o600 and is never readable
    by others, even for an instant. Existing keys are never overwritten.

    Parameters
    ----------
    directory : path
        Where to write the two files.
    name : str
        Base name of the files: ``server`` for the daemon, ``client`` (or a person's name) for a client.

    Returns
    -------
    tuple of Path
        The public and the secret certificate files.

    Raises
    ------
    NetworkError
        When the name is not a plain file name, a key file already exists, or the files cannot be written.
    """
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise NetworkError(f"key name {name!r} is not a plain file name (letters, digits, '_', '-', '.')")
    folder = Path(directory)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    try:
        if not folder.is_dir():
            folder.mkdir(mode=0o700, parents=True)
            # mkdir's mode is filtered by the umask; the folder must be private whatever the umask.
            folder.chmod(0o700)
        for path in (public, secret):
            if path.exists():
                raise NetworkError(_exists(path))
        # create_certificates writes with the umask's mode: do it inside a private temporary folder, tighten
        # the modes, then move the files in without overwriting anything.
        staging = Path(tempfile.mkdtemp(prefix=".keys-", dir=folder))
        try:
            made_public, made_secret = (Path(p) for p in zmq.auth.create_certificates(staging, name))
            made_secret.chmod(0o600)
            made_public.chmod(0o644)
            _place(made_secret, secret)
            try:
                _place(made_public, public)
            except BaseException:
                secret.unlink()
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        raise NetworkError(f"cannot write keys in {folder}: {exc.strerror or exc}") from exc
    return public, secret


def is_loopback(endpoint: str) -> bool:
    """Whether an endpoint stays on this machine.

    Parameters
    ----------
    endpoint : str
        A ZeroMQ bind endpoint: ``tcp://HOST:PORT`` (``HOST`` an address, ``localhost``, ``*`` or an interface
        name; ``PORT`` a number or ``*``), ``ipc://PATH`` or ``inproc://NAME``.

    Returns
    -------
    bool
        True for ``tcp://`` on 127.0.0.0/8, ``localhost`` or ``[::1]``, and for ``ipc://`` and ``inproc://``;
        False for any other host, including ``*``, ``0.0.0.0`` and interface names.

    Raises
    ------
    NetworkError
        When the endpoint is malformed or uses another transport.
    """
    scheme, sep, rest = endpoint.partition("://")
    if not sep or not rest:
        raise NetworkError(f"endpoint {endpoint!r} is not tcp://HOST:PORT, ipc://PATH or inproc://NAME")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        raise NetworkError(f"endpoint {endpoint!r} uses the transport {scheme!r}; use tcp, ipc or inproc")
    host, port = _split_tcp(endpoint, rest)
    if port != "*" and not (port.isdigit() and int(port) <= 65535):
        raise NetworkError(f"endpoint {endpoint!r} has the port {port!r}; use 1 to 65535, or * for any")
    if host.startswith("["):
        try:
            address = ipaddress.IPv6Address(host[1:-1])
        except ValueError as exc:
            raise NetworkError(f"endpoint {endpoint!r} has a malformed IPv6 address") from exc
        # ::ffff:127.0.0.1 is IPv4 loopback in IPv6 clothing; Python 3.11 does not call it loopback.
        mapped = address.ipv4_mapped
        return address.is_loopback or (mapped is not None and mapped.is_loopback)
    if host == "*":
        return False
    if host.lower() == "localhost":
        return True
    if re.fullmatch(r"[0-9.]+", host):
        try:
            return ipaddress.IPv4Address(host).is_loopback
        except ValueError as exc:
            raise NetworkError(f"endpoint {endpoint!r} has a malformed IPv4 address") from exc
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", host):
        raise NetworkError(f"endpoint {endpoint!r} has the malformed host {host!r}")
    # An interface name (eth0, wlan0) or a host name: assume it reaches beyond this machine.
    return False


def check_security(endpoints: Iterable[str], security: Security) -> bool:
    """Apply the security policy to the endpoints the daemon will bind.

    Parameters
    ----------
    endpoints : iterable of str
        Every endpoint to bind.
    security : Security
        The configured keys and opt-out.

    Returns
    -------
    bool
        True when an endpoint goes beyond loopback without keys (``insecure_remote``): the daemon must warn
        at start and flag ``insecure`` in every status.

    Raises
    ------
    NetworkError
        When an endpoint is malformed; when an endpoint goes beyond loopback without keys and without
        ``insecure_remote``; when only one of the two key settings is given; when the keys cannot be read or
        the authorised folder holds no ``*.key``.
    """
    remote = [endpoint for endpoint in endpoints if not is_loopback(endpoint)]
    if (security.server_secret_key is None) != (security.authorized_keys is None):
        raise NetworkError("CURVE needs both server_secret_key and authorized_keys; set both, or neither")
    if security.curve:
        _check_keys(security)
        return False
    if remote and not security.insecure_remote:
        raise NetworkError(f"refusing to bind {remote[0]} beyond loopback without CURVE keys; "
                           "set server_secret_key and authorized_keys, or insecure_remote = true")
    return bool(remote)


class Publisher:
    """The PUB socket: publishes events without ever blocking.

    ZeroMQ sockets are not thread-safe: call :meth:`send` from one thread only (the daemon's publisher
    thread). Each subscriber has a queue of ``PUBLISH_HWM`` events; when it is full ZeroMQ silently drops
    further events for that subscriber alone, so a stalled viewer never slows the others or the daemon.

    Attributes
    ----------
    sent : int
        Events handed to ZeroMQ.
    dropped : int
        Events the socket refused outright. ZeroMQ's per-subscriber drops are invisible to a publisher, so
        this is a lower bound of what subscribers missed; a subscriber sees gaps in ``frame.seq``.
    """

    def __init__(self, socket: zmq.Socket[Any]) -> None:
        self._socket = socket
        self.sent = 0
        self.dropped = 0

    @property
    def endpoint(self) -> str:
        """The bound endpoint, with the actual port when bound to ``*``."""
        return _last_endpoint(self._socket)

    def send(self, event: events.Event) -> bool:
        """Publish an event, or drop it if the socket cannot take it now.

        Parameters
        ----------
        event : Event
            A validated event (from :func:`livestack.events.make_event`).

        Returns
        -------
        bool
            False when the event was dropped.

        Raises
        ------
        NetworkError
            When the publisher has been closed.
        """
        if self._socket.closed:
            raise NetworkError("the event publisher is closed")
        try:
            self._socket.send_multipart(events.encode(event), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        return True


class ControlServer:
    """The REP socket: answers control requests, exactly one reply per request.

    Use it from one thread only (the daemon's control thread). Requests are decoded with
    :func:`livestack.events.decode_request`; a malformed request (not JSON, binary garbage, several parts,
    an unknown command, more than ``CONTROL_MAX_REQUEST`` bytes, a number too long or nesting too deep to
    read) gets an error reply and never reaches the handler. Nothing a peer sends makes it raise: garbage
    that is not ZeroMQ at all (a port scanner, an HTTP request) is dropped by ZeroMQ, a message over
    ``CONTROL_MAX_MESSAGE`` disconnects its peer, and a handler's failure becomes an error reply (logged with
    its traceback).
    """

    def __init__(self, socket: zmq.Socket[Any]) -> None:
        self._socket = socket

    @property
    def endpoint(self) -> str:
        """The bound endpoint, with the actual port when bound to ``*``."""
        return _last_endpoint(self._socket)

    def serve(self, handler: Callable[[dict[str, Any]], bytes], stop: threading.Event,
              poll_ms: int = 100) -> None:
        """Answer requests until ``stop`` is set.

        Parameters
        ----------
        handler : callable
            Takes a decoded request, returns the reply (``events.ok_reply(...)`` or ``events.error_reply``).
            A ``LivestackError`` or ``ValueError`` it raises becomes an error reply with its message.
        stop : threading.Event
            Checked at least every ``poll_ms`` milliseconds.
        poll_ms : int
            How long to wait for a request before checking ``stop`` again.

        """
        while not stop.is_set():
            self.poll_once(handler, poll_ms)

    def poll_once(self, handler: Callable[[dict[str, Any]], bytes], timeout_ms: int) -> bool:
        """Wait up to ``timeout_ms`` for one request and answer it.

        Parameters
        ----------
        handler : callable
            As for :meth:`serve`.
        timeout_ms : int
            How long to wait for a request; 0 only checks.

        Returns
        -------
        bool
            True when a request was answered.

        Raises
        ------
        NetworkError
            When the control server has been closed.
        """
        if self._socket.closed:
            raise NetworkError("the control server is closed")
        if not self._socket.poll(timeout_ms, zmq.POLLIN):
            return False
        try:
            parts = self._socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            # Readable without a message: a peer that connected and failed the ZeroMQ handshake (bytes that
            # are not ZMTP), or one that left. Nothing to answer.
            return False
        # A REP socket must reply before it can receive again, whatever went wrong.
        self._reply(self._answer(parts, handler))
        return True

    def _answer(self, parts: list[bytes], handler: Callable[[dict[str, Any]], bytes]) -> bytes:
        if len(parts) != 1:
            return events.error_reply(f"a request is one JSON message, this one has {len(parts)} parts")
        if len(parts[0]) > CONTROL_MAX_REQUEST:
            return events.error_reply(f"the request is {len(parts[0]):,} bytes; requests are at most "
                                      f"{CONTROL_MAX_REQUEST:,} bytes")
        try:
            request = events.decode_request(parts[0])
        except events.SchemaError as exc:
            return events.error_reply(str(exc))
        try:
            return handler(request)
        except (LivestackError, ValueError) as exc:
            return events.error_reply(str(exc) or type(exc).__name__)
        except Exception as exc:
            # A bug, not the requester's fault: the traceback goes to the log, the requester gets a sentence,
            # and the control thread goes on (one request must never silence the daemon).
            _log.error("a control request failed: %r", parts[0][:200], exc_info=True)
            return events.error_reply(f"the daemon failed to answer this request ({type(exc).__name__})")

    def _reply(self, reply: bytes) -> None:
        try:
            self._socket.send(reply, zmq.NOBLOCK)
        except zmq.Again:
            # The requester's queue is full or it is gone; REP drops the reply and is ready for the next.
            _log.debug("control reply dropped: the requester is not reading")
        except zmq.ZMQError as exc:
            _log.warning("control reply not sent: %s", exc.strerror)


class SocketHub:
    """Owns the daemon's ZeroMQ context, authenticator, publisher and control server.

    Parameters
    ----------
    publish : str
        Endpoint of the PUB socket, e.g. ``tcp://127.0.0.1:5555``.
    control : str
        Endpoint of the REP socket, e.g. ``tcp://127.0.0.1:5556``.
    security : Security
        Keys and policy; checked with :func:`check_security` before anything binds.

    Attributes
    ----------
    publisher : Publisher
    control : ControlServer
    insecure : bool
        True when bound beyond loopback without keys (``insecure_remote``).

    Raises
    ------
    NetworkError
        When the policy refuses the endpoints, the keys cannot be used, or an endpoint cannot be bound.

    Notes
    -----
    With keys, a ZAP authenticator thread admits only clients whose public key is in ``authorized_keys``
    when the hub starts; restart the daemon after adding a key. :meth:`close` (or leaving the ``with``
    block) must come after the threads using the sockets have stopped.
    """

    def __init__(self, publish: str, control: str, security: Security | None = None) -> None:
        security = security or Security()
        self.insecure = check_security([publish, control], security)
        self._context: zmq.Context[Any] = zmq.Context()
        self._auth: ThreadAuthenticator | None = None
        self._sockets: list[zmq.Socket[Any]] = []
        self._closed = False
        try:
            keys = self._start_curve(security) if security.curve else None
            pub = self._bind(zmq.PUB, publish, keys)
            rep = self._bind(zmq.REP, control, keys)
        except BaseException:
            self.close()
            raise
        self.publisher = Publisher(pub)
        self.control = ControlServer(rep)

    def close(self) -> None:
        """Close both sockets without lingering, stop the authenticator and end the context."""
        if self._closed:
            return
        self._closed = True
        for socket in self._sockets:
            socket.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._context.term()

    def __enter__(self) -> SocketHub:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _start_curve(self, security: Security) -> tuple[bytes, bytes]:
        assert security.server_secret_key is not None and security.authorized_keys is not None
        public, secret = _load_secret(security.server_secret_key)
        # The authenticator must answer before the first socket binds: without a ZAP handler, libzmq lets
        # any client with a valid CURVE handshake in.
        self._auth = ThreadAuthenticator(self._context, log=_log.getChild("auth"))
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(security.authorized_keys))
        return public, secret

    def _bind(self, kind: int, endpoint: str, keys: tuple[bytes, bytes] | None) -> zmq.Socket[Any]:
        socket = self._context.socket(kind)
        self._sockets.append(socket)
        socket.linger = 0
        if kind == zmq.PUB:
            socket.sndhwm = PUBLISH_HWM
        else:
            socket.maxmsgsize = CONTROL_MAX_MESSAGE
            socket.rcvhwm = CONTROL_RCVHWM
        if keys is not None:
            # CURVE options only apply to connections made after they are set: set them before bind.
            socket.curve_secretkey = keys[1]
            socket.curve_publickey = keys[0]
            # No zap_domain: pyzmq's authenticator files an empty domain under "*", where its keys are.
            socket.curve_server = True
        try:
            socket.bind(endpoint)
        except zmq.ZMQError as exc:
            raise NetworkError(f"cannot bind {endpoint}: {exc.strerror}") from exc
        return socket


def _split_tcp(endpoint: str, rest: str) -> tuple[str, str]:
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0 or rest[close + 1:close + 2] != ":":
            raise NetworkError(f"endpoint {endpoint!r} is not tcp://[IPv6]:PORT")
        return rest[:close + 1], rest[close + 2:]
    host, sep, port = rest.rpartition(":")
    if not sep or not host or ":" in host:
        raise NetworkError(f"endpoint {endpoint!r} is not tcp://HOST:PORT (write IPv6 as [::1])")
    return host, port


def _check_keys(security: Security) -> None:
    assert security.server_secret_key is not None and security.authorized_keys is not None
    secret = security.server_secret_key
    _load_secret(secret)
    if secret.stat().st_mode & 0o077:
        _log.warning("%s is readable by other users; chmod 600 it", secret)
    folder = security.authorized_keys
    if not folder.is_dir():
        raise NetworkError(f"authorized_keys {folder} is not a folder of clients' *.key files")
    keys = sorted(folder.glob("*.key"))
    if not keys:
        raise NetworkError(f"authorized_keys {folder} holds no *.key file, so no client could connect")
    for key in keys:
        try:
            zmq.auth.load_certificate(key)
        except (OSError, ValueError) as exc:
            raise NetworkError(f"{key} is not a ZeroMQ public certificate") from exc


def _load_secret(path: Path) -> tuple[bytes, bytes]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except OSError as exc:
        raise NetworkError(f"server_secret_key {path} cannot be read") from exc
    except ValueError as exc:
        raise NetworkError(f"server_secret_key {path} is not a ZeroMQ certificate") from exc
    if secret is None:
        raise NetworkError(f"server_secret_key {path} holds no secret key; use the .key_secret file")
    return public, secret


def _place(source: Path, target: Path) -> None:
    """Move a file to a name that must not exist yet, atomically where the filesystem allows."""
    try:
        os.link(source, target)
    except FileExistsError as exc:
        raise NetworkError(_exists(target)) from exc
    except OSError as exc:
        # Some filesystems (FAT, some network shares) have no hard links; checking then renaming is the best
        # they allow.
        if target.exists():
            raise NetworkError(_exists(target)) from exc
        os.rename(source, target)


def _exists(path: Path) -> str:
    return f"{path} already exists; livestack never overwrites keys, remove it or choose another name"


def _last_endpoint(socket: zmq.Socket[Any]) -> str:
    value = socket.getsockopt(zmq.LAST_ENDPOINT)
    return value.decode() if isinstance(value, bytes) else str(value)
