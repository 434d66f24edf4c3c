"""Pipeline: the one place that wires the stages together (read, calibrate, detect, align, warp, stack).

``Stacker`` turns files into a stack, one frame at a time. Its work per frame is split in two so a caller may
overlap them: ``prepare`` (read the raw mosaic, calibrate it with the matching masters, replace the master
dark's defects, debayer, detect, measure the sky; touches no stack state, safe on another thread) and
``commit`` (check, align, judge against the night, replace the defects found in consecutive frames, warp,
normalise, accumulate; one thread, in order). ``process`` does both. It owns no thread, socket or
timer: the daemon and the ``stack`` command drive it.

A stack aligns on stars or on the surface (``stages.surface``: the Moon, the Sun, planets), chosen once, when
its reference is: ``[align] mode = "auto"`` takes stars when the reference frame has enough of them and the
surface otherwise, so a night that moves from a star field to the Moon (a new OBJECT, a new stack) switches
by itself.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from livestack.config import ComposeConfig, Config
from livestack.errors import FrameError, StateError
from livestack.stages import calibrate, normalise, surface
from livestack.stages.align import AlignParams, Distortion, Transform, align
from livestack.stages.calibrate import Master, MasterLibrary
from livestack.stages.compose import Composite, canonical_filter, compose, parse_weights
from livestack.stages.detect import Quality, Stars, detect
from livestack.stages.frames import (
    FITS_SUFFIXES,
    Frame,
    FrameMeta,
    RawFrame,
    develop,
    develop_data,
    read_frame,
    read_meta,
    read_raw,
)
from livestack.stages.normalise import Judge, Measures, Normalisation, Sky
from livestack.stages.photometry import (
    PhotometryParams,
    PhotometryPlan,
    Star,
    mid_exposure_time,
    parse_target,
)
from livestack.stages.photometry import plan_photometry as _plan_photometry
from livestack.stages.photometry import saturation_level as _saturation_level
from livestack.stages.snapshot import StackInfo
from livestack.stages.solve import Solution, SolveFailure, SolveHints, hints_from_header, solve
from livestack.stages.stack import Accumulator, MedianStack, make_accumulator
from livestack.stages.warp import warp

__all__ = ["UNALIGNED_METHODS", "FilterSummary", "FrameResult", "PhotometrySetup", "Prepared",
           "ReferenceCandidate", "Searched", "Stacker", "build_composite", "choose_reference",
           "composite_info", "distortion_from_facts", "expand_paths", "filter_key", "frame_facts",
           "order_by_time", "photometry_setup", "reference_first", "solve_reference", "wants_solution"]

log = logging.getLogger("livestack.pipeline")

ACCEPTED = "accepted"
REJECTED = "rejected"

#: Stacking methods that take frames as they are, without alignment (a fixed camera's star trails).
UNALIGNED_METHODS: frozenset[str] = frozenset({"max"})

_STAR_FIELDS = ("x", "y", "flux", "fwhm", "a", "b", "theta", "flags")

#: Surface frames accepted whatever their sharpness before ``keep_sharpest`` starts choosing.
SHARPEST_WARMUP = 5

#: Pixels sampled (at most) when estimating the stack's signal-to-noise ratio.
_SNR_SAMPLE = 200_000

#: In the reference window, a frame is as good as the best when it has at least this fraction of the most
#: stars found there ...
REFERENCE_STAR_SLACK = 0.8
#: ... and a FWHM at most this many times the smallest among those frames (seeing and noise move both a
#: little from frame to frame; a defocused or cloudy frame misses by far more).
REFERENCE_FWHM_SLACK = 1.2


@dataclass(frozen=True)
class Prepared:
    """A frame read, calibrated and searched for stars, not yet aligned or stacked.

    ``calibration`` says which masters were applied (or why none); ``defects`` counts the pixels replaced
    so far. ``candidates`` are this frame's defect candidates (sorted flat indices of the mosaic) when
    defects are found from the frames, and ``mosaic`` the calibrated mosaic of a colour frame then, so
    that ``commit`` can replace them before debayering again. ``sky`` is its star-masked sky.
    """

    frame: Frame
    stars: Stars
    quality: Quality
    timings: Mapping[str, float]
    calibration: str | None = None
    defects: int = 0
    candidates: np.ndarray | None = None
    mosaic: np.ndarray | None = None
    sky: Sky | None = None


@dataclass(frozen=True)
class Searched:
    """What ``Stacker.prepare`` found in a file besides its pixels: its stars, measures and defect candidates.

    Given back to ``prepare``, the file's pixels are read again but not searched again (the search depends on
    the file alone). ``detect`` is the seconds the search took.
    """

    stars: Stars
    quality: Quality
    detect: float
    candidates: np.ndarray | None = None
    sky: Sky | None = None

    @classmethod
    def of(cls, prepared: Prepared) -> Searched:
        """The search of a prepared frame, without its pixels."""
        return cls(prepared.stars, prepared.quality, prepared.timings.get("detect", 0.0), prepared.candidates,
                   prepared.sky)


@dataclass(frozen=True)
class FrameResult:
    """What became of one frame.

    Attributes
    ----------
    path : str
    verdict : str
        ``"accepted"`` or ``"rejected"``.
    reason : str or None
        Why it was rejected, one sentence.
    meta : FrameMeta or None
        None when the file could not be read.
    quality : Quality or None
    transform : Transform or None
        Frame -> reference, for accepted frames.
    timings : Mapping
        Seconds spent per stage: read, detect, align, warp, stack.
    reference : bool
        True for the frame that became the reference.
    sharpness : float or None
        ``surface.sharpness`` of a frame of a surface stack (None for star stacks).
    calibration : str or None
        Which masters were applied, or why none matched (one line); None without a master library.
    defects : int or None
        Hot and cold pixels replaced.
    sky : float or None
        The frame's sky level (mean over channels, star-masked), before normalisation.
    transparency : float or None
        Flux of its stars relative to the reference's, per second of exposure.
    weight : float or None
        Its weight in the stack (accepted frames).
    normalisation : Normalisation or None
        The scale and offset per channel it was stacked with (accepted frames).
    defect_pixels : ndarray or None
        The defects found from consecutive frames that were replaced in it (sorted flat indices of the
        mosaic), journaled so that a restack or a removal treats the frame exactly as it was stacked.
    """

    path: str
    verdict: str
    reason: str | None
    meta: FrameMeta | None
    quality: Quality | None
    transform: Transform | None
    timings: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    reference: bool = False
    sharpness: float | None = None
    calibration: str | None = None
    defects: int | None = None
    sky: float | None = None
    transparency: float | None = None
    weight: float | None = None
    normalisation: Normalisation | None = None
    defect_pixels: np.ndarray | None = None

    @property
    def accepted(self) -> bool:
        return self.verdict == ACCEPTED


def frame_facts(result: FrameResult) -> dict[str, Any]:
    """What the ``FRAMES`` table records of a frame, as a JSON-able dictionary (journaled with the frame).

    Parameters
    ----------
    result : FrameResult

    Returns
    -------
    dict
        ``path``, ``date_obs`` (ISO UTC), ``exptime``, ``filter``, ``object``, ``matrix`` (6 floats, frame ->
        reference), ``dx``, ``dy``, ``rotation``, ``scale``, ``inliers``, ``residual``, ``method``, ``stars``,
        ``fwhm``, ``ellipticity``, ``background``, ``noise``, ``sharpness``, ``reference``, ``weight``,
        ``distortion`` (``Distortion.to_json`` of the correction warped with, or None), ``residual_before``
        and ``residual_after`` (the star pairs' RMS without and with it, when it was evaluated);
        ``masters`` when the result carries calibration. A value not measured is None (JSON has no NaN).
    """
    meta, q, t = result.meta, result.quality, result.transform
    facts: dict[str, Any] = {
        "path": result.path,
        "date_obs": meta.time_utc.isoformat() if meta is not None and meta.time_utc is not None else None,
        "exptime": meta.exptime if meta is not None else None,
        "filter": meta.filter if meta is not None else None,
        "object": meta.object if meta is not None else None,
        "stars": q.stars if q is not None else None,
        "fwhm": _finite_or_none(q.fwhm) if q is not None else None,
        "ellipticity": _finite_or_none(q.ellipticity) if q is not None else None,
        "background": _finite_or_none(q.background) if q is not None else None,
        "noise": _finite_or_none(q.noise) if q is not None else None,
        "sharpness": None if result.sharpness is None else _finite_or_none(result.sharpness),
        "matrix": None, "dx": None, "dy": None, "rotation": None, "scale": None, "inliers": None,
        "residual": None, "method": None, "reference": result.reference,
        "distortion": None, "residual_before": None, "residual_after": None,
    }
    if t is not None:
        facts["matrix"] = [float(v) for v in t.matrix.ravel()]
        if meta is not None:
            facts["dx"], facts["dy"] = t.centre_shift(meta.shape)
        facts.update(rotation=t.rotation, scale=t.scale, inliers=int(t.inliers),
                     residual=_finite_or_none(t.rms), method=t.method)
        if t.distortion is not None:
            facts["distortion"] = t.distortion.to_json()
        if t.rms_before is not None and t.rms_after is not None:
            facts["residual_before"] = _finite_or_none(t.rms_before)
            facts["residual_after"] = _finite_or_none(t.rms_after)
    # Calibration and weighting add these to the result when they run; a table without them keeps its
    # columns, empty.
    masters = getattr(result, "masters", None) or getattr(result, "calibration", None)
    if masters is not None:
        facts["masters"] = masters if isinstance(masters, str) else _masters_text(masters)
    weight = getattr(result, "weight", None)
    if weight is not None:
        facts["weight"] = _finite_or_none(float(weight))
    elif result.accepted:
        facts["weight"] = 1.0
    facts["sky"] = _finite_or_none(result.sky) if result.sky is not None else None
    facts["transparency"] = _finite_or_none(result.transparency) if result.transparency is not None else None
    facts["defects"] = result.defects
    if result.normalisation is not None:
        facts["norm_scale"] = list(result.normalisation.scale)
        facts["norm_offset"] = list(result.normalisation.offset)
    if result.defect_pixels is not None:
        facts["defect_pixels"] = [int(v) for v in result.defect_pixels]
    return facts


@dataclass(frozen=True)
class FilterSummary:
    """One filter's stack in a target: what the dashboard and ``status`` show.

    Attributes
    ----------
    filter : str
        The filter's name as stacks are keyed (``filter_key``); ``""`` when frames carry no FILTER.
    frames : int
    exptime : float
        Total exposure, seconds.
    """

    filter: str
    frames: int
    exptime: float


@dataclass(frozen=True)
class ReferenceCandidate:
    """How a frame would serve as the reference (``Stacker.reference_candidate``).

    Attributes
    ----------
    stars : int
        Stars found.
    fwhm : float
        Their median FWHM, pixels (NaN when not measured).
    kind : str
        ``"stars"`` or ``"surface"``: what the stack would align on with this frame as its reference.
    problem : str or None
        Why it cannot be the reference at all.
    """

    stars: int
    fwhm: float
    kind: str = "stars"
    problem: str | None = None


def choose_reference(candidates: Sequence[ReferenceCandidate | None]) -> int | None:
    """Which of a stack's first frames becomes its reference.

    Parameters
    ----------
    candidates : sequence of ReferenceCandidate or None
        The first frames, in observation order; None for a frame that could not be read.

    Returns
    -------
    int or None
        The index of the chosen frame; None when none can be the reference.

    Notes
    -----
    Frames with a ``problem`` are out; star frames go before surface frames. Among star frames, those with
    at least ``REFERENCE_STAR_SLACK`` of the most stars found, and of those the ones whose FWHM is within
    ``REFERENCE_FWHM_SLACK`` of the smallest, are the good ones; the first good frame in observation order
    wins, so that when the first frames are equally good the grid stays where the night began. A surface
    stack takes its first usable frame.
    """
    usable = [(i, c) for i, c in enumerate(candidates) if c is not None and c.problem is None]
    stars = [(i, c) for i, c in usable if c.kind == "stars"]
    if not stars:
        return usable[0][0] if usable else None
    most = max(c.stars for _, c in stars)
    good = [(i, c) for i, c in stars if c.stars >= REFERENCE_STAR_SLACK * most]
    finite = [c.fwhm for _, c in good if np.isfinite(c.fwhm)]
    if finite:
        sharpest = min(finite)
        good = [(i, c) for i, c in good if np.isfinite(c.fwhm) and c.fwhm <= REFERENCE_FWHM_SLACK * sharpest]
    return good[0][0]


def reference_first(stacker: Stacker, paths: Sequence[Path], executor: Executor | None = None,
                    found: dict[Any, Prepared | Searched | FrameResult] | None = None) -> list[Path]:
    """Files in observation order with the reference chosen among the first ones moved to the front.

    The batch form of the daemon's reference window: ``[align] reference_window`` first files are read,
    the reference is chosen among them (``choose_reference``) and stacked first; the others follow in
    their order. Without a choice to make (a named reference, a stack that has one, a window of one, no
    alignment) the order is kept.

    Parameters
    ----------
    stacker : Stacker
    paths : sequence of Path
        In observation order (``order_by_time``).
    executor : Executor, optional
        Prepares every other frame of the window while this thread prepares the rest (two cores at once).
    found : dict, optional
        Receives what was learnt of the window's files, for ``Stacker.stream``: the first file's preparation
        whole when it is the reference (it is stacked next), the others' searches without their pixels
        (``Searched``), rejections as they are.

    Returns
    -------
    list of Path
    """
    window = stacker.config.align.reference_window
    if window <= 1 or not stacker.chooses_reference or len(paths) < 2:
        return list(paths)
    first = list(paths[:window])
    aside = {i: executor.submit(stacker.prepare, p) for i, p in enumerate(first) if i % 2} if executor else {}
    candidates: list[ReferenceCandidate | None] = []
    kept: list[Prepared | Searched | FrameResult] = []
    for i, path in enumerate(first):
        prepared = aside.pop(i).result() if i in aside else stacker.prepare(path)
        candidates.append(stacker.reference_candidate(prepared))
        # Only the first frame is kept whole (when the first frames are equally good, it is the reference):
        # the window's pixels held together would be the run's peak of memory.
        kept.append(Searched.of(prepared) if i > 0 and isinstance(prepared, Prepared) else prepared)
        del prepared
    chosen = choose_reference(candidates)
    if found is not None:
        for i, (path, known) in enumerate(zip(first, kept, strict=True)):
            found[path] = Searched.of(known) if i != chosen and isinstance(known, Prepared) else known
    if chosen is None or chosen == 0:
        return list(paths)
    return [paths[chosen], *paths[:chosen], *paths[chosen + 1:]]


class _ReadBuffers:
    """Arrays the frames are read and debayered into, reused once nothing refers to them (any thread).

    A frame's pixels stay in use long after its read: by the frame, its calibration, the stack while it
    aligns and warps, the reference it may become, photometry. Rather than tracking each holder, an array is
    given out again only when the pool holds the one reference left to it (every view of it refers to it
    as its base); a frame read while the last is still in use gets a new array. Two frames are in flight
    at most (one stacked, the next read ahead), the reference's mosaic may be kept for good and a colour
    frame has two debayered copies (before and after its defects are replaced), so the pool keeps ``KEEP``
    arrays of each shape, about as many as are alive at a time anyway.
    """

    KEEP = 4

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._arrays: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 array of ``shape`` that nothing else refers to: a kept one, or a new one kept."""
        with self._lock:
            for array in self._arrays:
                # References: the list's, ``array``'s and getrefcount's argument.
                if array.shape == shape and sys.getrefcount(array) <= 3:
                    array.flags.writeable = True
                    return array
            fresh = np.empty(shape, dtype=np.float32)
            alike = [i for i, array in enumerate(self._arrays) if array.shape == shape]
            others = [i for i, array in enumerate(self._arrays)
                      if array.shape[:2] != shape[:2] and sys.getrefcount(array) <= 3]
            if len(alike) < self.keep:
                self._arrays.append(fresh)
            # Arrays of another size that nothing uses (the camera changed) are dropped.
            for i in reversed(others):
                del self._arrays[i]
            return fresh


class _FilterStack:
    """The accumulator and bookkeeping of one filter on the target's grid (owned by the Stacker)."""

    def __init__(self, name: str, acc: Accumulator, channels: int | None, stars: int, fwhm: float) -> None:
        self.name = name
        self.acc = acc
        self.channels = channels
        #: Star count and FWHM of this filter's first frame: later frames of the filter are judged against
        #: them, so a narrowband filter's fewer, fatter stars are not taken for clouds.
        self.stars = stars
        self.fwhm = fwhm
        #: The sky every frame of this filter is normalised to (its first frame's), and the running
        #: measures of its accepted frames (relative rejection).
        self.sky: Sky | None = None
        self.judge: Judge | None = None
        self.exptime = 0.0
        self.date_obs: datetime | None = None
        self.date_end: datetime | None = None
        #: Frames in the median's cube when it reached its disk budget and was folded into a kappa-sigma
        #: stack (None: never).
        self.folded_at: int | None = None
        #: The last frame's warped copy and footprint, which the stack did not keep: the next frame is
        #: warped into them (``Stacker._stack``).
        self.spare: tuple[np.ndarray, np.ndarray] | None = None

    def account(self, meta: FrameMeta) -> None:
        self.account_time(meta.time_utc, meta.exptime)

    def account_time(self, start: datetime | None, exptime: float | None) -> None:
        exptime = exptime or 0.0
        self.exptime += exptime
        if start is not None:
            end = start + timedelta(seconds=exptime)
            if self.date_obs is None or start < self.date_obs:
                self.date_obs = start
            if self.date_end is None or end > self.date_end:
                self.date_end = end


class Stacker:
    """Align frames of one target onto one reference grid and accumulate them, one stack per filter.

    The first frame committed that can be the reference (or the configured one) sets the grid: the daemon
    and ``livestack stack`` commit first the one chosen among the first frames (``choose_reference``,
    ``reference_first``). Every later frame, whatever
    its filter, is matched star to star onto the reference's stars, so the filters' stacks line up pixel
    for pixel without a second registration. A filter's first frame starts that filter's stack. With
    ``stack.method = "max"`` nothing is aligned: frames of one fixed camera are folded in as they are
    (star trails).

    Parameters
    ----------
    config : Config
        Uses the ``frames``, ``detect``, ``align`` and ``stack`` sections.
    workdir : Path, optional
        Folder for the median's on-disk cubes (required for ``method = "median"``).
    reuse : bool
        Read, debayer and warp each frame into arrays kept from the frames before (``_ReadBuffers``,
        ``_FilterStack.spare``) instead of new ones: the live daemon's choice, where frames come seconds
        apart and fresh memory costs page faults each time (on a virtual machine whose host takes freed
        memory back, 110-190 ms per 100 MB). A batch keeps its peak memory lower without (its frames come
        back to back, so freed memory is touched again at once, and the kept arrays would outlive the
        frames into the final picture).

    Notes
    -----
    Stacks are keyed by ``filter_key(FILTER)``. ``count``, ``exptime`` and ``rejected_fraction`` cover all
    filters; ``result``, ``coverage`` and ``info`` take a filter and default to the filter stacked last.
    """

    def __init__(self, config: Config, workdir: Path | None = None, reuse: bool = False) -> None:
        self.config = config
        self.workdir = workdir
        self.reuse = reuse
        a = config.align
        self._params = AlignParams(
            model="affine" if a.model == "affine" else "similarity", min_inliers=a.min_inliers,
            min_matched_fraction=a.min_matched_fraction, max_rms=a.max_rms, min_spread=a.min_spread,
            match_radius=a.match_radius, max_stars=a.max_stars, triangle_stars=a.triangle_stars,
            distortion="on" if a.distortion == "on" else "off" if a.distortion == "off" else "auto")
        self._bayer = config.frames.bayer_pattern or None
        self._max_pixels = round(config.frames.max_megapixels * 1e6)
        self._read_buffers = _ReadBuffers(_ReadBuffers.KEEP if reuse else 0)
        c = config.calibration
        self._library: MasterLibrary | None = (calibrate.read_library(config.path(c.masters))
                                               if c.masters else None)
        # Arrays derived from masters, by plan or master file: read once, shared read-only by every frame.
        self._master_cache: dict[object, Any] = {}
        # Defect candidates of the last accepted frames (frames' own defects), and the sensor they were on.
        self._candidates: deque[np.ndarray] = deque(maxlen=max(1, c.defect_frames - 1))
        self._candidates_sensor: tuple[tuple[int, int], str | None] | None = None
        #: How many stacked frames had each calibration (for the snapshots' HISTORY).
        self.calibrations: dict[str, int] = {}
        self._named_reference = config.path(a.reference) if a.reference else None
        self._aligns = config.stack.method not in UNALIGNED_METHODS
        self._ref_stars: Stars | None = None
        self._ref_meta: FrameMeta | None = None
        self._filters: dict[str, _FilterStack] = {}
        self._current: str | None = None
        self._last: Transform | None = None
        self._surface_params = surface.SurfaceParams(min_confidence=a.surface_min_confidence,
                                                     max_jump=a.surface_max_jump)
        self._path: str | None = None
        self._surface_ref: surface.SurfaceReference | None = None
        self._ref_luminance: np.ndarray | None = None
        self._sharpness_seen: list[float] = []
        #: The id of the last journaled removal this stack reflects (0: none); kept in its checkpoints, so
        #: that recovery knows which removals a crash interrupted.
        self.removals = 0
        # Median cubes folded into kappa-sigma stacks, still on disk until ``take_retired`` hands them over
        # (a checkpoint may still name them).
        self._retired: list[MedianStack] = []
        self._median_budget = round(config.stack.median_disk_budget * 1e9)

    # -- the two halves of a frame's work -------------------------------------------------------------

    def prepare(self, path: str | Path, searched: Searched | None = None) -> Prepared | FrameResult:
        """Read a frame and find its stars.

        Parameters
        ----------
        path : str or Path
        searched : Searched, optional
            An earlier search of this file: its stars, measures and defect candidates are taken as they are
            and only the pixels are read (and calibrated) again.

        Returns
        -------
        Prepared or FrameResult
            A rejected ``FrameResult`` when the file cannot be used as a frame.
        """
        t0 = time.perf_counter()
        try:
            raw = read_raw(path, bayer_pattern=self._bayer, max_pixels=self._max_pixels,
                           into=self._read_buffers.take)
        except FrameError as exc:
            return FrameResult(str(path), REJECTED, str(exc), None, None, None,
                               MappingProxyType({"read": time.perf_counter() - t0}))
        kind = calibrate.frame_kind(raw.meta.imagetyp)
        if kind != "light":
            return FrameResult(str(path), REJECTED,
                               f"IMAGETYP {raw.meta.imagetyp!r} marks a {kind} frame; calibration frames are "
                               "never stacked (make masters of them with livestack masters)", raw.meta, None,
                               None, MappingProxyType({"read": time.perf_counter() - t0}))
        t1 = time.perf_counter()
        try:
            raw, note, replaced, candidates = self._calibrate(raw, candidates=searched is None)
        except FrameError as exc:  # a master file that can no longer be read
            return FrameResult(str(path), REJECTED, f"calibration failed: {exc}", raw.meta, None, None,
                               MappingProxyType({"read": t1 - t0}))
        if searched is not None:
            candidates = searched.candidates
        frame = develop(raw, self._read_buffers.take)
        mosaic = None
        if candidates is not None and raw.meta.bayer is not None:
            # ``develop`` only read it: ``commit`` replaces the frames' defects in it (or in a copy) and
            # debayers again.
            mosaic = raw.mosaic
            mosaic.flags.writeable = False
        t2 = time.perf_counter()
        if searched is None:
            d = self.config.detect
            stars, quality = detect(frame.luminance, threshold=d.threshold, binning=d.binning,
                                    max_stars=d.max_stars)
            sky: Sky | None = normalise.measure_sky(frame.data, stars)
            searching = time.perf_counter() - t2
        else:
            stars, quality, sky, searching = searched.stars, searched.quality, searched.sky, searched.detect
        return Prepared(frame, stars, quality,
                        MappingProxyType({"read": t1 - t0, "calibrate": t2 - t1, "detect": searching}),
                        calibration=note, defects=replaced, candidates=candidates, mosaic=mosaic, sky=sky)

    def commit(self, prepared: Prepared | FrameResult, owned: bool = False) -> FrameResult:
        """Check, align, warp and accumulate a prepared frame into its filter's stack.

        Parameters
        ----------
        prepared : Prepared or FrameResult
            The output of ``prepare``; a rejection passes straight through.
        owned : bool
            The caller hands the frame over and never looks at its pixels again: the defects found in
            consecutive frames are replaced in the frame's own arrays instead of in a copy of them.

        Returns
        -------
        FrameResult
        """
        if isinstance(prepared, FrameResult):
            return prepared
        meta, quality = prepared.frame.meta, prepared.quality
        timings = dict(prepared.timings)

        sharp: float | None = None
        sky = prepared.sky.mean_level if prepared.sky is not None else None
        clarity: float | None = None

        def reject(reason: str) -> FrameResult:
            return FrameResult(meta.path, REJECTED, reason, meta, quality, None, MappingProxyType(timings),
                               sharpness=sharp, calibration=prepared.calibration, defects=prepared.defects,
                               sky=sky, transparency=clarity)

        if self._ref_meta is None and self._named_reference is not None:
            problem = self.use_reference(self._named_reference)
            if problem:
                return reject(f"the configured reference {self._named_reference} cannot be used: {problem}")
        if self._ref_meta is None:
            t0 = time.perf_counter()
            path, measured, problem = self._reference_choice(prepared)
            if measured is not None:
                timings["align"] = time.perf_counter() - t0
                sharp = measured.sharpness
            if problem:
                return reject(problem)
            self._set_reference(prepared, path, measured)
            transform = Transform.identity()
            is_reference = True
        elif self._path == "surface":
            problem = self._check_geometry(prepared)
            if problem:
                return reject(problem)
            t0 = time.perf_counter()
            found, sharp, problem = self._align_surface(prepared)
            timings["align"] = time.perf_counter() - t0
            if problem:
                return reject(problem)
            assert found is not None and found.transform is not None
            transform = found.transform
            is_reference = False
        else:
            problem = self._check_against_reference(prepared)
            if problem:
                return reject(problem)
            is_reference = False
            if self._aligns:
                t0 = time.perf_counter()
                assert self._ref_stars is not None
                outcome = align(self._ref_stars, prepared.stars, guess=self._last, params=self._params)
                timings["align"] = time.perf_counter() - t0
                if outcome.transform is None:
                    return reject(outcome.reason or "could not be aligned")
                transform = outcome.transform
            else:
                transform = Transform.identity()
        # Sky normalisation and relative rejection are for star fields: a surface's "sky" is the Moon.
        stars_path = self._path != "surface"
        if is_reference or not self._aligns or not stars_path:
            clarity = 1.0 if is_reference else float("nan")
        else:
            assert self._ref_stars is not None and self._ref_meta is not None
            clarity = normalise.transparency(self._ref_stars, prepared.stars, transform, meta.exptime,
                                             self._ref_meta.exptime)
        measures = Measures(quality.fwhm, quality.ellipticity, quality.stars, clarity,
                            float("nan") if sky is None else sky)
        existing = self._filters.get(filter_key(meta.filter))
        if (self.config.reject.relative and stars_path and existing is not None
                and existing.judge is not None):
            problem = existing.judge.judge(measures)
            if problem:
                return reject(problem)
        channel = self._filter_stack(prepared)
        norm = self._normalisation(channel, prepared, clarity) if stars_path else None
        data, defects, pixels = self._replace_frame_defects(prepared, timings, owned)
        self._stack(channel, data, transform, timings, norm)
        if stars_path:
            if channel.judge is None:
                channel.judge = self._new_judge()
            channel.judge.record(measures)
        self._last = transform
        channel.account(meta)
        self._current = channel.name
        if prepared.calibration is not None:
            self.calibrations[prepared.calibration] = self.calibrations.get(prepared.calibration, 0) + 1
        return FrameResult(meta.path, ACCEPTED, None, meta, quality, transform, MappingProxyType(timings),
                           is_reference, sharpness=sharp, calibration=prepared.calibration, defects=defects,
                           sky=sky, transparency=_finite_or_none(clarity),
                           weight=norm.weight if norm else 1.0, normalisation=norm, defect_pixels=pixels)

    def process(self, path: str | Path) -> FrameResult:
        """Prepare and commit one frame."""
        return self.commit(self.prepare(path))

    def stream(self, paths: Iterable[str | Path], executor: Executor | None = None,
               found: dict[Any, Prepared | Searched | FrameResult] | None = None) -> Iterator[FrameResult]:
        """Process files in order, reading and detecting the next frame while this one is stacked.

        The frames are this method's own: their defects are replaced in place (``commit(owned=True)``), and
        work a frame leaves for later is done before its result is yielded (``settle``).

        Parameters
        ----------
        paths : iterable of str or Path
        executor : Executor, optional
            Where ``prepare`` runs ahead (a one-thread pool is enough). The stages that overlap release
            the GIL (OpenCV's warp, the numba accumulators), so two cores do both at once. Without one,
            frames are processed one after the other.
        found : dict, optional
            What is already known of some paths (``reference_first`` fills it): a whole preparation or a
            verdict is used as it is, a ``Searched`` spares the search for stars. Entries are taken out as
            they are used.

        Yields
        ------
        FrameResult
            One per path, in order.
        """
        known = found if found is not None else {}

        def start(path: str | Path) -> Future[Prepared | FrameResult]:
            earlier = known.pop(path, None)
            if isinstance(earlier, (Prepared, FrameResult)):
                done: Future[Prepared | FrameResult] = Future()
                done.set_result(earlier)
                return done
            if executor is None:
                done = Future()
                done.set_result(self.prepare(path, earlier))
                return done
            return executor.submit(self.prepare, path, earlier)

        # After each commit the frame is let go (its future too), then a kappa-sigma warm-up that frame filled
        # is judged (``settle``): with no frame in hand here, rather than by the next frame's add beside that
        # frame and its warped copy (the same stack either way).
        if executor is None:
            for path in paths:
                result = self.commit(start(path).result(), owned=True)
                self.settle()
                yield result
            return
        ahead: Future[Prepared | FrameResult] | None = None
        for path in paths:
            upcoming = start(path)
            if ahead is not None:
                result = self.commit(ahead.result(), owned=True)
                ahead = None
                self.settle()
                yield result
            ahead = upcoming
        if ahead is not None:
            result = self.commit(ahead.result(), owned=True)
            ahead = None
            self.settle()
            yield result

    # -- frames whose transform is known (replay, removal, re-integration, restack) -----------------------

    def warp_known(self, path: str | Path, matrix: np.ndarray | Sequence[float],
                   facts: Mapping[str, Any] | None = None) -> tuple[Frame, np.ndarray, np.ndarray]:
        """Read a frame as ``prepare`` does and warp it onto the reference with a known transform.

        The matching masters and the master dark's defects are applied again (they depend on the file and
        the library alone); the defects found from consecutive frames and the sky normalisation are taken
        from the frame's journaled facts (they depended on the frames around it).

        Parameters
        ----------
        path : str or Path
        matrix : array-like
            The frame's 2x3 transform (or its 6 numbers, row-major), as journaled when it was stacked.
        facts : Mapping, optional
            The frame's journaled facts (``frame_facts``): its normalisation, replaced defects and distortion
            correction.

        Returns
        -------
        frame : Frame
        aligned : ndarray
        footprint : ndarray

        Raises
        ------
        FrameError
            When the file cannot be read, or does not fit the stack's grid (or its filter's stack).
        StateError
            Before the stack has a reference.
        """
        if self._ref_meta is None:
            raise StateError("the stack has no reference yet: a known transform has nothing to map onto")
        raw, _, _, _ = self._calibrate(read_raw(path, bayer_pattern=self._bayer), candidates=False)
        pixels = (facts or {}).get("defect_pixels")
        if pixels:
            calibrate.replace_defects(raw.mosaic, np.asarray(pixels, dtype=np.int64), raw.meta.bayer)
            raw = dataclasses.replace(raw, integral=False)
        frame = develop(raw)
        channels = frame.data.shape[2] if frame.is_color else None
        stack = self._filters.get(filter_key(frame.meta.filter))
        expected = stack.channels if stack is not None else channels
        if frame.meta.shape != self._ref_meta.shape or channels != expected:
            raise FrameError(f"{path} no longer fits the stack: it is {frame.data.shape}, the stack "
                             f"{self._ref_meta.shape} with {expected or 1} channel(s)")
        m = np.asarray(matrix, dtype=np.float64).reshape(2, 3)
        if not self._aligns:
            aligned, footprint = np.array(frame.data), np.ones(self._ref_meta.shape, dtype=bool)
        else:
            aligned, footprint = warp(frame.data, m, self._ref_meta.shape, self.config.align.interpolation,
                                      distortion_from_facts(facts))
        norm = normalisation_from_facts(facts)
        if norm is not None:
            normalise.apply(aligned, norm)
        return frame, aligned, footprint

    def add_known(self, path: str | Path, matrix: np.ndarray | Sequence[float],
                  weight: float = 1.0, facts: Mapping[str, Any] | None = None) -> FrameMeta:
        """Stack a frame with a known transform into its filter's stack, without aligning it again.

        Parameters
        ----------
        path : str or Path
        matrix : array-like
            2x3 or 6 numbers, frame -> reference.
        weight : float
        facts : Mapping, optional
            The frame's journaled facts, as for ``warp_known``.

        Returns
        -------
        FrameMeta

        Raises
        ------
        FrameError, StateError
            As ``warp_known``.
        """
        frame, aligned, footprint = self.warp_known(path, matrix, facts)
        stack = self._filters.get(filter_key(frame.meta.filter))
        if stack is None:
            # No star count or FWHM measured here: later frames of this filter are judged from the next
            # one measured (a count of 0 judges nothing).
            channels = frame.data.shape[2] if frame.is_color else None
            stack = _FilterStack(filter_key(frame.meta.filter), self._new_accumulator(frame.data.shape),
                                 channels, 0, float("nan"))
            self._filters[stack.name] = stack
        self._add(stack, aligned, footprint, weight)
        stack.account(frame.meta)
        self._current = stack.name
        return frame.meta

    def subtract_known(self, path: str | Path, matrix: np.ndarray | Sequence[float],
                       weight: float = 1.0, facts: Mapping[str, Any] | None = None) -> FrameMeta:
        """Take a frame back out of its filter's mean stack: the exact inverse of ``add_known``/``commit``.

        The caller checks first that the file is the one stacked (its content hash).

        Raises
        ------
        StateError
            When the method has no exact inverse (kappa-sigma, median: re-integrate instead), or the frame's
            filter has no stack.
        FrameError
            As ``warp_known``.
        """
        frame, aligned, footprint = self.warp_known(path, matrix, facts)
        stack = self._filters.get(filter_key(frame.meta.filter))
        if stack is None:
            raise StateError(f"there is no {filter_key(frame.meta.filter) or 'unfiltered'} stack to take "
                             f"{path} out of")
        subtract = getattr(stack.acc, "subtract", None)
        if subtract is None:
            raise StateError(f"a {self.method} stack cannot take a frame back out; it is re-integrated")
        subtract(aligned, footprint, weight)
        stack.exptime = max(0.0, stack.exptime - (frame.meta.exptime or 0.0))
        return frame.meta

    def recount(self, frames: Iterable[tuple[Any, ...]]) -> None:
        """Total exposure and time span again from the frames in the stack (after a removal).

        Parameters
        ----------
        frames : iterable of tuples
            ``(start, exptime)`` or ``(start, exptime, filter)`` of every frame in the stack: start UTC,
            exposure seconds, the header's FILTER. Without a filter, a frame counts for the filter stacked
            last.
        """
        for stack in self._filters.values():
            stack.exptime = 0.0
            stack.date_obs = stack.date_end = None
        for item in frames:
            name = filter_key(item[2]) if len(item) > 2 else self._current
            target = self._filters.get(name or "")
            if target is not None:
                target.account_time(item[0], item[1])

    def fork(self, workdir: Path | None = None) -> Stacker:
        """Empty stacks on the same reference and grid, one per filter (for a re-integration beside this one).

        Parameters
        ----------
        workdir : Path, optional
            The new stacks' folder for median cubes (default: this one's).

        Returns
        -------
        Stacker
        """
        twin = Stacker(self.config, workdir=workdir if workdir is not None else self.workdir,
                       reuse=self.reuse)
        twin._ref_stars, twin._ref_meta, twin._last = self._ref_stars, self._ref_meta, self._last
        twin._path, twin._surface_ref = self._path, self._surface_ref
        twin._ref_luminance = self._ref_luminance
        twin._sharpness_seen = list(self._sharpness_seen)
        assert self._ref_meta is not None or not self._filters
        for name, stack in self._filters.items():
            shape = stack.acc.coverage.shape + (() if stack.channels is None else (stack.channels,))
            twin._filters[name] = _FilterStack(name, twin._new_accumulator(shape), stack.channels,
                                               stack.stars, stack.fwhm)
        twin._current = self._current
        twin.removals = self.removals
        return twin

    @property
    def reference_stars(self) -> Stars | None:
        """The reference frame's stars, once there is a reference."""
        return self._ref_stars

    def use_wcs(self, wcs_header: str) -> None:
        """Give the reference (and so every snapshot of this target) a WCS found after the fact.

        Parameters
        ----------
        wcs_header : str
            Celestial WCS cards for the reference frame's pixels (a plate solution).
        """
        if self._ref_meta is not None:
            self._ref_meta = replace(self._ref_meta, wcs_header=wcs_header)

    def use_reference(self, path: str | Path) -> str | None:
        """Start new, empty stacks (every filter's) aligned onto the given frame.

        The reference frame itself is not added; it is stacked like any other when it is processed.

        Parameters
        ----------
        path : str or Path

        Returns
        -------
        str or None
            None on success, else why the frame cannot be the reference.
        """
        prepared = self.prepare(path)
        if isinstance(prepared, FrameResult):
            return prepared.reason
        kind, measured, problem = self._reference_choice(prepared)
        if problem:
            return problem
        self.discard()
        self._set_reference(prepared, kind, measured)
        return None

    @property
    def chooses_reference(self) -> bool:
        """Whether this stack's reference is still to be chosen among its first frames (none named yet)."""
        return self._ref_meta is None and self._named_reference is None and self._aligns

    def reference_candidate(self, prepared: Prepared | FrameResult) -> ReferenceCandidate | None:
        """How a prepared frame would serve as this stack's reference; None for a rejected one.

        Uses only the configuration (any thread, like ``prepare``).
        """
        if isinstance(prepared, FrameResult):
            return None
        kind, _, problem = self._reference_choice(prepared)
        return ReferenceCandidate(prepared.quality.stars, float(prepared.quality.fwhm), kind, problem)

    # -- the stacks -----------------------------------------------------------------------------------

    @property
    def filters(self) -> tuple[str, ...]:
        """The filters with a stack, in the order their first frame arrived."""
        return tuple(self._filters)

    @property
    def current_filter(self) -> str | None:
        """The filter of the frame stacked last (None before the first)."""
        return self._current

    def summary(self) -> tuple[FilterSummary, ...]:
        """Frames and exposure of each filter's stack, in the order of ``filters``."""
        return tuple(FilterSummary(f.name, f.acc.count, f.exptime) for f in self._filters.values())

    @property
    def count(self) -> int:
        """Frames in the stacks, all filters together."""
        return sum(f.acc.count for f in self._filters.values())

    @property
    def exptime(self) -> float:
        """Total exposure of the stacked frames, all filters together, seconds."""
        return sum(f.exptime for f in self._filters.values())

    @property
    def path(self) -> str | None:
        """``"stars"`` or ``"surface"``: how this target's frames are aligned (None before the reference)."""
        return self._path

    @property
    def method(self) -> str:
        return self.config.stack.method

    @property
    def method_in_use(self) -> str:
        """``method``, or what a median became when it reached its disk budget (for people: status, FITS)."""
        if any(stack.folded_at is not None for stack in self._filters.values()):
            return f"{self.method}, then kappa-sigma (disk budget)"
        return self.method

    @property
    def reference_meta(self) -> FrameMeta | None:
        """Metadata of the reference frame, once there is one."""
        return self._ref_meta

    @property
    def rejected_fraction(self) -> float:
        """Samples rejected over samples offered (the frame-weighted mean over the filters' stacks)."""
        total = self.count
        if total == 0:
            return 0.0
        return sum(f.acc.rejected_fraction * f.acc.count for f in self._filters.values()) / total

    def count_of(self, filter: str | None = None) -> int:
        """Frames in one filter's stack (default: the filter stacked last); 0 for a filter never seen."""
        stack = self._pick(filter)
        return 0 if stack is None else stack.acc.count

    def result(self, filter: str | None = None) -> np.ndarray | None:
        """One filter's stack so far (float32, NaN where no frame covered), or None before its first frame.

        Parameters
        ----------
        filter : str, optional
            A name from ``filters``; default the filter stacked last.
        """
        stack = self._pick(filter)
        return None if stack is None else stack.acc.result()

    def result_later(self, filter: str | None = None, side: int = 0,
                     into: Callable[[tuple[int, ...]], np.ndarray] | None = None,
                     ) -> Callable[[], np.ndarray] | None:
        """``result`` in two steps: what this returns gives the stack as it is now when called, and may be
        called while frames are added (a kappa-sigma warm-up's robust combination, the costly part, is done
        then); None before the filter's first frame.

        Parameters
        ----------
        filter : str, optional
            A name from ``filters``; default the filter stacked last.
        side : int
            For a picture whose longest side is ``side`` pixels: the stack made smaller by the largest
            whole step that keeps it at least that long, each pixel a block's mean (0: the stack itself).
            The stack is never made whole for it, which at 26 MP is most of a preview's cost.
        into : callable, optional
            Given the whole stack's shape, the float32 array to write it in (a buffer the caller keeps:
            see ``Accumulator.result_later``).
        """
        stack = self._pick(filter)
        if stack is None:
            return None
        step = max(1, max(stack.acc.coverage.shape) // side) if side > 0 else 1
        return stack.acc.result_later(step, into=into)

    def sample_later(self, filter: str | None = None) -> Callable[[], np.ndarray] | None:
        """The pixels of one filter's stack that ``snr`` samples, in two steps as ``result_later``: every
        ``k``-th pixel of every ``k``-th row, ``k`` chosen for about ``_SNR_SAMPLE`` of them; None before
        the filter's first frame. ``snr`` of this is ``snr`` of the whole stack."""
        stack = self._pick(filter)
        if stack is None:
            return None
        return stack.acc.result_later(_sample_step(stack.acc.coverage.size), sample=True)

    def coverage(self, filter: str | None = None) -> np.ndarray | None:
        """Frames per pixel of one filter's stack (default: the filter stacked last), or None."""
        stack = self._pick(filter)
        return None if stack is None else stack.acc.coverage

    def info(self, filter: str | None = None, coverage: bool = True) -> StackInfo:
        """Header facts for a snapshot of one filter's stack (default: the filter stacked last).

        Parameters
        ----------
        filter : str, optional
        coverage : bool
            Include a copy of the stack's coverage (the snapshot's ``COVERAGE`` extension); it costs a copy
            of an int32 image, so leave it out where no snapshot is written.
        """
        ref = self._ref_meta
        stack = self._pick(filter)
        blank = self.config.output.blank
        if stack is None:
            return StackInfo(ncombine=0, exptime=0.0, date_obs=None, date_end=None, method=self.method_in_use,
                             object=ref.object if ref else None, filter=None,
                             wcs_header=ref.wcs_header if ref else None, reference=ref.path if ref else None,
                             history=self._history(), blank=blank)
        return StackInfo(ncombine=stack.acc.count, exptime=stack.exptime, date_obs=stack.date_obs,
                         date_end=stack.date_end, method=self.method_in_use,
                         object=ref.object if ref else None, filter=stack.name or None,
                         wcs_header=ref.wcs_header if ref else None, reference=ref.path if ref else None,
                         history=self._history(), blank=blank,
                         coverage=np.array(stack.acc.coverage) if coverage else None)

    def _history(self) -> tuple[str, ...]:
        """HISTORY lines of a snapshot: each calibration the frames had (how many had it), a median folded."""
        def note(stack: _FilterStack) -> str:
            of = f" of {stack.name}" if stack.name else ""
            if not stack.folded_at:
                return f"median disk budget{of} cannot hold one frame: stacked as kappa-sigma from the start"
            return (f"median disk budget reached at {stack.folded_at} frames{of}: went on as kappa-sigma "
                    "over every frame")

        folded = tuple(note(stack) for stack in self._filters.values() if stack.folded_at is not None)
        return tuple(f"calibration of {n} frame{'s' if n != 1 else ''}: {note}"
                     for note, n in self.calibrations.items()) + folded

    def settle(self) -> bool:
        """Do the work a frame left for later: a kappa-sigma warm-up filled by the last frame is judged.

        The stack is the same with or without it (the next frame does it otherwise); a live caller calls it
        after the frame's verdict has gone out, so that the warm-up's end does not delay that verdict.
        True when there was such work (the rejected fraction has changed).
        """
        return any([stack.acc.settle() for stack in self._filters.values()])

    @property
    def settled(self) -> bool:
        """False while ``settle`` has work to do."""
        return all(stack.acc.settled for stack in self._filters.values())

    def results(self) -> dict[str, np.ndarray]:
        """Every filter's stack so far (float32 copies), by filter, in the order of ``filters``."""
        return {name: stack.acc.result() for name, stack in self._filters.items()}

    def snr(self, image: np.ndarray | None = None) -> float | None:
        """A robust signal-to-noise estimate of a stack (default: the filter stacked last).

        The 99.5th percentile above the median sky, over the sky noise (1.4826 x MAD), on the luminance of a
        pixel sample: it grows as the square root of the frames for a well-behaved stack.

        Parameters
        ----------
        image : ndarray, optional
            The stack, if the caller already has it (saves computing it again), or what ``sample_later``
            gave (the same figure).

        Returns
        -------
        float or None
            None before the first frame or when the noise cannot be measured.
        """
        if image is None:
            image = self.result()
        if image is None:
            return None
        step = _sample_step(image.shape[0] * image.shape[1])
        sample = image[::step, ::step]
        if sample.ndim == 3:
            sample = sample.mean(axis=2)
        sample = sample[np.isfinite(sample)]
        if sample.size < 100:
            return None
        med = float(np.median(sample))
        noise = 1.4826 * float(np.median(np.abs(sample - med)))
        if noise <= 0:
            return None
        return float((np.percentile(sample, 99.5) - med) / noise)

    def discard(self) -> None:
        """Release what the stacks keep on disk (the median's cubes) and forget them."""
        for retired in self.take_retired():
            retired.discard()
        for stack in self._filters.values():
            release = getattr(stack.acc, "discard", None)
            if release is not None:
                release()
        self._filters = {}
        self._current = None

    # -- checkpoints ----------------------------------------------------------------------------------

    def checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Everything needed to resume: arrays and a JSON-able dictionary.

        Returns
        -------
        arrays : dict of ndarray
            ``ref_*`` (the reference's stars), ``last_matrix``, and ``f<i>_<key>`` for the state of the
            ``i``-th filter's accumulator.
        meta : dict
        """
        if self._ref_meta is None or self._ref_stars is None:
            return {}, {"empty": True, "removals": self.removals}
        arrays: dict[str, np.ndarray] = {}
        filters: list[dict[str, Any]] = []
        for i, stack in enumerate(self._filters.values()):
            # Text entries of an accumulator's state (its method, a cube's file name) travel in ``meta``:
            # the arrays hold numbers only.
            text: dict[str, str] = {}
            for k, v in stack.acc.state().items():
                if v.dtype.kind in "US":
                    text[k] = str(v)
                else:
                    arrays[f"f{i}_{k}"] = v
            filters.append({"name": stack.name, "channels": stack.channels, "stars": stack.stars,
                            "fwhm": _finite_or_none(stack.fwhm), "exptime": stack.exptime,
                            "date_obs": _iso(stack.date_obs),
                            "date_end": _iso(stack.date_end), "acc_text": text,
                            "sky": None if stack.sky is None else [list(stack.sky.level),
                                                                   list(stack.sky.noise)],
                            "judge": None if stack.judge is None else stack.judge.state(),
                            "method": stack.acc.method, "folded_at": stack.folded_at})
        s = self._ref_stars
        for name in _STAR_FIELDS:
            arrays[f"ref_{name}"] = getattr(s, name)
        if self._last is not None:
            arrays["last_matrix"] = self._last.matrix
        for i, candidates in enumerate(self._candidates):
            arrays[f"candidates_{i}"] = candidates
        if self._ref_luminance is not None:
            arrays["surface_reference"] = self._ref_luminance
            arrays["surface_sharpness"] = np.asarray(self._sharpness_seen, dtype=np.float64)
        m = self._ref_meta
        meta = {
            "empty": False, "method": self.method, "filters": filters, "current": self._current,
            "path": self._path or "stars",
            "removals": self.removals,
            "ref": {"path": m.path, "shape": list(m.shape), "time_utc": _iso(m.time_utc),
                    "exptime": m.exptime, "filter": m.filter, "object": m.object, "imagetyp": m.imagetyp,
                    "bayer": m.bayer, "wcs_header": m.wcs_header},
            "candidates_sensor": (None if self._candidates_sensor is None else
                                  [self._candidates_sensor[0], self._candidates_sensor[1]]),
            "calibrations": dict(self.calibrations),
        }
        return arrays, meta

    def restore(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Resume from ``checkpoint()``'s output.

        Raises
        ------
        StateError
            When the checkpoint was made with another stacking method, or by a version that kept one
            stack per target.
        """
        self.removals = int(meta.get("removals", 0))
        if meta.get("empty", True):
            return
        if meta["method"] != self.method:
            raise StateError(f"the checkpoint holds a {meta['method']} stack but the configuration asks "
                             f"for {self.method}; use a new state folder or the same method")
        if "filters" not in meta:
            raise StateError("the checkpoint was written by a version without per-filter stacks; use a new "
                             "state folder")
        r = meta["ref"]
        self._ref_meta = FrameMeta(path=r["path"], shape=(int(r["shape"][0]), int(r["shape"][1])),
                                   time_utc=_parse_iso(r["time_utc"]), exptime=r["exptime"],
                                   filter=r["filter"], object=r["object"], imagetyp=r["imagetyp"],
                                   bayer=r["bayer"], wcs_header=r["wcs_header"])
        ref_arrays = {name: _readonly(np.asarray(arrays[f"ref_{name}"])) for name in _STAR_FIELDS}
        self._ref_stars = Stars(shape=self._ref_meta.shape, **ref_arrays)
        self._filters = {}
        for i, entry in enumerate(meta["filters"]):
            channels = entry["channels"]
            shape = (*self._ref_meta.shape, *([int(channels)] if channels else []))
            # A median folded into kappa-sigma at its disk budget is restored as what it became.
            acc = self._new_accumulator(shape, entry.get("method"))
            prefix = f"f{i}_"
            state = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            state.update({k: np.array(v) for k, v in entry["acc_text"].items()})
            acc.restore(state)
            stack = _FilterStack(entry["name"], acc, channels, int(entry["stars"]),
                                 math.nan if entry["fwhm"] is None else float(entry["fwhm"]))
            stack.exptime = float(entry["exptime"])
            stack.date_obs = _parse_iso(entry["date_obs"])
            stack.date_end = _parse_iso(entry["date_end"])
            stack.folded_at = entry.get("folded_at")
            if entry.get("sky") is not None:
                level, noise = entry["sky"]
                stack.sky = Sky(tuple(float(v) for v in level), tuple(float(v) for v in noise))
            if entry.get("judge") is not None:
                stack.judge = self._new_judge()
                stack.judge.restore(entry["judge"])
            self._filters[stack.name] = stack
        self._current = meta.get("current")
        self._path = str(meta.get("path", "stars"))
        if self._path == "surface":
            self._set_surface_reference(np.asarray(arrays["surface_reference"], dtype=np.float32), None)
            self._sharpness_seen = [float(v) for v in np.asarray(arrays["surface_sharpness"])]
        if "last_matrix" in arrays:
            self._last = Transform.from_matrix(arrays["last_matrix"], "restored")
        self._candidates.clear()
        for i in range(self._candidates.maxlen or 0):
            if f"candidates_{i}" in arrays:
                self._candidates.append(np.asarray(arrays[f"candidates_{i}"], dtype=np.int64))
        sensor = meta.get("candidates_sensor")
        self._candidates_sensor = (None if sensor is None
                                   else ((int(sensor[0][0]), int(sensor[0][1])), sensor[1]))
        self.calibrations = {str(k): int(v) for k, v in meta.get("calibrations", {}).items()}

    @property
    def has_reference(self) -> bool:
        return self._ref_meta is not None

    # -- private --------------------------------------------------------------------------------------

    def _pick(self, filter: str | None) -> _FilterStack | None:
        name = self._current if filter is None else filter
        return None if name is None else self._filters.get(name)

    def _reference_choice(self, prepared: Prepared) -> tuple[str, surface.SurfaceFrame | None, str | None]:
        """How a frame would be the reference: ``(path, its surface measure, problem)``."""
        if not self._aligns:
            return "stars", None, None
        mode = self.config.align.mode
        needed = max(self.config.align.reference_min_stars, self._params.min_inliers)
        star_problem = None
        if prepared.quality.stars < needed:
            star_problem = _too_few_stars(prepared.quality.stars, needed, "to become the reference")
        if mode == "stars" or (mode == "auto" and star_problem is None):
            return "stars", None, star_problem
        measured = surface.measure(prepared.frame.luminance, params=self._surface_params)
        if measured.detail < self._surface_params.min_detail:
            problem = (f"too little surface detail to align on (detail {measured.detail:.2f}, at least "
                       f"{self._surface_params.min_detail:g} needed to become the reference)")
            return "surface", measured, problem if mode == "surface" else f"{star_problem}; {problem}"
        return "surface", measured, None

    def _set_surface_reference(self, luminance: np.ndarray, measured: surface.SurfaceFrame | None) -> None:
        if measured is None:
            measured = surface.measure(luminance, params=self._surface_params)
        luminance = np.array(luminance, dtype=np.float32)
        luminance.flags.writeable = False
        self._ref_luminance = luminance
        self._surface_ref = surface.reference(measured, params=self._surface_params)

    def _align_surface(self, prepared: Prepared) -> tuple[surface.SurfaceAlignment | None, float | None,
                                                           str | None]:
        """Register a frame on the surface: ``(outcome, sharpness, problem)``."""
        ref = self._surface_ref
        assert ref is not None
        measured = surface.measure(prepared.frame.luminance, defects=ref.frame.spikes,
                                   params=self._surface_params)
        sharp = measured.sharpness
        self._sharpness_seen.append(sharp)
        keep = self.config.align.keep_sharpest
        if keep < 100.0 and len(self._sharpness_seen) > SHARPEST_WARMUP:
            threshold = float(np.percentile(self._sharpness_seen, 100.0 - keep))
            if sharp < threshold:
                return None, sharp, (f"sharpness {sharp:.3g} is under the sharpest {keep:g}% of the "
                                     f"{len(self._sharpness_seen)} frames seen ({threshold:.3g})")
        previous = () if self._last is None else (self._last,)
        outcome = surface.register(ref, measured, guess=self._last, previous=previous,
                                   params=self._surface_params)
        if outcome.transform is None:
            return outcome, sharp, outcome.reason or "could not be aligned on the surface"
        return outcome, sharp, None

    def _set_reference(self, prepared: Prepared, path: str = "stars",
                       measured: surface.SurfaceFrame | None = None) -> None:
        self._path = path
        self._surface_ref = None
        self._ref_luminance = None
        self._sharpness_seen = []
        if path == "surface":
            self._set_surface_reference(prepared.frame.luminance, measured)
            if measured is not None:
                self._sharpness_seen.append(measured.sharpness)
        self._ref_stars = prepared.stars
        self._ref_meta = prepared.frame.meta
        self._last = None

    def _filter_stack(self, prepared: Prepared) -> _FilterStack:
        """The frame's filter's stack, started on the target's grid with this frame if it is the first."""
        name = filter_key(prepared.frame.meta.filter)
        stack = self._filters.get(name)
        if stack is None:
            shape = prepared.frame.data.shape
            channels = shape[2] if len(shape) == 3 else None
            stack = _FilterStack(name, self._new_accumulator(shape), channels, prepared.quality.stars,
                                 prepared.quality.fwhm)
            self._filters[name] = stack
        return stack

    def _new_accumulator(self, shape: tuple[int, ...], method: str | None = None) -> Accumulator:
        s = self.config.stack
        return make_accumulator(method or s.method, shape, kappa=s.kappa, warmup=s.warmup,
                                directory=self.workdir)

    def _add(self, stack: _FilterStack, aligned: np.ndarray, footprint: np.ndarray, weight: float,
             owned: bool = False) -> None:
        """Accumulate a warped frame, folding a median that would pass its disk budget into kappa-sigma."""
        acc = stack.acc
        if (isinstance(acc, MedianStack) and self._median_budget > 0
                and (acc.count + 1) * acc.frame_bytes > self._median_budget):
            self._fold_median(stack, acc)
        stack.acc.add(aligned, footprint, weight, owned=owned)

    def _fold_median(self, stack: _FilterStack, median: MedianStack) -> None:
        """Go on as kappa-sigma over every frame: the cube's frames first, equally weighted as in the median.

        The cube holds each frame as it was added (warped, normalised, NaN where not valid), so the folded
        stack is the kappa-sigma stack of the same frames, unweighted. The cube is not deleted here: a
        checkpoint may name it until the next one is saved (``take_retired``).
        """
        shape = stack.acc.coverage.shape + (() if stack.channels is None else (stack.channels,))
        folded = self._new_accumulator(shape, "kappa-sigma")
        for frame in median.frames():
            valid = np.isfinite(frame) if frame.ndim == 2 else np.isfinite(frame).all(axis=2)
            folded.add(frame, valid, 1.0)
        stack.acc = folded
        stack.folded_at = median.count
        self._retired.append(median)
        budget = self.config.stack.median_disk_budget
        where = " ".join(p for p in (self._ref_meta.object if self._ref_meta else None, stack.name) if p)
        of = f" of {where}" if where else ""
        if median.count == 0:
            log.warning("the disk budget of the median stack%s, %g GB ([stack] median_disk_budget), cannot "
                        "hold one frame (%.1f MB): stacking as kappa-sigma from the start", of, budget,
                        median.frame_bytes / 1e6)
        else:
            log.warning("the median stack%s reached its disk budget of %g GB ([stack] median_disk_budget; "
                        "%.1f MB a frame) at %d frames: it goes on as kappa-sigma over every frame, those %d "
                        "included, and its cube is deleted", of, budget, median.frame_bytes / 1e6,
                        median.count, median.count)

    def take_retired(self) -> list[MedianStack]:
        """Median cubes folded into kappa-sigma since the last call: the caller discards each once no
        checkpoint it keeps names it any more."""
        retired, self._retired = self._retired, []
        return retired

    def _check_geometry(self, prepared: Prepared) -> str | None:
        """A frame's size and colour against the reference's and its filter's stack."""
        ref = self._ref_meta
        assert ref is not None
        meta = prepared.frame.meta
        if meta.shape != ref.shape:
            return (f"frame is {meta.shape[0]}x{meta.shape[1]} (rows x columns) but the stack is "
                    f"{ref.shape[0]}x{ref.shape[1]}")
        name = filter_key(meta.filter)
        stack = self._filters.get(name)
        channels = prepared.frame.data.shape[2] if prepared.frame.is_color else None
        if stack is not None and channels != stack.channels:
            kind = "colour" if channels else "mono"
            label = f"the {name} stack" if name else "the stack"
            return f"frame is {kind} but {label} is {'mono' if channels else 'colour'}"
        return None

    def _check_against_reference(self, prepared: Prepared) -> str | None:
        problem = self._check_geometry(prepared)
        if problem or not self._aligns:
            return problem
        quality = prepared.quality
        name = filter_key(prepared.frame.meta.filter)
        stack = self._filters.get(name)
        if quality.stars < self._params.min_inliers:
            return _too_few_stars(quality.stars, self._params.min_inliers, "to be aligned")
        if stack is None:
            # A filter's first frame sets the star count and FWHM its later frames are judged by.
            return _judge_shape(quality, self.config.align.max_ellipticity)
        a = self.config.align
        if quality.stars < a.min_star_fraction * stack.stars:
            return (f"only {quality.stars} stars found, under {a.min_star_fraction:g} x the "
                    f"{_first_of(name)}'s {stack.stars} (clouds or dew)")
        if (a.max_fwhm_factor > 0 and np.isfinite(stack.fwhm) and np.isfinite(quality.fwhm)
                and quality.fwhm > a.max_fwhm_factor * stack.fwhm):
            return (f"stars are blurred: FWHM {quality.fwhm:.2f} px is over {a.max_fwhm_factor:g} x the "
                    f"{_first_of(name)}'s {stack.fwhm:.2f} px (clouds, focus or seeing)")
        return _judge_shape(quality, a.max_ellipticity)

    def _stack(self, stack: _FilterStack, data: np.ndarray, transform: Transform,
               timings: dict[str, float], norm: Normalisation | None = None) -> None:
        assert self._ref_meta is not None
        t0 = time.perf_counter()
        # With ``reuse``, once the stack keeps no frame of its own, each frame is warped into the arrays of
        # the one before (see the class).
        recycle = self.reuse and not stack.acc.keeps_frames
        if self._aligns:
            aligned, footprint = warp(data, transform.matrix, self._ref_meta.shape,
                                      self.config.align.interpolation, transform.distortion,
                                      out=stack.spare if recycle else None)
        else:
            aligned, footprint = data, np.ones(self._ref_meta.shape, dtype=bool)
        t1 = time.perf_counter()
        if norm is not None and not norm.identity:
            if not aligned.flags.writeable:
                aligned = np.array(aligned)
            normalise.apply(aligned, norm)
        t2 = time.perf_counter()
        # A warped or normalised copy is this frame's alone: the stack may keep it (kappa-sigma's warm-up),
        # unless it is to be warped into again.
        own = aligned is not data
        self._add(stack, aligned, footprint, norm.weight if norm is not None else 1.0, own and not recycle)
        stack.spare = (aligned, footprint) if own and recycle and aligned.flags.writeable else None
        t3 = time.perf_counter()
        timings["warp"] = t1 - t0
        timings["normalise"] = t2 - t1
        timings["stack"] = t3 - t2

    def _normalisation(self, stack: _FilterStack, prepared: Prepared, clarity: float) -> Normalisation | None:
        """How this frame is brought onto its filter's sky (the filter's first frame sets it)."""
        if prepared.sky is None:
            return None
        if stack.sky is None:
            stack.sky = prepared.sky
        s = self.config.stack
        exptime = prepared.frame.meta.exptime
        ref_exptime = self._ref_meta.exptime if self._ref_meta is not None else None
        ratio = exptime / ref_exptime if exptime and ref_exptime else 1.0
        return normalise.normalisation(prepared.sky, stack.sky, mode=s.normalise, weights=s.weights,
                                       transparency=clarity, exposure_ratio=ratio)

    def _new_judge(self) -> Judge:
        r = self.config.reject
        return Judge(warmup=r.warmup, kappa=r.kappa, window=r.window)

    def _calibrate(self, raw: RawFrame,
                   candidates: bool = True) -> tuple[RawFrame, str | None, int, np.ndarray | None]:
        """Masters and the master dark's defects on the raw mosaic; this frame's defect candidates.

        Returns the (possibly calibrated) raw frame, the calibration note, the pixels replaced and the
        candidates (None unless defects come from the frames and ``candidates`` is asked for).
        """
        c = self.config.calibration
        note: str | None = None
        plan = None
        if self._library is not None:
            plan = calibrate.match(raw.meta, self._library, c.temperature_tolerance)
            note = plan.describe()
            if plan.used:
                found = plan
                offset, gain = self._cached(("arrays", plan.key),
                                            lambda: (found.offset(self._load), found.gain(self._load)))
                calibrate.apply(raw.mosaic, offset, gain)
                raw = dataclasses.replace(raw, integral=False)
        replaced = 0
        from_dark = plan is not None and plan.dark is not None and c.defects in ("auto", "dark")
        if plan is not None and from_dark:
            chosen = plan
            defects = self._cached(("defects", plan.key), lambda: self._master_defects(chosen))
            replaced = calibrate.replace_defects(raw.mosaic, defects, raw.meta.bayer)
        found_candidates = None
        if candidates and (c.defects == "frames" or (c.defects == "auto" and not from_dark)):
            found_candidates = calibrate.defect_candidates(raw.mosaic, raw.meta.bayer, c.defect_sigma)
        return raw, note, replaced, found_candidates

    def _master_defects(self, plan: calibrate.Plan) -> np.ndarray:
        parts = []
        if plan.dark is not None:
            sigma = self.config.calibration.defect_sigma
            parts.append(calibrate.defects_from_dark(self._load(plan.dark), sigma))
        if plan.flat is not None:
            parts.append(calibrate.defects_from_flat(self._load(plan.flat)))
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    def _load(self, master: Master) -> np.ndarray:
        data: np.ndarray = self._cached(("master", master.meta.path), lambda: calibrate.load_master(master))
        return data

    def _cached(self, key: object, make: Any) -> Any:
        # Two threads may both make a missing entry once; the values are equal and read-only.
        if key not in self._master_cache:
            self._master_cache[key] = make()
        return self._master_cache[key]

    def _replace_frame_defects(self, prepared: Prepared, timings: dict[str, float],
                               owned: bool = False) -> tuple[np.ndarray, int, np.ndarray | None]:
        """Replace the defects seen at the same sensor position in this and the previous accepted frames.

        Done here, in order, so that the map a frame gets does not depend on how far reading ran ahead.
        ``owned``: in the prepared frame's own arrays (see ``commit``), else in copies. Returns the frame's
        pixels to stack (its stars are not searched again, so a colour frame needs no new luminance), the
        pixels replaced in all and the defects replaced here.
        """
        frame, candidates = prepared.frame, prepared.candidates
        if candidates is None:
            return frame.data, prepared.defects, None
        t0 = time.perf_counter()
        sensor = (frame.meta.shape, frame.meta.bayer)
        if sensor != self._candidates_sensor:
            self._candidates.clear()
            self._candidates_sensor = sensor
        defects = calibrate.persistent_defects([*self._candidates, candidates],
                                               self.config.calibration.defect_frames)
        self._candidates.append(candidates)
        data = frame.data
        if defects.size:
            if prepared.mosaic is not None:
                mosaic = _writeable(prepared.mosaic, owned)
                calibrate.replace_defects(mosaic, defects, frame.meta.bayer)
                data = develop_data(RawFrame(frame.meta, mosaic, integral=False), self._read_buffers.take)
            else:
                data = _writeable(frame.data, owned)
                calibrate.replace_defects(data, defects, None)
                data.flags.writeable = False
        timings["defects"] = time.perf_counter() - t0
        return data, prepared.defects + int(defects.size), _readonly(defects)


@dataclass(frozen=True)
class PhotometrySetup:
    """What photometry needs for a night, decided once on the first accepted frame.

    Attributes
    ----------
    plan : PhotometryPlan
        Targets and comparisons on the reference frame.
    sky : tuple of float or None
        The first target's (RA, Dec) in degrees, when the reference has a WCS.
    site : tuple of float or None
        (latitude, longitude east, height m), from the configuration or the header.
    notes : tuple of str
        Assumptions worth one log line (gain or site unknown ...).
    """

    plan: PhotometryPlan
    sky: tuple[float, float] | None
    site: tuple[float, float, float] | None
    notes: tuple[str, ...] = ()

    @property
    def time_scale(self) -> str:
        """``"BJD_TDB"`` when the sky position and the site are known, else ``"JD_UTC"``."""
        return "BJD_TDB" if self.sky is not None and self.site is not None else "JD_UTC"

    def describe(self) -> dict[str, Any]:
        """The plan in words and numbers, for a light curve file's header."""
        params = self.plan.params
        return {
            "targets": [{"name": s.name, "x": s.x, "y": s.y} for s in self.plan.targets],
            "comparisons": [{"name": s.name, "x": s.x, "y": s.y} for s in self.plan.comparisons],
            "aperture_fwhm": params.aperture, "annulus_fwhm": [params.annulus_inner, params.annulus_outer],
            "gain": params.gain, "saturation": params.saturation if np.isfinite(params.saturation) else None,
            "positions": "pixels on the reference frame (x = column, y = row, from 0)",
            "magnitude": "-2.5 log10(target flux / ensemble flux of the comparisons)",
            "sky": list(self.sky) if self.sky is not None else None,
            "site": list(self.site) if self.site is not None else None,
        }

    def time(self, meta: FrameMeta) -> float:
        """Mid-exposure of a frame in ``time_scale`` (NaN when its header gives no time)."""
        if meta.time_utc is None:
            return float("nan")
        return mid_exposure_time(meta.time_utc, meta.exptime, self.sky, self.site)[0]


def wants_solution(config: Config, reference: FrameMeta | None) -> bool:
    """Whether the reference should be plate-solved.

    ``[wcs] solve = "always"``: yes. ``"auto"``: when it has no WCS and its header gives a pointing or a pixel
    scale to start from (a blind search of the whole sky can keep a small computer's cores busy for minutes,
    and a simulated sky has nothing to find). ``"off"``: no.
    """
    if reference is None or config.wcs.solve == "off":
        return False
    if config.wcs.solve == "always":
        return True
    if reference.wcs_header:
        return False
    hints = _reference_hints(reference.path)
    return (hints.ra is not None and hints.dec is not None) or hints.scale_low is not None


def _reference_hints(path: str) -> SolveHints:
    from astropy.io import fits as _fits

    try:
        with _fits.open(path) as hdul:
            header = next((h.header for h in hdul if h.header.get("NAXIS", 0) >= 2), hdul[0].header)
            return hints_from_header(header)
    except (OSError, ValueError):
        return SolveHints()


def solve_reference(config: Config, stacker: Stacker, image: np.ndarray | None = None,
                    cancel: threading.Event | None = None) -> Solution | SolveFailure:
    """Plate-solve a stacker's reference frame from its star list (slow: off the frame path).

    Parameters
    ----------
    config : Config
        Uses ``[wcs]``.
    stacker : Stacker
        With a reference.
    image : ndarray, optional
        The reference frame, for a solver command that asks for the image (``{image}``); read again from its
        file when such a command is configured and none is given.
    cancel : threading.Event, optional
        Set to stop the solver at once (a daemon stopping).

    Returns
    -------
    Solution or SolveFailure
    """
    meta, stars = stacker.reference_meta, stacker.reference_stars
    if meta is None or stars is None:
        return SolveFailure("error", "there is no reference frame to solve yet")
    if stacker.path == "surface":
        return SolveFailure("unsolved", "the stack is aligned on a surface (Moon, Sun, planet): no star "
                                        "field to solve")
    if "{image}" in config.wcs.command and image is None:
        try:
            image = read_frame(meta.path, bayer_pattern=config.frames.bayer_pattern or None).luminance
        except FrameError as exc:
            return SolveFailure("error", f"the reference cannot be read again for the solver: {exc}")
    return solve(stars, meta.shape, _reference_hints(meta.path), image=image, command=config.wcs.command,
                 time_limit=config.wcs.time_limit, cancel=cancel)


def photometry_setup(config: Config, prepared: Prepared, transform: Transform,
                     reference_wcs: str | None) -> PhotometrySetup | None:
    """Decide the photometry of a night from its first accepted frame.

    Parameters
    ----------
    config : Config
        Uses ``[photometry]``.
    prepared : Prepared
        The first accepted frame (read and detected): comparisons are chosen among its stars.
    transform : Transform
        Its transform onto the reference (the identity for the reference itself).
    reference_wcs : str or None
        The reference's WCS cards, for targets given on the sky.

    Returns
    -------
    PhotometrySetup or None
        None when no target is configured.

    Raises
    ------
    ValueError
        One sentence, when a target or the site cannot be read.
    """
    p = config.photometry
    if not p.targets:
        return None
    header = _header_numbers(prepared.frame.meta.path, ("GAIN", "EGAIN", "SATURATE", "DATAMAX", "SITELAT",
                                                        "SITELONG", "SITEELEV"))
    notes: list[str] = []
    gain = p.gain or header.get("GAIN") or header.get("EGAIN")
    if not gain:
        gain = 1.0
        notes.append("photometry: no GAIN in the header or the configuration; errors assume 1 e-/ADU.")
    image = prepared.frame.luminance
    saturation = _saturation_level(image, p.saturation or header.get("SATURATE") or header.get("DATAMAX"))
    params = PhotometryParams(aperture=p.aperture, annulus_inner=p.annulus_inner,
                              annulus_outer=p.annulus_outer, gain=float(gain), saturation=saturation)
    targets = [parse_target(spec, reference_wcs, name=f"T{i + 1}") for i, spec in enumerate(p.targets)]
    excluded = [parse_target(spec, reference_wcs) for spec in p.exclude]
    matrix = transform.matrix
    inverse = PhotometryPlan(stars=tuple(targets) + tuple(excluded), params=params).positions_on(matrix)
    local = _plan_photometry([], image, prepared.stars, prepared.quality.fwhm, p.comparisons, params,
                             exclude=[(float(x), float(y)) for x, y in inverse])
    on_reference = transform.apply(np.array([[s.x, s.y] for s in local.stars]).reshape(-1, 2))
    comparisons = tuple(Star(s.name, float(x), float(y), s.role)
                        for s, (x, y) in zip(local.stars, on_reference, strict=True))
    if len(comparisons) < p.comparisons:
        notes.append(f"photometry: {len(comparisons)} clean comparison stars found of the "
                     f"{p.comparisons} asked for.")
    sky = None
    if reference_wcs:
        from astropy.io import fits as _fits
        from astropy.wcs import WCS

        wcs = WCS(_fits.Header.fromstring(reference_wcs))
        ra, dec = wcs.all_pix2world([[targets[0].x, targets[0].y]], 0)[0]
        sky = (float(ra), float(dec))
    site = _site(p.site, header)
    if site is None or sky is None:
        notes.append("photometry: times are JD UTC at mid-exposure (BJD_TDB needs a WCS and the site).")
    return PhotometrySetup(plan=PhotometryPlan(stars=tuple(targets) + comparisons, params=params), sky=sky,
                           site=site, notes=tuple(notes))


def _header_numbers(path: str, keys: tuple[str, ...]) -> dict[str, float]:
    from astropy.io import fits as _fits

    try:
        header = _fits.getheader(path)
    except (OSError, ValueError):
        return {}
    out: dict[str, float] = {}
    for key in keys:
        value = header.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value):
            out[key] = float(value)
    return out


def _site(text: str, header: Mapping[str, float]) -> tuple[float, float, float] | None:
    if text.strip():
        try:
            parts = [float(v) for v in text.replace(",", " ").split()]
        except ValueError:
            parts = []
        if len(parts) not in (2, 3):
            raise ValueError(f"[photometry] site must be 'latitude,longitude[,height]', not {text!r}.")
        return parts[0], parts[1], parts[2] if len(parts) == 3 else 0.0
    if "SITELAT" in header and "SITELONG" in header:
        return header["SITELAT"], header["SITELONG"], header.get("SITEELEV", 0.0)
    return None


def expand_paths(items: Iterable[str]) -> list[Path]:
    """Files, folders (their frames, recursively) and glob patterns, as a list of distinct files.

    Parameters
    ----------
    items : iterable of str

    Returns
    -------
    list of Path
        In the order found; an item matching nothing is left out.
    """
    seen: set[Path] = set()
    out: list[Path] = []

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)

    for item in items:
        p = Path(item)
        if p.is_dir():
            for child in sorted(p.rglob("*")):
                if child.is_file() and _is_frame_name(child.name):
                    add(child)
        elif p.exists():
            add(p)
        else:
            for match in sorted(glob.glob(item, recursive=True)):
                if Path(match).is_file():
                    add(Path(match))
    return out


def order_by_time(paths: Iterable[Path], bayer_pattern: str | None = None) -> list[Path]:
    """Order files by observation time (DATE-OBS etc.), then name.

    Files whose header cannot be read, or that give no time, come last in name order; the stack rejects
    the unreadable ones with their reason.
    """
    keyed: list[tuple[int, datetime, str, Path]] = []
    far = datetime.max.replace(tzinfo=UTC)
    for p in paths:
        try:
            t = read_meta(p, bayer_pattern=bayer_pattern).time_utc
        except FrameError:
            t = None
        keyed.append((0 if t else 1, t or far, p.name, p))
    keyed.sort(key=lambda k: k[:3])
    return [k[3] for k in keyed]


def _is_frame_name(name: str) -> bool:
    lower = name.lower()
    return lower.endswith(FITS_SUFFIXES) and not lower.startswith((".", "~"))


def build_composite(stacks: Mapping[str, np.ndarray], config: ComposeConfig) -> Composite:
    """A target's composite from its per-filter stacks, as ``[compose]`` asks (off the frame path: it costs
    a few hundred milliseconds at 8.3 MP, see ``benchmarks/bench_compose.py``).

    Parameters
    ----------
    stacks : Mapping
        Filter -> stack (``Stacker.results()``, or per-filter FITS read back).
    config : ComposeConfig

    Returns
    -------
    Composite

    Raises
    ------
    ValueError
        When the configured recipe's filters are missing or the stacks differ in size.
    """
    return compose(stacks, recipe=config.recipe, combine=config.combine, scale=config.scale,
                   background=config.background, weights=parse_weights(config.weights))


def composite_info(infos: Iterable[StackInfo], recipe: str) -> StackInfo:
    """Header facts of a composite of per-filter stacks: frames and exposure summed, the time span of all.

    Parameters
    ----------
    infos : iterable of StackInfo
        The per-filter stacks' facts (``Stacker.info(filter)``), all of one target.
    recipe : str
        Goes into FILTER.

    Returns
    -------
    StackInfo
    """
    infos = list(infos)
    first = infos[0]
    starts = [i.date_obs for i in infos if i.date_obs is not None]
    ends = [i.date_end for i in infos if i.date_end is not None]
    return StackInfo(ncombine=sum(i.ncombine for i in infos), exptime=sum(i.exptime for i in infos),
                     date_obs=min(starts, default=None), date_end=max(ends, default=None),
                     method=first.method, object=first.object, filter=recipe, wcs_header=first.wcs_header,
                     reference=first.reference)


def filter_key(name: str | None) -> str:
    """The name a frame's FILTER is stacked under: the canonical name of a known filter, else the header's.

    ``"Red"``, ``"r"`` and ``"R"`` all stack as ``R``; ``"H-alpha"`` and ``"Ha"`` as ``Ha`` (see
    ``compose.FILTER_ALIASES``); an unknown name is kept as written (trimmed); no FILTER gives ``""``.
    """
    return canonical_filter(name or "")


def normalisation_from_facts(facts: Mapping[str, Any] | None) -> Normalisation | None:
    """The sky normalisation a frame was stacked with, from its journaled facts (``frame_facts``); None when
    they do not say (frames stacked before normalisation existed)."""
    if not facts or facts.get("norm_scale") is None or facts.get("norm_offset") is None:
        return None
    return Normalisation(scale=tuple(float(v) for v in facts["norm_scale"]),
                         offset=tuple(float(v) for v in facts["norm_offset"]),
                         weight=float(facts.get("weight") or 1.0))


def distortion_from_facts(facts: Mapping[str, Any] | None) -> Distortion | None:
    """The distortion correction a frame was warped with, from its journaled facts (``frame_facts``).

    Parameters
    ----------
    facts : Mapping or None

    Returns
    -------
    Distortion or None
        None when the facts name none (an affine warp, or a frame journaled before corrections existed).

    Raises
    ------
    FrameError
        When the journaled correction cannot be read back.
    """
    value = (facts or {}).get("distortion")
    if value is None:
        return None
    try:
        return Distortion.from_json(value)
    except ValueError as exc:
        raise FrameError(f"the journaled distortion correction cannot be read: {exc}") from exc


def _writeable(array: np.ndarray, owned: bool) -> np.ndarray:
    """``array`` itself made writeable when its holder gave it up (``owned``) and it owns its memory, else a
    writeable copy: a whole frame less in memory and one copy less per frame."""
    if owned and array.base is None:
        array.flags.writeable = True
        return array
    return array.copy()


def _sample_step(pixels: int) -> int:
    """The stride (along rows and columns) that samples about ``_SNR_SAMPLE`` of ``pixels``."""
    return max(1, int(np.sqrt(pixels / _SNR_SAMPLE)))


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _masters_text(masters: object) -> str:
    """``kind=file`` pairs of whatever calibration record the result carries (a mapping or an object)."""
    items = masters.items() if isinstance(masters, Mapping) else vars(masters).items()
    return "; ".join(f"{k}={Path(str(v)).name}" for k, v in items if v)


def _judge_shape(quality: Quality, max_ellipticity: float) -> str | None:
    if np.isfinite(quality.ellipticity) and quality.ellipticity > max_ellipticity:
        return (f"stars are elongated: ellipticity {quality.ellipticity:.2f} is over "
                f"{max_ellipticity:g} (wind or tracking)")
    return None


def _first_of(name: str) -> str:
    return f"first {name} frame" if name else "first frame"


def _too_few_stars(found: int, needed: int, purpose: str) -> str:
    if found == 0:
        return f"no stars found (at least {needed} needed {purpose})"
    return f"only {found} star{'s' if found != 1 else ''} found (at least {needed} needed {purpose})"


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def _parse_iso(s: str | None) -> datetime | None:
    return None if s is None else datetime.fromisoformat(s)


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a)
    a.flags.writeable = False
    return a
