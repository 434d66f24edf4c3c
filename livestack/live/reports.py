"""Pure functions that turn what happened into events and journal lines (no threads, no I/O).

- ``frame_event``: the ``frame`` event of one frame's verdict (or its arrival, ``received``).
- ``stack_event``: the ``stack`` event, from one consistent view of a stack (``StackView``).
- ``filter_list``: the ``filters`` field of ``stack`` and ``status`` events.
- ``journal_entry``: the journal line of one frame's verdict.
- ``status_line``: the one line systemd shows for a ``status`` event's fields.
- ``safe_name``: a target's folder name from its OBJECT.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from livestack import events
from livestack.live.state import JournalEntry
from livestack.pipeline import FilterSummary, FrameResult, frame_facts
from livestack.stages.snapshot import StackInfo

__all__ = ["StackView", "filter_list", "finite", "frame_event", "journal_entry", "safe_name", "stack_event",
           "status_line"]


@dataclass(frozen=True)
class StackView:
    """One stack as seen at one moment, taken under the stack lock: counts and picture agree.

    Attributes
    ----------
    info : StackInfo
        Header facts (NCOMBINE, total exposure, times, reference ...).
    rejected_fraction : float
        Share of pixel values the accumulator rejected.
    session : int
    image : ndarray or None
        The stack itself (a copy), or smaller for a picture, when it was asked for.
    filters : tuple of FilterSummary
        Frames and exposure of each of the target's filter stacks (``info`` is the one stacked last).
    sample : ndarray or None
        The pixels ``Stacker.snr`` samples, when they were asked for.
    """

    info: StackInfo
    rejected_fraction: float
    session: int
    image: np.ndarray | None = None
    filters: tuple[FilterSummary, ...] = ()
    sample: np.ndarray | None = None


def finite(value: float) -> float | None:
    """``value`` as a float, or None when it is NaN or infinite (JSON has neither)."""
    return float(value) if np.isfinite(value) else None


def frame_event(seq: int, path: Path, verdict: str, result: FrameResult | None, latency: float | None,
                session: int) -> events.Event:
    """The ``frame`` event: a frame received, or its verdict with its measures and transform.

    Parameters
    ----------
    seq : int
        Its journal seq.
    path : Path
    verdict : {"received", "accepted", "rejected"}
    result : FrameResult or None
        None for ``received``.
    latency : float or None
        Seconds from the file being whole to the verdict.
    session : int

    Returns
    -------
    events.Event
    """
    meta = result.meta if result else None
    q = result.quality if result else None
    t = result.transform if result else None
    transform = None
    if t is not None and meta is not None:
        dx, dy = t.centre_shift(meta.shape)
        transform = {"matrix": t.matrix.tolist(), "dx": dx, "dy": dy,
                     "rotation": t.rotation, "scale": t.scale, "inliers": t.inliers, "rms": t.rms,
                     "method": t.method, "distortion": t.distortion is not None,
                     "rms_before": finite(t.rms_before) if t.rms_before is not None else None,
                     "rms_after": finite(t.rms_after) if t.rms_after is not None else None}
    return events.make_event(
        "frame", seq=seq, path=str(path), name=path.name, verdict=verdict,
        reason=result.reason if result else None,
        date_obs=meta.time_utc.isoformat() if meta and meta.time_utc else None,
        exptime=meta.exptime if meta else None, object=meta.object if meta else None,
        filter=meta.filter if meta else None, stars=q.stars if q else None,
        fwhm=finite(q.fwhm) if q else None, ellipticity=finite(q.ellipticity) if q else None,
        background=finite(q.background) if q else None, noise=finite(q.noise) if q else None,
        sharpness=finite(result.sharpness) if result and result.sharpness is not None else None,
        transform=transform, timings=dict(result.timings) if result else {},
        latency=latency, session=session,
        calibration=result.calibration if result else None, defects=result.defects if result else None,
        sky=finite(result.sky) if result and result.sky is not None else None,
        transparency=result.transparency if result else None,
        weight=result.weight if result and result.accepted else None)


def stack_event(view: StackView, preview: np.ndarray | None = None, snr: float | None = None) -> events.Event:
    """The ``stack`` event of one stack view, with its preview when there is one.

    Parameters
    ----------
    view : StackView
    preview : ndarray, optional
        The stretched uint8 preview of ``view.image``.
    snr : float, optional

    Returns
    -------
    events.Event
    """
    info = view.info
    return events.make_event(
        "stack", preview=preview, frames=info.ncombine, exptime=info.exptime, method=info.method,
        rejected_fraction=float(view.rejected_fraction), snr=snr, object=info.object,
        filter=info.filter, reference=info.reference, session=view.session,
        filters=filter_list(view.filters))


def filter_list(filters: tuple[FilterSummary, ...]) -> list[dict[str, Any]]:
    """The ``filters`` field of ``stack`` and ``status`` events: each filter's frames and exposure."""
    return [{"filter": f.filter or None, "frames": f.frames, "exptime": f.exptime} for f in filters]


def journal_entry(seq: int, path: Path, st: os.stat_result, digest: str, result: FrameResult, session: int,
                  latency: float) -> JournalEntry:
    """The journal line of one frame's verdict.

    Parameters
    ----------
    seq : int
    path : Path
    st : os.stat_result
        The file's identity when it was read (size, mtime).
    digest : str
        ``content_hash`` of the file.
    result : FrameResult
    session : int
    latency : float

    Returns
    -------
    JournalEntry
    """
    q = result.quality
    quality: dict[str, float | int | None] = {} if q is None else {
        "stars": q.stars, "fwhm": finite(q.fwhm), "ellipticity": finite(q.ellipticity),
        "background": finite(q.background), "noise": finite(q.noise),
        "sharpness": None if result.sharpness is None else finite(result.sharpness)}
    return JournalEntry(
        seq=seq, path=str(path), size=st.st_size, mtime_ns=st.st_mtime_ns, hash=digest,
        verdict="accepted" if result.accepted else "rejected", reason=result.reason, session=session,
        transform=[float(v) for v in result.transform.matrix.ravel()] if result.transform else None,
        quality=quality, timings=dict(result.timings), latency=latency, time=events.utc_now_iso(),
        reference=result.reference, facts=frame_facts(result))


def status_line(status: dict[str, Any]) -> str:
    """The one line ``systemctl status`` shows, from a ``status`` event's fields."""
    problem = status.get("problem")
    return (f"{status['state']}: {f'{problem}; ' if problem else ''}{status['frames']} stacked, "
            f"{status['rejected']} rejected, queue {status['queue']}")


def safe_name(text: str) -> str:
    """A folder name for a target: letters, digits and ``._+-``; never empty, never hidden."""
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", text.strip()).strip("._")
    return name or "object"
