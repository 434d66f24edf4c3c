"""Plate solving: a WCS for the reference frame from its own star list, by a local solver.

Public API:

- ``SolveHints``: what the header says about where the telescope pointed and the pixel scale.
- ``hints_from_header(header)``: those hints from RA/DEC (or OBJCTRA/OBJCTDEC, or the mount's RA-MNT/DEC-MNT),
  FOCALLEN with XPIXSZ, or a scale card (SCALE, PIXSCALE, IM_SCALE, SECPIX), or an approximate WCS.
- ``Solution``: the WCS cards (with SIP distortion when the solver fitted it), the field's centre, scale and
  rotation, and the catalogue stars the solver matched.
- ``solve(stars, shape, hints, ...)``: run the solver with a time limit; a ``Solution``, or a ``SolveFailure``
  that says why (no solver installed, no solution, time out).

How it works
------------
astrometry.net's ``solve-field`` is given the frame's star list (an x/y/flux table, brightest first; never the
image), its size, the scale range and the pointing when the header gives them, and a CPU limit; it matches
quads of stars against its index files and writes the WCS (TAN with a second-order SIP polynomial) and the
correspondence of field stars and catalogue stars. Another local solver can be named by a command template:
``{image}`` (the frame as a FITS file), ``{xyls}`` (the star list), ``{wcs}`` (where it must write the WCS
header), ``{width}``, ``{height}``, ``{ra}``, ``{dec}``, ``{radius}``, ``{scale_low}``, ``{scale_high}``.
ASTAP, for example: ``astap -f {image} -ra {ra} -spd {spd} -r {radius} -wcs -o {out}`` with ``{spd}`` (south
pole distance) and ``{out}`` (``{wcs}`` without its suffix) also offered.

Conventions: pixel positions are 0-based ``(x, y)`` as everywhere in livestack; the WCS cards follow FITS
(CRPIX 1-based), as astropy reads them.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from livestack.stages.detect import Stars

__all__ = ["SOLVE_FIELD", "Solution", "SolveFailure", "SolveHints", "hints_from_header", "solve"]

#: astrometry.net's solver, as Debian installs it.
SOLVE_FIELD = "solve-field"
#: Scale range around a scale the header gives (focal length and pixel size are often rounded).
SCALE_SLACK = 0.15
#: Search radius around a header's pointing, degrees: a mount's pointing model, or a crop of a wider frame
#: whose centre the pointing describes.
HINT_RADIUS = 3.0
#: The solver runs this much nicer than livestack, so that it never slows the frame path.
SOLVER_NICENESS = 10
#: Stars handed to the solver, brightest first.
MAX_STARS = 300


@dataclass(frozen=True)
class SolveHints:
    """Where the telescope pointed and the pixel scale, when the header says.

    Attributes
    ----------
    ra, dec : float or None
        Pointing, ICRS degrees.
    radius : float
        Search radius around the pointing, degrees.
    scale_low, scale_high : float or None
        Pixel scale range, arcseconds per pixel.
    """

    ra: float | None = None
    dec: float | None = None
    radius: float = HINT_RADIUS
    scale_low: float | None = None
    scale_high: float | None = None


@dataclass(frozen=True)
class Solution:
    """A plate solution.

    Attributes
    ----------
    wcs_header : str
        The celestial WCS cards (``Header.tostring()``), SIP included when fitted.
    ra, dec : float
        Sky position of the frame's centre pixel, degrees.
    scale : float
        Arcseconds per pixel at the centre.
    rotation : float
        Degrees east of north of the frame's "up" (increasing row index, up as FITS viewers show it), in
        [-180, 180).
    matches : ndarray
        ``(N, 4)``: ``x, y`` (0-based pixels of field stars) and ``ra, dec`` (their catalogue positions).
    solver : str
    seconds : float
        Wall time the solver took.
    """

    wcs_header: str
    ra: float
    dec: float
    scale: float
    rotation: float
    matches: np.ndarray
    solver: str
    seconds: float


@dataclass(frozen=True)
class SolveFailure:
    """Why no solution came: ``missing`` (no solver), ``unsolved``, ``timeout`` or ``error``, and in words."""

    kind: str
    reason: str


def hints_from_header(header: Mapping[str, Any]) -> SolveHints:
    """Pointing and scale from a frame's header, whatever the capture program wrote.

    Parameters
    ----------
    header : Mapping
        FITS header cards (an ``astropy.io.fits.Header`` or a dict).

    Returns
    -------
    SolveHints
        Empty fields where the header says nothing usable.
    """
    # A number is degrees; a string ("20 12 49.3") is hours, as capture programs write it.
    ra = _angle(header.get("RA"), hours=isinstance(header.get("RA"), str)) if "RA" in header else None
    dec = _angle(header.get("DEC"), hours=False) if "DEC" in header else None
    if ra is None and "OBJCTRA" in header:
        ra = _angle(header.get("OBJCTRA"), hours=True)
    if dec is None and "OBJCTDEC" in header:
        dec = _angle(header.get("OBJCTDEC"), hours=False)
    if ra is None and dec is None and "RA-MNT" in header:
        ra, dec = _number(header.get("RA-MNT")), _number(header.get("DEC-MNT"))
    if ra is None and dec is None and "CRVAL1" in header:
        ra, dec = _number(header.get("CRVAL1")), _number(header.get("CRVAL2"))
    scale = None
    focal = _number(header.get("FOCALLEN"))
    pixel = _number(header.get("XPIXSZ"))
    if focal and pixel:
        # XPIXSZ is the binned pixel in the convention of N.I.N.A., SharpCap and ASCOM (microns, mm focal).
        scale = 206.265 * pixel / focal
    for key in ("SCALE", "PIXSCALE", "IM_SCALE", "SECPIX"):
        if scale is None and _number(header.get(key)):
            scale = _number(header.get(key))
    if scale is None and "CDELT1" in header and _number(header.get("CDELT1")):
        scale = abs(float(header["CDELT1"])) * 3600.0
    if scale is None or not scale > 0:
        return SolveHints(ra=ra, dec=dec)
    return SolveHints(ra=ra, dec=dec, scale_low=scale * (1 - SCALE_SLACK),
                      scale_high=scale * (1 + SCALE_SLACK))


def solve(stars: Stars, shape: tuple[int, int], hints: SolveHints = SolveHints(), *,
          image: np.ndarray | None = None, command: str = "", time_limit: float = 60.0,
          cancel: threading.Event | None = None) -> Solution | SolveFailure:
    """Solve a frame from its star list.

    Parameters
    ----------
    stars : Stars
        The frame's stars, brightest first (``detect``).
    shape : tuple of int
        ``(rows, columns)`` of the frame.
    hints : SolveHints
    image : ndarray, optional
        The frame itself, for a command template that asks for ``{image}``.
    command : str
        A solver command template (see the module docstring); '' runs ``solve-field``.
    time_limit : float
        Seconds the solver may take.
    cancel : threading.Event, optional
        When set, the solver is stopped at once and the answer is a ``cancelled`` failure.

    Returns
    -------
    Solution or SolveFailure
    """
    from astropy.io import fits
    from astropy.table import Table

    rows, cols = shape
    program = shlex.split(command)[0] if command.strip() else SOLVE_FIELD
    if shutil.which(program) is None:
        return SolveFailure("missing", f"the plate solver {program!r} is not installed")
    if len(stars) < 8:
        return SolveFailure("unsolved", f"{len(stars)} stars are too few to solve the field")
    with tempfile.TemporaryDirectory(prefix="livestack-solve-") as work:
        folder = Path(work)
        xyls = folder / "stars.xyls"
        keep = min(len(stars), MAX_STARS)
        Table([stars.x[:keep] + 1.0, stars.y[:keep] + 1.0, stars.flux[:keep]],
              names=("X", "Y", "FLUX")).write(xyls, format="fits")
        wcs_path = folder / "stars.wcs"
        values = _template_values(folder, hints, cols, rows, image)
        if command.strip():
            args = [part.format(**values) for part in shlex.split(command)]
        else:
            args = [SOLVE_FIELD, "--overwrite", "--no-plots", "--no-verify", "--crpix-center",
                    "--width", str(cols), "--height", str(rows), "--x-column", "X", "--y-column", "Y",
                    "--sort-column", "FLUX", "--cpulimit", str(max(1, int(time_limit))), "--dir", str(folder),
                    "--wcs", str(wcs_path), "--corr", str(folder / "stars.corr"), "--new-fits", "none",
                    "--solved", str(folder / "stars.solved"), "--match", "none", "--rdls", "none",
                    "--index-xyls", "none"]
            if hints.scale_low and hints.scale_high:
                args += ["--scale-units", "arcsecperpix", "--scale-low", f"{hints.scale_low:.4f}",
                         "--scale-high", f"{hints.scale_high:.4f}"]
            if hints.ra is not None and hints.dec is not None:
                args += ["--ra", f"{hints.ra:.6f}", "--dec", f"{hints.dec:.6f}",
                         "--radius", f"{hints.radius:g}"]
            args.append(str(xyls))
        t0 = time.monotonic()
        log_path = folder / "solver.log"
        try:
            with log_path.open("wb") as log:
                # Below the frame path's priority, in a session of its own so that a stop ends all of it.
                process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                           preexec_fn=lambda: os.nice(SOLVER_NICENESS))
                outcome = _wait(process, time_limit + 15.0, cancel)
        except OSError as exc:
            return SolveFailure("error", f"the plate solver could not be run ({exc.strerror or exc})")
        if outcome is not None:
            return outcome
        seconds = time.monotonic() - t0
        if not wcs_path.is_file():
            said = log_path.read_text(errors="replace").split()[-12:] if process.returncode else []
            return SolveFailure("unsolved", "the plate solver found no solution"
                                + (f" ({' '.join(said)})" if said else ""))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = fits.getheader(wcs_path)
            matches = _matches(folder / "stars.corr")
        return _solution(header, shape, matches, program, seconds)


def _wait(process: subprocess.Popen[bytes], limit: float,
          cancel: threading.Event | None) -> SolveFailure | None:
    """Wait for the solver; stop it (and its children) on time out or cancellation."""
    deadline = time.monotonic() + limit
    while True:
        try:
            process.wait(timeout=0.2)
            return None
        except subprocess.TimeoutExpired:
            pass
        cancelled = cancel is not None and cancel.is_set()
        if cancelled or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            if cancelled:
                return SolveFailure("cancelled", "the plate solver was stopped")
            return SolveFailure("timeout", f"the plate solver gave no answer within {limit:g} s")


def _template_values(folder: Path, hints: SolveHints, cols: int, rows: int,
                     image: np.ndarray | None) -> dict[str, str]:
    from astropy.io import fits

    image_path = folder / "frame.fits"
    if image is not None:
        fits.PrimaryHDU(np.asarray(image, dtype=np.float32)).writeto(image_path)
    return {
        "image": str(image_path), "xyls": str(folder / "stars.xyls"), "wcs": str(folder / "stars.wcs"),
        "out": str(folder / "stars"), "width": str(cols), "height": str(rows),
        "ra": "" if hints.ra is None else f"{hints.ra:.6f}",
        "dec": "" if hints.dec is None else f"{hints.dec:.6f}",
        "spd": "" if hints.dec is None else f"{hints.dec + 90.0:.6f}",
        "radius": f"{hints.radius:g}",
        "scale_low": "" if hints.scale_low is None else f"{hints.scale_low:.4f}",
        "scale_high": "" if hints.scale_high is None else f"{hints.scale_high:.4f}",
    }


def _matches(path: Path) -> np.ndarray:
    from astropy.table import Table

    if not path.is_file():
        return np.empty((0, 4))
    table = Table.read(path)
    return np.column_stack([np.asarray(table["field_x"]) - 1.0, np.asarray(table["field_y"]) - 1.0,
                            np.asarray(table["index_ra"]), np.asarray(table["index_dec"])])


def _solution(header: Any, shape: tuple[int, int], matches: np.ndarray, solver: str,
              seconds: float) -> Solution | SolveFailure:
    from astropy.wcs import WCS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            wcs = WCS(header, naxis=2)
        except (ValueError, KeyError) as exc:
            return SolveFailure("error", f"the plate solver wrote a WCS astropy cannot read ({exc})")
    if not wcs.has_celestial:
        return SolveFailure("error", "the plate solver wrote a WCS without sky axes")
    rows, cols = shape
    cx, cy = (cols - 1) / 2.0, (rows - 1) / 2.0
    (ra, dec), (ra_up, dec_up), (ra_right, dec_right) = wcs.all_pix2world(
        [[cx, cy], [cx, cy + 1.0], [cx + 1.0, cy]], 0)
    scale = math.degrees(_separation(ra, dec, ra_right, dec_right)) * 3600.0
    rotation = math.degrees(_bearing(ra, dec, ra_up, dec_up))
    cards = wcs.to_header(relax=True)
    return Solution(wcs_header=str(cards.tostring()), ra=float(ra), dec=float(dec), scale=scale,
                    rotation=(rotation + 180.0) % 360.0 - 180.0, matches=matches, solver=solver,
                    seconds=seconds)


def _separation(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    """Angle between two sky positions, radians (haversine)."""
    p1, p2, dl = math.radians(dec1), math.radians(dec2), math.radians(ra2 - ra1)
    h = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * math.asin(min(1.0, math.sqrt(h)))


def _bearing(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    """Position angle of the second position seen from the first, east of north, radians."""
    p1, p2, dl = math.radians(dec1), math.radians(dec2), math.radians(ra2 - ra1)
    return math.atan2(math.sin(dl) * math.cos(p2), math.cos(p1) * math.sin(p2) - math.sin(p1) * math.cos(p2)
                      * math.cos(dl))


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _angle(value: Any, hours: bool) -> float | None:
    """Degrees from a number (degrees) or a sexagesimal string (hours for RA when ``hours``)."""
    number = _number(value)
    if number is not None:
        return number
    if not isinstance(value, str):
        return None
    parts = re.split(r"[\s:hmsd°'\"]+", value.strip())
    parts = [p for p in parts if p]
    if not parts:
        return None
    try:
        sign = -1.0 if parts[0].startswith("-") else 1.0
        whole = abs(float(parts[0]))
        minutes = float(parts[1]) if len(parts) > 1 else 0.0
        seconds = float(parts[2]) if len(parts) > 2 else 0.0
    except ValueError:
        return None
    degrees = sign * (whole + minutes / 60.0 + seconds / 3600.0)
    return degrees * 15.0 if hours else degrees
