"""Warp: resample a frame onto the reference grid, with the footprint of valid pixels.

Public API:

- ``INTERPOLATIONS``: ``("bilinear", "bicubic", "lanczos")``.
- ``warp(image, matrix, shape, interpolation="bilinear") -> tuple[ndarray, ndarray]``: the aligned float32
  image (same channels as ``image``) and a ``bool`` footprint ``(H, W)``, True where every input sample the
  interpolation used lies inside the frame. ``matrix`` is a ``Transform.matrix`` (frame -> reference).
"""

from __future__ import annotations

import numpy as np

__all__ = ["INTERPOLATIONS", "warp"]

INTERPOLATIONS: tuple[str, ...] = ("bilinear", "bicubic", "lanczos")


def warp(image: np.ndarray, matrix: np.ndarray, shape: tuple[int, int],
         interpolation: str = "bilinear") -> tuple[np.ndarray, np.ndarray]:
    """Resample onto the reference grid (see module docstring)."""
    raise NotImplementedError
