"""Tests of livestack.stages.snapshot: atomic writes, FITS output, the auto-stretch, the encoders."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from livestack.simulate import render_stars
from livestack.stages.snapshot import (
    TARGET_BACKGROUND,
    StackInfo,
    atomic_write,
    encode_image,
    preview_array,
    preview_bytes,
    stretch,
    write_fits,
    write_preview,
)


def star_field(shape: tuple[int, int] = (300, 400), sky: float = 1000.0, noise: float = 10.0,
               seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = 60
    stars = render_stars(shape, rng.uniform(0, shape[1], n), rng.uniform(0, shape[0], n),
                         10 ** rng.uniform(3.5, 5.5, n))
    return (sky + stars + rng.normal(0.0, noise, shape)).astype(np.float32)


def simple_wcs_header() -> str:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [83.8, -5.4]
    wcs.wcs.crpix = [200.0, 150.0]
    wcs.wcs.cdelt = [-0.0005, 0.0005]
    wcs.wcs.dateobs = "2020-01-01T00:00:00"  # a frame's own time, which must not leak into the stack
    return str(wcs.to_header().tostring())


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# --- atomic_write ---------------------------------------------------------------------------------------

def test_atomic_write_creates_and_replaces_without_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "stack.png"
    atomic_write(target, b"first")
    assert target.read_bytes() == b"first"
    atomic_write(target, b"second, longer")
    assert target.read_bytes() == b"second, longer"
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stack.png"]


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path: Path) -> None:
    target = tmp_path / "a.jpg"
    atomic_write(target, b"x")
    assert target.stat().st_mode & 0o777 == 0o644
    target.chmod(0o600)
    atomic_write(target, b"y")
    assert target.stat().st_mode & 0o777 == 0o600


def test_a_failed_write_leaves_the_old_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "stack.fits"
    atomic_write(target, b"old content")
    seen: list[str] = []

    def crash(fd: int) -> None:
        # The temporary file exists, hidden and in the same folder, when the crash comes.
        seen.extend(leftovers(tmp_path))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, b"new content that never lands")
    monkeypatch.undo()
    assert target.read_bytes() == b"old content"
    assert leftovers(tmp_path) == []
    assert len(seen) == 1 and seen[0].startswith(".stack.fits.")


def test_a_failed_rename_leaves_the_old_file_intact(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "p.png"
    atomic_write(target, b"old")

    def refuse(src: str, dst: str) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(PermissionError):
        atomic_write(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


# --- write_fits -----------------------------------------------------------------------------------------

def test_mono_fits_round_trip(tmp_path: Path) -> None:
    image = star_field((30, 40))
    image[0, :5] = np.nan
    info = StackInfo(ncombine=12, exptime=120.0, date_obs=datetime(2024, 5, 1, 22, 0, 0, tzinfo=UTC),
                     date_end=datetime(2024, 5, 1, 22, 2, 10, 500000, tzinfo=UTC), method="kappa-sigma",
                     object="M 27", filter="OIII", reference="/night/frames/light_0001.fits")
    path = tmp_path / "stack.fits"
    write_fits(path, image, info)
    with fits.open(path) as hdul:
        data = hdul[0].data
        header = hdul[0].header
        assert data.dtype == np.dtype(">f4")
        np.testing.assert_array_equal(data, image)  # NaN in the same places too
        assert header["NCOMBINE"] == 12
        assert header["EXPTIME"] == 120.0
        assert header["DATE-OBS"] == "2024-05-01T22:00:00.000"
        assert header["DATE-END"] == "2024-05-01T22:02:10.500"
        assert header["STACKMET"] == "kappa-sigma"
        assert header["OBJECT"] == "M 27"
        assert header["FILTER"] == "OIII"
        assert header["CREATOR"] == "livestack"
        assert header["REFFRAME"] == "light_0001.fits"
        assert "CTYPE1" not in header and "CHANORD" not in header
    assert leftovers(tmp_path) == []


def test_colour_fits_is_a_three_plane_cube_with_wcs(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    image = rng.normal(100.0, 5.0, (20, 30, 3)).astype(np.float32)
    info = StackInfo(ncombine=3, exptime=30.0, date_obs=None, date_end=None, method="mean",
                     wcs_header=simple_wcs_header())
    path = tmp_path / "colour.fits"
    write_fits(path, image, info)
    with fits.open(path) as hdul:
        header = hdul[0].header
        data = hdul[0].data
        assert data.shape == (3, 20, 30)
        for channel in range(3):
            np.testing.assert_array_equal(data[channel], image[..., channel])
        assert header["CHANORD"] == "RGB"
        assert header["CTYPE1"] == "RA---TAN"
        # The WCS block's DATE-OBS is the reference frame's time, not the stack's: left out.
        assert "DATE-OBS" not in header and "DATE-END" not in header
        wcs = WCS(header, naxis=2)
        assert wcs.has_celestial
        np.testing.assert_allclose(wcs.wcs.crval, [83.8, -5.4])


def test_write_fits_rejects_other_shapes(tmp_path: Path) -> None:
    info = StackInfo(ncombine=1, exptime=1.0, date_obs=None, date_end=None, method="mean")
    with pytest.raises(ValueError, match=r"must be \(H, W\) or \(H, W, 3\)"):
        write_fits(tmp_path / "x.fits", np.zeros((4, 4, 2), dtype=np.float32), info)
    assert not (tmp_path / "x.fits").exists()


# --- stretch --------------------------------------------------------------------------------------------

def test_stretch_puts_the_sky_in_the_target_band_and_keeps_stars_bright() -> None:
    image = star_field()
    out = stretch(image)
    assert out.dtype == np.uint8 and out.shape == image.shape
    sky = float(np.median(out))
    assert 0.1 * 255 <= sky <= 0.25 * 255
    assert abs(sky - TARGET_BACKGROUND * 255) < 6
    assert out.max() >= 250  # the brightest star reaches white
    brightest = np.unravel_index(np.argmax(image), image.shape)
    assert out[brightest] == out.max()
    # The sky's noise stays visible: not crushed to one level, not clipped to black.
    assert np.percentile(out, 1) > 0
    assert np.std(out[out < np.percentile(out, 90)]) > 2


def test_stretch_does_not_depend_on_sky_level_or_gain() -> None:
    image = star_field()
    np.testing.assert_allclose(stretch(image).astype(int), stretch(image * 7.5 + 300.0).astype(int), atol=1)


def test_stretch_turns_nan_to_black() -> None:
    image = star_field()
    image[:20, :] = np.nan
    out = stretch(image)
    assert (out[:20] == 0).all()
    assert np.median(out[20:]) > 20


def test_stretch_neutralises_the_sky_of_a_colour_image() -> None:
    mono = star_field()
    rng = np.random.default_rng(11)
    # A green sky glow and a noisier blue channel: the stretched sky must still be grey.
    rgb = np.dstack([mono * 0.8 + 100.0, mono * 1.0 + 900.0,
                     mono * 1.4 - 500.0 + rng.normal(0, 20.0, mono.shape)]).astype(np.float32)
    out = stretch(rgb)
    assert out.shape == rgb.shape
    sky = np.median(out.reshape(-1, 3), axis=0)
    assert np.ptp(sky) <= 3
    assert 0.1 * 255 <= sky.mean() <= 0.25 * 255


def test_stretch_survives_flat_and_empty_images() -> None:
    assert (stretch(np.full((10, 10), 5.0, dtype=np.float32)) >= 0).all()
    assert (stretch(np.full((10, 10), np.nan, dtype=np.float32)) == 0).all()
    with pytest.raises(ValueError, match="can be stretched"):
        stretch(np.zeros(5, dtype=np.float32))


# --- encoding and previews ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_encoded_colour_keeps_its_colour_order(fmt: str) -> None:
    red = np.zeros((24, 32, 3), dtype=np.uint8)
    red[..., 0] = 220
    decoded = cv2.imdecode(np.frombuffer(encode_image(red, fmt), np.uint8), cv2.IMREAD_COLOR)
    assert decoded is not None
    assert decoded.shape == (24, 32, 3)
    rgb = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    assert np.all(np.abs(rgb[..., 0].astype(int) - 220) <= 3)
    assert rgb[..., 1].max() <= 3 and rgb[..., 2].max() <= 3


def test_png_is_lossless_and_grey_stays_single_channel() -> None:
    grey = np.random.default_rng(1).integers(0, 256, (17, 23), dtype=np.uint8)
    decoded = cv2.imdecode(np.frombuffer(encode_image(grey, "png"), np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(decoded, grey)


def test_encode_rejects_unknown_format_and_dtype() -> None:
    with pytest.raises(ValueError, match="not one of png, jpeg"):
        encode_image(np.zeros((4, 4), np.uint8), "tiff")
    with pytest.raises(ValueError, match="uint8"):
        encode_image(np.zeros((4, 4), np.float32), "png")


@pytest.mark.parametrize("name", ["preview.png", "preview.jpg", "preview.JPEG"])
def test_write_preview_by_suffix(tmp_path: Path, name: str) -> None:
    image = star_field((60, 80))
    path = tmp_path / name
    write_preview(path, image)
    decoded = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert decoded is not None and decoded.shape == (60, 80)
    assert abs(float(np.median(decoded)) - TARGET_BACKGROUND * 255) < 8
    assert leftovers(tmp_path) == []


def test_write_preview_rejects_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"must end in one of \.png, \.jpg, \.jpeg"):
        write_preview(tmp_path / "preview.tif", star_field((10, 10)))
    assert list(tmp_path.iterdir()) == []


def test_preview_array_is_small_and_stretched() -> None:
    image = star_field((300, 400))
    small = preview_array(image, max_side=160)
    assert small.dtype == np.uint8 and small.shape == (120, 160)
    assert 0.1 * 255 <= np.median(small) <= 0.3 * 255
    rgb = np.dstack([image] * 3)
    assert preview_array(rgb, max_side=100).shape == (75, 100, 3)
    assert preview_array(image[:50, :60], max_side=160).shape == (50, 60)  # never enlarged


def test_preview_bytes_is_a_small_jpeg() -> None:
    data = preview_bytes(star_field((300, 400)), max_size=100)
    assert data[:2] == b"\xff\xd8"
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded is not None and decoded.shape == (75, 100)


def test_flatten_background_needs_under_three_images_of_memory_beside_its_input() -> None:
    import tracemalloc

    from livestack.stages.snapshot import flatten_background

    rng = np.random.default_rng(8)
    image = rng.normal(1000.0, 5.0, (1200, 1600)).astype(np.float32)
    image[:100, :200] = np.nan
    tracemalloc.start()
    try:
        flat = flatten_background(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.isnan(flat[:100, :200]).all() and np.isfinite(flat[100:]).all()
    # The output, the filled copy (which then takes the scaled-up model) and masks; no whole-image temporaries
    # for the subtraction (4.3 images before).
    assert peak < 3.0 * image.nbytes, peak / image.nbytes


def test_flatten_background_removes_a_gradient_but_keeps_stars() -> None:
    from livestack.simulate import render_stars
    from livestack.stages.snapshot import flatten_background

    rng = np.random.default_rng(4)
    rows, cols = 600, 800
    yy, xx = np.mgrid[0:rows, 0:cols]
    gradient = 1000.0 + 0.8 * xx + 0.3 * yy
    x, y = rng.uniform(20, cols - 20, 150), rng.uniform(20, rows - 20, 150)
    stars = render_stars((rows, cols), x, y, rng.uniform(2e3, 2e4, 150))
    image = (gradient + stars + rng.normal(0, 5, (rows, cols))).astype(np.float32)
    image[:40, :60] = np.nan  # an uncovered corner stays uncovered
    flat = flatten_background(image)
    assert flat.shape == image.shape and flat.dtype == np.float32
    assert np.isnan(flat[:40, :60]).all()
    sky = flat[np.isfinite(flat) & (stars < 1.0)]
    # The raw sky spans ~900 counts corner to corner; flattened, quadrants agree to within the noise.
    quadrants = [np.median(q[np.isfinite(q) & (s < 1.0)]) for q, s in (
        (flat[:300, :400], stars[:300, :400]), (flat[300:, 400:], stars[300:, 400:]),
        (flat[:300, 400:], stars[:300, 400:]), (flat[300:, :400], stars[300:, :400]))]
    assert max(quadrants) - min(quadrants) < 5.0, quadrants
    assert 1.4826 * np.median(np.abs(sky - np.median(sky))) < 6.0
    bright = stars > 200
    assert np.allclose((flat - np.median(sky))[bright], stars[bright], rtol=0.05, atol=25.0)
    colour = flatten_background(np.dstack([image, image * 0.5, image * 2.0]))
    assert colour.shape == (rows, cols, 3)
