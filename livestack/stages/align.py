"""Alignment: the transform that maps a frame's stars onto the reference's.

Public API:

- ``Transform``: frozen 2x3 matrix mapping a frame pixel ``(x = column, y = row)`` onto the reference,
  with its rotation, scale, inliers, residual and the method that found it.
- ``AlignParams``: frozen tuning and validation thresholds.
- ``Alignment``: frozen result: a ``Transform`` or the reason the frame cannot be aligned.
- ``align(reference, stars, guess=None, params=AlignParams()) -> Alignment``.

How it works
------------
*Fast path* (``method="fast"``): the frame's stars are predicted onto the reference with ``guess`` (the
previous frame's transform; the identity without one). A vote over the offsets between every predicted
star and the reference stars within ``search_radius`` finds the drift since the guess (the peak of a 2-D
histogram with ``match_radius`` bins); then nearest neighbours within ``match_radius`` are paired, a
similarity (or affine) transform is fitted by least squares, pairs further than ``clip_sigma`` standard
deviations are clipped, and the pairing is redone with the refined transform (``MATCH_PASSES`` times).
This costs about a millisecond and follows drift, slow field rotation and jumps up to ``search_radius``.

*Fallback* (``method="triangles"``): when the fast path fails validation, astroalign's triangle-invariant
search on the ``triangle_stars`` brightest stars of each list (star lists, never images) finds the
transform whatever the rotation, a 180 degree meridian flip included; the same nearest-neighbour pass over
all stars refines it.

*Validation*: a transform is accepted only when

- at least ``min_inliers`` star pairs survive the clipping;
- their residual RMS (of the residual vector lengths) is at most ``max_rms`` pixels;
- ``matched_fraction`` is at least ``min_matched_fraction``: inliers over the stars expected in common,
  which is the smaller of (reference stars that land inside the frame) and (frame stars that land inside
  the reference), among the ``max_stars`` brightest of each. The smaller count is used so that a frame
  seen through thin cloud, which loses its faint stars, is not rejected while every star it has matches;
- the inliers' bounding box spans at least ``min_spread`` of the frame's width and of its height, so that
  the rotation and scale are measured, not extrapolated from one corner;
- the scale (each singular value of the linear part, for an affine model) is within
  ``1 +- scale_tolerance``.

Conventions: ``matrix`` maps frame pixel ``(x, y)`` (x = column, y = row, pixel centres at integers) onto
the reference. ``rotation`` is counter-clockwise in these axes (from +x towards +y; on a display with row 0
at the top, that is clockwise). A frame whose centre ``c`` lands at ``matrix @ c`` has drifted by
``matrix @ c - c`` in the reference's pixels: the ``dx, dy`` of the data folders' ``transforms.csv``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import astroalign
import numpy as np
from scipy.spatial import cKDTree

from livestack.stages.detect import Stars

__all__ = ["AlignParams", "Alignment", "Transform", "align"]

#: Rounds of (pair by nearest neighbour, fit, clip) in a refinement; each round re-pairs with the transform
#: of the previous one, which recovers the stars a small rotation error kept out of ``match_radius``.
MATCH_PASSES = 3
#: Fit-and-clip iterations inside one round.
CLIP_PASSES = 3
#: Floor of the residual standard deviation used for clipping, pixels: noise-free positions would
#: otherwise clip good stars for residuals of a thousandth of a pixel.
MIN_CLIP_SIGMA = 0.05
#: Fewest pairs a least-squares fit is attempted with.
MIN_FIT_PAIRS = 3


@dataclass(frozen=True)
class Transform:
    """A frame-to-reference transform.

    Attributes
    ----------
    matrix : ndarray
        ``(2, 3)`` float64, read-only: ``[x_ref, y_ref] = matrix[:, :2] @ [x, y] + matrix[:, 2]``.
    rotation : float
        Degrees, counter-clockwise in (x, y) pixel axes, in (-180, 180].
    scale : float
    inliers : int
        Star pairs used in the final fit.
    rms : float
        Residual RMS of the inliers, pixels.
    matched_fraction : float
        Inliers over the stars expected in common: the smaller of the reference stars that fall inside the
        frame and the frame stars that fall inside the reference (see the module docstring).
    method : str
        ``"reference"`` (the reference itself), ``"fast"`` (prediction + nearest neighbour) or
        ``"triangles"`` (astroalign's invariant search).
    """

    matrix: np.ndarray
    rotation: float
    scale: float
    inliers: int
    rms: float
    matched_fraction: float
    method: str

    @property
    def shift(self) -> tuple[float, float]:
        """The translation part ``(tx, ty)``."""
        return float(self.matrix[0, 2]), float(self.matrix[1, 2])

    def apply(self, xy: np.ndarray) -> np.ndarray:
        """Map ``(N, 2)`` frame coordinates onto the reference."""
        return np.asarray(xy, dtype=np.float64) @ self.matrix[:, :2].T + self.matrix[:, 2]

    def centre_shift(self, shape: tuple[int, int]) -> tuple[float, float]:
        """Where the centre of a ``(rows, columns)`` frame lands on the reference, minus the centre.

        The ``dx, dy`` of ``frame`` events and of the real data's ``transforms.csv``.
        """
        centre = np.array([[(shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0]])
        dx, dy = self.apply(centre)[0] - centre[0]
        return float(dx), float(dy)

    @classmethod
    def from_matrix(cls, matrix: np.ndarray, method: str, inliers: int = 0, rms: float = 0.0,
                    matched_fraction: float = 0.0) -> Transform:
        """A transform from its matrix, with rotation and scale derived from it.

        Parameters
        ----------
        matrix : ndarray
            ``(2, 3)``, frame -> reference; copied.
        method : str
        inliers, rms, matched_fraction
            The fit's figures, when there was a fit.

        Returns
        -------
        Transform
            Rotation is the angle of the matrix's rotation part (exact for a similarity, the mean of the
            axes' rotations for an affine fit); scale the square root of its determinant's magnitude.
        """
        m = np.array(matrix, dtype=np.float64)
        rotation = math.degrees(math.atan2(m[1, 0] - m[0, 1], m[0, 0] + m[1, 1]))
        if rotation <= -180.0:
            rotation += 360.0
        return cls(matrix=_frozen(m), rotation=rotation, scale=math.sqrt(abs(float(np.linalg.det(m[:, :2])))),
                   inliers=inliers, rms=rms, matched_fraction=matched_fraction, method=method)

    @classmethod
    def identity(cls) -> Transform:
        """The reference frame's own transform."""
        return cls(matrix=_frozen(np.eye(2, 3)), rotation=0.0, scale=1.0, inliers=0, rms=0.0,
                   matched_fraction=1.0, method="reference")


@dataclass(frozen=True)
class AlignParams:
    """Alignment tuning and validation thresholds (config section ``[align]``).

    Attributes
    ----------
    model : {"similarity", "affine"}
        Shift + rotation + uniform scale, or a full affine transform.
    min_inliers : int
        Fewest matched star pairs for a valid transform (and fewest stars in either list).
    min_matched_fraction : float
        Fewest inliers, as a fraction of the stars expected in common.
    max_rms : float
        Largest residual RMS of the inliers, pixels.
    min_spread : float
        Smallest extent of the inliers, as a fraction of the frame's width and of its height.
    match_radius : float
        Pairing distance for nearest neighbours, pixels (also the bin of the offset vote).
    clip_sigma : float
        Pairs with residuals beyond this many standard deviations are outliers.
    max_stars : int
        At most this many brightest stars of each list are used.
    triangle_stars : int
        The fallback's triangle search uses this many brightest stars of each list.
    search_radius : float
        Largest drift from ``guess``, pixels, that the fast path's offset vote looks for.
    scale_tolerance : float
        The scale must be within ``1 +- scale_tolerance``.
    """

    model: Literal["similarity", "affine"] = "similarity"
    min_inliers: int = 8
    min_matched_fraction: float = 0.2
    max_rms: float = 1.0
    min_spread: float = 0.2
    match_radius: float = 3.0
    clip_sigma: float = 3.0
    max_stars: int = 500
    triangle_stars: int = 50
    search_radius: float = 100.0
    scale_tolerance: float = 0.1


@dataclass(frozen=True)
class Alignment:
    """The outcome of aligning one frame: exactly one of ``transform`` and ``reason`` is set."""

    transform: Transform | None
    reason: str | None

    @property
    def ok(self) -> bool:
        return self.transform is not None


def align(reference: Stars, stars: Stars, guess: Transform | None = None,
          params: AlignParams = AlignParams()) -> Alignment:
    """Find the transform that maps a frame's stars onto the reference's.

    Parameters
    ----------
    reference : Stars
        The reference frame's stars, brightest first.
    stars : Stars
        The frame's stars, brightest first.
    guess : Transform, optional
        A transform close to the answer, usually the previous frame's; the identity when None.
    params : AlignParams
        Tuning and validation thresholds.

    Returns
    -------
    Alignment
        The validated transform (``method`` ``"fast"`` or ``"triangles"``), or ``transform=None`` with a
        one-sentence reason.

    Raises
    ------
    ValueError
        If ``params.model`` is not ``"similarity"`` or ``"affine"``.
    """
    if params.model not in ("similarity", "affine"):
        raise ValueError(f"align model must be 'similarity' or 'affine', not {params.model!r}.")
    needed = params.min_inliers
    if len(stars) < needed:
        return _fail(f"{len(stars)} stars found (at least {needed} needed)")
    if len(reference) < needed:
        return _fail(f"the reference has only {len(reference)} stars (at least {needed} needed)")

    ref = reference.xy[: params.max_stars]
    frm = stars.xy[: params.max_stars]
    tree = cKDTree(ref)
    problem = _Problem(ref=ref, frm=frm, tree=tree, ref_shape=reference.shape, frm_shape=stars.shape,
                       params=params)

    start = np.eye(2, 3) if guess is None else np.asarray(guess.matrix, dtype=np.float64)
    fit = _refine(problem, _vote_shift(problem, start))
    fast_reason = None if fit is None else _invalid(problem, fit)
    if fit is not None and fast_reason is None:
        return Alignment(transform=_transform(problem, fit, "fast"), reason=None)

    try:
        found, _ = astroalign.find_transform(frm[: params.triangle_stars], ref[: params.triangle_stars])
    except (astroalign.MaxIterError, ValueError):
        # When the fast path did pair stars, why that pairing was refused says more than "nothing found".
        return _fail(fast_reason or "no pattern of stars in common with the reference was found")
    fit = _refine(problem, np.asarray(found.params, dtype=np.float64)[:2])
    if fit is None:
        return _fail("the pattern of stars found in common with the reference did not hold over the frame")
    reason = _invalid(problem, fit)
    if reason is not None:
        return _fail(reason)
    return Alignment(transform=_transform(problem, fit, "triangles"), reason=None)


# --------------------------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class _Problem:
    """The star lists of one alignment and what they are checked against."""

    ref: np.ndarray
    frm: np.ndarray
    tree: cKDTree
    ref_shape: tuple[int, int]
    frm_shape: tuple[int, int]
    params: AlignParams


@dataclass(frozen=True)
class _Fit:
    """A fitted matrix with the frame/reference indices of its inlier pairs and their RMS residual."""

    matrix: np.ndarray
    frm_index: np.ndarray
    ref_index: np.ndarray
    rms: float


def _fail(reason: str) -> Alignment:
    return Alignment(transform=None, reason=reason)


def _apply(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ matrix[:, :2].T + matrix[:, 2]


def _vote_shift(problem: _Problem, matrix: np.ndarray) -> np.ndarray:
    """``matrix`` with its translation corrected by the most common offset to nearby reference stars.

    Every (predicted frame star, reference star) pair within ``search_radius`` votes for its offset in a
    2-D histogram; the true drift collects one vote per common star, chance pairs spread thin.
    """
    params = problem.params
    predicted = _apply(matrix, problem.frm)
    pairs = cKDTree(predicted).sparse_distance_matrix(problem.tree, params.search_radius,
                                                      output_type="ndarray")
    if pairs.shape[0] < params.min_inliers:
        return matrix
    offsets = problem.ref[pairs["j"]] - predicted[pairs["i"]]
    nbins = max(1, math.ceil(2.0 * params.search_radius / params.match_radius))
    edges = np.linspace(-params.search_radius, params.search_radius, nbins + 1)
    counts, _, _ = np.histogram2d(offsets[:, 0], offsets[:, 1], bins=(edges, edges))
    # Sum 2x2 neighbouring bins so that a peak split across a bin edge still stands out.
    counts = counts[:-1, :-1] + counts[1:, :-1] + counts[:-1, 1:] + counts[1:, 1:] if nbins > 1 else counts
    ix, iy = np.unravel_index(int(np.argmax(counts)), counts.shape)
    if counts[ix, iy] < params.min_inliers:
        return matrix
    centre = np.array([edges[ix + 1], edges[iy + 1]]) if nbins > 1 else np.zeros(2)
    near = np.hypot(*(offsets - centre).T) <= params.match_radius * 1.5
    shift = np.median(offsets[near], axis=0)
    corrected = matrix.copy()
    corrected[:, 2] += shift
    return corrected


def _refine(problem: _Problem, matrix: np.ndarray) -> _Fit | None:
    """Pair nearest neighbours, fit and clip, re-pairing with each refined transform."""
    params = problem.params
    fit: _Fit | None = None
    for _ in range(MATCH_PASSES):
        predicted = _apply(matrix, problem.frm)
        distance, ref_index = problem.tree.query(predicted, distance_upper_bound=params.match_radius)
        frm_index = np.flatnonzero(np.isfinite(distance))
        ref_index = ref_index[frm_index]
        # One reference star takes only its closest frame star.
        order = np.argsort(distance[frm_index], kind="stable")
        _, first = np.unique(ref_index[order], return_index=True)
        keep = order[first]
        frm_index, ref_index = frm_index[keep], ref_index[keep]
        fit = _fit_clipped(problem, frm_index, ref_index)
        if fit is None:
            return None
        matrix = fit.matrix
    return fit


def _fit_clipped(problem: _Problem, frm_index: np.ndarray, ref_index: np.ndarray) -> _Fit | None:
    params = problem.params
    src_all = problem.frm[frm_index]
    dst_all = problem.ref[ref_index]
    inlier = np.ones(frm_index.size, dtype=bool)
    matrix = np.eye(2, 3)
    for _ in range(CLIP_PASSES):
        if inlier.sum() < MIN_FIT_PAIRS:
            return None
        fitted = _fit(src_all[inlier], dst_all[inlier], params.model)
        if fitted is None:
            return None
        matrix = fitted
        residual = np.hypot(*(_apply(matrix, src_all) - dst_all).T)
        # Per-axis standard deviation of the inliers' residuals (a 2-D residual has two axes' worth).
        sigma = max(math.sqrt(float(np.mean(residual[inlier] ** 2)) / 2.0), MIN_CLIP_SIGMA)
        updated = residual <= params.clip_sigma * sigma
        if np.array_equal(updated, inlier):
            break
        inlier = updated
    if inlier.sum() < MIN_FIT_PAIRS:
        return None
    residual = np.hypot(*(_apply(matrix, src_all[inlier]) - dst_all[inlier]).T)
    return _Fit(matrix=matrix, frm_index=frm_index[inlier], ref_index=ref_index[inlier],
                rms=float(np.sqrt(np.mean(residual**2))))


def _fit(src: np.ndarray, dst: np.ndarray, model: str) -> np.ndarray | None:
    """Least-squares similarity or affine matrix mapping ``src`` onto ``dst``; None when degenerate."""
    src_mean = src.mean(axis=0)
    dst_mean = dst.mean(axis=0)
    p = src - src_mean
    q = dst - dst_mean
    if model == "affine":
        linear, _, rank, _ = np.linalg.lstsq(p, q, rcond=None)
        if rank < 2:
            return None
        a_mat = linear.T
    else:
        norm = float(np.sum(p * p))
        if norm <= 0.0:
            return None
        # Closed form of min sum |[[a, -b], [b, a]] p - q|^2.
        a = float(np.sum(p[:, 0] * q[:, 0] + p[:, 1] * q[:, 1])) / norm
        b = float(np.sum(p[:, 0] * q[:, 1] - p[:, 1] * q[:, 0])) / norm
        a_mat = np.array([[a, -b], [b, a]])
    matrix = np.empty((2, 3))
    matrix[:, :2] = a_mat
    matrix[:, 2] = dst_mean - a_mat @ src_mean
    return matrix


def _inside(xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    rows, cols = shape
    return (xy[:, 0] >= -0.5) & (xy[:, 0] <= cols - 0.5) & (xy[:, 1] >= -0.5) & (xy[:, 1] <= rows - 0.5)


def _matched_fraction(problem: _Problem, fit: _Fit) -> float:
    linear = fit.matrix[:, :2]
    inverse = np.empty((2, 3))
    inverse[:, :2] = np.linalg.inv(linear)
    inverse[:, 2] = -inverse[:, :2] @ fit.matrix[:, 2]
    ref_in_frame = int(_inside(_apply(inverse, problem.ref), problem.frm_shape).sum())
    frm_in_ref = int(_inside(_apply(fit.matrix, problem.frm), problem.ref_shape).sum())
    expected = max(min(ref_in_frame, frm_in_ref), 1)
    return min(1.0, fit.frm_index.size / expected)


def _invalid(problem: _Problem, fit: _Fit) -> str | None:
    """Why ``fit`` cannot be trusted, or None when it passes every check."""
    params = problem.params
    inliers = int(fit.frm_index.size)
    if inliers < params.min_inliers:
        return f"only {inliers} stars matched the reference (at least {params.min_inliers} needed)"
    if not fit.rms <= params.max_rms:
        return (f"the matched stars scatter by {fit.rms:.2f} px RMS around the fit "
                f"(at most {params.max_rms:g} px allowed)")
    singular = np.linalg.svd(fit.matrix[:, :2], compute_uv=False)
    low, high = 1.0 - params.scale_tolerance, 1.0 + params.scale_tolerance
    if singular.min() < low or singular.max() > high:
        return f"the fit implies a scale of {math.sqrt(abs(np.linalg.det(fit.matrix[:, :2]))):.3f} " \
               f"({low:g} to {high:g} allowed)"
    fraction = _matched_fraction(problem, fit)
    if fraction < params.min_matched_fraction:
        return (f"only {fraction:.0%} of the stars in common matched the reference "
                f"(at least {params.min_matched_fraction:.0%} needed)")
    xy = problem.frm[fit.frm_index]
    rows, cols = problem.frm_shape
    span_x = float(np.ptp(xy[:, 0])) / max(cols, 1)
    span_y = float(np.ptp(xy[:, 1])) / max(rows, 1)
    if span_x < params.min_spread or span_y < params.min_spread:
        return (f"the matched stars span only {span_x:.0%} x {span_y:.0%} of the frame "
                f"(at least {params.min_spread:.0%} in each direction needed)")
    return None


def _transform(problem: _Problem, fit: _Fit, method: str) -> Transform:
    return Transform.from_matrix(fit.matrix, method, inliers=int(fit.frm_index.size), rms=fit.rms,
                                 matched_fraction=_matched_fraction(problem, fit))


def _frozen(values: np.ndarray) -> np.ndarray:
    values.setflags(write=False)
    return values
