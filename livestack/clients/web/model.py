"""What the viewer knows: the daemon's stacks folded from its events, and the pictures it keeps for pages.

Plain Python without Starlette, so the folding can be tested alone. One ``Viewer`` lives on the web server's
event loop; only events (frozen) cross into it from the thread that receives them.

A stack is keyed by target and filter (the events' ``object`` and ``filter``). Each ``display`` event's JPEG
becomes a ``Picture`` with an identifier that is never reused, not even by the next start of the server, so
its URL can be cached by browsers for good. A page is told about a stack's new picture and fetches it itself.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from livestack import events

__all__ = ["HISTORY", "LIGHTCURVE_POINTS", "PICTURES_KEPT", "STALE_AFTER", "Picture", "StackView", "Viewer",
           "stack_key"]

#: Accepted frames whose FWHM and background a stack's plots keep.
HISTORY = 240
#: Pictures kept per stack: the newest, and the one before it for a page that was told about it a moment ago.
PICTURES_KEPT = 2
#: Photometry points kept per target (a long night of one-minute frames).
LIGHTCURVE_POINTS = 1000
#: Seconds without any event (the daemon sends ``status`` every second) before the daemon counts as gone.
STALE_AFTER = 3.5


def stack_key(target: str | None, filter_name: str | None) -> str:
    """The identifier of a stack: its target and filter as a JSON pair (``'["M 31", "L"]'``).

    Parameters
    ----------
    target, filter_name : str or None
        The events' ``object`` and ``filter``.

    Returns
    -------
    str
    """
    return json.dumps([(target or "").strip(), (filter_name or "").strip()], ensure_ascii=False)


@dataclass(frozen=True)
class Picture:
    """A stack's picture as the daemon published it.

    Attributes
    ----------
    ident : str
        Unique for the life of the server and across its restarts; the picture's URL is
        ``/pictures/{ident}.jpg``.
    key : str
        The stack (``stack_key``).
    data : bytes
        The JPEG.
    width, height : int
        Its size, pixels.
    frames : int
        Frames in the stack it pictures.
    """

    ident: str
    key: str
    data: bytes = field(repr=False)
    width: int
    height: int
    frames: int

    @property
    def url(self) -> str:
        """Where a page fetches it (relative to the page)."""
        return f"pictures/{self.ident}.jpg"


@dataclass
class StackView:
    """One stack as the page shows it (mutable; owned by the ``Viewer``)."""

    key: str
    target: str | None
    filter: str | None
    frames: int = 0
    exptime: float = 0.0
    method: str | None = None
    session: int | None = None
    picture: Picture | None = None
    fwhm: deque[float | None] = field(default_factory=lambda: deque(maxlen=HISTORY))
    background: deque[float | None] = field(default_factory=lambda: deque(maxlen=HISTORY))
    last_frame: float | None = None  # the viewer's clock when its latest frame was judged
    updated: float = 0.0  # the viewer's clock when anything about it last changed

    def summary(self, now: float) -> dict[str, Any]:
        """The stack's fields for a page, without the plots' histories."""
        p = self.picture
        return {
            "key": self.key, "target": self.target, "filter": self.filter, "frames": self.frames,
            "exptime": self.exptime, "method": self.method, "session": self.session,
            "picture": None if p is None else {"url": p.url, "width": p.width, "height": p.height,
                                               "frames": p.frames},
            "last_frame_age": None if self.last_frame is None else max(0.0, now - self.last_frame),
            "updated_age": max(0.0, now - self.updated),
        }

    def full(self, now: float) -> dict[str, Any]:
        """The summary plus the plots' histories."""
        return {**self.summary(now), "fwhm": list(self.fwhm), "background": list(self.background)}


class Viewer:
    """The daemon's stacks, status and pictures, updated one event at a time.

    Parameters
    ----------
    caption : str
        The host's line under the picture.
    clock : callable
        Monotonic seconds (injectable for tests).

    Notes
    -----
    Not thread-safe: use it from the event loop's thread only.
    """

    def __init__(self, caption: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        self.caption = caption
        self._clock = clock
        self.status: dict[str, Any] | None = None
        self.stacks: dict[str, StackView] = {}
        self._pictures: dict[str, Picture] = {}
        # A prefix no earlier run of the server used: cached picture URLs stay true across restarts.
        self._boot = secrets.token_hex(4)
        self._count = 0
        self.last_event: float | None = None
        #: Photometry targets' clean points, ``[obs_time, magnitude, error]``, the newest last.
        self.lightcurves: dict[str, list[list[float]]] = {}
        self.time_scale: str | None = None

    # -- events in -----------------------------------------------------------------------------------

    def apply(self, event: events.Event) -> list[tuple[str, dict[str, Any]]]:
        """Fold one event in; what to tell the pages.

        Parameters
        ----------
        event : Event
            A validated event from the daemon.

        Returns
        -------
        list of (str, dict)
            Messages for the pages: ``status``, ``stack``, ``frame``, ``picture``, ``photometry``, ``log``;
            often one.
        """
        now = self._clock()
        self.last_event = now
        p = event.payload
        if event.topic == "status":
            self.status = {k: p[k] for k in _STATUS_FIELDS}
            out: list[tuple[str, dict[str, Any]]] = [("status", self.status)]
            if p["frames"] > 0:
                view = self._view(p["object"], p["filter"], p["session"], now)
                if (view.frames, view.exptime) != (p["frames"], p["exptime"]):
                    view.frames, view.exptime, view.method = p["frames"], p["exptime"], p["method"]
                    view.updated = now
                    out.append(("stack", view.summary(now)))
            return out
        if event.topic == "stack":
            if p["frames"] == 0:
                return []  # a new, empty session: its stack appears with its first frame
            view = self._view(p["object"], p["filter"], p["session"], now)
            view.frames, view.exptime, view.method = p["frames"], p["exptime"], p["method"]
            view.updated = now
            return [("stack", view.summary(now))]
        if event.topic == "frame":
            key: str | None
            if p["verdict"] == "received":
                return []
            key = stack_key(p["object"], p["filter"])
            if p["verdict"] == "rejected" and key not in self.stacks:
                key = None  # an unreadable file, or a target with nothing stacked: no stack to show it on
            else:
                view = self._view(p["object"], p["filter"], p["session"], now)
                view.last_frame = now
                if p["verdict"] == "accepted":
                    view.fwhm.append(p["fwhm"])
                    view.background.append(p["background"])
            return [("frame", {"key": key, "verdict": p["verdict"], "name": p["name"], "reason": p["reason"],
                               "fwhm": p["fwhm"], "background": p["background"], "stars": p["stars"]})]
        if event.topic == "display" and event.picture is not None:
            return [("picture", self._add_picture(event, now))]
        if event.topic == "photometry":
            self.time_scale = p["time_scale"]
            points = []
            for target in p["targets"]:
                point = [p["obs_time"], target.get("magnitude"), target.get("error")]
                if target.get("flags") or not all(isinstance(v, int | float) for v in point):
                    continue
                curve = self.lightcurves.setdefault(str(target.get("name")), [])
                curve.append(point)
                del curve[:-LIGHTCURVE_POINTS]
                points.append({"target": str(target.get("name")), "point": point})
            return [("photometry", {"time_scale": self.time_scale, "points": points})] if points else []
        if event.topic == "log" and p["level"] in ("warning", "error"):
            return [("log", {"level": p["level"], "message": p["message"]})]
        return []

    def _add_picture(self, event: events.Event, now: float) -> dict[str, Any]:
        p = event.payload
        assert event.picture is not None
        view = self._view(p["object"], p["filter"], p["session"], now)
        shown = view.picture
        if (shown is not None and shown.frames == p["frames"] and shown.data == event.picture
                and (shown.width, shown.height) == (p["width"], p["height"])):
            # The daemon repeats its last picture while the stack is quiet (for viewers that start late):
            # the same picture keeps its address, so the pages that show it fetch nothing again.
            view.updated = now
            return view.summary(now)
        self._count += 1
        picture = Picture(f"{self._boot}-{self._count}", view.key, event.picture, p["width"], p["height"],
                          p["frames"])
        self._pictures[picture.ident] = picture
        kept = [q for q in self._pictures.values() if q.key == view.key]
        for old in kept[:-PICTURES_KEPT]:
            del self._pictures[old.ident]
        view.picture = picture  # its frame count may trail the stack's: the counts come from stack events
        view.updated = now
        return view.summary(now)

    def _view(self, target: str | None, filter_name: str | None, session: int, now: float) -> StackView:
        """The stack of a target and filter; a new session of it starts over (a reset, a new night)."""
        key = stack_key(target, filter_name)
        view = self.stacks.get(key)
        if view is None or view.session != session:
            view = self.stacks[key] = StackView(key, (target or "").strip() or None,
                                                (filter_name or "").strip() or None, session=session,
                                                updated=now)
        return view

    # -- what pages ask for --------------------------------------------------------------------------

    def picture(self, ident: str) -> Picture | None:
        """A kept picture by its identifier, or None when unknown or superseded long ago."""
        return self._pictures.get(ident)

    def bus_state(self) -> str:
        """``live`` while the daemon is heard, ``reconnecting`` when it fell silent, ``connecting`` before."""
        if self.last_event is None:
            return "connecting"
        return "live" if self._clock() - self.last_event < STALE_AFTER else "reconnecting"

    def hello(self, control: bool) -> dict[str, Any]:
        """Everything a page needs when it (re)connects.

        Parameters
        ----------
        control : bool
            Whether this server accepts control requests (with the token; the page still needs it).

        Returns
        -------
        dict
        """
        now = self._clock()
        return {"caption": self.caption, "control": control, "bus": self.bus_state(), "status": self.status,
                "stacks": [v.full(now) for v in self.stacks.values()],
                "lightcurves": self.lightcurves, "time_scale": self.time_scale}


_STATUS_FIELDS = ("state", "queue", "received", "accepted", "rejected", "exptime", "frames", "object",
                  "filter", "session", "method", "insecure")
