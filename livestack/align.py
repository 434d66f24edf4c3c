"""Alignment: the transform that maps a frame's stars onto the reference's.

Public API:

- ``Transform``: frozen 2x3 matrix mapping a frame pixel ``(x = column, y = row)`` onto the reference,
  with its rotation, scale, inliers, residual and the method that found it.
- ``AlignParams``: frozen tuning and validation thresholds.
- ``Alignment``: frozen result: a ``Transform`` or the reason the frame cannot be aligned.
- ``align(reference, stars, guess=None, params=AlignParams()) -> Alignment``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from livestack.detect import Stars

__all__ = ["AlignParams", "Alignment", "Transform", "align"]


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
        Inliers over the reference stars that fall inside the frame.
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

    @classmethod
    def identity(cls) -> Transform:
        """The reference frame's own transform."""
        raise NotImplementedError


@dataclass(frozen=True)
class AlignParams:
    """Alignment tuning and validation thresholds (config section ``[align]``)."""

    model: Literal["similarity", "affine"] = "similarity"
    min_inliers: int = 8
    min_matched_fraction: float = 0.2
    max_rms: float = 1.0
    min_spread: float = 0.2
    match_radius: float = 3.0
    clip_sigma: float = 3.0
    max_stars: int = 500
    triangle_stars: int = 50


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
    """Align a star list onto the reference's (see module docstring)."""
    raise NotImplementedError
