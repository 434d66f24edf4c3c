"""Photometry: brightness of chosen stars on each frame, and their light curve.

Public API:

- ``PhotometryParams``: frozen apertures, gain and saturation.
- ``Star``: a star to measure, at a position on the reference frame.
- ``choose_comparisons(image, stars, count, avoid, ...) -> tuple[Star, ...]``: the brightest clean stars.
- ``saturation_level(image, header_value)``: the level at which the sensor clips.
- ``cut_stamps(image, positions, half)``: small read-only cutouts, so a measurement can run later, elsewhere,
  without holding the whole frame.
- ``measure(stamps, fwhm, params) -> tuple[StarFlux, ...]``: re-centroided aperture photometry.
- ``differential(target, comparisons, reference_fluxes) -> (magnitude, error, used)``.
- ``parse_target(spec, wcs_header)``: a target from ``"x,y"`` (reference pixels) or ``"sky RA DEC"``.
- ``PhotometryPlan``: the stars to measure (targets, then comparisons), frozen once the reference is known;
  ``plan.cut(image, matrix, fwhm)`` takes their stamps from a frame (cheap: on the frame path).
- ``Photometer``: one night's measurements (reference fluxes, light curve), fed stamps (off the frame path).
- ``LightCurve``: the rows of one night, appended frame by frame; ``write_lightcurve`` saves them as ECSV.
- ``mid_exposure_time(...)``: JD UTC at mid-exposure, or BJD_TDB when the sky position and the site are known.

How it works
------------
Photometry runs on the calibrated frame as read, never on the resampled one: resampling mixes neighbouring
pixels, which changes both the flux in an aperture and its noise. A star's position on the reference is
mapped onto the frame with the inverse of the frame's transform, then re-centroided (first moment of the
background-subtracted pixels within one FWHM, iterated twice; kept only when it moves less than one FWHM,
since a faint star's centroid is noisier than the transform's prediction).

The aperture's radius is ``aperture`` times the frame's FWHM, so the share of a star's light inside it is the
same whatever the seeing; the background is the sigma-clipped median of an annulus from ``annulus_inner`` to
``annulus_outer`` FWHM. The flux's variance follows the CCD equation in ADU, with the sky term measured::

    var = F / g  +  n_ap * s^2  +  n_ap^2 * s^2 / n_sky

where ``F`` is the flux in ADU, ``g`` the gain (electrons per ADU), ``s`` the annulus's clipped standard
deviation (sky photon noise, read noise and dark current together, as they are on this frame), ``n_ap`` and
``n_sky`` the pixel counts of the aperture and the annulus.

The differential magnitude of a target is ``-2.5 log10(F_t / E)`` with ``E`` the ensemble of the comparison
stars not flagged on this frame, rescaled by the comparisons' reference fluxes so that dropping a flagged
comparison on one frame does not step the curve: ``E = sum(F_i) * sum_all(R_i) / sum(R_i)``.

Flags (a star flagged on a frame is not used as a comparison there, and a flagged target point is kept but
marked): ``saturated`` (a pixel in the aperture at or above the saturation level), ``edge`` (the annulus
leaves the frame), ``cosmic`` (a single pixel towering over its eight neighbours: no star is that sharp at
the FWHM livestack aligns), ``lost`` (no positive flux).

Conventions: positions are ``(x, y)`` with x = column, y = row, pixel centres at integers, as in
``stages/align.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from livestack.stages.detect import Stars

__all__ = [
    "FramePhotometry",
    "LightCurve",
    "LightCurveRow",
    "Photometer",
    "PhotometryParams",
    "PhotometryPlan",
    "Stamp",
    "Star",
    "StarFlux",
    "choose_comparisons",
    "cut_stamps",
    "differential",
    "measure",
    "mid_exposure_time",
    "parse_target",
    "plan_photometry",
    "read_lightcurve",
    "saturation_level",
    "write_lightcurve",
]

#: Pixels at exactly the image's maximum that make it a clipping level (a plateau), not a star's peak.
PLATEAU_PIXELS = 3
#: A pixel this many times higher above the background than the brightest of its eight neighbours is a cosmic
#: ray: a star with a FWHM of 1.5 px or more puts at least ~35% of its peak in the next pixel.
COSMIC_RATIO = 3.0
#: ... and at least this many sky sigmas above the background, so that sky noise is never called cosmic.
COSMIC_SIGMAS = 8.0
#: A neighbour in the annulus brighter than this share of a candidate comparison rules the candidate out.
NEIGHBOUR_SHARE = 0.1
#: Sky pixels further than this many standard deviations from the annulus median are left out (stars, hot
#: pixels, cosmic rays), as in astropy's sigma_clip.
SKY_CLIP = 3.0
#: Re-centroiding passes.
CENTROID_PASSES = 2
#: Share of the saturation level a comparison star's peak may reach (non-linearity starts below clipping).
COMPARISON_PEAK_SHARE = 0.6
_MAG = 2.5 / math.log(10.0)  # magnitude error per unit relative flux error


@dataclass(frozen=True)
class PhotometryParams:
    """Apertures and sensor figures (config section ``[photometry]``).

    Attributes
    ----------
    aperture : float
        Aperture radius in FWHM.
    annulus_inner, annulus_outer : float
        Background annulus radii in FWHM.
    gain : float
        Electrons per ADU.
    saturation : float
        ADU at which the sensor clips (``inf`` when unknown).
    """

    aperture: float = 2.0
    annulus_inner: float = 3.0
    annulus_outer: float = 5.0
    gain: float = 1.0
    saturation: float = math.inf

    def __post_init__(self) -> None:
        if not 0 < self.aperture < self.annulus_inner < self.annulus_outer:
            raise ValueError(
                "photometry apertures must satisfy 0 < aperture < annulus_inner < annulus_outer."
            )
        if not self.gain > 0:
            raise ValueError(f"photometry gain must be > 0 electrons per ADU, not {self.gain}.")

    def stamp_half(self, fwhm: float) -> int:
        """Half-size of a stamp that holds the annulus of a star with this FWHM, plus a centroid margin."""
        return math.ceil((self.annulus_outer + 1.0) * max(fwhm, 1.0)) + 1


@dataclass(frozen=True)
class Star:
    """A star to measure.

    Attributes
    ----------
    name : str
    x, y : float
        Position on the reference frame.
    role : str
        ``"target"`` or ``"comparison"``.
    """

    name: str
    x: float
    y: float
    role: str = "target"


@dataclass(frozen=True, eq=False)
class Stamp:
    """A cutout of one frame around one star.

    Attributes
    ----------
    data : ndarray
        float32, read-only; NaN where the cutout leaves the frame.
    x0, y0 : int
        Frame pixel of the stamp's ``[0, 0]``.
    x, y : float
        Predicted position of the star on the frame.
    """

    data: np.ndarray
    x0: int
    y0: int
    x: float
    y: float


@dataclass(frozen=True)
class StarFlux:
    """One star measured on one frame.

    Attributes
    ----------
    x, y : float
        Measured centre on the frame.
    flux, flux_err : float
        Background-subtracted ADU in the aperture, and its 1-sigma error from the noise model.
    background : float
        Annulus median per pixel.
    peak : float
        Highest pixel in the aperture.
    flags : tuple of str
        See the module docstring; empty when clean.
    """

    x: float
    y: float
    flux: float
    flux_err: float
    background: float
    peak: float
    flags: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """No flag raised."""
        return not self.flags


def parse_target(spec: str, wcs_header: str | None = None, name: str | None = None) -> Star:
    """A target from its description.

    Parameters
    ----------
    spec : str
        ``"x,y"``: pixels on the reference frame; ``"sky RA DEC"``: ICRS degrees (needs ``wcs_header``).
        Either may start with ``NAME=``.
    wcs_header : str, optional
        The reference's WCS cards (``FrameMeta.wcs_header``).
    name : str, optional
        Used when the spec names none.

    Returns
    -------
    Star

    Raises
    ------
    ValueError
        One sentence, when the spec cannot be read or a sky position has no WCS to land on.
    """
    text = spec.strip()
    if "=" in text:
        name, text = (part.strip() for part in text.split("=", 1))
    label = name or text
    if text.lower().startswith("sky"):
        parts = text[3:].replace(",", " ").split()
        if len(parts) != 2:
            raise ValueError(f"photometry target {spec!r}: write a sky position as 'sky RA DEC' in degrees.")
        if not wcs_header:
            raise ValueError(
                f"photometry target {spec!r} is a sky position, but the reference frame has no WCS."
            )
        from astropy.io import fits
        from astropy.wcs import WCS

        wcs = WCS(fits.Header.fromstring(wcs_header))
        x, y = wcs.all_world2pix([[float(parts[0]), float(parts[1])]], 0)[0]
        return Star(name=label, x=float(x), y=float(y))
    parts = text.replace(",", " ").split()
    try:
        x, y = (float(v) for v in parts)
    except ValueError:
        raise ValueError(
            f"photometry target {spec!r}: write a pixel position as 'x,y' on the reference frame "
            "(or 'sky RA DEC')."
        ) from None
    return Star(name=label, x=x, y=y)


def saturation_level(image: np.ndarray, header_value: float | None = None) -> float:
    """The level at which a frame clips.

    Parameters
    ----------
    image : ndarray
        The frame (2-D).
    header_value : float, optional
        SATURATE or DATAMAX from the header, or a configured value; used when given.

    Returns
    -------
    float
        ``header_value``; else the image's maximum when at least ``PLATEAU_PIXELS`` pixels sit exactly on
        it (a clipped sensor, whatever its bit depth); else ``inf``.
    """
    if header_value is not None and header_value > 0:
        return float(header_value)
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return math.inf
    top = float(finite.max())
    return top if int(np.count_nonzero(finite == top)) >= PLATEAU_PIXELS else math.inf


def choose_comparisons(
    image: np.ndarray,
    stars: Stars,
    count: int,
    avoid: Sequence[tuple[float, float]] = (),
    *,
    fwhm: float,
    params: PhotometryParams,
) -> tuple[Star, ...]:
    """The ``count`` brightest stars fit to compare against.

    Parameters
    ----------
    image : ndarray
        The reference frame (2-D), to read the stars' peaks.
    stars : Stars
        Its stars, brightest first.
    count : int
    avoid : sequence of (x, y)
        Targets and known variables: no comparison within one annulus radius of them.
    fwhm : float
        The reference's FWHM, pixels.
    params : PhotometryParams

    Returns
    -------
    tuple of Star
        Named ``C1, C2, ...``; fewer than ``count`` when the field has fewer clean stars. Rejected: peaks
        above ``COMPARISON_PEAK_SHARE`` of the saturation level, annuli leaving the frame, another star within
        two FWHM of the aperture or brighter than ``NEIGHBOUR_SHARE`` of it in the annulus, an avoided
        position inside the annulus.
    """
    rows, cols = image.shape[:2]
    outer = params.annulus_outer * fwhm
    xy = stars.xy
    chosen: list[Star] = []
    avoid_xy = np.asarray(list(avoid), dtype=np.float64).reshape(-1, 2)
    for i in range(len(stars)):
        if len(chosen) >= count:
            break
        x, y = float(xy[i, 0]), float(xy[i, 1])
        if not (outer <= x <= cols - 1 - outer and outer <= y <= rows - 1 - outer):
            continue
        distance = np.hypot(xy[:, 0] - x, xy[:, 1] - y)
        distance[i] = np.inf
        # A neighbour whose light reaches the aperture, or a bright one in the annulus (a faint one there is
        # clipped away with the sky's outliers), would change with the seeing: not a steady comparison.
        reaches = distance < (params.aperture + 2.0) * fwhm
        bright = (distance < outer) & (stars.flux > NEIGHBOUR_SHARE * stars.flux[i])
        if np.any(reaches | bright):
            continue
        if avoid_xy.size and np.min(np.hypot(avoid_xy[:, 0] - x, avoid_xy[:, 1] - y)) < outer:
            continue
        r = max(1, math.ceil(fwhm))
        box = image[round(y) - r : round(y) + r + 1, round(x) - r : round(x) + r + 1]
        if box.size == 0 or float(np.nanmax(box)) >= COMPARISON_PEAK_SHARE * params.saturation:
            continue
        chosen.append(Star(name=f"C{len(chosen) + 1}", x=x, y=y, role="comparison"))
    return tuple(chosen)


def cut_stamps(image: np.ndarray, positions: np.ndarray, half: int) -> tuple[Stamp, ...]:
    """Cut ``(2 half + 1)``-pixel square stamps around positions on a frame.

    Parameters
    ----------
    image : ndarray
        The frame, 2-D.
    positions : ndarray
        ``(N, 2)`` predicted ``(x, y)`` on the frame.
    half : int

    Returns
    -------
    tuple of Stamp
        Copies (the frame may be released afterwards), NaN-padded where they leave the frame.
    """
    rows, cols = image.shape[:2]
    size = 2 * half + 1
    out: list[Stamp] = []
    for x, y in np.asarray(positions, dtype=np.float64).reshape(-1, 2):
        x0, y0 = round(x) - half, round(y) - half
        stamp = np.full((size, size), np.nan, dtype=np.float32)
        sx0, sy0 = max(x0, 0), max(y0, 0)
        sx1, sy1 = min(x0 + size, cols), min(y0 + size, rows)
        if sx1 > sx0 and sy1 > sy0:
            stamp[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
        stamp.setflags(write=False)
        out.append(Stamp(data=stamp, x0=x0, y0=y0, x=float(x), y=float(y)))
    return tuple(out)


def measure(stamps: Sequence[Stamp], fwhm: float, params: PhotometryParams) -> tuple[StarFlux, ...]:
    """Aperture photometry of each stamp's star.

    Parameters
    ----------
    stamps : sequence of Stamp
        From ``cut_stamps``, with a half-size of at least ``params.stamp_half(fwhm)``.
    fwhm : float
        The frame's FWHM, pixels (sizes the apertures).
    params : PhotometryParams

    Returns
    -------
    tuple of StarFlux
        One per stamp, in order.
    """
    from photutils.aperture import CircularAnnulus, CircularAperture

    fwhm = _usable_fwhm(fwhm)
    r_ap, r_in, r_out = params.aperture * fwhm, params.annulus_inner * fwhm, params.annulus_outer * fwhm
    results: list[StarFlux] = []
    for stamp in stamps:
        data = stamp.data
        finite = np.isfinite(data)
        gy, gx = np.mgrid[0 : data.shape[0], 0 : data.shape[1]]
        cx, cy = stamp.x - stamp.x0, stamp.y - stamp.y0
        ring = CircularAnnulus((cx, cy), r_in, r_out).to_mask(method="center").to_image(data.shape)
        background, _sigma, _n = _clipped_sky(data[(ring > 0) & finite])
        cx, cy = _recentroid(data, gx, gy, cx, cy, background, fwhm)
        # photutils gives the exact overlap of the circle with each pixel; the sums are plain numpy.
        weights = CircularAperture((cx, cy), r_ap).to_mask(method="exact").to_image(data.shape)
        ring = CircularAnnulus((cx, cy), r_in, r_out).to_mask(method="center").to_image(data.shape)
        background, sky_sigma, n_sky = _clipped_sky(data[(ring > 0) & finite])
        n_ap = float(weights.sum())
        total = float(np.sum(np.where(finite, data, 0.0) * weights))
        flux = total - background * n_ap
        sky_variance = n_ap * sky_sigma**2 * (1.0 + n_ap / max(n_sky, 1.0))
        variance = max(flux, 0.0) / params.gain + sky_variance
        values = data[(weights > 0) & finite]
        peak = float(values.max()) if values.size else math.nan
        near = np.hypot(gx - cx, gy - cy) <= r_ap + 1.0
        flags = _flags(data, near, peak, background, sky_sigma, flux, params)
        results.append(
            StarFlux(
                x=cx + stamp.x0,
                y=cy + stamp.y0,
                flux=flux,
                flux_err=math.sqrt(variance),
                background=background,
                peak=peak,
                flags=flags,
            )
        )
    return tuple(results)


@dataclass(frozen=True)
class PhotometryPlan:
    """The stars measured on every frame: targets first, then comparisons, on the reference frame.

    Attributes
    ----------
    stars : tuple of Star
    params : PhotometryParams
    """

    stars: tuple[Star, ...]
    params: PhotometryParams

    @property
    def targets(self) -> tuple[Star, ...]:
        """The stars whose light curves are wanted."""
        return tuple(s for s in self.stars if s.role == "target")

    @property
    def comparisons(self) -> tuple[Star, ...]:
        """The ensemble's stars."""
        return tuple(s for s in self.stars if s.role == "comparison")

    def positions_on(self, matrix: np.ndarray) -> np.ndarray:
        """Where the stars fall on a frame whose frame -> reference transform is ``matrix`` (2x3)."""
        ref = np.array([[s.x, s.y] for s in self.stars], dtype=np.float64).reshape(-1, 2)
        linear = np.asarray(matrix, dtype=np.float64)[:, :2]
        shift = np.asarray(matrix, dtype=np.float64)[:, 2]
        return np.linalg.solve(linear, (ref - shift).T).T

    def cut(self, image: np.ndarray, matrix: np.ndarray, fwhm: float) -> tuple[Stamp, ...]:
        """Every star's stamp from a frame (2-D image as read and calibrated, not resampled)."""
        return cut_stamps(image, self.positions_on(matrix), self.params.stamp_half(fwhm))


def plan_photometry(
    targets: Sequence[Star],
    reference_image: np.ndarray,
    reference_stars: Stars,
    fwhm: float,
    comparisons: int,
    params: PhotometryParams,
    exclude: Sequence[tuple[float, float]] = (),
) -> PhotometryPlan:
    """Targets plus the ``comparisons`` brightest clean stars of the reference.

    Parameters
    ----------
    targets : sequence of Star
    reference_image : ndarray
        The reference frame, 2-D, as read.
    reference_stars : Stars
    fwhm : float
    comparisons : int
    params : PhotometryParams
    exclude : sequence of (x, y)
        Known variables, never used as comparisons.

    Returns
    -------
    PhotometryPlan
    """
    avoid = [(s.x, s.y) for s in targets] + list(exclude)
    chosen = choose_comparisons(
        reference_image, reference_stars, comparisons, avoid, fwhm=fwhm, params=params
    )
    return PhotometryPlan(stars=tuple(targets) + chosen, params=params)


@dataclass(frozen=True)
class FramePhotometry:
    """One frame measured.

    Attributes
    ----------
    rows : tuple of LightCurveRow
        One per target.
    fluxes : tuple of StarFlux
        Every star of the plan, in its order.
    aperture : float
        Aperture radius used, pixels.
    """

    rows: tuple[LightCurveRow, ...]
    fluxes: tuple[StarFlux, ...]
    aperture: float


class Photometer:
    """One night's photometry for one plan: reference fluxes and the light curve. One owner (thread).

    Parameters
    ----------
    plan : PhotometryPlan
    time_scale : str
        Scale of the times passed to ``add`` (``"JD_UTC"`` or ``"BJD_TDB"``).
    """

    def __init__(self, plan: PhotometryPlan, time_scale: str = "JD_UTC") -> None:
        self.plan = plan
        self.curve = LightCurve(time_scale=time_scale)
        self.reference_fluxes: np.ndarray | None = None

    def add(self, seq: int, name: str, time: float, stamps: Sequence[Stamp], fwhm: float) -> FramePhotometry:
        """Measure one frame's stamps and append its points.

        Parameters
        ----------
        seq : int
            The frame's sequence number.
        name : str
            Its file name.
        time : float
            Mid-exposure, in ``time_scale``.
        stamps : sequence of Stamp
            From ``plan.cut``.
        fwhm : float
            The frame's FWHM, pixels.

        Returns
        -------
        FramePhotometry
        """
        fluxes = measure(stamps, fwhm, self.plan.params)
        n_targets = len(self.plan.targets)
        comps = fluxes[n_targets:]
        if self.reference_fluxes is None:
            # The first frame measured sets each comparison's weight in the ensemble; a comparison unusable on
            # it (flagged) is left out for the night.
            self.reference_fluxes = np.array([c.flux if c.ok and c.flux > 0 else 0.0 for c in comps])
        rows = []
        for star, target in zip(self.plan.targets, fluxes[:n_targets], strict=True):
            mag, err, used = differential(target, comps, self.reference_fluxes)
            rows.append(
                LightCurveRow(
                    seq=seq,
                    name=name,
                    time=time,
                    target=star.name,
                    magnitude=mag,
                    error=err,
                    flux=target.flux,
                    flux_err=target.flux_err,
                    comparisons=used,
                    fwhm=float(fwhm),
                    flags=",".join(target.flags),
                )
            )
        self.curve.add(rows)
        aperture = self.plan.params.aperture * _usable_fwhm(fwhm)
        return FramePhotometry(rows=tuple(rows), fluxes=tuple(fluxes), aperture=aperture)


def differential(
    target: StarFlux, comparisons: Sequence[StarFlux], reference_fluxes: Sequence[float] | np.ndarray
) -> tuple[float, float, int]:
    """Differential magnitude of a target against the ensemble of clean comparisons.

    Parameters
    ----------
    target : StarFlux
    comparisons : sequence of StarFlux
    reference_fluxes : sequence of float
        Each comparison's flux on the first frame measured (positive), to rescale the ensemble when some
        comparisons are flagged.

    Returns
    -------
    magnitude, error : float
        NaN when the target or every comparison is unusable.
    used : int
        Comparisons in the ensemble.
    """
    ref = np.asarray(reference_fluxes, dtype=np.float64)
    good = [i for i, c in enumerate(comparisons) if c.ok and c.flux > 0 and ref[i] > 0]
    if not good or target.flux <= 0:
        return math.nan, math.nan, len(good)
    flux = np.array([comparisons[i].flux for i in good])
    err = np.array([comparisons[i].flux_err for i in good])
    scale = float(ref[ref > 0].sum() / ref[good].sum())
    ensemble = float(flux.sum()) * scale
    ensemble_err = float(np.sqrt(np.sum(err**2))) * scale
    magnitude = -2.5 * math.log10(target.flux / ensemble)
    error = _MAG * math.hypot(target.flux_err / target.flux, ensemble_err / ensemble)
    return magnitude, error, len(good)


def mid_exposure_time(
    start: datetime,
    exptime: float | None,
    sky: tuple[float, float] | None = None,
    site: tuple[float, float, float] | None = None,
) -> tuple[float, str]:
    """The time of a frame for its light curve.

    Parameters
    ----------
    start : datetime
        Start of the exposure, UTC (aware).
    exptime : float or None
        Seconds; None counts as 0.
    sky : (ra, dec), optional
        The star's position in degrees (ICRS).
    site : (latitude, longitude, height), optional
        Degrees (east positive) and metres.

    Returns
    -------
    value : float
        Julian date at mid-exposure.
    scale : str
        ``"BJD_TDB"`` when both ``sky`` and ``site`` are given, else ``"JD_UTC"``.
    """
    from astropy import units as u
    from astropy.coordinates import EarthLocation, SkyCoord
    from astropy.time import Time

    mid = start + timedelta(seconds=(exptime or 0.0) / 2.0)
    t = Time(mid, scale="utc")
    if sky is None or site is None:
        return float(t.jd), "JD_UTC"
    location = EarthLocation.from_geodetic(lon=site[1] * u.deg, lat=site[0] * u.deg, height=site[2] * u.m)
    coord = SkyCoord(ra=sky[0] * u.deg, dec=sky[1] * u.deg, frame="icrs")
    t = Time(mid, scale="utc", location=location)
    bjd = t.tdb + t.light_travel_time(coord, kind="barycentric")
    return float(bjd.jd), "BJD_TDB"


@dataclass(frozen=True)
class LightCurveRow:
    """One frame's point for one target."""

    seq: int
    name: str
    time: float
    target: str
    magnitude: float
    error: float
    flux: float
    flux_err: float
    comparisons: int
    fwhm: float
    flags: str


@dataclass
class LightCurve:
    """The light curves of one night: every target's rows, in arrival order.

    Attributes
    ----------
    time_scale : str
        ``"JD_UTC"`` or ``"BJD_TDB"``, the scale of every row's ``time``.
    rows : list of LightCurveRow
    """

    time_scale: str = "JD_UTC"
    rows: list[LightCurveRow] = field(default_factory=list)

    def add(self, rows: Iterable[LightCurveRow]) -> None:
        """Append one frame's rows."""
        self.rows.extend(rows)

    def binned(self, target: str, size: int) -> list[tuple[float, float, float]]:
        """``(time, magnitude, error)`` of one target, averaged over ``size`` consecutive clean points.

        The error of a bin is the error of the weighted mean of its points.
        """
        points = [
            (r.time, r.magnitude, r.error)
            for r in self.rows
            if r.target == target and not r.flags and math.isfinite(r.magnitude) and r.error > 0
        ]
        out: list[tuple[float, float, float]] = []
        for start in range(0, len(points) - size + 1, max(size, 1)):
            chunk = np.array(points[start : start + size])
            w = 1.0 / chunk[:, 2] ** 2
            out.append(
                (
                    float(chunk[:, 0].mean()),
                    float(np.sum(w * chunk[:, 1]) / w.sum()),
                    float(1.0 / math.sqrt(w.sum())),
                )
            )
        return out


def read_lightcurve(path: str | Path) -> tuple[LightCurve, dict[str, Any]]:
    """Read a light curve written by ``write_lightcurve`` (ECSV).

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    curve : LightCurve
    meta : dict
        The header's metadata.

    Raises
    ------
    ValueError
        When the file is not such a light curve (one sentence).
    """
    from astropy.table import Table

    try:
        table = Table.read(Path(path), format="ascii.ecsv")
        scale = str(table.meta["time_scale"])
        times = table[scale.lower()]
        rows = [LightCurveRow(seq=int(r["seq"]), name=str(r["name"]), time=float(t), target=str(r["target"]),
                              magnitude=float(r["magnitude"]), error=float(r["error"]), flux=float(r["flux"]),
                              flux_err=float(r["flux_err"]), comparisons=int(r["comparisons"]),
                              fwhm=float(r["fwhm"]), flags=str(r["flags"]) if r["flags"] else "")
                for r, t in zip(table, times, strict=True)]
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not a livestack light curve ({exc})") from exc
    return LightCurve(time_scale=scale, rows=rows), dict(table.meta)


def write_lightcurve(path: str | Path, curve: LightCurve, meta: dict[str, object] | None = None) -> Path:
    """Write a light curve as ECSV (or CSV when ``path`` ends in ``.csv``), atomically.

    Parameters
    ----------
    path : str or Path
    curve : LightCurve
    meta : dict, optional
        Written into the ECSV header (targets, comparisons, apertures ...).

    Returns
    -------
    Path
    """
    from astropy.table import Table

    from livestack.stages.snapshot import atomic_write

    names = (
        "seq",
        "name",
        "time",
        "target",
        "magnitude",
        "error",
        "flux",
        "flux_err",
        "comparisons",
        "fwhm",
        "flags",
    )
    columns = {n: [getattr(r, n) for r in curve.rows] for n in names}
    table = Table(
        columns, names=names, dtype=(int, str, float, str, float, float, float, float, int, float, str)
    )
    table.rename_column("time", curve.time_scale.lower())
    table.meta.update(meta or {})
    table.meta["time_scale"] = curve.time_scale
    out = Path(path)
    fmt = "ascii.csv" if out.suffix.lower() == ".csv" else "ascii.ecsv"
    import io

    buffer = io.StringIO()
    table.write(buffer, format=fmt)
    atomic_write(out, buffer.getvalue().encode())
    return out


def _usable_fwhm(fwhm: float) -> float:
    """The frame's FWHM, or 3 pixels when it could not be measured (apertures must have a size)."""
    return float(fwhm) if math.isfinite(fwhm) and fwhm > 0 else 3.0


def _clipped_sky(values: np.ndarray) -> tuple[float, float, float]:
    """Median, standard deviation and count of sky pixels after 3-sigma clipping (five passes at most)."""
    kept = values.astype(np.float64)
    for _ in range(5):
        if kept.size < 3:
            break
        median, std = float(np.median(kept)), float(np.std(kept))
        inside = np.abs(kept - median) <= SKY_CLIP * std
        if inside.all():
            break
        kept = kept[inside]
    if kept.size == 0:
        return math.nan, math.nan, 0.0
    return float(np.median(kept)), float(np.std(kept)), float(kept.size)


def _recentroid(data: np.ndarray, gx: np.ndarray, gy: np.ndarray, cx: float, cy: float, background: float,
                fwhm: float) -> tuple[float, float]:
    x, y = cx, cy
    radius = max(fwhm, 1.5)
    for _ in range(CENTROID_PASSES):
        window = (gx - x) ** 2 + (gy - y) ** 2 <= radius**2
        values = np.where(window & np.isfinite(data), data - background, 0.0)
        values = np.clip(values, 0.0, None)
        total = float(values.sum())
        if not total > 0:
            return cx, cy
        x, y = float((values * gx).sum() / total), float((values * gy).sum() / total)
    if math.hypot(x - cx, y - cy) > fwhm:
        return cx, cy
    return x, y


def _flags(
    data: np.ndarray,
    near: np.ndarray,
    peak: float,
    background: float,
    sky_sigma: float,
    flux: float,
    params: PhotometryParams,
) -> tuple[str, ...]:
    flags: list[str] = []
    if math.isfinite(peak) and peak >= params.saturation:
        flags.append("saturated")
    if not np.all(np.isfinite(data)):
        flags.append("edge")
    if _has_cosmic(data, near, background, sky_sigma):
        flags.append("cosmic")
    if not flux > 0:
        flags.append("lost")
    return tuple(flags)


def _has_cosmic(data: np.ndarray, near: np.ndarray, background: float, sky_sigma: float) -> bool:
    above = np.nan_to_num(data - background, nan=0.0)
    core = above[1:-1, 1:-1]
    neighbours = np.max(
        np.stack(
            [
                above[1 + dy : above.shape[0] - 1 + dy, 1 + dx : above.shape[1] - 1 + dx]
                for dy in (-1, 0, 1)
                for dx in (-1, 0, 1)
                if dy or dx
            ]
        ),
        axis=0,
    )
    spikes = (core > COSMIC_SIGMAS * max(sky_sigma, 1e-6)) & (
        core > COSMIC_RATIO * np.clip(neighbours, 0, None)
    )
    return bool((spikes & near[1:-1, 1:-1]).any())
