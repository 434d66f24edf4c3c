"""Detection: find stars with sep and measure the frame's quality.

Public API:

- ``Stars``: frozen star list sorted by flux (brightest first), full-resolution pixel coordinates,
  x = column, y = row, pixel centres at integers.
- ``Quality``: frozen quality figures of a frame.
- ``detect(image, ...) -> tuple[Stars, Quality]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Quality", "Stars", "detect"]


@dataclass(frozen=True)
class Stars:
    """Stars found in one image, brightest first. All arrays are read-only, length N.

    Attributes
    ----------
    x, y : ndarray
        float64 centroids, full resolution, x = column, y = row.
    flux : ndarray
        Background-subtracted flux.
    fwhm : ndarray
        Full width at half maximum, pixels.
    a, b, theta : ndarray
        Shape: semi-major and semi-minor axes (pixels) and position angle (radians).
    flags : ndarray
        sep extraction flags (int).
    shape : tuple of int
        ``(rows, columns)`` of the image the stars were found in.
    """

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    fwhm: np.ndarray
    a: np.ndarray
    b: np.ndarray
    theta: np.ndarray
    flags: np.ndarray
    shape: tuple[int, int]

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def xy(self) -> np.ndarray:
        """``(N, 2)`` float64 array of ``(x, y)``."""
        return np.column_stack([self.x, self.y])


@dataclass(frozen=True)
class Quality:
    """Quality figures of one frame.

    Attributes
    ----------
    stars : int
        Number of stars kept.
    fwhm : float
        Median FWHM in pixels (NaN without stars).
    ellipticity : float
        Median ``1 - b/a`` (NaN without stars).
    background : float
        Median sky level.
    noise : float
        Global sky noise (RMS).
    """

    stars: int
    fwhm: float
    ellipticity: float
    background: float
    noise: float


def detect(image: np.ndarray, *, threshold: float = 5.0, binning: int = 0,
           max_stars: int = 1000) -> tuple[Stars, Quality]:
    """Find stars (see module docstring)."""
    raise NotImplementedError
