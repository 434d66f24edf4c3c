"""The network thread: publishes events, answers control requests, sends ``status`` and feeds the watchdog.

Events from every thread go through ``EventQueue`` (never blocking: past ``EVENT_BACKLOG`` the oldest is
dropped); the network thread is the only one that touches the ZeroMQ sockets (``net.SocketHub``).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from livestack import events
from livestack.live.net import SocketHub
from livestack.live.notify import Notifier, watchdog_interval
from livestack.live.reports import status_line

__all__ = ["EVENT_BACKLOG", "NETWORK_POLL_MS", "STATUS_PERIOD", "EventQueue", "Network"]

log = logging.getLogger("livestack.live.network")

#: Seconds between ``status`` events.
STATUS_PERIOD = 1.0
#: Events waiting for the network thread; beyond this the oldest are dropped.
EVENT_BACKLOG = 10_000
#: Milliseconds the network thread waits for a control request before publishing queued events: the most an
#: event waits to go out. Waking 100 times a second costs an idle daemon about 0.7 % of one core.
NETWORK_POLL_MS = 10


class EventQueue:
    """Events waiting to be published; ``emit`` from any thread never blocks."""

    def __init__(self, backlog: int = EVENT_BACKLOG) -> None:
        self._events: queue.Queue[events.Event] = queue.Queue(backlog)

    def emit(self, event: events.Event) -> None:
        """Queue an event, dropping the oldest when the backlog is full."""
        try:
            self._events.put_nowait(event)
        except queue.Full:
            with contextlib.suppress(queue.Empty):
                self._events.get_nowait()
            with contextlib.suppress(queue.Full):
                self._events.put_nowait(event)

    def take(self) -> events.Event | None:
        """The oldest waiting event, or None."""
        try:
            return self._events.get_nowait()
        except queue.Empty:
            return None


class Network:
    """The network thread's loop and the state only it touches.

    Parameters
    ----------
    hub : SocketHub
        Bound sockets.
    queue : EventQueue
    handle : callable
        Answers one control request with reply bytes (must not raise).
    status : callable
        The ``status`` event's fields.
    healthy : callable
        Whether to feed systemd's watchdog now.
    notifier : Notifier
    listeners : sequence of callables
        Called with every event published.
    """

    def __init__(self, hub: SocketHub, queue: EventQueue, handle: Callable[[dict[str, Any]], bytes],
                 status: Callable[[], dict[str, Any]], healthy: Callable[[], bool], notifier: Notifier,
                 listeners: Sequence[Callable[[events.Event], None]] = ()) -> None:
        self.hub = hub
        self.queue = queue
        self.handle = handle
        self.status = status
        self.healthy = healthy
        self.notifier = notifier
        self.listeners = list(listeners)
        #: Set once systemd was told READY=1: no STATUS or WATCHDOG=1 before it.
        self.ready = threading.Event()
        self._done = threading.Event()

    def finish(self) -> None:
        """Publish what is queued and a last ``status``, then return (the other threads are gone)."""
        self._done.set()

    def run(self) -> None:
        """The thread's body."""
        next_status = 0.0
        ping = watchdog_interval()
        next_ping = 0.0
        while True:
            try:
                self.hub.control.poll_once(self.handle, timeout_ms=NETWORK_POLL_MS)
                self._drain()
                now = time.monotonic()
                if now >= next_status:
                    next_status = now + STATUS_PERIOD
                    status = self.status()
                    self._publish(events.make_event("status", **status))
                    if self.ready.is_set():
                        self.notifier.status(status_line(status))
                if ping is not None and now >= next_ping and self.ready.is_set() and self.healthy():
                    next_ping = now + ping
                    self.notifier.watchdog()
            except Exception:
                # Nothing a client sends may end this thread (it carries every event and all control): log
                # the traceback and go on, after a pause so that a persistent fault cannot spin a core.
                log.exception("the network loop failed; it goes on")
                time.sleep(NETWORK_POLL_MS / 1000)
            if self._done.is_set():
                self._drain()
                self._publish(events.make_event("status", **self.status()))
                return

    def _drain(self) -> None:
        while (event := self.queue.take()) is not None:
            self._publish(event)

    def _publish(self, event: events.Event) -> None:
        self.hub.publisher.send(event)
        for listener in self.listeners:
            listener(event)
