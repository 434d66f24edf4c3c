"""Snapshots: the stack as a FITS file for science and a stretched picture for people, written atomically.

Public API:

- ``StackInfo``: frozen facts about a stack that go into the FITS header.
- ``atomic_write(path, data: bytes)``: temporary name in the same folder, fsync, ``os.replace``.
- ``write_fits(path, image, info)``: float32; colour ``(H, W, 3)`` becomes a 3-plane cube ``(3, H, W)``.
- ``stretch(image) -> ndarray``: auto-stretched uint8 ``(H, W)`` or ``(H, W, 3)`` (NaN -> black).
- ``encode_image(image8, fmt) -> bytes``: PNG or JPEG bytes of a stretched image.
- ``write_preview(path, image)``: stretch then write PNG or JPEG by the file's suffix.
- ``preview_bytes(image, max_size=...) -> bytes``: a small JPEG for event previews.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

__all__ = ["StackInfo", "atomic_write", "encode_image", "preview_bytes", "stretch", "write_fits",
           "write_preview"]


@dataclass(frozen=True)
class StackInfo:
    """Facts about a stack for its FITS header.

    Attributes
    ----------
    ncombine : int
        Frames in the stack.
    exptime : float
        Total exposure, seconds.
    date_obs : datetime or None
        Start of the first frame (UTC).
    date_end : datetime or None
        End of the last frame (UTC): its start plus its exposure.
    method : str
        ``mean``, ``kappa-sigma`` or ``median``.
    object : str or None
    filter : str or None
    wcs_header : str or None
        The reference frame's WCS cards (``FrameMeta.wcs_header``).
    reference : str or None
        Path of the reference frame.
    """

    ncombine: int
    exptime: float
    date_obs: datetime | None
    date_end: datetime | None
    method: str
    object: str | None = None
    filter: str | None = None
    wcs_header: str | None = None
    reference: str | None = None
