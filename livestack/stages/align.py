"""Alignment: the transform that maps a frame's stars onto the reference's.

Public API:

- ``Transform``: frozen 2x3 matrix mapping a frame pixel ``(x = column, y = row)`` onto the reference,
  with its rotation, scale, inliers, residual and the method that found it, and the smooth distortion
  correction that goes with it on a wide field.
- ``Distortion``: frozen polynomial correction of where a reference pixel reads in the frame (SIP-like).
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

*Distortion* (``params.distortion`` ``"auto"`` or ``"on"``): a lens or a wide field bends the sky, so
after an affine fit the stars of a distant dither still miss by pixels near the corners, in a smooth
pattern. The stars are paired again with the affine prediction, a polynomial of order
``DISTORTION_ORDER`` in normalised reference coordinates (``u = (x - cx) / s``, ``v = (y - cy) / s``,
``c`` the centre and ``s`` the half diagonal of the box around the reference stars the frame sees) is
fitted to where the reference's stars land in the frame beyond the affine, pairs beyond ``clip_sigma`` are
clipped, and the pairing is redone with the corrected prediction (``MATCH_PASSES`` times), which brings in
the corner stars the affine missed.
The non-linear coefficients carry a small ridge penalty (``DISTORTION_RIDGE``) so that the surface stays
smooth between stars. The correction is fitted only when it is well constrained: at least
``DISTORTION_MIN_STARS`` pairs, with ``DISTORTION_CELL_STARS`` of them in every cell but
``DISTORTION_EMPTY_CELLS`` (and in at least ``DISTORTION_MIN_CELLS``) of the ``DISTORTION_GRID`` x
``DISTORTION_GRID`` cells of the reference whose centre the frame sees: only where the frame overlaps the
reference is the correction used. ``"on"`` then applies it;
``"auto"`` applies it only when it measurably helps: its held-out residual RMS (``DISTORTION_FOLDS``-fold
cross-validation) must be at most ``DISTORTION_GAIN`` times, and ``DISTORTION_MIN_GAIN`` pixels below,
that of an affine map fitted the same way. A narrow, undistorted field leaves it off (the correction then
fits noise, and noise does not cross-validate). The affine ``matrix`` is the same with or without it.

Conventions: ``matrix`` maps frame pixel ``(x, y)`` (x = column, y = row, pixel centres at integers) onto
the reference. ``rotation`` is counter-clockwise in these axes (from +x towards +y; on a display with row 0
at the top, that is clockwise). A frame whose centre ``c`` lands at ``matrix @ c`` has drifted by
``matrix @ c - c`` in the reference's pixels: the ``dx, dy`` of the data folders' ``transforms.csv``.
A ``Distortion`` goes the other way, as the warp reads: reference pixel ``p`` is read in the frame at
``inverse(matrix) @ p + correction(p)`` (``Transform.frame_position``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import astroalign
import numpy as np

from livestack.stages.detect import Stars
from livestack.stages.neighbours import nearest, within

__all__ = ["DISTORTION_MODES", "AlignParams", "Alignment", "Distortion", "Transform", "align"]

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

#: ``AlignParams.distortion``: never correct distortion, correct it when it measurably helps, or whenever the
#: stars constrain it.
DISTORTION_MODES: tuple[str, ...] = ("off", "auto", "on")
#: Highest total degree of the distortion polynomial (10 coefficients per axis at 3): enough for the radial
#: distortion of a camera lens seen through a dither, few enough for a few hundred stars.
DISTORTION_ORDER = 3
#: Fewest star pairs a distortion correction is fitted with (five per coefficient of one axis).
DISTORTION_MIN_STARS = 50
#: The reference is cut into this many cells per side to check that the pairs cover the frame's view of it.
DISTORTION_GRID = 3
#: Of the cells whose centre the frame sees, at least ``DISTORTION_MIN_CELLS`` and all but
#: ``DISTORTION_EMPTY_CELLS`` must each hold ``DISTORTION_CELL_STARS`` pairs: a polynomial extrapolated
#: into an empty corner can bend anywhere.
DISTORTION_MIN_CELLS = 4
DISTORTION_EMPTY_CELLS = 1
DISTORTION_CELL_STARS = 3
#: Ridge weight on the non-linear coefficients, per star, in coordinates normalised on the overlap: shrinks a
#: coefficient the stars barely constrain (fifty stars on a narrow field then do not cross-validate a
#: correction), and changes a well-measured one by about a hundredth. At 1e-3 the bias pushed a far dither's
#: overlap corner out of the clipping and bent a 2% barrel's correction there by pixels.
DISTORTION_RIDGE = 1e-4
#: Folds of the cross-validation that ``"auto"`` decides with.
DISTORTION_FOLDS = 5
#: ``"auto"``: the held-out RMS with the correction must be at most this fraction of the affine's ...
DISTORTION_GAIN = 0.8
#: ... and lower by at least this many pixels (a tenth of a typical centroid error would not show).
DISTORTION_MIN_GAIN = 0.03


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
    distortion : Distortion or None
        The smooth correction the warp applies on top of ``matrix``; None when none is applied. With one,
        ``inliers`` and ``rms`` are those of the corrected fit.
    rms_before, rms_after : float or None
        When a distortion correction was evaluated: the residual RMS of the star pairs it was fitted to
        without it (the affine ``matrix`` alone) and with it, pixels, whether or not it is applied. None
        when it was not evaluated (``distortion = "off"``, or too few stars spread over the frame).
    """

    matrix: np.ndarray
    rotation: float
    scale: float
    inliers: int
    rms: float
    matched_fraction: float
    method: str
    distortion: Distortion | None = None
    rms_before: float | None = None
    rms_after: float | None = None

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

    def frame_position(self, xy: np.ndarray) -> np.ndarray:
        """Where ``(N, 2)`` reference pixels are read in the frame: the inverse map, with the distortion."""
        xy = np.asarray(xy, dtype=np.float64)
        inverse = _inverse(self.matrix)
        out = xy @ inverse[:, :2].T + inverse[:, 2]
        if self.distortion is not None:
            out += self.distortion.correction(xy)
        return out

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
class Distortion:
    """A smooth correction of where reference pixels are read in a frame, beyond the affine transform.

    Reference pixel ``(x, y)`` is read in the frame at ``inverse(matrix) @ (x, y) + (P_x(u, v), P_y(u, v))``
    with ``u = (x - centre[0]) / scale``, ``v = (y - centre[1]) / scale`` and
    ``P(u, v) = sum_k coeffs[k] * u**i_k * v**j_k`` over the terms of ``terms(order)``: every ``(i, j)`` with
    ``i + j <= order``, by degree then by falling power of ``u``. The constant and linear terms let the fit
    adjust the affine part; the warp evaluates exactly this, so the same numbers always give the same warp.

    Attributes
    ----------
    centre : tuple of float
        ``(cx, cy)``, reference pixels.
    scale : float
        Pixels per unit of ``u`` and ``v``.
    order : int
    coeffs_x, coeffs_y : tuple of float
        One per term, pixels.
    """

    centre: tuple[float, float]
    scale: float
    order: int
    coeffs_x: tuple[float, ...]
    coeffs_y: tuple[float, ...]

    def __post_init__(self) -> None:
        if not 1 <= self.order <= DISTORTION_ORDER:
            raise ValueError(f"a distortion's order must be 1 to {DISTORTION_ORDER}, not {self.order}.")
        count = len(self.terms(self.order))
        if len(self.coeffs_x) != count or len(self.coeffs_y) != count:
            raise ValueError(f"a distortion of order {self.order} has {count} coefficients per axis, not "
                             f"{len(self.coeffs_x)} and {len(self.coeffs_y)}.")
        values = (*self.centre, self.scale, *self.coeffs_x, *self.coeffs_y)
        if not all(math.isfinite(v) for v in values) or not self.scale > 0:
            raise ValueError("a distortion needs finite coefficients and a positive scale.")

    @staticmethod
    def terms(order: int) -> tuple[tuple[int, int], ...]:
        """The ``(i, j)`` exponents of ``u**i * v**j``, in the order of the coefficients."""
        return tuple((degree - j, j) for degree in range(order + 1) for j in range(degree + 1))

    def correction(self, xy: np.ndarray) -> np.ndarray:
        """The ``(N, 2)`` offsets, frame pixels, added to the affine inverse at reference pixels ``xy``."""
        design = _design(self._normalised(np.asarray(xy, dtype=np.float64)), self.order)
        return np.column_stack([design @ np.asarray(self.coeffs_x), design @ np.asarray(self.coeffs_y)])

    def grid(self) -> np.ndarray:
        """Coefficients as ``(2, order + 1, order + 1)``: ``[axis, i, j]`` multiplies ``u**i * v**j``."""
        out = np.zeros((2, self.order + 1, self.order + 1))
        for k, (i, j) in enumerate(self.terms(self.order)):
            out[0, i, j] = self.coeffs_x[k]
            out[1, i, j] = self.coeffs_y[k]
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dictionary that ``from_json`` turns back into an equal value (floats round-trip)."""
        return {"centre": list(self.centre), "scale": self.scale, "order": self.order,
                "x": list(self.coeffs_x), "y": list(self.coeffs_y)}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Distortion:
        """The distortion a ``to_json`` dictionary describes.

        Raises
        ------
        ValueError
            When the dictionary does not describe a distortion.
        """
        try:
            centre = value["centre"]
            return cls(centre=(float(centre[0]), float(centre[1])), scale=float(value["scale"]),
                       order=int(value["order"]), coeffs_x=tuple(float(v) for v in value["x"]),
                       coeffs_y=tuple(float(v) for v in value["y"]))
        except (KeyError, IndexError, TypeError) as exc:
            raise ValueError(f"not a distortion: {exc}") from exc

    def _normalised(self, xy: np.ndarray) -> np.ndarray:
        return (xy - np.asarray(self.centre)) / self.scale


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
    distortion : {"off", "auto", "on"}
        Whether a smooth distortion correction is fitted and applied (see the module docstring).
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
    distortion: Literal["off", "auto", "on"] = "auto"


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
        If ``params.model`` is not ``"similarity"`` or ``"affine"``, or ``params.distortion`` not one of
        ``DISTORTION_MODES``.
    """
    if params.model not in ("similarity", "affine"):
        raise ValueError(f"align model must be 'similarity' or 'affine', not {params.model!r}.")
    if params.distortion not in DISTORTION_MODES:
        raise ValueError(f"align distortion must be one of {', '.join(DISTORTION_MODES)}, "
                         f"not {params.distortion!r}.")
    needed = params.min_inliers
    if len(stars) < needed:
        return _fail(f"{len(stars)} stars found (at least {needed} needed)")
    if len(reference) < needed:
        return _fail(f"the reference has only {len(reference)} stars (at least {needed} needed)")

    ref = reference.xy[: params.max_stars]
    frm = stars.xy[: params.max_stars]
    problem = _Problem(ref=ref, frm=frm, ref_shape=reference.shape, frm_shape=stars.shape,
                       params=params)

    start = np.eye(2, 3) if guess is None else np.asarray(guess.matrix, dtype=np.float64)
    fit = _distort(problem, _refine(problem, _vote_shift(problem, start)))
    fast_reason = None if fit is None else _invalid(problem, fit)
    if fit is not None and fast_reason is None:
        return Alignment(transform=_transform(problem, fit, "fast"), reason=None)

    try:
        found, _ = astroalign.find_transform(frm[: params.triangle_stars], ref[: params.triangle_stars])
    except (astroalign.MaxIterError, ValueError):
        # When the fast path did pair stars, why that pairing was refused says more than "nothing found".
        return _fail(fast_reason or "no pattern of stars in common with the reference was found")
    fit = _distort(problem, _refine(problem, np.asarray(found.params, dtype=np.float64)[:2]))
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
    ref_shape: tuple[int, int]
    frm_shape: tuple[int, int]
    params: AlignParams


@dataclass(frozen=True)
class _Fit:
    """A fitted matrix with the frame/reference indices of its inlier pairs and their RMS residual.

    With a distortion correction applied, the pairs and the RMS are those of the corrected fit.
    """

    matrix: np.ndarray
    frm_index: np.ndarray
    ref_index: np.ndarray
    rms: float
    distortion: Distortion | None = None
    rms_before: float | None = None
    rms_after: float | None = None


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
    frm_index, ref_index, _ = within(problem.ref, predicted, params.search_radius)
    if frm_index.size < params.min_inliers:
        return matrix
    offsets = problem.ref[ref_index] - predicted[frm_index]
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
        distance, ref_index = nearest(problem.ref, predicted, params.match_radius)
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
    found = Transform.from_matrix(fit.matrix, method, inliers=int(fit.frm_index.size), rms=fit.rms,
                                  matched_fraction=_matched_fraction(problem, fit))
    return replace(found, distortion=fit.distortion, rms_before=fit.rms_before, rms_after=fit.rms_after)


def _inverse(matrix: np.ndarray) -> np.ndarray:
    inverse = np.empty((2, 3))
    inverse[:, :2] = np.linalg.inv(matrix[:, :2])
    inverse[:, 2] = -inverse[:, :2] @ matrix[:, 2]
    return inverse


def _design(uv: np.ndarray, order: int) -> np.ndarray:
    """``(N, terms)``: the polynomial's terms at normalised points ``uv``, in ``Distortion.terms`` order."""
    u_pow = uv[:, 0:1] ** np.arange(order + 1)
    v_pow = uv[:, 1:2] ** np.arange(order + 1)
    return np.column_stack([u_pow[:, i] * v_pow[:, j] for i, j in Distortion.terms(order)])


def _solve(design: np.ndarray, target: np.ndarray, order: int) -> np.ndarray | None:
    """Ridge least squares of ``target`` ``(N, 2)`` on ``design``; the non-linear terms are penalised."""
    penalised = np.array([i + j >= 2 for i, j in Distortion.terms(order)], dtype=np.float64)
    normal = design.T @ design + np.diag(penalised * DISTORTION_RIDGE * design.shape[0])
    try:
        return np.linalg.solve(normal, design.T @ target)
    except np.linalg.LinAlgError:
        return None


def _distort(problem: _Problem, fit: _Fit | None) -> _Fit | None:
    """``fit`` with a distortion correction when ``params.distortion`` asks for one and the stars allow it.

    The correction is fitted in the direction the warp reads (reference -> frame), so the stars are paired
    around their predicted frame positions; see the module docstring for the steps and the decision.
    """
    params = problem.params
    if fit is None or params.distortion == "off":
        return fit
    inverse = _inverse(fit.matrix)
    base = _apply(inverse, problem.ref)
    centre, scale = _overlap_box(problem, base)
    design_all = _design((problem.ref - centre) / scale, DISTORTION_ORDER)
    coeffs = np.zeros((design_all.shape[1], 2))
    ref_index = frm_index = np.empty(0, dtype=np.intp)
    for _ in range(MATCH_PASSES):
        distance, found = nearest(problem.frm, base + design_all @ coeffs, params.match_radius)
        ref_index = np.flatnonzero(np.isfinite(distance))
        frm_index = found[ref_index]
        # One frame star takes only its closest reference star.
        order = np.argsort(distance[ref_index], kind="stable")
        _, first = np.unique(frm_index[order], return_index=True)
        keep = np.sort(order[first])
        ref_index, frm_index = ref_index[keep], frm_index[keep]
        if ref_index.size < DISTORTION_MIN_STARS:
            return fit
        offsets = problem.frm[frm_index] - base[ref_index]
        design = design_all[ref_index]
        inlier = np.ones(ref_index.size, dtype=bool)
        for _ in range(CLIP_PASSES):
            solved = _solve(design[inlier], offsets[inlier], DISTORTION_ORDER)
            if solved is None:
                return fit
            coeffs = solved
            residual = np.hypot(*(design @ coeffs - offsets).T)
            sigma = max(math.sqrt(float(np.mean(residual[inlier] ** 2)) / 2.0), MIN_CLIP_SIGMA)
            updated = residual <= params.clip_sigma * sigma
            if np.array_equal(updated, inlier) or updated.sum() < DISTORTION_MIN_STARS:
                break
            inlier = updated
        ref_index, frm_index = ref_index[inlier], frm_index[inlier]
        if ref_index.size < DISTORTION_MIN_STARS:
            return fit
    if not _covers(problem, problem.ref[ref_index], inverse):
        return fit
    offsets = problem.frm[frm_index] - base[ref_index]
    design = design_all[ref_index]
    rms_before = float(np.sqrt(np.mean(np.sum(offsets**2, axis=1))))
    rms_after = float(np.sqrt(np.mean(np.sum((design @ coeffs - offsets) ** 2, axis=1))))
    if params.distortion == "auto":
        held_affine = _held_out(design[:, : len(Distortion.terms(1))], offsets, 1)
        held_poly = _held_out(design, offsets, DISTORTION_ORDER)
        if held_poly > min(DISTORTION_GAIN * held_affine, held_affine - DISTORTION_MIN_GAIN):
            return replace(fit, rms_before=rms_before, rms_after=rms_after)
    distortion = Distortion(centre=(float(centre[0]), float(centre[1])), scale=scale,
                            order=DISTORTION_ORDER, coeffs_x=tuple(float(v) for v in coeffs[:, 0]),
                            coeffs_y=tuple(float(v) for v in coeffs[:, 1]))
    return _Fit(matrix=fit.matrix, frm_index=frm_index, ref_index=ref_index, rms=rms_after,
                distortion=distortion, rms_before=rms_before, rms_after=rms_after)


def _overlap_box(problem: _Problem, base: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre and half diagonal of the box around the reference stars the frame sees (``base``: in the frame).

    The polynomial is written in coordinates normalised on the overlap, not on the whole reference: on a
    frame dithered far, the overlap is one side of the reference, where powers of whole-frame coordinates are
    nearly collinear and the ridge would bend the fit.
    """
    rows, cols = problem.ref_shape
    seen = problem.ref[_inside(base, problem.frm_shape)]
    if seen.shape[0] < 2:
        return np.array([(cols - 1) / 2.0, (rows - 1) / 2.0]), math.hypot(cols, rows) / 2.0
    low, high = seen.min(axis=0), seen.max(axis=0)
    return (low + high) / 2.0, max(float(np.hypot(*(high - low))) / 2.0, 1.0)


def _covers(problem: _Problem, xy: np.ndarray, inverse: np.ndarray) -> bool:
    """Whether the pairs fill the cells of the reference the frame sees, so the polynomial is pinned there."""
    rows, cols = problem.ref_shape
    cx = np.clip((xy[:, 0] + 0.5) * DISTORTION_GRID // cols, 0, DISTORTION_GRID - 1).astype(np.intp)
    cy = np.clip((xy[:, 1] + 0.5) * DISTORTION_GRID // rows, 0, DISTORTION_GRID - 1).astype(np.intp)
    counts = np.bincount(cy * DISTORTION_GRID + cx, minlength=DISTORTION_GRID**2)
    steps = (np.arange(DISTORTION_GRID) + 0.5) / DISTORTION_GRID
    gx, gy = np.meshgrid(steps * cols - 0.5, steps * rows - 0.5)
    centres = np.column_stack([gx.ravel(), gy.ravel()])
    seen = _inside(_apply(inverse, centres), problem.frm_shape)
    filled = counts[seen] >= DISTORTION_CELL_STARS
    return int(filled.sum()) >= max(DISTORTION_MIN_CELLS, int(seen.sum()) - DISTORTION_EMPTY_CELLS)


def _held_out(design: np.ndarray, offsets: np.ndarray, order: int) -> float:
    """RMS of each pair's residual when it is left out of the fit (``DISTORTION_FOLDS``-fold, interleaved)."""
    squared = 0.0
    for fold in range(DISTORTION_FOLDS):
        test = np.zeros(offsets.shape[0], dtype=bool)
        test[fold::DISTORTION_FOLDS] = True
        coeffs = _solve(design[~test], offsets[~test], order)
        if coeffs is None:
            return math.inf
        squared += float(np.sum((design[test] @ coeffs - offsets[test]) ** 2))
    return math.sqrt(squared / offsets.shape[0])


def _frozen(values: np.ndarray) -> np.ndarray:
    values.setflags(write=False)
    return values
