"""The two-pass bicubic warp by its definition, in float64 numpy: an answer independent of the kernel.

``livestack.stages.warp`` resamples bicubic maps close to a shift in two passes (its module docstring):
output pixel ``(x, y)`` reads frame row ``v = d x + e y + f`` and its neighbours, each resampled along the
row with Keys' cubic (``a = -0.75``) at ``u = s x + g row + h`` (``s = a - b d / e``, ``g = b / e``,
``h = c - b f / e`` for the inverse map ``u = a x + b y + c``), then Keys across the rows at ``v``.
"""

from __future__ import annotations

import cv2
import numpy as np

from livestack.stages.warp import TWO_PASS_LIMIT


def keys(distance: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with ``a = -0.75`` (OpenCV's)."""
    a, t = -0.75, np.abs(distance)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def takes_two_passes(matrix: np.ndarray) -> bool:
    """The documented rule: the map's drifts all within ``TWO_PASS_LIMIT``."""
    (a, b, _), (d, e, _) = cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))
    if abs(e) < 0.5:
        return False
    return max(abs(d), abs(b / e), abs(abs(a - b * d / e) - 1.0)) <= TWO_PASS_LIMIT


def two_pass_reference(frame: np.ndarray, matrix: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Values at output pixels ``(ys, xs)`` of a frame (2-D) warped by ``matrix`` (frame -> reference).

    Every pixel asked for must have all its samples inside the frame (asserted).
    """
    (a, b, c), (d, e, f) = cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))
    s, g, h = a - b * d / e, b / e, c - b * f / e
    v = d * xs + e * ys + f
    top = np.floor(v).astype(np.int64)
    out = np.zeros(np.shape(xs))
    for i in range(-1, 3):
        row = top + i
        assert row.min() >= 0 and row.max() < frame.shape[0]
        u = s * xs + g * row + h
        left = np.floor(u).astype(np.int64)
        assert left.min() >= 1 and left.max() + 2 < frame.shape[1]
        along = sum(keys(u - (left + j)) * frame[row, left + j].astype(np.float64) for j in range(-1, 3))
        out += keys(v - row) * along
    return out
