"""Live photometry: light curves measured while the night goes on, off the frame path.

The worker calls ``Photometry.frame`` after each accepted frame. On the worker's thread it does only what
needs the frame itself: on a session's first accepted frame it decides the plan (targets and comparison stars,
``pipeline.photometry_setup``), or, after a restart, takes it back with the points already measured from
the session's light curve file, so the night goes on with the same comparison stars and one curve; then it
cuts each star's small stamp from the frame as read and calibrated (microseconds; the frame can be released
at once) and queues them. The photometry thread measures the stamps,
publishes a ``photometry`` event, and rewrites the session's light curve (``lightcurve.ecsv`` beside its
snapshots, atomically, at most every ``WRITE_INTERVAL`` seconds and when it stops). The thread owns every
``Photometer``; the worker owns the plans.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from livestack import events
from livestack.config import Config
from livestack.pipeline import FrameResult, PhotometrySetup, Prepared, photometry_setup
from livestack.stages.photometry import (
    FramePhotometry,
    LightCurve,
    Photometer,
    PhotometryParams,
    PhotometryPlan,
    Stamp,
    Star,
    parse_target,
    read_lightcurve,
    write_lightcurve,
)

__all__ = ["LIGHTCURVE_FILE", "Photometry"]

log = logging.getLogger("livestack.photometry")

#: The light curve's file name, in each session's snapshot folder.
LIGHTCURVE_FILE = "lightcurve.ecsv"
#: Seconds between rewrites of a light-curve file while frames arrive.
WRITE_INTERVAL = 5.0


@dataclass(frozen=True, eq=False)
class _Job:
    session: int
    seq: int
    name: str
    time: float
    stamps: tuple[Stamp, ...]
    fwhm: float
    object: str | None


@dataclass(frozen=True, eq=False)
class _Start:
    """A session's plan, and what a light curve file written before a restart already holds."""

    session: int
    setup: PhotometrySetup
    folder: Path
    resumed: LightCurve | None = None
    reference_fluxes: tuple[float, ...] | None = None


@dataclass
class _Night:
    """One session's photometry, owned by the photometry thread."""

    photometer: Photometer
    setup: PhotometrySetup
    folder: Path
    written: float = 0.0
    dirty: bool = False


class Photometry:
    """The photometry of every session: plans on the worker's side, measurements on its own thread.

    Parameters
    ----------
    config : Config
        Uses ``[photometry]``; with no target, every call is a no-op and no thread starts.
    emit : callable
        Queues an event for publication.
    """

    def __init__(self, config: Config, emit: Callable[[events.Event], None]) -> None:
        self.config = config
        self.enabled = bool(config.photometry.targets)
        self._emit = emit
        self._plans: dict[int, PhotometrySetup | None] = {}  # worker's: session -> plan (None: unusable)
        self._jobs: queue.Queue[_Job | _Start | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the measuring thread (when photometry is configured)."""
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="livestack-photometry", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Measure what is queued, write every light curve, end the thread."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        """False once the thread has ended unexpectedly (True when photometry is off)."""
        return not self.enabled or self._thread is None or self._thread.is_alive()

    # -- the worker's side ----------------------------------------------------------------------------

    def frame(self, seq: int, prepared: Prepared, result: FrameResult, session: int, folder: Path,
              reference_wcs: str | None) -> None:
        """Queue an accepted frame's stamps (worker thread; cheap).

        Parameters
        ----------
        seq : int
        prepared : Prepared
            The frame as read and calibrated, with its stars and quality.
        result : FrameResult
            Its accepted result (the transform onto the reference).
        session : int
        folder : Path
            The session's snapshot folder, where its light curve goes.
        reference_wcs : str or None
            The reference's WCS cards, for targets given on the sky.
        """
        if not self.enabled or result.transform is None:
            return
        if session not in self._plans:
            start = (self._resume(session, folder)
                     or self._plan(session, folder, prepared, result, reference_wcs))
            self._plans[session] = start.setup if start is not None else None
            if start is not None:
                self._jobs.put(start)
        setup = self._plans[session]
        if setup is None:
            return
        fwhm = prepared.quality.fwhm
        stamps = setup.plan.cut(prepared.frame.luminance, result.transform.matrix, fwhm)
        meta = prepared.frame.meta
        self._jobs.put(_Job(session=session, seq=seq, name=Path(meta.path).name, time=setup.time(meta),
                            stamps=stamps, fwhm=fwhm, object=meta.object))

    def _resume(self, session: int, folder: Path) -> _Start | None:
        """The plan and points of a light curve this session wrote before a restart, if it matches."""
        path = folder / LIGHTCURVE_FILE
        if not path.is_file():
            return None
        try:
            curve, meta = read_lightcurve(path)
            plan = PhotometryPlan(
                stars=tuple(Star(str(s["name"]), float(s["x"]), float(s["y"]), role)
                            for role, key in (("target", "targets"), ("comparison", "comparisons"))
                            for s in meta[key]),
                params=PhotometryParams(aperture=float(meta["aperture_fwhm"]),
                                        annulus_inner=float(meta["annulus_fwhm"][0]),
                                        annulus_outer=float(meta["annulus_fwhm"][1]),
                                        gain=float(meta["gain"]),
                                        saturation=float(meta["saturation"] or math.inf)))
            fluxes = tuple(float(v) for v in meta["reference_fluxes"])
            sky, site = meta.get("sky"), meta.get("site")
            setup = PhotometrySetup(plan=plan, sky=tuple(sky) if sky else None,
                                    site=tuple(site) if site else None)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            log.warning("the light curve %s cannot be continued (%s); a new one starts", path, exc)
            return None
        wanted = [f"{s.name}@{s.x:.3f},{s.y:.3f}" for s in self._targets(setup)]
        if wanted != [f"{s.name}@{s.x:.3f},{s.y:.3f}" for s in plan.targets]:
            log.warning("the targets of %s differ from the configured ones; a new light curve starts", path)
            return None
        log.info("photometry goes on in %s: %d points already measured", path, len(curve.rows))
        return _Start(session, setup, folder, curve, fluxes)

    def _targets(self, setup: PhotometrySetup) -> list[Star]:
        """The configured targets as a resumed plan names them (pixel targets; sky ones by the plan)."""
        specs, planned = self.config.photometry.targets, setup.plan.targets
        if len(specs) != len(planned):
            return []
        targets = []
        for i, (spec, star) in enumerate(zip(specs, planned, strict=True)):
            try:
                targets.append(parse_target(spec, None, name=f"T{i + 1}"))
            except ValueError:  # a sky position: trust the plan's pixel position for it
                targets.append(star)
        return targets

    def _plan(self, session: int, folder: Path, prepared: Prepared, result: FrameResult,
              reference_wcs: str | None) -> _Start | None:
        assert result.transform is not None
        try:
            setup = photometry_setup(self.config, prepared, result.transform, reference_wcs)
        except ValueError as exc:
            log.error("%s Photometry is off for this stack.", exc)
            return None
        if setup is None:
            return None
        for note in setup.notes:
            log.warning("%s", note)
        names = ", ".join(f"{s.name} at ({s.x:.1f}, {s.y:.1f})" for s in setup.plan.targets)
        log.info("photometry of %s against %d comparison stars", names, len(setup.plan.comparisons))
        return _Start(session, setup, folder)

    # -- the photometry thread ------------------------------------------------------------------------

    def _run(self) -> None:
        nights: dict[int, _Night] = {}
        while True:
            try:
                job = self._jobs.get(timeout=1.0)
            except queue.Empty:
                self._write_due(nights, force=False)
                continue
            if job is None:
                break
            try:
                if isinstance(job, _Start):
                    photometer = Photometer(job.setup.plan, job.setup.time_scale)
                    if job.resumed is not None and job.reference_fluxes is not None:
                        photometer.curve = job.resumed
                        photometer.reference_fluxes = np.array(job.reference_fluxes)
                    nights[job.session] = _Night(photometer, job.setup, job.folder)
                    continue
                night = nights[job.session]
                measured = night.photometer.add(job.seq, job.name, job.time, job.stamps, job.fwhm)
                night.dirty = True
                self._emit(_event(job, night, measured))
                self._write_due(nights, force=False)
            except Exception:
                # A measurement that fails loses one point, never the thread (and so the night's curve).
                log.exception("photometry of a frame failed")
        self._write_due(nights, force=True)

    def _write_due(self, nights: dict[int, _Night], force: bool) -> None:
        now = time.monotonic()
        for night in nights.values():
            if night.dirty and (force or now - night.written >= WRITE_INTERVAL):
                try:
                    photometer = night.photometer
                    meta = night.setup.describe()
                    if photometer.reference_fluxes is not None:
                        meta["reference_fluxes"] = [float(v) for v in photometer.reference_fluxes]
                    write_lightcurve(night.folder / LIGHTCURVE_FILE, photometer.curve, meta)
                except OSError as exc:
                    log.warning("the light curve could not be written to %s: %s", night.folder, exc)
                    continue
                night.written, night.dirty = now, False


def _event(job: _Job, night: _Night, measured: FramePhotometry) -> events.Event:
    n_targets = len(measured.rows)
    targets = [{"name": row.target, "magnitude": _num(row.magnitude), "error": _num(row.error),
                "flux": _num(row.flux), "flux_err": _num(row.flux_err), "x": _num(star.x), "y": _num(star.y),
                "comparisons": row.comparisons, "flags": list(star.flags)}
               for row, star in zip(measured.rows, measured.fluxes[:n_targets], strict=True)]
    return events.make_event(
        "photometry", seq=job.seq, name=job.name, obs_time=_num(job.time),
        time_scale=night.photometer.curve.time_scale, fwhm=_num(job.fwhm), aperture=float(measured.aperture),
        comparisons=len(night.setup.plan.comparisons), targets=targets, object=job.object,
        session=job.session)


def _num(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None
