"""Normalise: match each frame's sky to the reference's, weigh it, and judge it against the night so far.

Public API:

- ``Sky`` and ``measure_sky(image, stars) -> Sky``: robust sky level and noise per channel, on star-masked,
  sigma-clipped pixels.
- ``transparency(reference, stars, transform) -> float``: flux of the matched stars relative to the
  reference's (median ratio, per second of exposure when both exposures are known).
- ``Normalisation`` and ``normalisation(sky, reference, mode=..., weights=..., transparency=...)``: the
  per-channel scale and offset that bring a frame's sky onto the reference's, and the frame's weight.
- ``apply(image, norm)``: ``image * scale + offset`` per channel, in place, one parallel pass.
- ``Measures``, ``Judge``: relative rejection; a running median and MAD of the accepted frames' FWHM,
  elongation, star count, transparency and sky background, against which a new frame is a one-sided outlier
  or not.

Why normalise
    Frames whose sky levels differ (another night, the Moon rising, dawn, another exposure) leave a step
    wherever the set of frames covering a pixel changes: at a dithered or drifting field's edges, around a
    rotated frame. Bringing every frame's sky level to the reference's before it is accumulated removes the
    steps, and kappa-sigma's per-pixel bounds then follow a sky that brightens during the night.

Modes
    ``additive`` (the default) adds ``reference level - frame level`` per channel. ``scale`` first
    multiplies by the reference's star flux over the frame's (``1 / transparency``; 1 when unknown), then
    adds the offset that matches the levels. ``none`` leaves frames as they are.

Weights
    ``noise``: ``(reference noise / normalised noise)**2``, the inverse variance of the normalised sky,
    1 for the reference. ``noise+transparency``: that times the frame's transparency. ``none``: 1.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import cv2
import numba
import numpy as np

from livestack.stages.align import Transform
from livestack.stages.detect import Stars
from livestack.stages.neighbours import nearest

__all__ = [
    "MODES",
    "WEIGHTS",
    "Judge",
    "Measures",
    "Normalisation",
    "Sky",
    "apply",
    "measure_sky",
    "normalisation",
    "transparency",
]

MODES: tuple[str, ...] = ("additive", "scale", "none")
WEIGHTS: tuple[str, ...] = ("noise", "noise+transparency", "none")

#: About this many pixels per channel are sampled (strided) to measure the sky: a level good to ~1/100 of
#: one frame's noise (1/10 of a 100-frame stack's), for about a millisecond at any frame size.
SKY_SAMPLES: int = 20_000
#: Pixels within this many FWHM (the frame's median) of a detected star, and at least ``STAR_MASK_MIN``
#: pixels, are not sky.
STAR_MASK_FWHM: float = 3.0
STAR_MASK_MIN: float = 4.0
#: Sigma clipping of the sky sample: passes and threshold (in robust sigmas).
CLIP_PASSES: int = 2
CLIP_SIGMA: float = 3.0
#: Stars paired within this many pixels after the transform count as the same star for transparency.
MATCH_RADIUS: float = 2.0
#: Fewest matched pairs for a transparency.
MIN_MATCHED: int = 5
#: The brightest stars compared for transparency (faint ones add noise, not information).
TRANSPARENCY_STARS: int = 200

_MAD = 1.4826
#: Standard deviation of a normal distribution truncated at +-3 sigma, in sigmas.
_CLIPPED_STD = 0.9865

@dataclass(frozen=True)
class Sky:
    """A frame's sky: level and noise per channel (one value for mono), in the frame's units."""

    level: tuple[float, ...]
    noise: tuple[float, ...]

    @property
    def mean_level(self) -> float:
        return float(np.mean(self.level))

    @property
    def mean_noise(self) -> float:
        return float(np.mean(self.noise))


@dataclass(frozen=True)
class Normalisation:
    """What is done to one frame before it is accumulated: ``image * scale + offset`` per channel, and its
    weight."""

    scale: tuple[float, ...]
    offset: tuple[float, ...]
    weight: float

    @property
    def identity(self) -> bool:
        return all(s == 1.0 for s in self.scale) and all(o == 0.0 for o in self.offset)


def measure_sky(image: np.ndarray, stars: Stars | None = None) -> Sky:
    """Robust sky level and noise per channel, away from stars.

    A strided sample of about ``SKY_SAMPLES`` pixels per channel, minus discs around the detected stars,
    sigma-clipped ``CLIP_PASSES`` times at ``CLIP_SIGMA`` around the median: the level is the mean of what
    remains, the noise its standard deviation corrected for the clipping (the pixel-to-pixel noise:
    sampled pixels are far apart).

    Parameters
    ----------
    image : ndarray
        ``(H, W)`` or ``(H, W, C)``; NaN allowed.
    stars : Stars, optional
        The frame's stars, masked out.

    Returns
    -------
    Sky
    """
    planes = image[:, :, np.newaxis] if image.ndim == 2 else image
    rows, cols = planes.shape[:2]
    stride = max(1, int(math.sqrt(rows * cols / SKY_SAMPLES)))
    sample = planes[::stride, ::stride]
    mask = np.ones(sample.shape[:2], dtype=bool)
    if stars is not None and len(stars):
        # Star centres marked on the sample's grid, then grown by a disc of the typical star's mask radius
        # (one dilation instead of a circle per star).
        centres = np.zeros(sample.shape[:2], dtype=np.uint8)
        cols = np.clip(np.rint(stars.x / stride).astype(np.int64), 0, sample.shape[1] - 1)
        rows = np.clip(np.rint(stars.y / stride).astype(np.int64), 0, sample.shape[0] - 1)
        centres[rows, cols] = 1
        fwhm = float(np.nanmedian(stars.fwhm)) if np.isfinite(stars.fwhm).any() else 2.0
        radius = max(1, math.ceil(max(STAR_MASK_FWHM * fwhm, STAR_MASK_MIN) / stride))
        disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        mask = cv2.dilate(centres, disc) == 0
    levels, noises = [], []
    for c in range(planes.shape[2]):
        values = sample[:, :, c][mask]
        values = values[np.isfinite(values)]
        level, noise = _clipped(values)
        levels.append(level)
        noises.append(noise)
    return Sky(tuple(levels), tuple(noises))


def transparency(reference: Stars, stars: Stars, transform: Transform, exptime: float | None = None,
                 reference_exptime: float | None = None) -> float:
    """Flux of the frame's stars relative to the reference's, matched through the transform.

    Parameters
    ----------
    reference, stars : Stars
    transform : Transform
        Frame -> reference.
    exptime, reference_exptime : float, optional
        When both are known the ratio is per second of exposure.

    Returns
    -------
    float
        The median flux ratio of the matched pairs among the brightest stars; NaN with fewer than
        ``MIN_MATCHED`` pairs.
    """
    n_ref = min(len(reference), TRANSPARENCY_STARS)
    n = min(len(stars), TRANSPARENCY_STARS)
    if n_ref < MIN_MATCHED or n < MIN_MATCHED:
        return float("nan")
    predicted = transform.apply(stars.xy[:n])
    distance, index = nearest(reference.xy[:n_ref], predicted, MATCH_RADIUS)
    found = np.isfinite(distance)
    if int(found.sum()) < MIN_MATCHED:
        return float("nan")
    ref_flux = reference.flux[:n_ref][index[found]]
    flux = stars.flux[:n][found]
    good = (ref_flux > 0) & (flux > 0)
    if int(good.sum()) < MIN_MATCHED:
        return float("nan")
    ratio = float(np.median(flux[good] / ref_flux[good]))
    if exptime and reference_exptime and exptime > 0 and reference_exptime > 0:
        ratio *= reference_exptime / exptime
    return ratio


def normalisation(sky: Sky, reference: Sky, mode: str = "additive", weights: str = "noise",
                  transparency: float = float("nan"), exposure_ratio: float = 1.0) -> Normalisation:
    """The scale, offset and weight that bring a frame onto the reference.

    Parameters
    ----------
    sky, reference : Sky
        The frame's and the reference's, with the same number of channels.
    mode : str
        ``additive``, ``scale`` or ``none`` (see the module docstring).
    weights : str
        ``noise``, ``noise+transparency`` or ``none``.
    transparency : float
        Per second of exposure (``transparency()``); NaN when unknown.
    exposure_ratio : float
        The frame's exposure over the reference's (1 when unknown): with ``transparency`` it gives the
        ratio of star fluxes that ``scale`` divides out.

    Returns
    -------
    Normalisation

    Raises
    ------
    ValueError
        For an unknown mode or weighting, or skies of different channel counts.
    """
    if mode not in MODES:
        raise ValueError(f"Normalisation {mode!r} is not one of {', '.join(MODES)}.")
    if weights not in WEIGHTS:
        raise ValueError(f"Weighting {weights!r} is not one of {', '.join(WEIGHTS)}.")
    channels = len(sky.level)
    if len(reference.level) != channels:
        raise ValueError(f"A {channels}-channel frame cannot be normalised to a "
                         f"{len(reference.level)}-channel reference.")
    flux_ratio = transparency * exposure_ratio
    s = 1.0 / flux_ratio if mode == "scale" and math.isfinite(flux_ratio) and flux_ratio > 0 else 1.0
    if mode == "none":
        scale, offset = (1.0,) * channels, (0.0,) * channels
    else:
        scale = (s,) * channels
        offset = tuple(r - s * f for r, f in zip(reference.level, sky.level, strict=True))
    weight = 1.0
    if weights != "none":
        noise = s * sky.mean_noise
        weight = (reference.mean_noise / noise) ** 2 if noise > 0 and reference.mean_noise > 0 else 1.0
        if weights == "noise+transparency" and math.isfinite(transparency) and transparency > 0:
            weight *= transparency
    if not (math.isfinite(weight) and weight > 0):
        weight = 1.0
    return Normalisation(scale=scale, offset=offset, weight=float(weight))


def apply(image: np.ndarray, norm: Normalisation) -> None:
    """``image = image * scale + offset`` per channel, in place (one parallel pass).

    Parameters
    ----------
    image : ndarray
        float32 ``(H, W)`` or ``(H, W, C)``, writeable, C-contiguous (a warped frame).
    norm : Normalisation
    """
    if norm.identity:
        return
    if image.ndim == 2:
        # A 2-D loop vectorises; a loop over a run-time channel count of 1 does not (4x slower).
        _affine_plane(image, np.float32(norm.scale[0]), np.float32(norm.offset[0]))
        return
    _affine_kernel(image, np.asarray(norm.scale, dtype=np.float32), np.asarray(norm.offset, dtype=np.float32))


# --------------------------------------------------------------------------------------------------------
# Relative rejection
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Measures:
    """What relative rejection compares, for one frame (NaN where unknown)."""

    fwhm: float
    ellipticity: float
    stars: int
    transparency: float
    background: float


#: Smallest spread each measure is judged with, whatever the night's MAD (a steady night's MAD can be tiny):
#: relative to the median for FWHM, star count and background, absolute for elongation and transparency.
FWHM_FLOOR: float = 0.05
ELLIPTICITY_FLOOR: float = 0.03
STARS_FLOOR: float = 0.10
TRANSPARENCY_FLOOR: float = 0.05
BACKGROUND_FLOOR: float = 0.05

#: label, Measures field, side (+1: too high is bad), floor, floor relative to the median?, causes, format.
_CHECKS: tuple[tuple[str, str, int, float, bool, str, str], ...] = (
    ("FWHM", "fwhm", +1, FWHM_FLOOR, True, "blurred: focus, seeing or cloud", "{:.2f} px"),
    ("elongation", "ellipticity", +1, ELLIPTICITY_FLOOR, False, "trailed: wind or tracking", "{:.2f}"),
    ("sky background", "background", +1, BACKGROUND_FLOOR, True, "clouds, dew, Moon or dawn", "{:.1f}"),
    ("star count", "stars", -1, STARS_FLOOR, True, "clouds or dew", "{:.0f}"),
    ("transparency", "transparency", -1, TRANSPARENCY_FLOOR, False, "clouds, haze or dew", "{:.2f}"),
)


class Judge:
    """Relative rejection: is a frame a one-sided outlier against the accepted frames of the night?

    Parameters
    ----------
    warmup : int
        Accepted frames recorded before any is judged.
    kappa : float
        A frame is rejected beyond ``kappa`` robust sigmas (1.4826 x MAD, at least the floor of each
        measure) of the running median: FWHM, elongation or sky background above, star count or
        transparency below.
    window : int
        The running median covers at most the last this many accepted frames (the night changes).

    Notes
    -----
    One per target and filter; one thread. ``state()`` / ``restore()`` carry it through checkpoints.
    """

    def __init__(self, warmup: int = 5, kappa: float = 5.0, window: int = 50) -> None:
        self.warmup = int(warmup)
        self.kappa = float(kappa)
        self._history: deque[Measures] = deque(maxlen=int(window))

    def __len__(self) -> int:
        return len(self._history)

    def judge(self, m: Measures) -> str | None:
        """Why the frame is an outlier (one sentence), or None. Does not record it."""
        if len(self._history) < self.warmup:
            return None
        k = self.kappa
        for label, name, side, floor, relative, cause, fmt in _CHECKS:
            value = float(getattr(m, name))
            past = np.array([float(getattr(h, name)) for h in self._history], dtype=np.float64)
            past = past[np.isfinite(past)]
            if not math.isfinite(value) or past.size < self.warmup:
                continue
            med = float(np.median(past))
            spread = max(_MAD * float(np.median(np.abs(past - med))), floor * abs(med) if relative else floor)
            limit = med + side * k * spread
            if (side > 0 and value > limit) or (side < 0 and value < limit):
                word = "above" if side > 0 else "below"
                return (f"{label} {fmt.format(value)} is {abs(value - med) / spread:.1f} sigma {word} the "
                        f"night's median {fmt.format(med)} (limit {k:g}; {cause})")
        return None

    def record(self, m: Measures) -> None:
        """Add an accepted frame's measures to the running history."""
        self._history.append(m)

    def state(self) -> list[list[float | None]]:
        """The history, JSON-able (NaN as None)."""
        return [[v if math.isfinite(v) else None
                 for v in (h.fwhm, h.ellipticity, float(h.stars), h.transparency, h.background)]
                for h in self._history]

    def restore(self, rows: Iterable[Iterable[Any]]) -> None:
        """Resume from ``state()``."""
        self._history.clear()
        for row in rows:
            f, e, s, t, b = (float("nan") if v is None else float(v) for v in row)
            self._history.append(Measures(f, e, int(s), t, b))


def _clipped(values: np.ndarray) -> tuple[float, float]:
    """Sigma-clipped level and noise: clipped around the median, then the mean and the standard deviation
    of what is kept (continuous even for integer data, where a median moves in whole steps)."""
    if values.size == 0:
        return float("nan"), float("nan")
    keep = values
    level = float(np.median(keep))
    noise = _MAD * float(np.median(np.abs(keep - level)))
    for _ in range(CLIP_PASSES):
        if not noise > 0:
            break
        kept = values[np.abs(values - level) <= CLIP_SIGMA * noise]
        if kept.size < 10:
            break
        keep = kept
        # Mean and deviation (cheap, and continuous for integer data); the clip above is what makes them
        # robust. The next pass clips around this mean.
        level = float(np.mean(keep, dtype=np.float64))
        noise = float(np.std(keep, dtype=np.float64)) / _CLIPPED_STD
    return level, noise


@numba.njit(parallel=True, cache=True, nogil=True)
def _affine_kernel(image: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> None:  # pragma: no cover
    height, width, channels = image.shape
    for y in numba.prange(height):
        for x in range(width):
            for c in range(channels):
                image[y, x, c] = image[y, x, c] * scale[c] + offset[c]


@numba.njit(parallel=True, cache=True, nogil=True)
def _affine_plane(image: np.ndarray, scale: np.float32, offset: np.float32) -> None:  # pragma: no cover
    height, width = image.shape
    for y in numba.prange(height):
        for x in range(width):
            image[y, x] = image[y, x] * scale + offset
