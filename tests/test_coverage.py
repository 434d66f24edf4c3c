"""Coverage: the per-pixel COVERAGE extension of every snapshot, the picture cut to the well-covered
rectangle, and ``[output] blank``."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from astropy.io import fits

from livestack.cli import main
from livestack.config import Config
from livestack.pipeline import Stacker
from livestack.simulate import SimConfig, simulate
from livestack.stages.snapshot import coverage_box


@pytest.fixture(scope="module")
def drifting(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight frames drifting 6 px a frame to the right and 3 px up, rotating slowly."""
    folder = tmp_path_factory.mktemp("drift")
    simulate(folder, SimConfig(frames=8, interval=0.0, size=(320, 240), seed=12, drift=(6.0, -3.0),
                               rotation_per_frame=0.1, n_stars=300))
    return folder


def test_every_snapshot_carries_its_coverage_and_the_picture_is_cut_to_the_covered_rectangle(
        drifting: Path, tmp_path: Path) -> None:
    out = tmp_path / "stack.fits"
    assert main(["stack", str(drifting), "-o", str(out), "-q"]) == 0
    stacker = Stacker(Config(), workdir=tmp_path)
    for p in sorted(drifting.glob("sim_*.fits")):
        assert stacker.process(p).accepted
    expected = stacker.coverage()
    assert expected is not None
    with fits.open(out) as hdul:
        data = hdul[0].data
        coverage = hdul["COVERAGE"].data
        assert hdul["COVERAGE"].header["BUNIT"] == "frames"
    assert np.array_equal(coverage, expected)
    assert coverage.max() == 8 and coverage.min() == 0
    assert np.array_equal(np.isnan(data), coverage == 0)  # NaN stays the blank value by default
    r0, r1, c0, c1 = coverage_box(coverage, 0.5)
    assert (coverage[r0:r1, c0:c1] >= 4).all()
    picture = cv2.imread(str(out.with_suffix(".jpg")), cv2.IMREAD_UNCHANGED)
    assert picture.shape[:2] == (r1 - r0, c1 - c0)
    assert picture.shape[0] < 240 and picture.shape[1] < 320  # the ragged edges are cut off
    assert (r1 - r0) * (c1 - c0) > 0.6 * 240 * 320


def test_blank_zero_writes_zeros_where_no_frame_covered(drifting: Path, tmp_path: Path) -> None:
    config = tmp_path / "zero.toml"
    config.write_text('[output]\nblank = "zero"\ncrop_coverage = 0.0\n')
    out = tmp_path / "stack.fits"
    assert main(["stack", str(drifting), "-o", str(out), "-q", "--config", str(config)]) == 0
    with fits.open(out) as hdul:
        data, coverage = hdul[0].data, hdul["COVERAGE"].data
        assert hdul[0].header["BLANKED"] == "zero"
    assert np.isfinite(data).all()
    assert (data[coverage == 0] == 0).all() and (data[coverage > 0] > 0).all()
    # crop_coverage = 0: no cut.
    picture = cv2.imread(str(out.with_suffix(".jpg")), cv2.IMREAD_UNCHANGED)
    assert picture.shape[:2] == (240, 320)


@pytest.mark.parametrize(("angle", "kept"), [(0.0, 0.9), (7.0, 0.65), (30.0, 0.4)])
def test_coverage_box_is_inside_the_well_covered_region_and_large(angle: float, kept: float) -> None:
    rows, cols = 600, 800
    coverage = np.zeros((rows, cols), dtype=np.int32)
    for k in range(10):
        frame = np.zeros((rows, cols), dtype=np.uint8)
        centre = (cols / 2 + 8 * k, rows / 2 - 5 * k)
        box = cv2.boxPoints((centre, (cols * 0.8, rows * 0.8), angle + k * 0.5))
        cv2.fillPoly(frame, [box.astype(np.int32)], 1)
        coverage += frame
    r0, r1, c0, c1 = coverage_box(coverage, 0.5)
    assert (coverage[r0:r1, c0:c1] >= 5).all()
    good = coverage >= 5
    # An axis-aligned rectangle inside a rectangle turned by 7-12 degrees holds at most ~75% of it, by 30-35
    # degrees ~50%: the greedy trim keeps most of that.
    assert (r1 - r0) * (c1 - c0) > kept * good.sum()


def test_coverage_box_of_two_shifted_frames_is_their_overlap() -> None:
    coverage = np.zeros((100, 120), dtype=np.int32)
    coverage[0:80, 0:100] += 1
    coverage[15:95, 12:112] += 1
    assert coverage_box(coverage, 1.0) == (15, 80, 12, 100)
    assert coverage_box(np.zeros((10, 10), dtype=np.int32), 0.5) == (0, 10, 0, 10)
