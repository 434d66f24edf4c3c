"""warp: sub-pixel geometry, footprint exactness, colour, input checks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from warp_reference import takes_two_passes, two_pass_reference

from livestack.stages.warp import INTERPOLATIONS, warp

_SUPPORT = {"bilinear": (0, 1), "bicubic": (1, 2), "lanczos": (3, 4)}
# Centroid accuracy per kernel. Bilinear reproduces a linear ramp exactly (measured error < 0.001 px).
# OpenCV's bicubic (Keys, a = -0.75) does not: a ramp shifted by 0.25 px comes out 0.047 px off, so a star's
# centroid moves by up to 0.048 px depending on the sub-pixel phase; Lanczos-4 by up to 0.015 px, plus its
# 1/32 px position rounding.
_CENTROID_TOLERANCE = {"bilinear": 0.02, "bicubic": 0.05, "lanczos": 0.03}
_FLAGS = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "lanczos": cv2.INTER_LANCZOS4}


def _similarity(angle_deg: float, tx: float, ty: float, scale: float = 1.0) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    c, s = scale * np.cos(a), scale * np.sin(a)
    return np.array([[c, -s, tx], [s, c, ty]])


def _gaussian_star(shape: tuple[int, int], x0: float, y0: float, sigma: float = 1.5) -> np.ndarray:
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]]
    return np.exp(-((xs - x0) ** 2 + (ys - y0) ** 2) / (2 * sigma**2)).astype(np.float32)


def _centroid(image: np.ndarray, x: float, y: float, half: int = 9) -> tuple[float, float]:
    x0, y0 = round(x), round(y)
    cut = image[y0 - half : y0 + half + 1, x0 - half : x0 + half + 1].astype(np.float64)
    ys, xs = np.mgrid[y0 - half : y0 + half + 1, x0 - half : x0 + half + 1]
    return float((cut * xs).sum() / cut.sum()), float((cut * ys).sum() / cut.sum())


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize(("angle", "tx", "ty"), [(0.0, 0.37, -0.81), (0.0, 3.25, 2.5), (0.7, 1.13, -2.4),
                                                 (-0.3, -0.6, 0.45), (179.2, 255.3, 191.7)])
def test_star_lands_where_the_matrix_sends_it(interpolation: str, angle: float, tx: float,
                                              ty: float) -> None:
    shape = (192, 256)
    rng = np.random.default_rng(7)
    matrix = _similarity(angle, tx, ty)
    for _ in range(4):
        x, y = rng.uniform(60, 190), rng.uniform(50, 140)
        aligned, footprint = warp(_gaussian_star(shape, x, y), matrix, shape, interpolation)
        expected = matrix @ np.array([x, y, 1.0])
        assert footprint[round(expected[1]), round(expected[0])]
        got = _centroid(aligned, *expected)
        tolerance = _CENTROID_TOLERANCE[interpolation]
        error = np.abs(np.array(got) - expected)
        assert error.max() < tolerance, (got, expected)


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("matrix", [_similarity(0, 0.3, 0.6), _similarity(0, 0, 0),
                                    _similarity(1.1, 1.3, -2.6), _similarity(-17, -5.3, 40.6, 0.97),
                                    _similarity(180, 299.5, 199.3)])
def test_footprint_is_exactly_where_the_support_is_inside(interpolation: str, matrix: np.ndarray) -> None:
    rng = np.random.default_rng(3)
    frame = (rng.random((200, 300)) * 100 + 1).astype(np.float32)
    shape = (210, 290)
    aligned, footprint = warp(frame, matrix, shape, interpolation)
    assert footprint.dtype == np.bool_ and footprint.shape == shape
    assert np.isnan(aligned[~footprint]).all() and np.isfinite(aligned[footprint]).all()
    # Inside the footprint no output value may depend on what lies beyond the frame's edge.
    flags = _FLAGS[interpolation]
    low = cv2.warpAffine(frame, matrix, shape[::-1], flags=flags, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=0)
    high = cv2.warpAffine(frame, matrix, shape[::-1], flags=flags, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=1e6)
    assert np.array_equal(low[footprint], high[footprint])
    if interpolation == "bicubic" and takes_two_passes(matrix):
        # The compiled two-pass bicubic: against its definition in float64, which indexes the frame itself
        # (an index outside it would raise or wrap, and the values would differ).
        ys, xs = np.nonzero(footprint)
        np.testing.assert_allclose(aligned[ys, xs], two_pass_reference(frame, matrix, ys, xs), rtol=2e-5,
                                   atol=2e-4)
    else:
        np.testing.assert_array_equal(aligned[footprint], low[footprint])
    # And it is not needlessly small: every pixel whose support is 0.1 px clear of the edges is in it.
    before, after = _SUPPORT[interpolation]
    inverse = cv2.invertAffineTransform(matrix)
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]]
    u = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    v = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    clear = ((u >= before + 0.1) & (u <= frame.shape[1] - after - 0.1)
             & (v >= before + 0.1) & (v <= frame.shape[0] - after - 0.1))
    assert (footprint | ~clear).all()
    assert footprint.sum() >= clear.sum()


def test_bilinear_is_exact_on_a_ramp_and_bicubic_is_not() -> None:
    # Pins down the kernel property behind the tolerances above; if OpenCV changes its cubic, this says so.
    ramp = np.tile(np.arange(64, dtype=np.float32), (32, 1))
    matrix = _similarity(0, 0.25, 0)
    linear, footprint = warp(ramp, matrix, ramp.shape, "bilinear")
    cubic, cubic_footprint = warp(ramp, matrix, ramp.shape, "bicubic")
    expected = np.arange(64) - 0.25
    np.testing.assert_allclose(linear[16][footprint[16]], expected[footprint[16]], atol=1e-4)
    assert np.abs(cubic[16][cubic_footprint[16]] - expected[cubic_footprint[16]]).max() > 0.03


def test_colour_channels_share_one_transform() -> None:
    rng = np.random.default_rng(5)
    frame = rng.random((120, 160, 3)).astype(np.float32)
    matrix = _similarity(2.0, 3.3, -1.7)
    aligned, footprint = warp(frame, matrix, (110, 150), "bicubic")
    assert aligned.shape == (110, 150, 3) and aligned.dtype == np.float32
    for c in range(3):
        mono, mono_footprint = warp(np.ascontiguousarray(frame[:, :, c]), matrix, (110, 150), "bicubic")
        np.testing.assert_array_equal(mono_footprint, footprint)
        np.testing.assert_array_equal(aligned[:, :, c][footprint], mono[footprint])


def test_single_channel_axis_and_integer_input_are_kept() -> None:
    frame = np.arange(40 * 50, dtype=np.uint16).reshape(40, 50)
    aligned, footprint = warp(frame[:, :, None], _similarity(0, 0.5, 0.25), (40, 50))
    assert aligned.shape == (40, 50, 1) and aligned.dtype == np.float32
    # Bilinear interpolation of a linear ramp is exact.
    ys, xs = np.nonzero(footprint)
    expected = (ys - 0.25) * 50 + (xs - 0.5)
    np.testing.assert_allclose(aligned[ys, xs, 0], expected, rtol=1e-6)


def test_input_is_not_modified() -> None:
    frame = np.ones((30, 40), dtype=np.float32)
    before = frame.copy()
    warp(frame, _similarity(10, 2, 2), (30, 40), "lanczos")
    np.testing.assert_array_equal(frame, before)


def test_bad_inputs_are_refused_in_one_sentence() -> None:
    frame = np.zeros((10, 10), dtype=np.float32)
    with pytest.raises(ValueError, match="bilinear, bicubic, lanczos"):
        warp(frame, np.eye(2, 3), (10, 10), "nearest")
    with pytest.raises(ValueError, match="2x3"):
        warp(frame, np.eye(3), (10, 10))
    with pytest.raises(ValueError, match="singular"):
        warp(frame, np.zeros((2, 3)), (10, 10))
    with pytest.raises(ValueError, match="channels"):
        warp(np.zeros((10, 10, 5), dtype=np.float32), np.eye(2, 3), (10, 10))
    with pytest.raises(ValueError, match="shape"):
        warp(frame, np.eye(2, 3), (0, 10))


def test_frame_mapped_off_the_grid_has_an_empty_footprint() -> None:
    aligned, footprint = warp(np.ones((20, 20), dtype=np.float32), _similarity(0, 500, 0), (20, 20))
    assert not footprint.any() and np.isnan(aligned).all()


def _star_field(shape: tuple[int, int], stars: list[tuple[float, float, float]]) -> np.ndarray:
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]]
    image = np.full(shape, 100.0)
    for x, y, sigma in stars:
        image += 1000.0 * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
    return image


@pytest.mark.parametrize("angle", [0.0, 0.3, 1.0, 1.6, 179.5, -0.2])
def test_two_pass_bicubic_moves_stars_as_truly_as_opencv(angle: float) -> None:
    # Small rotations and flips take the compiled two-pass path; OpenCV's warpAffine stays the yardstick:
    # against the star field rendered where the matrix sends each star, the two errors are the same.
    shape = (300, 400)
    rng = np.random.default_rng(2)
    stars = [(rng.uniform(20, 380), rng.uniform(20, 280), rng.uniform(1.0, 1.8)) for _ in range(60)]
    flip = abs(angle) > 90
    matrix = _similarity(angle, 0.37 + (399 if flip else 0), -0.81 + (299 if flip else 0))
    assert takes_two_passes(matrix)
    moved = [(*(matrix @ np.array([x, y, 1.0])), sigma) for x, y, sigma in stars]
    truth = _star_field(shape, moved)
    frame = _star_field(shape, stars).astype(np.float32)
    aligned, footprint = warp(frame, matrix, shape, "bicubic")
    opencv = cv2.warpAffine(frame, matrix, shape[::-1], flags=cv2.INTER_CUBIC)
    inner = np.zeros(shape, dtype=bool)
    inner[25:-25, 25:-25] = True
    inner &= footprint
    ours = np.sqrt(np.mean((aligned[inner] - truth[inner]) ** 2))
    theirs = np.sqrt(np.mean((opencv[inner] - truth[inner]) ** 2))
    assert ours <= 1.01 * theirs, (ours, theirs)
    # And pixel by pixel the two stay within 0.3% of a star's peak (identical for a shift).
    assert np.abs(aligned[footprint] - opencv[footprint]).max() < 3.0


def test_two_pass_nan_pixels_spoil_only_their_4x4_neighbourhood() -> None:
    rng = np.random.default_rng(8)
    frame = rng.random((120, 160)).astype(np.float32)
    frame[60, 70] = np.nan
    matrix = _similarity(0.4, 3.3, -1.7)
    assert takes_two_passes(matrix)
    aligned, footprint = warp(frame, matrix, (110, 150), "bicubic")
    ys, xs = np.nonzero(np.isnan(aligned) & footprint)
    inverse = cv2.invertAffineTransform(matrix)
    u = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    v = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    assert 9 <= len(xs) <= 16
    assert (np.abs(u - 70) < 2.01).all() and (np.abs(v - 60) < 2.01).all()


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("angle", [0.4, 12.0])
@pytest.mark.parametrize("channels", [0, 1, 3])
def test_warping_into_given_arrays_gives_the_same_result(interpolation: str, angle: float,
                                                         channels: int) -> None:
    rng = np.random.default_rng(4)
    frame = rng.random((90, 120, channels) if channels else (90, 120)).astype(np.float32)
    matrix = _similarity(angle, 2.2, -3.1)
    fresh, fresh_fp = warp(frame, matrix, (80, 110), interpolation)
    out = (np.full(fresh.shape, 7.0, dtype=np.float32), np.ones((80, 110), dtype=bool))
    aligned, footprint = warp(frame, matrix, (80, 110), interpolation, out=out)
    assert aligned is out[0] and footprint is out[1]
    np.testing.assert_array_equal(footprint, fresh_fp)
    np.testing.assert_array_equal(aligned, fresh)  # NaN outside the footprint in both
    # Arrays that do not fit are not used.
    wrong = (np.zeros((80, 111), dtype=np.float32), np.zeros((80, 111), dtype=bool))
    again, _ = warp(frame, matrix, (80, 110), interpolation, out=wrong)
    assert again is not wrong[0] and not wrong[0].any()
    np.testing.assert_array_equal(again, fresh)
