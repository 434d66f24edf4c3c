"""stack: streaming accumulators checked against the batch answer."""

from __future__ import annotations

import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.stats import sigma_clip

from livestack.errors import StateError
from livestack.stages.stack import (
    MAD_TO_SIGMA,
    METHODS,
    MIN_TEST_SAMPLES,
    Accumulator,
    KappaSigmaStack,
    MeanStack,
    MedianStack,
    _block_shape,
    _median_ignoring_nan,
    make_accumulator,
)

SKY = 1000.0
NOISE = 10.0


def _footprints(rng: np.random.Generator, count: int, shape: tuple[int, ...], slack: int = 12) -> np.ndarray:
    """Rectangles as left by shifted frames: each misses up to ``slack`` px on each side."""
    masks = np.zeros((count, *shape), dtype=bool)
    for k in range(count):
        top, left = rng.integers(0, slack, 2)
        bottom, right = rng.integers(0, slack, 2)
        masks[k, top : shape[0] - bottom, left : shape[1] - right] = True
    return masks


def _noisy(rng: np.random.Generator, count: int, shape: tuple[int, ...]) -> np.ndarray:
    return (SKY + NOISE * rng.standard_normal((count, *shape))).astype(np.float32)


def _spoil(frames: np.ndarray, footprints: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Garbage outside the footprints (NaN, huge, zero), as a careless warp might leave."""
    spoiled = frames.copy()
    junk = np.array([np.nan, 1e30, 0.0, -np.inf], dtype=np.float32)
    outside = ~footprints
    values = junk[rng.integers(0, len(junk), outside.sum())]
    if spoiled.ndim == 4:
        spoiled[outside] = values[:, None]
    else:
        spoiled[outside] = values
    return spoiled


def _masked(frames: np.ndarray, footprints: np.ndarray) -> np.ndarray:
    mask = footprints if frames.ndim == footprints.ndim else footprints[..., None]
    return np.where(mask, frames, np.float32(np.nan))


def _quiet_nan(func, *args, **kwargs):  # type: ignore[no-untyped-def]
    """numpy's nan-reductions warn on all-NaN pixels, which are expected here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return func(*args, **kwargs)


# --- mean ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(40, 56), (24, 32, 3)])
def test_mean_matches_nanmean_and_ignores_what_lies_outside(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    frames = _noisy(rng, 50, shape)
    footprints = _footprints(rng, 50, shape[:2])
    stack = MeanStack(shape)
    for frame, footprint in zip(_spoil(frames, footprints, rng), footprints, strict=True):
        stack.add(frame, footprint)
    expected = _quiet_nan(np.nanmean, _masked(frames, footprints), axis=0)
    result = stack.result()
    assert result.dtype == np.float32 and result.shape == shape
    np.testing.assert_allclose(result, expected, rtol=1e-5)
    assert np.array_equal(np.isnan(result), np.isnan(expected))
    np.testing.assert_array_equal(stack.coverage, footprints.sum(axis=0))
    assert stack.count == 50 and stack.rejected_fraction == 0.0


def test_weighted_mean_matches_numpy_average() -> None:
    rng = np.random.default_rng(2)
    frames = _noisy(rng, 20, (30, 40))
    footprints = _footprints(rng, 20, (30, 40))
    weights = rng.uniform(0.2, 3.0, 20)
    stack = MeanStack((30, 40))
    for frame, footprint, weight in zip(frames, footprints, weights, strict=True):
        stack.add(frame, footprint, weight)
    w = weights[:, None, None] * footprints
    covered = footprints.any(axis=0)
    expected = (w * np.where(footprints, frames, 0)).sum(axis=0)[covered] / w.sum(axis=0)[covered]
    np.testing.assert_allclose(stack.result()[covered], expected, rtol=1e-6)
    assert np.isnan(stack.result()[~covered]).all() and (~covered).any()


def test_float32_running_mean_stays_within_float32_resolution_over_thousands_of_frames() -> None:
    """The mean is stored as float32: after 3000 weighted frames it still matches a float64 average to a
    few float32 roundings, far below the stack's noise (10 / sqrt(3000) ~ 0.18 here)."""
    rng = np.random.default_rng(21)
    shape = (16, 24)
    stack = MeanStack(shape)
    moment = np.zeros(shape)
    total = np.zeros(shape)
    footprint = np.ones(shape, dtype=bool)
    for _ in range(3000):
        frame = (SKY + NOISE * rng.standard_normal(shape)).astype(np.float32)
        weight = float(rng.uniform(0.2, 3.0))
        stack.add(frame, footprint, weight)
        moment += weight * frame.astype(np.float64)
        total += weight
    np.testing.assert_allclose(stack.result(), moment / total, rtol=2e-6, atol=0)


def test_mean_resumes_from_a_state_of_float64_sums() -> None:
    """Checkpoints written while the mean kept float64 sums resume as the same mean."""
    rng = np.random.default_rng(22)
    frames = _noisy(rng, 6, (12, 10))
    footprints = _footprints(rng, 6, (12, 10), slack=4)
    weights = np.linspace(0.5, 2.0, 6)
    w = weights[:, None, None] * footprints
    old = {"method": np.array("mean"), "shape": np.array((12, 10), dtype=np.int64), "count": np.array(4),
           "sum": (w[:4] * np.where(footprints[:4], frames[:4], 0)).sum(axis=0)[:, :, None],
           "weight": w[:4].sum(axis=0), "coverage": footprints[:4].sum(axis=0).astype(np.int32)}
    stack = MeanStack((12, 10))
    stack.restore(old)
    for frame, footprint, weight in zip(frames[4:], footprints[4:], weights[4:], strict=True):
        stack.add(frame, footprint, weight)
    covered = footprints.any(axis=0)
    expected = (w * np.where(footprints, frames, 0)).sum(axis=0)[covered] / w.sum(axis=0)[covered]
    np.testing.assert_allclose(stack.result()[covered], expected, rtol=1e-6)
    assert stack.count == 6 and np.isnan(stack.result()[~covered]).all()


def test_nan_inside_the_footprint_does_not_poison_the_pixel() -> None:
    stack = MeanStack((4, 4, 3))
    frame = np.full((4, 4, 3), 5.0, dtype=np.float32)
    stack.add(frame, np.ones((4, 4), dtype=bool))
    frame[1, 1, 2] = np.nan
    stack.add(frame * 3, np.ones((4, 4), dtype=bool))
    assert np.all(stack.result()[1, 1] == 5.0)
    assert stack.coverage[1, 1] == 1 and stack.coverage[0, 0] == 2


# --- coverage, all methods -----------------------------------------------------------------------------


def _all_methods(shape: tuple[int, ...], directory: Path) -> list[Accumulator]:
    return [make_accumulator(method, shape, warmup=3, directory=directory) for method in METHODS]


@pytest.mark.parametrize("shape", [(48, 64), (20, 30, 3)])
def test_edges_of_shifted_frames_do_not_darken_the_stack(shape: tuple[int, ...], tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    footprints = _footprints(rng, 9, shape[:2], slack=15)
    frames = np.zeros((9, *shape), dtype=np.float32)  # a careless warp fills the edges with 0
    frames[_expand(footprints, len(shape))] = 100.0
    covered = footprints.any(axis=0)
    for stack in _all_methods(shape, tmp_path):
        for frame, footprint in zip(frames, footprints, strict=True):
            stack.add(frame, footprint)
        result = stack.result()
        assert np.all(result[covered] == 100.0), stack.method
        assert np.isnan(result[~covered]).all(), stack.method
        np.testing.assert_array_equal(stack.coverage, footprints.sum(axis=0))


def _expand(footprints: np.ndarray, ndim: int) -> np.ndarray:
    return np.broadcast_to(footprints[..., None], (*footprints.shape, 3)) if ndim == 3 else footprints


# --- kappa-sigma ---------------------------------------------------------------------------------------


def _reference_kappa_sigma(frames: np.ndarray, footprints: np.ndarray, weights: np.ndarray, kappa: float,
                           warmup: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The same algorithm as KappaSigmaStack, in plain numpy and float64: mean, accepted count, counters."""
    cube = _masked(frames, footprints).astype(np.float64)
    if cube.ndim == 3:
        cube = cube[..., None]
    warm = cube[:warmup]
    valid = ~np.isnan(warm)
    samples = valid.sum(axis=0)
    usable = samples >= 2
    variance = _quiet_nan(np.nanvar, warm, axis=0, ddof=1)
    floor = np.zeros(cube.shape[-1])
    for c in range(cube.shape[-1]):
        dof = np.median(samples[..., c][usable[..., c]]) - 1
        floor[c] = np.sqrt(np.median(variance[..., c][usable[..., c]]) / (1 - 2 / (9 * dof)) ** 3)
    centre = _quiet_nan(np.nanmedian, warm, axis=0)
    mad = _quiet_nan(np.nanmedian, np.abs(warm - centre), axis=0)
    limit = np.where(samples >= MIN_TEST_SAMPLES, kappa * np.maximum(MAD_TO_SIGMA * mad, floor), np.inf)
    keep = valid & (np.abs(warm - np.where(samples >= MIN_TEST_SAMPLES, centre, 0.0)) <= limit)
    offered, rejected = int(valid.sum()), int((valid & ~keep).sum())
    mean = np.zeros(cube.shape[1:])
    m2 = np.zeros(cube.shape[1:])
    total = np.zeros(cube.shape[1:])
    n = np.zeros(cube.shape[1:], dtype=np.int64)

    def fold(values: np.ndarray, accept: np.ndarray, weight: float) -> None:
        nonlocal mean, m2, total
        new_total = total + np.where(accept, weight, 0.0)
        delta = np.where(accept, values - mean, 0.0)
        new_mean = mean + np.where(accept, delta * weight / np.where(accept, new_total, 1.0), 0.0)
        m2 = m2 + np.where(accept, weight * delta * (np.where(accept, values, 0.0) - new_mean), 0.0)
        mean, total = new_mean, new_total
        n[accept] += 1

    for k in range(warmup):
        fold(warm[k], keep[k], weights[k])
    for k in range(warmup, len(cube)):
        values = cube[k]
        valid = ~np.isnan(values)
        with np.errstate(invalid="ignore", divide="ignore"):
            sigma = np.sqrt(m2 / total * n / (n - 1))
        testable = n >= MIN_TEST_SAMPLES
        outlier = valid & testable & (np.abs(values - mean) > kappa * np.maximum(sigma, floor))
        offered += int(valid.sum())
        rejected += int(outlier.sum())
        fold(values, valid & ~outlier, weights[k])
    return np.where(n > 0, mean, np.nan), n, offered, rejected


@pytest.mark.parametrize("shape", [(64, 80), (24, 40, 3)])
def test_kappa_sigma_kernel_matches_numpy_reference(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(4)
    count = 14
    frames = _noisy(rng, count, shape)
    # Heavy tails so that plenty of samples are rejected, in warm-up and after.
    hits = rng.random(frames.shape) < 0.02
    frames[hits] += rng.uniform(50, 500, hits.sum()).astype(np.float32)
    footprints = _footprints(rng, count, shape[:2])
    weights = rng.uniform(0.5, 2.0, count)
    stack = KappaSigmaStack(shape, kappa=3.0, warmup=5)
    for frame, footprint, weight in zip(_spoil(frames, footprints, rng), footprints, weights, strict=True):
        stack.add(frame, footprint, weight)
    mean, n, offered, rejected = _reference_kappa_sigma(frames, footprints, weights, 3.0, 5)
    state = stack.state()
    # float32 storage may flip a decision that sits right on the threshold; allow a handful.
    agree = state["n"] == n.reshape(state["n"].shape)
    assert agree.mean() > 0.999
    np.testing.assert_allclose(stack.result().reshape(agree.shape)[agree], mean.reshape(agree.shape)[agree],
                               rtol=1e-6)
    assert stack.rejected_fraction > 0.01
    assert abs(stack.rejected_fraction - rejected / offered) < 1e-3


def test_kappa_sigma_colour_is_three_mono_stacks_bit_for_bit() -> None:
    """Each channel of a colour stack is stacked as the mono stack of that channel alone would be, given
    the pixels valid in every channel: the colour kernel's arithmetic is the mono kernel's, sample for
    sample (moments, counts and counters identical), and a pixel with one non-finite channel is offered in
    none of them."""
    rng = np.random.default_rng(12)
    count, shape = 12, (37, 53, 3)
    frames = _noisy(rng, count, shape)
    hits = rng.random(frames.shape) < 0.03
    frames[hits] += rng.uniform(50, 500, hits.sum()).astype(np.float32)
    footprints = _footprints(rng, count, shape[:2])
    frames = _spoil(frames, footprints, rng)
    # Inside the footprints, a few pixels with one channel lost (NaN or infinite).
    lost = (rng.random(frames.shape[:3]) < 0.01) & footprints
    frames[lost, rng.integers(0, 3, lost.sum())] = np.float32(np.nan)
    frames[3, 20, 30, 1] = np.float32(np.inf)
    weights = rng.uniform(0.5, 2.0, count)
    colour = KappaSigmaStack(shape, kappa=2.5, warmup=5)
    planes = [KappaSigmaStack(shape[:2], kappa=2.5, warmup=5) for _ in range(3)]
    for frame, footprint, weight in zip(frames, footprints, weights, strict=True):
        colour.add(frame, footprint, weight)
        usable = footprint & np.isfinite(frame).all(axis=2)
        for c, plane in enumerate(planes):
            plane.add(frame[:, :, c], usable, weight)
    state = colour.state()
    assert state["n"].min() < count - 5  # samples were rejected, after the warm-up too
    for c, plane in enumerate(planes):
        mono = plane.state()
        for key in ("mean", "m2", "wsum", "n"):
            np.testing.assert_array_equal(state[key][:, :, c], mono[key].reshape(shape[:2]), err_msg=key)
        np.testing.assert_array_equal(state["coverage"], mono["coverage"])
        assert state["floor"][c] == mono["floor"][0]
    assert state["offered"] == sum(int(p.state()["offered"]) for p in planes)
    assert state["rejected"] == sum(int(p.state()["rejected"]) for p in planes)


def _sky_with_stars(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]]
    sky = np.full(shape, SKY)
    for x0, y0, flux in zip(rng.uniform(5, shape[1] - 5, 25), rng.uniform(5, shape[0] - 5, 25),
                            rng.uniform(200, 3000, 25), strict=True):
        sky += flux * np.exp(-((xs - x0) ** 2 + (ys - y0) ** 2) / (2 * 1.3**2))
    return sky


def test_kappa_sigma_removes_trails_and_cosmic_rays_like_sigma_clip() -> None:
    rng = np.random.default_rng(5)
    shape = (96, 128)
    count = 16
    truth = _sky_with_stars(shape, rng)
    frames = (truth + NOISE * rng.standard_normal((count, *shape))).astype(np.float32)
    clean = frames.copy()
    footprints = _footprints(rng, count, shape, slack=6)
    trail = np.zeros(shape, dtype=bool)
    for k, (slope, offset) in ((1, (0.4, 20.0)), (9, (-0.3, 80.0))):  # one in the warm-up, one after
        xs = np.arange(shape[1])
        for width in (-1, 0, 1):
            ys = np.round(slope * xs + offset + width).astype(int)
            inside = (ys >= 0) & (ys < shape[0])
            frames[k, ys[inside], xs[inside]] += 600.0
            trail[ys[inside], xs[inside]] = True
    cosmic = np.zeros(shape, dtype=bool)
    for k in (2, 6, 11, 14):  # in the warm-up and after
        ys, xs = rng.integers(0, shape[0], 40), rng.integers(0, shape[1], 40)
        frames[k, ys, xs] += rng.uniform(300, 5000, 40).astype(np.float32)
        cosmic[ys, xs] = True

    stack = KappaSigmaStack(shape, kappa=3.0, warmup=5)
    mean_stack = MeanStack(shape)
    for frame, footprint in zip(frames, footprints, strict=True):
        stack.add(frame, footprint)
        mean_stack.add(frame, footprint)
    result = stack.result().astype(np.float64)
    coverage = stack.coverage
    sigma_stack = NOISE / np.sqrt(np.maximum(coverage, 1))
    ideal = _quiet_nan(np.nanmean, _masked(clean, footprints), axis=0)  # the stack without any outlier
    covered = coverage > 0

    # Pixels that at least MIN_TEST_SAMPLES warm-up frames saw (see KappaSigmaStack's Notes for the rest).
    judged = footprints[:5].sum(axis=0) >= MIN_TEST_SAMPLES
    for spoiled in (trail, cosmic):
        where = spoiled & judged
        # Within 3 sigma of the outlier-free stack at every pixel, and of the true sky on average...
        assert np.all(np.abs(result - ideal)[where] < 3 * sigma_stack[where])
        assert np.sqrt(np.mean(((result - truth) / sigma_stack)[where] ** 2)) < 1.5
        # ...where the plain mean is far off, so the test can tell.
        assert np.median(np.abs(mean_stack.result() - truth)[where] / sigma_stack[where]) > 5

    # Against astropy's sigma_clip of the same cube (median centre, std scale, iterated): the means of the
    # kept samples agree closely wherever no outlier was injected.
    cube = np.ma.masked_array(frames, mask=~footprints)
    clipped = sigma_clip(cube, sigma=3.0, axis=0, maxiters=5, masked=True)
    batch = np.ma.mean(clipped, axis=0).filled(np.nan)
    quiet = covered & ~trail & ~cosmic & judged
    difference = np.abs(result - batch)[quiet] / sigma_stack[quiet]
    assert np.median(difference) < 0.05
    assert np.quantile(difference, 0.99) < 1.0
    # Where neither rejected anything they are the same mean.
    untouched = quiet & (stack.state()["n"][..., 0] == coverage) & (clipped.mask.sum(axis=0) == ~footprints
                                                                   ).all(axis=0)
    assert untouched.mean() > 0.5
    np.testing.assert_allclose(result[untouched], batch[untouched], rtol=1e-6)
    assert 0.0 < stack.rejected_fraction < 0.05


def test_kappa_sigma_warmup_result_is_already_robust() -> None:
    rng = np.random.default_rng(6)
    frames = _noisy(rng, 4, (20, 30))
    frames[1, 10, :] += 1000.0  # a trail in the second frame
    stack = KappaSigmaStack((20, 30), warmup=5)
    everywhere = np.ones((20, 30), dtype=bool)
    for frame in frames:
        stack.add(frame, everywhere)
    assert stack.rejected_fraction == 0.0  # nothing judged yet
    result = stack.result()
    assert np.all(np.abs(result[10] - SKY) < 4 * NOISE)
    assert np.isfinite(result).all()


@pytest.mark.parametrize("case", ["chi-square", "odd count", "nan holes", "ties", "few usable", "constant"])
def test_noise_floor_median_is_exactly_nanmedian(case: str) -> None:
    # The warm-up's floor takes the median of a frame-sized plane by bracketing it from a sample; whatever
    # the plane, the answer must be np.nanmedian's, bit for bit.
    rng = np.random.default_rng(8)
    plane = rng.chisquare(4, (300, 401)).astype(np.float32)
    if case == "odd count":
        plane = plane[:, :-2]
    elif case == "nan holes":
        plane[rng.random(plane.shape) < 0.3] = np.nan
        plane[:40] = np.nan
    elif case == "ties":
        plane = np.round(plane * 2).astype(np.float32) / 2
    elif case == "few usable":
        plane[rng.random(plane.shape) < 0.9995] = np.nan
    elif case == "constant":
        plane[:] = 3.25
    usable = int(np.count_nonzero(~np.isnan(plane)))
    assert _median_ignoring_nan(plane, usable) == float(np.nanmedian(plane))


def test_kappa_sigma_warmup_is_capped_by_its_memory_budget() -> None:
    frame_bytes = 50 * 60 * 3 * 4
    assert KappaSigmaStack((50, 60, 3), warmup=10, warmup_budget=6 * frame_bytes).warmup == 6
    assert KappaSigmaStack((50, 60, 3), warmup=10, warmup_budget=frame_bytes).warmup == 3
    assert KappaSigmaStack((50, 60, 3), warmup=2, warmup_budget=frame_bytes).warmup == 2
    with pytest.raises(ValueError, match="kappa"):
        KappaSigmaStack((5, 5), kappa=0.0)
    with pytest.raises(ValueError, match="warmup"):
        KappaSigmaStack((5, 5), warmup=0)


# --- median --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "count"), [((40, 52), 11), ((40, 52), 12), ((16, 20, 3), 7)])
def test_median_is_exactly_nanmedian(shape: tuple[int, ...], count: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    frames = _noisy(rng, count, shape)
    footprints = _footprints(rng, count, shape[:2], slack=20)
    stack = MedianStack(shape, tmp_path)
    for frame, footprint in zip(_spoil(frames, footprints, rng), footprints, strict=True):
        stack.add(frame, footprint, weight=2.0)
    expected = _quiet_nan(np.nanmedian, _masked(frames, footprints), axis=0)
    result = stack.result()
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, expected)
    assert (~footprints.any(axis=0)).any()  # some pixels were never covered and came out NaN above
    assert stack.cube_path is not None and stack.cube_path.parent == tmp_path
    assert stack.cube_path.stat().st_size == count * np.prod(shape) * 4


@pytest.mark.parametrize("budget", [20_000, 3_000])  # whole rows; then part of a row per block
def test_median_memory_stays_within_its_budget(budget: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    shape = (64, 96)
    count = 40
    frames = _noisy(rng, count, shape)
    stack = MedianStack(shape, tmp_path, memory_budget=budget)
    for frame in frames:
        stack.add(frame, np.ones(shape, dtype=bool))
    cube_bytes = count * frames[0].nbytes
    assert cube_bytes > 10 * budget
    tracemalloc.start()
    try:
        result = stack.result()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The block buffer, the one-block output and the result itself; nothing that grows with the cube.
    assert peak < budget + 2 * result.nbytes + 64_000, peak
    np.testing.assert_array_equal(result, np.median(frames, axis=0))


def test_kappa_sigma_warmup_end_needs_no_memory_beyond_its_buffer() -> None:
    """Judging the warm-up writes the moments over buffered frames: what it allocates stays within one
    frame (the variances) and the noise floor's sample, and afterwards the stack holds 14 bytes per pixel,
    not the buffer."""
    shape = (600, 800)  # large enough that the noise floor's median works on a sample, as on real frames
    rng = np.random.default_rng(23)
    frames = _noisy(rng, 6, shape)
    footprint = np.ones(shape, dtype=bool)
    first = KappaSigmaStack(shape, warmup=5)
    for frame in frames[:5]:  # a first stack loads the compiled kernels, which allocate on their own
        first.add(frame, footprint)
    first.settle()
    stack = KappaSigmaStack(shape, warmup=5)
    for frame in frames[:4]:
        stack.add(frame, footprint)
    frame_bytes = frames[0].nbytes
    tracemalloc.start()
    try:
        stack.add(frames[4], footprint)
        stack.settle()  # the warm-up's end
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The fifth frame's slot and the variances; separate moments would add four frames' worth.
    assert peak < 2.5 * frame_bytes, peak / frame_bytes
    # The fifth frame's slot went back; the moments took three of the four that were there, and the counts,
    # judged into the fourth as int32, now stand in half a frame as uint16 (the fourth went back too: it was
    # allocated before tracing, so its return does not show here).
    assert kept < 0.5 * frame_bytes + 200_000, kept / frame_bytes
    stack.add(frames[5], footprint)
    first.add(frames[5], footprint)
    np.testing.assert_array_equal(stack.result(), first.result())


def test_kappa_sigma_result_during_the_warmup_allocates_mean_count_and_one_scratch() -> None:
    """A picture of the stack while it warms up (the daemon's previews) judges a copy of the buffer's
    moments: the mean, the count, one scratch for the rest and the returned image; not four moments
    beside the variances."""
    shape = (600, 800)
    rng = np.random.default_rng(24)
    frames = _noisy(rng, 3, shape)
    footprint = np.ones(shape, dtype=bool)
    stack = KappaSigmaStack(shape, warmup=5)
    for frame in frames:
        stack.add(frame, footprint)
    expected = stack.result()  # loads the kernels, which allocate on their own the first time
    tracemalloc.start()
    try:
        result = stack.result()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4.5 * frames[0].nbytes, peak / frames[0].nbytes
    np.testing.assert_array_equal(result, expected)


def test_kappa_sigma_warmup_stack_taken_for_later_survives_the_warmup_ending_meanwhile() -> None:
    """``result_later`` during the warm-up reads the buffered frames when it is called: a warm-up judged in
    between (the daemon's worker, while the writer makes a picture) writes its moments over none of them, so
    the picture is the stack as it was, and the stack goes on exactly as one that lent nothing."""
    shape = (120, 160, 3)
    rng = np.random.default_rng(31)
    frames = _noisy(rng, 7, shape)
    frames[1][50:53, :, :] += 400.0  # a trail the robust warm-up rejects
    footprint = np.ones(shape[:2], dtype=bool)
    lending, plain = KappaSigmaStack(shape, warmup=5), KappaSigmaStack(shape, warmup=5)
    for frame in frames[:4]:
        lending.add(frame.copy(), footprint, owned=True)  # the frames become the buffer's slots
        plain.add(frame.copy(), footprint, owned=True)
    expected = plain.result()
    later = lending.result_later()
    lending.add(frames[4].copy(), footprint, owned=True)
    assert lending.settle()  # the warm-up's end, before the picture is computed
    np.testing.assert_array_equal(later(), expected)
    with pytest.raises(RuntimeError, match="once"):
        later()
    for frame in frames[4:]:
        plain.add(frame.copy(), footprint, owned=True)
    lending.add(frames[5].copy(), footprint, owned=True)
    lending.add(frames[6].copy(), footprint, owned=True)
    np.testing.assert_array_equal(lending.result(), plain.result())
    assert lending.rejected_fraction == plain.rejected_fraction > 0


def test_kappa_sigma_warmup_of_two_frames_is_their_weighted_mean() -> None:
    """With fewer frames than a test needs nothing is clipped (the noise floor, which only sets the limit,
    is not measured for a picture of them): the weighted mean of the valid samples, in float64."""
    shape = (90, 110)
    rng = np.random.default_rng(32)
    frames = _noisy(rng, 2, shape)
    frames[1][20:23, :] += 500.0  # kept: two samples cannot outvote each other
    masks = _footprints(rng, 2, shape)
    weights = (0.7, 1.9)
    stack = KappaSigmaStack(shape, warmup=5)
    for frame, mask, weight in zip(frames, masks, weights, strict=True):
        stack.add(frame, mask, weight)
    total = np.zeros(shape)
    weight_sum = np.zeros(shape)
    for frame, mask, weight in zip(frames, masks, weights, strict=True):
        total += np.where(mask, weight * frame.astype(np.float64), 0.0)
        weight_sum += np.where(mask, weight, 0.0)
    with np.errstate(invalid="ignore"):
        expected = np.where(weight_sum > 0, total / weight_sum, np.nan).astype(np.float32)
    np.testing.assert_array_equal(stack.result(), expected)
    np.testing.assert_array_equal(stack.result_later()(), expected)


def _block_means(image: np.ndarray, step: int) -> np.ndarray:
    """Each ``step x step`` block's mean of its finite pixels (a trailing block may be partial), NaN for a
    block with none: the reference for ``result_later(step)``."""
    planes = image if image.ndim == 3 else image[:, :, None]
    rows, cols = -(-planes.shape[0] // step), -(-planes.shape[1] // step)
    out = np.full((rows, cols, planes.shape[2]), np.nan, dtype=np.float32)
    for i in range(rows):
        for j in range(cols):
            block = planes[i * step : (i + 1) * step, j * step : (j + 1) * step].astype(np.float64)
            for c in range(planes.shape[2]):
                finite = block[:, :, c][np.isfinite(block[:, :, c])]
                if finite.size:
                    out[i, j, c] = finite.mean()
    return out if image.ndim == 3 else out[:, :, 0]


@pytest.mark.parametrize("shape", [(61, 83), (61, 83, 3)])
@pytest.mark.parametrize("method", ["mean", "kappa-sigma", "median"])
def test_a_smaller_stack_is_the_block_means_or_a_sample_of_the_stack(method: str, shape: tuple[int, ...],
                                                                    tmp_path: Path) -> None:
    """``result_later(step)``: each pixel the mean of a block's covered pixels (partial blocks at the
    right and bottom included, NaN for a block nothing covered), whether the stack keeps running moments
    (mean, kappa-sigma before and after its warm-up) or makes the whole stack first (median);
    ``sample=True``: ``result()[::step, ::step]`` exactly."""
    rng = np.random.default_rng(41)
    frames = _noisy(rng, 5, shape)
    masks = _footprints(rng, 5, shape[:2], slack=20)
    masks[:, :, :9] = False  # whole blocks that no frame covers
    frames[~masks] = np.nan  # as a warp leaves outside the footprint
    stack = make_accumulator(method, shape, warmup=3, directory=tmp_path)
    for count, (frame, mask) in enumerate(zip(frames, masks, strict=True), start=1):
        stack.add(frame, mask)
        whole = stack.result()
        for step in (1, 2, 4, 7):
            smaller = stack.result_later(step)()
            assert smaller.dtype == np.float32 and smaller.shape[2:] == shape[2:]
            np.testing.assert_allclose(smaller, _block_means(whole, step), rtol=2e-7, atol=0,
                                       err_msg=f"{method}, {count} frames, step {step}")
            assert np.isnan(smaller[:, :9 // step]).all()
            np.testing.assert_array_equal(stack.result_later(step, sample=True)(), whole[::step, ::step])
        np.testing.assert_array_equal(stack.result_later(1)(), whole)
        # The whole stack into a caller's buffer: running moments write it there (kappa-sigma once its
        # warm-up of 3 frames is judged, by the 4th), the others make a new array.
        kept = np.full(shape, -1.0, dtype=np.float32)
        given = stack.result_later(into=lambda wanted, array=kept: array)()
        np.testing.assert_array_equal(given, whole)
        assert (given is kept) == (method == "mean" or (method == "kappa-sigma" and count > 3))
        if given is kept:
            with pytest.raises(ValueError, match="into gave"):
                stack.result_later(into=lambda wanted: np.empty(wanted, dtype=np.float64))


def test_block_shape_respects_the_budget() -> None:
    for count in (1, 7, 50, 4000):
        for width, channels in ((3840, 1), (6000, 3), (100, 1)):
            for budget in (1 << 12, 1 << 20, 256 << 20):
                rows, cols = _block_shape(count, 2000, width, channels, budget)
                assert rows >= 1 and 1 <= cols <= width
                block = count * rows * cols * channels * 4
                assert block <= budget or cols == 1  # a single pixel of every frame is the floor
                assert rows == 1 or cols == width


def test_median_refuses_frames_beyond_max_frames(tmp_path: Path) -> None:
    stack = MedianStack((4, 4), tmp_path, max_frames=2)
    for _ in range(2):
        stack.add(np.zeros((4, 4), dtype=np.float32), np.ones((4, 4), dtype=bool))
    with pytest.raises(ValueError, match="full"):
        stack.add(np.zeros((4, 4), dtype=np.float32), np.ones((4, 4), dtype=bool))
    assert stack.count == 2
    stack.discard()
    assert list(tmp_path.iterdir()) == []


# --- checkpoints ---------------------------------------------------------------------------------------


def _through_disk(state: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    np.savez(path, **state)  # type: ignore[arg-type]  # numpy's stub types keyword arrays as its options
    with np.load(path, allow_pickle=False) as loaded:
        return {key: loaded[key] for key in loaded.files}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("split", [2, 7])  # during the kappa-sigma warm-up, and after it
def test_restore_then_continue_equals_uninterrupted(method: str, split: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    shape = (30, 36, 3)
    frames = _noisy(rng, 12, shape)
    frames[rng.random(frames.shape) < 0.01] += 900.0
    footprints = _footprints(rng, 12, shape[:2])
    weights = rng.uniform(0.5, 2.0, 12)

    def build(directory: Path) -> Accumulator:
        return make_accumulator(method, shape, kappa=2.5, warmup=5, directory=directory)

    whole = build(tmp_path / "whole")
    for frame, footprint, weight in zip(frames, footprints, weights, strict=True):
        whole.add(frame, footprint, weight)

    first = build(tmp_path / "resumed")
    for k in range(split):
        first.add(frames[k], footprints[k], weights[k])
    state = _through_disk(first.state(), tmp_path / "state.npz")
    second = build(tmp_path / "resumed")
    second.restore(state)
    for k in range(split, 12):
        second.add(frames[k], footprints[k], weights[k])

    np.testing.assert_array_equal(second.result(), whole.result())
    np.testing.assert_array_equal(second.coverage, whole.coverage)
    assert second.count == whole.count == 12
    assert second.rejected_fraction == whole.rejected_fraction


def test_median_restore_drops_a_half_written_frame(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    frames = _noisy(rng, 6, (20, 24))
    everywhere = np.ones((20, 24), dtype=bool)
    stack = MedianStack((20, 24), tmp_path)
    for frame in frames[:3]:
        stack.add(frame, everywhere)
    state = stack.state()
    assert stack.cube_path is not None
    with open(stack.cube_path, "ab") as cube:  # the daemon died while appending the fourth frame
        cube.write(np.full(100, 7e7, dtype=np.float32).tobytes())
    resumed = MedianStack((20, 24), tmp_path)
    resumed.restore(state)
    assert stack.cube_path.stat().st_size == 3 * frames[0].nbytes
    for frame in frames[3:]:
        resumed.add(frame, everywhere)
    np.testing.assert_array_equal(resumed.result(), np.median(frames, axis=0))


def test_restore_refuses_inconsistent_states(tmp_path: Path) -> None:
    mean = MeanStack((8, 8))
    mean.add(np.ones((8, 8), dtype=np.float32), np.ones((8, 8), dtype=bool))
    with pytest.raises(StateError, match="shape"):
        MeanStack((8, 9)).restore(mean.state())
    with pytest.raises(StateError, match="kappa-sigma"):
        KappaSigmaStack((8, 8)).restore(mean.state())
    median = MedianStack((8, 8), tmp_path)
    median.add(np.ones((8, 8), dtype=np.float32), np.ones((8, 8), dtype=bool))
    state = median.state()
    median.discard()
    with pytest.raises(StateError, match="cannot be found"):
        MedianStack((8, 8), tmp_path).restore(state)


# --- factory and input checks --------------------------------------------------------------------------


def test_make_accumulator(tmp_path: Path) -> None:
    assert isinstance(make_accumulator("mean", (4, 4)), MeanStack)
    kappa = make_accumulator("kappa-sigma", (4, 4), kappa=2.0, warmup=4)
    assert isinstance(kappa, KappaSigmaStack) and kappa.warmup == 4
    assert isinstance(make_accumulator("median", (4, 4), directory=tmp_path), MedianStack)
    with pytest.raises(ValueError, match="mean, kappa-sigma, median"):
        make_accumulator("sum", (4, 4))
    with pytest.raises(ValueError, match="directory"):
        make_accumulator("median", (4, 4))
    assert list(tmp_path.iterdir()) == []  # the cube appears with the first frame, not before


def test_add_refuses_mismatched_frames(tmp_path: Path) -> None:
    for stack in _all_methods((6, 8), tmp_path):
        with pytest.raises(ValueError, match="image"):
            stack.add(np.zeros((6, 9), dtype=np.float32), np.ones((6, 8), dtype=bool))
        with pytest.raises(ValueError, match="footprint"):
            stack.add(np.zeros((6, 8), dtype=np.float32), np.ones((6, 9), dtype=bool))
        with pytest.raises(ValueError, match="weight"):
            stack.add(np.zeros((6, 8), dtype=np.float32), np.ones((6, 8), dtype=bool), weight=0.0)
        assert stack.count == 0
    with pytest.raises(ValueError, match="shape"):
        MeanStack((6,))


def test_kappa_sigma_judges_a_full_warmup_when_asked_or_at_the_next_frame_with_the_same_stack() -> None:
    # The frame that fills the warm-up is only buffered, so that a live caller can judge the buffer after the
    # frame's verdict has gone out; the stack is the same whenever the judging happens.
    shape = (120, 160, 3)
    rng = np.random.default_rng(5)
    frames = _noisy(rng, 8, shape)
    frames[2][40:44, :, :] += 500.0  # a trail for the warm-up to reject
    footprint = np.ones(shape[:2], dtype=bool)
    late, early = KappaSigmaStack(shape, warmup=5), KappaSigmaStack(shape, warmup=5)
    for i, frame in enumerate(frames):
        late.add(frame, footprint)
        early.add(frame, footprint)
        if i == 4:
            assert not early.settled
            waiting = early.result()
            early.settle()
            assert early.settled and early.rejected_fraction > 0
            np.testing.assert_allclose(early.result(), waiting, rtol=1e-6)
            resumed = KappaSigmaStack(shape, warmup=5)
            resumed.restore(late.state())  # a checkpoint taken while the judging waits
    resumed.add(frames[5], footprint)
    resumed.add(frames[6], footprint)
    resumed.add(frames[7], footprint)
    np.testing.assert_array_equal(early.result(), late.result())
    np.testing.assert_array_equal(resumed.result(), late.result())
