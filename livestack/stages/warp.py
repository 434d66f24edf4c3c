"""Warp: resample a frame onto the reference grid, with the footprint of valid pixels.

Public API:

- ``INTERPOLATIONS``: ``("bilinear", "bicubic", "lanczos")``.
- ``warp(image, matrix, shape, interpolation="bilinear", distortion=None) -> tuple[ndarray, ndarray]``: the
  aligned float32 image (same channels as ``image``) and a ``bool`` footprint ``(H, W)``, True where every
  input sample the interpolation used lies inside the frame. ``matrix`` is a ``Transform.matrix``
  (frame -> reference), ``distortion`` its ``Transform.distortion``.

How it works. OpenCV's ``warpAffine`` resamples all channels (up to 4) in one call; it is given the forward
matrix and inverts it itself, so output pixel ``p`` reads the frame at ``inverse(matrix) @ p``. The footprint
is computed analytically rather than by warping a NaN border: for an affine map, the inverse-mapped column
and row are linear along each output row, so the valid pixels of each row form one interval, found in O(H)
and filled in one pass. That is exact for every kernel (OpenCV's bicubic path spreads a NaN border ~8 px
into valid pixels, so ``isfinite`` would be wrong there) and cheaper than testing every output value.
Pixels outside the footprint are set to NaN.

OpenCV rounds sample positions (to 1/32 px for Lanczos; bilinear and bicubic floor a float position), so a
pixel whose support comes within ``EDGE_MARGIN`` px of the frame edge is left out of the footprint: at most
one extra row or column per edge (an exactly integer shift loses its outermost row and column), never a
pixel that read outside the frame. NaN pixels of the input propagate into the output inside the footprint (the
footprint is geometric); the accumulators skip non-finite values.

Mono bicubic maps close to a shift (a rotation under ~1.7 degrees, or one that close to a flip; see
``TWO_PASS_LIMIT``), the usual case between frames of one night, are resampled by a compiled kernel in two
one-dimensional passes instead (``_two_pass``): along each frame row at the columns the map crosses it, then
along each output column. Each pass splits its rows into runs over which the samples' integer offset is
constant, so its inner loops read memory contiguously and vectorise; positions are not rounded. For a shift
it is Keys' bicubic itself (OpenCV's values to 1e-5); for a small rotation a shear-decomposed bicubic whose
error against stars rendered where the map sends them equals OpenCV's (``tests/test_warp.py``). At 8.3 MP it
takes ~10-13 ms on two cores against OpenCV's 18. The footprint keeps its rule, with the margin along rows
widened by twice the shear, how far the first pass's reads stray from the output pixel's column. Colour
frames stay with OpenCV, whose bicubic reads interleaved channels faster than this kernel could (45 against
77 ms at 8.3 MP).

Sub-pixel accuracy (centroid of a star, measured): bilinear < 0.001 px; Lanczos-4 up to ~0.025 px;
OpenCV's bicubic (Keys, a = -0.75, which does not reproduce a linear ramp) up to 0.048 px, varying with the
sub-pixel phase. Bilinear is the default; Lanczos keeps more detail at a higher cost.

With a distortion correction (``align.Distortion``) the map is no longer affine: a dense map of where each
output pixel reads in the frame is built (float32, one compiled pass over the rows: each row's polynomial in
``u`` has coefficients that depend on the row alone, so a pixel costs a cubic's Horner step per axis) and
OpenCV's ``remap`` resamples with it. The footprint is then tested pixel by pixel in the same pass, with the
same ``EDGE_MARGIN``. ``remap`` rounds positions to 1/32 px like ``warpAffine``; the map is a pure function
of the transform's numbers, so a journaled transform warps a frame again to the same bits.

The stage never changes OpenCV's global state (``cv2.setNumThreads`` belongs to the daemon).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import cv2
import numba
import numpy as np

if TYPE_CHECKING:
    from livestack.stages.align import Distortion

__all__ = ["INTERPOLATIONS", "dense_map", "warp"]

INTERPOLATIONS: tuple[str, ...] = ("bilinear", "bicubic", "lanczos")

EDGE_MARGIN: float = 1.0 / 32.0
"""Pixels whose interpolation support comes within this many pixels of the frame edge are left out of
the footprint: twice OpenCV's worst-case position rounding (1/64 px), which covers its fixed-point slack."""

MAX_CHANNELS: int = 4
"""The most channels OpenCV resamples in one call."""

TWO_PASS_LIMIT: float = 0.03
"""Bicubic warps whose map stays this close to a shift (flips allowed) are done in two compiled passes
(``_two_pass``): how far the frame row read drifts per output column (``|d|``), the shear (``|b / e|``)
and how far the column read's rate differs from one (``|s| - 1``). 0.03 is a rotation of ~1.7 degrees;
beyond it the runs of equal offsets get too short to pay, and OpenCV's ``warpAffine`` is used."""

TWO_PASS_BLOCK: int = 64
"""Output rows per block of the two-pass warp: each block computes the intermediate rows it reads (its
rows plus ~4 plus the drift across the width) into a buffer of about a megabyte at 8.3 MP."""

# OpenCV flag and the support of each kernel around floor(u): samples floor(u) - before ... floor(u) + after.
_KERNELS: dict[str, tuple[int, int, int]] = {
    "bilinear": (cv2.INTER_LINEAR, 0, 1),
    "bicubic": (cv2.INTER_CUBIC, 1, 2),
    "lanczos": (cv2.INTER_LANCZOS4, 3, 4),
}


def warp(image: np.ndarray, matrix: np.ndarray, shape: tuple[int, int], interpolation: str = "bilinear",
         distortion: Distortion | None = None,
         out: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Resample a frame onto the reference grid.

    Parameters
    ----------
    image : ndarray
        ``(h, w)`` or ``(h, w, C)`` with ``C <= 4``; any real dtype (resampled as float32).
    matrix : ndarray
        ``(2, 3)`` affine matrix mapping a frame pixel ``(x = column, y = row)`` onto the reference:
        ``[x_ref, y_ref] = matrix[:, :2] @ [x, y] + matrix[:, 2]``.
    shape : tuple of int
        ``(H, W)`` of the reference grid.
    interpolation : str
        One of ``INTERPOLATIONS``: ``"bilinear"`` (fastest), ``"bicubic"`` or ``"lanczos"`` (Lanczos-4,
        8x8 samples, sharpest and slowest).
    distortion : Distortion, optional
        A smooth correction of where reference pixels are read in the frame, beyond ``matrix`` (see
        ``align.Distortion``); the frame is then resampled through a dense map.
    out : tuple of ndarray, optional
        ``(aligned, footprint)`` arrays of the results' shapes and types (C-contiguous) to write into, e.g.
        the previous frame's, so that a frame-sized array is not allocated anew for each frame (fresh memory
        costs page faults, and on a virtual machine far more). Not used with ``distortion``.

    Returns
    -------
    aligned : ndarray
        float32 ``(H, W)`` or ``(H, W, C)``; NaN outside the footprint.
    footprint : ndarray
        bool ``(H, W)``: True where every frame sample the interpolation read lies inside the frame.

    Raises
    ------
    ValueError
        If the interpolation is unknown, the matrix is not a finite invertible 2x3 array, the image is not
        2-D or 3-D with 1 to 4 channels, or the shape is not two positive integers.
    """
    kernel = _KERNELS.get(interpolation)
    if kernel is None:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, not {interpolation!r}.")
    flag, before, after = kernel
    forward = np.asarray(matrix, dtype=np.float64)
    if forward.shape != (2, 3) or not np.all(np.isfinite(forward)):
        raise ValueError(f"matrix must be a finite 2x3 affine matrix, not an array of shape {forward.shape}.")
    if abs(np.linalg.det(forward[:, :2])) < 1e-12:
        raise ValueError("matrix is singular: it does not map the frame onto an area of the reference.")
    if image.ndim not in (2, 3) or (image.ndim == 3 and not 1 <= image.shape[2] <= MAX_CHANNELS):
        raise ValueError(f"image must be (h, w) or (h, w, C) with 1 to {MAX_CHANNELS} channels, "
                         f"not {image.shape}.")
    if len(shape) != 2 or int(shape[0]) <= 0 or int(shape[1]) <= 0:
        raise ValueError(f"shape must be (H, W) with positive sizes, not {shape}.")
    height, width = int(shape[0]), int(shape[1])

    source = np.ascontiguousarray(image, dtype=np.float32)
    if distortion is not None:
        return _remap(source, forward, distortion, (height, width), flag, before, after)
    aligned, footprint = _outputs(out, (height, width, *source.shape[2:]))
    inverse = cv2.invertAffineTransform(forward)
    if interpolation == "bicubic" and source.ndim == 2 and _two_pass_suits(inverse):
        _bicubic_two_pass(source, inverse, aligned, footprint)
        return aligned, footprint
    # OpenCV takes and gives a single channel as a 2-D array; it writes into ``dst`` when it fits.
    dst = aligned if aligned.ndim == 3 and aligned.shape[2] > 1 else aligned.reshape(height, width)
    result = cv2.warpAffine(source, forward, (width, height), dst=dst, flags=flag,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=(0.0, 0.0, 0.0, 0.0))
    if result is not dst:
        np.copyto(dst, result)
    first, last = _row_intervals(inverse, source.shape[0], source.shape[1], before, after, height, width)
    _fill_footprint(first, last, footprint, aligned.reshape(height, width, -1))
    return aligned, footprint


def _outputs(out: tuple[np.ndarray, np.ndarray] | None,
             shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The caller's output arrays when they fit, else new ones."""
    if out is not None:
        aligned, footprint = out
        if (aligned.shape == shape and aligned.dtype == np.float32 and aligned.flags.c_contiguous
                and aligned.flags.writeable and footprint.shape == shape[:2] and footprint.dtype == np.bool_
                and footprint.flags.c_contiguous and footprint.flags.writeable):
            return aligned, footprint
    return np.empty(shape, dtype=np.float32), np.empty(shape[:2], dtype=np.bool_)


def dense_map(matrix: np.ndarray, distortion: Distortion, shape: tuple[int, int],
              frame_shape: tuple[int, int],
              support: tuple[int, int] = (0, 1)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each pixel of the reference grid is read in the frame, and whether its samples are inside it.

    Parameters
    ----------
    matrix : ndarray
        ``(2, 3)`` frame -> reference.
    distortion : Distortion
    shape : tuple of int
        ``(H, W)`` of the reference grid.
    frame_shape : tuple of int
        ``(h, w)`` of the frame.
    support : tuple of int
        Samples the kernel reads before and after ``floor`` of a position (bilinear: ``(0, 1)``).

    Returns
    -------
    map_x, map_y : ndarray
        float32 ``(H, W)``: the frame column and row each output pixel reads.
    footprint : ndarray
        bool ``(H, W)``.
    """
    inverse = cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))
    height, width = int(shape[0]), int(shape[1])
    map_x = np.empty((height, width), dtype=np.float32)
    map_y = np.empty((height, width), dtype=np.float32)
    footprint = np.empty((height, width), dtype=np.bool_)
    before, after = support
    bounds = np.array([before + EDGE_MARGIN, frame_shape[1] - after - EDGE_MARGIN,
                       before + EDGE_MARGIN, frame_shape[0] - after - EDGE_MARGIN])
    grid = np.zeros((2, 4, 4))
    coefficients = distortion.grid()
    grid[:, : coefficients.shape[1], : coefficients.shape[2]] = coefficients
    norm = np.array([*distortion.centre, distortion.scale])
    _fill_map(inverse, grid, norm, bounds, map_x, map_y, footprint)
    return map_x, map_y, footprint


def _remap(source: np.ndarray, forward: np.ndarray, distortion: Distortion, shape: tuple[int, int], flag: int,
           before: int, after: int) -> tuple[np.ndarray, np.ndarray]:
    height, width = shape
    map_x, map_y, footprint = dense_map(forward, distortion, shape, source.shape[:2], (before, after))
    aligned = cv2.remap(source, map_x, map_y, flag, borderMode=cv2.BORDER_CONSTANT,
                        borderValue=(0.0, 0.0, 0.0, 0.0))
    aligned = aligned.reshape((height, width, *source.shape[2:]))
    _nan_outside(footprint, aligned.reshape(height, width, -1))
    return aligned, footprint


@numba.njit(parallel=True, cache=True, fastmath=False, nogil=True)
def _fill_map(inverse: np.ndarray, grid: np.ndarray, norm: np.ndarray, bounds: np.ndarray, map_x: np.ndarray,
              map_y: np.ndarray, footprint: np.ndarray) -> None:  # pragma: no cover - compiled
    """Affine inverse plus the polynomial at every output pixel (float64 sums, float32 results).

    ``grid`` is ``(2, 4, 4)`` (order 3 or less, zero-padded): per row, the polynomial is a cubic in ``u``
    whose coefficients depend on the row alone, with the affine's column terms folded in, so that the inner
    loop is two cubics in ``x`` that the compiler vectorises.
    """
    height, width = map_x.shape
    cx, cy, inv_scale = norm[0], norm[1], 1.0 / norm[2]
    for y in numba.prange(height):
        v = (y - cy) * inv_scale
        # Row coefficients in u: c_i = sum_j grid[axis, i, j] v**j, then re-expanded in x (u = (x - cx) / s).
        ax = np.empty(4)
        ay = np.empty(4)
        for i in range(4):
            ax[i] = ((grid[0, i, 3] * v + grid[0, i, 2]) * v + grid[0, i, 1]) * v + grid[0, i, 0]
            ay[i] = ((grid[1, i, 3] * v + grid[1, i, 2]) * v + grid[1, i, 1]) * v + grid[1, i, 0]
        x0, x1, x2, x3 = _in_x(ax, cx, inv_scale)
        y0, y1, y2, y3 = _in_x(ay, cx, inv_scale)
        x0 += inverse[0, 1] * y + inverse[0, 2]
        x1 += inverse[0, 0]
        y0 += inverse[1, 1] * y + inverse[1, 2]
        y1 += inverse[1, 0]
        lo_x, hi_x, lo_y, hi_y = bounds[0], bounds[1], bounds[2], bounds[3]
        for x in range(width):
            fx = ((x3 * x + x2) * x + x1) * x + x0
            fy = ((y3 * x + y2) * x + y1) * x + y0
            map_x[y, x] = fx
            map_y[y, x] = fy
            footprint[y, x] = (fx >= lo_x) & (fx <= hi_x) & (fy >= lo_y) & (fy <= hi_y)


@numba.njit(cache=True, nogil=True)
def _in_x(a: np.ndarray, cx: float, k: float) -> tuple[float, float, float, float]:  # pragma: no cover
    """Coefficients in ``x`` of ``sum_i a[i] u**i`` with ``u = k (x - cx)``."""
    d = -cx
    # Expand a0 + a1 k (x + d) + a2 k^2 (x + d)^2 + a3 k^3 (x + d)^3.
    b1, b2, b3 = a[1] * k, a[2] * k * k, a[3] * k * k * k
    c0 = a[0] + b1 * d + b2 * d * d + b3 * d * d * d
    c1 = b1 + 2.0 * b2 * d + 3.0 * b3 * d * d
    c2 = b2 + 3.0 * b3 * d
    return c0, c1, c2, b3


@numba.njit(parallel=True, cache=True, fastmath=False, nogil=True)
def _nan_outside(footprint: np.ndarray, aligned: np.ndarray) -> None:  # pragma: no cover - compiled
    height, width = footprint.shape
    nan = np.float32(np.nan)
    for y in numba.prange(height):
        for x in range(width):
            if not footprint[y, x]:
                aligned[y, x, :] = nan


def _row_intervals(inverse: np.ndarray, frame_h: int, frame_w: int, before: int, after: int,
                   height: int, width: int, slack: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """First and last valid column of each output row (``last < first`` for an empty row).

    Output pixel ``(x, y)`` reads around ``u = a x + b y + c`` (column) and ``v = d x + e y + f`` (row);
    its support lies inside the frame when ``before <= floor(u) <= frame_w - 1 - after``, i.e.
    ``before <= u < frame_w - after``, and likewise for ``v``. Each bound is linear in ``x``. ``slack``
    widens the margin in ``u`` by that many pixels (the two-pass warp reads columns up to that far from
    ``u``).
    """
    rows = np.arange(height, dtype=np.float64)
    first = np.zeros(height, dtype=np.float64)
    last = np.full(height, float(width - 1))
    for (slope, row_coef, offset), size, margin in ((inverse[0], frame_w, EDGE_MARGIN + slack),
                                                    (inverse[1], frame_h, EDGE_MARGIN)):
        low = before + margin - (row_coef * rows + offset)
        high = size - after - margin - (row_coef * rows + offset)
        if slope > 0.0:
            first = np.maximum(first, np.ceil(low / slope))
            last = np.minimum(last, np.floor(high / slope))
        elif slope < 0.0:
            first = np.maximum(first, np.ceil(high / slope))
            last = np.minimum(last, np.floor(low / slope))
        else:
            # The coordinate is constant along the row: the whole row is in or out.
            outside = (low > 0.0) | (high < 0.0)
            last = np.where(outside, -1.0, last)
    # Clip before converting so that huge bounds from nearly parallel edges cannot overflow int64.
    first_i = np.clip(first, 0, width).astype(np.int64)
    last_i = np.clip(last, -1, width - 1).astype(np.int64)
    return first_i, last_i


@numba.njit(parallel=True, cache=True, fastmath=False, nogil=True)
def _fill_footprint(first: np.ndarray, last: np.ndarray, footprint: np.ndarray,
                    aligned: np.ndarray) -> None:  # pragma: no cover - compiled
    """Set each row's footprint interval True and NaN the aligned pixels outside it (in place)."""
    height = aligned.shape[0]
    nan = np.float32(np.nan)
    for y in numba.prange(height):
        start = first[y]
        stop = last[y] + 1
        if stop < start:
            stop = start
        # Only the pixels outside the interval are written twice; the inside is one memset-like pass.
        footprint[y, :start] = False
        footprint[y, start:stop] = True
        footprint[y, stop:] = False
        aligned[y, :start, :] = nan
        aligned[y, stop:, :] = nan


def _two_pass_suits(inverse: np.ndarray) -> bool:
    """Whether the map is close enough to a shift (flips allowed) for the two-pass bicubic warp."""
    a, b, d, e = inverse[0, 0], inverse[0, 1], inverse[1, 0], inverse[1, 1]
    if abs(e) < 0.5:
        return False
    column_scale = a - b * d / e
    return (abs(d) <= TWO_PASS_LIMIT and abs(b / e) <= TWO_PASS_LIMIT
            and abs(abs(column_scale) - 1.0) <= TWO_PASS_LIMIT)


def _bicubic_two_pass(source: np.ndarray, inverse: np.ndarray, aligned: np.ndarray,
                      footprint: np.ndarray) -> None:
    """Keys' bicubic, a pass along the frame's rows then one along the output's columns (``_two_pass``)."""
    height, width = footprint.shape
    # The first pass reads a frame row at the output column's position on that row, up to two rows from
    # where the output pixel lies: that many times the shear b / e further along the row.
    slack = 2.0 * abs(inverse[0, 1] / inverse[1, 1])
    first, last = _row_intervals(inverse, source.shape[0], source.shape[1], 1, 2, height, width, slack)
    # Each block recomputes the ~4 + |d| W intermediate rows it shares with the next: taller blocks for
    # larger drifts keep that overhead under a quarter.
    block = max(TWO_PASS_BLOCK, int(4.0 * abs(inverse[1, 0]) * width))
    _two_pass(source, inverse, first, last, block, numba.get_num_threads(), aligned)
    _fill_footprint(first, last, footprint, aligned.reshape(height, width, 1))


@numba.njit(cache=True, nogil=True, inline="always")
def _cubic_weights(t: float) -> tuple[np.float32, np.float32, np.float32,
                                     np.float32]:  # pragma: no cover - compiled
    """Keys' cubic (``a = -0.75``, OpenCV's) at the four samples around a position ``t`` past the second."""
    a = np.float32(-0.75)
    s = np.float32(t)
    p = s + np.float32(1.0)
    q = np.float32(1.0) - s
    w0 = ((a * p - np.float32(5.0) * a) * p + np.float32(8.0) * a) * p - np.float32(4.0) * a
    w1 = ((a + np.float32(2.0)) * s - (a + np.float32(3.0))) * s * s + np.float32(1.0)
    w2 = ((a + np.float32(2.0)) * q - (a + np.float32(3.0))) * q * q + np.float32(1.0)
    return w0, w1, w2, np.float32(1.0) - w0 - w1 - w2


@numba.njit(parallel=True, cache=True, fastmath=False, nogil=True)
def _two_pass(source: np.ndarray, inverse: np.ndarray, first: np.ndarray, last: np.ndarray, block: int,
              threads: int, aligned: np.ndarray) -> None:  # pragma: no cover - compiled
    """Bicubic warp of a map close to a shift, in two one-dimensional passes over blocks of output rows.

    The output pixel ``(x, y)`` reads the frame at ``u = a x + b y + c``, ``v = d x + e y + f``. With
    ``y = (v - d x - f) / e`` the column becomes ``u = s x + g v + h`` (``s = a - b d / e``, ``g = b / e``,
    ``h = c - b f / e``): the first pass resamples frame row ``v`` along its columns at ``s x + g v + h`` into
    row ``v`` of an intermediate image ``T(x, v)``; the second reads ``T`` along each output column at ``v``.
    On a frame row the read position moves by ``s`` (close to +-1) per output column, and along an output
    row the intermediate row read moves by ``d`` (close to 0): both split into runs over which the sample's
    integer offset is constant, so each inner loop reads contiguous memory with weights computed per pixel
    (no rounding of positions). Each block of output rows computes the intermediate rows it needs into a
    buffer of its chunk's own. ``first`` and ``last`` are each output row's footprint interval, the only
    pixels written (``_fill_footprint`` does the rest).
    """
    frame_h, frame_w = source.shape
    height, width = aligned.shape
    a, b, c = inverse[0, 0], inverse[0, 1], inverse[0, 2]
    d, e, f = inverse[1, 0], inverse[1, 1], inverse[1, 2]
    s = a - b * d / e
    g = b / e
    h = c - b * f / e
    step = 1 if s > 0.0 else -1
    drift = s - step  # how far the read column moves from step * x per output column
    blocks = (height + block - 1) // block
    chunks = min(threads, blocks)
    span = int(block * abs(e) + abs(d) * width) + 6
    for chunk in numba.prange(chunks):
        rows = np.empty((span, width), dtype=np.float32)
        for k in range(chunk * blocks // chunks, (chunk + 1) * blocks // chunks):
            y0 = k * block
            y1 = min(height, y0 + block)
            x_lo, x_hi = width, -1
            for y in range(y0, y1):
                if last[y] >= first[y]:
                    x_lo = min(x_lo, first[y])
                    x_hi = max(x_hi, last[y])
            if x_hi < x_lo:
                continue
            # The frame rows the block reads: v is linear in x and y, so its extremes are at the corners.
            v_a = d * x_lo + e * y0 + f
            v_b = d * x_hi + e * y0 + f
            v_c = d * x_lo + e * (y1 - 1) + f
            v_d = d * x_hi + e * (y1 - 1) + f
            r_lo = max(0, math.floor(min(min(v_a, v_b), min(v_c, v_d))) - 1)
            r_hi = min(frame_h - 1, math.floor(max(max(v_a, v_b), max(v_c, v_d))) + 2)
            for r in range(r_lo, r_hi + 1):
                _along_row(source[r], frame_w, step, drift, g * r + h, x_lo, x_hi, rows[r - r_lo])
            for y in range(y0, y1):
                if last[y] >= first[y]:
                    _along_column(rows, r_lo, d, e * y + f, first[y], last[y], aligned[y])


@numba.njit(cache=True, nogil=True)
def _run_end(x: int, x_hi: int, rate: float, offset: float, base: float) -> int:  # pragma: no cover
    """One past the last ``x <= x_hi`` from ``x`` on with ``floor(rate * x + offset) == base``.

    ``rate * x + offset`` is monotonic in ``x`` in floating point too, so the run is found by a guess from
    the line and checked at its end with the very expression the caller uses.
    """
    if rate == 0.0:
        return x_hi + 1
    guess = (base + (1.0 if rate > 0.0 else 0.0) - offset) / rate
    end = math.ceil(guess) if rate > 0.0 else math.floor(guess) + 1
    end = max(x + 1, min(x_hi + 1, end))
    while end > x + 1 and math.floor(rate * (end - 1) + offset) != base:
        end -= 1
    while end <= x_hi and math.floor(rate * end + offset) == base:
        end += 1
    return end


@numba.njit(cache=True, nogil=True)
def _along_row(row: np.ndarray, frame_w: int, step: int, drift: float, offset: float,
               x_lo: int, x_hi: int, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """First pass: ``out[x]`` = ``row`` read at ``step * x + drift * x + offset``, ``x_lo <= x <= x_hi``.

    Only the columns whose four samples lie inside the row are written; the footprint keeps the second
    pass off the others.
    """
    x = x_lo
    while x <= x_hi:
        base = math.floor(drift * x + offset)
        end = _run_end(x, x_hi, drift, offset, base)
        # Samples floor(u) - 1 ... floor(u) + 2, floor(u) = step * x + base, must lie in [0, frame_w - 1].
        k = base
        if step > 0:
            lo, hi = max(x, 1 - k), min(end - 1, frame_w - 3 - k)
        else:
            lo, hi = max(x, k + 3 - frame_w), min(end - 1, k - 1)
        if hi < lo:
            x = end
            continue
        # Unsigned offsets: the compiler drops its negative-index checks and vectorises the loops (one
        # per direction, so that each reads memory with a unit stride).
        t0 = drift * lo + offset - base
        count = np.uint64(hi - lo + 1)
        first_out = np.uint64(lo)
        if step > 0:
            first_in = np.uint64(lo + k - 1)
            for n in range(count):
                w0, w1, w2, w3 = _cubic_weights(t0 + drift * n)
                i = first_in + n
                out[first_out + n] = w0 * row[i] + w1 * row[i + 1] + w2 * row[i + 2] + w3 * row[i + 3]
        else:
            first_in = np.uint64(k - lo - 1)
            for n in range(count):
                w0, w1, w2, w3 = _cubic_weights(t0 + drift * n)
                i = first_in - n
                out[first_out + n] = w0 * row[i] + w1 * row[i + 1] + w2 * row[i + 2] + w3 * row[i + 3]
        x = end


@numba.njit(cache=True, nogil=True)
def _along_column(rows: np.ndarray, r_lo: int, d: float, offset: float, x_lo: int, x_hi: int,
                  out: np.ndarray) -> None:  # pragma: no cover - compiled
    """Second pass: ``out[x]`` = the intermediate rows read at ``d * x + offset``, ``x_lo <= x <= x_hi``."""
    x = x_lo
    while x <= x_hi:
        base = math.floor(d * x + offset)
        end = _run_end(x, x_hi, d, offset, base)
        r = base - 1 - r_lo
        above, at, below, under = rows[r], rows[r + 1], rows[r + 2], rows[r + 3]
        t0 = d * x + offset - base
        # Unsigned offsets, as in ``_along_row``.
        first = np.uint64(x)
        for n in range(np.uint64(end - x)):
            w0, w1, w2, w3 = _cubic_weights(t0 + d * n)
            i = first + n
            out[i] = w0 * above[i] + w1 * at[i] + w2 * below[i] + w3 * under[i]
        x = end
