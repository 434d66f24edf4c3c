"""How far a constant star's scatter on the real MicroObservatory frames is from the noise model, and why.

The frames (``../shared/data/microobs_hatp32_first30``: 30 x 60 s, 0.15 m, 2x2-binned KAF-1402ME, 12-bit,
uncalibrated: no darks, no flats) go through ``Stacker`` once; then:

1. **The gain.** The headers give none. The camera's published figures (``GAIN_PUBLISHED``,
   ``READ_NOISE_E``, see there) are checked against the frames: the per-pixel temporal variance of the sky,
   the read-noise floor they imply (read noise and the 12-bit quantisation, 1/12 ADU^2), and the gain the hot
   pixels' dark signal gives (variance against level), before and after taking out the dark's common
   frame-to-frame change (the CCD's temperature is held only to +-1 K).
2. **The star.** Chosen by a rule fixed in advance: the brightest clean star of the reference (no neighbour
   reaching its aperture, no bright one in its annulus: ``plan_photometry``'s rule) that never saturates, is
   never flagged and stays at least 60 px from every edge on every frame of the night.
3. **Variations**, one at a time, with the prediction at the published gain (and at 22 e-/ADU, the middle of
   what the hot pixels allow, for comparison): the ensemble (8, 20 or every clean star), its weights
   (inverse variance of the noise model; iterative rejection of comparisons scattering more than 2x the
   median), the aperture (2 FWHM of each frame, or one radius in pixels for the night, the one that minimises
   the comparisons' median scatter: chosen on the comparisons, never on the target), the night's fixed
   pattern (the median of the frames at fixed sensor position: hot pixels, bias structure) subtracted first.
4. **The excess** beyond the model, star by star (each against every other clean star), in mmag and in ADU,
   and what it follows: other stars (correlation between stars), time (lag-1 autocorrelation), the star's
   position inside its pixel, its peak (non-linearity), the frame's FWHM; Young's scintillation for scale.

Usage: ``python benchmarks/bench_photometry_real.py``. Reads only; prints a Markdown report (~1 minute).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

from livestack.config import Config
from livestack.pipeline import Stacker
from livestack.stages.detect import Stars
from livestack.stages.frames import read_frame
from livestack.stages.photometry import (
    PhotometryParams,
    PhotometryPlan,
    Star,
    measure,
    plan_photometry,
    saturation_level,
)

FOLDER = Path(__file__).resolve().parents[2] / "shared" / "data" / "microobs_hatp32_first30"
#: MicroObservatory's camera (Kodak KAF-1402ME), as NASA's Exoplanet Watch lists it for MicroObservatory data
#: on its "How to Submit Your Data" page (science.nasa.gov/citizen-science/exoplanet-watch/how-to-contribute/
#: how-to-submit-your-data/): gain 53.6 e-/ADU, read noise 15 e-, dark current 15 e-/px/s; quoted with that
#: source in EXOTIC's issue tracker (github.com/rzellem/EXOTIC/issues/1417). 53.6 = 4 x 13.4: a 12-bit range
#: over four binned pixels' wells.
GAIN_PUBLISHED = 53.6
READ_NOISE_E = 15.0
#: The middle of the 12-33 e-/ADU the hot pixels' raw variance allows, the figure used before.
GAIN_HOT_PIXELS = 22.0
APERTURE_CM = 15.0
SITE_HEIGHT_M = 1350.0  # Whipple Observatory's base camp, Amado AZ (header CITY); the lower, noisier bound
EDGE_PX = 60
_MAG = 2.5 / math.log(10.0)


@dataclass
class Night:
    images: list[np.ndarray]
    matrices: list[np.ndarray]
    fwhm: np.ndarray
    airmass: np.ndarray
    camtemp: np.ndarray
    exptime: float
    reference: Stars
    saturation: float


def load() -> Night:
    paths = sorted(FOLDER.glob("*.FITS"))
    stacker = Stacker(Config().with_overrides({"stack.method": "mean"}))
    images, matrices, fwhm, airmass, camtemp = [], [], [], [], []
    exptime = 0.0
    for path in paths:
        result = stacker.process(path)
        assert result.accepted and result.transform is not None and result.quality is not None, path
        images.append(np.asarray(read_frame(path).luminance))
        matrices.append(np.asarray(result.transform.matrix))
        fwhm.append(result.quality.fwhm)
        header = fits.getheader(path)
        airmass.append(1.0 / math.sin(math.radians(float(header["TELALT"]))))
        camtemp.append(float(header["CAMTEMP"]))
        exptime = float(header["EXPTIME"])
    assert stacker._ref_stars is not None
    return Night(images, matrices, np.array(fwhm), np.array(airmass), np.array(camtemp), exptime,
                 stacker._ref_stars, saturation_level(images[0]))


# -- 1. the gain ---------------------------------------------------------------------------------------------


def _clipped_var(series: np.ndarray) -> tuple[float, int]:
    """Variance of a pixel's time series after 3.5-sigma clipping (stars drifting over it)."""
    keep = np.ones(series.size, dtype=bool)
    for _ in range(5):
        m, s = np.median(series[keep]), np.std(series[keep], ddof=1)
        new = np.abs(series - m) <= 3.5 * max(s, 0.5)
        if (new == keep).all():
            break
        keep = new
    return float(np.var(series[keep], ddof=1)), int(keep.sum())


def report_gain(night: Night) -> None:
    cube = np.array(night.images, dtype=np.float64)
    n = cube.shape[0]
    level = np.median(cube.reshape(n, -1), axis=1)
    d = cube - level[:, None, None]
    med = np.median(d, axis=0)
    p10 = np.percentile(d, 10, axis=0)
    inner = np.zeros(med.shape, dtype=bool)
    inner[3:-3, 3:-3] = True
    rng = np.random.default_rng(1)
    sky_pixels = np.argwhere(inner & (np.abs(med) < 1) & (p10 > -3))
    sample = sky_pixels[rng.choice(len(sky_pixels), 4000, replace=False)]
    sky_var = float(np.median([_clipped_var(d[:, y, x])[0] for y, x in sample]))
    floor = (READ_NOISE_E / GAIN_PUBLISHED) ** 2 + 1.0 / 12.0
    above = (sky_var - floor) * GAIN_PUBLISHED
    above_hot = (sky_var - (READ_NOISE_E / GAIN_HOT_PIXELS) ** 2 - 1 / 12) * GAIN_HOT_PIXELS
    print(f"Sky: {np.median(level):.0f} ADU (from {level[0]:.0f} to {level[-1]:.0f}); per-pixel temporal "
          f"variance {sky_var:.2f} ADU^2. At the published {GAIN_PUBLISHED} e-/ADU and {READ_NOISE_E:g} e-, "
          f"read noise and quantisation give {floor:.2f} ADU^2 of it; the rest is the sky's and dark's "
          f"photon noise, {above:.0f} ADU above the bias (bias ~{np.median(level) - above:.0f} ADU; the "
          f"first row and column read 244-330); at {GAIN_HOT_PIXELS:g} e-/ADU, {above_hot:.0f} ADU.")
    hot = inner & (med > 3) & (p10 > 0.5 * med)
    ys, xs = np.nonzero(hot)
    series, dark = d[:, ys, xs], med[ys, xs]
    strong = (dark > 30) & (dark < 1000)
    scale = np.median(series[:, strong] / dark[strong], axis=1)
    print(f"Hot pixels (stationary, > 3 ADU above the sky on 90% of frames): {len(ys)}. Their dark's common "
          f"scale frame by frame: {scale.min():.3f}-{scale.max():.3f} (first frames highest; CAMTEMP "
          f"{night.camtemp.min():.0f}-{night.camtemp.max():.0f} K in 1 K steps).")
    print()
    print("| hot pixels' dark (ADU) | pixels | gain from variance vs level, raw (e-/ADU) "
          "| after the common scale |")
    print("| --- | --- | --- | --- |")
    raw = np.array([_clipped_var(series[:, j]) for j in range(series.shape[1])])
    resid = series - scale[:, None] * dark[None, :]
    scaled = np.array([_clipped_var(resid[:, j]) for j in range(resid.shape[1])])
    for lo, hi in ((3, 6), (6, 12), (12, 25), (25, 50), (50, 100), (100, 200)):
        s = (dark >= lo) & (dark < hi) & (raw[:, 1] >= 24)
        if s.sum() < 3:
            continue
        g_raw = np.median(dark[s]) / np.median(raw[s, 0] - sky_var)
        g_scaled = np.median(dark[s]) / np.median(scaled[s, 0] - sky_var)
        print(f"| {lo}-{hi} | {s.sum()} | {g_raw:.1f} | {g_scaled:.1f} |")


# -- 2./3. the star and the variations ---------------------------------------------------------------------


def candidates(night: Night, params: PhotometryParams) -> tuple[Star, ...]:
    return plan_photometry([], night.images[0], night.reference, night.fwhm[0], 40, params).comparisons


def measure_all(night: Night, stars: tuple[Star, ...], params: PhotometryParams, fixed: float | None = None,
                pattern: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flux, error, flagged and peak, frames x stars; ``fixed``: one FWHM for every frame (a fixed radius)."""
    plan = PhotometryPlan(stars=stars, params=params)
    flux, error, flagged, peak = [], [], [], []
    for image, matrix, fwhm in zip(night.images, night.matrices, night.fwhm, strict=True):
        data = image if pattern is None else image - pattern
        size = fwhm if fixed is None else fixed
        measured = measure(plan.cut(data, matrix, size), size, params)
        flux.append([m.flux for m in measured])
        error.append([m.flux_err for m in measured])
        flagged.append([bool(m.flags) for m in measured])
        peak.append([m.peak for m in measured])
    return np.array(flux), np.array(error), np.array(flagged), np.array(peak)


def fixed_pattern(night: Night) -> np.ndarray:
    """The night's median at fixed sensor position, less its median: hot pixels and bias structure."""
    cube = np.array(night.images, dtype=np.float32)
    level = np.median(cube.reshape(cube.shape[0], -1), axis=1)
    pattern = np.median(cube - level[:, None, None], axis=0)
    return (pattern - np.median(pattern)).astype(np.float32)


def edge_distance(night: Night, stars: tuple[Star, ...]) -> np.ndarray:
    plan = PhotometryPlan(stars=stars, params=PhotometryParams())
    rows, cols = night.images[0].shape
    pos = np.array([plan.positions_on(m) for m in night.matrices])
    sides = [pos[..., 0], pos[..., 1], cols - 1 - pos[..., 0], rows - 1 - pos[..., 1]]
    return np.min(np.minimum.reduce(sides), axis=0)


def curve(flux: np.ndarray, error: np.ndarray, flagged: np.ndarray, target: int, comps: list[int],
          weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Differential magnitudes and their predicted errors, as ``Photometer`` forms them (flagged comparisons
    left out frame by frame, the ensemble rescaled by the first frame's fluxes), optionally weighted."""
    w = np.ones(len(comps)) if weights is None else weights
    ref = flux[0, comps]
    mags, errs = [], []
    for k in range(flux.shape[0]):
        good = np.array([i for i, j in enumerate(comps) if not flagged[k, j] and flux[k, j] > 0])
        if flagged[k, target] or good.size == 0:
            continue
        cols = np.asarray(comps)[good]
        scale = float((w * ref).sum() / (w[good] * ref[good]).sum())
        ensemble = float((w[good] * flux[k, cols]).sum()) * scale
        ensemble_err = float(np.sqrt(((w[good] * error[k, cols]) ** 2).sum())) * scale
        mags.append(-2.5 * math.log10(flux[k, target] / ensemble))
        errs.append(_MAG * math.hypot(error[k, target] / flux[k, target], ensemble_err / ensemble))
    return np.array(mags), np.array(errs)


def scatter_ratio(mag: np.ndarray, err: np.ndarray) -> tuple[float, float]:
    scatter = float(np.std(mag, ddof=1))
    return scatter, scatter / float(np.sqrt(np.mean(err**2)))


def inverse_variance(flux: np.ndarray, error: np.ndarray, comps: list[int]) -> np.ndarray:
    """Weights on raw fluxes that weight each comparison's relative flux by 1 / (its model error)^2."""
    rel = np.median(error[:, comps] / flux[:, comps], axis=0)
    return np.asarray((1.0 / rel**2) / flux[0, comps])


def rejected(flux: np.ndarray, error: np.ndarray, flagged: np.ndarray, comps: list[int]) -> list[int]:
    """Comparisons left after iteratively dropping those scattering > 2x the median against the others."""
    kept = list(comps)
    while len(kept) > 3:
        spread = [float(np.std(curve(flux, error, flagged, c, [o for o in kept if o != c])[0], ddof=1))
                  for c in kept]
        worst = int(np.argmax(spread))
        if spread[worst] <= 2.0 * float(np.median(spread)):
            break
        kept.pop(worst)
    return kept


def report_variations(night: Night) -> None:
    level = night.saturation
    base = PhotometryParams(gain=GAIN_PUBLISHED, saturation=level)
    stars = candidates(night, base)
    distance = edge_distance(night, stars)
    flux, error, flagged, _peak = measure_all(night, stars, base)
    rule = [j for j in range(len(stars)) if distance[j] >= EDGE_PX and not flagged[:, j].any()]
    target = rule[0]
    def why(j: int) -> str:
        reasons = []
        if np.nanmax(_peak[:, j]) >= level:
            reasons.append(f"saturates on {int((_peak[:, j] >= level).sum())} frames")
        elif flagged[:, j].any():
            reasons.append(f"flagged on {int(flagged[:, j].sum())} frames")
        if distance[j] < EDGE_PX:
            reasons.append(f"comes within {max(distance[j], 0):.0f} px of an edge")
        return f"{stars[j].name} ({', '.join(reasons)})"

    print(f"The star by the rule: {stars[target].name} at ({stars[target].x:.0f}, {stars[target].y:.0f}) on "
          f"the reference, ~{np.median(flux[:, target]):.0f} ADU, peak up to "
          f"{np.nanmax(_peak[:, target]) / level:.2f} of the clipping level. Brighter clean stars: "
          + "; ".join(why(j) for j in range(target)) + ".")
    in_field = [j for j in range(len(stars)) if j != target and distance[j] >= 30]
    first8 = [j for j in range(len(stars)) if j != target][:8]
    first20 = [j for j in range(len(stars)) if j != target][:20]
    median_fwhm = float(np.median(night.fwhm))
    pattern = fixed_pattern(night)

    # The night's radius: the one where the comparisons scatter least against each other.
    radii = (3.0, 3.5, 4.0, 4.5, 5.0, 6.0)
    spread = {}
    fixed_runs = {}
    for radius in radii:
        a = radius / median_fwhm
        p = PhotometryParams(gain=GAIN_PUBLISHED, saturation=level, aperture=a,
                             annulus_inner=max(3.0, a + 1.0), annulus_outer=max(5.0, a + 3.0))
        run = measure_all(night, stars, p, fixed=median_fwhm)
        fixed_runs[radius] = (run, p)
        f, e, fl, _ = run
        spread[radius] = float(np.median([
            np.std(curve(f, e, fl, c, [o for o in in_field if o != c])[0], ddof=1) for c in in_field]))
    best = min(spread, key=lambda r: spread[r])
    print()
    print("Comparisons' median scatter against each other by fixed radius (mmag): "
          + ", ".join(f"{r:g} px {spread[r] * 1000:.2f}" for r in radii)
          + f"; the night's radius: {best:g} px.")
    print()
    print(f"| variation | frames | scatter (mmag) | predicted at {GAIN_PUBLISHED} e-/ADU | ratio | "
          f"predicted at {GAIN_HOT_PIXELS:g} | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")

    def row(label: str, f: np.ndarray, e: np.ndarray, fl: np.ndarray, comps: list[int],
            weights: np.ndarray | None = None) -> None:
        mag, err = curve(f, e, fl, target, comps, weights)
        # The same errors at the other gain: only the star's photon term changes.
        photons = np.maximum(f, 0)
        e22 = np.sqrt(np.maximum(e**2 - photons / GAIN_PUBLISHED + photons / GAIN_HOT_PIXELS, 0))
        _mag22, err22 = curve(f, e22, fl, target, comps, weights)
        scatter, ratio = scatter_ratio(mag, err)
        print(f"| {label} | {mag.size} | {scatter * 1000:.2f} | {np.sqrt(np.mean(err**2)) * 1000:.2f} | "
              f"{ratio:.2f} | {np.sqrt(np.mean(err22**2)) * 1000:.2f} | {scatter_ratio(mag, err22)[1]:.2f} |")

    row("8 comparisons (the first 8 clean stars), aperture 2 FWHM of each frame", flux, error, flagged,
        first8)
    row("20 comparisons", flux, error, flagged, first20)
    row(f"every clean star staying in the field ({len(in_field)})", flux, error, flagged, in_field)
    row("  + inverse-variance weights (noise model)", flux, error, flagged, in_field,
        inverse_variance(flux, error, in_field))
    kept = rejected(flux, error, flagged, in_field)
    row(f"  + iterative rejection (> 2x the median scatter): {len(kept)} left", flux, error, flagged, kept)
    (f, e, fl, _), _p = fixed_runs[best]
    row(f"  + the night's radius, {best:g} px, for every frame", f, e, fl, in_field)
    kept_fixed = rejected(f, e, fl, in_field)
    row(f"  + the night's radius and the rejection ({len(kept_fixed)} left)", f, e, fl, kept_fixed)
    fp, ep, flp, _ = measure_all(night, stars, _p, fixed=median_fwhm, pattern=pattern)
    row("  + the night's radius, the fixed pattern subtracted", fp, ep, flp, in_field)
    fp2, ep2, flp2, _ = measure_all(night, stars, base, pattern=pattern)
    row("2 FWHM apertures, the fixed pattern subtracted", fp2, ep2, flp2, in_field)

    report_excess(night, stars, f, e, fl, [*in_field, target], best)


# -- 4. the excess ---------------------------------------------------------------------------------------


def young(night: Night) -> np.ndarray:
    """Young's scintillation, relative flux, per frame (D in cm, X airmass, h metres, t seconds)."""
    return (0.09 * APERTURE_CM ** (-2.0 / 3.0) * night.airmass**1.75 * math.exp(-SITE_HEIGHT_M / 8000.0)
            / math.sqrt(2.0 * night.exptime))


def report_excess(night: Night, stars: tuple[Star, ...], flux: np.ndarray, error: np.ndarray,
                  flagged: np.ndarray, pool: list[int], radius: float) -> None:
    pool = sorted(j for j in pool if flagged[:, j].sum() <= 3)
    print()
    print(f"Each clean star against every other ({len(pool) - 1}), the night's radius ({radius:g} px), "
          f"{GAIN_PUBLISHED} e-/ADU; excess = sqrt(scatter^2 - predicted^2):")
    print()
    print("| star | flux (ADU) | peak, highest / clipping | scatter (mmag) | predicted | ratio "
          "| excess (mmag) | excess (ADU) | lag-1 autocorrelation |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    _f, _e, _fl, peak = measure_all(night, stars, PhotometryParams(gain=GAIN_PUBLISHED,
                                                                    saturation=night.saturation))
    rows = []
    for t in pool[:16]:
        mag, err = curve(flux, error, flagged, t, [o for o in pool if o != t])
        scatter, ratio = scatter_ratio(mag, err)
        excess = math.sqrt(max(scatter**2 - float(np.mean(err**2)), 0.0))
        lag = float(np.corrcoef(mag[:-1], mag[1:])[0, 1])
        level = float(np.median(flux[:, t]))
        rows.append((level, excess / _MAG * level))
        print(f"| {stars[t].name} | {level:.0f} | {np.nanmax(peak[:, t]) / night.saturation:.2f} | "
              f"{scatter * 1000:.2f} | {np.sqrt(np.mean(err**2)) * 1000:.2f} | {ratio:.2f} | "
              f"{excess * 1000:.2f} | {excess / _MAG * level:.0f} | {lag:.2f} |")
    levels, excesses = np.array(rows).T
    power = float(np.polyfit(np.log(levels), np.log(np.maximum(excesses, 1e-3)), 1)[0])
    # Residuals of every star against the frame's median zero point, for the correlations.
    with np.errstate(invalid="ignore", divide="ignore"):
        mags = -2.5 * np.log10(np.where((flux > 0) & ~flagged, flux, np.nan))[:, pool]
    zero = np.nanmedian(mags - np.nanmedian(mags, axis=0), axis=1)
    resid = mags - zero[:, None]
    resid -= np.nanmean(resid, axis=0)
    bright = list(range(min(10, len(pool))))
    corr = np.ma.corrcoef(np.ma.masked_invalid(resid[:, bright]).T)
    off = float((np.nansum(corr) - len(bright)) / (len(bright) * (len(bright) - 1)))
    plan = PhotometryPlan(stars=tuple(stars[j] for j in pool), params=PhotometryParams())
    pos = np.array([plan.positions_on(m) for m in night.matrices])
    inside = np.hypot(pos[..., 0] - np.round(pos[..., 0]), pos[..., 1] - np.round(pos[..., 1]))
    offset = inside[:, bright].ravel()
    r = resid[:, bright].ravel()
    ok = np.isfinite(r)
    centred = ok & (offset < 0.2)
    fwhm_corr = []
    for j in bright:
        has = np.isfinite(resid[:, j])
        fwhm_corr.append(float(np.corrcoef(resid[has, j], night.fwhm[has])[0, 1]))
    scint = young(night)
    print()
    print(f"- With the flux: the excess in ADU grows as flux^{power:.2f} (a constant fraction: 1; photon "
          f"noise from a wrong gain: 0.5).")
    print(f"- The frames' common zero point: {np.ptp(zero) * 1000:.0f} mmag peak to peak, correlation with "
          f"the airmass {np.corrcoef(zero, night.airmass)[0, 1]:.2f} (common to all stars: cancels in the "
          f"ratio).")
    print(f"- Between stars: mean correlation of the 10 brightest stars' residuals {off:.3f} (independent).")
    print(f"- Inside the pixel: stars centred within 0.2 px of a pixel's centre read "
          f"{np.mean(r[centred]) * 1000:+.1f} mmag (std {np.std(r[centred]) * 1000:.1f}) against "
          f"{np.mean(r[ok & ~centred]) * 1000:+.1f} (std {np.std(r[ok & ~centred]) * 1000:.1f}) elsewhere "
          f"({centred.sum()} and {(ok & ~centred).sum()} points).")
    print(f"- Seeing: correlation with the frame's FWHM, star by star, {min(fwhm_corr):+.2f} to "
          f"{max(fwhm_corr):+.2f}.")
    print(f"- Young's scintillation (D = {APERTURE_CM:g} cm, h = {SITE_HEIGHT_M:g} m, airmass from TELALT): "
          f"{scint.min() * _MAG * 1000:.2f}-{scint.max() * _MAG * 1000:.2f} mmag a star.")


def main() -> None:
    night = load()
    report_gain(night)
    print()
    report_variations(night)


if __name__ == "__main__":
    main()
