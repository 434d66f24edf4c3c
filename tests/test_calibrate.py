"""Calibration: masters from raw files, matching rules, application on the mosaic, defects.

The synthetic sensor here is not the simulator's: it has its own bias pattern with column structure, 2 ADU/s
of dark current, a few hundred hot pixels and 30% vignetting with dust shadows. Every frame is a real FITS
file (uint16 with BZERO, as cameras write), masters are built by ``livestack masters`` and lights stacked by
``livestack stack``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.stats import sigma_clipped_stats

from livestack.cli import main
from livestack.config import Config
from livestack.pipeline import Stacker
from livestack.stages import calibrate
from livestack.stages.calibrate import Master, match
from livestack.stages.frames import FrameMeta, read_meta, read_raw

SHAPE = (240, 256)
LIGHT_EXPOSURE = 30.0
DARK_EXPOSURE = 60.0
DARK_RATE = 2.0          # ADU/s
SKY_RATE = 8.0           # ADU/s on an unvignetted pixel
READ_NOISE = 4.0         # ADU
HOT_PIXELS = 300
LIGHTS = 8


@dataclass(frozen=True)
class Sensor:
    bias: np.ndarray          # ADU, with column structure
    dark_rate: np.ndarray     # ADU/s, with hot pixels
    flat: np.ndarray          # response, 1 at the centre, 0.7 in the corners, dust shadows
    hot: np.ndarray           # flat indices of the hot pixels
    sky: np.ndarray           # true sky rate, ADU/s (constant sky plus stars), unvignetted


def _sensor(seed: int = 3) -> Sensor:
    rng = np.random.default_rng(seed)
    rows, cols = SHAPE
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    bias = 500.0 + rng.normal(0.0, 15.0, cols)[None, :] + 3.0 * np.sin(y / 7.0) + rng.normal(0.0, 1.0, SHAPE)
    dark = np.full(SHAPE, DARK_RATE) * rng.uniform(0.9, 1.1, SHAPE)
    hot = rng.choice(rows * cols, HOT_PIXELS, replace=False)
    dark.ravel()[hot] = rng.uniform(30.0, 300.0, HOT_PIXELS)
    r2 = ((y - rows / 2) ** 2 + (x - cols / 2) ** 2) / ((rows / 2) ** 2 + (cols / 2) ** 2)
    flat = 1.0 - 0.3 * r2  # 30% darker in the corners
    for cy, cx, radius in ((60, 70, 9), (170, 190, 12), (120, 40, 7)):
        ring = np.hypot(y - cy, x - cx)
        flat *= np.where(ring < radius, 0.85, 1.0)  # dust shadows
    sky = np.full(SHAPE, SKY_RATE)
    for _ in range(70):
        sy, sx = rng.uniform(12, rows - 12), rng.uniform(12, cols - 12)
        rate = rng.uniform(20.0, 400.0)
        sky += rate * np.exp(-((y - sy) ** 2 + (x - sx) ** 2) / (2 * 1.3**2))
    return Sensor(bias, dark, flat, hot, sky)


def _write(path: Path, data: np.ndarray, imagetyp: str, exptime: float, minute: int, **cards: object) -> Path:
    hdu = fits.PrimaryHDU(np.clip(np.rint(data), 0, 65535).astype(np.uint16))
    h = hdu.header
    h["IMAGETYP"] = imagetyp
    h["EXPTIME"] = exptime
    h["DATE-OBS"] = f"2026-11-20T22:{minute // 60:02d}:{minute % 60:02d}"
    h["GAIN"] = 120
    h["OFFSET"] = 30
    h["SET-TEMP"] = -10.0
    for k, v in cards.items():
        h[k.replace("_", "-")] = v
    hdu.writeto(path)
    return path


def _expose(s: Sensor, rng: np.random.Generator, exptime: float, light: np.ndarray | None) -> np.ndarray:
    electrons = s.dark_rate * exptime
    if light is not None:
        electrons = electrons + light * s.flat * exptime
    return s.bias + rng.poisson(electrons) + rng.normal(0.0, READ_NOISE, SHAPE)


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Sensor]:
    """Raw bias, darks at twice the lights' exposure, flats and lights, as files."""
    root = tmp_path_factory.mktemp("night")
    s = _sensor()
    rng = np.random.default_rng(11)
    (root / "calib").mkdir()
    (root / "lights").mkdir()
    for i in range(15):
        _write(root / "calib" / f"bias_{i:02d}.fits", _expose(s, rng, 0.0, None), "Bias Frame", 0.0, i)
    for i in range(12):
        _write(root / "calib" / f"dark_{i:02d}.fits", _expose(s, rng, DARK_EXPOSURE, None), "Dark Frame",
               DARK_EXPOSURE, 20 + i)
    for i in range(12):
        level = rng.uniform(15000, 25000)  # flats of varying brightness: normalised per frame
        _write(root / "calib" / f"flat_{i:02d}.fits", _expose(s, rng, 1.0, np.full(SHAPE, level)),
               "Flat Field", 1.0, 40 + i, FILTER="L")
    for i in range(LIGHTS):
        _write(root / "lights" / f"light_{i:02d}.fits", _expose(s, rng, LIGHT_EXPOSURE, s.sky), "Light Frame",
               LIGHT_EXPOSURE, 100 + i, FILTER="L", OBJECT="field")
    return root, s


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def _sky_box(image: np.ndarray, rows: slice, cols: slice) -> float:
    return float(sigma_clipped_stats(_finite(image[rows, cols]), sigma=3.0)[1])


def _checks(stack: np.ndarray, s: Sensor) -> dict[str, bool]:
    """The three acceptance checks: flat sky, no hot pixel above 5 sigma, agreement with the true sky."""
    rows, cols = SHAPE
    m = 24
    centre = _sky_box(stack, slice(rows // 2 - m, rows // 2 + m), slice(cols // 2 - m, cols // 2 + m))
    corners = [_sky_box(stack, r, c) for r in (slice(4, 4 + m), slice(rows - 4 - m, rows - 4))
               for c in (slice(4, 4 + m), slice(cols - 4 - m, cols - 4))]
    flat = max(abs(c / centre - 1.0) for c in corners) < 0.01
    # The true calibrated sky: the flat divides the vignetting out and keeps the flat's mean response.
    truth = s.sky * LIGHT_EXPOSURE * float(s.flat.mean())
    # Expected noise per stacked pixel: Poisson of sky and dark plus read noise, through the flat.
    variance = (s.sky * s.flat * LIGHT_EXPOSURE + s.dark_rate * LIGHT_EXPOSURE + READ_NOISE**2)
    expected = np.sqrt(variance / LIGHTS) / (s.flat / s.flat.mean())
    z = (stack - truth) / expected
    inner = (slice(8, rows - 8), slice(8, cols - 8))
    zi = z[inner]
    not_hot = np.ones(SHAPE, dtype=bool)
    not_hot.ravel()[s.hot] = False
    mean_z, _, std_z = sigma_clipped_stats(_finite(zi[not_hot[inner]]), sigma=5.0)
    agrees = abs(mean_z) < 0.3 and 0.6 < std_z < 1.3
    noise = float(sigma_clipped_stats(_finite(stack - truth), sigma=3.0)[2])
    hot_excess = (stack - truth).ravel()[s.hot]
    no_hot = bool(np.nanmax(hot_excess) < 5.0 * noise)
    print(f"corners/centre {[round(c / centre, 4) for c in corners]}, z mean {mean_z:.3f} std {std_z:.3f}, "
          f"worst hot pixel {np.nanmax(hot_excess) / noise:.1f} sigma")
    return {"flat": flat, "no_hot": no_hot, "agrees": agrees}


def test_synthetic_sensor_masters_make_the_stack_flat_clean_and_true(night: tuple[Path, Sensor],
                                                                     tmp_path: Path) -> None:
    root, s = night
    masters = tmp_path / "masters"
    assert main(["masters", str(root / "calib"), "-o", str(masters)]) == 0
    library = calibrate.read_library(masters)
    kinds = sorted(m.kind for m in library.masters)
    assert kinds == ["bias", "dark", "flat"]
    dark = next(m for m in library.masters if m.kind == "dark")
    assert dark.bias_removed and dark.ncombine == 12
    header = fits.getheader(dark.meta.path)
    assert header["NCOMBINE"] == 12 and header["COMBMETH"] == "kappa-sigma" and header["EXPTIME"] == 60.0
    assert header["GAIN"] == 120 and header["OFFSET"] == 30 and header["LSMASTER"] == "dark"
    # The master dark is the thermal signal alone: 2 ADU/s x 60 s, not the bias.
    assert abs(float(np.median(calibrate.load_master(dark))) - DARK_RATE * DARK_EXPOSURE) < 2.0

    with_masters = tmp_path / "with.fits"
    report = tmp_path / "with.csv"
    assert main(["stack", str(root / "lights"), "-o", str(with_masters), "--masters", str(masters),
                 "--report", str(report), "-q"]) == 0
    without = tmp_path / "without.fits"
    assert main(["stack", str(root / "lights"), "-o", str(without), "-q"]) == 0

    good = _checks(fits.getdata(with_masters).astype(np.float64), s)
    bad = _checks(fits.getdata(without).astype(np.float64), s)
    assert good == {"flat": True, "no_hot": True, "agrees": True}, good
    assert bad == {"flat": False, "no_hot": False, "agrees": False}, bad
    with report.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == LIGHTS and all(r["calibration"] == rows[0]["calibration"] for r in rows)
    assert rows[0]["calibration"].startswith("bias master_bias_256x240_g120_o30_-10C.fits; dark master_dark_")
    # The dark's hot pixels are defects; the dust shadows are not (the flat divides them out).
    assert all(HOT_PIXELS <= int(r["defects"]) < 2 * HOT_PIXELS for r in rows)
    history = "".join(str(v) for v in fits.getheader(with_masters).get("HISTORY", []))
    assert "dark master_dark" in history and "x0.5" in history and "flat master_flat" in history


def test_calibration_frames_are_never_stacked_as_lights(night: tuple[Path, Sensor], tmp_path: Path) -> None:
    root, _ = night
    stacker = Stacker(Config(), workdir=tmp_path)
    for name, kind in (("bias_00.fits", "bias"), ("dark_00.fits", "dark"), ("flat_00.fits", "flat")):
        result = stacker.process(root / "calib" / name)
        assert not result.accepted
        assert result.reason is not None and f"marks a {kind} frame" in result.reason


def _meta(**changes: object) -> FrameMeta:
    base = FrameMeta(path="light.fits", shape=(100, 120), time_utc=None, exptime=30.0, filter="L",
                     object=None, imagetyp="Light", bayer="RGGB", wcs_header=None, gain=120.0, offset=30.0,
                     set_temp=-10.0)
    return replace(base, **changes)  # type: ignore[arg-type]


def _master(kind: str, **changes: object) -> Master:
    meta = replace(_meta(path=f"master_{kind}.fits", imagetyp=f"Master {kind}"), **changes)  # type: ignore[arg-type]
    return Master(kind=kind, meta=meta, bias_removed=kind == "dark")


@pytest.mark.parametrize(("key", "change", "words"), [
    ("gain", {"gain": 100.0}, "gain 100 differs from the light's 120"),
    ("size", {"shape": (120, 100)}, "size 120x100 differs from the light's 100x120"),
    ("bayer", {"bayer": "GRBG"}, "Bayer pattern GRBG differs from the light's RGGB (pattern and offset)"),
    ("offset", {"offset": 10.0}, "offset 10 differs from the light's 30"),
    ("binning", {"binning": (2, 2)}, "binning 2x2 differs"),
    ("temperature", {"set_temp": 0.0}, "set temperature 0 C is more than 5 C from the light's -10 C"),
])
def test_a_mismatched_master_is_refused_naming_the_key(key: str, change: dict[str, object],
                                                       words: str) -> None:
    library = [_master("bias", **change), _master("dark", **change), _master("flat", **change)]
    plan = match(_meta(), library)
    assert plan.bias is None and plan.dark is None and plan.flat is None
    for kind in ("bias", "dark", "flat"):
        assert f"no {kind} (master_{kind}.fits: {words}" in plan.describe(), plan.describe()
    # The same masters without the difference are all used.
    plan = match(_meta(), [_master("bias"), _master("dark"), _master("flat")])
    assert plan.describe() == "bias master_bias.fits; dark master_dark.fits; flat master_flat.fits"


def test_a_bayer_offset_in_the_header_is_matched_as_a_pattern(tmp_path: Path) -> None:
    """XBAYROFF = 1 on the light shifts its pattern by a column: an RGGB master no longer fits it."""
    data = np.full((40, 60), 1000, dtype=np.uint16)
    light = tmp_path / "light.fits"
    hdu = fits.PrimaryHDU(data)
    hdu.header.update(BAYERPAT="RGGB", XBAYROFF=1, IMAGETYP="Light", EXPTIME=10.0)
    hdu.writeto(light)
    meta = read_meta(light)
    master = _master("bias", shape=(40, 60), bayer="RGGB")
    plan = match(meta, [master])
    assert plan.bias is None and "Bayer pattern RGGB differs from the light's GRBG" in plan.describe()


def test_rules_for_darks_and_flats() -> None:
    # A dark that still holds its bias serves only its own exposure.
    raw_dark = replace(_master("dark", exptime=60.0), bias_removed=False)
    plan = match(_meta(), [raw_dark])
    assert plan.dark is None and "cannot be scaled" in plan.describe()
    plan = match(_meta(exptime=60.0), [raw_dark, _master("flat")])
    assert plan.dark is raw_dark and plan.bias is None and plan.flat is not None
    # A bias-removed dark at another exposure needs a bias to be scaled.
    dark = _master("dark", exptime=60.0)
    assert "no bias matches the light" in match(_meta(), [dark]).describe()
    plan = match(_meta(), [dark, _master("bias")])
    assert plan.dark is dark and plan.dark_scale == pytest.approx(0.5)
    # A flat needs something to remove the light's pedestal first.
    plan = match(_meta(), [_master("flat")])
    assert plan.flat is None and "no bias or dark matches to remove the pedestal" in plan.describe()
    # Flats by filter.
    plan = match(_meta(), [_master("bias"), _master("flat", filter="Ha")])
    assert plan.flat is None and "filter Ha differs from the light's L" in plan.describe()


def test_a_dark_at_twice_the_exposure_is_scaled_with_the_bias(night: tuple[Path, Sensor],
                                                              tmp_path: Path) -> None:
    """A 'light' with the shutter closed at 30 s, calibrated with a 60 s dark: only noise remains."""
    root, s = night
    masters = tmp_path / "masters"
    calibrate.make_masters(sorted((root / "calib").glob("*.fits")), masters)
    library = calibrate.read_library(masters)
    rng = np.random.default_rng(5)
    closed = _write(tmp_path / "closed.fits", _expose(s, rng, LIGHT_EXPOSURE, None), "Light",
                    LIGHT_EXPOSURE, 200, FILTER="L")
    raw = read_raw(closed)
    plan = match(raw.meta, library)
    assert plan.bias is not None and plan.dark is not None and plan.dark_scale == pytest.approx(0.5)
    calibrate.apply(raw.mosaic, plan.offset(calibrate.load_master), None)
    cool = np.ones(SHAPE, dtype=bool)
    cool.ravel()[s.hot] = False
    residual = raw.mosaic[cool]
    # Bias (500 ADU with columns) and 60 ADU of dark current are gone; a wrong scale leaves +-30 ADU.
    assert abs(float(np.mean(residual))) < 1.0
    columns = np.mean(np.where(cool, raw.mosaic, np.nan), axis=0, where=cool)
    assert float(np.std(columns)) < 1.5  # the column structure is removed, not just the mean
    # Hot pixels (30-300 ADU/s) are scaled too: what is left is their shot noise, not their signal.
    hot = raw.mosaic.ravel()[s.hot]
    assert float(np.median(np.abs(hot))) < 0.1 * float(np.median(s.dark_rate.ravel()[s.hot] * LIGHT_EXPOSURE))


def test_defects_are_replaced_on_the_mosaic_by_same_colour_neighbours() -> None:
    rng = np.random.default_rng(2)
    mosaic = rng.normal(1000.0, 5.0, (64, 64)).astype(np.float32)
    # Colour sites differ in level (an RGGB sensor under a reddish sky).
    mosaic[0::2, 0::2] += 300.0
    hot = np.array([20 * 64 + 20, 33 * 64 + 41], dtype=np.int64)
    mosaic.ravel()[hot] = 60000.0
    before = mosaic.copy()
    assert calibrate.replace_defects(mosaic, hot, "RGGB") == 2
    # (20, 20) is a red site: its replacement is a red level, not a mix with green.
    assert mosaic[20, 20] == pytest.approx(float(np.median(np.delete(before[18:23:2, 18:23:2].ravel(), 4))))
    assert abs(mosaic[20, 20] - 1300.0) < 30 and abs(mosaic[33, 41] - 1000.0) < 30
    untouched = np.ones(mosaic.shape, dtype=bool)
    untouched.ravel()[hot] = False
    assert np.array_equal(mosaic[untouched], before[untouched])


def test_defects_from_consecutive_frames_clean_a_sensor_without_darks(tmp_path: Path) -> None:
    """No masters: hot pixels found at the same sensor position in 3 frames are replaced; stars are not."""
    from livestack.simulate import SimConfig, simulate

    out = tmp_path / "frames"
    simulate(out, SimConfig(frames=6, interval=0.0, size=(320, 240), seed=4))
    paths = sorted(out.glob("*.fits"))
    rng = np.random.default_rng(9)
    hot = rng.choice(240 * 320, 40, replace=False)
    for p in paths:
        with fits.open(p, mode="update") as hdul:
            data = hdul[0].data.astype(np.float64)
            data.ravel()[hot] += 5000.0
            hdul[0].data = np.clip(data, 0, 65535).astype(np.uint16)

    def run(mode: str) -> tuple[np.ndarray, list[int]]:
        config = Config().with_overrides({"calibration.defects": mode, "stack.method": "mean"})
        stacker = Stacker(config, workdir=tmp_path)
        results = [stacker.process(p) for p in paths]
        assert all(r.accepted for r in results), [r.reason for r in results]
        image = stacker.result()
        assert image is not None
        return image, [int(r.defects or 0) for r in results]

    cleaned, counts = run("frames")
    dirty, _ = run("off")
    assert counts[0] == 0 and counts[1] == 0  # not yet seen in 3 frames
    assert all(c >= 40 for c in counts[2:])
    # The 4 frames after the map was known contribute no hot pixel (the frames drift, so each lands
    # elsewhere in the stack): the mean loses 40 x 5000 ADU x 4 / 6 frames in all, and nothing else.
    removed = _finite(dirty - cleaned)
    expected = 40 * 5000.0 * 4 / 6
    assert 0.8 * expected < float(removed.sum()) < 1.2 * expected
    assert float(np.mean(np.abs(removed) > 1e-3)) < 0.02
    # Stars are untouched: the brightest pixels of the stack are the same in both.
    star = np.nanargmax(np.where(np.isin(np.arange(dirty.size), hot).reshape(dirty.shape), -np.inf, dirty))
    assert cleaned.ravel()[star] == pytest.approx(dirty.ravel()[star], rel=1e-3)


def test_the_masters_used_travel_in_the_frame_event_and_the_journal_facts(night: tuple[Path, Sensor],
                                                                          tmp_path: Path) -> None:
    from livestack import events
    from livestack.live.reports import frame_event
    from livestack.pipeline import frame_facts

    root, _ = night
    masters = tmp_path / "masters"
    calibrate.make_masters(sorted((root / "calib").glob("*.fits")), masters)
    stacker = Stacker(Config().with_overrides({"calibration.masters": str(masters)}), workdir=tmp_path)
    lights = sorted((root / "lights").glob("*.fits"))
    results = [stacker.process(p) for p in lights[:3]]
    assert all(r.accepted for r in results)
    note = results[1].calibration
    assert note is not None and note.startswith("bias master_bias_") and "x0.5; flat master_flat_" in note
    facts = frame_facts(results[1])
    assert facts["masters"] == note and facts["defects"] == results[1].defects
    assert facts["weight"] == pytest.approx(results[1].weight)
    assert facts["sky"] == pytest.approx(results[1].sky)
    event = frame_event(2, lights[1], "accepted", results[1], 0.1, 1)
    decoded = events.decode(events.encode(event))
    assert decoded.payload["calibration"] == note and decoded.payload["defects"] >= HOT_PIXELS
    assert decoded.payload["weight"] == pytest.approx(results[1].weight)
    assert 0.9 < decoded.payload["transparency"] < 1.1
    # Without a library the field is null, not absent; an older daemon's event without it still validates.
    plain = Stacker(Config(), workdir=tmp_path).process(lights[0])
    assert frame_event(1, lights[0], "accepted", plain, 0.1, 1).payload["calibration"] is None
    payload = dict(decoded.payload)
    for name in ("calibration", "defects", "sky", "transparency", "weight"):
        del payload[name]
    events.validate(payload)


def test_a_hot_pixel_replaced_on_the_mosaic_leaves_no_coloured_cross() -> None:
    from livestack.stages.frames import RawFrame, develop

    rng = np.random.default_rng(6)
    mosaic = np.rint(rng.normal(1000.0, 3.0, (40, 40))).astype(np.float32)
    mosaic[20, 20] = 30000.0  # a red site of RGGB
    meta = _meta(shape=(40, 40))
    dirty = develop(RawFrame(meta, mosaic.copy(), integral=True)).data
    cleaned = mosaic.copy()
    calibrate.replace_defects(cleaned, np.array([20 * 40 + 20], dtype=np.int64), "RGGB")
    clean = develop(RawFrame(meta, cleaned, integral=False)).data
    around = (slice(18, 23), slice(18, 23))
    # Debayered as it was, the hot pixel spreads into its neighbours' red: a cross of colour.
    assert float(dirty[around][:, :, 0].max()) > 5000.0
    # Replaced before debayering, every channel around it stays at the sky.
    assert float(np.abs(clean[around] - 1000.0).max()) < 20.0
