"""Serving the viewer: uvicorn on a socket bound before anything starts, in a thread of its own.

``livestack web`` runs it beside nothing else; ``livestack run --web`` and ``livestack demo --web`` run it
beside their daemon, in the same process, connected to the daemon's own sockets over loopback.

The address is checked once, before binding: loopback needs nothing; any other address is served only when
asked for, and then a warning says that anyone on that network can read the page.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time

import uvicorn

from livestack.clients.web.app import WebSettings, create_app
from livestack.errors import NetworkError

__all__ = ["WebServer", "is_loopback_host", "parse_listen"]

log = logging.getLogger("livestack.clients.web")

#: Seconds the server gets to come up, and open pages to be let go of when it stops.
_START_TIMEOUT = 20.0
_GRACE = 1


def parse_listen(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:8080`` for IPv6; port 0 for any free port).

    Parameters
    ----------
    text : str

    Returns
    -------
    tuple of (str, int)

    Raises
    ------
    NetworkError
        When the text is not HOST:PORT with a port from 0 to 65535.
    """
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise NetworkError(f"the listen address {text!r} is not HOST:PORT (for example 127.0.0.1:8080)")
    return host, int(port)


def is_loopback_host(host: str) -> bool:
    """Whether a host name or address stays on this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or interface: assume it reaches beyond this machine


class WebServer:
    """The viewer on its own thread, bound at construction.

    Parameters
    ----------
    settings : WebSettings
    listen : str
        ``HOST:PORT``; port 0 picks a free one (see ``url``).

    Raises
    ------
    NetworkError
        When the address is malformed or cannot be bound.
    """

    def __init__(self, settings: WebSettings, listen: str) -> None:
        host, port = parse_listen(listen)
        self.loopback = is_loopback_host(host)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, kind, proto, _, address = infos[0]
            self._socket = socket.socket(family, kind, proto)
        except (OSError, IndexError) as exc:
            raise NetworkError(f"cannot serve the viewer on {listen}: {exc}") from exc
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.bind(address)
            self._socket.listen(128)
        except OSError as exc:
            self._socket.close()
            raise NetworkError(f"cannot serve the viewer on {listen}: {exc.strerror or exc}") from exc
        bound = self._socket.getsockname()
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.url = f"http://{shown}:{bound[1]}/"
        self.app = create_app(settings)
        config = uvicorn.Config(self.app, lifespan="on", ws="none", http="h11", log_config=None,
                                access_log=False, timeout_graceful_shutdown=_GRACE)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        if not self.loopback:
            log.warning("the viewer serves %s on %s: anyone who can reach this network can read the page%s",
                        self.url, host, " (control still needs the token)" if settings.control_token else "")

    def start(self) -> None:
        """Serve on a thread of its own; returns once the server accepts connections.

        Raises
        ------
        NetworkError
            When the server did not come up (its error is in the log).
        """
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="livestack-web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise NetworkError(f"the viewer could not start on {self.url}")
            time.sleep(0.02)
        log.info("viewer on %s (events from %s)", self.url, self.app.state.hub.settings.connect)

    def stop(self) -> None:
        """Let open pages go, stop serving and wait for the thread. Safe to call twice."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            hub = getattr(self.app.state, "hub", None)
            if hub is not None:
                hub.close_streams_soon()
            self._server.should_exit = True
            thread.join()
        self._socket.close()
