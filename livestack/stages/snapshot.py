"""Snapshots: the stack as a FITS file for science and a stretched picture for people, written atomically.

Public API:

- ``StackInfo``: frozen facts about a stack that go into the FITS header.
- ``write_snapshot(fits_path, image, info, image_format=..., flatten=..., history=..., crop=...)``: the one
  writer of a stack snapshot, for the daemon and ``livestack stack``: FITS plus picture (``picture_suffix``,
  cut to the rectangle ``coverage_box`` finds when ``crop`` > 0), and numbered copies under ``history/``
  when asked.
- ``atomic_write(path, data: bytes)``: re-exported from ``livestack.atomic`` (temporary name in the same
  folder, fsync, ``os.replace``).
- ``write_fits(path, image, info)``: float32; colour ``(H, W, 3)`` becomes a 3-plane cube ``(3, H, W)``; a
  ``COVERAGE`` image (frames per pixel) follows when ``info.coverage`` is given, then the ``FRAMES``
  provenance table (``stages.provenance``) when ``info.frames`` is given. NaN marks pixels no frame covered,
  or 0 with ``info.blank = "zero"``; ``info.history`` lines become HISTORY cards.
- ``coverage_box(coverage, share) -> (row0, row1, col0, col1)``: the large rectangle whose pixels are all
  covered by at least ``share`` of the frames.
- ``stretch(image, surface=False) -> ndarray``: auto-stretched uint8 ``(H, W)`` or ``(H, W, 3)``
  (NaN -> black).
- ``encode_image(image8, fmt) -> bytes``: PNG or JPEG bytes of a stretched image.
- ``write_preview(path, image)``: stretch then write PNG or JPEG by the file's suffix.
- ``preview_array(image, max_side=160) -> ndarray``: a small stretched uint8 image for event previews.
- ``preview_bytes(image, max_size=256) -> bytes``: the same, as JPEG bytes.

The stretch
    Each channel's sky level (median) and noise (MAD scaled to a Gaussian sigma) are measured on a strided
    subsample. Every channel is shifted and scaled so its sky sits at 0 with unit noise, which makes the
    sky neutral grey in a colour image; the black point is ``SHADOWS_SIGMA`` noise units below the sky,
    the white point the brightest sampled value, and a midtones transfer function (PixInsight's STF
    curve) places the sky at ``TARGET_BACKGROUND`` of full scale. The curve is steep near the sky and
    flat near the white point, so faint nebulosity lifts while star cores keep their gradation.

The surface stretch (``surface=True``, for the Moon, the Sun and planets)
    Assumes no sky: the black point is the ``SURFACE_BLACK`` percentile and the white point the
    ``SURFACE_WHITE`` percentile of all channels' sampled pixels (plus ``SURFACE_HEADROOM`` of the range),
    with a gentle gamma (``SURFACE_GAMMA``) between, so a bright disk keeps its shading and a dark limb or
    sky stays black. Such pictures are never flattened: the disk's own shading is not a gradient to remove.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import sep
from astropy.io import fits

from livestack import __version__
from livestack.atomic import atomic_file, atomic_write
from livestack.stages.provenance import FrameRow, frames_hdu
from livestack.stages.provenance import frames_csv as rows_csv

__all__ = ["FLATTEN_MESH", "JPEG_QUALITY", "PNG_COMPRESSION", "SHADOWS_SIGMA", "STAT_SAMPLES",
           "SURFACE_BLACK", "SURFACE_GAMMA", "SURFACE_HEADROOM", "SURFACE_WHITE", "TARGET_BACKGROUND",
           "SnapshotFiles", "StackInfo", "atomic_write", "coverage_box", "encode_image", "flatten_background",
           "picture_suffix", "preview_array", "preview_bytes", "stretch", "write_fits",
           "write_preview", "write_snapshot"]

#: Where the sky lands after the stretch, as a fraction of full scale (people like 0.1 to 0.25).
TARGET_BACKGROUND: float = 0.20

#: Black point, in units of the sky's noise below the sky: low enough that the noise is not clipped.
SHADOWS_SIGMA: float = 2.8

#: About this many pixels per channel are sampled (strided) for the sky statistics: enough for
#: a median good to a small fraction of sigma, few enough to cost ~1 ms at any image size.
STAT_SAMPLES: int = 250_000

#: Percentiles of the black and white points of the surface stretch, and its gamma.
SURFACE_BLACK: float = 0.5
SURFACE_WHITE: float = 99.95
SURFACE_GAMMA: float = 0.8
SURFACE_HEADROOM: float = 0.05

#: JPEG quality of previews.
JPEG_QUALITY: int = 90

#: zlib level of PNG previews, used with the RLE strategy and the SUB filter: at 8.3 MP that measured
#: 3-4x faster than OpenCV's defaults for files 1-20% larger (noisy sky compresses little either way).
PNG_COMPRESSION: int = 1


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
    frames : tuple of FrameRow or None
        Every frame received for the stack, for the ``FRAMES`` table; None writes no table.
    cards : tuple
        Further ``(keyword, value, comment)`` header cards (a composite's recipe).
    history : tuple of str
        Lines for the header's HISTORY (which calibration masters the frames had, and how many).
    coverage : ndarray or None
        Frames per pixel (``(H, W)`` integers) for the ``COVERAGE`` extension; None writes none.
    blank : str
        What pixels no frame covered hold in the FITS data: ``"nan"`` (the FITS convention for floats) or
        ``"zero"`` (for tools whose statistics turn to NaN on NaN).
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
    frames: tuple[FrameRow, ...] | None = None
    cards: tuple[tuple[str, Any, str], ...] = ()
    history: tuple[str, ...] = ()
    coverage: np.ndarray | None = field(default=None, compare=False, repr=False)
    blank: str = "nan"


@dataclass(frozen=True)
class SnapshotFiles:
    """Where a snapshot went: the FITS file and the picture beside it."""

    fits: Path
    picture: Path


def picture_suffix(image_format: str) -> str:
    """The picture's file suffix for an ``[output] image_format`` (``"jpeg"`` or ``"png"``).

    Parameters
    ----------
    image_format : {"jpeg", "png"}

    Returns
    -------
    str
        ``".jpg"`` or ``".png"``.
    """
    return ".jpg" if image_format == "jpeg" else ".png"


def write_snapshot(fits_path: str | Path, image: np.ndarray, info: StackInfo, *, image_format: str = "jpeg",
                   flatten: bool = False, history: bool = False, surface: bool = False,
                   frames_csv: bool = False, picture: np.ndarray | None = None,
                   crop: float = 0.0) -> SnapshotFiles:
    """Write a stack snapshot: the FITS file, then the picture beside it (same name, picture suffix).

    Each file appears whole (``atomic_write``); a failure leaves the previous snapshot's files as they
    were. This is the only place a stack snapshot is written, by the daemon and by ``livestack stack``.

    Parameters
    ----------
    fits_path : str or Path
        The FITS file (``stack.fits``); its folder must exist.
    image : ndarray
        The stack, ``(H, W)`` or ``(H, W, 3)``, NaN where no frame covered.
    info : StackInfo
    image_format : {"jpeg", "png"}
        The picture's format.
    flatten : bool
        Remove sky gradients from the picture (never from the FITS file); ignored for a surface.
    history : bool
        Also keep numbered copies, ``history/<stem>-<NCOMBINE:04d>.fits`` and picture, beside the FITS file.
    surface : bool
        Stretch the picture as a bright surface (Moon, Sun, planets; see ``stretch``).
    frames_csv : bool
        Also write ``info.frames`` (the ``FRAMES`` table) as CSV beside the FITS file,
        ``<stem>.frames.csv`` (``stages.provenance.frames_csv``); nothing when ``info.frames`` is None.
    picture : ndarray, optional
        uint8 ``(H, W)`` or ``(H, W, 3)`` already rendered (a composite's Lupton picture): written as it is,
        instead of stretching ``image``.
    crop : float
        Cut the picture (not the FITS) to the rectangle covered by at least this share of the frames
        (``coverage_box`` of ``info.coverage``), so sparse, ragged edges neither show nor sway the stretch
        and the flattening; 0 or no coverage: no cut.

    Returns
    -------
    SnapshotFiles
        The FITS file and picture written (not the history copies).

    Raises
    ------
    OSError
        When a file cannot be written (disk full, permissions).
    """
    fits_path = Path(fits_path)
    picture_path = fits_path.with_suffix(picture_suffix(image_format))
    flat = flatten and not surface
    shown = image
    if crop > 0 and info.coverage is not None:
        r0, r1, c0, c1 = coverage_box(info.coverage, crop)
        shown = image[r0:r1, c0:c1]
    rendered = picture if picture is not None else stretch(flatten_background(shown) if flat else shown,
                                                           surface)
    picture_bytes = encode_image(rendered, picture_path.suffix)
    write_fits(fits_path, image, info)
    atomic_write(picture_path, picture_bytes)
    if frames_csv and info.frames is not None:
        atomic_write(fits_path.with_suffix(".frames.csv"), rows_csv(info.frames))
    if history:
        folder = fits_path.parent / "history"
        folder.mkdir(exist_ok=True)
        stem = f"{fits_path.stem}-{info.ncombine:04d}"
        write_fits(folder / f"{stem}.fits", image, info)
        atomic_write(folder / f"{stem}{picture_path.suffix}", picture_bytes)
    return SnapshotFiles(fits_path, picture_path)


def coverage_box(coverage: np.ndarray, share: float) -> tuple[int, int, int, int]:
    """The rectangle a picture is cut to: every pixel in it covered by at least ``share`` of the frames.

    Starting from the bounding box of the well-covered pixels, the edge (row or column) with the largest
    part of poorly covered pixels is dropped until none is left; on a copy at most ``_BOX_SIDE`` pixels
    long, then scaled back (rounded inwards). It finds the large rectangle inside a drifted, dithered or
    rotated field without ragged borders.

    Parameters
    ----------
    coverage : ndarray
        Frames per pixel, ``(H, W)``.
    share : float
        Fraction of the most-covered pixel's count (at least one frame).

    Returns
    -------
    tuple of int
        ``row0, row1, col0, col1`` (end exclusive); the whole image when nothing qualifies.
    """
    rows, cols = coverage.shape
    top = int(coverage.max()) if coverage.size else 0
    if top == 0:
        return 0, rows, 0, cols
    good = coverage >= max(1.0, share * top)
    factor = max(1, math.ceil(max(rows, cols) / _BOX_SIDE))
    if factor > 1:
        # A coarse cell is good only if all its pixels are: pad to whole cells, then every cell's minimum.
        padded = np.zeros((math.ceil(rows / factor) * factor, math.ceil(cols / factor) * factor), dtype=bool)
        padded[:rows, :cols] = good
        small = np.asarray(padded.reshape(padded.shape[0] // factor, factor, -1, factor).all(axis=(1, 3)))
    else:
        small = good
    if not small.any():
        return 0, rows, 0, cols
    ys, xs = np.nonzero(small)
    r0, r1, c0, c1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    while r1 > r0 and c1 > c0:
        box = small[r0:r1, c0:c1]
        bad = {"top": 1.0 - box[0].mean(), "bottom": 1.0 - box[-1].mean(),
               "left": 1.0 - box[:, 0].mean(), "right": 1.0 - box[:, -1].mean()}
        edge, worst = max(bad.items(), key=lambda kv: kv[1])
        if worst <= 0.0:
            break
        if edge == "top":
            r0 += 1
        elif edge == "bottom":
            r1 -= 1
        elif edge == "left":
            c0 += 1
        else:
            c1 -= 1
    if r1 <= r0 or c1 <= c0:
        return 0, rows, 0, cols
    return r0 * factor, min(rows, r1 * factor), c0 * factor, min(cols, c1 * factor)


#: ``coverage_box`` works on a copy of the coverage at most this many pixels long.
_BOX_SIDE = 512


def write_fits(path: str | Path, image: np.ndarray, info: StackInfo) -> None:
    """Write the stack as a float32 FITS file, atomically.

    Parameters
    ----------
    path : str or Path
        Destination (``.fits``).
    image : ndarray
        ``(H, W)`` mono or ``(H, W, 3)`` RGB; NaN marks pixels no frame covered and is kept.
    info : StackInfo
        Goes into the header: NCOMBINE, EXPTIME (total), DATE-OBS, DATE-END, STACKMET, OBJECT, FILTER,
        the reference's WCS cards, CREATOR and SWVERSN (livestack's version); ``info.frames``, when given,
        becomes the ``FRAMES`` binary-table extension (``stages.provenance.frames_hdu``).

    Raises
    ------
    ValueError
        When ``image`` is neither ``(H, W)`` nor ``(H, W, 3)``.
    OSError
        When the file cannot be written (the old one, if any, is kept).

    Notes
    -----
    A colour image is stored as a cube of three planes R, G, B (``NAXIS3 = 3``), which Siril and
    PixInsight open as colour and DS9 as an RGB cube; the card ``CHANORD = 'RGB'`` records the order.
    No CTYPE3 is written: a third WCS axis would stop astropy from reading the SIP distortion.
    """
    data = np.asarray(image, dtype=np.float32)
    if data.ndim == 3 and data.shape[2] == 3:
        data = np.ascontiguousarray(np.moveaxis(data, 2, 0))
    elif data.ndim != 2:
        raise ValueError(f"A stack to write to {path} must be (H, W) or (H, W, 3), not {data.shape}.")
    if info.blank == "zero":
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    elif info.blank != "nan":
        raise ValueError(f"blank must be 'nan' or 'zero', not {info.blank!r}.")
    if info.coverage is not None and info.coverage.shape != data.shape[-2:]:
        raise ValueError(f"The coverage {info.coverage.shape} does not match the stack {data.shape[-2:]}.")
    hdu = fits.PrimaryHDU(data)
    header = hdu.header
    if info.wcs_header:
        wcs_cards = fits.Header.fromstring(info.wcs_header)
        for card in wcs_cards.cards:
            # The WCS block may carry the reference frame's own time; the stack's time is set below.
            if card.keyword not in _TIME_KEYS and card.keyword not in ("", "COMMENT", "HISTORY"):
                header.append(card)
    if data.ndim == 3:
        header["CHANORD"] = ("RGB", "planes 1, 2, 3 are red, green, blue")
    header["NCOMBINE"] = (int(info.ncombine), "number of frames stacked")
    header["EXPTIME"] = (float(info.exptime), "[s] total exposure of the stacked frames")
    if info.date_obs is not None:
        header["DATE-OBS"] = (_fits_time(info.date_obs), "UTC start of the first frame")
    if info.date_end is not None:
        header["DATE-END"] = (_fits_time(info.date_end), "UTC end of the last frame")
    if info.date_obs is not None or info.date_end is not None:
        header["TIMESYS"] = "UTC"
    header["STACKMET"] = (info.method, "stacking method")
    if info.object:
        header["OBJECT"] = info.object
    if info.filter:
        header["FILTER"] = info.filter
    if info.reference:
        name = Path(info.reference).name
        # A long file name leaves no room for a comment (astropy would truncate it with a warning).
        header["REFFRAME"] = (name, "frame the stack is aligned to") if len(name) <= 35 else name
    for keyword, value, comment in info.cards:
        header[keyword] = (value, comment)
    header["CREATOR"] = ("livestack", "software that made this file")
    header["SWVERSN"] = (__version__, "livestack version that made this file")
    header["DATE"] = (_fits_time(datetime.now(UTC)), "UTC time this file was written")
    for line in info.history:
        header.add_history(line)
    if info.blank == "zero":
        header["BLANKED"] = ("zero", "pixels no frame covered are 0 (COVERAGE = 0)")
    hdus: list[fits.PrimaryHDU | fits.ImageHDU | fits.BinTableHDU] = [hdu]
    if info.coverage is not None:
        coverage = fits.ImageHDU(np.asarray(info.coverage, dtype=np.int32), name="COVERAGE")
        coverage.header["BUNIT"] = ("frames", "frames that covered each pixel")
        coverage.header["NCOMBINE"] = (int(info.ncombine), "frames in the stack")
        hdus.append(coverage)
    if info.frames is not None:
        hdus.append(frames_hdu(info.frames))
    # Straight into the temporary file: a serialised copy in memory would add the whole file (both images)
    # to the peak of a daemon that still holds its accumulators.
    with atomic_file(path) as handle:
        fits.HDUList(hdus).writeto(handle)


def stretch(image: np.ndarray, surface: bool = False) -> np.ndarray:
    """Auto-stretch a linear image for display (see the module docstring).

    Parameters
    ----------
    image : ndarray
        ``(H, W)`` or ``(H, W, 3)`` RGB, any real dtype; NaN allowed.
    surface : bool
        A bright disk or surface (Moon, Sun, planet): no sky is assumed.

    Returns
    -------
    ndarray
        uint8 of the same shape; NaN pixels are 0.

    Raises
    ------
    ValueError
        When ``image`` is neither ``(H, W)`` nor ``(H, W, C)``.
    """
    if image.ndim not in (2, 3):
        raise ValueError(f"Only (H, W) or (H, W, C) images can be stretched, not {image.shape}.")
    if surface:
        return _surface_stretch(image)
    channels = 1 if image.ndim == 2 else image.shape[2]
    sky, noise, peak = _channel_statistics(image, channels)
    # Work in noise units above each channel's sky; white is the brightest sampled pixel of any channel.
    white = max((peak[c] - sky[c]) / noise[c] for c in range(channels))
    white = max(white, SHADOWS_SIGMA + 1.0)  # a flat image still needs a non-empty range
    span = white + SHADOWS_SIGMA
    # One affine map per channel equalises sky and noise and sends black -> 0, white -> 1;
    # cv2.transform does it in one multi-threaded pass (3-4x faster than numpy broadcasting).
    affine = np.zeros((channels, channels + 1), dtype=np.float64)
    for c in range(channels):
        gain = 1.0 / (noise[c] * span)
        affine[c, c] = gain
        affine[c, channels] = -(sky[c] - SHADOWS_SIGMA * noise[c]) * gain
    x: np.ndarray = cv2.transform(np.ascontiguousarray(image, dtype=np.float32), affine)
    if x.ndim != image.ndim:  # OpenCV drops a trailing channel axis of length 1
        x = x.reshape(image.shape)
    # fmax/fmin ignore NaN, so this clip also turns NaN into 0 (black).
    np.fmax(x, 0.0, out=x)
    np.fmin(x, 1.0, out=x)
    m = np.float32(_midtones_balance(SHADOWS_SIGMA / span, TARGET_BACKGROUND))
    # Midtones transfer function y = (m - 1) x / ((2m - 1) x - m), in place, then to 0..255.
    denominator = x * np.float32(2.0 * m - 1.0)
    denominator -= m
    x *= np.float32((m - 1.0) * 255.0)
    x /= denominator
    x += np.float32(0.5)
    return x.astype(np.uint8)


def encode_image(image8: np.ndarray, fmt: str) -> bytes:
    """Encode a uint8 image as PNG or JPEG.

    Parameters
    ----------
    image8 : ndarray
        uint8 ``(H, W)`` grey or ``(H, W, 3)`` RGB (for example the output of ``stretch``).
    fmt : str
        ``'png'``, ``'jpeg'`` or ``'jpg'``.

    Returns
    -------
    bytes

    Raises
    ------
    ValueError
        For another format, a non-uint8 image, or when OpenCV cannot encode it.
    """
    kind = fmt.lower().lstrip(".")
    if image8.dtype != np.uint8:
        raise ValueError(f"Only uint8 images can be encoded, not {image8.dtype}.")
    if kind == "png":
        extension, params = ".png", [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION,
                                      cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE,
                                      cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB]
    elif kind in ("jpeg", "jpg"):
        extension, params = ".jpg", [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    else:
        raise ValueError(f"Image format {fmt!r} is not one of png, jpeg.")
    # OpenCV's encoders take blue, green, red.
    pixels = cv2.cvtColor(image8, cv2.COLOR_RGB2BGR) if image8.ndim == 3 else image8
    ok, encoded = cv2.imencode(extension, pixels, params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {image8.shape} image as {kind}.")
    return encoded.tobytes()


#: Background mesh of ``flatten_background``, as a fraction of the image's shorter side: coarse enough that
#: galaxies and nebulae of a few arcminutes survive, fine enough to follow light pollution and moonlight.
FLATTEN_MESH = 1.0 / 5.0
#: ``flatten_background`` models the sky on a copy whose shorter side is about this many pixels.
_FLATTEN_SIDE = 256


def flatten_background(image: np.ndarray) -> np.ndarray:
    """Subtract a smooth sky model (gradients from light pollution, the Moon, vignetting) per channel.

    The model is sep's background mesh (sigma-clipped per cell, spline-interpolated) computed on a
    downsampled copy, then scaled back up; the median sky level is kept so the image stays positive.
    For pictures only: the FITS snapshot keeps the stack as it is.

    Parameters
    ----------
    image : ndarray
        Linear ``(H, W)`` or ``(H, W, C)`` image; NaN allowed (kept NaN).

    Returns
    -------
    ndarray
        float32, same shape.
    """
    if image.ndim not in (2, 3):
        raise ValueError(f"Only (H, W) or (H, W, C) images can be flattened, not {image.shape}.")
    planes = image[:, :, np.newaxis] if image.ndim == 2 else image
    rows, cols = planes.shape[:2]
    factor = max(1, min(rows, cols) // _FLATTEN_SIDE)
    small_size = (max(1, cols // factor), max(1, rows // factor))
    out = np.empty(planes.shape, dtype=np.float32)
    for c in range(planes.shape[2]):
        plane = np.asarray(planes[:, :, c], dtype=np.float32)
        finite = np.isfinite(plane)
        if not finite.any():
            out[:, :, c] = plane
            continue
        fill = float(np.median(plane[finite][:: max(1, int(finite.sum()) // 100_000)]))
        filled = np.where(finite, plane, np.float32(fill))
        small = np.ascontiguousarray(cv2.resize(filled, small_size, interpolation=cv2.INTER_AREA))
        holes = cv2.resize((~finite).astype(np.uint8), small_size, interpolation=cv2.INTER_NEAREST) > 0
        mesh = max(8, int(min(small.shape) * FLATTEN_MESH))
        model = sep.Background(small, mask=holes, bw=mesh, bh=mesh, fw=3, fh=3).back()
        level = float(np.median(model))
        # The model scaled up into the filled copy's memory, the difference into the output: no whole-image
        # temporaries (two fewer image copies at the peak of a snapshot), the same float32 operations.
        full = cv2.resize(model, (cols, rows), dst=filled, interpolation=cv2.INTER_CUBIC)
        target = out[:, :, c]
        np.subtract(plane, full, out=target)
        target += np.float32(level)
    return out[:, :, 0] if image.ndim == 2 else out


def write_preview(path: str | Path, image: np.ndarray, flatten: bool = False, surface: bool = False) -> None:
    """Stretch a linear image and write it as PNG or JPEG (by the suffix), atomically.

    Parameters
    ----------
    path : str or Path
        Destination ending in ``.png``, ``.jpg`` or ``.jpeg``.
    image : ndarray
        Linear ``(H, W)`` or ``(H, W, 3)`` RGB image.
    flatten : bool
        Remove sky gradients first (``flatten_background``); ignored for a surface.
    surface : bool
        Use the surface stretch (Moon, Sun, planets).

    Raises
    ------
    ValueError
        For another suffix.
    OSError
        When the file cannot be written (the old one, if any, is kept).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _PREVIEW_SUFFIXES:
        raise ValueError(
            f"The preview {path} must end in one of {', '.join(_PREVIEW_SUFFIXES)}, not {suffix!r}."
        )
    flat = flatten and not surface
    atomic_write(path, encode_image(stretch(flatten_background(image) if flat else image, surface), suffix))


def preview_array(image: np.ndarray, max_side: int = 160, flatten: bool = False,
                  surface: bool = False) -> np.ndarray:
    """A small stretched uint8 copy of an image, for event previews.

    Parameters
    ----------
    image : ndarray
        Linear ``(H, W)`` or ``(H, W, 3)`` image.
    max_side : int
        Longest side of the result, pixels; images already smaller keep their size.
    flatten : bool
        Remove sky gradients (after downscaling, where it is cheap); ignored for a surface.
    surface : bool
        Use the surface stretch (Moon, Sun, planets).

    Returns
    -------
    ndarray
        uint8 ``(h, w)`` or ``(h, w, 3)``.
    """
    data: np.ndarray = np.asarray(image, dtype=np.float32)
    rows, cols = data.shape[:2]
    factor = max_side / max(rows, cols)
    if factor < 1.0:
        size = (max(1, round(cols * factor)), max(1, round(rows * factor)))
        # INTER_AREA averages whole blocks: noise drops and stars survive, unlike point sampling.
        data = cv2.resize(data, size, interpolation=cv2.INTER_AREA)
    return stretch(flatten_background(data) if flatten and not surface else data, surface)


def preview_bytes(image: np.ndarray, max_size: int = 256) -> bytes:
    """A small stretched JPEG of an image, for event previews.

    Parameters
    ----------
    image : ndarray
        Linear ``(H, W)`` or ``(H, W, 3)`` image.
    max_size : int
        Longest side of the picture, pixels.

    Returns
    -------
    bytes
        JPEG.
    """
    return encode_image(preview_array(image, max_side=max_size), "jpeg")


# --------------------------------------------------------------------------------------------------------
# Private helpers
# --------------------------------------------------------------------------------------------------------

_PREVIEW_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")

#: Cards of a frame's WCS block that describe that frame's time, not the stack's.
_TIME_KEYS = frozenset({"DATE-OBS", "DATE-END", "DATE-BEG", "DATE-AVG", "MJD-OBS", "MJD-END", "MJD-BEG",
                        "MJD-AVG", "DATEREF", "MJDREF", "MJDREFI", "MJDREFF", "TIMESYS"})

#: Converts a median absolute deviation into the sigma of a Gaussian.
_MAD_TO_SIGMA = 1.4826

def _fits_time(moment: datetime) -> str:
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment.isoformat(timespec="milliseconds")


def _subsample(image: np.ndarray) -> np.ndarray:
    rows, cols = image.shape[:2]
    step = max(1, int(math.sqrt(rows * cols / STAT_SAMPLES)))
    return image[::step, ::step]


def _channel_statistics(image: np.ndarray, channels: int) -> tuple[list[float], list[float], list[float]]:
    """Sky (median), noise (MAD sigma) and peak of each channel, measured on a strided subsample."""
    sample = _subsample(image)
    sky: list[float] = []
    noise: list[float] = []
    peak: list[float] = []
    for c in range(channels):
        plane = np.asarray(sample if channels == 1 else sample[..., c], dtype=np.float32)
        values = plane[np.isfinite(plane)]
        if values.size == 0:
            sky.append(0.0)
            noise.append(1.0)
            peak.append(0.0)
            continue
        median = float(np.median(values))
        sigma = _MAD_TO_SIGMA * float(np.median(np.abs(values - median)))
        if not sigma > 0.0:
            # Quantised or synthetic data can have MAD 0: fall back on the spread, then on a tiny unit.
            sigma = float(np.std(values)) or max(abs(median) * 1e-6, 1e-6)
        sky.append(median)
        noise.append(sigma)
        peak.append(float(values.max()))
    return sky, noise, peak


def _surface_stretch(image: np.ndarray) -> np.ndarray:
    values = _subsample(image).astype(np.float32).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return np.zeros(image.shape, dtype=np.uint8)
    black, white = (float(v) for v in np.percentile(values, [SURFACE_BLACK, SURFACE_WHITE]))
    # Headroom above the white percentile, so that the brightest highlights keep their gradation.
    white += SURFACE_HEADROOM * (white - black)
    if not white > black:
        white = black + 1.0
    x = (np.asarray(image, dtype=np.float32) - np.float32(black)) / np.float32(white - black)
    np.fmax(x, 0.0, out=x)
    np.fmin(x, 1.0, out=x)
    np.power(x, np.float32(SURFACE_GAMMA), out=x)
    x *= np.float32(255.0)
    x += np.float32(0.5)
    return x.astype(np.uint8)


def _midtones_balance(x0: float, target: float) -> float:
    """The midtones parameter m for which the transfer function maps ``x0`` to ``target``."""
    x0 = min(max(x0, 1e-6), 1.0 - 1e-6)
    return x0 * (target - 1.0) / (2.0 * x0 * target - target - x0)
