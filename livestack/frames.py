"""Frames: read a FITS exposure into a float32 image with its metadata, debayer colour frames.

Public API (stable; other modules rely on it):

- ``FrameMeta``: frozen metadata of one exposure.
- ``Frame``: frozen image (read-only float32 arrays) plus metadata.
- ``read_meta(path, bayer_pattern=None) -> FrameMeta``: header only, cheap; used to order files by time.
- ``read_frame(path, bayer_pattern=None) -> Frame``: header and pixels; raises ``FrameError`` with a reason.
- ``debayer(mosaic, pattern) -> ndarray``: (H, W) mosaic -> (H, W, 3) float32 RGB.
- ``FITS_SUFFIXES``: the file name endings that are frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

__all__ = ["FITS_SUFFIXES", "Frame", "FrameMeta", "debayer", "read_frame", "read_meta"]

#: File name endings recognised as frames (lower case; compared case-insensitively).
FITS_SUFFIXES: tuple[str, ...] = (
    ".fit", ".fits", ".fts",
    ".fit.fz", ".fits.fz", ".fts.fz",
    ".fit.gz", ".fits.gz", ".fts.gz",
)


@dataclass(frozen=True)
class FrameMeta:
    """What the header says about one exposure.

    Attributes
    ----------
    path : str
        The file the frame was read from.
    shape : tuple of int
        ``(rows, columns)`` of the image at full resolution.
    time_utc : datetime or None
        Start of the exposure, timezone-aware UTC; None when the header gives no usable time.
    exptime : float or None
        Exposure in seconds (EXPTIME, else EXPOSURE).
    filter : str or None
    object : str or None
    imagetyp : str or None
    bayer : str or None
        The colour filter pattern seen from pixel (row 0, column 0) of the array as read, after
        XBAYROFF/YBAYROFF and ROWORDER are applied: one of ``RGGB``, ``BGGR``, ``GRBG``, ``GBRG``.
        None for a mono frame.
    wcs_header : str or None
        The celestial WCS cards of the header (``Header.tostring()`` of ``WCS.to_header()``), when the
        frame has a WCS; None otherwise.
    """

    path: str
    shape: tuple[int, int]
    time_utc: datetime | None
    exptime: float | None
    filter: str | None
    object: str | None
    imagetyp: str | None
    bayer: str | None
    wcs_header: str | None


@dataclass(frozen=True)
class Frame:
    """One exposure, ready for the stages.

    Attributes
    ----------
    meta : FrameMeta
    data : ndarray
        float32, read-only. ``(H, W)`` for mono, ``(H, W, 3)`` RGB for a debayered colour frame.
    luminance : ndarray
        float32 ``(H, W)``, read-only: the image stars are found in (``data`` itself for mono).
    """

    meta: FrameMeta
    data: np.ndarray
    luminance: np.ndarray

    @property
    def is_color(self) -> bool:
        """True for a debayered colour frame."""
        return self.data.ndim == 3


def read_meta(path: str | Path, bayer_pattern: str | None = None) -> FrameMeta:
    """Read only the header of a frame (see module docstring)."""
    raise NotImplementedError


def read_frame(path: str | Path, bayer_pattern: str | None = None) -> Frame:
    """Read a frame (see module docstring)."""
    raise NotImplementedError


def debayer(mosaic: np.ndarray, pattern: str) -> np.ndarray:
    """Debayer a mosaic (see module docstring)."""
    raise NotImplementedError
