"""What the dashboard knows: the daemon's state folded from its events, and how each value reads on screen.

Plain Python without Textual, so the folding and the formatting can be tested alone. It lives on the UI
thread; only the events (frozen) cross from the receiving thread.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, tzinfo
from math import hypot
from typing import Any

import numpy as np

from livestack import events

__all__ = [
    "FRAME_ROWS",
    "SERIES",
    "Dashboard",
    "FrameRow",
    "LogLine",
    "format_clock",
    "format_duration",
]

#: What an unknown value shows (an en dash).
_DASH = "\u2013"
#: Frames kept in the table, newest first.
FRAME_ROWS = 50
#: Values kept per plot: a night of 30 s frames; a sparkline averages them down to its width anyway.
_SERIES_LENGTH = 2000
#: The plots over the night, fed from accepted frames: key -> frame event field.
SERIES: tuple[str, ...] = ("fwhm", "stars", "background", "latency")
#: Frames per minute are measured over the daemon's counters of the last few minutes, so the rate follows
#: a change of exposure instead of averaging the whole night.
_RATE_WINDOW_S = 600.0
#: Log lines kept from the daemon's `log` events: warnings and errors (info is the daemon's own journal).
_LOGGED_LEVELS = ("warning", "error")


@dataclass(frozen=True)
class FrameRow:
    """One line of the frame table, already formatted.

    Attributes
    ----------
    key : tuple of (int, str)
        The daemon's sequence number and the file's path; later events of the same frame replace the row.
    time, name, verdict, stars, fwhm, shift, rotation, rms : str
        The cells.
    status : str
        The raw verdict (``received``, ``accepted``, ``rejected``), for styling.
    """

    key: tuple[int, str]
    time: str
    name: str
    verdict: str
    stars: str
    fwhm: str
    shift: str
    rotation: str
    rms: str
    status: str


@dataclass(frozen=True)
class LogLine:
    """A line for the log pane: when (``HH:MM:SS``), how bad (``info``, ``warning``, ``error``), what."""

    time: str
    level: str
    text: str


class Dashboard:
    """The daemon's state as the dashboard shows it, updated one event at a time.

    Parameters
    ----------
    tz : tzinfo, optional
        The time zone of displayed clock times; the local one by default.

    Attributes
    ----------
    status : Mapping or None
        The latest ``status`` payload.
    stack : Mapping or None
        The latest ``stack`` payload.
    preview : ndarray or None
        The latest preview, uint8 ``(rows, columns, channels)``.
    frames : OrderedDict
        Frame rows by key, oldest first, at most ``FRAME_ROWS``.
    series : dict of str to deque of float
        The plotted values of accepted frames, per name in ``SERIES``.
    lightcurves : dict of str to deque of (float, float, float)
        ``(time, magnitude, error)`` of each photometry target's clean points, in arrival order.
    time_scale : str or None
        The light curves' time scale (``JD_UTC`` or ``BJD_TDB``), from the latest photometry event.
    """

    def __init__(self, tz: tzinfo | None = None) -> None:
        self.tz = tz
        self.status: Mapping[str, Any] | None = None
        self.stack: Mapping[str, Any] | None = None
        self.preview: np.ndarray | None = None
        self.frames: OrderedDict[tuple[int, str], FrameRow] = OrderedDict()
        self.series: dict[str, deque[float]] = {name: deque(maxlen=_SERIES_LENGTH) for name in SERIES}
        self.last_frame: Mapping[str, Any] | None = None
        self.lightcurves: dict[str, deque[tuple[float, float, float]]] = {}
        self.time_scale: str | None = None
        # (event time in seconds, frames received so far) from recent status events, for the rate.
        self._received_samples: deque[tuple[float, int]] = deque()

    def apply(self, event: events.Event) -> list[LogLine]:
        """Fold one event into the state.

        Parameters
        ----------
        event : Event
            A validated event.

        Returns
        -------
        list of LogLine
            What the event adds to the log pane (often nothing).
        """
        handler = getattr(self, f"_apply_{event.topic}")
        lines: list[LogLine] = handler(event)
        return lines

    # What the header and counters show.

    @property
    def target(self) -> str:
        """The object being stacked, or a dash."""
        return _first_text("object", self.status, self.stack, self.last_frame) or _DASH

    @property
    def filter(self) -> str:
        """The filter of the current stack, or a dash."""
        return _first_text("filter", self.status, self.stack, self.last_frame) or _DASH

    @property
    def method(self) -> str:
        """The stacking method, or a dash."""
        return _first_text("method", self.status, self.stack) or _DASH

    @property
    def state(self) -> str | None:
        """The daemon's state from the latest status (None before the first)."""
        return None if self.status is None else str(self.status["state"])

    @property
    def state_label(self) -> str:
        """The state in words a user reads at a glance."""
        labels = {
            "starting": "starting",
            "waiting": "waiting for frames",
            "choosing": "choosing the reference",
            "running": "running",
            "paused": "paused",
            "stopping": "stopping",
        }
        if self.state is None:
            return "no status yet"
        label = labels.get(self.state, self.state)
        detail = self.status.get("choosing") if self.status is not None and self.state == "choosing" else None
        return f"{label} ({detail})" if detail else label

    def counters(self) -> dict[str, str]:
        """The counter panel's values by label, formatted (dashes where unknown)."""
        s = self.status
        if s is None:
            blank = _DASH
            values = dict.fromkeys(
                ("received", "stacked", "rejected", "exposure", "elapsed", "frames/min", "queue", "latency"),
                blank,
            )
            if self.stack is not None:
                values["stacked"] = str(self.stack["frames"])
                values["exposure"] = format_duration(float(self.stack["exptime"]))
            return values
        latency = s["last_latency"]
        if latency is None and self.last_frame is not None:
            latency = self.last_frame["latency"]
        rate = self.frames_per_minute()
        queue = f"{s['queue']}" if s["queue"] == 0 else f"{s['queue']} ({format_duration(float(s['lag']))})"
        return {
            "received": str(s["received"]),
            "stacked": str(s["frames"]),
            "rejected": str(s["rejected"]),
            "exposure": format_duration(float(s["exptime"])),
            "elapsed": format_duration(float(s["uptime"])),
            "frames/min": _DASH if rate is None else f"{rate:.1f}",
            "queue": queue,
            "latency": _DASH if latency is None else f"{float(latency):.1f} s",
        }

    def filter_counts(self) -> list[tuple[str, str]]:
        """Each filter of the current target with its frames and exposure, as ``(filter, "12 (6m 00s)")``.

        From the latest ``status`` (else ``stack``) event's ``filters``; empty when the daemon sends none or
        the target has a single filter (the header and counters say all there is).
        """
        source = self.status if self.status is not None and self.status.get("filters") else self.stack
        entries: list[Mapping[str, Any]] = list(source.get("filters") or []) if source is not None else []
        if len(entries) < 2:
            return []
        out: list[tuple[str, str]] = []
        for entry in entries:
            name = str(entry.get("filter") or "")
            out.append((name or _DASH, f"{int(entry.get('frames', 0))} "
                                       f"({format_duration(float(entry.get('exptime', 0.0)))})"))
        return out

    def frames_per_minute(self) -> float | None:
        """Frames received per minute over the last ten minutes of status events (or the whole uptime).

        Returns
        -------
        float or None
            None before the first status.
        """
        if self.status is None:
            return None
        if len(self._received_samples) >= 2:
            (t0, n0), (t1, n1) = self._received_samples[0], self._received_samples[-1]
            if t1 - t0 >= 30.0:
                return (n1 - n0) / (t1 - t0) * 60.0
        uptime = float(self.status["uptime"])
        if uptime <= 0:
            return None
        return float(self.status["received"]) / uptime * 60.0

    def rows(self) -> list[FrameRow]:
        """The frame table's rows, newest first."""
        return list(reversed(self.frames.values()))

    # One method per topic.

    def _apply_status(self, event: events.Event) -> list[LogLine]:
        previous = self.status
        self.status = event.payload
        lines: list[LogLine] = []
        if previous is not None and previous["started"] != event["started"]:
            # A new daemon life: its counters and frame numbers start again.
            self._received_samples.clear()
            lines.append(self._line(event, "warning", "the daemon restarted"))
        elif previous is not None and previous["state"] != event["state"]:
            lines.append(self._line(event, "info", f"state: {self.state_label}"))
        when = _seconds(event["time"])
        if when is not None:
            self._received_samples.append((when, int(event["received"])))
            while self._received_samples and when - self._received_samples[0][0] > _RATE_WINDOW_S:
                self._received_samples.popleft()
        return lines

    def _apply_stack(self, event: events.Event) -> list[LogLine]:
        self.stack = event.payload
        if event.preview is not None:
            self.preview = event.preview
        return []

    def _apply_frame(self, event: events.Event) -> list[LogLine]:
        p = event.payload
        self.last_frame = p
        row = self._frame_row(event)
        self.frames[row.key] = row
        while len(self.frames) > FRAME_ROWS:
            self.frames.popitem(last=False)
        if p["verdict"] == "accepted":
            for name in SERIES:
                value = p[name]
                if value is not None:
                    self.series[name].append(float(value))
        if p["verdict"] == "rejected":
            return [self._line(event, "warning", f"rejected {p['name']}: {p['reason'] or 'no reason given'}")]
        return []

    def _apply_removal(self, event: events.Event) -> list[LogLine]:
        p = event.payload
        names = ", ".join(str(n) for n in p["names"]) or "frames " + ", ".join(str(s) for s in p["seqs"])
        verb = "removal of" if p["action"] == "remove" else "re-inclusion of"
        how = f" ({p['how']})" if p["state"] == "done" else ""
        level = "error" if p["state"] == "failed" else "info"
        lines = [self._line(event, level, f"{verb} {names}: {p['state']}{how}")]
        lines += [self._line(event, "warning", str(problem)) for problem in p["problems"]]
        if p["state"] == "done":
            status = "removed" if p["action"] == "remove" else "accepted"
            seqs = set(p["seqs"])
            for key, row in list(self.frames.items()):
                if key[0] in seqs:
                    self.frames[key] = replace(row, verdict=status, status=status)
        return lines

    def _apply_photometry(self, event: events.Event) -> list[LogLine]:
        self.time_scale = str(event["time_scale"])
        when = _number(event["obs_time"])
        for target in event["targets"]:
            if not isinstance(target, Mapping):
                continue
            mag, err = _number(target.get("magnitude")), _number(target.get("error"))
            name = str(target.get("name", "?"))
            points = self.lightcurves.setdefault(name, deque(maxlen=_SERIES_LENGTH))
            if when is not None and mag is not None and err is not None and not target.get("flags"):
                points.append((when, mag, err))
        return []

    def _apply_snapshot(self, event: events.Event) -> list[LogLine]:
        where = event["image"] or event["fits"] or "nowhere"
        text = f"snapshot of {event['frames']} frames ({event['reason']}): {where}"
        return [self._line(event, "info", text)]

    def _apply_log(self, event: events.Event) -> list[LogLine]:
        if event["level"] not in _LOGGED_LEVELS:
            return []
        return [self._line(event, str(event["level"]), f"{event['logger']}: {event['message']}")]

    def _line(self, event: events.Event, level: str, text: str) -> LogLine:
        return LogLine(format_clock(event["time"], self.tz), level, text)

    def _frame_row(self, event: events.Event) -> FrameRow:
        p = event.payload
        verdict = str(p["verdict"])
        if verdict == "rejected" and p["reason"]:
            verdict = f"rejected: {p['reason']}"
        transform = p["transform"] or {}
        dx, dy = _number(transform.get("dx")), _number(transform.get("dy"))
        rotation, rms = _number(transform.get("rotation")), _number(transform.get("rms"))
        return FrameRow(
            key=(int(p["seq"]), str(p["path"])),
            time=format_clock(p["time"], self.tz),
            name=str(p["name"]),
            verdict=verdict,
            stars=_DASH if p["stars"] is None else str(p["stars"]),
            fwhm=_quality(p),
            shift=_DASH if dx is None or dy is None else f"{hypot(dx, dy):.1f}",
            rotation=_DASH if rotation is None else f"{rotation:+.2f}°",
            rms=_residual(rms, transform),
            status=str(p["verdict"]),
        )


def _residual(rms: float | None, transform: Mapping[str, Any]) -> str:
    """The fit's residual; with a distortion correction, the residual without it first (``0.62>0.11``)."""
    if rms is None:
        return _DASH
    before = _number(transform.get("rms_before"))
    if transform.get("distortion") and before is not None:
        return f"{before:.2f}>{rms:.2f}"
    return f"{rms:.2f}"


def _quality(payload: Mapping[str, Any]) -> str:
    """The FWHM of a star frame; a surface frame (Moon, planets) has none and shows its sharpness, ``S``."""
    if payload["fwhm"] is not None:
        return f"{float(payload['fwhm']):.2f}"
    sharpness = payload.get("sharpness")
    return _DASH if sharpness is None else f"S {float(sharpness):.0f}"


def format_duration(seconds: float) -> str:
    """A duration as ``1h 02m 03s``, ``2m 03s`` or ``3s``.

    Parameters
    ----------
    seconds : float
        Non-negative; fractions are dropped.

    Returns
    -------
    str
    """
    total = max(0, int(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def format_clock(when: str | float, tz: tzinfo | None = None) -> str:
    """A time of day as ``HH:MM:SS``.

    Parameters
    ----------
    when : str or float
        An ISO 8601 time (as in events) or seconds since the epoch.
    tz : tzinfo, optional
        The time zone to show it in; the local one by default.

    Returns
    -------
    str
        ``HH:MM:SS``, or ``--:--:--`` for a time that cannot be read.
    """
    try:
        if isinstance(when, int | float):
            moment = datetime.fromtimestamp(when, tz)
        else:
            moment = datetime.fromisoformat(when)
    except (ValueError, OverflowError, OSError):
        return "--:--:--"
    if isinstance(when, str):
        moment = moment.astimezone(tz)
    return moment.strftime("%H:%M:%S")


def _seconds(iso: str) -> float | None:
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def _first_text(name: str, *payloads: Mapping[str, Any] | None) -> str | None:
    for payload in payloads:
        if payload is not None and payload.get(name):
            return str(payload[name])
    return None


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None
