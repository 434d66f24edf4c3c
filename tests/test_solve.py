"""Plate solving: header hints, the solver's absence, and real solutions checked against independent ones."""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from livestack.cli import main as cli_main
from livestack.stages.detect import detect
from livestack.stages.frames import read_frame
from livestack.stages.solve import Solution, SolveFailure, SolveHints, hints_from_header, solve

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PAIR = DATA / "pocs_kic8462852_dslr_pair"
INDEX = Path("/usr/share/astrometry")

needs_solver = pytest.mark.skipif(
    shutil.which("solve-field") is None or not list(INDEX.glob("index-tycho2-1[0-9]*.fits")),
    reason="astrometry.net's solve-field and its Tycho-2 index files (60'-2000') are not installed "
           "(.ci/run installs astrometry.net and astrometry-data-tycho2-10-19)")
needs_data = pytest.mark.skipif(not PAIR.is_dir(), reason="real frames not found at ../shared/data")


def _wcs(header: fits.Header) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)  # the header's date cards, not the WCS
        return WCS(header, naxis=2).celestial


def _separation_arcsec(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    p1, p2, dl = map(math.radians, (dec1, dec2, ra2 - ra1))
    h = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return math.degrees(2 * math.asin(math.sqrt(h))) * 3600.0


def test_hints_read_the_pointing_and_scale_however_the_capture_program_wrote_them() -> None:
    nina = hints_from_header({"RA": 83.8221, "DEC": -5.3911, "FOCALLEN": 400.0, "XPIXSZ": 3.76})
    assert (nina.ra, nina.dec) == (83.8221, -5.3911)
    scale = 206.265 * 3.76 / 400.0
    assert nina.scale_low == pytest.approx(scale * 0.85) and nina.scale_high == pytest.approx(scale * 1.15)
    sharpcap = hints_from_header({"OBJCTRA": "05 35 17.3", "OBJCTDEC": "-05 23 28"})
    assert sharpcap.ra == pytest.approx((5 + 35 / 60 + 17.3 / 3600) * 15)
    assert sharpcap.dec == pytest.approx(-(5 + 23 / 60 + 28 / 3600))
    assert sharpcap.scale_low is None
    microobs = hints_from_header({"RA": 31.312099, "DEC": 46.769087, "IM_SCALE": 5.21})
    assert microobs.scale_high == pytest.approx(5.21 * 1.15)
    pocs = hints_from_header({"RA-MNT": 301.56439, "DEC-MNT": 44.456875})
    assert (pocs.ra, pocs.dec) == (301.56439, 44.456875)
    assert hints_from_header({}) == SolveHints()


def test_auto_solves_only_references_without_a_wcs_whose_header_gives_a_start(tmp_path: Path) -> None:
    from livestack.config import Config
    from livestack.pipeline import wants_solution
    from livestack.simulate import SimConfig, simulate
    from livestack.stages.frames import read_meta

    (sim,) = simulate(tmp_path, SimConfig(frames=1, size=(64, 48), n_stars=5), sleep=lambda _s: None)
    auto, always, off = (Config().with_overrides({"wcs.solve": mode}) for mode in ("auto", "always", "off"))
    assert not wants_solution(auto, read_meta(sim))  # no pointing, no scale: no blind search
    assert wants_solution(always, read_meta(sim)) and not wants_solution(off, read_meta(sim))
    if PAIR.is_dir():
        assert wants_solution(auto, read_meta(PAIR / "unsolved.fits"))  # the mount's RA-MNT/DEC-MNT
        assert not wants_solution(auto, read_meta(PAIR / "solved.fits.fz"))  # it has a WCS
        assert wants_solution(always, read_meta(PAIR / "solved.fits.fz"))


def test_a_missing_solver_is_a_reason_not_an_exception() -> None:
    stars, _ = detect(np.random.default_rng(1).normal(100, 5, (64, 64)).astype(np.float32))
    outcome = solve(stars, (64, 64), command="no-such-solver-for-livestack {xyls}")
    assert isinstance(outcome, SolveFailure) and outcome.kind == "missing"
    assert "no-such-solver-for-livestack" in outcome.reason


def _real_solution() -> tuple[Solution, np.ndarray, tuple[int, int]]:
    path = PAIR / "solved.fits.fz"
    with fits.open(path) as hdul:
        header = hdul[1].header.copy()
    frame = read_frame(path)
    stars, _ = detect(frame.luminance)
    hints = hints_from_header({k: header[k] for k in ("RA-MNT", "DEC-MNT")})  # the mount: ~2 degrees off
    outcome = solve(stars, frame.meta.shape, SolveHints(ra=hints.ra, dec=hints.dec), time_limit=120.0)
    assert isinstance(outcome, Solution), outcome
    return outcome, np.column_stack([stars.x, stars.y, stars.flux]), frame.meta.shape


@needs_solver
@needs_data
def test_a_real_frame_solves_better_than_its_own_header_wcs() -> None:
    outcome, _stars, shape = _real_solution()
    assert len(outcome.matches) >= 15
    with fits.open(PAIR / "solved.fits.fz") as hdul:
        theirs = _wcs(hdul[1].header)
    ours = _wcs(fits.Header.fromstring(outcome.wcs_header))
    # Catalogue stars (Tycho-2 positions from the index) against the frame's stars they were matched to.
    residual = {}
    for name, wcs in (("ours", ours), ("theirs", theirs)):
        xy = wcs.all_world2pix(outcome.matches[:, 2:], 0)
        residual[name] = float(np.sqrt(np.mean(np.sum((xy - outcome.matches[:, :2]) ** 2, axis=1))))
    assert residual["ours"] < 0.3, residual
    assert residual["ours"] < residual["theirs"], residual  # the header's WCS is 1.4 px rms off them
    centre = [[(shape[1] - 1) / 2, (shape[0] - 1) / 2]]
    ra, dec = theirs.all_pix2world(centre, 0)[0]
    assert _separation_arcsec(ra, dec, outcome.ra, outcome.dec) < 10.0  # within the header's own error


@needs_solver
@needs_data
def test_a_frame_rendered_from_catalogue_stars_recovers_its_known_wcs() -> None:
    # Stars of the Tycho-2 catalogue (as the index holds them) rendered through a WCS chosen here: the truth.
    outcome, stars, _shape = _real_solution()
    flux = np.array([stars[np.argmin(np.hypot(stars[:, 0] - x, stars[:, 1] - y)), 2]
                     for x, y in outcome.matches[:, :2]])
    truth = WCS(naxis=2)
    truth.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    truth.wcs.crval = [outcome.ra + 0.05, outcome.dec - 0.04]
    scale = 9.5 / 3600.0
    turn = math.radians(25.0)
    truth.wcs.cd = scale * np.array([[-math.cos(turn), math.sin(turn)], [math.sin(turn), math.cos(turn)]])
    rows, cols = 640, 720
    truth.wcs.crpix = [(cols + 1) / 2, (rows + 1) / 2]
    xy = truth.all_world2pix(outcome.matches[:, 2:], 0)
    inside = (xy[:, 0] > 5) & (xy[:, 0] < cols - 6) & (xy[:, 1] > 5) & (xy[:, 1] < rows - 6)
    gy, gx = np.mgrid[0:rows, 0:cols]
    image = np.random.default_rng(7).normal(500.0, 8.0, (rows, cols))
    for (x, y), f in zip(xy[inside], flux[inside], strict=True):
        image += f / (2 * np.pi * 1.5**2) * np.exp(-((gx - x) ** 2 + (gy - y) ** 2) / (2 * 1.5**2))
    found, _ = detect(image.astype(np.float32))
    hints = SolveHints(ra=outcome.ra + 1.0, dec=outcome.dec - 0.7)  # a pointing a degree off
    solved = solve(found, (rows, cols), hints, time_limit=120.0)
    assert isinstance(solved, Solution), solved
    ra, dec = truth.all_pix2world([[(cols - 1) / 2, (rows - 1) / 2]], 0)[0]
    assert _separation_arcsec(ra, dec, solved.ra, solved.dec) < 2.0
    assert solved.scale == pytest.approx(9.5, rel=1e-3)
    assert solved.rotation == pytest.approx(-25.0, abs=0.1) or solved.rotation == pytest.approx(25.0, abs=0.1)


@needs_solver
@needs_data
def test_a_stack_of_unsolved_frames_gets_a_wcs_that_puts_catalogue_stars_on_its_stars(tmp_path: Path) -> None:
    # The reference has no WCS of its own (unsolved.fits): livestack stack solves it and writes the solution.
    out = tmp_path / "stack.fits"
    assert cli_main(["stack", str(PAIR / "unsolved.fits"), "-o", str(out), "--method", "mean", "-q"]) == 0
    with fits.open(out) as hdul:
        header = hdul[0].header
        image = np.asarray(hdul[0].data, dtype=np.float32)
    wcs = _wcs(header)
    assert wcs.has_celestial
    luminance = image.mean(axis=0) if image.ndim == 3 else image
    stars, _ = detect(np.nan_to_num(luminance, nan=float(np.nanmedian(luminance))))
    # Catalogue stars (Tycho-2, from the solver's index) found independently on the stack's own stars.
    catalogue = solve(stars, luminance.shape, SolveHints(ra=301.56, dec=44.46), time_limit=120.0)
    assert isinstance(catalogue, Solution), catalogue
    predicted = wcs.all_world2pix(catalogue.matches[:, 2:], 0)
    nearest = np.array([np.min(np.hypot(stars.x - x, stars.y - y)) for x, y in predicted])
    assert len(nearest) >= 10 and np.max(nearest) < 1.0, nearest


def test_solve_command_says_why_without_a_solver_and_never_touches_the_frame(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    frame = tmp_path / "frame.fits"
    rng = np.random.default_rng(2)
    fits.PrimaryHDU(rng.normal(1000, 10, (64, 80)).astype(np.float32)).writeto(frame)
    before = frame.read_bytes()
    assert cli_main(["solve", str(frame), "--command", "no-such-solver-for-livestack {xyls}"]) == 1
    assert "not solved" in capsys.readouterr().err
    assert frame.read_bytes() == before


@needs_solver
@needs_data
def test_the_daemon_solves_the_reference_off_the_frame_path_and_snapshots_carry_it(tmp_path: Path) -> None:
    from test_daemon import Recorder, make_config, running

    config = make_config(tmp_path, **{"stack.method": "mean", "align.reference": str(PAIR / "unsolved.fits")})
    recorder = Recorder()
    with running(config, listeners=(recorder,)):
        shutil.copy2(PAIR / "unsolved.fits", tmp_path / "frames" / "unsolved.fits")
        (event,) = [e for e in recorder.wait_for(lambda evs: any(e.topic == "wcs" for e in evs),
                                                 "the plate solution", timeout=180.0) if e.topic == "wcs"]
        assert event["reference"].endswith("unsolved.fits") and event["stars"] >= 10
        assert event["scale"] == pytest.approx(10.3, rel=0.01)
    (snapshot,) = [p for p in (tmp_path / "out").rglob("*.fits") if ".livestack-state" not in p.parts]
    with fits.open(snapshot) as hdul:
        wcs = _wcs(hdul[0].header)
    assert wcs.has_celestial
    ra, dec = wcs.all_pix2world([[349.5, 349.5]], 0)[0]
    assert _separation_arcsec(ra, dec, event["ra"], event["dec"]) < 0.5


@needs_data
def test_without_a_solver_the_daemon_says_so_once_and_stacks_as_before(tmp_path: Path) -> None:
    from test_daemon import Recorder, make_config, running

    config = make_config(tmp_path, **{"stack.method": "mean", "align.reference": str(PAIR / "unsolved.fits"),
                                      "wcs.command": "no-such-solver-for-livestack {xyls}"})
    recorder = Recorder()
    with running(config, listeners=(recorder,)):
        for name in ("unsolved.fits", "solved.fits.fz"):
            shutil.copy2(PAIR / name, tmp_path / "frames" / name)
        recorder.wait_for(lambda evs: len([e for e in evs if e.topic == "frame"
                                           and e["verdict"] == "accepted"]) == 2, "both frames stacked")
        recorder.wait_for(lambda evs: any(e.topic == "log" and "not installed" in e["message"] for e in evs),
                          "the warning")
    said = [e for e in recorder.events if e.topic == "log" and "not installed" in e["message"]]
    assert len(said) == 1 and not any(e.topic == "wcs" for e in recorder.events)


@needs_solver
def test_a_stopping_daemon_ends_a_blind_solve_at_once(tmp_path: Path) -> None:
    import os
    import subprocess
    import time

    from test_daemon import Recorder, make_config, running

    from livestack.simulate import SimConfig, simulate

    (frame,) = simulate(tmp_path / "camera", SimConfig(frames=1, size=(480, 360), n_stars=250),
                        sleep=lambda _s: None)
    config = make_config(tmp_path, **{"stack.method": "mean", "wcs.solve": "always", "wcs.time_limit": 300.0})
    recorder = Recorder()
    with running(config, listeners=(recorder,)) as daemon:
        shutil.copy2(frame, tmp_path / "frames" / frame.name)
        recorder.wait_for(lambda evs: any(e.topic == "frame" and e["verdict"] == "accepted" for e in evs),
                          "the frame stacked")
        mine = ["pgrep", "-P", str(os.getpid()), "-f", "solve-field"]  # this process's own solver
        deadline = time.monotonic() + 30.0  # a simulated sky: the solver searches the whole sky in vain
        while subprocess.run(mine, capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, "the solver never started"
            time.sleep(0.1)
        t0 = time.monotonic()
        daemon.stop()
        assert time.monotonic() - t0 < 20.0
    assert subprocess.run(mine, capture_output=True).returncode != 0
