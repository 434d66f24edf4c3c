"""The FRAMES provenance table: valid FITS (fitsverify), every frame listed, transforms that rebuild it."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from astropy.io import fits
from warp_reference import takes_two_passes, two_pass_reference

from livestack import __version__
from livestack.live.state import content_hash
from livestack.simulate import SimConfig, render_frame, simulate
from livestack.stages.provenance import COLUMNS, FrameRow, frames_csv, frames_hdu, read_frames


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "livestack.cli", *args], capture_output=True, text=True,
                          timeout=240, check=False)


def fitsverify(path: Path) -> str:
    """fitsverify's report; the test fails on any error or warning it finds."""
    tool = shutil.which("fitsverify")
    if tool is None:
        pytest.skip("fitsverify is not installed (Debian package fitsverify; .ci/run installs it)")
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60, check=False)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    assert "Verification found 0 warning(s) and 0 error(s)" in report, report
    return report


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SimConfig]:
    """8 small frames (sim_0006 cloudy, so rejected) plus an empty file (rejected unreadable)."""
    folder = tmp_path_factory.mktemp("night")
    sim = SimConfig(frames=8, interval=30, size=(320, 240), seed=5, n_stars=300, cloud_frames=(5,),
                    rotation_per_frame=0.05)
    simulate(folder, sim, sleep=lambda _s: None)
    (folder / "zz-empty.fits").write_bytes(b"")
    return folder, sim


@pytest.fixture(scope="module")
def stacked(night: tuple[Path, SimConfig], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("out") / "stack.fits"
    # The plain mean of the warped files, which an independent script can reproduce from the table alone:
    # no sky normalisation, equal weights, no defect replacement.
    config = out.parent / "plain.toml"
    config.write_text('[stack]\nnormalise = "none"\nweights = "none"\n[calibration]\ndefects = "off"\n')
    proc = _run("stack", str(night[0]), "-o", str(out), "--method", "mean", "--frames-csv", "-q",
                "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    return out


def test_stack_writes_a_frames_table_that_fitsverify_accepts(stacked: Path) -> None:
    report = fitsverify(stacked)
    assert "FRAMES" in report
    with fits.open(stacked) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "COVERAGE", "FRAMES"]
        header = hdul[0].header
        assert header["SWVERSN"] == __version__
        assert header["NCOMBINE"] == 7
        assert {c.name for c in hdul["FRAMES"].columns} == {name for name, *_ in COLUMNS}
        assert hdul["FRAMES"].header["NFRAMES"] == 9
        assert hdul["FRAMES"].header["NSTACKED"] == 7
        assert hdul["FRAMES"].header["NREJECT"] == 2


def test_the_table_lists_every_frame_received_with_its_facts(night: tuple[Path, SimConfig],
                                                             stacked: Path) -> None:
    folder, sim = night
    with fits.open(stacked) as hdul:
        rows = read_frames(hdul["FRAMES"])
        header = hdul[0].header
    files = sorted(folder.glob("*.fits"))
    assert sorted(Path(r.file).name for r in rows) == sorted(p.name for p in files)
    by_name = {Path(r.file).name: r for r in rows}
    for path in files:
        row = by_name[path.name]
        assert row.hash == content_hash(path)
    cloudy, empty = by_name["sim_0006.fits"], by_name["zz-empty.fits"]
    assert cloudy.state == "rejected" and cloudy.verdict == "rejected" and cloudy.reason
    assert cloudy.stars is not None and cloudy.matrix is None and cloudy.fwhm is not None
    assert empty.state == "rejected" and empty.reason and empty.stars is None and empty.date_obs is None
    good = [r for r in rows if r.state == "stacked"]
    assert len(good) == header["NCOMBINE"]
    assert sum(r.reference for r in rows) == 1 and by_name["sim_0001.fits"].reference
    assert sum(r.exptime or 0.0 for r in good) == pytest.approx(header["EXPTIME"])
    assert min(r.date_obs or "" for r in good)[:19] == header["DATE-OBS"][:19]
    for r in good:
        assert r.exptime == sim.exptime and r.object == sim.object_name
        if not r.reference:
            assert r.inliers is not None and r.inliers >= 10 and r.residual is not None and r.residual < 0.5
        assert r.stars is not None and r.fwhm is not None and r.background is not None and r.noise is not None
        assert r.weight == 1.0
        assert r.scale == pytest.approx(1.0, abs=1e-3)
    # The rotation column agrees with the matrix it was derived from.
    r = by_name["sim_0008.fits"]
    assert r.matrix is not None and r.rotation is not None
    a, b, _, c, d, _ = r.matrix
    assert np.degrees(np.arctan2(c - b, a + d)) == pytest.approx(r.rotation, abs=1e-9)
    truth = render_frame(sim, 7).matrix  # frame -> reference, as the table's
    assert np.array(r.matrix).reshape(2, 3) == pytest.approx(truth, abs=0.05)


def test_the_csv_beside_the_snapshot_holds_the_same_rows(stacked: Path) -> None:
    csv_path = stacked.with_suffix(".frames.csv")
    with fits.open(stacked) as hdul:
        rows = read_frames(hdul["FRAMES"])
    with csv_path.open(newline="") as fh:
        lines = list(csv.DictReader(fh))
    assert len(lines) == len(rows)
    for line, row in zip(lines, rows, strict=True):
        assert line["file"] == row.file and line["hash"] == row.hash and line["state"] == row.state
        if row.matrix is None:
            assert line["m00"] == ""
        else:
            assert tuple(float(line[f"m{i}{j}"]) for i in range(2) for j in range(3)) == row.matrix


def test_the_transforms_reproduce_the_stack_in_an_independent_script(stacked: Path) -> None:
    """Warp each stacked file by its table row with OpenCV's inverse map, average with numpy, compare.

    The stack used the default interpolation, bicubic: for maps close to a shift, as here, Keys' cubic in two
    passes (``warp_reference``, numpy), otherwise OpenCV's; pixels whose 4x4 support reaches the frame edge
    are left out of the comparison. OpenCV's bicubic for every frame agrees to within 0.3% of the range.
    """
    with fits.open(stacked) as hdul:
        stack = np.asarray(hdul[0].data, dtype=np.float64)
        rows = [r for r in read_frames(hdul["FRAMES"]) if r.state == "stacked"]
    height, width = stack.shape
    planes, opencv, covered = [], [], np.ones(stack.shape, dtype=bool)
    for r in rows:
        assert r.matrix is not None
        data = fits.getdata(r.file).astype(np.float32)
        forward = np.vstack([np.array(r.matrix).reshape(2, 3), [0.0, 0.0, 1.0]])
        inverse = np.linalg.inv(forward)[:2]  # reference pixel -> frame pixel
        flags = cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP
        opencv.append(cv2.warpAffine(data, inverse, (width, height), flags=flags))
        ys, xs = np.mgrid[0:height, 0:width]
        u = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
        v = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
        inside = (u >= 2.1) & (u <= data.shape[1] - 3.1) & (v >= 2.1) & (v <= data.shape[0] - 3.1)
        covered &= inside
        matrix = np.array(r.matrix).reshape(2, 3)
        assert takes_two_passes(matrix)
        plane = np.full(stack.shape, np.nan)
        plane[inside] = two_pass_reference(data, matrix, ys[inside], xs[inside])
        planes.append(plane)
    mean = np.mean(np.stack(planes), axis=0)
    assert covered.mean() > 0.8
    np.testing.assert_allclose(stack[covered], mean[covered], rtol=1e-5, atol=1e-3)
    by_opencv = np.mean(np.stack(opencv).astype(np.float64), axis=0)
    assert np.abs(stack[covered] - by_opencv[covered]).max() < 3e-3 * np.ptp(stack[covered])
    # A transform off by half a pixel would not reproduce it: the comparison can fail.
    shifted = np.roll(mean, 1, axis=1)
    assert not np.allclose(stack[covered], shifted[covered], rtol=1e-3)


def test_rows_round_trip_through_the_table_and_degrade_gracefully() -> None:
    rows = [
        FrameRow(seq=1, file="a.fits", hash="ab" * 16, date_obs="2026-11-30T01:02:03.500000+00:00",
                 exptime=30.0, filter="Ha", object="M 42", masters="bias=b.fits; flat=f.fits",
                 matrix=(1.0, 0.0, 2.5, 0.0, 1.0, -1.5), dx=2.5, dy=-1.5, rotation=0.0, scale=1.0, inliers=50,
                 residual=0.05, stars=120, fwhm=2.9, ellipticity=0.1, background=1000.0, noise=12.0,
                 weight=0.8, verdict="accepted", state="removed", reason="removed on request",
                 reference=True),
        FrameRow(seq=2, file="bé.fits", verdict="rejected", reason="no stars found", state="rejected"),
    ]
    hdu = frames_hdu(rows)
    buffer = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(buffer)
    buffer.seek(0)
    with fits.open(buffer) as hdul:
        back = read_frames(hdul["FRAMES"])
        assert hdul["FRAMES"].header["NREMOVED"] == 1
    assert back[0] == rows[0]
    assert back[1].file == "b\\xe9.fits"  # FITS text is ASCII
    assert back[1].matrix is None and back[1].inliers is None and back[1].weight is None
    text = frames_csv(rows).decode()
    assert "bé.fits" in text and text.splitlines()[0].startswith("seq,file,hash,date_obs")
    empty = frames_hdu([])
    assert empty.header["NFRAMES"] == 0 and len(empty.columns) == len(COLUMNS)


def test_an_unknown_state_is_refused() -> None:
    with pytest.raises(ValueError, match="state must be one of"):
        FrameRow(seq=1, file="a.fits", state="gone")
