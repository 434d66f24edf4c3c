"""max and mean-without-max accumulators, checked against numpy on the same samples."""

from __future__ import annotations

import numpy as np
import pytest

from livestack.stages.stack import MaxStack, MeanWithoutMaxStack, make_accumulator


def _frames(seed: int, count: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    frames = (1000.0 + 10.0 * rng.standard_normal((count, *shape))).astype(np.float32)
    footprints = np.ones((count, *shape[:2]), dtype=bool)
    for k in range(count):
        top, left = rng.integers(0, 6, 2)
        footprints[k, :top] = False
        footprints[k, :, :left] = False
    return frames, footprints


def _cube(frames: np.ndarray, footprints: np.ndarray) -> np.ndarray:
    mask = footprints if frames.ndim == footprints.ndim else footprints[..., None]
    return np.where(mask, frames.astype(np.float64), np.nan)


@pytest.mark.parametrize("shape", [(30, 40), (20, 24, 3)])
def test_max_is_nanmax(shape: tuple[int, ...]) -> None:
    frames, footprints = _frames(1, 7, shape)
    stack = MaxStack(shape)
    for frame, footprint in zip(frames, footprints, strict=True):
        stack.add(frame, footprint)
    cube = _cube(frames, footprints)
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):
        expected = np.nanmax(cube, axis=0)
    np.testing.assert_array_equal(stack.result(), expected.astype(np.float32))
    assert stack.count == 7 and stack.method == "max"


@pytest.mark.parametrize("shape", [(30, 40), (20, 24, 3)])
def test_mean_without_max_drops_each_pixels_largest_sample(shape: tuple[int, ...]) -> None:
    frames, footprints = _frames(2, 6, shape)
    weights = np.array([1.0, 2.0, 0.5, 1.5, 1.0, 3.0])
    stack = MeanWithoutMaxStack(shape)
    for frame, footprint, weight in zip(frames, footprints, weights, strict=True):
        stack.add(frame, footprint, weight)
    cube = _cube(frames, footprints)
    # Independent answer: per pixel, sort the samples, drop the largest, weighted mean of the rest.
    w = np.broadcast_to(weights.reshape((-1,) + (1,) * len(shape)), cube.shape)
    w = np.where(np.isnan(cube), 0.0, w)
    top = np.nanargmax(np.where(np.isnan(cube), -np.inf, cube), axis=0)
    keep = np.ones(cube.shape, dtype=bool)
    np.put_along_axis(keep, top[None], False, axis=0)
    kept_w = np.where(keep, w, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.nansum(np.where(keep, cube, 0.0) * kept_w, axis=0) / kept_w.sum(axis=0)
    covered = (~np.isnan(cube)).sum(axis=0)
    single = covered == 1
    expected[single] = np.nanmax(np.where(np.isnan(cube), -np.inf, cube), axis=0)[single]
    np.testing.assert_allclose(stack.result(), expected, rtol=1e-6)


def test_mean_without_max_removes_a_satellite_in_a_three_frame_stack() -> None:
    shape = (40, 50)
    frames, footprints = _frames(3, 3, shape)
    footprints[:] = True
    frames[1, 20, :] += 3000.0  # a satellite trail across row 20 of the second frame
    plain = make_accumulator("mean", shape)
    clean = make_accumulator("mean-without-max", shape)
    for frame, footprint in zip(frames, footprints, strict=True):
        plain.add(frame, footprint)
        clean.add(frame, footprint)
    assert plain.result()[20].mean() > 1900.0
    assert abs(float(clean.result()[20].mean()) - 1000.0) < 15.0
    assert clean.rejected_fraction == pytest.approx(1 / 3)
