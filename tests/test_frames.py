"""Tests of livestack.stages.frames: FITS reading, metadata, Bayer patterns, debayering, rejections."""

from __future__ import annotations

import gzip
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from livestack.errors import FrameError
from livestack.stages.frames import BAYER_PATTERNS, FITS_SUFFIXES, debayer, read_frame, read_meta

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real frames not found at {DATA}")

COLOUR_VALUES = {"R": 1000.0, "G": 2000.0, "B": 3000.0}


def write(path: Path, data: np.ndarray, **cards: object) -> Path:
    hdu = fits.PrimaryHDU(data)
    for key, value in cards.items():
        hdu.header[key.replace("_", "-")] = value
    hdu.writeto(path)
    return path


def mosaic_of(pattern: str, shape: tuple[int, int] = (8, 10)) -> np.ndarray:
    """A mosaic whose R, G, B sites hold distinct constants, laid out as ``pattern`` from [0, 0]."""
    out = np.zeros(shape, dtype=np.float32)
    for (dr, dc), colour in zip(((0, 0), (0, 1), (1, 0), (1, 1)), pattern, strict=True):
        out[dr::2, dc::2] = COLOUR_VALUES[colour]
    return out


def site_colours(rgb: np.ndarray) -> str:
    """The pattern a debayered image implies: which channel is brightest at each of a 2x2 block's sites."""
    # Interior block only: border pixels are extrapolated.
    names = "RGB"
    return "".join(names[int(np.argmax(rgb[r, c] * np.array([1.0, 0.5, 1 / 3])))] for r, c in
                   ((2, 2), (2, 3), (3, 2), (3, 3)))


# --- pixel values ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("dtype", "values"),
    [
        (np.uint8, [0, 1, 128, 255]),
        (np.int16, [-32768, -1, 0, 32767]),
        (np.uint16, [0, 1, 32768, 65535]),
        (np.int32, [-(2**24), -1, 0, 2**24]),
        (np.uint32, [0, 1, 2**24 - 1, 2**24]),
        (np.float32, [-1.5, 0.0, 3.25, 1e30]),
        (np.float64, [-1.5, 0.0, 3.25, 1e30]),
    ],
)
def test_pixel_values_round_trip_exactly(tmp_path: Path, dtype: type, values: list[float]) -> None:
    data: np.ndarray = np.array(values * 6, dtype=dtype).reshape(4, 6)
    path = write(tmp_path / "f.fits", data)  # astropy writes uint16/uint32 with BZERO 2**15 / 2**31
    frame = read_frame(path)
    assert frame.data.dtype == np.float32
    assert frame.data.shape == (4, 6)
    np.testing.assert_array_equal(frame.data, data.astype(np.float64).astype(np.float32))
    assert frame.data.flags.c_contiguous
    assert not frame.data.flags.writeable
    assert frame.luminance is frame.data
    assert not frame.is_color


def test_bscale_and_bzero_are_applied(tmp_path: Path) -> None:
    raw = np.arange(12, dtype=np.int16).reshape(3, 4)
    hdu = fits.PrimaryHDU(raw)
    hdu.header["BSCALE"] = 0.5
    hdu.header["BZERO"] = 10.0
    hdu.writeto(tmp_path / "s.fits", output_verify="ignore")
    # astropy would scale on write; check that the file holds raw values and we scale on read.
    with fits.open(tmp_path / "s.fits", do_not_scale_image_data=True) as hdul:
        stored = hdul[0].data.copy()
        bscale, bzero = hdul[0].header["BSCALE"], hdul[0].header["BZERO"]
    frame = read_frame(tmp_path / "s.fits")
    np.testing.assert_allclose(frame.data, stored * bscale + bzero, rtol=0, atol=1e-6)


def test_blank_pixels_become_nan(tmp_path: Path) -> None:
    data = np.full((4, 4), 7, dtype=np.int16)
    data[1, 2] = -999
    path = write(tmp_path / "b.fits", data, BLANK=-999)
    frame = read_frame(path)
    assert np.isnan(frame.data[1, 2])
    assert np.count_nonzero(np.isnan(frame.data)) == 1
    assert frame.data[0, 0] == 7


def test_fpack_and_gzip_files_read_like_plain_ones(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    data = rng.integers(0, 4000, size=(40, 50)).astype(np.uint16)
    plain = write(tmp_path / "p.fits", data, EXPTIME=5.0)
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, compression_type="RICE_1")]).writeto(
        tmp_path / "c.fits.fz")
    with open(plain, "rb") as src, gzip.open(tmp_path / "g.fits.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    for name in ("p.fits", "c.fits.fz", "g.fits.gz"):
        frame = read_frame(tmp_path / name)
        np.testing.assert_array_equal(frame.data, data.astype(np.float32), err_msg=name)
        assert read_meta(tmp_path / name).shape == (40, 50)


def test_suffixes_cover_compressed_variants() -> None:
    assert {".fits", ".fit", ".fts", ".fits.fz", ".fits.gz"} <= set(FITS_SUFFIXES)


def test_arrays_do_not_reference_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "m.fits", np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    frame = read_frame(path)
    resolved = str(path.resolve())
    open_fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                if os.path.exists(f"/proc/self/fd/{fd}")]
    assert resolved not in open_fds
    with open("/proc/self/maps") as maps:
        assert resolved not in maps.read()
    assert frame.data.base is None or not isinstance(frame.data.base, np.memmap)
    os.remove(path)  # the frame outlives its file
    assert float(frame.data[63, 63]) == 64 * 64 - 1


# --- rejections -----------------------------------------------------------------------------------------

def test_empty_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "empty.fits"
    path.touch()
    with pytest.raises(FrameError, match=r"empty\.fits is empty"):
        read_frame(path)


def test_text_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "notes.fits"
    path.write_text("these are not pixels\n" * 200)
    with pytest.raises(FrameError, match=r"notes\.fits cannot be read as a FITS file"):
        read_frame(path)


def test_truncated_file_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "t.fits", np.zeros((100, 100), dtype=np.uint16))
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(FrameError, match=r"t\.fits is truncated"):
        read_frame(path)
    # read_meta needs only the header, which is whole.
    assert read_meta(path).shape == (100, 100)


def test_truncated_fpack_file_is_rejected(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 60000, size=(200, 200)).astype(np.uint16)
    path = tmp_path / "t.fits.fz"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data)]).writeto(path)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) - 20000])
    with pytest.raises(FrameError, match=r"t\.fits\.fz"):
        read_frame(path)


def test_truncated_gzip_file_is_rejected(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 60000, size=(200, 200)).astype(np.uint16)
    plain = write(tmp_path / "p.fits", data)
    packed = gzip.compress(plain.read_bytes())
    path = tmp_path / "t.fits.gz"
    path.write_bytes(packed[: len(packed) * 2 // 3])
    with pytest.raises(FrameError, match=r"t\.fits\.gz"):
        read_frame(path)


def test_cube_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "cube.fits", np.zeros((3, 10, 12), dtype=np.float32))
    with pytest.raises(FrameError, match=r"cube\.fits holds a 3-D image \(NAXIS1\.\.3 = 12 x 10 x 3\)"):
        read_frame(path)


def test_degenerate_third_axis_is_a_2d_image(tmp_path: Path) -> None:
    path = write(tmp_path / "flat3.fits", np.ones((1, 10, 12), dtype=np.float32))
    assert read_frame(path).data.shape == (10, 12)


def test_all_nan_image_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "nan.fits", np.full((8, 8), np.nan, dtype=np.float32))
    with pytest.raises(FrameError, match=r"nan\.fits has no usable pixel"):
        read_frame(path)


def test_file_without_image_is_rejected(tmp_path: Path) -> None:
    table = fits.BinTableHDU.from_columns([fits.Column(name="x", format="E", array=np.arange(3.0))])
    path = tmp_path / "table.fits"
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(path)
    with pytest.raises(FrameError, match=r"table\.fits has no image HDU"):
        read_frame(path)
    with pytest.raises(FrameError, match="no image HDU"):
        read_meta(path)


def test_unsupported_bitpix_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "b24.fits", np.zeros((4, 4), dtype=np.int16))
    raw = bytearray(path.read_bytes())
    card = raw.index(b"BITPIX  =")
    raw[card:card + 80] = f"{'BITPIX':8}= {24:>20}".ljust(80).encode()
    path.write_bytes(bytes(raw))
    with pytest.raises(FrameError,
                       match=r"b24\.fits cannot be read as a FITS file \(HDU 0: BITPIX = 24 is not"):
        read_frame(path)


def test_missing_file_is_a_frame_error(tmp_path: Path) -> None:
    with pytest.raises(FrameError, match="cannot be opened"):
        read_frame(tmp_path / "gone.fits")


# --- time -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("cards", "expected"),
    [
        ({"DATE-OBS": "2024-03-01T22:10:05.25"}, datetime(2024, 3, 1, 22, 10, 5, 250000, tzinfo=UTC)),
        ({"DATE-OBS": "2024-03-01T22:10:05Z"}, datetime(2024, 3, 1, 22, 10, 5, tzinfo=UTC)),
        ({"DATE-OBS": "2017-12-19T18:33:43.317-0700"},
         datetime(2017, 12, 20, 1, 33, 43, 317000, tzinfo=UTC)),
        ({"DATE-OBS": "2017-12-19T18:33:43+02:00"}, datetime(2017, 12, 19, 16, 33, 43, tzinfo=UTC)),
        ({"DATE-OBS": "2024-03-01T22:10:05.1234567"},
         datetime(2024, 3, 1, 22, 10, 5, 123456, tzinfo=UTC)),
        ({"DATE-OBS": "2024-03-01", "TIME-OBS": "03:04:05.5"},
         datetime(2024, 3, 1, 3, 4, 5, 500000, tzinfo=UTC)),
        ({"DATE-OBS": "05/04/87", "UT": " 9:27:27.00"}, datetime(1987, 4, 5, 9, 27, 27, tzinfo=UTC)),
        ({"DATE-OBS": "2024-03-01", "UT-OBS": "23:59:59"}, datetime(2024, 3, 1, 23, 59, 59, tzinfo=UTC)),
        ({"UT-OBS": "2017-12-20T01:33:43.317-0000"},
         datetime(2017, 12, 20, 1, 33, 43, 317000, tzinfo=UTC)),
        ({"DATE-OBS": "garbage", "MJD-OBS": 60000.5}, datetime(2023, 2, 25, 12, 0, tzinfo=UTC)),
        ({"DATE-OBS": "2024-03-01"}, None),
        ({}, None),
    ],
)
def test_time_parsing(tmp_path: Path, cards: dict[str, object], expected: datetime | None) -> None:
    hdu = fits.PrimaryHDU(np.zeros((2, 2), dtype=np.int16))
    for key, value in cards.items():
        hdu.header[key] = value
    hdu.writeto(tmp_path / "t.fits")
    meta = read_meta(tmp_path / "t.fits")
    assert meta.time_utc == expected
    if expected is not None:
        assert meta.time_utc is not None and meta.time_utc.utcoffset() == timedelta(0)


def test_text_metadata_is_stripped(tmp_path: Path) -> None:
    path = write(tmp_path / "m.fits", np.zeros((2, 3), dtype=np.int16), FILTER=" Ha  ", OBJECT="M 42 ",
                 IMAGETYP="Light Frame", EXPOSURE=30.0)
    meta = read_meta(path)
    assert (meta.filter, meta.object, meta.imagetyp, meta.exptime) == ("Ha", "M 42", "Light Frame", 30.0)
    assert meta.shape == (2, 3)
    assert meta.path == str(path)
    assert meta.wcs_header is None
    assert meta.bayer is None


def test_exptime_is_preferred_to_exposure(tmp_path: Path) -> None:
    path = write(tmp_path / "e.fits", np.zeros((2, 2), dtype=np.int16), EXPTIME=12.5, EXPOSURE=99.0)
    assert read_meta(path).exptime == 12.5


def test_celestial_wcs_is_kept(tmp_path: Path) -> None:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [5.0, 5.0]
    wcs.wcs.cdelt = [-0.001, 0.001]
    hdu = fits.PrimaryHDU(np.zeros((10, 10), dtype=np.float32), header=wcs.to_header())
    hdu.writeto(tmp_path / "w.fits")
    text = read_meta(tmp_path / "w.fits").wcs_header
    assert text is not None
    back = WCS(fits.Header.fromstring(text))
    assert back.has_celestial
    np.testing.assert_allclose(back.wcs.crval, [150.0, 2.0])


# --- Bayer pattern --------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("cards", "shape", "expected"),
    [
        ({"BAYERPAT": "RGGB"}, (8, 10), "RGGB"),
        ({"BAYERPAT": "rggb "}, (8, 10), "RGGB"),
        ({"BAYERPAT": "RGGB", "XBAYROFF": 1}, (8, 10), "GRBG"),
        ({"BAYERPAT": "RGGB", "YBAYROFF": 1}, (8, 10), "GBRG"),
        ({"BAYERPAT": "RGGB", "XBAYROFF": 1, "YBAYROFF": 1}, (8, 10), "BGGR"),
        ({"BAYERPAT": "RGGB", "XBAYROFF": 2, "YBAYROFF": 2}, (8, 10), "RGGB"),
        ({"BAYERPAT": "RGGB", "ROWORDER": "TOP-DOWN"}, (8, 10), "RGGB"),
        ({"BAYERPAT": "RGGB", "ROWORDER": "BOTTOM-UP"}, (8, 10), "GBRG"),
        ({"BAYERPAT": "RGGB", "ROWORDER": "BOTTOM-UP"}, (9, 10), "RGGB"),
        ({"BAYERPAT": "GRBG", "ROWORDER": "BOTTOM-UP", "YBAYROFF": 1}, (8, 10), "GRBG"),
        ({"FILTER": "RGGB"}, (8, 10), "RGGB"),
        ({"COLORTYP": "GBRG"}, (8, 10), "GBRG"),
        ({"FILTER": "Red"}, (8, 10), None),
        ({}, (8, 10), None),
    ],
)
def test_bayer_pattern_from_header(tmp_path: Path, cards: dict[str, object], shape: tuple[int, int],
                                   expected: str | None) -> None:
    path = write(tmp_path / "b.fits", np.zeros(shape, dtype=np.uint16), **cards)
    assert read_meta(path).bayer == expected


def test_configured_pattern_overrides_header(tmp_path: Path) -> None:
    path = write(tmp_path / "b.fits", np.zeros((8, 8), dtype=np.uint16), BAYERPAT="RGGB", XBAYROFF=1)
    assert read_meta(path, bayer_pattern="bggr").bayer == "BGGR"
    assert read_meta(path, bayer_pattern="MONO").bayer is None
    assert read_frame(path, bayer_pattern="mono").data.shape == (8, 8)


def test_bad_patterns_are_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "b.fits", np.zeros((8, 8), dtype=np.uint16), BAYERPAT="XTRANS")
    with pytest.raises(FrameError, match=r"b\.fits has BAYERPAT = 'XTRANS'"):
        read_meta(path)
    good = write(tmp_path / "g.fits", np.zeros((8, 8), dtype=np.uint16))
    with pytest.raises(FrameError, match=r"Bayer pattern 'RGBG' given for .*g\.fits is not one of"):
        read_frame(good, bayer_pattern="RGBG")


@pytest.mark.parametrize("pattern", BAYER_PATTERNS)
def test_debayer_puts_each_colour_in_its_channel(pattern: str) -> None:
    rgb = debayer(mosaic_of(pattern), pattern)
    assert rgb.shape == (8, 10, 3)
    assert rgb.dtype == np.float32
    # A mosaic of constant colour planes is a uniform colour once debayered: every pixel (R, G, B).
    np.testing.assert_array_equal(rgb[1:-1, 1:-1], np.broadcast_to([1000.0, 2000.0, 3000.0], (6, 8, 3)))


def test_debayer_with_the_wrong_pattern_gives_wrong_colours() -> None:
    rgb = debayer(mosaic_of("RGGB"), "BGGR")
    np.testing.assert_array_equal(rgb[3, 3], [3000.0, 2000.0, 1000.0])


def test_debayer_keeps_float_precision() -> None:
    rng = np.random.default_rng(5)
    base = mosaic_of("GRBG", (16, 16)).astype(np.float64)
    mosaic = (base * 1e-3 + rng.normal(0.0, 1e-6, base.shape)).astype(np.float32)  # tiny, non-integer
    rgb = debayer(mosaic, "GRBG")
    np.testing.assert_allclose(rgb[4:-4, 4:-4].mean(axis=(0, 1)), [1.0, 2.0, 3.0], atol=1e-4)
    # Integer data beyond 16 bits also comes back at the right levels.
    wide = mosaic_of("RGGB") * 100.0 - 150000.0
    np.testing.assert_allclose(debayer(wide, "RGGB")[3, 3], [-50000.0, 50000.0, 150000.0], atol=5.0)


def test_debayer_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        debayer(np.zeros((4, 4, 3), dtype=np.float32), "RGGB")
    with pytest.raises(ValueError, match="not one of"):
        debayer(np.zeros((4, 4), dtype=np.float32), "RGBX")


def sixteen_bit_debayer(mosaic: np.ndarray, pattern: str, integral: bool) -> np.ndarray:
    """The documented procedure, step by step in numpy: map onto OpenCV's 16-bit grid, demosaic, map back."""
    import cv2

    work = np.array(mosaic, dtype=np.float32)
    finite = np.isfinite(work)
    lo, hi = (float(work[finite].min()), float(work[finite].max())) if finite.any() else (0.0, 0.0)
    work[~finite] = lo
    if integral and hi - lo <= 65535.0:
        offset, step = (0.0 if lo >= 0.0 and hi <= 65535.0 else lo), 1.0
    else:
        offset, step = lo, ((hi - lo) / 65535.0 if hi > lo else 1.0)
    if offset:
        work -= np.float32(offset)
    if step != 1.0:
        work = np.clip(np.rint(work * np.float32(1.0 / step)), 0.0, 65535.0)
    code = {"RGGB": cv2.COLOR_BayerBG2RGB, "BGGR": cv2.COLOR_BayerRG2RGB, "GRBG": cv2.COLOR_BayerGB2RGB,
            "GBRG": cv2.COLOR_BayerGR2RGB}[pattern]
    rgb = cv2.cvtColor(work.astype(np.uint16), code).astype(np.float32)
    if step != 1.0:
        rgb *= np.float32(step)
    if offset:
        rgb += np.float32(offset)
    return rgb


@pytest.mark.parametrize("pattern", BAYER_PATTERNS)
def test_develop_gives_the_16_bit_procedure_bit_for_bit(pattern: str) -> None:
    from livestack.stages.frames import FrameMeta, RawFrame, develop, develop_data

    rng = np.random.default_rng(21)
    counts = rng.poisson(900.0, (46, 62)).astype(np.float32)
    counts[10, 11] = 65000.0  # a star's core
    calibrated = counts * np.float32(0.93) - np.float32(412.7)  # a dark and a flat applied: not whole numbers
    holes = calibrated.copy()
    holes[3, 4], holes[20, 30], holes[40, 2] = np.nan, np.inf, -np.inf
    halves = counts + np.float32(0.5) * (rng.random(counts.shape) < 0.02)  # defects replaced by medians
    wide = counts * np.float32(40.0) - np.float32(30000.0)  # whole numbers over 16 bits' span
    meta = FrameMeta(path="x.fits", shape=counts.shape, exptime=1.0, filter=None, object=None, time_utc=None,
                     imagetyp=None, bayer=pattern, wcs_header=None)
    for mosaic, integral in ((counts, True), (counts - np.float32(2000.0), True), (wide, True),
                             (calibrated, False), (holes, False), (halves, False)):
        expected = sixteen_bit_debayer(mosaic, pattern, integral)
        frame = develop(RawFrame(meta, mosaic.copy(), integral))
        np.testing.assert_array_equal(frame.data, expected)
        np.testing.assert_array_equal(develop_data(RawFrame(meta, mosaic.copy(), integral)), expected)
    # The mosaic is only read.
    kept = holes.copy()
    develop(RawFrame(meta, kept, False))
    np.testing.assert_array_equal(kept, holes)
    # Unknown integrality (the public function) looks at the values.
    np.testing.assert_array_equal(debayer(counts, pattern), sixteen_bit_debayer(counts, pattern, True))
    np.testing.assert_array_equal(debayer(halves, pattern), sixteen_bit_debayer(halves, pattern, False))
    np.testing.assert_array_equal(debayer(counts.astype(np.uint16), pattern),
                                  sixteen_bit_debayer(counts, pattern, True))
    # Odd sizes, the smallest with a whole neighbourhood inside, and smaller ones; every row parity at the
    # borders.
    for shape in ((45, 61), (3, 3), (3, 8), (7, 3), (2, 9), (1, 1)):
        small = rng.poisson(900.0, shape).astype(np.float32)
        np.testing.assert_array_equal(debayer(small, pattern), sixteen_bit_debayer(small, pattern, True))
        scaled = small * np.float32(1.7) + np.float32(0.3)
        np.testing.assert_array_equal(debayer(scaled, pattern), sixteen_bit_debayer(scaled, pattern, False))


def test_colour_frame_is_debayered_from_the_header_pattern(tmp_path: Path) -> None:
    mosaic = mosaic_of("GBRG", (12, 14)).astype(np.uint16)
    # Written with an odd x offset, the stored pattern at [0, 0] is GBRG from a BAYERPAT of BGGR.
    path = write(tmp_path / "c.fits", mosaic, BAYERPAT="BGGR", XBAYROFF=1)
    frame = read_frame(path)
    assert frame.is_color
    assert frame.meta.bayer == "GBRG"
    assert frame.data.shape == (12, 14, 3)
    assert not frame.data.flags.writeable and not frame.luminance.flags.writeable
    assert frame.data.flags.c_contiguous and frame.luminance.flags.c_contiguous
    np.testing.assert_array_equal(frame.data[5, 6], [1000.0, 2000.0, 3000.0])
    np.testing.assert_allclose(frame.luminance, frame.data.mean(axis=2), rtol=1e-6)


# --- real frames ----------------------------------------------------------------------------------------

def real_frames() -> list[Path]:
    if not DATA.is_dir():
        return []
    return sorted(p for p in DATA.rglob("*") if p.name.lower().endswith(FITS_SUFFIXES))


@needs_data
def test_every_real_frame_reads() -> None:
    paths = real_frames()
    assert len(paths) >= 40
    for path in paths:
        frame = read_frame(path)
        assert frame.meta.shape == frame.luminance.shape, path
        assert np.isfinite(frame.luminance).any(), path


@needs_data
def test_seestar_is_grbg_colour_in_portrait() -> None:
    path = sorted((DATA / "seestar_m94_run2").glob("*.fit"))[0]
    frame = read_frame(path)
    assert frame.meta.bayer == "GRBG"
    assert frame.data.shape == (1920, 1080, 3)
    assert frame.luminance.shape == (1920, 1080)
    assert frame.meta.exptime == 10.0
    assert frame.meta.time_utc == datetime(2025, 3, 27, 5, 45, 0, 734589, tzinfo=UTC)
    # The two green sites of a GRBG mosaic, [0,0] and [1,1], see the same sky; R and B differ from them.
    with fits.open(path) as hdul:
        raw = hdul[0].data.astype(np.float64)
    g1, g2 = np.median(raw[0::2, 0::2]), np.median(raw[1::2, 1::2])
    r, b = np.median(raw[0::2, 1::2]), np.median(raw[1::2, 0::2])
    assert abs(g1 - g2) < 0.05 * g1
    assert min(abs(r - g1), abs(b - g1)) > 3 * abs(g1 - g2)
    np.testing.assert_allclose(np.median(frame.data[..., 1]), (g1 + g2) / 2, rtol=0.02)


@needs_data
def test_pocs_fpack_reads_from_hdu_1_with_wcs() -> None:
    folder = DATA / "pocs_kic8462852_dslr_pair"
    frame = read_frame(folder / "solved.fits.fz")
    assert frame.meta.shape == (700, 700)
    assert frame.meta.bayer == "RGGB"  # from FILTER, as documented
    assert frame.meta.wcs_header is not None
    assert WCS(fits.Header.fromstring(frame.meta.wcs_header)).has_celestial
    with fits.open(folder / "solved.fits.fz") as hdul:
        raw = hdul[1].data.astype(np.float32)
    np.testing.assert_array_equal(read_frame(folder / "solved.fits.fz", bayer_pattern="MONO").data, raw)
    assert read_meta(folder / "unsolved.fits").wcs_header is None


@needs_data
def test_microobs_local_time_is_converted_to_ut() -> None:
    for path in sorted((DATA / "microobs_hatp32_first30").glob("*.FITS"))[:5]:
        meta = read_meta(path)
        with fits.open(path) as hdul:
            ut_obs = hdul[0].header["UT-OBS"]
            mjd = float(hdul[0].header["MJD-OBS"])
        ut = datetime.fromisoformat(ut_obs.replace("-0000", "+00:00"))
        assert meta.time_utc is not None
        assert abs((meta.time_utc - ut).total_seconds()) < 1.0
        # MJD-OBS is given to 1e-3 day only.
        mjd_time = datetime(1858, 11, 17, tzinfo=UTC) + timedelta(days=mjd)
        assert abs((meta.time_utc - mjd_time).total_seconds()) < 0.0006 * 86400


@needs_data
def test_old_style_dates_of_the_single_frames() -> None:
    meta = read_meta(DATA / "single_frames" / "M51.fits")
    assert meta.time_utc == datetime(1987, 4, 5, 9, 27, 27, tzinfo=UTC)
    spitzer = read_frame(DATA / "single_frames" / "spitzer_example_image.fits")
    assert spitzer.meta.wcs_header is not None
    assert spitzer.data.shape == (513, 1025)
