"""Tests of the simulated camera: geometry truth, sensor, colour, bad frames, files on disk."""

from __future__ import annotations

import csv
import itertools
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from numpy.lib.stride_tricks import sliding_window_view

from livestack.cli import main
from livestack.errors import ConfigError
from livestack.simulate import (
    BIAS,
    CLOUD_SKY_FACTOR,
    SKY_LEVEL,
    SKY_TINT,
    SUBDIR_NAME,
    TRAIL_PEAK,
    TRAIL_SIGMA,
    TRUTH_COLUMNS,
    TRUTH_FILE,
    SimConfig,
    field_stars,
    render_frame,
    render_stars,
    simulate,
    true_matrix,
)

# Small frames keep the file fast; the geometry tests use a frame big enough for a few bright stars.
SMALL = SimConfig(frames=4, size=(96, 64), n_stars=20, seed=7)
GEOMETRY = SimConfig(frames=8, size=(640, 480), n_stars=600, seed=3, drift=(1.5, -1.0),
                     rotation_per_frame=0.5)
MIN_PEAK = 2000.0      # ADU above sky: bright enough for a centroid good to a few hundredths of a pixel
MAX_VALUE = 40000.0    # below saturation, so the profile is intact
ISOLATION = 12.0       # pixels to the nearest other significant peak
WINDOW_SIGMA = 2.0     # Gaussian window of the centroid, pixels


def _no_sleep(seconds: float) -> None:
    """A sleep that returns at once (the tests inject it for the cadence)."""


# ---------------------------------------------------------------------------------------------------------
# Measurement helpers used by the tests (deliberately independent of the simulator's code)


def _peaks(image: np.ndarray, sky: float, threshold: float) -> np.ndarray:
    """``(N, 2)`` row, column of local maxima (5x5) more than ``threshold`` above the sky."""
    local_max = sliding_window_view(np.pad(image, 2, mode="edge"), (5, 5)).max(axis=(2, 3))
    return np.argwhere((image == local_max) & (image - sky > threshold))


def _windowed_centroid(image: np.ndarray, x: float, y: float) -> tuple[float, float]:
    """Iterated Gaussian-windowed centroid with an annulus sky: unbiased for a symmetric profile."""
    rows, cols = np.mgrid[0:image.shape[0], 0:image.shape[1]]
    box = (slice(int(y) - 16, int(y) + 17), slice(int(x) - 16, int(x) + 17))
    patch, rr, cc = image[box], rows[box].astype(float), cols[box].astype(float)
    radius = np.hypot(cc - x, rr - y)
    sky = float(np.median(patch[(radius >= 10) & (radius <= 14)]))
    signal = patch - sky
    for _ in range(30):
        weight = np.exp(-0.5 * ((cc - x) ** 2 + (rr - y) ** 2) / WINDOW_SIGMA**2) * signal
        x, y = float((weight * cc).sum() / weight.sum()), float((weight * rr).sum() / weight.sum())
    return x, y


def _bright_isolated_stars(data: np.ndarray) -> np.ndarray:
    """``(N, 2)`` x, y centroids of bright, unsaturated, isolated stars (hot pixels excluded)."""
    image = data.astype(np.float64)
    sky = float(np.median(image))
    noise = 1.4826 * float(np.median(np.abs(image - sky)))
    peaks = _peaks(image, sky, 10.0 * noise)
    found = []
    for row, col in peaks:
        value = image[row, col] - sky
        if value < MIN_PEAK or image[row, col] > MAX_VALUE:
            continue
        if not (16 <= row < image.shape[0] - 16 and 16 <= col < image.shape[1] - 16):
            continue
        cross = (image[row - 1, col] + image[row + 1, col] + image[row, col - 1] + image[row, col + 1]) / 4
        if cross - sky < 0.3 * value:  # a single hot pixel, not a star
            continue
        others = np.hypot(*(peaks - [row, col]).T)
        if np.sort(others)[1] < ISOLATION:
            continue
        found.append(_windowed_centroid(image, float(col), float(row)))
    return np.array(found).reshape(-1, 2)


def _apply(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ matrix[:, :2].T + matrix[:, 2]


def _matched_errors(matrix: np.ndarray, frame_xy: np.ndarray, reference_xy: np.ndarray) -> np.ndarray:
    """Distance of each mapped frame star to its nearest reference star, for pairs closer than 2 px."""
    mapped = _apply(matrix, frame_xy)
    distance = np.hypot(*(mapped[:, None, :] - reference_xy[None, :, :]).transpose(2, 0, 1)).min(axis=1)
    return distance[distance < 2.0]


def _read_truth(outdir: Path) -> list[dict[str, str]]:
    with open(outdir / TRUTH_FILE, newline="") as handle:
        return list(csv.DictReader(handle))


def _tree(outdir: Path) -> set[str]:
    return {p.relative_to(outdir).as_posix() for p in outdir.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------------------
# render_stars


def test_render_stars_is_the_moffat_profile() -> None:
    fwhm, beta, flux = 3.0, 3.0, 1000.0
    image = render_stars((40, 50), np.array([20.3]), np.array([15.6]), np.array([flux]), fwhm=fwhm, beta=beta)
    alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
    for row, col in [(15, 20), (16, 21), (12, 25)]:
        r2 = (col - 20.3) ** 2 + (row - 15.6) ** 2
        expected = flux * (beta - 1) / (math.pi * alpha**2) * (1 + r2 / alpha**2) ** (-beta)
        assert image[row, col] == pytest.approx(expected, rel=1e-12)
    # Stamp half-width 12 px: most of the flux, and the profile's half maximum at fwhm / 2.
    assert 0.95 * flux < image.sum() < flux


def test_render_stars_is_linear_and_clips_at_the_edges() -> None:
    x, y, flux = np.array([3.2, 30.0, 61.7]), np.array([-2.5, 20.4, 40.9]), np.array([500.0, 800.0, 300.0])
    together = render_stars((44, 60), x, y, flux)
    apart = sum(render_stars((44, 60), x[i:i + 1], y[i:i + 1], flux[i:i + 1]) for i in range(3))
    np.testing.assert_allclose(together, apart, rtol=1e-12, atol=1e-12)
    # A star across the edge is the crop of the same star on a bigger canvas.
    big = render_stars((64, 80), x + 10, y + 10, flux)
    np.testing.assert_allclose(together, big[10:54, 10:70], rtol=1e-12, atol=1e-12)


def test_render_stars_elongation_stretches_along_the_angle() -> None:
    image = render_stars((61, 61), np.array([30.0]), np.array([30.0]), np.array([1e4]), elongation=2.0,
                         angle_deg=90.0)
    assert image[30, 35] < image[35, 30]  # the major axis is along +y (rows)
    np.testing.assert_allclose(image[35, 30], image[25, 30], rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Frames in memory


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    config = SimConfig(frames=3, size=(96, 64), n_stars=20, seed=11, bayer="GRBG", trails=(1,),
                       bad_frames=(2,), write_mode="mixed", chunk_rate=1e9)
    first = simulate(tmp_path / "a", config, sleep=_no_sleep)
    second = simulate(tmp_path / "b", config, sleep=_no_sleep)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert (tmp_path / "a" / TRUTH_FILE).read_bytes() == (tmp_path / "b" / TRUTH_FILE).read_bytes()
    other = render_frame(SimConfig(frames=3, size=(96, 64), n_stars=20, seed=12), 0)
    assert not np.array_equal(other.data, render_frame(config, 0).data)


def test_frame_values_are_read_only_uint16() -> None:
    frame = render_frame(SMALL, 1)
    assert frame.data.dtype == np.uint16 and frame.data.shape == (64, 96)
    assert not frame.data.flags.writeable and not frame.matrix.flags.writeable
    with pytest.raises(TypeError):
        frame.header["OBJECT"] = "changed"  # type: ignore[index]
    # Sky near SKY_LEVEL + BIAS, noise near Poisson of that.
    assert np.median(frame.data) == pytest.approx(SKY_LEVEL + BIAS, rel=0.1)


def test_hot_pixels_stay_on_the_same_sensor_pixels() -> None:
    config = SimConfig(frames=6, size=(320, 240), n_stars=60, seed=5, drift=(3.0, 2.0), bad_frames=(4,))

    def hot(data: np.ndarray) -> set[tuple[int, int]]:
        image = data.astype(np.float64)
        sky = float(np.median(image))
        padded = np.pad(image, 1, mode="edge")
        ring = sliding_window_view(padded, (3, 3)).copy()
        ring[:, :, 1, 1] = -np.inf
        neighbours = ring.max(axis=(2, 3))
        mask = (image - sky > 1000) & (image - sky > 4 * (neighbours - sky))
        return {(int(r), int(c)) for r, c in np.argwhere(mask)}

    first, later, cloudy = (render_frame(config, i) for i in (0, 5, 4))
    assert cloudy.kind == "cloud"
    hot_first = hot(first.data)
    assert len(hot_first) >= 3
    assert hot(later.data) == hot_first == hot(cloudy.data)
    # ... while the stars moved by 5 frames of drift.
    assert not np.allclose(field_stars(config, 5).x[:5], field_stars(config, 0).x[:5])


def test_truth_matrix_maps_star_centroids_onto_the_reference() -> None:
    reference = _bright_isolated_stars(render_frame(GEOMETRY, 0).data)
    frame = render_frame(GEOMETRY, 6)
    np.testing.assert_allclose(true_matrix(GEOMETRY, 0), [[1, 0, 0], [0, 1, 0]], atol=1e-12)
    assert frame.rotation_deg == pytest.approx(-3.0)
    errors = _matched_errors(frame.matrix, _bright_isolated_stars(frame.data), reference)
    assert errors.size >= 6
    assert errors.max() < 0.1


def test_field_stars_follow_the_truth_matrix() -> None:
    first, later = field_stars(GEOMETRY, 0), field_stars(GEOMETRY, 7)
    bright = later.flux > 5000
    mapped = _apply(true_matrix(GEOMETRY, 7), np.column_stack([later.x[bright], later.y[bright]]))
    reference = np.column_stack([first.x, first.y])
    nearest = np.hypot(*(mapped[:, None, :] - reference[None]).transpose(2, 0, 1)).min(axis=1)
    width, height = GEOMETRY.size
    inside = ((mapped[:, 0] > 0) & (mapped[:, 0] < width - 1)
              & (mapped[:, 1] > 0) & (mapped[:, 1] < height - 1))
    assert inside.sum() > 10
    assert nearest[inside].max() < 1e-9


def test_meridian_flip_turns_the_frame_by_180_degrees() -> None:
    config = SimConfig(frames=4, size=GEOMETRY.size, n_stars=GEOMETRY.n_stars, seed=3, drift=(0.0, 0.0),
                       rotation_per_frame=0.0, flip_at=2)
    width, height = config.size
    np.testing.assert_array_equal(true_matrix(config, 1), [[1, 0, 0], [0, 1, 0]])
    flipped = render_frame(config, 2)
    np.testing.assert_array_equal(flipped.matrix, [[-1, 0, width - 1], [0, -1, height - 1]])
    assert flipped.rotation_deg == 180.0
    errors = _matched_errors(flipped.matrix, _bright_isolated_stars(flipped.data),
                             _bright_isolated_stars(render_frame(config, 0).data))
    assert errors.size >= 6 and errors.max() < 0.1
    # With rotation and drift too, the flip adds 180 degrees to the matrix's angle.
    turning = SimConfig(frames=10, flip_at=5, rotation_per_frame=1.0)
    matrix = true_matrix(turning, 7)
    assert math.degrees(math.atan2(matrix[1, 0], matrix[0, 0])) == pytest.approx(-7.0 + 180.0)


@pytest.mark.parametrize("pattern", ["RGGB", "GRBG", "GBRG", "BGGR"])
def test_bayer_sky_is_tinted_per_site_of_the_pattern(pattern: str) -> None:
    config = SimConfig(frames=1, size=(128, 96), n_stars=0, seed=2, bayer=pattern)
    frame = render_frame(config, 0)
    assert frame.header["BAYERPAT"] == pattern
    sites = {(0, 0): pattern[0], (0, 1): pattern[1], (1, 0): pattern[2], (1, 1): pattern[3]}
    for (row, col), colour in sites.items():
        median = float(np.median(frame.data[row::2, col::2]))
        expected = BIAS + SKY_LEVEL * SKY_TINT["RGB".index(colour)]
        assert median == pytest.approx(expected, rel=0.03), (row, col, colour)


def test_a_red_star_is_bright_on_red_sites_and_a_blue_star_on_blue_sites() -> None:
    config = SimConfig(frames=1, size=GEOMETRY.size, n_stars=GEOMETRY.n_stars, seed=2, bayer="RGGB")
    frame, stars = render_frame(config, 0), field_stars(config, 0)
    image = frame.data.astype(np.float64)
    width, height = config.size
    rows, cols = np.mgrid[0:height, 0:width]
    red_site = (rows % 2 == 0) & (cols % 2 == 0)
    blue_site = (rows % 2 == 1) & (cols % 2 == 1)

    def site_flux(x: float, y: float, site: np.ndarray) -> float:
        radius = np.hypot(cols - x, rows - y)
        sky = float(np.median(image[site & (radius >= 10) & (radius <= 14)]))
        return float((image - sky)[site & (radius <= 6)].sum())

    neighbours = np.hypot(stars.x[:, None] - stars.x[None], stars.y[:, None] - stars.y[None])
    np.fill_diagonal(neighbours, np.inf)
    crowded = (neighbours < 14) & (stars.flux[None, :] > 1000)
    usable = ((stars.flux > 1.5e4) & (stars.flux < 4e5) & ~crowded.any(axis=1)
              & (stars.x > 20) & (stars.x < width - 20) & (stars.y > 20) & (stars.y < height - 20))
    assert usable.sum() >= 4
    ratio = stars.rgb[:, 0] / stars.rgb[:, 2]
    red = np.flatnonzero(usable)[np.argmax(ratio[usable])]
    blue = np.flatnonzero(usable)[np.argmin(ratio[usable])]
    assert ratio[red] > 1.3 and ratio[blue] < 1 / 1.3
    for star in (red, blue):
        measured = site_flux(stars.x[star], stars.y[star], red_site) / site_flux(
            stars.x[star], stars.y[star], blue_site)
        assert measured == pytest.approx(ratio[star], rel=0.15)


def test_bad_frames_alternate_cloud_and_wind() -> None:
    config = SimConfig(frames=6, size=(320, 240), n_stars=150, seed=9, bad_frames=(1, 3, 4),
                       wind_frames=(5,), drift=(0.0, 0.0), rotation_per_frame=0.0)
    frames = [render_frame(config, i) for i in range(6)]
    assert [f.kind for f in frames] == ["good", "cloud", "good", "wind", "cloud", "wind"]
    good, cloud, wind = frames[0], frames[1], frames[3]
    good_sky, cloud_sky = np.median(good.data) - BIAS, np.median(cloud.data) - BIAS
    assert cloud_sky == pytest.approx(good_sky * CLOUD_SKY_FACTOR, rel=0.05)
    assert _bright_isolated_stars(cloud.data).size < _bright_isolated_stars(good.data).size / 2
    # Wind: the brightest unsaturated star's second moments are elongated; in a good frame they are round.
    stars = field_stars(config, 3)
    index = int(np.argmax(np.where(stars.flux < 3e5, stars.flux, 0)))
    x, y = round(stars.x[index]), round(stars.y[index])

    def axis_ratio(data: np.ndarray) -> float:
        patch = data[y - 8:y + 9, x - 8:x + 9].astype(float)
        patch = np.clip(patch - np.median(data), 0, None)
        rr, cc = np.mgrid[-8:9, -8:9]
        total = patch.sum()
        mx, my = (patch * cc).sum() / total, (patch * rr).sum() / total
        cov = np.cov(np.vstack([(cc - mx).ravel(), (rr - my).ravel()]), aweights=patch.ravel())
        low, high = np.linalg.eigvalsh(cov)
        return float(np.sqrt(high / low))

    assert axis_ratio(wind.data) > 1.5
    assert axis_ratio(good.data) < 1.2


def test_satellite_trail_is_a_bright_straight_line() -> None:
    base = SimConfig(frames=3, size=(200, 150), n_stars=30, seed=6)
    with_trail = SimConfig(frames=3, size=(200, 150), n_stars=30, seed=6, trails=(2,))
    frame, plain = render_frame(with_trail, 2), render_frame(base, 2)
    assert frame.has_trail and not plain.has_trail and not render_frame(with_trail, 1).has_trail
    difference = frame.data.astype(float) - plain.data.astype(float)
    line = np.argwhere(difference > TRAIL_PEAK / 2).astype(float)
    assert len(line) > 100
    centred = line - line.mean(axis=0)
    minor, major = np.sqrt(np.linalg.eigvalsh(np.cov(centred.T)))
    assert minor < 1.5 * TRAIL_SIGMA  # a few pixels wide ...
    assert major * math.sqrt(12) > 60  # ... and long: it crosses the frame
    np.testing.assert_array_equal(render_frame(with_trail, 1).data, render_frame(base, 1).data)


def test_config_is_checked_once_with_a_readable_message() -> None:
    with pytest.raises(ConfigError, match="bayer"):
        SimConfig(bayer="RGBG")
    with pytest.raises(ConfigError, match="write_mode"):
        SimConfig(write_mode="slow")
    with pytest.raises(ConfigError, match="flip_at"):
        SimConfig(flip_at=0)
    with pytest.raises(ConfigError, match=r"outside frames 0\.\.9"):
        SimConfig(frames=10, trails=(3, 10))
    with pytest.raises(ConfigError, match="frame index 4"):
        render_frame(SMALL, 4)
    # Lists from a CLI become tuples; a naive start is UTC.
    config = SimConfig(bad_frames=[1, 2], size=[64, 48], start=datetime(2024, 1, 1, 20))  # type: ignore[arg-type]
    assert config.bad_frames == (1, 2) and config.size == (64, 48)
    assert config.start.tzinfo is UTC


# ---------------------------------------------------------------------------------------------------------
# Files on disk


def test_written_files_are_fits_with_the_camera_header(tmp_path: Path) -> None:
    config = SimConfig(frames=2, size=(96, 64), n_stars=20, seed=1, interval=30.0, bayer="BGGR",
                       exptime=30.0, filter="L-eXtreme")
    sleeps: list[float] = []
    paths = simulate(tmp_path, config, sleep=sleeps.append)
    assert [p.name for p in paths] == ["sim_0001.fits", "sim_0002.fits"]
    assert sleeps == [30.0]
    for index, path in enumerate(paths):
        raw = fits.getheader(path)
        assert raw["BITPIX"] == 16 and raw["BZERO"] == 32768 and raw["BSCALE"] == 1
        with fits.open(path) as hdul:
            header, data = hdul[0].header, hdul[0].data
            assert data.dtype == np.uint16
            np.testing.assert_array_equal(data, render_frame(config, index).data)
        assert header["IMAGETYP"] == "Light" and header["OBJECT"] == "SIM-FIELD"
        assert header["FILTER"] == "L-eXtreme" and header["EXPTIME"] == 30.0
        assert header["INSTRUME"] == "livestack simulator" and header["BAYERPAT"] == "BGGR"
        start = datetime.fromisoformat(header["DATE-OBS"]).replace(tzinfo=UTC)
        assert start == config.start + timedelta(seconds=30.0 * index)
    assert "BAYERPAT" not in render_frame(SMALL, 0).header


@pytest.mark.parametrize("mode", ["atomic", "chunked", "rename", "mixed"])
def test_each_write_mode_leaves_complete_files_and_no_temporaries(tmp_path: Path, mode: str) -> None:
    config = SimConfig(frames=4, size=(96, 64), n_stars=20, seed=8, write_mode=mode, chunk_rate=4000.0,
                       subdir_every=2)
    seen: list[Path] = []

    def check_whole(path: Path) -> None:
        with fits.open(path) as hdul:  # complete the moment it is announced
            assert hdul[0].data.shape == (64, 96)
        seen.append(path)

    paths = simulate(tmp_path, config, sleep=_no_sleep, on_written=check_whole)
    names = ["sim_0001.fits", f"{SUBDIR_NAME}/sim_0002.fits", "sim_0003.fits", f"{SUBDIR_NAME}/sim_0004.fits"]
    assert paths == seen == [tmp_path / n for n in names]
    assert _tree(tmp_path) == {*names, TRUTH_FILE}
    for index, path in enumerate(paths):
        with fits.open(path) as hdul:
            np.testing.assert_array_equal(hdul[0].data, render_frame(config, index).data)


def test_atomic_and_rename_modes_write_through_a_temporary_name(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import livestack.simulate as module

    moves: list[tuple[str, str]] = []
    real_replace = module.os.replace

    def recording_replace(source: str | Path, target: str | Path) -> None:
        moves.append((Path(source).name, Path(target).name))
        real_replace(source, target)

    monkeypatch.setattr(module.os, "replace", recording_replace)
    config = SimConfig(frames=3, size=(64, 48), n_stars=10, write_mode="mixed", chunk_rate=1e9)
    simulate(tmp_path, config, sleep=_no_sleep)
    frame_moves = [m for m in moves if m[1] != TRUTH_FILE]
    # Frame 0 atomic (hidden temporary), frame 1 chunked (written in place), frame 2 renamed from .part.
    assert frame_moves == [(".sim_0001.fits.tmp", "sim_0001.fits"), ("sim_0003.fits.part", "sim_0003.fits")]
    assert [m for m in moves if m[1] == TRUTH_FILE] == [(f".{TRUTH_FILE}.tmp", TRUTH_FILE)] * 3


def test_chunked_mode_grows_the_file_progressively(tmp_path: Path) -> None:
    rate = 2000.0
    config = SimConfig(frames=1, size=(64, 48), n_stars=10, seed=3, write_mode="chunked", chunk_rate=rate)
    target = tmp_path / "sim_0001.fits"
    sizes: list[int] = []
    durations: list[float] = []
    truth_rows_seen: list[int] = []

    def watching_sleep(seconds: float) -> None:
        sizes.append(target.stat().st_size)
        durations.append(seconds)
        truth_rows_seen.append(len(_read_truth(tmp_path)))

    simulate(tmp_path, config, sleep=watching_sleep)
    final = target.stat().st_size
    assert final % 2880 == 0
    assert sizes[0] == 0 and len(sizes) >= 10
    assert all(b > a for a, b in itertools.pairwise(sizes)) and sizes[-1] < final
    assert sum(durations) == pytest.approx(final / rate)
    assert truth_rows_seen[0] == 1  # the truth is on disk before the frame's first byte


def test_truth_csv_rows_match_the_rendered_frames(tmp_path: Path) -> None:
    config = SimConfig(frames=5, size=(96, 64), n_stars=20, seed=2, flip_at=3, bad_frames=(1, 2),
                       trails=(4,), rotation_per_frame=0.7, subdir_every=3)
    rows_when_written: list[int] = []
    simulate(tmp_path, config, sleep=_no_sleep,
             on_written=lambda path: rows_when_written.append(len(_read_truth(tmp_path))))
    assert rows_when_written == [1, 2, 3, 4, 5]
    with open(tmp_path / TRUTH_FILE, newline="") as handle:
        assert tuple(next(csv.reader(handle))) == TRUTH_COLUMNS
    rows = _read_truth(tmp_path)
    for index, row in enumerate(rows):
        frame = render_frame(config, index)
        assert int(row["index"]) == index and row["file"] == frame.name
        assert (tmp_path / row["file"]).is_file()
        assert row["kind"] == frame.kind and bool(int(row["trail"])) == frame.has_trail
        matrix = [[float(row[k]) for k in ("a", "b", "tx")], [float(row[k]) for k in ("c", "d", "ty")]]
        np.testing.assert_array_equal(matrix, frame.matrix)
        centre = np.array([47.5, 31.5])
        np.testing.assert_allclose([float(row["dx"]), float(row["dy"])],
                                   _apply(frame.matrix, centre[None])[0] - centre, atol=1e-12)
        assert float(row["rotation_deg"]) == pytest.approx(frame.rotation_deg)
    assert [r["kind"] for r in rows] == ["good", "cloud", "wind", "good", "good"]
    assert rows[2]["file"] == f"{SUBDIR_NAME}/sim_0003.fits"
    assert float(rows[3]["rotation_deg"]) == pytest.approx(180.0 - 3 * 0.7)


@pytest.mark.parametrize("option", [("--dither", "inf"), ("--interval", "inf"), ("--interval", "nan"),
                                    ("--fixed-pattern", "inf")])
def test_an_infinite_number_on_the_command_line_is_refused_in_one_sentence(
        option: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sim"
    code = main(["simulate", str(out), "--frames", "2", "--size", "64x48", "--target", "moon", *option])
    message = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and not out.exists()
    assert len(message) == 1 and f"{option[0][2:].replace('-', '_')} must be a finite number" in message[0]


def test_a_barrel_lens_on_a_moon_or_planet_is_refused_not_ignored() -> None:
    for target in ("moon", "planet"):
        with pytest.raises(ConfigError, match=f"barrel bends a star field only, not a {target}"):
            SimConfig(target=target, barrel=0.02)
    assert SimConfig(target="moon", dither=30.0).dither == 30.0  # a dithering mount still moves the Moon
