"""Surface registration: align frames of starless targets (the Moon, the Sun, planets) on their detail.

Public API:

- ``SurfaceParams``: frozen tuning and validation thresholds.
- ``SurfaceFrame``: frozen, cleaned and binned luminance of one frame, with its sharpness and detail.
- ``SurfaceReference``: frozen reference prepared once: its spectrum, pass-band and filtered image.
- ``SurfaceAlignment``: frozen result: a ``Transform`` (the star path's type) or the reason it failed,
  with the confidence measured.
- ``measure(image, defects=None, params) -> SurfaceFrame``.
- ``reference(frame, params) -> SurfaceReference``.
- ``register(reference, frame, guess=None, previous=(), params) -> SurfaceAlignment``.
- ``sharpness(image) -> float``: variance of the Laplacian, relative to the squared mean level.

How it works
------------
*Clean* (``measure``): single-pixel spikes (hot, dead pixels, cosmic rays) are found as pixels that stand
``SPIKE_SIGMA`` noise units off their 3x3 median *and* carry most of their height above the 5x5 median
(real detail, blurred by seeing, is never that sharp); together with a given defect map (the reference's
spikes, a calibration defect map) they are replaced by the 3x3 median. The frame is binned to at most
``work_pixels`` pixels; column and row offsets (the median of each column's difference from its
neighbours) are subtracted.

*Pass-band* (``reference``): the reference is apodised (a Tukey window) and its radially averaged power
spectrum measured. The flat high-frequency floor is the noise and the sensor's pixel-scale fixed pattern;
each frequency is weighted by the Wiener factor ``S / (S + N)`` of the detail above that floor, times a
low cut below ``LOW_CUT`` cycles per pixel (flat-field scales: vignetting, dust shadows, amplifier glow),
with the two axes of the spectrum removed (column and row banding). The filtered ("band-passed")
luminance used for refinement is a difference of Gaussians with the same pass-band.

*Register*: (1) rotation by a Fourier-Mellin step: the weighted magnitude spectra are resampled on a polar
grid (magnitudes do not move with a shift) and correlated along the angle, which cannot tell a turn from
the same turn plus 180 degrees (a meridian flip), so both are tried; (2) translation by phase
correlation of the derotated frame: the cross-power spectrum is normalised to unit magnitude, weighted by
the pass-band and transformed back; the peak is refined to sub-pixel by a Gaussian fit on its 3x3
neighbourhood, and the confidence is the peak's height over the side-lobes (its distance from their mean in
units of their standard deviation); (3) refinement by OpenCV's ECC (Euclidean motion) on the band-passed
images, started from (1)+(2), made twice on complementary halves of the pixels (below) and averaged
(started from the turn whose band-passed images correlate better when a turn and its opposite are nearly as
confident, as on a round disk). When
phase correlation finds no confident peak (a large jump, a small overlap, a large turn), ORB keypoints on
the band-passed images, with a FAST threshold lowered until enough are found, are matched by brute force
and a partial affine transform is fitted with RANSAC; ECC refines it.

*Fixed-pattern guard*: the sensor's fixed pattern (hot pixels, columns, glow, dust, per-pixel offsets)
is the same in every frame at the same pixels, so it correlates at exactly zero shift. The per-pixel part
(offsets, gain) is as fine as the noise and passes any pass-band; once band-passed it is spread over a few
pixels and pulls a refinement of a shift of a few pixels towards zero (0.1-0.2 px at 1.5-4.5 px when it
is at 3x the texture's contrast). So ECC never compares a pixel with itself: it matches the reference
band-passed from the pixels of one colour of a checkerboard (a normalised convolution: the blur of the
pixels kept over the blur of the mask) with the frame band-passed from the other colour, whose fixed
pattern is independent of the first; the surface, smooth at the pixel scale, is the same in both halves.
Both pairings are matched and the two results averaged, which gives back most of the precision that
halving the pixels costs. A turned frame's phase correlation pairs the halves in the same way. Besides
the cleaning and the pass-band above: when the peak lies within ``zero_radius`` of no motion, the
strongest peak outside that radius is examined; if it is confident, it is the target's motion and the
zero peak is the sensor's; otherwise a zero answer needs ``confirm_confidence``, and a weaker one is
rejected as unconfirmed, never returned as a result. Removing every frame's column means (the column
pattern) takes the same line of the spectrum out of each image, which pulls ECC towards no turn (by up to
0.05 deg on 384x288 frames turned 2-3 deg); before ECC, the frame gets its surface's column means back from
the reference seen through the coarse transform, which halves that pull.

*Validation*: the frame is rejected with a reason when its detail is under ``min_detail`` (clouds, a
blank frame), when the confidence is under ``min_confidence``, when
ECC does not converge, reaches a correlation under ``min_correlation`` or moves the phase-correlation
estimate of the frame centre by more than ``max_refine`` pixels, when the result jumps more than
``max_jump`` pixels from every transform in ``previous`` (0 turns that check off), or when the refinement
ends within ``zero_radius`` of no motion although the first estimate had the target move (the fixed
pattern pulled it there).

Conventions: as ``align``'s: ``Transform.matrix`` maps frame pixel ``(x, y)`` (x = column, y = row,
pixel centres at integers) onto the reference; ``rotation`` is counter-clockwise in these axes. A surface
transform is a rotation and a shift (scale 1); its ``method`` is ``"surface"`` (phase correlation) or
``"features"`` (keypoints); ``inliers`` counts the keypoint pairs RANSAC kept (0 for phase correlation);
``rms`` is how far the refinement moved the first estimate of the frame centre's position, pixels;
``matched_fraction`` is the ECC correlation coefficient. All distances are in full-resolution pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from livestack.stages.align import Transform

__all__ = ["SurfaceAlignment", "SurfaceFrame", "SurfaceParams", "SurfaceReference", "measure", "reference",
           "register", "sharpness"]

#: A spike stands this many noise units off its 3x3 median.
SPIKE_SIGMA = 6.0
#: ... and its offset from the 3x3 median is at least this fraction of its height above the 5x5 median.
#: Hot pixels measure ~1; seeing-blurred detail and stars of FWHM >= 2 px well under 0.8.
SPIKE_SHARPNESS = 0.8
#: ``sharpness`` is the Laplacian's variance in units of (a thousandth of the mean level) squared: tens to
#: hundreds for lunar frames.
SHARPNESS_SCALE = 1e6
#: Tukey window: fraction of each side that is tapered.
TAPER = 0.2
#: Frequencies below this many cycles per (working) pixel are flat-field scales, not detail.
LOW_CUT = 1.0 / 64.0
#: The noise floor of the power spectrum is its median over radii from this fraction of Nyquist up.
NOISE_FLOOR_FROM = 0.75
#: Radial bins of the power spectrum.
RADIAL_BINS = 64
#: Polar grid of the Fourier-Mellin step: angles over 180 degrees, and radii.
POLAR_ANGLES = 720
POLAR_RADII = 96
#: Degrees either side of the spectrum's ky = 0 axis (the column pattern's) left out of the polar correlation.
AXIS_MASK = 3.0
#: A side-lobe region excludes this many pixels around a peak (at least; scaled with the peak's width).
PEAK_EXCLUSION = 4
#: ECC iterations and convergence threshold (of the correlation's gain per iteration); ECC matches at most
#: this many pixels of the reference's centre.
ECC_ITERATIONS = 60
ECC_EPSILON = 1e-6
ECC_PIXELS = 300_000
#: ECC leaves out this fraction of the frame's shorter side along its edges, where amplifier glow and
#: vignetting are steepest.
ECC_BORDER = 0.12
#: Keypoints sought per frame; the FAST thresholds tried in turn, until at least ``MIN_KEYPOINTS`` are found.
ORB_FEATURES = 2000
FAST_THRESHOLDS = (20, 10, 5, 2)
MIN_KEYPOINTS = 60
#: Fewest RANSAC inliers for a keypoint transform; RANSAC's reprojection threshold (working pixels).
MIN_FEATURE_INLIERS = 12
RANSAC_THRESHOLD = 2.0
#: Keypoint pairs that moved less than this (working pixels) sit on the sensor's fixed pattern.
FIXED_PAIR_DISTANCE = 1.0
#: Rotations under this (degrees) are left to ECC: derotating by a noisy estimate would not help.
MIN_DEROTATION = 0.2
#: When the turn opposite the most confident one (180 degrees away) reaches this fraction of its confidence,
#: both are refined and ECC's correlation decides (a round disk matches itself turned; lunar detail does not,
#: at a tenth of the confidence).
OPPOSITE_CONFIDENCE = 0.5


@dataclass(frozen=True)
class SurfaceParams:
    """Surface registration tuning and validation thresholds (config section ``[align]``).

    Attributes
    ----------
    min_confidence : float
        Smallest phase-correlation confidence (peak over side-lobes, in side-lobe standard deviations).
    confirm_confidence : float
        Smallest confidence of a result within ``zero_radius`` of no motion (the fixed pattern's place).
    zero_radius : float
        Pixels: a shift this close to zero, with no turn, could be the sensor's fixed pattern.
    min_correlation : float
        Smallest ECC correlation coefficient of the refined transform.
    max_refine : float
        Largest move of the frame centre's position by the refinement, pixels.
    max_jump : float
        Largest move of the frame's corners from the closest of ``previous``, pixels; 0 = no limit.
    min_detail : float
        Smallest detail (``SurfaceFrame.detail``) of a frame that can be registered or be the reference.
    work_pixels : int
        Frames are binned 2x2 or 4x4 until they have at most this many pixels.
    """

    min_confidence: float = 7.0
    confirm_confidence: float = 14.0
    zero_radius: float = 1.0
    min_correlation: float = 0.1
    max_refine: float = 1.5
    max_jump: float = 0.0
    min_detail: float = 1.0
    work_pixels: int = 2_200_000


@dataclass(frozen=True)
class SurfaceFrame:
    """One frame, cleaned and binned for registration.

    Attributes
    ----------
    work : ndarray
        float32 luminance, cleaned of spikes and column/row offsets, binned by ``binning``; read-only.
    spikes : ndarray
        bool, full resolution: the pixels replaced (spikes found plus the defect map given); read-only.
    binning : int
    shape : tuple of int
        Full-resolution ``(rows, columns)``.
    sharpness : float
        ``sharpness`` of the cleaned image.
    detail : float
        Standard deviation of the detail (a difference of Gaussians, 1.5 and 8 working pixels) over the
        pixel noise: ~0.3 for noise alone, well above 1 for a textured surface.
    """

    work: np.ndarray
    spikes: np.ndarray
    binning: int
    shape: tuple[int, int]
    sharpness: float
    detail: float


@dataclass(frozen=True)
class SurfaceReference:
    """A reference frame prepared for registration (computed once per stack)."""

    frame: SurfaceFrame
    window: np.ndarray
    weights: np.ndarray
    spectrum: np.ndarray
    polar: np.ndarray
    filtered: np.ndarray
    halves: tuple[np.ndarray, np.ndarray]
    half_spectrum: np.ndarray
    sigma_low: float
    sigma_high: float


@dataclass(frozen=True)
class SurfaceAlignment:
    """The outcome of registering one frame: exactly one of ``transform`` and ``reason`` is set.

    ``confidence`` is the phase-correlation confidence of the answer (NaN when none was measured) and
    ``correlation`` the ECC correlation coefficient (NaN before refinement).
    """

    transform: Transform | None
    reason: str | None
    confidence: float = math.nan
    correlation: float = math.nan

    @property
    def ok(self) -> bool:
        return self.transform is not None


def sharpness(image: np.ndarray) -> float:
    """How sharp an image is: the variance of its Laplacian over the square of its mean level (x 1e6).

    The image is first smoothed by a Gaussian of 1 pixel so that pixel noise weighs less than detail. The
    figure compares frames of one target in one session (seeing, focus, thin cloud); it means nothing
    across targets.

    Parameters
    ----------
    image : ndarray
        2-D, any real dtype.

    Returns
    -------
    float
        0 for a flat or non-positive image.
    """
    data = np.asarray(image, dtype=np.float32)
    smooth = cv2.GaussianBlur(data, (0, 0), 1.0)
    laplacian = cv2.Laplacian(smooth, cv2.CV_32F)
    level = float(np.mean(smooth))
    if not level > 0.0:
        return 0.0
    return SHARPNESS_SCALE * float(np.var(laplacian)) / (level * level)


def measure(image: np.ndarray, defects: np.ndarray | None = None,
            params: SurfaceParams = SurfaceParams()) -> SurfaceFrame:
    """Clean and bin a frame's luminance for registration, and measure its sharpness and detail.

    Parameters
    ----------
    image : ndarray
        2-D luminance, any real dtype; not modified. Non-finite pixels are treated as defects.
    defects : ndarray, optional
        bool, same shape: pixels known to be bad (a defect map; the reference's spikes).
    params : SurfaceParams

    Returns
    -------
    SurfaceFrame

    Raises
    ------
    ValueError
        When ``image`` is not 2-D or ``defects`` has another shape.
    """
    arr = np.asarray(image)
    if arr.ndim != 2 or arr.size == 0 or arr.dtype.kind not in "iuf":
        raise ValueError(f"image must be a non-empty 2-D array of real numbers, not {arr.dtype} {arr.shape}.")
    if defects is not None and defects.shape != arr.shape:
        raise ValueError(f"defects is {defects.shape} but the image is {arr.shape}.")
    lum = np.array(arr, dtype=np.float32)
    bad = ~np.isfinite(lum)
    if bad.any():
        lum[bad] = np.float32(np.median(lum[~bad])) if (~bad).any() else np.float32(0.0)
    # Banding first: a bright column is a line of single-pixel outliers to the spike test.
    lum = _remove_line_offsets(lum)
    med3 = cv2.medianBlur(lum, 3)
    offset = lum - med3
    sigma = _mad_sigma(offset)
    spikes = _spikes(lum, offset, sigma)
    spikes |= bad
    if defects is not None:
        spikes |= defects.astype(bool)
    lum[spikes] = med3[spikes]
    binning = 1
    while lum.size / (binning * binning) > params.work_pixels and binning < 4:
        binning *= 2
    work = lum if binning == 1 else cv2.resize(lum, (lum.shape[1] // binning, lum.shape[0] // binning),
                                               interpolation=cv2.INTER_AREA)
    work = _remove_line_offsets(work)
    noise = _mad_sigma(work - cv2.medianBlur(work, 3))
    dog = cv2.GaussianBlur(work, (0, 0), 1.5) - _wide_blur(work, 8.0)
    edge = 16
    inner = dog[edge:-edge, edge:-edge] if min(dog.shape) > 4 * edge else dog
    detail = float(np.std(inner)) / noise if noise > 0 else 0.0
    return SurfaceFrame(work=_frozen(work), spikes=_frozen(spikes), binning=binning,
                        shape=(int(arr.shape[0]), int(arr.shape[1])), sharpness=sharpness(work),
                        detail=detail)


def reference(frame: SurfaceFrame, params: SurfaceParams = SurfaceParams()) -> SurfaceReference:
    """Prepare a reference: window, pass-band, spectrum, polar magnitudes and filtered image.

    Parameters
    ----------
    frame : SurfaceFrame
        The reference's ``measure``.
    params : SurfaceParams

    Returns
    -------
    SurfaceReference
    """
    work = frame.work
    window = _tukey(work.shape)
    spectrum = np.fft.rfft2((work - np.float32(work.mean())) * window)
    weights, k_half = _passband(spectrum, work.shape)
    # Gaussian sigmas whose difference passes what the weights pass: the high cut where a Gaussian's
    # transfer falls to one half at ``k_half``, the low cut at ``LOW_CUT``.
    factor = math.sqrt(math.log(2.0) / (2.0 * math.pi**2))
    sigma_high = min(max(factor / max(k_half, 1e-3), 0.7), 6.0)
    sigma_low = max(factor / LOW_CUT, 3.0 * sigma_high)
    filtered = _dog(work, sigma_high, sigma_low)
    polar = _polar(np.abs(spectrum) * weights, work.shape)
    halves = (_frozen(_half_dog(work, sigma_high, sigma_low, 0)),
              _frozen(_half_dog(work, sigma_high, sigma_low, 1)))
    half = _half_blur(work, sigma_high, 0)
    half_spectrum = np.fft.rfft2((half - np.float32(half.mean())) * window)
    return SurfaceReference(frame=frame, window=_frozen(window), weights=_frozen(weights),
                            spectrum=_frozen(spectrum), polar=_frozen(polar), filtered=_frozen(filtered),
                            halves=halves, half_spectrum=_frozen(half_spectrum),
                            sigma_low=sigma_low, sigma_high=sigma_high)


def register(ref: SurfaceReference, frame: SurfaceFrame, guess: Transform | None = None,
             previous: Sequence[Transform] = (), params: SurfaceParams = SurfaceParams()) -> SurfaceAlignment:
    """Find the rotation and shift that map a frame onto the reference, on the target's surface detail.

    Parameters
    ----------
    ref : SurfaceReference
    frame : SurfaceFrame
        The frame's ``measure`` (best made with ``defects=ref.frame.spikes``).
    guess : Transform, optional
        Usually the previous frame's transform: its turn is tried beside the Fourier-Mellin estimate
        (phase correlation searches every shift by itself).
    previous : sequence of Transform
        Transforms the result must lie within ``params.max_jump`` of (one of them), usually the previous
        frame's; empty for no check.
    params : SurfaceParams

    Returns
    -------
    SurfaceAlignment

    Raises
    ------
    ValueError
        When the frame and the reference differ in shape.
    """
    if frame.shape != ref.frame.shape or frame.binning != ref.frame.binning:
        raise ValueError(f"the frame is {frame.shape} but the reference is {ref.frame.shape}.")
    if frame.detail < params.min_detail:
        return SurfaceAlignment(None, f"too little surface detail to align on (detail {frame.detail:.2f}, "
                                      f"at least {params.min_detail:g} needed): clouds, a blank frame or "
                                      f"another target")
    work = frame.work
    spectrum = np.fft.rfft2((work - np.float32(work.mean())) * ref.window)
    angles = _rotations(ref, spectrum, work.shape)
    filtered = _dog(work, ref.sigma_high, ref.sigma_low)

    # Candidate turns: the Fourier-Mellin estimate and the guess's (a slowly turning field); the most
    # confident phase correlation wins. Magnitude spectra cannot tell a turn from the same turn plus 180
    # degrees (a meridian flip), so the winner's opposite is always tried too (a flipped frame can still
    # correlate, weakly but above the threshold, with a wrong shift at the unflipped turn), and every
    # candidate's opposite when none was confident.
    candidates: list[float] = []
    for turn in (*([] if guess is None else [guess.rotation]), *angles):
        if all(abs(turn - c) >= MIN_DEROTATION for c in candidates):
            candidates.append(turn)
    coarse: np.ndarray | None = None
    turn = math.nan
    confidence = math.nan
    reason: str | None = None
    method = "surface"
    inliers = 0
    tried: list[tuple[float, np.ndarray | None, float]] = []
    pending = list(candidates)
    while pending:
        candidate = pending.pop(0)
        found, found_confidence, found_reason = _phase_translation(ref, work, spectrum, candidate, params)
        tried.append((candidate, found, found_confidence))
        if found is not None and (coarse is None or found_confidence > confidence):
            coarse, turn, confidence, reason = found, candidate, found_confidence, None
        elif coarse is None and (math.isnan(confidence) or found_confidence > confidence):
            confidence, reason = found_confidence, found_reason
        if not pending and len(tried) == len(candidates):
            opposites = [turn + 180.0] if coarse is not None else [c + 180.0 for c in candidates]
            pending = [c for c in opposites if all(_turn_apart(c, t) >= MIN_DEROTATION for t, _, _ in tried)]
    # A round disk correlates almost as well turned by 180 degrees (a planet's): when the opposite of the
    # winning turn is nearly as confident, the band-passed images' correlation decides between the two.
    rival = None if coarse is None else next(
        (found for t, found, c in tried if found is not None and _turn_apart(t, turn + 180.0) < MIN_DEROTATION
         and c >= OPPOSITE_CONFIDENCE * confidence), None)
    if coarse is None:
        matched = _match_features(ref.filtered, filtered)
        if matched is None:
            return SurfaceAlignment(
                None, reason or "no surface detail in common with the reference was found", confidence)
        coarse, inliers = matched
        confidence = _confirm(ref, filtered, coarse)
        if confidence < params.min_confidence:
            return SurfaceAlignment(None, f"the keypoints matched but the surface does not confirm them "
                                          f"(confidence {confidence:.1f}, at least {params.min_confidence:g} "
                                          f"needed)", confidence)
        method = "features"

    if rival is not None and _agreement(ref, filtered, rival) > _agreement(ref, filtered, coarse):
        coarse = rival
    refined = _refine(ref, work, coarse)
    if refined is None:
        return SurfaceAlignment(None, "the surface refinement (ECC) did not converge", confidence)
    matrix_work, correlation = refined
    if correlation < params.min_correlation:
        return SurfaceAlignment(None, f"the refined surface correlates by only {correlation:.2f} with the "
                                      f"reference (at least {params.min_correlation:g} needed)",
                                confidence, correlation)
    b = frame.binning
    coarse_full = _to_full(coarse, b)
    matrix = _to_full(matrix_work, b)
    move = _centre_move(coarse_full, matrix, frame.shape)
    if move > params.max_refine:
        return SurfaceAlignment(None, f"the refinement moved the phase-correlation estimate by {move:.1f} px "
                                      f"(at most {params.max_refine:g} allowed)", confidence, correlation)
    identity = np.eye(2, 3)
    if (_corner_move(identity, matrix, frame.shape) <= params.zero_radius
            < _corner_move(identity, coarse_full, frame.shape)):
        return SurfaceAlignment(None, "the refinement slid back to no motion, where the sensor's fixed "
                                      "pattern matches; not confirmed", confidence, correlation)
    if params.max_jump > 0 and previous:
        jump = min(_corner_move(p.matrix, matrix, frame.shape) for p in previous)
        if jump > params.max_jump:
            return SurfaceAlignment(None, f"the surface jumped {jump:.0f} px from the previous frame "
                                          f"(at most {params.max_jump:g} allowed)", confidence, correlation)
    transform = Transform.from_matrix(matrix, method, inliers=inliers, rms=move, matched_fraction=correlation)
    return SurfaceAlignment(transform, None, confidence, correlation)


# --------------------------------------------------------------------------------------------- helpers


def _frozen(values: np.ndarray) -> np.ndarray:
    values.setflags(write=False)
    return values


def _mad_sigma(values: np.ndarray) -> float:
    """Gaussian sigma from the median absolute deviation of a strided sample."""
    step = max(1, int(math.sqrt(values.size / 250_000)))
    sample = values[::step, ::step].ravel()
    med = float(np.median(sample))
    sigma = 1.4826 * float(np.median(np.abs(sample - med)))
    return sigma if sigma > 0 else max(float(np.std(sample)), 1e-6)


def _spikes(lum: np.ndarray, offset: np.ndarray, sigma: float) -> np.ndarray:
    """Pixels ``SPIKE_SIGMA`` noise units off their 3x3 median that carry most of their height above their
    5x5 median (taken at those candidates only: over the whole frame it costs ~10x more)."""
    rows, cols = np.nonzero(np.abs(offset) > SPIKE_SIGMA * sigma)
    spikes = np.zeros(lum.shape, dtype=bool)
    if rows.size == 0:
        return spikes
    padded = np.pad(lum, 2, mode="reflect")
    dy, dx = np.mgrid[0:5, 0:5]
    around = padded[rows[:, None, None] + dy, cols[:, None, None] + dx].reshape(rows.size, 25)
    height = lum[rows, cols] - np.median(around, axis=1)
    off = offset[rows, cols]
    keep = (off * height > 0.0) & (np.abs(off) >= SPIKE_SHARPNESS * np.abs(height))
    spikes[rows[keep], cols[keep]] = True
    return spikes


def _remove_line_offsets(work: np.ndarray) -> np.ndarray:
    """Subtract each column's mean: the sensor's column pattern, whatever its scale.

    This empties one axis of the image's spectrum, which carries a negligible share of a two-dimensional
    scene's detail but all of a column pattern's. Rows are left alone: row noise changes from frame to frame
    (it is no fixed pattern), and a planet's belts often lie along the rows.
    """
    out = np.array(work, dtype=np.float32)
    level = np.float32(out.mean())
    out -= out.mean(axis=0, keepdims=True)
    out += level
    return out


def _tukey(shape: tuple[int, ...]) -> np.ndarray:
    def one(n: int) -> np.ndarray:
        w = np.ones(n, dtype=np.float32)
        taper = max(1, int(TAPER * n))
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(taper) + 0.5) / taper)
        w[:taper] = ramp
        w[n - taper:] = ramp[::-1]
        return w

    return np.outer(one(int(shape[0])), one(int(shape[1])))


def _frequencies(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    ky = np.fft.fftfreq(int(shape[0]))[:, None]
    kx = np.fft.rfftfreq(int(shape[1]))[None, :]
    return kx, ky


def _passband(spectrum: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, float]:
    """Wiener weights of the detail above the noise floor, with the low cut and the axes removed."""
    kx, ky = _frequencies(shape)
    k = np.hypot(kx, ky)
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float64)
    edges = np.linspace(0.0, 0.5, RADIAL_BINS + 1)
    index = np.clip(np.digitize(k, edges) - 1, 0, RADIAL_BINS - 1)
    inside = k <= 0.5
    sums = np.bincount(index[inside], weights=power[inside], minlength=RADIAL_BINS)
    counts = np.bincount(index[inside], minlength=RADIAL_BINS)
    radial = sums / np.maximum(counts, 1)
    floor = float(np.median(radial[int(NOISE_FLOOR_FROM * RADIAL_BINS):]))
    signal = np.maximum(radial - floor, 0.0)
    wiener = signal / (signal + max(floor, 1e-30))
    centres = 0.5 * (edges[:-1] + edges[1:])
    passing = centres[wiener >= 0.5]
    k_half = float(passing.max()) if passing.size else float(centres[1])
    weights = np.interp(k, centres, wiener).astype(np.float32)
    weights *= (1.0 - np.exp(-0.5 * (k / LOW_CUT) ** 2)).astype(np.float32)
    # ky = 0: what is constant down the columns, the column pattern (removed from the images already).
    weights[0, :] = 0.0
    return weights, k_half


def _dog(work: np.ndarray, sigma_high: float, sigma_low: float) -> np.ndarray:
    return np.asarray(cv2.GaussianBlur(work, (0, 0), sigma_high) - _wide_blur(work, sigma_low))


def _checkerboard(shape: tuple[int, ...], parity: int) -> np.ndarray:
    rows, cols = int(shape[0]), int(shape[1])
    return ((np.arange(rows)[:, None] + np.arange(cols)[None, :]) % 2 == parity).astype(np.float32)


def _half_blur(work: np.ndarray, sigma: float, parity: int) -> np.ndarray:
    """A Gaussian blur of the pixels of one checkerboard colour (``(row + column) % 2 == parity``) alone.

    A normalised convolution: the blur of the pixels kept over the same blur of the mask estimates the
    blurred surface everywhere from those pixels only.
    """
    mask = _checkerboard(work.shape, parity)
    sigma = max(sigma, 0.7)
    blurred = cv2.GaussianBlur(work * mask, (0, 0), sigma) / cv2.GaussianBlur(mask, (0, 0), sigma)
    return np.asarray(blurred, dtype=np.float32)


def _half_dog(work: np.ndarray, sigma_high: float, sigma_low: float, parity: int) -> np.ndarray:
    """``_dog`` of the pixels of one checkerboard colour alone (see ``_half_blur``)."""
    mask = _checkerboard(work.shape, parity)
    low = _wide_blur(work * mask, sigma_low) / _wide_blur(mask, sigma_low)
    return np.asarray(_half_blur(work, sigma_high, parity) - low, dtype=np.float32)


def _restore_columns(ref: SurfaceReference, work: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """The frame with its surface's column means put back, as the reference sees them through ``coarse``.

    ``measure`` takes each column's mean out of every frame (the sensor's column pattern), and with it the
    surface's own; the same line of the spectrum missing from both images pulls ECC towards no turn. The
    reference, seen through the coarse transform, supplies the frame's column means of the surface without the
    frame's column pattern (the reference's own missing line lands elsewhere once turned). Columns the
    reference covers for less than half their length get nothing back.
    """
    rows, cols = work.shape
    seen = cv2.warpAffine(ref.frame.work, coarse, (cols, rows), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=np.nan)
    inside = np.isfinite(seen)
    counts = inside.sum(axis=0)
    sums = np.where(inside, seen, 0.0).sum(axis=0)
    means = np.where(counts > rows // 2, sums / np.maximum(counts, 1), np.nan)
    level = np.nanmean(means) if np.isfinite(means).any() else 0.0
    means = np.where(np.isfinite(means), means - level, 0.0)
    return np.asarray(work + means[None, :].astype(np.float32), dtype=np.float32)


def _refine(ref: SurfaceReference, work: np.ndarray, coarse: np.ndarray) -> tuple[np.ndarray, float] | None:
    """ECC's refinement of a coarse frame -> reference matrix (working pixels) and its correlation, or None.

    The reference's pixels of one checkerboard colour against the frame's of the other, both ways: no pixel's
    fixed pattern meets itself (see the module's notes).
    """
    source = _restore_columns(ref, work, coarse)
    refined = [_ecc(ref.halves[parity], _half_dog(source, ref.sigma_high, ref.sigma_low, 1 - parity), coarse,
                    ref.sigma_low) for parity in (0, 1)]
    if refined[0] is None or refined[1] is None:
        return None
    return _mean_rigid(refined[0][0], refined[1][0]), 0.5 * (refined[0][1] + refined[1][1])


def _agreement(ref: SurfaceReference, filtered: np.ndarray, matrix: np.ndarray) -> float:
    """Correlation coefficient of the band-passed reference and frame, seen through ``matrix``.

    Over the reference's central ``ECC_PIXELS`` (as ECC), where the frame covers it: a warp and a dot product,
    a fraction of an ECC run.
    """
    rows, cols = filtered.shape
    side = min(1.0, math.sqrt(ECC_PIXELS / (rows * cols)))
    h, w = max(16, int(rows * side)), max(16, int(cols * side))
    y0, x0 = (rows - h) // 2, (cols - w) // 2
    # The crop's pixel (x, y) is the reference's (x + x0, y + y0): read the frame there.
    shifted = np.vstack([matrix, [0.0, 0.0, 1.0]])
    shifted = (np.array([[1.0, 0.0, -x0], [0.0, 1.0, -y0], [0.0, 0.0, 1.0]]) @ shifted)[:2]
    warped = cv2.warpAffine(filtered, shifted, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                            borderValue=np.nan)
    template = ref.filtered[y0:y0 + h, x0:x0 + w]
    inside = np.isfinite(warped)
    if inside.sum() < 16:
        return -1.0
    a = warped[inside] - warped[inside].mean()
    b = template[inside] - template[inside].mean()
    norm = math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
    return float(np.dot(a, b)) / norm if norm > 0 else -1.0


def _turn_apart(a: float, b: float) -> float:
    """How far apart two turns are, degrees, in [0, 180]."""
    return abs((a - b + 180.0) % 360.0 - 180.0)


def _mean_rigid(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The rotation-and-shift halfway between two: mean angle, mean translation."""
    # The mean of the two directions, not of the two angles: -179.9 and 179.9 degrees make 180, not 0.
    angle = math.atan2(a[1, 0] + b[1, 0], a[0, 0] + b[0, 0])
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.5 * (a[0, 2] + b[0, 2])], [s, c, 0.5 * (a[1, 2] + b[1, 2])]])


def _wide_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian blur of ``sigma`` >= 4 px made on a copy binned by ``sigma / 2``, scaled back up bilinearly.

    A few times faster than at full size; what it keeps is far below the binned copy's Nyquist frequency.
    """
    factor = int(sigma // 2)
    if factor < 2 or min(image.shape) < 16 * factor:
        return np.asarray(cv2.GaussianBlur(image, (0, 0), sigma))
    rows, cols = image.shape
    small = cv2.resize(image, (cols // factor, rows // factor), interpolation=cv2.INTER_AREA)
    # The binning itself blurs by a box of ``factor`` pixels (variance factor^2 / 12).
    residual = math.sqrt(max(sigma * sigma - factor * factor / 12.0, 0.25)) / factor
    small = cv2.GaussianBlur(small, (0, 0), residual)
    return np.asarray(cv2.resize(small, (cols, rows), interpolation=cv2.INTER_LINEAR))


def _polar(magnitude: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Weighted magnitudes on a polar grid: angles [-90, 90) degrees (rows) by log-spaced radii (columns).

    Each radius is normalised to zero mean and unit variance so that all frequencies vote alike.
    """
    rows, cols = int(shape[0]), int(shape[1])
    # fftshift along y so that ky runs monotonically; x is the rfft half-axis (kx >= 0).
    shifted = np.fft.fftshift(magnitude, axes=0).astype(np.float32)
    angles = np.radians(np.linspace(-90.0, 90.0, POLAR_ANGLES, endpoint=False))
    radii = np.geomspace(max(LOW_CUT, 2.0 / min(rows, cols)), 0.45, POLAR_RADII)
    kx = np.cos(angles)[:, None] * radii[None, :]
    ky = np.sin(angles)[:, None] * radii[None, :]
    map_x = (kx * cols).astype(np.float32)
    map_y = (ky * rows + rows // 2).astype(np.float32)
    grid = cv2.remap(shifted, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    grid = np.log1p(np.asarray(grid, dtype=np.float32))
    grid -= grid.mean(axis=0, keepdims=True)
    spread = grid.std(axis=0, keepdims=True)
    grid = grid / np.maximum(spread, np.float32(1e-12))
    # The ky = 0 axis carries the removed column pattern, fixed to the sensor: it would vote for no turn.
    degrees = np.degrees(angles)
    grid[np.abs(degrees) < AXIS_MASK] = 0.0
    return np.asarray(grid, dtype=np.float32)


def _rotations(ref: SurfaceReference, spectrum: np.ndarray, shape: tuple[int, ...]) -> list[float]:
    """Fourier-Mellin: turns (degrees, in (-90, 90]) that match the polar magnitudes.

    The first correlates the frame's polar magnitudes with the reference's; the sensor's fixed pattern, the
    same in both at the same frequencies, pulls it towards no turn. The second correlates the frame's minus
    the reference's, where that pattern cancels: the target's turn leaves a peak there (pushed a little away
    from zero by the trough the subtraction leaves at zero).
    """
    polar = _polar(np.abs(spectrum) * ref.weights, shape)
    reference_rings = np.fft.rfft(ref.polar, axis=0)
    return [_angular_peak(reference_rings * np.conj(np.fft.rfft(frame, axis=0)))
            for frame in (polar, polar - ref.polar)]


def _angular_peak(cross: np.ndarray) -> float:
    score = np.fft.irfft(cross.sum(axis=1), n=POLAR_ANGLES)
    peak = int(np.argmax(score))
    left, right = score[(peak - 1) % POLAR_ANGLES], score[(peak + 1) % POLAR_ANGLES]
    denominator = left - 2.0 * score[peak] + right
    offset = 0.5 * (left - right) / denominator if denominator < 0 else 0.0
    step = 180.0 / POLAR_ANGLES
    angle = (peak + offset) * step
    if angle > 90.0:
        angle -= 180.0
    # The polar grid's angle runs with the frame's turn relative to the reference, which is the transform's.
    return float(angle)


def _rotate_about_centre(angle_deg: float, shape: tuple[int, ...]) -> np.ndarray:
    """2x3 matrix turning points by ``angle_deg`` counter-clockwise about the centre of ``shape``."""
    cx, cy = (shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    linear = np.array([[c, -s], [s, c]])
    matrix = np.empty((2, 3))
    matrix[:, :2] = linear
    matrix[:, 2] = np.array([cx, cy]) - linear @ np.array([cx, cy])
    return matrix


def _phase_translation(ref: SurfaceReference, work: np.ndarray, spectrum: np.ndarray, angle: float,
                       params: SurfaceParams) -> tuple[np.ndarray | None, float, str | None]:
    """Phase correlation of the frame turned by ``angle``; the coarse frame -> reference matrix (working px).

    Without a turn, the frame's spectrum minus the reference's is correlated (the sensor's fixed pattern,
    the same in both at the same pixels, cancels exactly): the surface has the target's peak at its shift
    and a trough of the same shape at zero, and no fixed-pattern peak.
    """
    no_turn = abs(angle) < MIN_DEROTATION
    b = ref.frame.binning
    width = _peak_width(ref.sigma_high)
    zero = params.zero_radius / b
    if no_turn:
        turn = np.eye(2, 3)
        surface = _correlation_surface(ref.spectrum, spectrum, ref.weights, work.shape)
        peak, confidence = _best_peak(surface, exclude=None, width=width)
        if math.hypot(*peak) <= zero:
            # Zero is where the sensor's fixed pattern matches. The reference's pixels of one checkerboard
            # colour against the frame's of the other share no per-pixel pattern: a confident peak away from
            # zero there is the target's motion. Failing that, the frame minus the reference holds no fixed
            # pattern at all: when its surface has a confident peak, the target moved, and that peak says
            # where to (a turn too small to take out first blurs and shifts that peak a little).
            half = _half_blur(work, ref.sigma_high, 1)
            halves = _correlation_surface(ref.half_spectrum,
                                          np.fft.rfft2((half - np.float32(half.mean())) * ref.window),
                                          ref.weights, work.shape)
            moved, moved_confidence = _best_peak(halves, exclude=None, width=width)
            if math.hypot(*moved) <= zero:
                other = _correlation_surface(ref.spectrum, spectrum, ref.weights, work.shape, difference=True)
                moved, moved_confidence = _best_peak(other, exclude=None, width=width)
            if moved_confidence >= params.min_confidence:
                peak, confidence = moved, moved_confidence
            elif confidence < params.confirm_confidence:
                return None, confidence, (
                    f"the frame matches the reference only near zero shift, with weak confidence "
                    f"{confidence:.1f} (the sensor's fixed pattern would do that; at least "
                    f"{params.confirm_confidence:g} needed to confirm)")
    else:
        # Turned, the frame's fixed pattern no longer cancels against the reference's; it still peaks near
        # zero (about the centre of the turn). Matching the reference's pixels of one checkerboard colour
        # with the frame's of the other leaves it no pixel to meet itself at.
        turn = _rotate_about_centre(angle, work.shape)
        turned = cv2.warpAffine(_half_blur(work, ref.sigma_high, 1), turn, (work.shape[1], work.shape[0]),
                                flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        spectrum = np.fft.rfft2((turned - np.float32(turned.mean())) * ref.window)
        surface = _correlation_surface(ref.half_spectrum, spectrum, ref.weights, work.shape)
        peak, confidence = _best_peak(surface, exclude=None, width=width)
    if confidence < params.min_confidence:
        return None, confidence, (f"no surface detail in common with the reference: confidence "
                                  f"{confidence:.1f} (at least {params.min_confidence:g} needed; clouds, "
                                  f"a blank frame or another target)")
    matrix = np.array(turn, dtype=np.float64)
    matrix[:, 2] += np.asarray(peak)
    return matrix, confidence, None


def _correlation_surface(ref_spectrum: np.ndarray, spectrum: np.ndarray, weights: np.ndarray,
                         shape: tuple[int, ...], difference: bool = False) -> np.ndarray:
    """Weighted phase correlation; with ``difference``, of the frame minus the reference, whitened by the
    reference's power (linear in the frame, so what both share cancels bin by bin)."""
    if difference:
        # ref x conj(frame - ref) = W gamma (e^(i k.d) - 1) in the target's frequencies, with gamma the
        # share of the target in the reference's power: its square, negated, has the phase of e^(i k.d)
        # (the shift alone), so the surface peaks at the shift, unbiased by the trough at zero.
        cross = ref_spectrum * np.conj(spectrum - ref_spectrum)
        cross = -(cross * cross)
        cross *= weights / np.maximum(np.abs(cross), 1e-30 * float(np.abs(cross).max()) + 1e-30)
    else:
        cross = ref_spectrum * np.conj(spectrum)
        magnitude = np.abs(cross)
        cross *= weights / np.maximum(magnitude, 1e-30 * float(magnitude.max()) + 1e-30)
    surface: np.ndarray = np.fft.irfft2(cross, s=(int(shape[0]), int(shape[1])))
    return surface


def _peak_width(sigma_high: float) -> int:
    return max(PEAK_EXCLUSION, math.ceil(3.0 * sigma_high))


def _best_peak(surface: np.ndarray, exclude: tuple[float, float, float] | None,
               width: int) -> tuple[tuple[float, float], float]:
    """The highest peak (sub-pixel shift ``(dx, dy)``) and its confidence over the side-lobes.

    ``exclude`` = ``(dx, dy, radius)``: a disc of shifts not to look in.
    """
    rows, cols = surface.shape
    values = surface
    if exclude is not None:
        ex, ey, radius = exclude
        dy = (np.arange(rows) + rows // 2) % rows - rows // 2
        dx = (np.arange(cols) + cols // 2) % cols - cols // 2
        near = np.hypot(dx[None, :] - ex, dy[:, None] - ey) <= radius
        values = np.where(near, -np.inf, surface)
    flat = int(np.argmax(values))
    py, px = divmod(flat, cols)
    sub_y = _gaussian_offset(surface[(py - 1) % rows, px], surface[py, px], surface[(py + 1) % rows, px])
    sub_x = _gaussian_offset(surface[py, (px - 1) % cols], surface[py, px], surface[py, (px + 1) % cols])
    shift_y = ((py + rows // 2) % rows - rows // 2) + sub_y
    shift_x = ((px + cols // 2) % cols - cols // 2) + sub_x
    # Side-lobes: everything outside a box around the peak (and outside the excluded disc).
    mask = np.ones(surface.shape, dtype=bool)
    ys = np.arange(py - width, py + width + 1) % rows
    xs = np.arange(px - width, px + width + 1) % cols
    mask[np.ix_(ys, xs)] = False
    if exclude is not None:
        mask &= np.isfinite(values)
    lobes = surface[mask]
    spread = float(np.std(lobes))
    confidence = (float(surface[py, px]) - float(np.mean(lobes))) / spread if spread > 0 else 0.0
    # With reference x conj(frame), the peak sits at the shift that takes the frame onto the reference.
    return (float(shift_x), float(shift_y)), confidence


def _gaussian_offset(left: float, centre: float, right: float) -> float:
    """Sub-pixel offset of a peak from three samples: a parabola through their logarithms."""
    if centre > 0 and left > 0 and right > 0:
        a, b, c = math.log(left), math.log(centre), math.log(right)
    else:
        a, b, c = left, centre, right
    denominator = a - 2.0 * b + c
    if denominator >= 0:
        return 0.0
    return float(np.clip(0.5 * (a - c) / denominator, -0.5, 0.5))


def _ecc(template: np.ndarray, image: np.ndarray, coarse: np.ndarray,
         sigma_low: float) -> tuple[np.ndarray, float] | None:
    """Refine a frame -> reference matrix (working pixels) by ECC; None when it does not converge.

    On a frame larger than ``ECC_PIXELS``, ECC matches the central part of the reference of that many pixels
    (against the whole frame, so every pixel it maps from is there): its cost grows with the pixels, and
    its precision there is already a few hundredths of a pixel.

    OpenCV's Euclidean ECC does not converge from a turn beyond 90 degrees (a meridian flip gives NaN), so
    such a frame is matched turned by 180 degrees, an exact reversal of its pixels, and the result turned
    back.
    """
    if coarse[0, 0] + coarse[1, 1] < 0.0:
        rows, cols = image.shape
        # Pixel (x, y) of the reversed image is pixel (cols - 1 - x, rows - 1 - y) of the frame, and back.
        reverse = np.array([[-1.0, 0.0, cols - 1.0], [0.0, -1.0, rows - 1.0]])
        turned = _ecc(template, np.ascontiguousarray(image[::-1, ::-1]), _compose(coarse, reverse), sigma_low)
        return None if turned is None else (_compose(turned[0], reverse), turned[1])
    rows, cols = template.shape
    x0 = y0 = 0
    if rows * cols > ECC_PIXELS:
        side = math.sqrt(ECC_PIXELS / (rows * cols))
        h, w = max(64, int(rows * side)), max(64, int(cols * side))
        y0, x0 = (rows - h) // 2, (cols - w) // 2
        template = np.ascontiguousarray(template[y0:y0 + h, x0:x0 + w])
    # ECC's warp maps template pixels onto the image's: the inverse of frame -> reference, after the crop's
    # offset (the crop's pixel (x, y) is the reference's (x + x0, y + y0)).
    offset = np.array([[1.0, 0.0, x0], [0.0, 1.0, y0]])
    start = _compose(cv2.invertAffineTransform(coarse), offset).astype(np.float32)
    mask = np.zeros(image.shape, dtype=np.uint8)
    margin = max(math.ceil(2.0 * sigma_low), int(ECC_BORDER * min(image.shape)))
    if min(image.shape) > 4 * margin:
        mask[margin:-margin, margin:-margin] = 1
    else:
        mask[:] = 1
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, ECC_ITERATIONS, ECC_EPSILON)
    try:
        correlation, warp = cv2.findTransformECC(template, image, start, cv2.MOTION_EUCLIDEAN, criteria,
                                                 mask, 1)
    except cv2.error:
        return None
    if not np.all(np.isfinite(warp)):
        return None
    undo = np.array([[1.0, 0.0, -x0], [0.0, 1.0, -y0]])
    reference_to_frame = _compose(np.asarray(warp, dtype=np.float64), undo)
    return cv2.invertAffineTransform(reference_to_frame).astype(np.float64), float(correlation)


def _compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The 2x3 matrix of ``a`` applied after ``b``."""
    m = (np.vstack([np.asarray(a, dtype=np.float64), [0.0, 0.0, 1.0]])
         @ np.vstack([np.asarray(b, dtype=np.float64), [0.0, 0.0, 1.0]]))
    return m[:2]


def _to_full(matrix: np.ndarray, binning: int) -> np.ndarray:
    """A working-pixel matrix in full-resolution pixels (a binned pixel's centre is a block's centre)."""
    if binning == 1:
        return np.asarray(matrix, dtype=np.float64)
    b = float(binning)
    offset = (b - 1.0) / 2.0
    # full = b * work + offset  =>  work = (full - offset) / b
    to_full = np.array([[b, 0.0, offset], [0.0, b, offset], [0.0, 0.0, 1.0]])
    to_work = np.linalg.inv(to_full)
    m = np.vstack([matrix, [0.0, 0.0, 1.0]])
    return (to_full @ m @ to_work)[:2]


def _centre_move(a: np.ndarray, b: np.ndarray, shape: tuple[int, int]) -> float:
    """Distance between where two matrices send the frame's centre, pixels."""
    rows, cols = shape
    centre = np.array([(cols - 1) / 2.0, (rows - 1) / 2.0])
    pa = np.asarray(a)[:, :2] @ centre + np.asarray(a)[:, 2]
    pb = np.asarray(b)[:, :2] @ centre + np.asarray(b)[:, 2]
    return float(np.hypot(*(pa - pb)))


def _corner_move(a: np.ndarray, b: np.ndarray, shape: tuple[int, int]) -> float:
    """Largest distance between where two matrices send the frame's corners, pixels."""
    rows, cols = shape
    corners = np.array([[0.0, 0.0], [cols - 1.0, 0.0], [0.0, rows - 1.0], [cols - 1.0, rows - 1.0]])
    pa = corners @ np.asarray(a)[:, :2].T + np.asarray(a)[:, 2]
    pb = corners @ np.asarray(b)[:, :2].T + np.asarray(b)[:, 2]
    return float(np.max(np.hypot(*(pa - pb).T)))


def _to_uint8(filtered: np.ndarray) -> np.ndarray:
    sigma = _mad_sigma(filtered)
    scaled = np.clip(filtered / np.float32(8.0 * sigma) * 127.0 + 128.0, 0, 255)
    return scaled.astype(np.uint8)


def _keypoints(image8: np.ndarray) -> tuple[list[cv2.KeyPoint], np.ndarray | None]:
    """ORB keypoints, lowering the FAST threshold until enough are found (faint frames)."""
    found: tuple[list[cv2.KeyPoint], np.ndarray | None] = ([], None)
    for threshold in FAST_THRESHOLDS:
        orb = cv2.ORB_create(nfeatures=ORB_FEATURES, fastThreshold=threshold,  # type: ignore[attr-defined]
                             edgeThreshold=15, patchSize=15)
        keypoints, descriptors = orb.detectAndCompute(image8, None)
        found = (list(keypoints), descriptors)
        if len(keypoints) >= MIN_KEYPOINTS:
            break
    return found


def _match_features(ref_filtered: np.ndarray, filtered: np.ndarray) -> tuple[np.ndarray, int] | None:
    """Keypoints, brute-force matching and RANSAC: a coarse frame -> reference matrix and its inliers."""
    ref_points, ref_desc = _keypoints(_to_uint8(ref_filtered))
    points, desc = _keypoints(_to_uint8(filtered))
    if ref_desc is None or desc is None or min(len(ref_points), len(points)) < MIN_FEATURE_INLIERS:
        return None
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True)
    matches = matcher.match(desc, ref_desc)
    src = np.array([points[m.queryIdx].pt for m in matches], dtype=np.float32).reshape(-1, 2)
    dst = np.array([ref_points[m.trainIdx].pt for m in matches], dtype=np.float32).reshape(-1, 2)
    # Pairs that did not move are the sensor's fixed pattern, not the target.
    moved = np.hypot(*(dst - src).T) >= FIXED_PAIR_DISTANCE
    src, dst = src[moved], dst[moved]
    if src.shape[0] < MIN_FEATURE_INLIERS:
        return None
    matrix, inlier = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC,
                                                 ransacReprojThreshold=RANSAC_THRESHOLD)
    if matrix is None or inlier is None or int(inlier.sum()) < MIN_FEATURE_INLIERS:
        return None
    # The partial affine allows a scale; the surface model is a rotation and a shift.
    angle = math.atan2(matrix[1, 0], matrix[0, 0])
    c, s = math.cos(angle), math.sin(angle)
    rigid = np.array([[c, -s, 0.0], [s, c, 0.0]])
    keep = inlier.ravel().astype(bool)
    rigid[:, 2] = (dst[keep] - src[keep] @ rigid[:, :2].T).mean(axis=0)
    return rigid, int(keep.sum())


def _confirm(ref: SurfaceReference, filtered: np.ndarray, matrix: np.ndarray) -> float:
    """Confidence of a transform: phase correlation of the frame warped onto the reference, at zero."""
    shape = filtered.shape
    warped = cv2.warpAffine(filtered, matrix, (shape[1], shape[0]), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    spectrum = np.fft.rfft2(warped * ref.window)
    ref_spectrum = np.fft.rfft2(ref.filtered * ref.window)
    surface = _correlation_surface(ref_spectrum, spectrum, ref.weights, shape)
    peak, confidence = _best_peak(surface, exclude=None, width=_peak_width(ref.sigma_high))
    return confidence if math.hypot(*peak) <= 2.0 else 0.0
