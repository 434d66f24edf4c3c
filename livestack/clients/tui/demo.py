"""A plausible night's events, made up: for the dashboard's tests, snapshots and screenshots.

Deterministic for a given start time and seed, so that a screenshot of the dashboard fed with them is the
same on every machine.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from livestack import events

__all__ = ["DEMO_START", "demo_events", "demo_preview", "save_demo_screenshot", "stamp"]

#: 21:30 UTC on an autumn night, when M 31 is well up from Europe.
DEMO_START = datetime(2024, 10, 5, 21, 30, 0, tzinfo=UTC)

_STARTED = DEMO_START - timedelta(minutes=2)

#: The filter wheel of the made-up night: luminance twice as often as each colour.
_WHEEL = ("L", "L", "R", "G", "B")


def stamp(event: events.Event, when: datetime) -> events.Event:
    """The same event with its ``time`` set to ``when`` (events are made with the current time).

    Parameters
    ----------
    event : Event
    when : datetime
        An aware datetime.

    Returns
    -------
    Event
    """
    payload = {**event.payload, "time": when.isoformat(timespec="milliseconds")}
    events.validate(payload)
    return events.Event(event.topic, payload, event.preview)


def demo_events(frames: int = 24, start: datetime = DEMO_START, seed: int = 7) -> list[events.Event]:
    """Events of a stack of M 31 through a filter wheel (L, L, R, G, B) at 30 s a frame: frames, stack updates
    with previews, statuses with each filter's counts.

    Parameters
    ----------
    frames : int
        How many frames arrive; every seventh is rejected (clouds, trailing).
    start : datetime
        When the first frame's event is published.
    seed : int
        Seed of the made-up measurements.

    Returns
    -------
    list of Event
        In publication order, ending with a ``status``.
    """
    rng = np.random.default_rng(seed)
    out: list[events.Event] = []
    accepted = rejected = 0
    exptime = 30.0
    per_filter: dict[str, int] = {}
    for seq in range(1, frames + 1):
        when = start + timedelta(seconds=32 * (seq - 1))
        filter_name = _WHEEL[(seq - 1) % len(_WHEEL)]
        name = f"M31_Light_{filter_name}_{exptime:.0f}s_{seq:04d}.fits"
        bad = seq % 7 == 0
        fwhm = float(2.3 + 0.25 * np.sin(seq / 5) + rng.normal(0, 0.05))
        stars = int(420 - 40 * np.sin(seq / 6) + rng.normal(0, 8))
        background = float(1180 + 6 * seq + rng.normal(0, 4))
        latency = float(2.6 + rng.normal(0, 0.3))
        fields: dict[str, Any] = {
            "seq": seq,
            "path": f"/data/2024-10-05/{name}",
            "name": name,
            "date_obs": (when - timedelta(seconds=exptime + 2)).isoformat(),
            "exptime": exptime,
            "object": "M 31",
            "filter": filter_name,
            "ellipticity": 0.08,
            "noise": 14.2,
            "sharpness": None,
            "timings": {"read": 0.4, "detect": 0.6, "align": 0.3, "stack": 0.9},
            "session": 1,
        }
        if bad:
            rejected += 1
            reason = "only 12 stars (clouds?)" if seq % 2 else "stars elongated: ellipticity 0.41"
            out.append(stamp(events.make_event(
                "frame", verdict="rejected", reason=reason, stars=12 if seq % 2 else stars,
                fwhm=None, background=background * 1.6, transform=None, latency=latency, **fields,
            ), when))
        else:
            accepted += 1
            per_filter[filter_name] = per_filter.get(filter_name, 0) + 1
            dx, dy = float(0.8 * seq + rng.normal(0, 0.3)), float(-0.5 * seq + rng.normal(0, 0.3))
            transform = {
                "matrix": [[1.0, 0.0, dx], [0.0, 1.0, dy]], "dx": dx, "dy": dy,
                "rotation": float(0.002 * seq), "scale": 1.0, "inliers": stars // 3,
                "rms": float(abs(rng.normal(0.12, 0.03))), "method": "fast" if seq > 1 else "reference",
            }
            out.append(stamp(events.make_event(
                "frame", verdict="accepted", reason=None, stars=stars, fwhm=fwhm, background=background,
                transform=transform, latency=latency, **fields,
            ), when))
            count = per_filter[filter_name]
            out.append(stamp(events.make_event(
                "stack", preview=demo_preview(depth=accepted), frames=count, exptime=count * exptime,
                method="kappa-sigma", rejected_fraction=0.012, snr=float(8 * np.sqrt(accepted)),
                object="M 31", filter=filter_name, reference="/data/2024-10-05/M31_Light_L_30s_0001.fits",
                session=1, filters=_filters(per_filter, exptime),
            ), when + timedelta(milliseconds=200)))
        out.append(stamp(_status(seq, accepted, rejected, exptime, when, _filters(per_filter, exptime)),
                         when + timedelta(seconds=1)))
    out.append(stamp(events.make_event(
        "log", level="warning", message="frames arrive slower than the exposure time", logger="watch",
    ), start + timedelta(seconds=32 * frames - 20)))
    return out


def demo_preview(depth: int = 20, rows: int = 96, columns: int = 144, seed: int = 3) -> np.ndarray:
    """A small, stretched colour image of a galaxy among stars, less noisy as ``depth`` grows.

    Parameters
    ----------
    depth : int
        Frames in the stack; the noise falls as its square root.
    rows, columns : int
        The preview's size.
    seed : int
        Where the stars are.

    Returns
    -------
    ndarray
        uint8 ``(rows, columns, 3)``.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float64)
    cy, cx = rows / 2, columns / 2
    angle = np.radians(35)
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    radius = np.hypot(u / (columns * 0.28), v / (rows * 0.09))
    galaxy = 0.85 * np.exp(-radius * 2.2) + 0.6 * np.exp(-((u / 4) ** 2 + (v / 3) ** 2))
    sky = np.zeros((rows, columns, 3))
    sky += galaxy[:, :, None] * np.array([1.0, 0.9, 0.75])
    for _ in range(70):
        sy, sx = rng.uniform(0, rows), rng.uniform(0, columns)
        flux = rng.uniform(0.2, 1.0) ** 2
        colour = np.array([1.0, 0.95, 0.9]) if rng.random() < 0.7 else np.array([0.8, 0.9, 1.0])
        sky += (flux * np.exp(-((x - sx) ** 2 + (y - sy) ** 2) / 1.2))[:, :, None] * colour
    noise_rng = np.random.default_rng(seed + depth)
    sky += noise_rng.normal(0.0, 0.08 / np.sqrt(max(depth, 1)), sky.shape)
    sky += np.array([0.03, 0.04, 0.07])
    stretched = np.arcsinh(np.clip(sky, 0, None) * 6) / np.arcsinh(6)
    return np.clip(stretched * 255, 0, 255).astype(np.uint8)


def _filters(per_filter: dict[str, int], exptime: float) -> list[dict[str, Any]]:
    return [{"filter": name, "frames": n, "exptime": n * exptime} for name, n in per_filter.items()]


def _status(seq: int, accepted: int, rejected: int, exptime: float, when: datetime,
            filters: list[dict[str, Any]]) -> events.Event:
    return events.make_event(
        "status", state="running", queue=0, lag=0.0, received=seq, accepted=accepted, rejected=rejected,
        exptime=accepted * exptime, frames=accepted, uptime=(when - _STARTED).total_seconds() + 1,
        started=_STARTED.isoformat(), watch="/data/2024-10-05", output="/data/stacks", method="kappa-sigma",
        object="M 31", filter="L", session=1, last_latency=2.7, insecure=False, filters=filters,
    )


def save_demo_screenshot(path: str, size: tuple[int, int] = (120, 40)) -> None:
    """Write an SVG screenshot of the dashboard fed with ``demo_events()`` (the README's picture).

    Parameters
    ----------
    path : str
        Where to write the SVG.
    size : tuple of int
        Terminal columns and rows.
    """
    # Imported here: the event builders above need no Textual, and app imports nothing of this module.
    import asyncio

    from livestack.clients.tui.app import ConnectionChanged, LivestackApp

    async def shoot() -> None:
        app = LivestackApp(None, None, tz=UTC, clock=DEMO_START.timestamp)
        async with app.run_test(size=size) as pilot:
            app.apply_events(demo_events())
            app.post_message(ConnectionChanged("connected"))
            await pilot.pause()
            with open(path, "w", encoding="utf-8") as out:
                out.write(app.export_screenshot(title="livestack tui"))

    asyncio.run(shoot())


if __name__ == "__main__":
    import sys

    save_demo_screenshot(sys.argv[1] if len(sys.argv) > 1 else "dashboard.svg")
