"""Photometry: apertures against independent sums, a simulated transit recovered, real frames' scatter."""

from __future__ import annotations

import math
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.optimize import curve_fit

from livestack.config import Config
from livestack.pipeline import Stacker
from livestack.simulate import SimConfig, Transit, render_frame, simulate
from livestack.stages.frames import read_frame
from livestack.stages.photometry import (
    Photometer,
    PhotometryParams,
    PhotometryPlan,
    Star,
    cut_stamps,
    differential,
    measure,
    mid_exposure_time,
    parse_target,
    plan_photometry,
    saturation_level,
    write_lightcurve,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MICROOBS = DATA / "microobs_hatp32_first30"


def _gaussian_star(shape: tuple[int, int], x: float, y: float, flux: float, fwhm: float) -> np.ndarray:
    sigma = fwhm / 2.3548
    gy, gx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return flux * np.exp(-((gx - x) ** 2 + (gy - y) ** 2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)


def test_aperture_flux_matches_an_independent_sum_and_the_noise_model_matches_the_scatter() -> None:
    rng = np.random.default_rng(3)
    shape, fwhm, flux, sky = (61, 61), 3.0, 2.0e5, 500.0
    truth = _gaussian_star(shape, 30.3, 29.6, flux, fwhm) + sky
    params = PhotometryParams(aperture=3.0, annulus_inner=4.0, annulus_outer=8.0, gain=1.0)
    measured, errors = [], []
    for _ in range(150):
        image = (rng.poisson(truth) + rng.normal(0, 5.0, shape)).astype(np.float32)
        (star,) = measure(cut_stamps(image, np.array([[30.0, 30.0]]), params.stamp_half(fwhm)), fwhm, params)
        measured.append(star.flux)
        errors.append(star.flux_err)
        assert star.ok
        assert abs(star.x - 30.3) < 0.1 and abs(star.y - 29.6) < 0.1
    measured_arr = np.array(measured)
    # A radius of 3 FWHM holds all but ~1e-11 of a Gaussian's light: the mean is the flux.
    assert abs(measured_arr.mean() - flux) < 3 * measured_arr.std() / math.sqrt(len(measured_arr))
    ratio = measured_arr.std() / np.mean(errors)
    assert 0.85 < ratio < 1.15, ratio


def test_flags_saturation_edges_and_cosmic_rays() -> None:
    shape, fwhm = (80, 80), 3.0
    image = (
        _gaussian_star(shape, 20, 20, 5e5, fwhm)
        + _gaussian_star(shape, 60, 20, 2e4, fwhm)
        + _gaussian_star(shape, 3, 60, 2e4, fwhm)
        + _gaussian_star(shape, 50, 60, 2e4, fwhm)
        + 100.0
    )
    image[60, 53] += 2500.0  # a cosmic ray in the fourth star's aperture, 3 px from its centre
    image = np.minimum(image, 4095.0).astype(np.float32)  # the sensor clips the first star
    level = saturation_level(image)
    assert level == 4095.0
    params = PhotometryParams(gain=1.0, saturation=level)
    stars = measure(
        cut_stamps(image, np.array([[20, 20], [60, 20], [3, 60], [50, 60]]), params.stamp_half(fwhm)),
        fwhm,
        params,
    )
    assert stars[0].flags == ("saturated",)
    assert stars[1].ok
    assert "edge" in stars[2].flags
    assert stars[3].flags == ("cosmic",)
    assert saturation_level(image[40:, 40:]) == math.inf  # no plateau: no clipping level guessed
    assert saturation_level(image, 60000.0) == 60000.0


def test_ensemble_rescales_when_a_comparison_is_flagged() -> None:
    from livestack.stages.photometry import StarFlux

    def star(flux: float, flags: tuple[str, ...] = ()) -> StarFlux:
        return StarFlux(x=0, y=0, flux=flux, flux_err=math.sqrt(flux), background=0, peak=0, flags=flags)

    reference = [1000.0, 2000.0, 3000.0]
    all_good = differential(star(600.0), [star(1000.0), star(2000.0), star(3000.0)], reference)
    one_flagged = differential(star(600.0), [star(1000.0), star(2000.0), star(99.0, ("cosmic",))], reference)
    assert all_good[2] == 3 and one_flagged[2] == 2
    assert one_flagged[0] == pytest.approx(all_good[0], abs=1e-12)
    assert all_good[0] == pytest.approx(-2.5 * math.log10(600.0 / 6000.0))
    assert one_flagged[1] > all_good[1]  # fewer comparisons, larger error


def test_targets_from_pixels_and_from_the_sky() -> None:
    from astropy.wcs import WCS

    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [31.3, 46.7]
    wcs.wcs.crpix = [100.0, 80.0]
    wcs.wcs.cdelt = [-5.2 / 3600, 5.2 / 3600]
    header = wcs.to_header().tostring()
    assert parse_target("12.5, 40") == Star(name="12.5, 40", x=12.5, y=40.0)
    star = parse_target("HAT-P-32=sky 31.3 46.7", header)
    assert star.name == "HAT-P-32" and star.x == pytest.approx(99.0) and star.y == pytest.approx(79.0)
    with pytest.raises(ValueError, match="no WCS"):
        parse_target("sky 31.3 46.7")
    with pytest.raises(ValueError, match="'x,y'"):
        parse_target("north of the moon")


def test_bjd_differs_from_jd_by_the_light_travel_time() -> None:
    start = datetime(2017, 12, 20, 1, 33, 43, tzinfo=UTC)
    jd, scale = mid_exposure_time(start, 60.0)
    assert scale == "JD_UTC"
    assert jd == pytest.approx(2458107.5 + (1 * 3600 + 34 * 60 + 13) / 86400.0, abs=1e-8)  # mid: 01:34:13
    ra, dec = 31.31, 46.69
    bjd, scale = mid_exposure_time(start, 60.0, sky=(ra, dec), site=(31.68, -110.88, 2300.0))
    assert scale == "BJD_TDB"
    # Independently, with a low-precision solar ephemeris: the Earth's heliocentric position projected on the
    # star's direction, over the speed of light, plus TDB - UTC (32.184 s + 37 leap seconds in 2017).
    n = jd - 2451545.0
    g = math.radians(357.528 + 0.9856003 * n)
    sun = math.radians(280.460 + 0.9856474 * n + 1.915 * math.sin(g) + 0.020 * math.sin(2 * g))
    r_au = 1.00014 - 0.01671 * math.cos(g) - 0.00014 * math.cos(2 * g)
    eps, a, d = math.radians(23.439), math.radians(ra), math.radians(dec)
    beta = math.asin(math.sin(d) * math.cos(eps) - math.cos(d) * math.sin(eps) * math.sin(a))
    lam = math.atan2(math.sin(a) * math.cos(eps) + math.tan(d) * math.sin(eps), math.cos(a))
    light_time = 499.005 * r_au * math.cos(beta) * math.cos(lam - (sun + math.pi))
    expected = light_time + 69.184
    assert (bjd - jd) * 86400.0 == pytest.approx(expected, abs=5.0)  # the Sun's wobble about the barycentre


def _trapezoid(
    t: np.ndarray, baseline: float, depth: float, mid: float, duration: float, ingress: float
) -> np.ndarray:
    edge = np.abs(t - mid) - (duration / 2 - ingress)
    shape = np.clip(1.0 - edge / ingress, 0.0, 1.0)
    return baseline - 2.5 * np.log10(1.0 - depth * shape)


def test_simulated_transit_is_recovered_and_constant_stars_scatter_as_predicted(tmp_path: Path) -> None:
    # A 2.1-hour run of 60 s exposures every 75 s; the transit lasts 40 minutes (ingress and egress 6.7).
    transit = Transit(x=210.0, y=150.0, flux=3.0e5, depth=0.02, mid=3750.0, duration=2400.0, ingress=400.0)
    sim = SimConfig(
        frames=100,
        interval=75.0,
        exptime=60.0,
        size=(512, 384),
        n_stars=500,
        fwhm=3.2,
        drift=(0.4, -0.25),
        rotation_per_frame=0.01,
        seeing_jitter=0.08,
        seed=11,
        transit=transit,
        write_mode="atomic",
    )
    paths = simulate(tmp_path / "frames", sim, sleep=lambda _s: None)
    stacker = Stacker(Config().with_overrides({"stack.method": "mean"}))
    params = PhotometryParams(gain=1.0, saturation=65535.0)
    photometer: Photometer | None = None
    constants: list[Star] = []
    times = []
    for i, path in enumerate(paths):
        result = stacker.process(path)
        assert result.accepted, result.reason
        assert result.transform is not None and result.quality is not None and result.meta is not None
        frame = read_frame(path)
        if photometer is None:
            ref_stars = stacker._ref_stars  # the reference's own star list
            assert ref_stars is not None
            # The three brightest clean stars are measured as targets against the other twenty: constant
            # stars, whose scatter the noise model must predict.
            target = Star("transit", transit.x, transit.y)
            clean = plan_photometry([target], frame.luminance, ref_stars, result.quality.fwhm, 23, params)
            assert len(clean.comparisons) == 23
            constants = [Star(f"K{k}", s.x, s.y) for k, s in enumerate(clean.comparisons[:3])]
            plan = PhotometryPlan(stars=(target, *constants, *clean.comparisons[3:]), params=params)
            photometer = Photometer(plan)
        assert result.meta.time_utc is not None
        t, _scale = mid_exposure_time(result.meta.time_utc, result.meta.exptime)
        times.append((t, i * sim.interval + sim.exptime / 2))
        stamps = photometer.plan.cut(frame.luminance, result.transform.matrix, result.quality.fwhm)
        photometer.add(i + 1, path.name, t, stamps, result.quality.fwhm)
    assert photometer is not None
    rows = photometer.curve.rows
    # Seconds since frame 0's start, from the light curve's own JD, to compare with the simulation's clock.
    jd0 = times[0][0] - times[0][1] / 86400.0
    tr = [r for r in rows if r.target == "transit"]
    assert len(tr) == sim.frames and all(not r.flags for r in tr)
    t = np.array([(r.time - jd0) * 86400.0 for r in tr])
    mag = np.array([r.magnitude for r in tr])
    err = np.array([r.error for r in tr])
    fit, _cov = curve_fit(
        lambda tt, b, d, m: _trapezoid(tt, b, d, m, transit.duration, transit.ingress),
        t,
        mag,
        p0=[np.median(mag), 0.01, 3500.0],
        sigma=err,
        absolute_sigma=True,
    )
    assert abs(fit[1] - transit.depth) < 0.003, fit
    assert abs(fit[2] - transit.mid) < 120.0, fit
    for star in constants:
        m = np.array([r.magnitude for r in rows if r.target == star.name])
        e = np.array([r.error for r in rows if r.target == star.name])
        mean = np.sum(m / e**2) / np.sum(1 / e**2)
        chi2 = float(np.sum(((m - mean) / e) ** 2) / (len(m) - 1))
        assert 0.7 <= chi2 <= 1.5, (star, chi2)
    out = write_lightcurve(tmp_path / "lightcurve.ecsv", photometer.curve, {"targets": ["transit"]})
    from astropy.table import Table

    table = Table.read(out, format="ascii.ecsv")
    assert len(table) == len(rows) and "jd_utc" in table.colnames
    assert table.meta["time_scale"] == "JD_UTC"


def test_simulated_transit_frames_carry_the_dip() -> None:
    # The simulator's own pixels, independently of livestack's photometry: the star's light really dims.
    transit = Transit(x=60.0, y=40.0, flux=1.0e6, depth=0.1, mid=600.0, duration=400.0, ingress=100.0)
    sim = SimConfig(
        frames=12,
        interval=100.0,
        exptime=10.0,
        size=(120, 80),
        n_stars=0,
        seed=2,
        drift=(0.0, 0.0),
        rotation_per_frame=0.0,
        transit=transit,
    )
    box = np.s_[25:56, 45:76]
    inside = render_frame(sim, 6).data[box].astype(float)  # mid-exposure 605 s: in full transit
    before = render_frame(sim, 0).data[box].astype(float)  # 5 s: before ingress
    sky = render_frame(SimConfig(**{**sim.__dict__, "transit": None}), 0).data[box].astype(float)
    lost = (before.sum() - inside.sum()) / (before.sum() - sky.sum())
    assert lost == pytest.approx(0.1, abs=0.01)


@pytest.mark.skipif(not MICROOBS.is_dir(), reason="real frames not found at ../shared/data")
def test_real_microobservatory_light_curve_of_a_constant_star() -> None:
    # HAT-P-32's field: 30 frames over 1.5 hours, drift to ~45 px, many hot pixels, no darks or flats.
    paths = sorted(MICROOBS.glob("*.FITS"))
    stacker = Stacker(Config().with_overrides({"stack.method": "mean"}))
    frames = []
    for path in paths:
        result = stacker.process(path)
        assert result.accepted and result.transform is not None and result.quality is not None
        frames.append((read_frame(path).luminance, result.transform.matrix, result.quality.fwhm))
    ref = stacker._ref_stars
    assert ref is not None
    first, _matrix, first_fwhm = frames[0]
    level = saturation_level(first)
    assert level == 4095.0  # a 12-bit camera in 16-bit files: found from the plateau
    params = PhotometryParams(gain=GAIN_MICROOBS, saturation=level)
    clean = plan_photometry([], first, ref, first_fwhm, 21, params).comparisons
    # The star, by a rule fixed in advance: the brightest clean star (the comparisons' rule: no neighbour in
    # reach, peak under 60% of clipping on the reference) that no frame flags (saturated, edge, cosmic, lost)
    # and that stays 60 px from every edge all night.
    probe = PhotometryPlan(stars=clean, params=params)
    rows_, cols_ = first.shape
    flagged = np.zeros(len(clean), dtype=bool)
    nearest_edge = np.full(len(clean), np.inf)
    for image, matrix, fwhm in frames:
        flagged |= [bool(m.flags) for m in measure(probe.cut(image, matrix, fwhm), fwhm, params)]
        xy = probe.positions_on(matrix)
        nearest_edge = np.minimum(nearest_edge, np.min([xy[:, 0], xy[:, 1], cols_ - 1 - xy[:, 0],
                                                        rows_ - 1 - xy[:, 1]], axis=0))
    chosen = next(i for i in range(len(clean)) if not flagged[i] and nearest_edge[i] >= 60)
    target = Star("bright", clean[chosen].x, clean[chosen].y)
    comparisons = [s for i, s in enumerate(clean) if i != chosen]  # the other 20, as the pipeline picks them
    photometer = Photometer(PhotometryPlan(stars=(target, *comparisons), params=params))
    for i, (image, matrix, fwhm) in enumerate(frames):
        photometer.add(i + 1, paths[i].name, float(i), photometer.plan.cut(image, matrix, fwhm), fwhm)
    rows = [r for r in photometer.curve.rows if not r.flags]
    assert len(rows) == len(paths)
    m = np.array([r.magnitude for r in rows])
    e = np.array([r.error for r in rows])
    scatter, predicted = float(np.std(m, ddof=1)), float(np.sqrt(np.mean(e**2)))
    # Measured 2026-11-30 (benchmarks/bench_photometry_real.py): 4.91 mmag against 1.80 predicted, 2.73x, at
    # the published gain. The 1.5x does not hold on these frames: every star carries 3.6-7.6 mmag of
    # white excess, independent from star to star and growing in proportion to the flux (a flat-field or
    # intra-pixel response on an unflattened sensor under undersampled, drifting stars), which no ensemble,
    # weighting, rejection, aperture or fixed-pattern subtraction tried took below 2.45x. This guards the
    # pipeline at what holds (a broken transform or aperture gives tens of mmag).
    assert scatter < 0.0055, (scatter, predicted)
    assert scatter < 3.0 * predicted, (scatter, predicted)


#: MicroObservatory's camera (Kodak KAF-1402ME, 2x2 binned, 12-bit) as NASA's Exoplanet Watch lists it for
#: MicroObservatory data ("How to Submit Your Data", science.nasa.gov/citizen-science/exoplanet-watch/):
#: 53.6 e-/ADU, read noise 15 e- (quoted there in github.com/rzellem/EXOTIC/issues/1417). The frames'
#: hot pixels give 17-32 e-/ADU, a lower bound: their dark changes from frame to frame beyond photon noise.
GAIN_MICROOBS = 53.6


def _photometry_event(seq: int, magnitude: float, error: float, flags: tuple[str, ...] = ()) -> Any:
    from livestack import events

    return events.make_event(
        "photometry", seq=seq, name=f"f{seq:03d}.fits", obs_time=2460000.5 + seq / 1440.0,
        time_scale="JD_UTC",
        fwhm=3.0, aperture=6.0, comparisons=10, object="HAT-P-32", session=1,
        targets=[{"name": "HAT-P-32", "magnitude": magnitude, "error": error, "flux": 1e5, "flux_err": 300.0,
                  "x": 10.0, "y": 20.0, "comparisons": 10, "flags": list(flags)}])


def test_dashboard_draws_the_light_curve_with_error_bars_once_photometry_arrives() -> None:
    import asyncio
    from datetime import UTC as _UTC

    from livestack.clients.tui.app import LivestackApp
    from livestack.clients.tui.widgets import LightCurveView, bin_points

    async def scenario() -> None:
        app = LivestackApp(None, None, None, tz=_UTC, lightcurve_bin=2)
        async with app.run_test(size=(120, 40)) as pilot:
            curve = app.query_one("#lightcurve", LightCurveView)
            assert not curve.display  # no panel before any photometry
            depth = [0.0] * 6 + [0.02] * 6 + [0.0] * 6
            app.apply_events([_photometry_event(i + 1, -1.0 + d, 0.002) for i, d in enumerate(depth)])
            app.apply_events([_photometry_event(19, 5.0, 0.002, ("cosmic",))])  # flagged: not drawn
            await pilot.pause(0.1)
            assert curve.display
            assert "HAT-P-32" in str(curve.border_title) and "JD_UTC" in str(curve.border_title)
            assert len(curve.points) == 9  # 18 clean points, two per bin
            assert curve.points[4][1] == pytest.approx(-0.98)
            lines = [curve.render_line(y).text for y in range(curve.size.height)]
            assert sum(line.count("●") for line in lines) == 9
            # The transit's points are fainter: drawn lower than the out-of-transit ones.
            rows = {col: y for y, line in enumerate(lines) for col, ch in enumerate(line) if ch == "●"}
            cols = sorted(rows)
            assert rows[cols[4]] > rows[cols[0]] and rows[cols[4]] > rows[cols[-1]]

    asyncio.run(scenario())
    # Binning: an inverse-variance mean, its error shrinking as the square root of the points.
    binned = bin_points([(0.0, 1.0, 0.01), (1.0, 1.02, 0.01), (2.0, 0.5, 0.1), (3.0, 0.7, 0.1)], 2)
    assert binned[0] == pytest.approx((0.5, 1.01, 0.01 / math.sqrt(2)))
    assert binned[1] == pytest.approx((2.5, 0.6, 0.1 / math.sqrt(2)))


def test_live_daemon_publishes_photometry_and_writes_the_light_curve(tmp_path: Path) -> None:
    from astropy.table import Table
    from test_daemon import Recorder, make_config, running

    from livestack.cli import main as cli_main

    # A bright star dims by 5% for the middle third of 24 frames; the daemon measures it live.
    transit = Transit(x=200.0, y=130.0, flux=4.0e5, depth=0.05, mid=720.0, duration=480.0, ingress=60.0)
    sim = SimConfig(frames=24, interval=60.0, exptime=30.0, size=(400, 280), n_stars=260, seed=4,
                    drift=(0.3, 0.2), rotation_per_frame=0.0, transit=transit)
    source = simulate(tmp_path / "camera", sim, sleep=lambda _s: None)
    config = make_config(tmp_path, **{
        "align.reference": str(source[0]), "stack.method": "mean",
        "photometry.targets": [f"transit={transit.x},{transit.y}"], "photometry.comparisons": 8})
    recorder = Recorder()
    with running(config, listeners=(recorder,)):
        for path in source:
            shutil.copy2(path, tmp_path / "frames" / path.name)
        recorder.wait_for(lambda evs: sum(e.topic == "photometry" for e in evs) >= len(source),
                          "a photometry event per frame")
    accepted = {f["seq"] for f in recorder.frames("accepted")}
    points = recorder.topic("photometry")
    assert {p["seq"] for p in points} == accepted and len(accepted) == len(source)
    mags = np.array([p["targets"][0]["magnitude"] for p in sorted(points, key=lambda p: p["seq"])])
    assert all(p["time_scale"] == "JD_UTC" and p["comparisons"] == 8 for p in points)
    inside = np.array([abs(i * 60.0 + 15.0 - transit.mid) < transit.duration / 2 - transit.ingress
                       for i in range(len(source))])
    dip = float(np.median(mags[inside]) - np.median(mags[~inside]))
    assert dip == pytest.approx(-2.5 * math.log10(1 - transit.depth), abs=0.01)

    (curve_path,) = (tmp_path / "out").rglob("lightcurve.ecsv")
    live = Table.read(curve_path, format="ascii.ecsv")
    assert list(live["seq"]) == sorted(accepted)
    np.testing.assert_allclose(np.array(live["magnitude"]), mags, rtol=0, atol=1e-9)
    # After the night: the same curve from the journal, with the same code.
    again = tmp_path / "again.ecsv"
    state = next(p.parent for p in (tmp_path / "out").rglob("journal.jsonl"))
    assert cli_main(["photometry", str(state), "--target", f"transit={transit.x},{transit.y}",
                     "--comparisons", "8", "-o", str(again)]) == 0
    recomputed = Table.read(again, format="ascii.ecsv")
    np.testing.assert_allclose(np.array(recomputed["magnitude"]), mags, rtol=0, atol=1e-6)


def test_web_viewer_keeps_each_targets_clean_points_for_late_pages() -> None:
    from livestack.clients.web.model import Viewer

    viewer = Viewer()
    out = viewer.apply(_photometry_event(1, -1.0, 0.002))
    point = [2460000.5 + 1 / 1440, -1.0, 0.002]
    expected = {"time_scale": "JD_UTC", "points": [{"target": "HAT-P-32", "point": point}]}
    assert out == [("photometry", expected)]
    assert viewer.apply(_photometry_event(2, 4.0, 0.002, ("saturated",))) == []  # flagged: not drawn
    viewer.apply(_photometry_event(3, -0.98, 0.002))
    hello = viewer.hello(control=False)
    assert [p[1] for p in hello["lightcurves"]["HAT-P-32"]] == [-1.0, -0.98]
    assert hello["time_scale"] == "JD_UTC"


def test_a_restarted_daemon_continues_the_same_light_curve(tmp_path: Path) -> None:
    from astropy.table import Table
    from test_daemon import Recorder, make_config, running

    sim = SimConfig(frames=12, interval=60.0, exptime=30.0, size=(400, 280), n_stars=260, seed=6,
                    drift=(0.3, 0.2), rotation_per_frame=0.0)
    source = simulate(tmp_path / "camera", sim, sleep=lambda _s: None)
    config = make_config(tmp_path, **{"align.reference": str(source[0]), "stack.method": "mean",
                                      "photometry.targets": ["star=150.0,120.0"],
                                      "photometry.comparisons": 6})
    first: list[Any] = []
    for run, half in enumerate((source[:6], source[6:])):
        recorder = Recorder()
        with running(config, listeners=(recorder,)):
            for path in half:
                shutil.copy2(path, tmp_path / "frames" / path.name)
            expected = len(half)
            recorder.wait_for(lambda evs, n=expected: sum(e.topic == "photometry" for e in evs) >= n,
                              "a photometry event per frame")
        (curve_path,) = (tmp_path / "out").rglob("lightcurve.ecsv")
        table = Table.read(curve_path, format="ascii.ecsv")
        if run == 0:
            first = table.meta["comparisons"]
        # One curve across the restart: every frame once, against the same comparison stars.
        assert list(table["name"]) == [p.name for p in source[: len(table)]]
        assert table.meta["comparisons"] == first
    assert len(table) == len(source)
