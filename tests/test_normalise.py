"""Background normalisation, frame weights, relative rejection, and kappa-sigma on normalised warped frames.

Seams are measured as the issue defines them: the sigma-clipped sky median of each region covered by a
different subset of frames, against the best-covered region's, in units of the region's sky noise.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from astropy.io import fits
from astropy.stats import sigma_clipped_stats

from livestack.config import Config
from livestack.pipeline import Stacker, expand_paths, order_by_time
from livestack.simulate import SimConfig, render_stars, simulate
from livestack.stages.detect import detect
from livestack.stages.normalise import Judge, Measures, Sky, measure_sky, normalisation

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _need_data(name: str) -> Path:
    folder = DATA / name
    if not folder.is_dir():
        pytest.skip(f"real frames not found at {folder} (the shared data folder sits beside the repository)")
    return folder


def _config(**overrides: object) -> Config:
    return Config().with_overrides({k.replace("__", "."): v for k, v in overrides.items()})


def _steps(image: np.ndarray, regions: dict[object, np.ndarray],
           min_pixels: int = 2000) -> dict[object, float]:
    """Sky step of every region against the best-covered one, in units of the region's sky noise."""
    lum = image.mean(axis=2) if image.ndim == 3 else image
    big = {k: m & np.isfinite(lum) for k, m in regions.items() if int(m.sum()) >= min_pixels}
    best = max(big, key=lambda k: (len(k) if isinstance(k, tuple) else k, int(big[k].sum())))  # type: ignore[arg-type]
    ref = float(sigma_clipped_stats(lum[big[best]], sigma=3.0)[1])
    out = {}
    for k, mask in big.items():
        _, median, noise = sigma_clipped_stats(lum[mask], sigma=3.0)
        out[k] = (float(median) - ref) / float(noise)
    return out


def _count_regions(coverage: np.ndarray) -> dict[object, np.ndarray]:
    return {int(c): coverage == c for c in np.unique(coverage) if c > 0}


# --- the sky, the normalisation and the judge, alone ------------------------------------------------------

def test_sky_is_measured_away_from_stars_and_continuous_for_integers() -> None:
    rng = np.random.default_rng(1)
    shape = (400, 500)
    y = rng.uniform(10, 390, 300)
    x = rng.uniform(10, 490, 300)
    stars = render_stars(shape, x, y, rng.uniform(2e3, 5e4, 300), fwhm=3.0)
    measured = []
    for level in (100.0, 100.4):
        image = np.rint(rng.poisson(level + stars)).astype(np.float32)
        found, _ = detect(image)
        assert len(found) > 100
        sky = measure_sky(image, found)
        assert sky.level[0] == pytest.approx(level, abs=0.3)  # 0.03 sigma: the faintest wings are left
        assert sky.noise[0] == pytest.approx(np.sqrt(level), rel=0.05)
        measured.append(sky.level[0])
    # Integer data, yet the level moves with the true one (a median would sit on a whole number).
    assert measured[1] - measured[0] == pytest.approx(0.4, abs=0.1)


def test_normalisation_modes_and_weights() -> None:
    ref = Sky((100.0,), (10.0,))
    frame = Sky((250.0,), (20.0,))
    add = normalisation(frame, ref)
    assert add.scale == (1.0,) and add.offset == (-150.0,) and add.weight == pytest.approx(0.25)
    # Half the star flux: scaled by 2, then the sky put back on the reference's.
    scaled = normalisation(frame, ref, mode="scale", transparency=0.5)
    assert scaled.scale == (2.0,) and scaled.offset == (100.0 - 500.0,)
    assert scaled.weight == pytest.approx((10.0 / 40.0) ** 2)
    both = normalisation(frame, ref, weights="noise+transparency", transparency=0.5)
    assert both.weight == pytest.approx(0.125)
    assert normalisation(frame, ref, mode="none", weights="none").identity


def test_judge_rejects_one_sided_outliers_after_the_warm_up() -> None:
    rng = np.random.default_rng(3)
    judge = Judge(warmup=5, kappa=5.0)

    def ordinary() -> Measures:
        return Measures(fwhm=float(rng.normal(2.5, 0.1)), ellipticity=float(rng.normal(0.15, 0.02)),
                        stars=int(rng.normal(500, 20)), transparency=float(rng.normal(1.0, 0.02)),
                        background=float(rng.normal(800, 10)))

    cloudy = Measures(2.5, 0.15, 150, 0.3, 1200.0)
    assert judge.judge(cloudy) is None  # nothing to compare with yet
    for _ in range(20):
        m = ordinary()
        assert judge.judge(m) is None
        judge.record(m)
    reason = judge.judge(cloudy)
    assert reason is not None and reason.startswith("sky background 1200.0 is") and "clouds" in reason
    assert "FWHM 4.00 px" in (judge.judge(Measures(4.0, 0.15, 500, 1.0, 800.0)) or "")
    assert "elongation 0.45" in (judge.judge(Measures(2.5, 0.45, 500, 1.0, 800.0)) or "")
    assert "transparency 0.60" in (judge.judge(Measures(2.5, 0.15, 500, 0.6, 800.0)) or "")
    assert "star count 200" in (judge.judge(Measures(2.5, 0.15, 200, 1.0, 800.0)) or "")
    # One-sided: better than usual is never a reason.
    assert judge.judge(Measures(2.0, 0.05, 700, 1.3, 700.0)) is None
    restored = Judge(warmup=5, kappa=5.0)
    restored.restore(judge.state())
    assert restored.judge(cloudy) == reason


# --- seams ------------------------------------------------------------------------------------------------

FIELD = (330, 410)   # the sky, larger than a frame and its shifts
FRAME = (240, 300)   # rows, columns of a frame
THIRD = FRAME[1] // 3


def _seam_frames(folder: Path) -> list[tuple[Path, int, int]]:
    """Frames shifted by a third of the frame, with skies differing by a factor of 2."""
    rng = np.random.default_rng(8)
    n = 160
    sky = render_stars(FIELD, rng.uniform(5, FIELD[1] - 5, n), rng.uniform(5, FIELD[0] - 5, n),
                       rng.uniform(3e3, 6e4, n) * rng.uniform(0.05, 1.0, n) ** 2, fwhm=2.6)
    # (column offset, row offset, sky level, frames): the reference position is covered most.
    layout = [(0, 0, 300.0, 3), (THIRD, 0, 600.0, 2), (0, FRAME[0] // 3, 600.0, 1)]
    written = []
    k = 0
    for dx, dy, level, count in layout:
        for _ in range(count):
            light = sky[dy:dy + FRAME[0], dx:dx + FRAME[1]] + level
            data = rng.poisson(light) + rng.normal(0.0, 5.0, FRAME) + 1000.0
            path = folder / f"seam_{k:02d}.fits"
            hdu = fits.PrimaryHDU(np.clip(np.rint(data), 0, 65535).astype(np.uint16))
            hdu.header.update(DATE_OBS=f"2026-11-20T22:00:{k:02d}", EXPTIME=30.0, OBJECT="seams")
            hdu.header.rename_keyword("DATE_OBS", "DATE-OBS")
            hdu.writeto(path)
            written.append((path, dx, dy))
            k += 1
    return written


@pytest.mark.parametrize(("mode", "seamless"), [("additive", True), ("scale", True), ("none", False)])
def test_frames_of_different_skies_and_shifts_stack_without_seams(tmp_path: Path, mode: str,
                                                                  seamless: bool) -> None:
    frames = _seam_frames(tmp_path)
    stacker = Stacker(_config(stack__normalise=mode), workdir=tmp_path)
    for path, _, _ in frames:
        result = stacker.process(path)
        assert result.accepted, result.reason
    image = stacker.result()
    assert image is not None
    # Regions by the subset of frame positions that cover them (exact footprints, 3 px margins).
    rows, cols = np.mgrid[0:FRAME[0], 0:FRAME[1]]
    inside = {}
    for _, dx, dy in frames:
        inside[(dx, dy)] = ((cols >= dx + 3) & (cols < dx + FRAME[1] - 3) & (rows >= dy + 3)
                            & (rows < dy + FRAME[0] - 3))
    regions: dict[object, np.ndarray] = {}
    keys = list(inside)
    for pattern in range(1, 1 << len(keys)):
        subset = tuple(k for i, k in enumerate(keys) if pattern >> i & 1)
        mask = np.ones(FRAME, dtype=bool)
        for i, k in enumerate(keys):
            mask &= inside[k] if pattern >> i & 1 else ~inside[k]
        border = np.zeros(FRAME, dtype=bool)
        border[4:-4, 4:-4] = True
        regions[subset] = mask & border
    steps = _steps(image, regions)
    assert len(steps) >= 4, steps
    worst = max(abs(s) for s in steps.values())
    if seamless:
        assert worst < 1.0, steps
    else:
        assert worst > 5.0, steps  # the same frames without normalisation: the measure sees the seams


@pytest.mark.parametrize("name", ["microobs_hatp32_first30", "seestar_m94_run2", "donuts_nites_J1749",
                                  "pocs_kic8462852_dslr_pair"])
def test_real_sets_keep_their_frames_and_show_no_seams(name: str, tmp_path: Path) -> None:
    """Relative rejection keeps an ordinary night; normalised frames leave no step between coverage regions
    (without normalisation MicroObservatory's drifting run shows 7.9 sigma at its edge)."""
    folder = _need_data(name)
    config = _config(frames__bayer_pattern="RGGB") if name.startswith("pocs") else Config()
    stacker = Stacker(config, workdir=tmp_path)
    results = [stacker.process(p)
               for p in order_by_time(expand_paths([str(folder)]), config.frames.bayer_pattern or None)]
    assert sum(r.accepted for r in results) >= 0.95 * len(results), [r.reason for r in results]
    weights = [r.weight for r in results if r.accepted]
    assert all(w is not None and 0.5 < w < 2.0 for w in weights), weights
    image, coverage = stacker.result(), stacker.coverage()
    assert image is not None and coverage is not None
    steps = _steps(image, _count_regions(coverage))
    assert max(abs(s) for s in steps.values()) < 1.0, steps


# --- relative rejection on real frames --------------------------------------------------------------------

def _clouds(d: np.ndarray) -> np.ndarray:
    sky = float(np.median(d))
    return sky * 1.5 + 0.3 * (d - sky)  # background +50%, stars -70%


def _kernel_filter(kernel: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    def apply(d: np.ndarray) -> np.ndarray:
        return cv2.filter2D(d, -1, kernel / kernel.sum(), borderType=cv2.BORDER_REFLECT)
    return apply


_TRAIL = np.zeros((9, 9), np.float32)
_TRAIL[4, 1:8] = 1.0
_DEFOCUS = np.zeros((9, 9), np.float32)
cv2.circle(_DEFOCUS, (4, 4), 3, 1.0, -1)


def test_relative_rejection_keeps_a_real_night_and_rejects_injected_clouds_trailing_defocus(
        tmp_path: Path) -> None:
    folder = _need_data("microobs_hatp32_first30")
    paths = order_by_time(expand_paths([str(folder)]))
    injected = {10: ("clouds", _clouds, ("sky background", "transparency")),
                16: ("trailing", _kernel_filter(_TRAIL), ("FWHM", "elongation")),
                22: ("defocus", _kernel_filter(_DEFOCUS), ("FWHM",))}
    out = tmp_path / "night"
    out.mkdir()
    for i, p in enumerate(paths):
        if i not in injected:
            shutil.copy(p, out / p.name)
            continue
        with fits.open(p) as hdul:
            header = hdul[0].header.copy()
            data = hdul[0].data.astype(np.float32)
        fits.PrimaryHDU(np.clip(np.rint(injected[i][1](data)), -32768, 32767).astype(np.int16),
                        header=header).writeto(out / p.name)
    # The absolute gates are opened so that what rejects is the relative judge.
    config = _config(align__max_fwhm_factor=0.0, align__min_star_fraction=0.0, align__max_ellipticity=1.0)
    stacker = Stacker(config, workdir=tmp_path)
    results = [stacker.process(p) for p in order_by_time(expand_paths([str(out)]))]
    for i, r in enumerate(results):
        if i in injected:
            label, _, words = injected[i]
            assert not r.accepted, f"{label} was accepted"
            assert r.reason is not None and r.reason.startswith(words), (label, r.reason)
        else:
            assert r.accepted, (i, r.reason)
    ordinary = [r for i, r in enumerate(results) if i not in injected]
    assert sum(r.accepted for r in ordinary) >= 0.95 * len(ordinary)


# --- kappa-sigma on normalised, warped frames -------------------------------------------------------------

def test_kappa_sigma_on_normalised_warped_frames_removes_trails_and_cosmic_rays(tmp_path: Path) -> None:
    """Drifting, rotating frames whose sky brightens 4x through the night (moonrise), one with a satellite
    trail and two with cosmic rays: kappa-sigma's stack matches the clean frames' stack where they were."""
    sim = SimConfig(frames=12, interval=0.0, size=(320, 256), seed=21, trails=(7,), n_stars=300)
    clean_dir, dirty_dir = tmp_path / "clean", tmp_path / "dirty"
    simulate(clean_dir, sim)
    simulate(dirty_dir, sim)
    rng = np.random.default_rng(4)
    rays: dict[int, np.ndarray] = {}
    for i, (clean, dirty) in enumerate(zip(sorted(clean_dir.glob("*.fits")), sorted(dirty_dir.glob("*.fits")),
                                           strict=True)):
        brighten = 300.0 * i  # the sky rises by 4x its starting level
        for p in (clean, dirty):
            with fits.open(p, mode="update") as hdul:
                data = hdul[0].data.astype(np.float64) + brighten
                if p == dirty and i in (5, 9):
                    hits = rng.choice(data.size, 60, replace=False)
                    data.ravel()[hits] += rng.uniform(2000, 20000, hits.size)
                    rays[i] = hits
                hdul[0].data = np.clip(np.rint(data), 0, 65535).astype(np.uint16)
        if i == 7:  # the clean set has no trail: render it again without one
            simulate(tmp_path / "untrailed", dataclasses.replace(sim, trails=()))
            shutil.copy(tmp_path / "untrailed" / clean.name, clean)
            with fits.open(clean, mode="update") as hdul:
                hdul[0].data = np.clip(hdul[0].data.astype(np.float64) + brighten, 0, 65535).astype(np.uint16)

    def stack(folder: Path, method: str) -> np.ndarray:
        stacker = Stacker(_config(stack__method=method, calibration__defects="off"), workdir=tmp_path)
        for p in sorted(folder.glob("sim_*.fits")):
            assert stacker.process(p).accepted
        image = stacker.result()
        assert image is not None
        return image

    truth = stack(clean_dir, "kappa-sigma")
    clipped = stack(dirty_dir, "kappa-sigma")
    mean = stack(dirty_dir, "mean")
    noise = float(sigma_clipped_stats(truth[np.isfinite(truth)], sigma=3.0)[2])
    both = np.isfinite(truth) & np.isfinite(clipped)
    mean_excess = np.where(both, mean - truth, 0.0)
    damaged = mean_excess > 5 * noise  # where the trail and the rays went in the mean
    assert damaged.sum() > 100
    left = np.where(both, clipped - truth, 0.0)
    assert float(np.max(left[damaged])) < 3 * noise, float(np.max(left[damaged]) / noise)
    # And the sky did not pile up rejections: almost every pixel agrees with the clean stack.
    assert float(np.mean(np.abs(left[both]) < 3 * noise)) > 0.99
