"""The viewer's web application: a small Starlette app, its routes in one place, its state on ``app.state``.

The daemon's events arrive on a ZeroMQ subscriber read by one thread (``livestack-web-bus``), which hands each
event to the event loop with ``call_soon_threadsafe``; from there on everything happens on the loop: the
``Viewer`` folds the event in and each open page's stream gets the resulting messages. A page's stream is a
bounded queue: a page that reads too slowly has its backlog replaced by a fresh ``hello`` when it catches up,
so it never holds up the loop, another page or the daemon.

Routes::

    GET  /                      the page (static/index.html)
    GET  /static/{name}         its script, style sheet and icon
    GET  /events                Server-Sent Events: hello, status, stack, frame, picture, log, bus, ping
    GET  /pictures/{id}.jpg     a stack's picture; ids are never reused, so it is cached for good
    GET  /api/state             what a page gets on connecting, as JSON
    GET  /api/session           {"control": bool}: whether the request's token allows control
    POST /api/control/{cmd}     pause, resume, snapshot or reset, with ``Authorization: Bearer TOKEN``

Control needs the server to have been given a token, and each request to carry it; without one the API
refuses every control request, whatever it carries.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import hmac
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from livestack import events
from livestack.clients.bus import ClientKeys, ControlClient, Subscriber
from livestack.clients.web.model import STALE_AFTER, Viewer
from livestack.errors import LivestackError

__all__ = ["CONTROL_COMMANDS", "WebSettings", "create_app"]

log = logging.getLogger("livestack.clients.web")

#: What a page with the token may ask of the daemon.
CONTROL_COMMANDS = ("pause", "resume", "snapshot", "reset")
#: Messages waiting for one page; beyond this it is sent a fresh ``hello`` instead of the backlog.
STREAM_BACKLOG = 64
#: Open event streams at most; more pages get a 503 and retry.
MAX_STREAMS = 200
#: Seconds between pings on a quiet stream: the page reconnects when it hears nothing for a while.
PING_PERIOD = 5.0
#: How often the daemon's silence is checked (seconds).
_BUS_CHECK_PERIOD = 0.5
#: Seconds the daemon gets to answer a control request (a snapshot of a big stack takes a while).
CONTROL_TIMEOUT = 25.0
_PICTURE_HEADERS = {"Cache-Control": "public, max-age=31536000, immutable"}
_STATIC = Path(__file__).resolve().parent / "static"
_MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
#: Every response: nothing loaded from elsewhere, no framing, no referrer (a page URL may carry the token).
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class WebSettings:
    """What the viewer connects to and how it presents itself.

    Attributes
    ----------
    connect : str
        The daemon's event endpoint.
    control : str
        The daemon's control endpoint.
    keys : ClientKeys or None
        CURVE keys for both sockets.
    caption : str
        The host's line under the picture.
    control_token : str or None
        The secret a page must present to pause, snapshot or reset; None turns control off.
    """

    connect: str
    control: str
    keys: ClientKeys | None = None
    caption: str = ""
    control_token: str | None = None


def create_app(settings: WebSettings) -> Starlette:
    """The viewer's ASGI application.

    Parameters
    ----------
    settings : WebSettings

    Returns
    -------
    Starlette
        Its ``state.hub`` holds the viewer's state once the application has started.
    """
    routes = [
        Route("/", _page),
        Route("/static/{name}", _asset),
        Route("/events", _events),
        Route("/pictures/{ident}.jpg", _picture),
        Route("/api/state", _state),
        Route("/api/session", _session),
        Route("/api/control/{cmd}", _control, methods=["POST"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        hub = Hub(settings, asyncio.get_running_loop())
        app.state.hub = hub
        hub.start()
        try:
            yield
        finally:
            await hub.stop()

    return Starlette(routes=routes, middleware=[Middleware(_SecurityHeaders)], lifespan=lifespan)


class _Stream:
    """One page's event stream: a bounded queue of encoded messages (the loop's thread only)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(STREAM_BACKLOG)
        self.behind = False

    def offer(self, chunk: bytes | None) -> None:
        try:
            self.queue.put_nowait(chunk)
        except asyncio.QueueFull:
            # The page stopped reading (a throttled phone, a sleeping laptop): forget its backlog; when it
            # reads again it gets the whole state at once, which is all it needs.
            while not self.queue.empty():
                self.queue.get_nowait()
            self.behind = True
            if chunk is None:
                self.queue.put_nowait(None)


class Hub:
    """The viewer's state on the event loop, the pages' streams and the thread that hears the daemon.

    Parameters
    ----------
    settings : WebSettings
    loop : asyncio.AbstractEventLoop
        The loop everything but the receiving thread and control requests runs on.
    """

    def __init__(self, settings: WebSettings, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self.viewer = Viewer(caption=settings.caption)
        self.streams: set[_Stream] = set()
        self.assets = _load_assets()
        self._loop = loop
        self._context: zmq.Context[Any] = zmq.Context()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._bus_state = self.viewer.bus_state()
        # Control requests block on ZeroMQ: one thread does them, one at a time.
        self._control = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="livestack-web-control")
        self._control_lock = asyncio.Lock()

    @property
    def control_enabled(self) -> bool:
        """Whether this server was given a control token."""
        return self.settings.control_token is not None

    def start(self) -> None:
        """Subscribe to the daemon and start hearing it."""
        subscriber = Subscriber(self.settings.connect, self.settings.keys, context=self._context)
        self._thread = threading.Thread(target=self._receive, args=(subscriber,), name="livestack-web-bus",
                                        daemon=True)
        self._thread.start()
        if self.control_enabled:
            # Its one thread starts with the server, not with a visitor's first request.
            self._control.submit(lambda: None)
        self._ticker = self._loop.create_task(self._watch_bus())

    async def stop(self) -> None:
        """End every stream, stop hearing the daemon and release the sockets."""
        self.close_streams()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._control.shutdown(wait=True)
        self._context.term()

    def close_streams(self) -> None:
        """Tell every open stream to end (the server is stopping)."""
        for stream in self.streams:
            stream.offer(None)

    def close_streams_soon(self) -> None:
        """``close_streams`` from another thread (nothing to do once the loop has closed)."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self.close_streams)

    # -- from the daemon -------------------------------------------------------------------------------

    def _receive(self, subscriber: Subscriber) -> None:
        """The bus thread: hand each event to the loop; nothing else happens here."""
        try:
            while not self._stop.is_set():
                event = subscriber.recv(timeout=0.25)
                if event is None:
                    continue
                try:
                    self._loop.call_soon_threadsafe(self._on_event, event)
                except RuntimeError:
                    return  # the loop is closed: the server is gone
        finally:
            subscriber.close()

    def _on_event(self, event: events.Event) -> None:
        for name, data in self.viewer.apply(event):
            self.broadcast(name, data)
        self._check_bus()

    async def _watch_bus(self) -> None:
        while True:
            await asyncio.sleep(_BUS_CHECK_PERIOD)
            self._check_bus()

    def _check_bus(self) -> None:
        state = self.viewer.bus_state()
        if state != self._bus_state:
            self._bus_state = state
            if state == "reconnecting":
                log.warning("no event from %s for %g s: waiting for the daemon", self.settings.connect,
                            STALE_AFTER)
            self.broadcast("bus", {"state": state})

    # -- to the pages ----------------------------------------------------------------------------------

    def broadcast(self, name: str, data: dict[str, Any]) -> None:
        """Send a message to every open page (encoded once)."""
        chunk = sse(name, data)
        for stream in self.streams:
            stream.offer(chunk)

    def hello(self) -> dict[str, Any]:
        """What a page gets on connecting."""
        return self.viewer.hello(self.control_enabled)

    def authorised(self, request: Request) -> bool:
        """Whether control is on and the request carries the token (compared in constant time)."""
        token = self.settings.control_token
        if token is None:
            return False
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())

    async def control(self, cmd: str) -> dict[str, Any]:
        """Forward a command to the daemon; its reply, or an error reply when it did not answer."""
        def ask() -> dict[str, Any]:
            with ControlClient(self.settings.control, self.settings.keys, timeout=CONTROL_TIMEOUT,
                               context=self._context) as client:
                return client.request(cmd)

        async with self._control_lock:
            try:
                return await self._loop.run_in_executor(self._control, ask)
            except LivestackError as exc:
                return {"ok": False, "error": str(exc)}


def sse(name: str, data: dict[str, Any]) -> bytes:
    """One Server-Sent Events message (JSON has no raw newlines, so one ``data:`` line holds it)."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


# -- the routes ------------------------------------------------------------------------------------------


def _hub(request: Request) -> Hub:
    hub: Hub = request.app.state.hub
    return hub


@dataclass(frozen=True)
class _Asset:
    data: bytes
    media_type: str
    etag: str


def _load_assets() -> dict[str, _Asset]:
    """The page's files, read once: a few kilobytes, served from memory (no file I/O per request)."""
    assets = {}
    for path in sorted(_STATIC.iterdir()):
        if path.suffix in _MEDIA_TYPES:
            data = path.read_bytes()
            etag = f'"{hashlib.sha1(data).hexdigest()[:16]}"'
            assets[path.name] = _Asset(data, _MEDIA_TYPES[path.suffix], etag)
    return assets


def _serve_asset(request: Request, name: str) -> Response:
    asset = _hub(request).assets.get(name)
    if asset is None:
        return Response(status_code=404)
    # Revalidated on every load, so a new version of livestack is picked up; unchanged, it costs a 304.
    headers = {"Cache-Control": "no-cache", "ETag": asset.etag}
    if request.headers.get("if-none-match") == asset.etag:
        return Response(status_code=304, headers=headers)
    return Response(asset.data, media_type=asset.media_type, headers=headers)


async def _page(request: Request) -> Response:
    return _serve_asset(request, "index.html")


async def _asset(request: Request) -> Response:
    name = request.path_params["name"]
    return _serve_asset(request, name) if name != "index.html" else Response(status_code=404)


async def _events(request: Request) -> Response:
    hub = _hub(request)
    if len(hub.streams) >= MAX_STREAMS:
        return JSONResponse({"error": "too many viewers; retrying"}, status_code=503,
                            headers={"Retry-After": "5"})
    stream = _Stream()
    hub.streams.add(stream)

    async def body() -> AsyncIterator[bytes]:
        try:
            # The page reconnects by itself 1 s after a lost connection.
            yield b"retry: 1000\n\n" + sse("hello", hub.hello())
            while True:
                if stream.behind:
                    stream.behind = False
                    yield sse("hello", hub.hello())
                try:
                    chunk = await asyncio.wait_for(stream.queue.get(), PING_PERIOD)
                except TimeoutError:
                    yield sse("ping", {"bus": hub.viewer.bus_state()})
                    continue
                if chunk is None:
                    return
                yield chunk
        finally:
            hub.streams.discard(stream)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def _picture(request: Request) -> Response:
    ident = request.path_params["ident"]
    picture = _hub(request).viewer.picture(ident)
    if picture is None:
        return Response(status_code=404, headers={"Cache-Control": "no-store"})
    etag = f'"{picture.ident}"'
    headers = {**_PICTURE_HEADERS, "ETag": etag}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(picture.data, media_type="image/jpeg", headers=headers)


async def _state(request: Request) -> Response:
    return JSONResponse(_hub(request).hello(), headers={"Cache-Control": "no-store"})


async def _session(request: Request) -> Response:
    return JSONResponse({"control": _hub(request).authorised(request)}, headers={"Cache-Control": "no-store"})


async def _control(request: Request) -> Response:
    hub = _hub(request)
    if not hub.control_enabled:
        return JSONResponse({"ok": False, "error": "control is off: this viewer was started without a "
                             "control token"}, status_code=403)
    if not hub.authorised(request):
        return JSONResponse({"ok": False, "error": "a valid control token is needed"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})
    cmd = request.path_params["cmd"]
    if cmd not in CONTROL_COMMANDS:
        return JSONResponse({"ok": False, "error": f"unknown command {cmd!r}; commands are "
                             f"{', '.join(CONTROL_COMMANDS)}"}, status_code=404)
    log.info("%s requested from the web viewer by %s", cmd, request.client.host if request.client else "?")
    reply = await hub.control(cmd)
    return JSONResponse(reply, status_code=200 if reply.get("ok") else 502)


_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class _SecurityHeaders:
    """ASGI middleware adding ``_SECURITY_HEADERS`` to every HTTP response."""

    def __init__(self, app: Callable[[_Scope, _Receive, _Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)
