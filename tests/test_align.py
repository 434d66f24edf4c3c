"""Tests of livestack.stages.align: seeded synthetic skies through known transforms, and real sequences."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from livestack.simulate import render_stars
from livestack.stages.align import Alignment, AlignParams, Transform, align
from livestack.stages.detect import Stars, detect

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAPE = (480, 640)  # rows, columns


def similarity(rotation_deg: float, shift: tuple[float, float], scale: float = 1.0,
               shape: tuple[int, int] = SHAPE) -> np.ndarray:
    """Frame-to-reference matrix: rotate about the frame centre, then shift the centre by ``shift``."""
    c, s = np.cos(np.radians(rotation_deg)) * scale, np.sin(np.radians(rotation_deg)) * scale
    linear = np.array([[c, -s], [s, c]])
    centre = np.array([(shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0])
    return np.column_stack([linear, centre + np.asarray(shift) - linear @ centre])


def sky(density: int, seed: int, shape: tuple[int, int] = SHAPE) -> tuple[np.ndarray, ...]:
    """A star catalogue in reference pixels, ``density`` stars per frame area, covering any view."""
    rng = np.random.default_rng(seed)
    radius = float(np.hypot(*shape))
    n = int(density * (2 * radius) ** 2 / (shape[0] * shape[1]))
    x = rng.uniform(-radius, radius, n) + shape[1] / 2
    y = rng.uniform(-radius, radius, n) + shape[0] / 2
    flux = 3e3 * 100 ** rng.uniform(size=n)
    return x, y, flux


def observe(catalogue: tuple[np.ndarray, ...], matrix: np.ndarray, seed: int,
            shape: tuple[int, int] = SHAPE) -> np.ndarray:
    """The image a frame whose pixels map onto the reference by ``matrix`` records, with noise."""
    x, y, flux = catalogue
    inverse = np.linalg.inv(matrix[:, :2])
    fx, fy = inverse @ (np.column_stack([x, y]) - matrix[:, 2]).T
    seen = (fx > -15) & (fx < shape[1] + 15) & (fy > -15) & (fy < shape[0] + 15)
    expected = render_stars(shape, fx[seen], fy[seen], flux[seen], fwhm=3.0) + 800.0
    rng = np.random.default_rng(seed)
    return (rng.poisson(expected) + rng.normal(0.0, 5.0, shape)).astype(np.float32)


def grid_error(transform: Transform, truth: np.ndarray, shape: tuple[int, int] = SHAPE) -> float:
    """RMS distance between the found and the true mapping over a grid spanning the frame, pixels."""
    gx, gy = np.meshgrid(np.linspace(0, shape[1] - 1, 9), np.linspace(0, shape[0] - 1, 7))
    points = np.column_stack([gx.ravel(), gy.ravel()])
    expected = points @ truth[:, :2].T + truth[:, 2]
    return float(np.sqrt(np.mean(np.sum((transform.apply(points) - expected) ** 2, axis=1))))


def angle_difference(a: float, b: float) -> float:
    return abs((a - b + 180.0) % 360.0 - 180.0)


def stars_of(image: np.ndarray) -> Stars:
    return detect(image, max_stars=5000)[0]


def accepted(result: Alignment) -> Transform:
    assert result.ok, result.reason
    assert result.transform is not None
    return result.transform


@pytest.mark.parametrize("density", [30, 300, 3000])
@pytest.mark.parametrize(("rotation", "shift"), [(0.0, (213.0, -160.0)), (37.0, (60.0, 40.0)),
                                                 (180.0, (-150.0, 100.0))],
                         ids=["shift-third", "rot37", "flip180"])
def test_recovers_known_transform(density: int, rotation: float, shift: tuple[float, float]) -> None:
    if density == 30 and rotation == 0.0:
        shift = (120.0, -90.0)  # a third of the frame leaves 30-star fields ~13 stars in common
    catalogue = sky(density, seed=density)
    truth = similarity(rotation, shift)
    reference = stars_of(observe(catalogue, similarity(0.0, (0.0, 0.0)), seed=1))
    frame = stars_of(observe(catalogue, truth, seed=2))
    transform = accepted(align(reference, frame))
    assert grid_error(transform, truth) <= 0.05
    assert angle_difference(transform.rotation, rotation) <= 0.01
    assert -180.0 < transform.rotation <= 180.0
    assert transform.scale == pytest.approx(1.0, abs=2e-4)
    if rotation != 0.0:
        assert transform.method == "triangles"
    assert transform.matched_fraction >= 0.5
    assert transform.rms < 0.2


def test_fast_path_when_the_guess_is_close() -> None:
    catalogue = sky(300, seed=3)
    truth = similarity(0.4, (30.0, -12.0))
    reference = stars_of(observe(catalogue, similarity(0.0, (0.0, 0.0)), seed=1))
    frame = stars_of(observe(catalogue, truth, seed=2))
    # The previous frame's transform: 6 px and 0.1 degree away from this one.
    guess = accepted(align(reference, stars_of(observe(catalogue, similarity(0.3, (25.0, -9.0)), seed=3))))
    transform = accepted(align(reference, frame, guess=guess))
    assert transform.method == "fast"
    assert grid_error(transform, truth) <= 0.05


def test_drifting_sequence_with_chained_guesses() -> None:
    catalogue = sky(200, seed=4)
    reference = stars_of(observe(catalogue, similarity(0.0, (0.0, 0.0)), seed=10))
    guess = None
    for step in range(1, 6):
        truth = similarity(0.03 * step, (4.0 * step, -2.5 * step))
        transform = accepted(align(reference, stars_of(observe(catalogue, truth, seed=10 + step)), guess))
        assert transform.method == "fast"
        assert grid_error(transform, truth) <= 0.05
        guess = transform


def test_spurious_stars_are_rejected() -> None:
    catalogue = sky(150, seed=5)
    truth = similarity(2.0, (-20.0, 15.0))
    reference = stars_of(observe(catalogue, similarity(0.0, (0.0, 0.0)), seed=1))
    frame = stars_of(observe(catalogue, truth, seed=2))
    # Interleave 40% spurious detections (hot pixels, satellites) among the real stars, bright ones too.
    rng = np.random.default_rng(6)
    n_fake = int(0.4 * len(frame))
    fake_xy = rng.uniform([0, 0], [SHAPE[1] - 1, SHAPE[0] - 1], (n_fake, 2))
    fake_flux = rng.choice(frame.flux, n_fake)
    xy = np.vstack([frame.xy, fake_xy])
    flux = np.concatenate([frame.flux, fake_flux])
    order = np.argsort(-flux)
    zeros = np.zeros(len(order))
    noisy = Stars(x=xy[order, 0], y=xy[order, 1], flux=flux[order], fwhm=zeros, a=zeros, b=zeros,
                  theta=zeros, flags=zeros.astype(np.int64), shape=frame.shape)
    for guess in (None, Transform.identity()):
        transform = accepted(align(reference, noisy, guess=guess))
        assert grid_error(transform, truth) <= 0.05
        assert transform.inliers <= len(frame)


def test_affine_model() -> None:
    catalogue = sky(300, seed=7)
    truth = similarity(0.0, (5.0, 3.0))
    truth[:, :2] = truth[:, :2] @ np.array([[1.0, 0.004], [0.0, 0.997]])  # a slight shear and squash
    reference = stars_of(observe(catalogue, similarity(0.0, (0.0, 0.0)), seed=1))
    frame = stars_of(observe(catalogue, truth, seed=2))
    transform = accepted(align(reference, frame, params=AlignParams(model="affine")))
    assert grid_error(transform, truth) <= 0.05
    assert accepted(align(reference, frame)).rms > transform.rms  # a similarity cannot shear


def test_too_few_stars_is_a_reason() -> None:
    catalogue = sky(100, seed=8)
    reference = stars_of(observe(catalogue, similarity(0.0, (0.0, 0.0)), seed=1))
    few = dataclasses.replace(reference, x=reference.x[:3], y=reference.y[:3], flux=reference.flux[:3])
    result = align(reference, few)
    assert not result.ok and result.transform is None
    assert result.reason == "3 stars found (at least 8 needed)"
    assert "reference" in str(align(few, reference).reason)


def test_unrelated_field_is_a_reason() -> None:
    reference = stars_of(observe(sky(200, seed=9), similarity(0.0, (0.0, 0.0)), seed=1))
    elsewhere = stars_of(observe(sky(200, seed=99), similarity(0.0, (0.0, 0.0)), seed=2))
    # A failing triangle search is exhaustive: 0.3-2.5 s with 50 stars, so the second case uses 30.
    for guess, params in ((None, AlignParams()), (Transform.identity(), AlignParams(triangle_stars=30))):
        result = align(reference, elsewhere, guess=guess, params=params)
        assert not result.ok
        assert isinstance(result.reason, str) and result.reason


def test_clustered_matches_are_a_reason() -> None:
    catalogue = sky(300, seed=10)
    reference = stars_of(observe(catalogue, similarity(0.0, (0.0, 0.0)), seed=1))
    frame = stars_of(observe(catalogue, similarity(0.0, (1.0, 1.0)), seed=2))
    corner = (frame.x < 80) & (frame.y < 80)
    clustered = dataclasses.replace(frame, x=frame.x[corner], y=frame.y[corner], flux=frame.flux[corner])
    result = align(reference, clustered, params=AlignParams(min_inliers=5))
    assert not result.ok
    assert "span only" in str(result.reason)


def test_scale_out_of_range_is_a_reason() -> None:
    catalogue = sky(300, seed=11)
    reference = stars_of(observe(catalogue, similarity(0.0, (0.0, 0.0)), seed=1))
    frame = stars_of(observe(catalogue, similarity(0.0, (0.0, 0.0), scale=1.25), seed=2))
    result = align(reference, frame)
    assert not result.ok and "scale" in str(result.reason)
    loose = accepted(align(reference, frame, params=AlignParams(scale_tolerance=0.3)))
    assert loose.scale == pytest.approx(1.25, abs=1e-3)


def test_identity() -> None:
    identity = Transform.identity()
    assert identity.method == "reference" and identity.rotation == 0.0 and identity.scale == 1.0
    xy = np.array([[1.5, 2.0], [100.0, -3.0]])
    assert np.array_equal(identity.apply(xy), xy)
    assert not identity.matrix.flags.writeable


# ---------------------------------------------------------------------------------------------- real data

SEQUENCES = {
    # folder: (file glob, colour mosaic?, rotation tolerance in degrees)
    "seestar_m94_run2": ("*.fit", True, 0.02),
    "donuts_nites_J1749": ("*.fit", False, 0.02),
    # transforms.csv's rotations here come from ~60 stars fitted to 0.3 px RMS (+-0.011 deg, 1 sigma);
    # fits of 60, 200, 500 and 1000 stars at 0.05 px RMS agree with each other to 0.001 deg and with the
    # CSV to 0.027 deg at worst, which moves the frame's corner by 0.2 px.
    "microobs_hatp32_first30": ("*.FITS", False, 0.03),
    "pocs_kic8462852_dslr_pair": ("*.fits*", True, 0.02),
}


def _luminance_stars(path: Path, mosaic: bool) -> Stars:
    """Stars of a frame in full-resolution pixels; a Bayer mosaic is summed into 2x2 superpixels."""
    from astropy.io import fits

    with fits.open(path) as hdul:
        data = next(h.data for h in hdul if h.data is not None and h.data.ndim == 2)
        image = np.asarray(data, dtype=np.float32)
    if not mosaic:
        return detect(image)[0]
    superpixels = image[0::2, 0::2] + image[1::2, 0::2] + image[0::2, 1::2] + image[1::2, 1::2]
    stars = detect(superpixels)[0]
    # Superpixel k covers full-resolution pixels 2k and 2k + 1.
    return dataclasses.replace(stars, x=2 * stars.x + 0.5, y=2 * stars.y + 0.5, shape=image.shape)


@pytest.mark.parametrize("folder", list(SEQUENCES))
def test_real_sequences_agree_with_transforms_csv(folder: str) -> None:
    path = DATA / folder
    if not path.is_dir():
        pytest.skip(f"real frames not found at {path} (they live beside the repository, not in it)")
    pattern, mosaic, rotation_tolerance = SEQUENCES[folder]
    with open(path / "transforms.csv", newline="") as handle:
        rows = {row["file"]: row for row in csv.DictReader(handle)}
    files = sorted(path.glob(pattern), key=lambda p: rows[p.name]["date_obs"])
    assert len(files) == len(rows)
    reference = _luminance_stars(files[0], mosaic)
    guess = None
    for file in files[1:]:
        stars = _luminance_stars(file, mosaic)
        transform = accepted(align(reference, stars, guess=guess))
        guess = transform  # as the live pipeline chains them
        # transforms.csv: dx, dy = where the frame's centre lands in the reference, minus the centre.
        dx, dy = transform.centre_shift(stars.shape)
        row = rows[file.name]
        assert dx == pytest.approx(float(row["dx"]), abs=0.3), file.name
        assert dy == pytest.approx(float(row["dy"]), abs=0.3), file.name
        assert angle_difference(transform.rotation, float(row["rot_deg"])) <= rotation_tolerance, file.name
        assert transform.scale == pytest.approx(float(row["scale"]), abs=5e-4), file.name


def test_centre_shift_is_where_the_frame_centre_lands_minus_the_centre() -> None:
    shape = (300, 401)
    matrix = similarity(37.0, (12.5, -4.25), shape=shape)  # rotates about the centre, then shifts it
    transform = Transform(matrix=matrix, rotation=37.0, scale=1.0, inliers=10, rms=0.0, matched_fraction=1.0,
                          method="fast")
    assert transform.centre_shift(shape) == pytest.approx((12.5, -4.25), abs=1e-9)
    assert Transform.identity().centre_shift(shape) == (0.0, 0.0)
