"""Pipeline: the one place that wires the stages together (read, detect, align, warp, stack).

``Stacker`` turns files into a stack, one frame at a time. Its work per frame is split in two so a caller may
overlap them: ``prepare`` (read and detect; touches no stack state, safe on another thread) and ``commit``
(check, align, warp, accumulate; one thread, in order). ``process`` does both. It owns no thread, socket or
timer: the daemon and the ``stack`` command drive it.
"""

from __future__ import annotations

import glob
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from livestack.config import Config
from livestack.errors import FrameError, StateError
from livestack.stages.align import AlignParams, Transform, align
from livestack.stages.detect import Quality, Stars, detect
from livestack.stages.frames import FITS_SUFFIXES, Frame, FrameMeta, read_frame, read_meta
from livestack.stages.snapshot import StackInfo
from livestack.stages.stack import Accumulator, make_accumulator
from livestack.stages.warp import warp

__all__ = ["FrameResult", "Prepared", "Stacker", "expand_paths", "frame_facts", "order_by_time"]

ACCEPTED = "accepted"
REJECTED = "rejected"

#: Pixels sampled (at most) when estimating the stack's signal-to-noise ratio.
_SNR_SAMPLE = 200_000


@dataclass(frozen=True)
class Prepared:
    """A frame read and searched for stars, not yet aligned or stacked."""

    frame: Frame
    stars: Stars
    quality: Quality
    timings: Mapping[str, float]


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
    """

    path: str
    verdict: str
    reason: str | None
    meta: FrameMeta | None
    quality: Quality | None
    transform: Transform | None
    timings: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    reference: bool = False

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
        ``fwhm``, ``ellipticity``, ``background``, ``noise``, ``reference``, ``weight``; ``masters`` when the
        result carries calibration. A value not measured is None (JSON has no NaN).
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
        "matrix": None, "dx": None, "dy": None, "rotation": None, "scale": None, "inliers": None,
        "residual": None, "method": None, "reference": result.reference,
    }
    if t is not None:
        facts["matrix"] = [float(v) for v in t.matrix.ravel()]
        if meta is not None:
            facts["dx"], facts["dy"] = t.centre_shift(meta.shape)
        facts.update(rotation=t.rotation, scale=t.scale, inliers=int(t.inliers),
                     residual=_finite_or_none(t.rms), method=t.method)
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
    return facts


class Stacker:
    """Align and accumulate frames onto a reference.

    Parameters
    ----------
    config : Config
        Uses the ``frames``, ``detect``, ``align`` and ``stack`` sections.
    workdir : Path, optional
        Folder for the median's on-disk cube (required for ``method = "median"``).
    """

    def __init__(self, config: Config, workdir: Path | None = None) -> None:
        self.config = config
        self.workdir = workdir
        a = config.align
        self._params = AlignParams(
            model="affine" if a.model == "affine" else "similarity", min_inliers=a.min_inliers,
            min_matched_fraction=a.min_matched_fraction, max_rms=a.max_rms, min_spread=a.min_spread,
            match_radius=a.match_radius, max_stars=a.max_stars, triangle_stars=a.triangle_stars)
        self._bayer = config.frames.bayer_pattern or None
        self._named_reference = config.path(a.reference) if a.reference else None
        self._ref_stars: Stars | None = None
        self._ref_meta: FrameMeta | None = None
        self._ref_fwhm = float("nan")
        self._acc: Accumulator | None = None
        self._last: Transform | None = None
        self.exptime = 0.0
        self.date_obs: datetime | None = None
        self.date_end: datetime | None = None

    # -- the two halves of a frame's work -------------------------------------------------------------

    def prepare(self, path: str | Path) -> Prepared | FrameResult:
        """Read a frame and find its stars.

        Parameters
        ----------
        path : str or Path

        Returns
        -------
        Prepared or FrameResult
            A rejected ``FrameResult`` when the file cannot be used as a frame.
        """
        t0 = time.perf_counter()
        try:
            frame = read_frame(path, bayer_pattern=self._bayer)
        except FrameError as exc:
            return FrameResult(str(path), REJECTED, str(exc), None, None, None,
                               MappingProxyType({"read": time.perf_counter() - t0}))
        t1 = time.perf_counter()
        d = self.config.detect
        stars, quality = detect(frame.luminance, threshold=d.threshold, binning=d.binning,
                                max_stars=d.max_stars)
        t2 = time.perf_counter()
        return Prepared(frame, stars, quality, MappingProxyType({"read": t1 - t0, "detect": t2 - t1}))

    def commit(self, prepared: Prepared | FrameResult) -> FrameResult:
        """Check, align, warp and accumulate a prepared frame.

        Parameters
        ----------
        prepared : Prepared or FrameResult
            The output of ``prepare``; a rejection passes straight through.

        Returns
        -------
        FrameResult
        """
        if isinstance(prepared, FrameResult):
            return prepared
        meta, quality = prepared.frame.meta, prepared.quality
        timings = dict(prepared.timings)

        def reject(reason: str) -> FrameResult:
            return FrameResult(meta.path, REJECTED, reason, meta, quality, None, MappingProxyType(timings))

        if self._ref_stars is None and self._named_reference is not None:
            problem = self.use_reference(self._named_reference)
            if problem:
                return reject(f"the configured reference {self._named_reference} cannot be used: {problem}")
        if self._ref_stars is None:
            problem = self._reference_problem(prepared)
            if problem:
                return reject(problem)
            self._set_reference(prepared)
            transform = Transform.identity()
            is_reference = True
        else:
            problem = self._check_against_reference(prepared)
            if problem:
                return reject(problem)
            t0 = time.perf_counter()
            assert self._ref_stars is not None
            outcome = align(self._ref_stars, prepared.stars, guess=self._last, params=self._params)
            timings["align"] = time.perf_counter() - t0
            if outcome.transform is None:
                return reject(outcome.reason or "could not be aligned")
            transform = outcome.transform
            is_reference = False
        self._stack(prepared.frame, transform, timings)
        self._last = transform
        self._account(meta)
        return FrameResult(meta.path, ACCEPTED, None, meta, quality, transform, MappingProxyType(timings),
                           is_reference)

    def process(self, path: str | Path) -> FrameResult:
        """Prepare and commit one frame."""
        return self.commit(self.prepare(path))

    def stream(self, paths: Iterable[str | Path], executor: Executor | None = None) -> Iterator[FrameResult]:
        """Process files in order, reading and detecting the next frame while this one is stacked.

        Parameters
        ----------
        paths : iterable of str or Path
        executor : Executor, optional
            Where ``prepare`` runs ahead (a one-thread pool is enough). The stages that overlap release
            the GIL (OpenCV's warp, the numba accumulators), so two cores do both at once. Without one,
            frames are processed one after the other.

        Yields
        ------
        FrameResult
            One per path, in order.
        """
        if executor is None:
            for path in paths:
                yield self.process(path)
            return
        ahead: Future[Prepared | FrameResult] | None = None
        for path in paths:
            upcoming = executor.submit(self.prepare, path)
            if ahead is not None:
                yield self.commit(ahead.result())
            ahead = upcoming
        if ahead is not None:
            yield self.commit(ahead.result())

    # -- frames whose transform is known (replay, removal, re-integration, restack) -----------------------

    def warp_known(self, path: str | Path,
                   matrix: np.ndarray | Sequence[float]) -> tuple[Frame, np.ndarray, np.ndarray]:
        """Read a frame as ``prepare`` does and warp it onto the reference with a known transform.

        Parameters
        ----------
        path : str or Path
        matrix : array-like
            The frame's 2x3 transform (or its 6 numbers, row-major), as journaled when it was stacked.

        Returns
        -------
        frame : Frame
        aligned : ndarray
        footprint : ndarray

        Raises
        ------
        FrameError
            When the file cannot be read, or does not fit the stack's grid.
        StateError
            Before the stack has a reference.
        """
        if self._ref_meta is None or self._acc is None:
            raise StateError("the stack has no reference yet: a known transform has nothing to map onto")
        frame = read_frame(path, bayer_pattern=self._bayer)
        channels = frame.data.shape[2] if frame.is_color else None
        if frame.meta.shape != self._ref_meta.shape or channels != self._acc_channels:
            raise FrameError(f"{path} no longer fits the stack: it is {frame.data.shape}, the stack "
                             f"{self._ref_meta.shape} with {self._acc_channels or 1} channel(s)")
        m = np.asarray(matrix, dtype=np.float64).reshape(2, 3)
        aligned, footprint = warp(frame.data, m, self._ref_meta.shape, self.config.align.interpolation)
        return frame, aligned, footprint

    def add_known(self, path: str | Path, matrix: np.ndarray | Sequence[float],
                  weight: float = 1.0) -> FrameMeta:
        """Stack a frame with a known transform, without aligning it again.

        Parameters
        ----------
        path : str or Path
        matrix : array-like
            2x3 or 6 numbers, frame -> reference.
        weight : float

        Returns
        -------
        FrameMeta

        Raises
        ------
        FrameError, StateError
            As ``warp_known``.
        """
        frame, aligned, footprint = self.warp_known(path, matrix)
        assert self._acc is not None
        self._acc.add(aligned, footprint, weight)
        self._account(frame.meta)
        return frame.meta

    def subtract_known(self, path: str | Path, matrix: np.ndarray | Sequence[float],
                       weight: float = 1.0) -> FrameMeta:
        """Take a frame back out of a mean stack: the exact inverse of ``add_known``/``commit``.

        The caller checks first that the file is the one stacked (its content hash).

        Raises
        ------
        StateError
            When the method has no exact inverse (kappa-sigma, median: re-integrate instead).
        FrameError
            As ``warp_known``.
        """
        subtract = getattr(self._acc, "subtract", None)
        if subtract is None:
            raise StateError(f"a {self.method} stack cannot take a frame back out; it is re-integrated")
        frame, aligned, footprint = self.warp_known(path, matrix)
        subtract(aligned, footprint, weight)
        self.exptime = max(0.0, self.exptime - (frame.meta.exptime or 0.0))
        return frame.meta

    def recount(self, frames: Iterable[tuple[datetime | None, float | None]]) -> None:
        """Total exposure and time span again from the frames in the stack (after a removal).

        Parameters
        ----------
        frames : iterable of (datetime or None, float or None)
            Start (UTC) and exposure of every frame in the stack.
        """
        self._reset_counters()
        for start, exptime in frames:
            self._account_time(start, exptime)

    def fork(self, workdir: Path | None = None) -> Stacker:
        """An empty stack on the same reference and grid (for a re-integration beside this one).

        Parameters
        ----------
        workdir : Path, optional
            The new stack's folder for a median cube (default: this one's).

        Returns
        -------
        Stacker
        """
        twin = Stacker(self.config, workdir=workdir if workdir is not None else self.workdir)
        twin._ref_stars, twin._ref_meta, twin._ref_fwhm = self._ref_stars, self._ref_meta, self._ref_fwhm
        twin._last = self._last
        if self._acc is not None:
            twin._acc_channels = self._acc_channels
            shape = self._acc.coverage.shape + (() if self._acc_channels is None else (self._acc_channels,))
            twin._acc = twin._new_accumulator(shape)
        return twin

    def use_reference(self, path: str | Path) -> str | None:
        """Start a new, empty stack aligned onto the given frame.

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
        problem = self._reference_problem(prepared)
        if problem:
            return problem
        self._reset_counters()
        self._set_reference(prepared)
        return None

    # -- the stack ------------------------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Frames in the stack."""
        return 0 if self._acc is None else self._acc.count

    @property
    def method(self) -> str:
        return self.config.stack.method

    @property
    def reference_meta(self) -> FrameMeta | None:
        """Metadata of the reference frame, once there is one."""
        return self._ref_meta

    @property
    def rejected_fraction(self) -> float:
        return 0.0 if self._acc is None else self._acc.rejected_fraction

    def result(self) -> np.ndarray | None:
        """The stack so far (float32, NaN where no frame covered), or None before the first frame."""
        return None if self._acc is None else self._acc.result()

    def coverage(self) -> np.ndarray | None:
        """Frames per pixel, or None before the first frame."""
        return None if self._acc is None else self._acc.coverage

    def info(self) -> StackInfo:
        """Header facts for a snapshot of the stack."""
        ref = self._ref_meta
        return StackInfo(ncombine=self.count, exptime=self.exptime, date_obs=self.date_obs,
                         date_end=self.date_end, method=self.method,
                         object=ref.object if ref else None, filter=ref.filter if ref else None,
                         wcs_header=ref.wcs_header if ref else None, reference=ref.path if ref else None)

    def snr(self, image: np.ndarray | None = None) -> float | None:
        """A robust signal-to-noise estimate of the stack.

        The 99.5th percentile above the median sky, over the sky noise (1.4826 x MAD), on the luminance of a
        pixel sample: it grows as the square root of the frames for a well-behaved stack.

        Parameters
        ----------
        image : ndarray, optional
            The stack, if the caller already has it (saves computing it again).

        Returns
        -------
        float or None
            None before the first frame or when the noise cannot be measured.
        """
        if image is None:
            image = self.result()
        if image is None:
            return None
        lum = image.mean(axis=2) if image.ndim == 3 else image
        step = max(1, int(np.sqrt(lum.size / _SNR_SAMPLE)))
        sample = lum[::step, ::step]
        sample = sample[np.isfinite(sample)]
        if sample.size < 100:
            return None
        med = float(np.median(sample))
        noise = 1.4826 * float(np.median(np.abs(sample - med)))
        if noise <= 0:
            return None
        return float((np.percentile(sample, 99.5) - med) / noise)

    def discard(self) -> None:
        """Release what the stack keeps on disk (the median's cube); the stack is unusable afterwards."""
        release = getattr(self._acc, "discard", None)
        if release is not None:
            release()

    # -- checkpoints ----------------------------------------------------------------------------------

    def checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Everything needed to resume: arrays and a JSON-able dictionary.

        Returns
        -------
        arrays : dict of ndarray
        meta : dict
        """
        if self._acc is None or self._ref_stars is None or self._ref_meta is None:
            return {}, {"empty": True}
        # Text entries of the accumulator's state (its method, a cube's file name) travel in ``meta``: the
        # arrays hold numbers only.
        arrays: dict[str, np.ndarray] = {}
        text: dict[str, str] = {}
        for k, v in self._acc.state().items():
            if v.dtype.kind in "US":
                text[k] = str(v)
            else:
                arrays[f"acc_{k}"] = v
        s = self._ref_stars
        for name in ("x", "y", "flux", "fwhm", "a", "b", "theta", "flags"):
            arrays[f"ref_{name}"] = getattr(s, name)
        if self._last is not None:
            arrays["last_matrix"] = self._last.matrix
        m = self._ref_meta
        meta = {
            "empty": False, "method": self.method, "exptime": self.exptime, "acc_text": text,
            "date_obs": _iso(self.date_obs), "date_end": _iso(self.date_end),
            "ref_fwhm": self._ref_fwhm,
            "ref": {"path": m.path, "shape": list(m.shape), "time_utc": _iso(m.time_utc),
                    "exptime": m.exptime, "filter": m.filter, "object": m.object, "imagetyp": m.imagetyp,
                    "bayer": m.bayer, "wcs_header": m.wcs_header},
            "stack_shape": list(self._acc.coverage.shape) + ([] if self._acc_channels is None
                                                              else [self._acc_channels]),
        }
        return arrays, meta

    def restore(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Resume from ``checkpoint()``'s output.

        Raises
        ------
        StateError
            When the checkpoint was made with another stacking method.
        """
        if meta.get("empty", True):
            return
        if meta["method"] != self.method:
            raise StateError(f"the checkpoint holds a {meta['method']} stack but the configuration asks "
                             f"for {self.method}; use a new state folder or the same method")
        r = meta["ref"]
        self._ref_meta = FrameMeta(path=r["path"], shape=(int(r["shape"][0]), int(r["shape"][1])),
                                   time_utc=_parse_iso(r["time_utc"]), exptime=r["exptime"],
                                   filter=r["filter"], object=r["object"], imagetyp=r["imagetyp"],
                                   bayer=r["bayer"], wcs_header=r["wcs_header"])
        ref_arrays = {name: _readonly(np.asarray(arrays[f"ref_{name}"]))
                      for name in ("x", "y", "flux", "fwhm", "a", "b", "theta", "flags")}
        self._ref_stars = Stars(shape=self._ref_meta.shape, **ref_arrays)
        self._ref_fwhm = float(meta["ref_fwhm"])
        shape = tuple(int(n) for n in meta["stack_shape"])
        self._acc = self._new_accumulator(shape)
        state = {k[4:]: v for k, v in arrays.items() if k.startswith("acc_")}
        state.update({k: np.array(v) for k, v in meta.get("acc_text", {}).items()})
        self._acc.restore(state)
        self._acc_channels = shape[2] if len(shape) == 3 else None
        if "last_matrix" in arrays:
            self._last = Transform.from_matrix(arrays["last_matrix"], "restored")
        self.exptime = float(meta["exptime"])
        self.date_obs = _parse_iso(meta["date_obs"])
        self.date_end = _parse_iso(meta["date_end"])

    @property
    def has_reference(self) -> bool:
        return self._ref_stars is not None

    # -- private --------------------------------------------------------------------------------------

    _acc_channels: int | None = None

    def _reference_problem(self, prepared: Prepared) -> str | None:
        needed = max(self.config.align.reference_min_stars, self._params.min_inliers)
        if prepared.quality.stars < needed:
            return _too_few_stars(prepared.quality.stars, needed, "to become the reference")
        return None

    def _reset_counters(self) -> None:
        self.exptime = 0.0
        self.date_obs = self.date_end = None

    def _set_reference(self, prepared: Prepared) -> None:
        self._ref_stars = prepared.stars
        self._ref_meta = prepared.frame.meta
        self._ref_fwhm = prepared.quality.fwhm
        shape = prepared.frame.data.shape
        self._acc_channels = shape[2] if len(shape) == 3 else None
        self._acc = self._new_accumulator(shape)
        self._last = None

    def _new_accumulator(self, shape: tuple[int, ...]) -> Accumulator:
        s = self.config.stack
        return make_accumulator(s.method, shape, kappa=s.kappa, warmup=s.warmup, directory=self.workdir)

    def _check_against_reference(self, prepared: Prepared) -> str | None:
        ref = self._ref_meta
        assert ref is not None
        meta, quality = prepared.frame.meta, prepared.quality
        if meta.shape != ref.shape:
            return (f"frame is {meta.shape[0]}x{meta.shape[1]} (rows x columns) but the stack is "
                    f"{ref.shape[0]}x{ref.shape[1]}")
        channels = prepared.frame.data.shape[2] if prepared.frame.is_color else None
        if channels != self._acc_channels:
            kind = "colour" if channels else "mono"
            return f"frame is {kind} but the stack is {'mono' if channels else 'colour'}"
        if quality.stars < self._params.min_inliers:
            return _too_few_stars(quality.stars, self._params.min_inliers, "to be aligned")
        a = self.config.align
        ref_count = len(self._ref_stars) if self._ref_stars is not None else 0
        if quality.stars < a.min_star_fraction * ref_count:
            return (f"only {quality.stars} stars found, under {a.min_star_fraction:g} x the reference's "
                    f"{ref_count} (clouds or dew)")
        if (a.max_fwhm_factor > 0 and np.isfinite(self._ref_fwhm) and np.isfinite(quality.fwhm)
                and quality.fwhm > a.max_fwhm_factor * self._ref_fwhm):
            return (f"stars are blurred: FWHM {quality.fwhm:.2f} px is over {a.max_fwhm_factor:g} x the "
                    f"reference's {self._ref_fwhm:.2f} px (clouds, focus or seeing)")
        if np.isfinite(quality.ellipticity) and quality.ellipticity > a.max_ellipticity:
            return (f"stars are elongated: ellipticity {quality.ellipticity:.2f} is over "
                    f"{a.max_ellipticity:g} (wind or tracking)")
        return None

    def _stack(self, frame: Frame, transform: Transform, timings: dict[str, float]) -> None:
        assert self._acc is not None and self._ref_meta is not None
        t0 = time.perf_counter()
        aligned, footprint = warp(frame.data, transform.matrix, self._ref_meta.shape,
                                  self.config.align.interpolation)
        t1 = time.perf_counter()
        self._acc.add(aligned, footprint)
        t2 = time.perf_counter()
        timings["warp"] = t1 - t0
        timings["stack"] = t2 - t1

    def _account(self, meta: FrameMeta) -> None:
        self._account_time(meta.time_utc, meta.exptime)

    def _account_time(self, start: datetime | None, exptime: float | None) -> None:
        exptime = exptime or 0.0
        self.exptime += exptime
        if start is not None:
            end = start + timedelta(seconds=exptime)
            if self.date_obs is None or start < self.date_obs:
                self.date_obs = start
            if self.date_end is None or end > self.date_end:
                self.date_end = end


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


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _masters_text(masters: object) -> str:
    """``kind=file`` pairs of whatever calibration record the result carries (a mapping or an object)."""
    items = masters.items() if isinstance(masters, Mapping) else vars(masters).items()
    return "; ".join(f"{k}={Path(str(v)).name}" for k, v in items if v)


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
