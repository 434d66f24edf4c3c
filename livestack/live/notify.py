"""Telling systemd how the daemon is doing: the sd_notify protocol, without libsystemd.

Under a ``Type=notify`` unit, systemd names a datagram socket in ``NOTIFY_SOCKET``; the daemon sends
``READY=1`` once it serves, ``WATCHDOG=1`` while healthy, ``STATUS=...`` for ``systemctl status`` and
``STOPPING=1`` when it drains. Off systemd (no ``NOTIFY_SOCKET``) every call does nothing, so the daemon
calls these unconditionally. A failed send is logged at debug level and never raised: losing a status line
must not stop the stacking.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier", "watchdog_interval"]

_log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages to the socket systemd names, or nothing off systemd.

    Safe to use from any thread: each message goes through its own short-lived socket.

    Parameters
    ----------
    environ : Mapping, optional
        Where to read ``NOTIFY_SOCKET``; ``os.environ`` (at construction) by default.

    Attributes
    ----------
    address : str or bytes or None
        The socket address (bytes for the abstract namespace), or None when disabled.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        name = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = _address(name)

    @property
    def enabled(self) -> bool:
        """Whether messages go anywhere."""
        return self.address is not None

    def ready(self) -> bool:
        """Tell systemd the daemon is up (sockets bound, watching); returns whether it was sent."""
        return self.notify("READY=1")

    def watchdog(self) -> bool:
        """Tell systemd the daemon is healthy; returns whether it was sent."""
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """Set the one-line status ``systemctl status`` shows; returns whether it was sent.

        Parameters
        ----------
        text : str
            Line breaks are turned into spaces: the protocol is one ``KEY=value`` per line.
        """
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def stopping(self) -> bool:
        """Tell systemd the daemon is draining before it exits; returns whether it was sent."""
        return self.notify("STOPPING=1")

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines in one datagram.

        Parameters
        ----------
        *assignments : str
            Such as ``"READY=1"``, ``"STATUS=stacking"``.

        Returns
        -------
        bool
            True when sent; False when disabled or the send failed (logged at debug level).
        """
        if self.address is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # Never wait: a manager that stops reading must not stall the sending thread (a full queue
                # drops the message, logged at debug level).
                sock.setblocking(False)
                sock.sendto(message, self.address)
        except OSError as exc:
            _log.debug("could not notify systemd at %r: %s", self.address, exc)
            return False
        return True


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """How often to send ``WATCHDOG=1``: half of systemd's watchdog timeout, in seconds.

    Parameters
    ----------
    environ : Mapping, optional
        Where to read ``WATCHDOG_USEC`` and ``WATCHDOG_PID``; ``os.environ`` by default.

    Returns
    -------
    float or None
        Half of ``WATCHDOG_USEC`` in seconds; None when the watchdog is off, the value is not a positive
        integer, or ``WATCHDOG_PID`` names another process.
    """
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID")
    if pid is not None and pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


def _address(name: str) -> str | bytes | None:
    if name.startswith("@") and len(name) > 1:
        # Abstract namespace: the leading '@' stands for a NUL byte.
        return b"\0" + name[1:].encode()
    if name.startswith("/"):
        return name
    if name:
        # vsock: and relative names are not for us; say so where someone debugging would look.
        _log.debug("NOTIFY_SOCKET %r is not an AF_UNIX path or @name; not notifying", name)
    return None
