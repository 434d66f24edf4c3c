"""Where the scatter of a constant star on the real MicroObservatory frames comes from.

The frames (``../shared/data/microobs_hatp32_first30``: 30 x 60 s, 0.15 m, uncalibrated) go through
``Stacker`` once; the star of ``tests/test_photometry.py``'s constant-star test (the brightest clean star at
least 60 px from the edges, against the 8 brightest other clean stars) is measured as that test measures it,
and its light curve's scatter is compared with the scatter the noise model predicts (photon noise at the
assumed gain, the annulus's sky and read noise), under variations, one at a time:

1. the gain, over the 12-33 e-/ADU that the frames' hot pixels allow (the header gives none);
2. the sky estimate: the annulus's sigma-clipped median (quantised to half an ADU on 12-bit integer data) or
   its clipped mean;
3. the aperture's radius, 1.5-2.5 FWHM, and its centre: re-centroided, or where the frame's transform puts it;
4. scintillation added to the prediction by Young's formula (0.09 D^-2/3 X^1.75 exp(-h/8000) (2t)^-1/2:
   D in cm, X the airmass from the header's TELALT, h the site's height in metres, t the exposure in seconds),
   for the target and, weighted by flux, the ensemble, for two heights bracketing the Whipple Observatory's
   sites;
5. seeing: the correlation of the light curve with the frame's FWHM, the scatter left after a straight-line
   fit against it, and the point-to-point scatter (white noise gives the same as the scatter; a trend, less).

Then the same ratio for the 12 brightest clean stars (of the 40 brightest), each against the 8 brightest
others, frames where any of them is flagged left out, with each one's slope against the frame's FWHM.

Usage: ``python benchmarks/bench_photometry_real.py``. Reads only; prints a Markdown report.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

import livestack.stages.photometry as photometry
from livestack.config import Config
from livestack.pipeline import Stacker
from livestack.stages.detect import Stars
from livestack.stages.frames import read_frame
from livestack.stages.photometry import (
    Photometer,
    PhotometryParams,
    PhotometryPlan,
    Star,
    measure,
    plan_photometry,
    saturation_level,
)

FOLDER = Path(__file__).resolve().parents[2] / "shared" / "data" / "microobs_hatp32_first30"
GAIN = 22.0
APERTURE_CM = 15.0
HEIGHTS_M = (1350.0, 2350.0)
COMPARISONS = 8
_MAG = 2.5 / math.log(10.0)


@dataclass
class Night:
    images: list[np.ndarray]
    matrices: list[np.ndarray]
    fwhm: np.ndarray
    airmass: np.ndarray
    exptime: float
    reference: Stars


def load() -> Night:
    paths = sorted(FOLDER.glob("*.FITS"))
    stacker = Stacker(Config().with_overrides({"stack.method": "mean"}))
    images, matrices, fwhm, airmass = [], [], [], []
    exptime = 0.0
    for path in paths:
        result = stacker.process(path)
        assert result.accepted and result.transform is not None and result.quality is not None, path
        images.append(np.asarray(read_frame(path).luminance))
        matrices.append(np.asarray(result.transform.matrix))
        fwhm.append(result.quality.fwhm)
        header = fits.getheader(path)
        airmass.append(1.0 / math.sin(math.radians(float(header["TELALT"]))))
        exptime = float(header["EXPTIME"])
    assert stacker._ref_stars is not None
    return Night(images, matrices, np.array(fwhm), np.array(airmass), exptime, stacker._ref_stars)


def fluxes(night: Night, stars: list[Star], params: PhotometryParams) -> tuple[np.ndarray, ...]:
    """Flux, error and flagged, frames x stars."""
    plan = PhotometryPlan(stars=tuple(stars), params=params)
    flux, error, flagged = [], [], []
    for image, matrix, fwhm in zip(night.images, night.matrices, night.fwhm, strict=True):
        measured = measure(plan.cut(image, matrix, fwhm), fwhm, params)
        flux.append([m.flux for m in measured])
        error.append([m.flux_err for m in measured])
        flagged.append([bool(m.flags) for m in measured])
    return np.array(flux), np.array(error), np.array(flagged)


def clean_stars(night: Night, params: PhotometryParams, count: int) -> list[Star]:
    chosen = plan_photometry([], night.images[0], night.reference, night.fwhm[0], count, params).comparisons
    rows, cols = night.images[0].shape
    return [s for s in chosen if min(s.x, s.y, cols - s.x, rows - s.y) > 60]


def curve(flux: np.ndarray, error: np.ndarray, flagged: np.ndarray, target: int,
          comparisons: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Differential magnitudes and predicted errors of frames where no star is flagged, and those frames."""
    ok = ~flagged[:, [target, *comparisons]].any(axis=1)
    ensemble = flux[ok][:, comparisons].sum(axis=1)
    ensemble_err = np.sqrt((error[ok][:, comparisons] ** 2).sum(axis=1))
    mag = -2.5 * np.log10(flux[ok, target] / ensemble)
    err = _MAG * np.hypot(error[ok, target] / flux[ok, target], ensemble_err / ensemble)
    return mag, err, ok


def young(night: Night, height: float) -> np.ndarray:
    """Young's scintillation, relative flux, per frame."""
    return (0.09 * APERTURE_CM ** (-2.0 / 3.0) * night.airmass**1.75 * math.exp(-height / 8000.0)
            / math.sqrt(2.0 * night.exptime))


@contextmanager
def no_recentroid() -> Iterator[None]:
    original = photometry._recentroid
    photometry._recentroid = lambda data, gx, gy, cx, cy, background, fwhm: (cx, cy)
    try:
        yield
    finally:
        photometry._recentroid = original


@contextmanager
def clipped_mean_sky() -> Iterator[None]:
    original: Callable[[np.ndarray], tuple[float, float, float]] = photometry._clipped_sky

    def mean_sky(values: np.ndarray) -> tuple[float, float, float]:
        median, std, n = original(values)
        if not n:
            return median, std, n
        kept = values[np.abs(values - median) <= photometry.SKY_CLIP * std]
        return float(np.mean(kept)), std, n

    photometry._clipped_sky = mean_sky
    try:
        yield
    finally:
        photometry._clipped_sky = original


def test_curve(night: Night, params: PhotometryParams) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                  np.ndarray]:
    """The constant-star test's light curve: magnitudes, errors, the frames kept, the comparisons' fluxes."""
    clean = plan_photometry([], night.images[0], night.reference, night.fwhm[0], 12, params).comparisons
    rows, cols = night.images[0].shape
    inside = [s for s in clean if min(s.x, s.y, cols - s.x, rows - s.y) > 60]
    target = Star("bright", inside[0].x, inside[0].y)
    comparisons = [s for s in clean if s != inside[0]][:COMPARISONS]
    photometer = Photometer(PhotometryPlan(stars=(target, *comparisons), params=params))
    fluxes = []
    for i, (image, matrix, fwhm) in enumerate(zip(night.images, night.matrices, night.fwhm, strict=True)):
        measured = photometer.add(i + 1, str(i), float(i), photometer.plan.cut(image, matrix, fwhm), fwhm)
        fluxes.append([f.flux if f.ok else np.nan for f in measured.fluxes[1:]])
    kept = np.array([not r.flags for r in photometer.curve.rows])
    mag = np.array([r.magnitude for r in photometer.curve.rows])[kept]
    err = np.array([r.error for r in photometer.curve.rows])[kept]
    return mag, err, kept, np.array(fluxes)[kept]


def report_target(night: Night, label: str, params: PhotometryParams,
                  scint: np.ndarray | None = None) -> None:
    mag, err, kept, comparison_flux = test_curve(night, params)
    if scint is not None:
        weights = comparison_flux / np.nansum(comparison_flux, axis=1, keepdims=True)
        extra = scint[kept] ** 2 * (1.0 + np.nansum(weights**2, axis=1))
        err = np.sqrt(err**2 + _MAG**2 * extra)
    scatter, predicted = float(np.std(mag, ddof=1)), float(np.sqrt(np.mean(err**2)))
    print(f"| {label} | {kept.sum()} | {scatter * 1000:.2f} | {predicted * 1000:.2f} | "
          f"{scatter / predicted:.2f} |")


def main() -> None:
    night = load()
    level = saturation_level(night.images[0])
    base = PhotometryParams(gain=GAIN, saturation=level)
    print("| variation | frames | scatter (mmag) | predicted (mmag) | ratio |")
    print("| --- | --- | --- | --- | --- |")
    report_target(night, f"as the test: gain {GAIN:g}, aperture 2 FWHM, clipped median sky", base)
    for gain in (12.0, 33.0):
        report_target(night, f"gain {gain:g} e-/ADU", PhotometryParams(gain=gain, saturation=level))
    with clipped_mean_sky():
        report_target(night, "sky: clipped mean instead of median", base)
    with no_recentroid():
        report_target(night, "apertures where the transform puts the stars (no re-centroiding)", base)
    for aperture in (1.5, 2.5):
        report_target(night, f"aperture {aperture:g} FWHM",
                      PhotometryParams(gain=GAIN, saturation=level, aperture=aperture,
                                       annulus_inner=max(3.0, aperture + 1.0),
                                       annulus_outer=max(5.0, aperture + 3.0)))
    for height in HEIGHTS_M:
        s = young(night, height)
        report_target(night, f"+ Young's scintillation, h = {height:g} m ({s.min() * 1000 * _MAG:.2f}-"
                             f"{s.max() * 1000 * _MAG:.2f} mmag a star)", base, scint=s)

    mag, _err, kept, _flux = test_curve(night, base)
    fwhm = night.fwhm[kept]
    fit = np.polyfit(fwhm, mag, 1)
    print()
    print(f"Seeing, the test's star: correlation with FWHM {np.corrcoef(mag, fwhm)[0, 1]:.2f}; scatter "
          f"{np.std(mag, ddof=1) * 1000:.2f} mmag, "
          f"{np.std(mag - np.polyval(fit, fwhm), ddof=2) * 1000:.2f} after "
          f"a line against FWHM ({fit[0] * 1000:.1f} mmag per px), point to point "
          f"{np.std(np.diff(mag), ddof=1) / math.sqrt(2) * 1000:.2f}.")

    stars = clean_stars(night, base, 40)
    flux, error, flagged = fluxes(night, stars, base)
    good = [i for i in range(len(stars)) if not flagged[:, i].any() and (flux[:, i] > 0).all()]
    print()
    print("| star | x, y | mean flux (ADU) | scatter (mmag) | predicted (mmag) | ratio "
          "| FWHM slope (mmag/px) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for j in good[:12]:
        others = [i for i in good if i != j][:COMPARISONS]
        mag, err, ok = curve(flux, error, flagged, j, others)
        scatter, predicted = float(np.std(mag, ddof=1)), float(np.sqrt(np.mean(err**2)))
        slope = np.polyfit(night.fwhm[ok], mag, 1)[0]
        print(f"| {j} | {stars[j].x:.0f}, {stars[j].y:.0f} | {flux[:, j].mean():.0f} | "
              f"{scatter * 1000:.2f} | "
              f"{predicted * 1000:.2f} | {scatter / predicted:.2f} | {slope * 1000:.1f} |")


if __name__ == "__main__":
    main()
