"""Simulate: a camera no one needs to own.

Renders a fixed, seeded star field (Moffat profiles, power-law fluxes) with sky gradient, noise, hot pixels,
drift and slow rotation, and writes it as FITS frames at a cadence. ``render_stars`` is the low-level
renderer the tests also use for star fields with known positions.
"""

from __future__ import annotations

import numpy as np

__all__ = ["render_stars"]


def render_stars(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux: np.ndarray,
                 fwhm: float = 3.0, beta: float = 3.0, elongation: float = 1.0,
                 angle_deg: float = 0.0) -> np.ndarray:
    """Render Moffat stars onto a zero float64 image.

    Parameters
    ----------
    shape : tuple of int
        ``(rows, columns)`` of the image.
    x, y : ndarray
        Star centres, x = column, y = row, pixel centres at integers.
    flux : ndarray
        Total flux of each star (the integral of its profile).
    fwhm : float
        Full width at half maximum along the minor axis, pixels.
    beta : float
        Moffat power index.
    elongation : float
        Ratio of major to minor axis (1 for round stars; > 1 for wind or tracking errors).
    angle_deg : float
        Position angle of the major axis, degrees from +x.

    Returns
    -------
    ndarray
        float64 image of the stars alone.
    """
    rows, cols = shape
    image = np.zeros(shape, dtype=np.float64)
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    half = int(np.ceil(max(4.0 * fwhm * elongation, 6.0)))
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float64)
    cos_t, sin_t = np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))
    norm = (beta - 1.0) / (np.pi * alpha * alpha * elongation)
    for xi, yi, fi in zip(np.asarray(x, float), np.asarray(y, float), np.asarray(flux, float), strict=True):
        cx, cy = int(np.floor(xi + 0.5)), int(np.floor(yi + 0.5))
        if cx < -half or cy < -half or cx > cols + half or cy > rows + half:
            continue
        dx = xx - (xi - cx)
        dy = yy - (yi - cy)
        u = (dx * cos_t + dy * sin_t) / elongation
        v = -dx * sin_t + dy * cos_t
        stamp = fi * norm * (1.0 + (u * u + v * v) / (alpha * alpha)) ** (-beta)
        r0, c0 = cy - half, cx - half
        r1, c1 = r0 + stamp.shape[0], c0 + stamp.shape[1]
        sr0, sc0 = max(0, -r0), max(0, -c0)
        sr1, sc1 = stamp.shape[0] - max(0, r1 - rows), stamp.shape[1] - max(0, c1 - cols)
        if sr1 <= sr0 or sc1 <= sc0:
            continue
        image[max(r0, 0):min(r1, rows), max(c0, 0):min(c1, cols)] += stamp[sr0:sr1, sc0:sc1]
    return image
