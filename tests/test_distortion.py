"""Distortion-aware registration: a simulated wide field through a barrel lens, dithered far.

The stars' sharpness in the stack is measured independently of the code under test: a circular Gaussian
fitted by photutils at the stars' true positions (the simulator's), in the corners and at the centre.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from photutils.psf import fit_fwhm

from livestack.cli import main
from livestack.clients.tui.model import Dashboard
from livestack.config import Config
from livestack.errors import FrameError
from livestack.live.reports import frame_event
from livestack.pipeline import FrameResult, Stacker, distortion_from_facts, frame_facts
from livestack.simulate import SimConfig, field_stars, render_frame, simulate, true_matrix
from livestack.stages.align import DISTORTION_ORDER, AlignParams, Distortion, Transform, align
from livestack.stages.detect import Stars, detect
from livestack.stages.provenance import FrameRow, frames_hdu, read_frames
from livestack.stages.warp import INTERPOLATIONS, dense_map, warp

#: A wide field: 1% barrel distortion at the corners, dithers of up to 150 px in x and y.
WIDE = SimConfig(frames=8, size=(1200, 900), seed=5, n_stars=2500, fwhm=3.0, drift=(0.0, 0.0),
                 rotation_per_frame=0.0, dither=250.0, barrel=0.01, hot_pixels=0)
#: A narrow field: no distortion, small dithers.
NARROW = SimConfig(frames=5, size=(640, 480), seed=6, n_stars=600, fwhm=3.0, drift=(0.0, 0.0),
                   rotation_per_frame=0.0, dither=20.0, hot_pixels=0)


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return simulate(tmp_path_factory.mktemp("wide"), WIDE, sleep=lambda _s: None)


def _stack(paths: list[Path], distortion: str, workdir: Path) -> tuple[np.ndarray, list[FrameResult]]:
    config = Config().with_overrides({"align.distortion": distortion, "stack.method": "mean",
                                      "calibration.defects": "off"})
    stacker = Stacker(config, workdir=workdir)
    results = [stacker.process(p) for p in paths]
    image = stacker.result()
    assert image is not None
    stacker.discard()
    return image, results


def _fwhm(image: np.ndarray, sim: SimConfig, inner: float, outer: float) -> np.ndarray:
    """FWHM of isolated, well-exposed stars whose distance from the centre is in [inner, outer) x r_corner."""
    stars = field_stars(sim, 0)  # where the reference frame (the stack's grid) sees them
    rows, cols = image.shape[:2]
    centre = np.array([(cols - 1) / 2.0, (rows - 1) / 2.0])
    xy = np.column_stack([stars.x, stars.y])
    radius = np.hypot(*(xy - centre).T) / np.hypot(*centre)
    # Isolated: no star with a tenth of its flux within 12 px.
    distance = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    crowded = ((distance < 12.0) & (stars.flux[None, :] > 0.1 * stars.flux[:, None])).sum(axis=1) > 1
    chosen = ((radius >= inner) & (radius < outer) & ~crowded & (stars.flux > 4e3) & (stars.flux < 6e5)
              & (xy[:, 0] > 12) & (xy[:, 0] < cols - 13) & (xy[:, 1] > 12) & (xy[:, 1] < rows - 13))
    widths = []
    for x, y in xy[chosen]:
        ix, iy = round(float(x)), round(float(y))
        cut = image[iy - 10:iy + 11, ix - 10:ix + 11].astype(np.float64)
        if not np.isfinite(cut).all():
            continue
        border = np.concatenate([cut[0], cut[-1], cut[1:-1, 0], cut[1:-1, -1]])
        with warnings.catch_warnings():
            # The fitter's notes on its convergence are not the subject here.
            warnings.simplefilter("ignore")
            widths.append(float(fit_fwhm(cut - np.median(border), xypos=[(x - ix + 10, y - iy + 10)],
                                         fit_shape=9, fwhm=3.0)[0]))
    return np.asarray(widths)


def test_wide_field_corners_stay_sharp_with_distortion_on_and_blur_without(wide: list[Path],
                                                                           tmp_path: Path) -> None:
    on, on_results = _stack(wide, "on", tmp_path / "on")
    off, off_results = _stack(wide, "off", tmp_path / "off")
    assert all(r.accepted for r in on_results + off_results), [r.reason for r in on_results + off_results]
    centre_on, corner_on = np.median(_fwhm(on, WIDE, 0.0, 0.3)), np.median(_fwhm(on, WIDE, 0.75, 1.0))
    centre_off, corner_off = np.median(_fwhm(off, WIDE, 0.0, 0.3)), np.median(_fwhm(off, WIDE, 0.75, 1.0))
    # Measured: on 3.30 px at the centre and 3.29 in the corners; off 3.37 and 3.47.
    assert corner_on <= 1.1 * centre_on
    # Measurably worse without: the corners blur (by ~5% here; the median of ~40 stars' fits is good to
    # ~1%), relative to the corrected stack and to the uncorrected centre.
    assert corner_off > 1.03 * corner_on
    assert corner_off / centre_off > corner_on / centre_on + 0.02

    # The residuals before and after, in each frame's result and event.
    for result in on_results[1:]:
        t = result.transform
        assert t is not None and t.distortion is not None
        assert t.rms_before is not None and t.rms_after is not None
        assert t.rms_after == t.rms and t.rms_after < t.rms_before
        event = frame_event(1, Path(result.path), "accepted", result, 0.1, 1)
        published = event.payload["transform"]
        assert published["distortion"] is True
        # Where frame stats are shown: the dashboard's rms column, without > with.
        dashboard = Dashboard()
        dashboard.apply(event)
        assert dashboard.rows()[0].rms == f"{t.rms_before:.2f}>{t.rms_after:.2f}"
        assert published["rms_before"] == pytest.approx(t.rms_before)
        assert published["rms_after"] == pytest.approx(t.rms_after)
    ratios = [r.transform.rms_after / r.transform.rms_before for r in on_results[1:] if r.transform]
    assert np.median(ratios) < 0.5
    assert all(r.transform is not None and r.transform.distortion is None and r.transform.rms_before is None
               for r in off_results)


def test_journaled_correction_warps_again_to_the_same_bits(wide: list[Path], tmp_path: Path) -> None:
    """Restack and removal re-warp from the journal's facts (JSON): the stack comes out bit for bit."""
    config = Config().with_overrides({"align.distortion": "auto", "stack.method": "kappa-sigma",
                                      "calibration.defects": "off"})
    frames = wide[:5]
    live = Stacker(config, workdir=tmp_path)
    results = [live.process(p) for p in frames]
    assert all(r.accepted for r in results)
    assert sum(r.transform is not None and r.transform.distortion is not None for r in results) == 4
    expected = live.result()
    facts = [json.loads(json.dumps(frame_facts(r), allow_nan=False)) for r in results]
    assert all(f["distortion"] is not None and f["residual_after"] < f["residual_before"] for f in facts[1:])
    # The FRAMES table of a snapshot shows them too.
    table = read_frames(frames_hdu([FrameRow.from_facts(i, "", "accepted", None, f)
                                    for i, f in enumerate(facts, start=1)]))
    assert [row.distortion for row in table] == [False, True, True, True, True]
    assert all(row.residual_after is not None and row.residual_before is not None
               and row.residual_after < row.residual_before for row in table[1:])

    def replay(strip: bool) -> np.ndarray:
        again = Stacker(config, workdir=tmp_path)
        assert again.use_reference(frames[0]) is None
        for path, fact in zip(frames, facts, strict=True):
            fact = {**fact, "distortion": None} if strip else fact
            again.add_known(path, fact["matrix"], fact["weight"], fact)
        image = again.result()
        assert image is not None
        again.discard()
        return image

    assert expected is not None
    assert replay(strip=False).tobytes() == expected.tobytes()
    # Without the journaled correction the same matrices give another stack: the facts carry the warp.
    assert replay(strip=True).tobytes() != expected.tobytes()
    live.discard()


def test_narrow_undistorted_field_leaves_auto_off(tmp_path: Path) -> None:
    paths = simulate(tmp_path / "narrow", NARROW, sleep=lambda _s: None)
    _, results = _stack(paths, "auto", tmp_path / "work")
    assert all(r.accepted for r in results)
    for result in results[1:]:
        t = result.transform
        assert t is not None
        assert t.distortion is None
        # Evaluated and published all the same: nothing to gain on a field the affine fit maps exactly.
        assert t.rms_before is not None and t.rms_after is not None and t.rms_before < 0.2
    # The batch command's report publishes the same figures.
    report = tmp_path / "report.csv"
    assert main(["stack", *map(str, paths), "-o", str(tmp_path / "out.fits"), "--report", str(report),
                 "--method", "mean", "-q"]) == 0
    with report.open() as handle:
        rows = list(csv.DictReader(handle))[1:]
    assert rows and all(float(r["rms_after"]) <= float(r["rms_before"]) < 0.2 for r in rows)
    assert all(float(r["rms"]) < 0.2 for r in rows)
    # The stars would constrain a correction: "on" fits one; "auto" declined it on the held-out residuals.
    _, forced = _stack(paths, "on", tmp_path / "forced")
    assert all(r.transform is not None and r.transform.distortion is not None for r in forced[1:])


def test_simulated_barrel_moves_corner_stars_in_by_one_percent() -> None:
    straight = field_stars(dataclasses.replace(WIDE, barrel=0.0), 0)
    bent = field_stars(WIDE, 0)
    width, height = WIDE.size
    centre = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
    r_corner = float(np.hypot(*centre))
    before = np.hypot(straight.x - centre[0], straight.y - centre[1])
    # The same stars, matched by flux (unique floats), where both lists have them.
    common, i, j = np.intersect1d(straight.flux, bent.flux, return_indices=True)
    assert common.size > 1000
    after = np.hypot(bent.x[j] - centre[0], bent.y[j] - centre[1])
    expected = before[i] * (1.0 - 0.01 * (before[i] / r_corner) ** 2)
    np.testing.assert_allclose(after, expected, atol=1e-9)
    near_corner = (before[i] > 0.98 * r_corner) & (before[i] <= r_corner)
    assert near_corner.any()
    np.testing.assert_allclose((before[i] - after)[near_corner] / before[i][near_corner], 0.01, atol=5e-4)


def test_dense_map_is_the_affine_inverse_plus_the_polynomial() -> None:
    """The compiled map against numpy's evaluation of the same numbers, and the warp against warpAffine."""
    rng = np.random.default_rng(2)
    shape = (90, 130)
    matrix = np.array([[0.999, -0.02, 5.5], [0.02, 0.999, -3.25]])
    order = DISTORTION_ORDER
    count = len(Distortion.terms(order))
    bent = Distortion(centre=(64.5, 44.5), scale=80.0, order=order,
                      coeffs_x=tuple(rng.normal(0, 0.5, count)), coeffs_y=tuple(rng.normal(0, 0.5, count)))
    map_x, map_y, footprint = dense_map(matrix, bent, shape, shape)
    gy, gx = np.mgrid[0:shape[0], 0:shape[1]]
    points = np.column_stack([gx.ravel(), gy.ravel()]).astype(np.float64)
    inverse = np.linalg.inv(matrix[:, :2])
    expected = (points - matrix[:, 2]) @ inverse.T + bent.correction(points)
    assert map_x.dtype == np.float32
    np.testing.assert_allclose(map_x.ravel(), expected[:, 0], atol=1e-4)
    np.testing.assert_allclose(map_y.ravel(), expected[:, 1], atol=1e-4)
    inside = ((expected[:, 0] >= 1 / 32) & (expected[:, 0] <= shape[1] - 1 - 1 / 32)
              & (expected[:, 1] >= 1 / 32) & (expected[:, 1] <= shape[0] - 1 - 1 / 32))
    assert np.array_equal(footprint.ravel(), inside)

    # A zero correction warps as the affine warp does, footprint included (OpenCV rounds positions to 1/32 px
    # in both, not always to the same 32nd: a smooth image keeps that difference small).
    image = (1000.0 + 100.0 * np.sin(gx / 7.0) * np.cos(gy / 5.0)).astype(np.float32)
    flat = Distortion(centre=(64.5, 44.5), scale=80.0, order=order, coeffs_x=(0.0,) * count,
                      coeffs_y=(0.0,) * count)
    for interpolation in INTERPOLATIONS:
        plain, plain_fp = warp(image, matrix, shape, interpolation)
        mapped, mapped_fp = warp(image, matrix, shape, interpolation, flat)
        if interpolation == "bicubic":
            # The affine bicubic here is the two-pass kernel, whose footprint margin along rows is wider by
            # twice the shear (0.04 px): at most the last pixel of a row's end is left out, never one added.
            assert not (plain_fp & ~mapped_fp).any()
            lost = mapped_fp & ~plain_fp
            assert (lost.sum(axis=1) <= 2).all()
            ys, xs = np.nonzero(lost)
            assert all(not plain_fp[y, max(x - 1, 0)] or not plain_fp[y, min(x + 1, shape[1] - 1)]
                       for y, x in zip(ys, xs, strict=True))
        else:
            assert np.array_equal(plain_fp, mapped_fp), interpolation
        np.testing.assert_allclose(mapped[plain_fp], plain[plain_fp], atol=1.0)
        assert np.isnan(mapped[~mapped_fp]).all()
    assert Distortion.from_json(json.loads(json.dumps(bent.to_json()))) == bent


def test_resuming_from_a_checkpoint_warps_the_rest_as_before(wide: list[Path], tmp_path: Path) -> None:
    """A restart replays the journal's frames after the checkpoint: the same corrections, the same stack."""
    config = Config().with_overrides({"align.distortion": "auto", "stack.method": "kappa-sigma",
                                      "calibration.defects": "off"})
    frames = wide[:6]
    straight = Stacker(config, workdir=tmp_path / "straight")
    results = [straight.process(p) for p in frames]
    assert all(r.accepted for r in results)
    expected = straight.result()
    first = Stacker(config, workdir=tmp_path / "first")
    for path in frames[:3]:
        assert first.process(path).accepted
    arrays, meta = first.checkpoint()
    resumed = Stacker(config, workdir=tmp_path / "resumed")
    resumed.restore({k: np.array(v) for k, v in arrays.items()}, json.loads(json.dumps(meta)))
    replayed = [resumed.process(p) for p in frames[3:]]
    for before, after in zip(results[3:], replayed, strict=True):
        assert before.transform is not None and after.transform is not None
        assert after.transform.distortion is not None
        assert after.transform.distortion == before.transform.distortion
    image = resumed.result()
    assert expected is not None and image is not None
    assert image.tobytes() == expected.tobytes()
    for stacker in (straight, first, resumed):
        stacker.discard()


def test_a_journaled_correction_that_cannot_be_read_is_a_frame_error() -> None:
    assert distortion_from_facts({"distortion": None}) is None
    assert distortion_from_facts(None) is None
    for broken in ({"centre": [1.0, 2.0]}, {"centre": [1.0, 2.0], "scale": 10.0, "order": 3, "x": [0.0],
                                            "y": [0.0]}, {"centre": [0, 0], "scale": -1.0, "order": 1,
                                                          "x": [0.0] * 3, "y": [0.0] * 3}):
        with pytest.raises(FrameError, match="journaled distortion correction cannot be read"):
            distortion_from_facts({"distortion": broken})


def test_removing_a_corrected_frame_from_a_mean_takes_out_what_was_put_in(wide: list[Path],
                                                                          tmp_path: Path) -> None:
    """``subtract_known`` re-warps with the journaled correction: the mean of the others is left."""
    config = Config().with_overrides({"align.distortion": "on", "stack.method": "mean",
                                      "calibration.defects": "off"})
    frames = wide[:4]
    live = Stacker(config, workdir=tmp_path)
    results = [live.process(p) for p in frames]
    assert all(r.accepted and r.transform is not None for r in results)
    fact = json.loads(json.dumps(frame_facts(results[2]), allow_nan=False))
    assert fact["distortion"] is not None
    live.subtract_known(frames[2], fact["matrix"], fact["weight"], fact)
    fresh = Stacker(config, workdir=tmp_path)
    for path in (frames[0], frames[1], frames[3]):
        assert fresh.process(path).accepted
    left, expected = live.result(), fresh.result()
    assert left is not None and expected is not None
    np.testing.assert_array_equal(np.isnan(left), np.isnan(expected))
    np.testing.assert_allclose(left, expected, rtol=1e-5, atol=1e-2)


def test_fitted_map_follows_the_true_bent_mapping_over_the_frame() -> None:
    """Where each reference pixel lies in a dithered frame, from the simulator's geometry, against the fit."""
    reference = render_frame(WIDE, 0)
    ref_stars = detect(reference.data.astype(np.float32))[0]
    width, height = WIDE.size
    centre = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
    corner_sq = float(np.sum(centre**2))

    def bend(xy: np.ndarray) -> np.ndarray:
        offset = xy - centre
        return centre + offset * (1.0 - WIDE.barrel * np.sum(offset**2, axis=1) / corner_sq)[:, None]

    def unbend(xy: np.ndarray) -> np.ndarray:
        straight = xy.copy()
        for _ in range(50):  # a fixed point: the bend is a 1% change at most
            offset = straight - centre
            factor = 1.0 - WIDE.barrel * np.sum(offset**2, axis=1) / corner_sq
            straight = centre + (xy - centre) / factor[:, None]
        return straight

    gx, gy = np.meshgrid(np.linspace(0, width - 1, 41), np.linspace(0, height - 1, 31))
    grid = np.column_stack([gx.ravel(), gy.ravel()])
    errors = {}
    for index in (1, 2, 3):
        frame = render_frame(WIDE, index)
        stars = detect(frame.data.astype(np.float32))[0]
        truth = true_matrix(WIDE, index)  # frame (undistorted) -> reference (undistorted)
        sky = unbend(grid)
        seen = bend((sky - truth[:, 2]) @ np.linalg.inv(truth[:, :2]).T)
        inside = ((seen[:, 0] > 10) & (seen[:, 0] < width - 11)
                  & (seen[:, 1] > 10) & (seen[:, 1] < height - 11))
        for mode in ("on", "off"):
            found = align(ref_stars, stars, params=AlignParams(distortion=mode)).transform
            assert found is not None
            miss = found.frame_position(grid[inside]) - seen[inside]
            errors[(index, mode)] = float(np.sqrt(np.mean(np.sum(miss**2, axis=1))))
    # With the correction the map is right to about a tenth of a pixel over the whole overlap, out to its
    # edges; the affine map alone misses by most of a pixel on these dithers.
    # Measured: 0.02-0.03 px RMS with it, 0.46-0.86 px without.
    assert max(errors[(i, "on")] for i in (1, 2, 3)) < 0.12, errors
    assert min(errors[(i, "off")] for i in (1, 2, 3)) > 0.3, errors


def test_simulate_command_writes_a_dithered_wide_field(tmp_path: Path) -> None:
    out = tmp_path / "wide"
    assert main(["simulate", str(out), "--frames", "3", "--interval", "0", "--size", "320x240", "--seed", "3",
                 "--dither", "60", "--barrel", "0.01"]) == 0
    with (out / "truth.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    expected = SimConfig(frames=3, interval=0.0, size=(320, 240), seed=3, dither=60.0, barrel=0.01)
    for index, row in enumerate(rows):
        dx, dy = render_frame(expected, index).centre_shift
        assert float(row["dx"]) == pytest.approx(dx) and float(row["dy"]) == pytest.approx(dy)
    # Dithered: the offsets are not the steady drift's (at most 60 px on top of it).
    drift = np.array(expected.drift)
    jumps = [np.hypot(float(r["dx"]) + i * drift[0], float(r["dy"]) + i * drift[1])
             for i, r in enumerate(rows)]
    assert jumps[0] == pytest.approx(0.0, abs=1e-9) and all(1.0 < j <= 60.0 * np.sqrt(2) for j in jumps[1:])


def _barrel_star_lists(offset: tuple[float, float], barrel: float = 0.02,
                       seed: int = 11) -> tuple[Stars, Stars, Callable[[np.ndarray], np.ndarray]]:
    """Exact star positions of a reference and a frame shifted by ``offset`` through one barrel lens.

    Returns the two star lists and the true map: where a reference pixel is seen in the frame.
    """
    width, height = 1200, 900
    centre = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
    corner_sq = float(np.sum(centre**2))

    def bend(xy: np.ndarray) -> np.ndarray:
        rel = xy - centre
        return centre + rel * (1.0 - barrel * np.sum(rel**2, axis=1) / corner_sq)[:, None]

    def unbend(xy: np.ndarray) -> np.ndarray:
        straight = xy.copy()
        for _ in range(60):  # a fixed point: the bend is a few percent at most
            straight = straight - (bend(straight) - xy)
        return straight

    rng = np.random.default_rng(seed)
    sky = rng.uniform((-300.0, -300.0), (width + 300.0, height + 300.0), (1500, 2))
    flux = np.geomspace(1e5, 1e3, len(sky))  # brightest first, the same star in both lists

    def stars(xy: np.ndarray) -> Stars:
        keep = (xy[:, 0] >= 0) & (xy[:, 0] < width) & (xy[:, 1] >= 0) & (xy[:, 1] < height)
        xy = xy[keep]
        ones = np.ones(len(xy))
        return Stars(x=xy[:, 0].copy(), y=xy[:, 1].copy(), flux=flux[keep], fwhm=3 * ones, a=ones, b=ones,
                     theta=0 * ones, flags=np.zeros(len(xy), dtype=np.int64), shape=(height, width))

    shift = np.asarray(offset)
    return stars(bend(sky)), stars(bend(sky + shift)), lambda xy: bend(unbend(xy) + shift)


@pytest.mark.parametrize(("offset", "bound"), [((60.0, -40.0), 0.15), ((500.0, 380.0), 0.25)])
def test_correction_is_not_bent_by_its_ridge_on_a_full_or_a_far_dithered_overlap(
        offset: tuple[float, float], bound: float) -> None:
    """Noise-free stars through a 2% barrel: the fitted map is the true one wherever the frame sees the
    reference.

    On a frame dithered far (500 x 380 px of 1200 x 900) the overlap is one corner of the reference; the
    ridge penalty once acted on powers of whole-frame coordinates there, ten times heavier, and bent the map
    by 5 px (and by 0.2-0.7 px on a small dither), though the stars' own residual was small.
    """
    reference, frame, truth = _barrel_star_lists(offset)
    # Guessed as the previous frame's transform would be, to the nearest ten pixels of the dither.
    guess = Transform.from_matrix(np.array([[1.0, 0.0, -round(offset[0], -1) + 7.0],
                                            [0.0, 1.0, -round(offset[1], -1) - 6.0]]), "fast")
    found = align(reference, frame, guess=guess, params=AlignParams(distortion="on")).transform
    assert found is not None and found.distortion is not None
    gx, gy = np.meshgrid(np.arange(0.0, 1200.0, 10.0), np.arange(0.0, 900.0, 10.0))
    grid = np.column_stack([gx.ravel(), gy.ravel()])
    seen = truth(grid)
    inside = (seen[:, 0] >= 0) & (seen[:, 0] <= 1199) & (seen[:, 1] >= 0) & (seen[:, 1] <= 899)
    miss = np.hypot(*(found.frame_position(grid[inside]) - seen[inside]).T)
    # Measured: at most 0.08 px (small dither) and 0.17 px (far dither); 0.23 and 5.2 px with the ridge on
    # whole-frame coordinates at ten times the weight.
    assert float(miss.max()) < bound, float(miss.max())
