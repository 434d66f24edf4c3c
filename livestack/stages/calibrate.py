"""Calibrate: master frames, choosing them for a light, and applying them to the raw mosaic.

Public API:

- ``frame_kind(imagetyp) -> str``: ``light``, ``bias``, ``dark``, ``flat`` or ``darkflat`` from IMAGETYP.
- ``Master``: a master frame's metadata (``FrameMeta``), kind and how it was made; pixels are loaded apart.
- ``build_master(kind, frames, metas, *, method, pedestal=None) -> (ndarray, header cards)``: combine raw
  calibration frames (pure: arrays in, array out).
- ``group_key(kind, meta)``: which raw calibration frames are combined together.
- ``write_master(path, kind, data, metas, ...)`` / ``read_library(folder) -> MasterLibrary``: the files.
- ``make_masters(paths, folder, method) -> list of str``: what ``livestack masters`` does: read raw
  calibration files, group them, build and write one master per group (biases first, so darks and flats
  can use them).
- ``match(meta, library, temperature_tolerance=5.0) -> Plan``: the masters for one light, with reasons.
- ``Plan.offset(load)`` and ``Plan.gain(load)``: the per-pixel pedestal to subtract and the flat's inverse.
- ``apply(mosaic, offset, gain)``: ``(mosaic - offset) * gain`` in place, one pass.
- ``defects_from_dark(dark, sigma)``, ``defects_from_flat(flat)``, ``defect_candidates(mosaic, bayer,
  sigma)``, ``persistent_defects(history, min_frames)``, ``replace_defects(mosaic, defects, bayer)``: hot and
  cold pixels, found from a master or from consecutive frames, replaced by the median of same-colour
  neighbours.

Conventions
    Everything works on the raw mosaic as read (``frames.read_raw``), before debayering, so a colour camera's
    four filter sites keep their own dark current and flat response. A master's ``meta.bayer`` is the
    pattern at its array element ``[0, 0]``, exactly as a light's, so equal patterns mean equal sites.

Matching (the rules the README gives users)
    For every kind, size, binning (XBINNING/YBINNING), Bayer pattern (after XBAYROFF/YBAYROFF), GAIN and
    OFFSET must be equal; a key is compared only when both headers have it. Set temperatures (SET-TEMP,
    else CCD-TEMP) must lie within the tolerance. A dark must have the light's exposure (within 1%),
    unless its bias was removed when it was made and a bias matches the light: then its thermal signal is
    scaled by the ratio of exposures. A flat must have the light's FILTER and is divided only after the
    light's pedestal is removed (by a bias or a dark); of several, the nearest in time wins. Every
    rejection of a master names the key that differs.

Order on the mosaic: subtract ``bias + scale * dark`` (or a dark that includes its bias), divide by the
flat normalised to mean 1, then replace defects by the median of their same-colour neighbours.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numba
import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning

from livestack.errors import CalibrationError, FrameError
from livestack.stages.frames import FITS_SUFFIXES, FrameMeta, read_meta, read_raw
from livestack.stages.snapshot import atomic_write

__all__ = [
    "COMBINE_METHODS",
    "KINDS",
    "Master",
    "MasterLibrary",
    "Plan",
    "apply",
    "build_master",
    "defect_candidates",
    "defects_from_dark",
    "defects_from_flat",
    "frame_kind",
    "group_key",
    "load_master",
    "make_masters",
    "match",
    "persistent_defects",
    "read_library",
    "replace_defects",
    "write_master",
]

#: Kinds of calibration frame, in the order masters are built (each may need the ones before it).
KINDS: tuple[str, ...] = ("bias", "darkflat", "dark", "flat")

#: How raw calibration frames are combined.
COMBINE_METHODS: tuple[str, ...] = ("kappa-sigma", "median")

#: Exposures within this relative difference count as equal.
EXPOSURE_TOLERANCE: float = 0.01

#: Kappa-sigma combination of masters: samples beyond this many sigmas (1.4826 x MAD) of the pixel's
#: median are left out of its mean.
COMBINE_KAPPA: float = 3.0

#: A flat pixel answering less than this fraction of the mean is dead: it becomes a defect, not a huge gain.
FLAT_DEAD: float = 0.2

#: Rows combined at a time when building a master: bounds the temporary memory of the median.
_COMBINE_ROWS = 64

#: Pixels sampled (strided) for a frame's or a master's sky level and noise.
_SAMPLE = 20_000

#: IMAGETYP values (upper case, without spaces, dashes and underscores) and the kinds they name.
_IMAGETYP = {
    "LIGHT": "light", "LIGHTFRAME": "light", "OBJECT": "light", "SCIENCE": "light",
    "BIAS": "bias", "BIASFRAME": "bias", "ZERO": "bias", "OFFSET": "bias", "MASTERBIAS": "bias",
    "DARK": "dark", "DARKFRAME": "dark", "MASTERDARK": "dark",
    "FLAT": "flat", "FLATFRAME": "flat", "FLATFIELD": "flat", "SKYFLAT": "flat", "DOMEFLAT": "flat",
    "TWILIGHTFLAT": "flat", "MASTERFLAT": "flat",
    "DARKFLAT": "darkflat", "FLATDARK": "darkflat", "DARKFLATFRAME": "darkflat",
    "MASTERDARKFLAT": "darkflat",
}


def frame_kind(imagetyp: str | None) -> str:
    """What a frame is, from its IMAGETYP: ``light`` unless it names a calibration frame.

    Parameters
    ----------
    imagetyp : str or None
        The header's IMAGETYP (``'Dark Frame'``, ``'FLAT'``, ``'Bias'``, ``'DarkFlat'`` ...).

    Returns
    -------
    str
        One of ``light``, ``bias``, ``dark``, ``flat``, ``darkflat``. Unknown or missing values are lights.
    """
    if not imagetyp:
        return "light"
    key = "".join(ch for ch in imagetyp.upper() if ch.isalnum())
    return _IMAGETYP.get(key, "light")


@dataclass(frozen=True)
class Master:
    """A master frame of the library, without its pixels.

    Attributes
    ----------
    kind : str
        ``bias``, ``dark``, ``flat`` or ``darkflat``.
    meta : FrameMeta
        Its matching keys (``meta.path`` is the file); ``time_utc`` is the median time of its raw frames.
    ncombine : int
        Raw frames combined.
    bias_removed : bool
        A dark whose bias was subtracted when it was made (only the thermal signal: it can be scaled).
    """

    kind: str
    meta: FrameMeta
    ncombine: int = 1
    bias_removed: bool = False

    @property
    def name(self) -> str:
        return Path(self.meta.path).name


@dataclass(frozen=True)
class MasterLibrary:
    """The masters of one folder, and why any file in it was passed over."""

    masters: tuple[Master, ...] = ()
    skipped: tuple[str, ...] = ()
    folder: str = ""

    def __len__(self) -> int:
        return len(self.masters)


@dataclass(frozen=True)
class Plan:
    """The masters chosen for one light.

    Attributes
    ----------
    bias, dark, flat : Master or None
    dark_scale : float
        Factor applied to a bias-removed dark (the light's exposure over the dark's).
    notes : tuple of str
        One readable line per kind: what was used, or why nothing was.
    """

    bias: Master | None = None
    dark: Master | None = None
    flat: Master | None = None
    dark_scale: float = 1.0
    notes: tuple[str, ...] = ()

    @property
    def used(self) -> bool:
        """True when any master is applied."""
        return self.bias is not None or self.dark is not None or self.flat is not None

    @property
    def key(self) -> tuple[str | None, str | None, float, str | None]:
        """Identifies the arrays this plan needs (for caching them)."""
        return (_path(self.bias), _path(self.dark), round(self.dark_scale, 6), _path(self.flat))

    def describe(self) -> str:
        """One line: ``bias B; dark D x0.5; flat F``, or why no master applies."""
        return "; ".join(self.notes)

    def offset(self, load: Callable[[Master], np.ndarray]) -> np.ndarray | None:
        """The pedestal to subtract, ``bias + scale * dark`` (float32), or None.

        Parameters
        ----------
        load : callable
            Returns a master's pixels (float32 ``(H, W)``).
        """
        out: np.ndarray | None = None
        if self.bias is not None:
            out = np.array(load(self.bias), dtype=np.float32)
        if self.dark is not None:
            dark = load(self.dark)
            if out is None:
                out = np.array(dark, dtype=np.float32)
            else:
                out += np.float32(self.dark_scale) * dark
        return out

    def gain(self, load: Callable[[Master], np.ndarray]) -> np.ndarray | None:
        """The flat's inverse (float32), 1 at dead pixels (they are defects), or None without a flat."""
        if self.flat is None:
            return None
        flat = load(self.flat)
        with np.errstate(divide="ignore", invalid="ignore"):
            gain = np.where(flat > FLAT_DEAD, 1.0 / flat, 1.0).astype(np.float32)
        return gain


# --------------------------------------------------------------------------------------------------------
# Building masters
# --------------------------------------------------------------------------------------------------------

def group_key(kind: str, meta: FrameMeta) -> tuple[object, ...]:
    """The raw calibration frames that are combined into one master share this key.

    Size, binning, Bayer pattern, gain and offset always; exposure for darks and dark-flats (a flat's
    exposure may vary, its frames are normalised); set temperature (rounded to 1 C) for all but flats;
    filter for flats.
    """
    temp = None if meta.set_temp is None or kind == "flat" else round(meta.set_temp)
    exposure = None if kind in ("bias", "flat") or meta.exptime is None else round(meta.exptime, 3)
    filt = (meta.filter or "").strip().lower() if kind == "flat" else ""
    return (kind, meta.shape, meta.binning, meta.bayer, meta.gain, meta.offset, exposure, temp, filt)


def build_master(kind: str, frames: Sequence[np.ndarray], *, method: str = "kappa-sigma",
                 pedestal: np.ndarray | None = None) -> np.ndarray:
    """Combine raw calibration frames of one group into a master.

    Parameters
    ----------
    kind : str
        ``bias``, ``dark``, ``darkflat`` or ``flat``.
    frames : sequence of ndarray
        Raw mosaics of one size (``group_key`` equal).
    method : str
        ``kappa-sigma`` (the mean of the samples within ``COMBINE_KAPPA`` sigmas of each pixel's median;
        the median itself below 3 frames) or ``median``.
    pedestal : ndarray, optional
        Subtracted from every frame first: the master bias for a dark (so that the dark can be scaled), the
        dark-flat or bias for a flat. A flat needs one.

    Returns
    -------
    ndarray
        float32 master; a flat is normalised to mean 1 (each frame is normalised by its own median first,
        so flats of different brightness combine).

    Raises
    ------
    CalibrationError
        No frames, frames of different sizes, an unknown method, or a flat without a pedestal.
    """
    if kind not in KINDS:
        raise CalibrationError(f"{kind!r} is not a kind of master ({', '.join(KINDS)}).")
    if method not in COMBINE_METHODS:
        raise CalibrationError(f"{method!r} is not a combination method ({', '.join(COMBINE_METHODS)}).")
    if not frames:
        raise CalibrationError(f"No frames to make a master {kind} from.")
    shape = frames[0].shape
    if any(f.shape != shape for f in frames):
        raise CalibrationError(f"The {kind} frames are not all {shape[0]}x{shape[1]}.")
    if kind == "flat" and pedestal is None:
        raise CalibrationError("A flat needs a bias or a dark-flat to remove its pedestal; none matches.")
    cube = np.empty((len(frames), *shape), dtype=np.float32)
    for i, f in enumerate(frames):
        np.copyto(cube[i], f, casting="unsafe")
        if pedestal is not None:
            cube[i] -= pedestal
        if kind == "flat":
            level = float(np.median(cube[i][:: _stride(cube[i].size), :: _stride(cube[i].size)]))
            if not level > 0:
                raise CalibrationError("A flat frame has no light above its pedestal (median <= 0).")
            cube[i] *= np.float32(1.0 / level)
    out = np.empty(shape, dtype=np.float32)
    for r0 in range(0, shape[0], _COMBINE_ROWS):
        block = cube[:, r0:r0 + _COMBINE_ROWS]
        if method == "median" or len(frames) < 3:
            out[r0:r0 + _COMBINE_ROWS] = np.median(block, axis=0)
        else:
            out[r0:r0 + _COMBINE_ROWS] = _clipped_mean(block, COMBINE_KAPPA)
    if kind == "flat":
        out *= np.float32(1.0 / float(np.mean(out, dtype=np.float64)))
    return out


def write_master(path: str | Path, kind: str, data: np.ndarray, metas: Sequence[FrameMeta], *,
                 method: str, bias_removed: bool = False, pedestal: str | None = None) -> Master:
    """Write a master as a float32 FITS file whose header says what it is and what it matches, atomically.

    Parameters
    ----------
    path : str or Path
    kind : str
    data : ndarray
    metas : sequence of FrameMeta
        The raw frames it was made from (their common keys are recorded, and their names as HISTORY).
    method : str
        How they were combined.
    bias_removed : bool
        For a dark: the master bias was subtracted.
    pedestal : str, optional
        The master that was subtracted first (its file name), recorded as HISTORY.

    Returns
    -------
    Master
    """
    first = metas[0]
    times = sorted(m.time_utc for m in metas if m.time_utc is not None)
    header = fits.Header()
    header["IMAGETYP"] = (f"Master {kind.capitalize() if kind != 'darkflat' else 'DarkFlat'}",
                          "a livestack calibration master")
    header["LSMASTER"] = (kind, "livestack master kind: bias, dark, flat, darkflat")
    header["NCOMBINE"] = (len(metas), "raw frames combined")
    header["COMBMETH"] = (method, "how they were combined")
    header["BIASSUB"] = (bool(bias_removed), "the master bias was subtracted (thermal signal only)")
    header["XBINNING"] = first.binning[0]
    header["YBINNING"] = first.binning[1]
    if first.bayer:
        header["BAYERPAT"] = (first.bayer, "pattern at array element [0, 0]")
        header["ROWORDER"] = "TOP-DOWN"
    for key, value in (("GAIN", first.gain), ("OFFSET", first.offset)):
        if value is not None:
            header[key] = value
    if kind != "bias":
        exposures = [m.exptime for m in metas if m.exptime is not None]
        if exposures:
            header["EXPTIME"] = (float(np.median(exposures)), "[s] median exposure of the raw frames")
    temps = [m.set_temp for m in metas if m.set_temp is not None]
    if temps:
        header["SET-TEMP"] = (float(np.median(temps)), "[C] median sensor temperature")
    if kind == "flat" and first.filter:
        header["FILTER"] = first.filter
    if times:
        header["DATE-OBS"] = (times[len(times) // 2].strftime("%Y-%m-%dT%H:%M:%S"), "UTC, median time")
    header["CREATOR"] = "livestack"
    if pedestal:
        header["HISTORY"] = f"pedestal subtracted: {pedestal}"
    for m in metas:
        header["HISTORY"] = f"from {Path(m.path).name}"
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)  # long HISTORY lines are wrapped, as they should
        fits.PrimaryHDU(np.asarray(data, dtype=np.float32), header=header).writeto(buffer)
    atomic_write(path, buffer.getbuffer())
    return _master_from_file(Path(path))


def make_masters(paths: Sequence[str | Path], folder: str | Path, method: str = "kappa-sigma",
                 bayer_pattern: str | None = None, temperature_tolerance: float = 5.0) -> list[str]:
    """Build the masters of a set of raw calibration files into a folder.

    The files are grouped by ``group_key``; the groups are built bias first, then dark-flats, darks (minus
    the matching bias, when there is one, so they can be scaled) and flats (minus the matching dark-flat,
    else the bias and any dark scaled to their exposure; a flat group with neither is refused).

    Parameters
    ----------
    paths : sequence of str or Path
        Raw bias, dark, flat and dark-flat files (by IMAGETYP); lights and unreadable files are listed and
        left out.
    folder : str or Path
        Where the masters go (created if needed; existing masters of the same name are replaced).
    method : str
        ``kappa-sigma`` or ``median``.
    bayer_pattern : str, optional
        As for ``frames.read_frame``.
    temperature_tolerance : float
        Matching tolerance for the pedestal masters of darks and flats.

    Returns
    -------
    list of str
        One line per master written or group refused, and per file left out.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    groups: dict[tuple[object, ...], list[FrameMeta]] = {}
    for p in paths:
        try:
            meta = read_meta(p, bayer_pattern=bayer_pattern)
        except FrameError as exc:
            lines.append(f"left out: {exc}")
            continue
        kind = frame_kind(meta.imagetyp)
        if kind == "light":
            lines.append(f"left out: {Path(p).name} is not a calibration frame (IMAGETYP {meta.imagetyp!r})")
            continue
        groups.setdefault(group_key(kind, meta), []).append(meta)
    built: list[Master] = []
    names: set[str] = set()
    for kind in KINDS:
        for key, metas in groups.items():
            if key[0] != kind:
                continue
            first = metas[0]
            exptime = float(np.median([m.exptime for m in metas if m.exptime is not None] or [0.0]))
            probe = replace(first, exptime=exptime if exptime > 0 else None)
            pedestal: np.ndarray | None = None
            pedestal_name: str | None = None
            if kind in ("dark", "flat"):
                plan = _pedestal_plan(kind, probe, built, temperature_tolerance)
                if plan is not None:
                    pedestal = plan.offset(load_master)
                    pedestal_name = plan.describe()
            if kind == "flat" and pedestal is None:
                lines.append(f"refused: {len(metas)} flat frame(s) {_label(kind, probe)}: no bias, dark-flat "
                             "or dark matches them to remove their pedestal")
                continue
            frames = [read_raw(m.path, bayer_pattern=bayer_pattern).mosaic for m in metas]
            data = build_master(kind, frames, method=method, pedestal=pedestal)
            name = _unique(f"master_{_label(kind, probe)}.fits", names)
            bias_removed = kind == "dark" and pedestal is not None
            master = write_master(folder / name, kind, data, metas, method=method, bias_removed=bias_removed,
                                  pedestal=pedestal_name)
            built.append(master)
            lines.append(f"wrote {folder / name}: {kind} of {len(metas)} frames"
                         + (f" minus {pedestal_name}" if pedestal_name else ""))
    return lines


def _pedestal_plan(kind: str, meta: FrameMeta, built: Sequence[Master], tolerance: float) -> Plan | None:
    """What to subtract from a dark (the bias) or a flat (a dark-flat, else bias and dark) being built."""
    if kind == "dark":
        biases = [m for m in built if m.kind == "bias" and _mismatch(meta, m, tolerance) is None]
        return Plan(bias=biases[0], notes=(biases[0].name,)) if biases else None
    darkflats = [m for m in built if m.kind == "darkflat" and _mismatch(meta, m, tolerance) is None
                 and _same_exposure(m.meta.exptime, meta.exptime)]
    if darkflats:
        return Plan(dark=darkflats[0], notes=(darkflats[0].name,))
    plan = match(meta, [m for m in built if m.kind in ("bias", "dark")], tolerance)
    if plan.bias is None and plan.dark is None:
        return None
    return replace(plan, notes=tuple(n for n in plan.notes if not n.startswith("no ")))


def _same_exposure(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) <= EXPOSURE_TOLERANCE * max(a, b)


def _label(kind: str, meta: FrameMeta) -> str:
    parts = [kind, f"{meta.shape[1]}x{meta.shape[0]}"]
    if meta.binning != (1, 1):
        parts.append(f"bin{meta.binning[0]}x{meta.binning[1]}")
    if meta.gain is not None:
        parts.append(f"g{meta.gain:g}")
    if meta.offset is not None:
        parts.append(f"o{meta.offset:g}")
    if kind in ("dark", "darkflat") and meta.exptime is not None:
        parts.append(f"{meta.exptime:g}s")
    if kind != "flat" and meta.set_temp is not None:
        parts.append(f"{meta.set_temp:g}C")
    if kind == "flat" and meta.filter:
        parts.append("".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in meta.filter))
    return "_".join(parts)


def _unique(name: str, taken: set[str]) -> str:
    stem, n = name[: -len(".fits")], 2
    while name in taken:
        name = f"{stem}_{n}.fits"
        n += 1
    taken.add(name)
    return name


def read_library(folder: str | Path) -> MasterLibrary:
    """The masters in a folder (files written by ``write_master``; others are listed as skipped).

    Parameters
    ----------
    folder : str or Path

    Returns
    -------
    MasterLibrary

    Raises
    ------
    CalibrationError
        When the folder does not exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"The masters folder {folder} does not exist.")
    masters: list[Master] = []
    skipped: list[str] = []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or not p.name.lower().endswith(FITS_SUFFIXES) or p.name.startswith("."):
            continue
        try:
            masters.append(_master_from_file(p))
        except (FrameError, CalibrationError) as exc:
            skipped.append(f"{p.name}: {exc}")
    return MasterLibrary(tuple(masters), tuple(skipped), str(folder))


def load_master(master: Master) -> np.ndarray:
    """A master's pixels, float32 ``(H, W)``, read-only.

    Raises
    ------
    FrameError
        When the file cannot be read any more.
    """
    data = read_raw(master.meta.path, bayer_pattern=master.meta.bayer or "MONO").mosaic
    data.flags.writeable = False
    return data


# --------------------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------------------

def match(light: FrameMeta, library: MasterLibrary | Sequence[Master],
          temperature_tolerance: float = 5.0) -> Plan:
    """Choose the masters for one light by the rules in the module docstring.

    Parameters
    ----------
    light : FrameMeta
    library : MasterLibrary or sequence of Master
    temperature_tolerance : float
        Largest difference of set temperatures, Celsius.

    Returns
    -------
    Plan
        With one note per kind of master in the library saying which file was used, or naming the key
        that kept each candidate out.
    """
    masters = library.masters if isinstance(library, MasterLibrary) else tuple(library)
    notes: list[str] = []

    def candidates(kind: str) -> tuple[list[Master], list[str]]:
        ok, why = [], []
        for m in masters:
            if m.kind != kind:
                continue
            problem = _mismatch(light, m, temperature_tolerance)
            if problem is None and kind == "flat":
                problem = _filter_mismatch(light, m)
            if problem is None:
                ok.append(m)
            else:
                why.append(f"{m.name}: {problem}")
        return ok, why

    def refuse(kind: str, why: list[str]) -> None:
        notes.append(f"no {kind} ({'; '.join(why)})" if why else f"no {kind} in the library")

    bias_ok, bias_why = candidates("bias")
    bias = _nearest_in_time(light, bias_ok)
    dark_ok, dark_why = candidates("dark")
    dark, scale, dark_why = _choose_dark(light, dark_ok, dark_why, bias is not None)
    # A bias is needed under a scaled dark; with a dark that holds its own bias it would be subtracted twice.
    if dark is not None and not dark.bias_removed:
        bias = None
    if bias is not None:
        notes.append(f"bias {bias.name}")
    elif dark is None or dark.bias_removed:
        refuse("bias", bias_why)
    if dark is not None:
        notes.append(f"dark {dark.name}" + (f" x{scale:.4g}" if scale != 1.0 else ""))
    else:
        refuse("dark", dark_why)
    flat_ok, flat_why = candidates("flat")
    flat = _nearest_in_time(light, flat_ok)
    if flat is not None and bias is None and dark is None:
        flat_why = [f"{flat.name}: refused: no bias or dark matches to remove the pedestal first"]
        flat = None
    if flat is not None:
        notes.append(f"flat {flat.name}")
    else:
        refuse("flat", flat_why)
    return Plan(bias=bias, dark=dark, flat=flat, dark_scale=scale, notes=tuple(notes))


def _mismatch(light: FrameMeta, m: Master, tolerance: float) -> str | None:
    """The first matching key that differs, in words; None when all agree."""
    mm = m.meta
    if mm.shape != light.shape:
        return (f"size {mm.shape[0]}x{mm.shape[1]} differs from the light's "
                f"{light.shape[0]}x{light.shape[1]} (rows x columns)")
    if mm.binning != light.binning:
        return (f"binning {mm.binning[0]}x{mm.binning[1]} differs from the light's "
                f"{light.binning[0]}x{light.binning[1]}")
    if mm.bayer != light.bayer:
        return (f"Bayer pattern {mm.bayer or 'none (mono)'} differs from the light's "
                f"{light.bayer or 'none (mono)'} (pattern and offset)")
    for key, a, b in (("gain", mm.gain, light.gain), ("offset", mm.offset, light.offset)):
        if a is not None and b is not None and not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6):
            return f"{key} {a:g} differs from the light's {b:g}"
    t_master, t_light = mm.set_temp, light.set_temp
    if t_master is not None and t_light is not None and abs(t_master - t_light) > tolerance:
        return (f"set temperature {mm.set_temp:g} C is more than {tolerance:g} C from the light's "
                f"{light.set_temp:g} C")
    return None


def _filter_mismatch(light: FrameMeta, m: Master) -> str | None:
    a = (m.meta.filter or "").strip().lower()
    b = (light.filter or "").strip().lower()
    if a != b:
        return f"filter {m.meta.filter or 'none'} differs from the light's {light.filter or 'none'}"
    return None


def _choose_dark(light: FrameMeta, ok: list[Master], why: list[str],
                 have_bias: bool) -> tuple[Master | None, float, list[str]]:
    usable: list[tuple[tuple[float, float, float], Master, float]] = []
    for m in ok:
        t_dark, t_light = m.meta.exptime, light.exptime
        same = (t_dark is not None and t_light is not None
                and abs(t_dark - t_light) <= EXPOSURE_TOLERANCE * max(t_dark, t_light))
        if same and (have_bias or not m.bias_removed):
            scale = 1.0
        elif same:
            why.append(f"{m.name}: its bias was removed when it was made and no bias matches the light")
            continue
        elif t_dark is None or t_light is None or t_dark <= 0:
            why.append(f"{m.name}: exposure unknown ({'dark' if t_dark is None else 'light'} has no EXPTIME)")
            continue
        elif not m.bias_removed:
            why.append(f"{m.name}: exposure {t_dark:g} s differs from the light's {t_light:g} s and the dark "
                       "still holds its bias, so it cannot be scaled")
            continue
        elif not have_bias:
            why.append(f"{m.name}: exposure {t_dark:g} s differs from the light's {t_light:g} s and no bias "
                       "matches the light to scale it with")
            continue
        else:
            scale = t_light / t_dark
        temp = (abs(m.meta.set_temp - light.set_temp)
                if m.meta.set_temp is not None and light.set_temp is not None else 0.0)
        usable.append(((0.0 if scale == 1.0 else 1.0, abs(math.log(scale)), temp), m, scale))
    if not usable:
        return None, 1.0, why
    usable.sort(key=lambda u: u[0])
    return usable[0][1], usable[0][2], why


def _nearest_in_time(light: FrameMeta, ok: list[Master]) -> Master | None:
    if not ok:
        return None
    when = light.time_utc
    if when is None:
        return ok[0]

    def distance(m: Master) -> float:
        t = m.meta.time_utc
        return float("inf") if t is None else abs((t - when).total_seconds())

    return min(ok, key=distance)


def _master_from_file(path: Path) -> Master:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        try:
            header = fits.getheader(path)
        except (OSError, ValueError) as exc:
            raise CalibrationError(f"cannot be read as FITS ({exc})") from exc
    kind = str(header.get("LSMASTER", "")).strip().lower()
    if kind not in KINDS:
        raise CalibrationError("not a livestack master (no LSMASTER card); make masters with "
                               "livestack masters")
    meta = read_meta(path)
    return Master(kind=kind, meta=meta, ncombine=int(header.get("NCOMBINE", 1)),
                  bias_removed=bool(header.get("BIASSUB", False)))


def _path(m: Master | None) -> str | None:
    return None if m is None else m.meta.path


# --------------------------------------------------------------------------------------------------------
# Applying
# --------------------------------------------------------------------------------------------------------

def apply(mosaic: np.ndarray, offset: np.ndarray | None, gain: np.ndarray | None) -> None:
    """``mosaic = (mosaic - offset) * gain`` in place, in one parallel pass; None skips a step.

    Parameters
    ----------
    mosaic : ndarray
        float32 ``(H, W)``, writeable, C-contiguous.
    offset, gain : ndarray or None
        float32 ``(H, W)``.

    Raises
    ------
    CalibrationError
        When a master's shape differs from the mosaic's.
    """
    for name, a in (("bias/dark", offset), ("flat", gain)):
        if a is not None and a.shape != mosaic.shape:
            raise CalibrationError(f"The {name} master is {a.shape}, the frame {mosaic.shape}.")
    if offset is None and gain is None:
        return
    empty = np.zeros((0, 0), dtype=np.float32)
    _apply_kernel(mosaic, empty if offset is None else offset, empty if gain is None else gain)


# --------------------------------------------------------------------------------------------------------
# Defects
# --------------------------------------------------------------------------------------------------------

def defects_from_dark(dark: np.ndarray, sigma: float = 5.0) -> np.ndarray:
    """Hot and cold pixels of a master dark: beyond ``sigma`` robust sigmas of its median.

    Parameters
    ----------
    dark : ndarray
        float32 ``(H, W)``.
    sigma : float

    Returns
    -------
    ndarray
        Sorted flat indices (int64) of the defects.
    """
    level, noise = _level_noise(dark)
    if not noise > 0:
        return np.zeros(0, dtype=np.int64)
    deviation = np.abs(dark - np.float32(level))
    return np.flatnonzero(deviation > sigma * noise).astype(np.int64)


def defects_from_flat(flat: np.ndarray) -> np.ndarray:
    """Dead pixels of a master flat (response under ``FLAT_DEAD`` of the mean), as sorted flat indices."""
    return np.flatnonzero(~(flat > FLAT_DEAD)).astype(np.int64)


def defect_candidates(mosaic: np.ndarray, bayer: str | None, sigma: float = 5.0) -> np.ndarray:
    """Pixels of one frame that look like defects: isolated against their same-colour neighbours.

    A pixel is a candidate when it stands more than ``sigma`` noise sigmas above (or below) the median of
    its eight same-colour neighbours (two pixels away on a colour mosaic, adjacent on mono) while those
    neighbours stay within half its height of the sky: a star's core has bright neighbours, a hot pixel
    has none. One frame cannot tell an undersampled star from a defect; ``persistent_defects`` keeps the
    candidates found at the same sensor position in several consecutive frames.

    Parameters
    ----------
    mosaic : ndarray
        float32 ``(H, W)`` raw mosaic.
    bayer : str or None
        The frame's pattern (None for mono).
    sigma : float

    Returns
    -------
    ndarray
        Sorted flat indices (int64).
    """
    step = 1 if bayer is None else 2
    levels = np.zeros((2, 2), dtype=np.float32)
    noises = np.zeros((2, 2), dtype=np.float32)
    for dy in range(step):
        for dx in range(step):
            level, noise = _level_noise(mosaic[dy::step, dx::step])
            levels[dy::step, dx::step] = level
            noises[dy::step, dx::step] = noise if noise > 0 else np.inf
    flags = np.zeros(mosaic.shape, dtype=np.bool_)
    _candidates_kernel(mosaic, step, levels, noises, float(sigma), flags)
    return np.flatnonzero(flags).astype(np.int64)


def persistent_defects(history: Sequence[np.ndarray], min_frames: int) -> np.ndarray:
    """Candidates found in at least ``min_frames`` of the given consecutive frames' candidate lists.

    Parameters
    ----------
    history : sequence of ndarray
        ``defect_candidates`` of consecutive frames.
    min_frames : int

    Returns
    -------
    ndarray
        Sorted flat indices (int64); empty until ``min_frames`` frames are in the history.
    """
    if len(history) < min_frames or not history:
        return np.zeros(0, dtype=np.int64)
    values, counts = np.unique(np.concatenate(list(history)), return_counts=True)
    return values[counts >= min_frames].astype(np.int64)


def replace_defects(mosaic: np.ndarray, defects: np.ndarray, bayer: str | None) -> int:
    """Replace defect pixels in place by the median of their same-colour neighbours (not themselves defects).

    Working on the mosaic before debayering keeps a hot pixel from spreading into a coloured cross.

    Parameters
    ----------
    mosaic : ndarray
        float32 ``(H, W)``, writeable.
    defects : ndarray
        Sorted flat indices (int64).
    bayer : str or None
        The frame's pattern (None for mono).

    Returns
    -------
    int
        Pixels replaced.
    """
    if defects.size == 0:
        return 0
    _replace_kernel(mosaic, defects, 1 if bayer is None else 2)
    return int(defects.size)


def _level_noise(image: np.ndarray) -> tuple[float, float]:
    """Median and 1.4826 x MAD of a strided sample of the finite pixels."""
    stride = _stride(image.size)
    sample = image[::stride, ::stride]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 0.0
    level = float(np.median(sample))
    return level, 1.4826 * float(np.median(np.abs(sample - level)))


def _stride(size: int) -> int:
    return max(1, int(math.sqrt(size / _SAMPLE)))


def _clipped_mean(block: np.ndarray, kappa: float) -> np.ndarray:
    centre = np.median(block, axis=0)
    spread = 1.4826 * np.median(np.abs(block - centre), axis=0)
    keep = np.abs(block - centre) <= kappa * np.maximum(spread, 1e-6)
    total = np.where(keep, block, 0.0).sum(axis=0, dtype=np.float64)
    count = keep.sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), centre).astype(np.float32)


# --- numba kernels --------------------------------------------------------------------------------------

@numba.njit(parallel=True, cache=True, nogil=True)
def _apply_kernel(mosaic: np.ndarray, offset: np.ndarray, gain: np.ndarray) -> None:  # pragma: no cover
    height, width = mosaic.shape
    has_offset = offset.shape[0] > 0
    has_gain = gain.shape[0] > 0
    for y in numba.prange(height):
        for x in range(width):
            v = mosaic[y, x]
            if has_offset:
                v -= offset[y, x]
            if has_gain:
                v *= gain[y, x]
            mosaic[y, x] = v


@numba.njit(cache=True, inline="always", nogil=True)
def _insert_sorted(values: np.ndarray, m: int, value: float) -> int:  # pragma: no cover - compiled
    """Insert ``value`` into the sorted ``values[:m]`` (at most 8 values); return the new length."""
    k = m
    while k > 0 and values[k - 1] > value:
        values[k] = values[k - 1]
        k -= 1
    values[k] = value
    return m + 1


@numba.njit(cache=True, inline="always", nogil=True)
def _neighbours(mosaic: np.ndarray, y: int, x: int, step: int, skip: np.ndarray,
                nb: np.ndarray) -> int:  # pragma: no cover - compiled
    """Sort the same-colour neighbours of ``(y, x)`` (``step`` apart: 1 mono, 2 a Bayer mosaic) into ``nb``,
    leaving out those whose flat index is in the sorted ``skip``; return how many."""
    height, width = mosaic.shape
    n = skip.size
    m = 0
    for dy in (-step, 0, step):
        for dx in (-step, 0, step):
            if dy == 0 and dx == 0:
                continue
            yy = y + dy
            xx = x + dx
            if 0 <= yy < height and 0 <= xx < width:
                if n > 0:
                    index = yy * width + xx
                    j = np.searchsorted(skip, index)
                    if j < n and skip[j] == index:
                        continue
                m = _insert_sorted(nb, m, mosaic[yy, xx])
    return m


@numba.njit(parallel=True, cache=True, nogil=True)
def _candidates_kernel(mosaic: np.ndarray, step: int, levels: np.ndarray, noises: np.ndarray, sigma: float,
                       flags: np.ndarray) -> None:  # pragma: no cover - compiled
    height, width = mosaic.shape
    none = np.empty(0, dtype=np.int64)
    for y in numba.prange(height):
        nb = np.empty(8, dtype=np.float32)
        # Per row, the sky band of even and odd columns: the test below is then two compares per pixel.
        lo0 = levels[y & 1, 0] - sigma * noises[y & 1, 0]
        hi0 = levels[y & 1, 0] + sigma * noises[y & 1, 0]
        lo1 = levels[y & 1, 1] - sigma * noises[y & 1, 1]
        hi1 = levels[y & 1, 1] + sigma * noises[y & 1, 1]
        for x in range(width):
            v = mosaic[y, x]
            odd = x & 1
            if (lo1 <= v <= hi1) if odd else (lo0 <= v <= hi0):
                continue  # the fast path: almost every pixel is sky
            level = levels[y & 1, odd]
            noise = noises[y & 1, odd]
            m = _neighbours(mosaic, y, x, step, none, nb)
            if m < 3:
                continue
            med = nb[m // 2] if m % 2 else np.float32(0.5) * (nb[m // 2 - 1] + nb[m // 2])
            height_above = v - level
            if abs(v - med) > sigma * noise and abs(med - level) < 0.5 * abs(height_above):
                flags[y, x] = True


@numba.njit(cache=True, nogil=True)
def _replace_kernel(mosaic: np.ndarray, defects: np.ndarray, step: int) -> None:  # pragma: no cover
    """Each defect takes the median of its same-colour neighbours that are not defects themselves (a binary
    search in the sorted list: no full-frame mask to allocate), so no defect reads another's new value."""
    width = mosaic.shape[1]
    nb = np.empty(8, dtype=np.float32)
    for i in range(defects.size):
        y = defects[i] // width
        x = defects[i] % width
        m = _neighbours(mosaic, y, x, step, defects, nb)
        if m > 0:
            if m % 2:
                mosaic[y, x] = nb[m // 2]
            else:
                mosaic[y, x] = np.float32(0.5) * (nb[m // 2 - 1] + nb[m // 2])


