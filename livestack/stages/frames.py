"""Frames: read a FITS exposure into a float32 image with its metadata, debayer colour frames.

Public API (stable; other modules rely on it):

- ``FrameMeta``: frozen metadata of one exposure.
- ``Frame``: frozen image (read-only float32 arrays) plus metadata.
- ``read_meta(path, bayer_pattern=None) -> FrameMeta``: header only, cheap; used to order files by time.
- ``read_frame(path, bayer_pattern=None) -> Frame``: header and pixels; raises ``FrameError`` with a reason.
  It is ``develop(read_raw(path, bayer_pattern))``.
- ``RawFrame``: the pixels as stored (a colour frame's mosaic not yet debayered), for calibration.
- ``read_raw(path, bayer_pattern=None) -> RawFrame``: header and pixels, no debayering.
- ``develop(raw) -> Frame``: debayer a (possibly calibrated) raw frame and make it read-only.
- ``develop_data(raw) -> ndarray``: the same pixels without the luminance (stars already found).
- ``debayer(mosaic, pattern) -> ndarray``: (H, W) mosaic -> (H, W, 3) float32 RGB.
- ``FITS_SUFFIXES``: the file name endings that are frames.
- ``BAYER_PATTERNS``: the 2x2 colour filter patterns livestack can debayer.

Which HDU
    The first HDU that holds pixels (NAXIS > 0) is the image: the primary HDU of a plain file, HDU 1 of an
    fpack'ed ``.fits.fz`` (whose primary HDU is empty). If that HDU is not 2-D the file is rejected; trailing
    axes of length 1 (``NAXIS3 = 1``) are accepted as 2-D.

Pixel values
    8/16/32/64-bit integers and 32/64-bit floats, with BZERO/BSCALE applied and integer BLANK pixels turned
    into NaN. Plain files are memory-mapped raw (astropy, unscaled) and converted to float32 in one fused
    pass, the fastest path measured (about 3x faster than fitsio for uint16); the map is closed before
    returning, so the arrays never reference the file. 8- and 16-bit data are exact in float32; 32/64-bit
    integers go through float64 so that BZERO = 2**31 does not cancel digits, and are exact up to 2**24.

Time
    ``time_utc`` is the start of the exposure, from DATE-OBS (ISO 8601, with or without a UTC offset such
    as ``-0700``, which is converted to UTC; a bare date takes its time of day from TIME-OBS, UT or
    UTSTART; the pre-1999 ``DD/MM/YY`` form means 19YY), else UT-OBS (a full date and time, or a time of
    day joined to DATE-OBS's date), else MJD-OBS. Times without an offset are UTC, as the FITS standard says.

Bayer pattern convention
    ``FrameMeta.bayer`` is the pattern as seen from array element ``[0, 0]`` as numpy reads the file
    (row 0 = the first row stored, which FITS viewers show at the bottom), read in the order
    ``[0,0] [0,1] [1,0] [1,1]``.
    It comes from, in order: the ``bayer_pattern`` argument (taken as is: no offsets or row order are
    applied to it, it is what the user saw working), else BAYERPAT (or COLORTYP when that holds a pattern
    name), else FILTER when FILTER is exactly one of the four pattern names (PANOPTES writes the sensor's
    pattern there and no BAYERPAT; no real filter is called ``RGGB``, so this is not a guess). A header
    pattern is then adjusted like Siril does: an odd XBAYROFF swaps the pattern's columns, an odd YBAYROFF
    its rows; ``ROWORDER = 'BOTTOM-UP'`` means the header's pattern describes the top of the image as
    displayed, i.e. the *last* stored row, so the rows of the pattern swap when the image height is even
    (with an odd height the first and last rows have the same parity). ``TOP-DOWN`` (what N.I.N.A. and
    SharpCap write) and a missing ROWORDER (Seestar, ASIAIR, INDI) mean the pattern applies to row 0.
    ``bayer_pattern='MONO'`` forces a frame to be read as mono whatever its header says.
"""

from __future__ import annotations

import contextlib
import math
import re
import stat
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cv2
import numba
import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyError
from astropy.utils.exceptions import AstropyWarning

from livestack.errors import FrameError
from livestack.stages.fitscheck import FitsState, check_fits

__all__ = [
    "BAYER_PATTERNS", "FITS_SUFFIXES", "MAX_PIXELS", "Frame", "FrameMeta", "RawFrame", "debayer", "develop",
    "read_frame", "read_meta", "read_raw",
]

#: File name endings recognised as frames (lower case; compared case-insensitively).
FITS_SUFFIXES: tuple[str, ...] = (
    ".fit", ".fits", ".fts",
    ".fit.fz", ".fits.fz", ".fts.fz",
    ".fit.gz", ".fits.gz", ".fts.gz",
)

#: The 2x2 colour filter patterns, named by the colours at [0,0], [0,1], [1,0], [1,1].
BAYER_PATTERNS: tuple[str, ...] = ("RGGB", "BGGR", "GRBG", "GBRG")

#: ``bayer_pattern`` value that forces a frame to be read as mono, whatever its header says.
MONO: str = "MONO"

#: The largest image ``read_frame`` reads by default, in pixels: well above the largest camera sensors in
#: use (62 MP). Reading one costs up to 16 bytes a pixel at the peak for a colour frame (RGB and luminance
#: in float32, plus the raw data): 1.6 GB at this size.
MAX_PIXELS: int = 100_000_000


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
    binning : tuple of int
        ``(XBINNING, YBINNING)``, 1 where the header says nothing.
    gain : float or None
        The camera's gain setting (GAIN, else ISOSPEED for DSLRs).
    offset : float or None
        The camera's offset (black level) setting (OFFSET).
    set_temp : float or None
        Sensor temperature, Celsius: the cooler's set point (SET-TEMP) when there is one, else the measured
        CCD-TEMP.
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
    binning: tuple[int, int] = (1, 1)
    gain: float | None = None
    offset: float | None = None
    set_temp: float | None = None


@dataclass(frozen=True)
class RawFrame:
    """One exposure's pixels as stored: a colour frame's mosaic is not yet debayered.

    Attributes
    ----------
    meta : FrameMeta
    mosaic : ndarray
        float32 ``(H, W)``, C-contiguous, writeable and owned by this value: calibration works on it in
        place before ``develop`` hands it on read-only.
    integral : bool
        True when every pixel is an integer as read (the exact 16-bit debayer path applies); calibration
        makes it False.
    """

    meta: FrameMeta
    mosaic: np.ndarray
    integral: bool


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
    """Read only the header of a frame.

    Parameters
    ----------
    path : str or Path
        A FITS file (plain, ``.fz`` or ``.gz``).
    bayer_pattern : str or None
        The colour filter pattern at array element ``[0, 0]`` for cameras whose header gives none; it
        overrides the header. ``'MONO'`` reads a frame as mono. See the module docstring.

    Returns
    -------
    FrameMeta

    Raises
    ------
    FrameError
        The file is not a FITS file with one 2-D image, or ``bayer_pattern`` is not a known pattern.
    """
    path = Path(path)
    override = _check_pattern_argument(bayer_pattern, path)
    _check_structure(path, whole=False)  # the header is enough: a file still being written is fine
    with _quiet_astropy():
        try:
            with fits.open(path, memmap=True, do_not_scale_image_data=True, uint=False) as hdul:
                index = _image_hdu_index(hdul, path)
                header = hdul[index].header.copy()
        except _READ_ERRORS as exc:
            raise FrameError(f"{path} cannot be read as a FITS file ({exc}).") from exc
    return _meta_from_header(path, header, override)


def read_frame(path: str | Path, bayer_pattern: str | None = None,
               max_pixels: int = MAX_PIXELS) -> Frame:
    """Read a frame: header, pixels as float32, debayered to RGB when it is a colour mosaic.

    Parameters
    ----------
    path : str or Path
        A FITS file (plain, ``.fz`` or ``.gz``).
    bayer_pattern : str or None
        The colour filter pattern at array element ``[0, 0]`` for cameras whose header gives none; it
        overrides the header. ``'MONO'`` reads a frame as mono. See the module docstring.
    max_pixels : int
        The largest image (width x height) read. The header's size is checked before any pixel is read or
        any array allocated, so a file that claims more (a sparse file, a corrupt or hostile header) costs
        nothing but its header.

    Returns
    -------
    Frame
        Read-only, C-contiguous float32 arrays that do not reference the file.

    Raises
    ------
    FrameError
        With one sentence naming the file and the problem: not a regular file, empty, not FITS, larger than
        ``max_pixels``, truncated, no image HDU, not 2-D, unsupported BITPIX, every pixel NaN, or an unknown
        Bayer pattern.
    """
    return develop(read_raw(path, bayer_pattern, max_pixels))


def read_raw(path: str | Path, bayer_pattern: str | None = None, max_pixels: int = MAX_PIXELS,
             into: Callable[[tuple[int, ...]], np.ndarray] | None = None) -> RawFrame:
    """Read a frame's header and pixels as float32, without debayering (for calibration on the mosaic).

    Parameters
    ----------
    path : str or Path
        A FITS file (plain, ``.fz`` or ``.gz``).
    bayer_pattern : str or None
        As for ``read_frame``.
    max_pixels : int
        As for ``read_frame``.
    into : callable, optional
        Given the frame's ``(rows, columns)``, returns the writeable C-contiguous float32 array to read the
        pixels into (a buffer reused from frame to frame: on a virtual machine a new 100 MB array costs up
        to ~150 ms of page faults). None: a new array.

    Returns
    -------
    RawFrame
        Its mosaic is a writeable array (new, or ``into``'s) that does not reference the file.

    Raises
    ------
    FrameError
        As for ``read_frame``.
    """
    path = Path(path)
    override = _check_pattern_argument(bayer_pattern, path)
    _check_structure(path)
    with _quiet_astropy():
        try:
            with fits.open(path, memmap=True, do_not_scale_image_data=True, uint=False) as hdul:
                index = _image_hdu_index(hdul, path)
                hdu = hdul[index]
                header = hdu.header.copy()
                meta = _meta_from_header(path, header, override)
                _check_pixels(meta.shape, max_pixels, path)
                bitpix = _check_bitpix(header, path)
                _check_complete(hdul, index, header, bitpix, path)
                out = into(meta.shape) if into is not None else np.empty(meta.shape, dtype=np.float32)
                mosaic, integral = _pixels_to_float32(hdu, header, bitpix, out)
        except _READ_ERRORS as exc:
            raise FrameError(f"{path} cannot be read as a FITS file ({exc}).") from exc
    if (bitpix < 0 or "BLANK" in header) and not np.isfinite(mosaic).any():
        raise FrameError(f"{path} has no usable pixel: every value is NaN or infinite.")
    return RawFrame(meta=meta, mosaic=mosaic, integral=integral)


def develop(raw: RawFrame, into: Callable[[tuple[int, ...]], np.ndarray] | None = None) -> Frame:
    """Turn a raw frame into the stages' ``Frame``: debayer a colour mosaic, make the arrays read-only.

    Parameters
    ----------
    raw : RawFrame
        A mono mosaic becomes the frame's data (made read-only); a colour one is only read.
    into : callable, optional
        As for ``develop_data``.

    Returns
    -------
    Frame
    """
    data = develop_data(raw, into)
    if data.ndim == 2:
        return Frame(meta=raw.meta, data=data, luminance=data)
    luminance = cv2.transform(data, _EQUAL_WEIGHTS)
    luminance.flags.writeable = False
    return Frame(meta=raw.meta, data=data, luminance=luminance)


def develop_data(raw: RawFrame, into: Callable[[tuple[int, ...]], np.ndarray] | None = None) -> np.ndarray:
    """``develop(raw).data`` without the luminance, for a frame whose stars are already known.

    Parameters
    ----------
    raw : RawFrame
        Treated as by ``develop``.
    into : callable, optional
        Given ``(H, W, 3)``, the writeable C-contiguous float32 array to debayer into (as ``read_raw``'s
        ``into``). None: a new array.

    Returns
    -------
    ndarray
        float32, read-only: ``(H, W)`` mono or ``(H, W, 3)`` RGB.
    """
    if raw.meta.bayer is None:
        raw.mosaic.flags.writeable = False
        return raw.mosaic
    rgb = _debayer(raw.mosaic, raw.meta.bayer, raw.integral, into)
    rgb.flags.writeable = False
    return rgb


def debayer(mosaic: np.ndarray, pattern: str) -> np.ndarray:
    """Debayer a colour filter mosaic with OpenCV's bilinear interpolation.

    Parameters
    ----------
    mosaic : ndarray
        ``(H, W)`` raw mosaic, any real dtype.
    pattern : str
        The pattern at element ``[0, 0]``: one of ``BAYER_PATTERNS``.

    Returns
    -------
    ndarray
        ``(H, W, 3)`` float32 RGB, C-contiguous and writeable.

    Raises
    ------
    ValueError
        When ``mosaic`` is not 2-D or ``pattern`` is unknown.

    Notes
    -----
    The values are OpenCV's bilinear demosaic (``cv2.cvtColor``) of 16-bit codes, which is how it
    demosaics: integer-valued data whose range fits in 16 bits (every camera's raw output) pass through
    exactly, offset if negative; anything else is mapped linearly onto the 16-bit range and back, so the
    precision is 1/65535 of the data's range. Interpolated values are rounded to that grid as OpenCV rounds
    them (at most half a step). NaN pixels are treated as the minimum. Mosaics of at least 3 x 3 pixels
    are demosaiced by a compiled pass that gives OpenCV's values bit for bit without its intermediate
    16-bit images.
    """
    if mosaic.ndim != 2:
        raise ValueError(f"A Bayer mosaic must be 2-D, not of shape {mosaic.shape}.")
    if pattern not in BAYER_PATTERNS:
        raise ValueError(f"Bayer pattern {pattern!r} is not one of {', '.join(BAYER_PATTERNS)}.")
    return _debayer(np.asarray(mosaic), pattern, integral=None)


# --------------------------------------------------------------------------------------------------------
# Private helpers
# --------------------------------------------------------------------------------------------------------

#: Errors astropy, numpy and the decompressors raise on a malformed file (never a catch-all).
_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError, EOFError, ValueError, TypeError, KeyError, IndexError, zlib.error, VerifyError,
)

#: FITS files come in blocks of this many bytes.
_FITS_BLOCK = 2880

#: BITPIX values the FITS standard defines.
_BITPIX_VALUES: frozenset[int] = frozenset({8, 16, 32, 64, -32, -64})

#: OpenCV names a Bayer code after the colours of the second row's second and third pixels, which
#: is one pixel down and right of the pattern at [0, 0]: its "BG" is our RGGB, and so on.
_CV2_BAYER_CODES: dict[str, int] = {
    "RGGB": cv2.COLOR_BayerBG2RGB,
    "BGGR": cv2.COLOR_BayerRG2RGB,
    "GRBG": cv2.COLOR_BayerGB2RGB,
    "GBRG": cv2.COLOR_BayerGR2RGB,
}

#: The colour at each site of a 2x2 block, ``[0, 0] [0, 1] [1, 0] [1, 1]``: 0 red, 1 green, 2 blue.
_SITE_COLOURS: dict[str, np.ndarray] = {
    pattern: np.array(["RGB".index(colour) for colour in pattern], dtype=np.int64)
    for pattern in _CV2_BAYER_CODES
}

#: Luminance of a colour frame: the plain mean of R, G, B (a 1x3 matrix for cv2.transform).
_EQUAL_WEIGHTS = np.full((1, 3), 1.0 / 3.0, dtype=np.float32)

#: Largest value range that OpenCV's 16-bit demosaic holds without rescaling.
_U16_SPAN = 65535.0

#: Header keys for the time of day that goes with a date-only DATE-OBS.
_TIME_OF_DAY_KEYS: tuple[str, ...] = ("TIME-OBS", "UT", "UTSTART", "UT-OBS")

_MJD_EPOCH = datetime(1858, 11, 17, tzinfo=UTC)
_OLD_DATE = re.compile(r"^\s*(\d{1,2})/(\d{1,2})/(\d{2})\s*$")
_ISO_DATE = re.compile(r"^\s*(\d{4})-(\d{2})-(\d{2})\s*$")
_TIME_OF_DAY = re.compile(r"^\s*(\d{1,2}):(\d{1,2}):(\d{1,2}(?:\.\d*)?)\s*$")
_FRACTION = re.compile(r"\.(\d+)")
_OFFSET_NO_COLON = re.compile(r"([+-])(\d{2})(\d{2})$")


@contextlib.contextmanager
def _quiet_astropy() -> Iterator[None]:
    """Silence astropy's warnings while a file is parsed.

    astropy warns about fixable header quirks and truncation; we check what matters ourselves and say
    it in a FrameError. Under ``filterwarnings = error`` a warning raised inside ``fits.open`` would also
    leave the file handle open.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        yield


def _check_pattern_argument(bayer_pattern: str | None, path: Path) -> str | None:
    if bayer_pattern is None:
        return None
    pattern = bayer_pattern.strip().upper()
    if pattern != MONO and pattern not in BAYER_PATTERNS:
        raise FrameError(
            f"The Bayer pattern {bayer_pattern!r} given for {path} is not one of "
            f"{', '.join(BAYER_PATTERNS)} or {MONO}."
        )
    return pattern


def _check_not_empty(path: Path) -> None:
    try:
        st = path.stat()
    except OSError as exc:
        raise FrameError(f"{path} cannot be opened ({exc.strerror or exc}).") from exc
    if not stat.S_ISREG(st.st_mode):
        # Opening a FIFO blocks until a writer comes; a device can be read for ever.
        raise FrameError(f"{path} is not a regular file, so it is not read.")
    if st.st_size == 0:
        raise FrameError(f"{path} is empty (0 bytes).")


def _check_structure(path: Path, whole: bool = True) -> None:
    """Refuse what is not a regular file, is empty, or is not (whole, with ``whole``) FITS, before astropy.

    astropy trusts a header's NAXIS (it loops over 10**20 axes) and maps data a file does not hold; the
    structure check reads headers only, within the standard's bounds.
    """
    _check_not_empty(path)
    try:
        found = check_fits(path)
    except OSError as exc:
        raise FrameError(f"{path} cannot be read ({exc.strerror or exc}).") from exc
    if found.state is FitsState.INVALID:
        raise FrameError(f"{path} cannot be read as a FITS file ({found.reason}).")
    if found.state is FitsState.INCOMPLETE and whole:
        raise FrameError(f"{path} is truncated ({found.reason.removeprefix('still being written: ')}).")


def _check_pixels(shape: tuple[int, int], max_pixels: int, path: Path) -> None:
    """Refuse an image larger than ``max_pixels`` before any of its pixels is read."""
    rows, cols = shape
    if rows * cols > max_pixels:
        raise FrameError(
            f"{path} holds a {cols} x {rows} image ({rows * cols / 1e6:.0f} megapixels), more than the "
            f"{max_pixels / 1e6:g} megapixels livestack reads (frames.max_megapixels)."
        )


def _image_hdu_index(hdul: fits.HDUList, path: Path) -> int:
    """Index of the first HDU with pixels; reject it unless it is a 2-D image."""
    for index, hdu in enumerate(hdul):
        header = hdu.header
        naxis = int(header.get("NAXIS", 0))
        if naxis == 0 or not hdu.is_image:
            continue
        axes = [int(header.get(f"NAXIS{i}", 0)) for i in range(1, naxis + 1)]
        if 0 in axes:
            continue
        if naxis < 2 or any(n != 1 for n in axes[2:]):
            dims = " x ".join(str(n) for n in axes)
            raise FrameError(
                f"{path} holds a {naxis}-D image (NAXIS1..{naxis} = {dims}) in HDU {index}; "
                "livestack needs a 2-D image."
            )
        return index
    raise FrameError(f"{path} has no image HDU.")


def _check_bitpix(header: fits.Header, path: Path) -> int:
    bitpix = header.get("BITPIX")
    if not isinstance(bitpix, int) or bitpix not in _BITPIX_VALUES:
        raise FrameError(f"{path} has BITPIX = {bitpix!r}, which is not one FITS defines.")
    return bitpix


def _check_complete(hdul: fits.HDUList, index: int, header: fits.Header, bitpix: int, path: Path) -> None:
    """Reject a file shorter than its header announces, before a memory map reads past its end."""
    info = hdul.fileinfo(index)
    if info is None or path.name.lower().endswith(".gz"):
        return  # a gzip stream has no size to compare; the decompressor fails on truncation itself
    size = path.stat().st_size
    if isinstance(hdul[index], fits.CompImageHDU):
        # The heap's exact length is inside the binary table; one FITS block of slack covers padding,
        # and a cut inside the last block makes the decompressor raise.
        needed = info["datLoc"] + info["datSpan"] - _FITS_BLOCK + 1
    else:
        rows, cols = int(header["NAXIS2"]), int(header["NAXIS1"])
        needed = info["datLoc"] + rows * cols * abs(bitpix) // 8
    if size < needed:
        raise FrameError(
            f"{path} is truncated: its header announces {needed} bytes but the file has {size}."
        )


def _pixels_to_float32(hdu: Any, header: fits.Header, bitpix: int,
                       out: np.ndarray) -> tuple[np.ndarray, bool]:
    """Convert the raw (unscaled) pixels into ``out`` (float32, the frame's shape); True when every value is
    an integer.

    The raw array may be a memory map of the file: it is released before returning, so that closing the
    HDUList also unmaps the file.
    """
    bzero = float(header.get("BZERO", 0.0))
    bscale = float(header.get("BSCALE", 1.0))
    blank = header.get("BLANK") if bitpix > 0 else None
    raw = hdu.data
    try:
        raw2d = raw.reshape(out.shape)
        if abs(bitpix) <= 16 or (bitpix == -32 and bscale == 1.0 and bzero == 0.0):
            # 8/16-bit integers and unscaled float32 are exact in float32: one fused pass.
            if bscale == 1.0 and _is_big_endian_int16(raw2d):
                # The usual camera frame. numpy's cast of byte-swapped integers runs on one core at ~4.6 ms
                # per 8.3 MP; a compiled pass swapping the bytes itself takes ~1.2 ms on two cores (1.9 ms on
                # one), with the same float32 results.
                _int16_be_to_float32(np.asarray(raw2d).view(np.uint16), np.float32(bzero), out)
            elif bscale == 1.0:
                np.add(raw2d, np.float32(bzero), out=out, dtype=np.float32)
            else:
                np.multiply(raw2d, np.float32(bscale), out=out, dtype=np.float32)
                out += np.float32(bzero)
        else:
            # Wider types: scale in float64 so BZERO = 2**31 does not cancel the low digits.
            scaled = raw2d.astype(np.float64)
            if bscale != 1.0:
                scaled *= bscale
            scaled += bzero
            out[...] = scaled
        if isinstance(blank, int):
            out[raw2d == blank] = np.nan
    finally:
        del raw  # the memory map, if any, must not outlive the file
    integral = bitpix > 0 and bscale == 1.0 and float(bzero).is_integer() and blank is None
    return out, integral


def _is_big_endian_int16(raw: np.ndarray) -> bool:
    """Whether ``raw`` is FITS's big-endian int16, C-contiguous, on a little-endian machine."""
    return bool(np.little_endian and raw.dtype == np.dtype(">i2") and raw.flags.c_contiguous)


@numba.njit(parallel=True, cache=True, nogil=True)
def _int16_be_to_float32(raw: np.ndarray, bzero: np.float32, out: np.ndarray) -> None:  # pragma: no cover
    """``out = float32(int16 value) + bzero`` for big-endian int16 pixels seen as native uint16 words."""
    height, width = out.shape
    for y in numba.prange(height):
        for x in range(width):
            word = np.int32(raw[y, x])
            word = ((word >> 8) | (word << 8)) & 0xFFFF
            # Two's complement: the high bit set means word - 65536.
            out[y, x] = np.float32(word - 65536 * (word >> 15)) + bzero


def _meta_from_header(path: Path, header: fits.Header, override: str | None) -> FrameMeta:
    shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
    return FrameMeta(
        path=str(path),
        shape=shape,
        time_utc=_time_utc(header),
        exptime=_first_float(header, ("EXPTIME", "EXPOSURE")),
        filter=_text(header, "FILTER"),
        object=_text(header, "OBJECT"),
        imagetyp=_text(header, "IMAGETYP"),
        bayer=_bayer_pattern(header, shape, override, path),
        wcs_header=_wcs_header(header),
        binning=(_binning(header, "XBINNING"), _binning(header, "YBINNING")),
        gain=_first_float(header, ("GAIN", "ISOSPEED")),
        offset=_first_float(header, ("OFFSET",)),
        set_temp=_first_float(header, ("SET-TEMP", "SETTEMP", "CCD-TEMP", "CCD_TEMP")),
    )


def _binning(header: fits.Header, key: str) -> int:
    value = _first_float(header, (key,))
    return int(value) if value is not None and value >= 1 and value.is_integer() else 1


def _text(header: fits.Header, key: str) -> str | None:
    value = header.get(key)
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip()
    return text or None


def _first_float(header: fits.Header, keys: tuple[str, ...]) -> float | None:
    for key in keys:
        value = header.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


# --- time -----------------------------------------------------------------------------------------------

def _time_utc(header: fits.Header) -> datetime | None:
    date_obs = _text(header, "DATE-OBS") or _text(header, "DATE-BEG")
    time_of_day = next((t for t in (_text(header, k) for k in _TIME_OF_DAY_KEYS) if t), None)
    if date_obs is not None:
        parsed = _parse_date_time(date_obs, time_of_day)
        if parsed is not None:
            return parsed
    ut_obs = _text(header, "UT-OBS")
    if ut_obs is not None:
        parsed = _parse_iso(ut_obs)
        if parsed is None and date_obs is not None:
            day = _parse_date_only(date_obs)
            parsed = _join(day, ut_obs) if day is not None else None
        if parsed is not None:
            return parsed
    mjd = _first_float(header, ("MJD-OBS",))
    if mjd is not None:
        return _MJD_EPOCH + timedelta(days=mjd)
    return None


def _parse_date_time(text: str, time_of_day: str | None) -> datetime | None:
    """A full ISO date-time; or a date (ISO or DD/MM/YY) plus a separate time of day."""
    full = _parse_iso(text)
    if full is not None:
        return full
    day = _parse_date_only(text)
    if day is None or time_of_day is None:
        return None
    # UT-OBS may itself be a full date-time (MicroObservatory): then only its time of day is wanted.
    as_full = _parse_iso(time_of_day)
    if as_full is not None:
        return as_full
    return _join(day, time_of_day)


def _parse_iso(text: str) -> datetime | None:
    """Parse ``YYYY-MM-DDThh:mm:ss[.f][Z|+hh:mm|+hhmm]`` to aware UTC; None if it is not that form."""
    text = text.strip()
    if "T" not in text:
        return None
    text = text.replace("Z", "+00:00")
    # Python takes at most 6 fraction digits; FITS writers emit up to 7 (or none after the point).
    text = _FRACTION.sub(lambda m: "." + (m.group(1) + "000000")[:6], text, count=1)
    text = _OFFSET_NO_COLON.sub(r"\1\2:\3", text)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _parse_date_only(text: str) -> datetime | None:
    iso = _ISO_DATE.match(text)
    old = _OLD_DATE.match(text)
    try:
        if iso:
            return datetime(int(iso[1]), int(iso[2]), int(iso[3]), tzinfo=UTC)
        if old:
            # The pre-1999 FITS form DD/MM/YY always means the 1900s.
            return datetime(1900 + int(old[3]), int(old[2]), int(old[1]), tzinfo=UTC)
    except ValueError:
        return None
    return None


def _join(day: datetime, time_of_day: str) -> datetime | None:
    match = _TIME_OF_DAY.match(time_of_day)
    if not match:
        return None
    hours, minutes, seconds = int(match[1]), int(match[2]), float(match[3])
    if hours > 23 or minutes > 59 or seconds >= 61:
        return None
    return day + timedelta(hours=hours, minutes=minutes, seconds=seconds)


# --- Bayer ----------------------------------------------------------------------------------------------

def _bayer_pattern(header: fits.Header, shape: tuple[int, int], override: str | None,
                   path: Path) -> str | None:
    if override is not None:
        return None if override == MONO else override
    pattern = _text(header, "BAYERPAT")
    if pattern is None:
        hint = next((t.upper() for t in (_text(header, k) for k in ("COLORTYP", "FILTER")) if t), None)
        if hint not in BAYER_PATTERNS:
            return None
        pattern = hint
    pattern = pattern.upper()
    if pattern not in BAYER_PATTERNS:
        raise FrameError(
            f"{path} has BAYERPAT = {pattern!r}, which livestack cannot debayer "
            f"(it knows {', '.join(BAYER_PATTERNS)}); set a bayer_pattern to read it."
        )
    x_off = _integer(header, "XBAYROFF", path)
    y_off = _integer(header, "YBAYROFF", path)
    if x_off % 2:
        pattern = _swap_columns(pattern)
    flip = (_text(header, "ROWORDER") or "").upper() == "BOTTOM-UP" and shape[0] % 2 == 0
    if (y_off % 2) != flip:  # two row swaps cancel
        pattern = _swap_rows(pattern)
    return pattern


def _integer(header: fits.Header, key: str, path: Path) -> int:
    value = header.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise FrameError(f"{path} has {key} = {value!r}, which is not a whole number of pixels.")
    return int(value)


def _swap_columns(pattern: str) -> str:
    return pattern[1] + pattern[0] + pattern[3] + pattern[2]


def _swap_rows(pattern: str) -> str:
    return pattern[2:] + pattern[:2]


def _debayer(mosaic: np.ndarray, pattern: str, integral: bool | None,
             into: Callable[[tuple[int, ...]], np.ndarray] | None = None) -> np.ndarray:
    """Debayer through OpenCV's 16-bit path; ``integral`` is None when not known (see ``debayer``).

    ``mosaic`` is only read. The values are those of numpy's float32 steps (offset, scale, round, clip to
    uint16), OpenCV's bilinear ``cvtColor`` and the way back, operation for operation, but computed in one
    compiled pass (``_demosaic``) that makes each row's 16-bit codes as it goes: at 8.3 MP numpy's passes
    over float32 copies took ~95 ms for a calibrated frame, ~33 ms for an integral one, and OpenCV with
    compiled passes around it ~40 ms with its two intermediate images (16-bit mosaic and RGB).
    """
    work = np.ascontiguousarray(mosaic, dtype=np.float32)
    lo32, hi32, finite = work.min(), work.max(), True
    if not (np.isfinite(lo32) and np.isfinite(hi32)):
        # A NaN or an infinity makes one of them non-finite: only then the slower pass that skips them.
        lo32, hi32, finite = _finite_range(work)
    # Non-finite pixels take the minimum's value (zero when nothing is finite).
    lo, hi = (float(lo32), float(hi32)) if finite else (0.0, 0.0)
    if integral is None:
        integral = mosaic.dtype.kind in "iub" or _all_integral(work, np.float32(lo))
    if integral and hi - lo <= _U16_SPAN:
        offset = 0.0 if (lo >= 0.0 and hi <= _U16_SPAN) else lo
        step = 1.0
    else:
        offset = lo
        step = (hi - lo) / _U16_SPAN if hi > lo else 1.0
    fill, scale, scaled = np.float32(lo), np.float32(1.0 / step), step != 1.0
    if min(work.shape) >= 3:
        shape = (*work.shape, 3)
        rgb = into(shape) if into is not None else np.empty(shape, dtype=np.float32)
        _demosaic(work, _SITE_COLOURS[pattern], fill, np.float32(offset), scale, scaled, np.float32(step),
                  rgb)
        return rgb
    # Too small for a pixel with all eight neighbours: OpenCV's own demosaic.
    codes = np.empty(work.shape, dtype=np.uint16)
    _to_codes(work, fill, np.float32(offset), scale, scaled, codes)
    rgb16 = cv2.cvtColor(codes, _CV2_BAYER_CODES[pattern])
    rgb = np.empty(rgb16.shape, dtype=np.float32)
    _from_codes(rgb16, np.float32(step), np.float32(offset), scaled, rgb)
    return rgb


@numba.njit(parallel=True, cache=True, nogil=True)
def _finite_range(image: np.ndarray) -> tuple[np.float32, np.float32, bool]:  # pragma: no cover - compiled
    """Least and greatest finite value of a float32 image, and whether it has any."""
    height, width = image.shape
    lows = np.full(height, np.inf, dtype=np.float32)
    highs = np.full(height, -np.inf, dtype=np.float32)
    for y in numba.prange(height):
        low, high = np.float32(np.inf), np.float32(-np.inf)
        for x in range(width):
            value = image[y, x]
            if np.isfinite(value):
                low = min(low, value)
                high = max(high, value)
        lows[y] = low
        highs[y] = high
    low, high = lows.min(), highs.max()
    return low, high, bool(low <= high)


@numba.njit(parallel=True, cache=True, nogil=True)
def _all_integral(image: np.ndarray, fill: np.float32) -> bool:  # pragma: no cover - compiled
    """Whether every value is a whole number once non-finite values are ``fill``."""
    height, width = image.shape
    fractional = np.zeros(height, dtype=np.bool_)
    for y in numba.prange(height):
        for x in range(width):
            value = image[y, x]
            if not np.isfinite(value):
                value = fill
            if np.rint(value) != value:
                fractional[y] = True
                break
    return not fractional.any()


@numba.njit(cache=True, inline="always", nogil=True)
def _code(value: np.float32, fill: np.float32, offset: np.float32, scale: np.float32,
          scaled: bool) -> np.int32:  # pragma: no cover - compiled
    """One pixel's 16-bit code, as ``_to_codes`` makes it (widened to int32 for the sums)."""
    if not np.isfinite(value):
        value = fill
    if offset != np.float32(0.0):
        value = value - offset
    if scaled:
        value = min(max(np.rint(value * scale), np.float32(0.0)), np.float32(_U16_SPAN))
    return np.int32(np.uint16(value))


@numba.njit(cache=True, nogil=True)
def _code_row(row: np.ndarray, fill: np.float32, offset: np.float32, scale: np.float32, scaled: bool,
              out: np.ndarray) -> None:  # pragma: no cover - compiled
    for x in range(row.shape[0]):
        out[x] = _code(row[x], fill, offset, scale, scaled)


@numba.njit(cache=True, inline="always", nogil=True)
def _value(code: np.int32, step: np.float32, offset: np.float32,
           scaled: bool) -> np.float32:  # pragma: no cover - compiled
    """A 16-bit code back to its value: ``float32(code) * step + offset``, in numpy's float32 order."""
    value = np.float32(code)
    if scaled:
        value = value * step
    if offset != np.float32(0.0):
        value = value + offset
    return value


@numba.njit(cache=True, inline="always", nogil=True)
def _put(rgb: np.ndarray, y: int, x: int, red: np.int32, green: np.int32, blue: np.int32, step: np.float32,
         offset: np.float32, scaled: bool) -> None:  # pragma: no cover - compiled
    """One pixel's three codes back to values (``_value``)."""
    rgb[y, x, 0] = _value(red, step, offset, scaled)
    rgb[y, x, 1] = _value(green, step, offset, scaled)
    rgb[y, x, 2] = _value(blue, step, offset, scaled)


@numba.njit(parallel=True, cache=True, nogil=True)
def _demosaic(mosaic: np.ndarray, colours: np.ndarray, fill: np.float32, offset: np.float32,
              scale: np.float32, scaled: bool, step: np.float32,
              rgb: np.ndarray) -> None:  # pragma: no cover - compiled
    """``_from_codes(cvtColor(_to_codes(mosaic)))`` in one pass, for mosaics of at least 3 x 3 pixels.

    OpenCV's bilinear demosaic of 16-bit codes: a site keeps its own colour; the other colours of a red or
    blue site are the rounded means of its four edge neighbours (green) and of its four corner neighbours;
    a green site takes the rounded mean of its two row neighbours for the colour beside it in the row and
    of its two column neighbours for the other. The outermost rows and columns repeat their inner
    neighbours. Each row's codes are made once per block of rows (three rows of them at a time).
    """
    height, width = mosaic.shape
    blocks = min(height - 2, 64)
    for block in numba.prange(blocks):
        first = 1 + (height - 2) * block // blocks
        last = 1 + (height - 2) * (block + 1) // blocks
        above = np.empty(width, dtype=np.int32)
        here = np.empty(width, dtype=np.int32)
        below = np.empty(width, dtype=np.int32)
        vertical = np.empty(width, dtype=np.int32)
        horizontal = np.empty(width, dtype=np.int32)
        edges = np.empty(width, dtype=np.int32)
        corners = np.empty(width, dtype=np.int32)
        _code_row(mosaic[first - 1], fill, offset, scale, scaled, above)
        _code_row(mosaic[first], fill, offset, scale, scaled, here)
        for y in range(first, last):
            _code_row(mosaic[y + 1], fill, offset, scale, scaled, below)
            for x in range(1, width - 1):
                vertical[x] = (above[x] + below[x] + 1) >> 1
                horizontal[x] = (here[x - 1] + here[x + 1] + 1) >> 1
                edges[x] = (above[x] + below[x] + here[x - 1] + here[x + 1] + 2) >> 2
                corners[x] = (above[x - 1] + above[x + 1] + below[x - 1] + below[x + 1] + 2) >> 2
            row = (y & 1) * 2
            # One site colour at a time (every other pixel of the row), so that the loops do not branch.
            for parity in range(2):
                own = colours[row + parity]
                start = 2 - parity
                if own == 1 and colours[row + 1 - parity] == 0:
                    for x in range(start, width - 1, 2):
                        _put(rgb, y, x, horizontal[x], here[x], vertical[x], step, offset, scaled)
                elif own == 1:
                    for x in range(start, width - 1, 2):
                        _put(rgb, y, x, vertical[x], here[x], horizontal[x], step, offset, scaled)
                elif own == 0:
                    for x in range(start, width - 1, 2):
                        _put(rgb, y, x, here[x], edges[x], corners[x], step, offset, scaled)
                else:
                    for x in range(start, width - 1, 2):
                        _put(rgb, y, x, corners[x], edges[x], here[x], step, offset, scaled)
            for c in range(3):
                rgb[y, 0, c] = rgb[y, 1, c]
                rgb[y, width - 1, c] = rgb[y, width - 2, c]
            above, here, below = here, below, above
    for x in range(width):
        for c in range(3):
            rgb[0, x, c] = rgb[1, x, c]
            rgb[height - 1, x, c] = rgb[height - 2, x, c]


@numba.njit(parallel=True, cache=True, nogil=True)
def _to_codes(image: np.ndarray, fill: np.float32, offset: np.float32, scale: np.float32, scaled: bool,
              codes: np.ndarray) -> None:  # pragma: no cover - compiled
    """OpenCV's 16-bit input: ``(value - offset) * scale`` rounded and clipped to 0..65535 when ``scaled``,
    ``value - offset`` otherwise (then whole and in range); non-finite values count as ``fill``.

    Each float32 step is numpy's (``work -= offset``, ``work *= scale``, ``rint``, ``clip``, ``astype``).
    """
    height, width = image.shape
    for y in numba.prange(height):
        for x in range(width):
            codes[y, x] = np.uint16(_code(image[y, x], fill, offset, scale, scaled))


@numba.njit(parallel=True, cache=True, nogil=True)
def _from_codes(rgb16: np.ndarray, step: np.float32, offset: np.float32, scaled: bool,
                rgb: np.ndarray) -> None:  # pragma: no cover - compiled
    """``rgb = float32(rgb16) * step + offset``, in numpy's order of float32 operations."""
    height, width, channels = rgb16.shape
    for y in numba.prange(height):
        for x in range(width):
            for c in range(channels):
                rgb[y, x, c] = _value(np.int32(rgb16[y, x, c]), step, offset, scaled)


def _wcs_header(header: fits.Header) -> str | None:
    if "CTYPE1" not in header and "CTYPE2" not in header:
        return None  # skip astropy's WCS parser (a few ms) on frames that cannot have a celestial WCS
    # Imported here: astropy.wcs brings astropy.coordinates and astropy.table, a third of a second of
    # start-up that frames without a WCS never need.
    from astropy.wcs import WCS

    with warnings.catch_warnings():
        # FITSFixedWarning and friends: the header's quirks are the camera's, not the user's to fix.
        warnings.simplefilter("ignore", AstropyWarning)
        try:
            wcs = WCS(header, naxis=2)
            if not wcs.has_celestial:
                return None
            return str(wcs.celestial.to_header(relax=True).tostring())
        except (ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError, MemoryError):
            # astropy.wcs on a malformed header (a CTYPE that is a number ...): the frame simply has no WCS.
            return None

