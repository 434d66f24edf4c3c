"""neighbours: radius pairs and bounded nearest neighbours, checked against scipy's k-d tree."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from livestack.stages.neighbours import nearest, within


def _stars(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.uniform(0, 4000, (count, 2)) * np.array([1.0, 0.56])


@pytest.mark.parametrize("radius", [0.0, 2.5, 40.0, 5000.0])
def test_within_finds_the_same_pairs_as_a_kd_tree(radius: float) -> None:
    rng = np.random.default_rng(5)
    points, queries = _stars(rng, 700), _stars(rng, 500)
    queries[:50] = points[:50] + rng.normal(0, 1.0, (50, 2))  # close pairs, as matched stars are
    q, p, d = within(points, queries, radius)
    expected = cKDTree(queries).sparse_distance_matrix(cKDTree(points), radius, output_type="ndarray")
    assert sorted(zip(q.tolist(), p.tolist(), strict=True)) == sorted(
        zip(expected["i"].tolist(), expected["j"].tolist(), strict=True))
    np.testing.assert_allclose(d, np.hypot(*(points[p] - queries[q]).T))


@pytest.mark.parametrize("radius", [1.0, 3.0, 60.0])
def test_nearest_agrees_with_a_bounded_kd_tree_query(radius: float) -> None:
    rng = np.random.default_rng(6)
    points, queries = _stars(rng, 600), _stars(rng, 400)
    queries[::3] = points[: len(queries[::3])] + rng.normal(0, 0.8, (len(queries[::3]), 2))
    distance, index = nearest(points, queries, radius)
    expected_distance, expected_index = cKDTree(points).query(queries, distance_upper_bound=radius)
    np.testing.assert_allclose(distance, expected_distance)
    np.testing.assert_array_equal(index, expected_index)
    assert np.isinf(distance).any() and np.isfinite(distance).any()


def test_empty_lists_match_nothing() -> None:
    none = np.empty((0, 2))
    some = np.array([[1.0, 2.0], [3.0, 4.0]])
    distance, index = nearest(none, some, 5.0)
    assert np.isinf(distance).all() and (index == 0).all()
    distance, index = nearest(some, none, 5.0)
    assert distance.shape == (0,) and index.shape == (0,)
    assert all(a.size == 0 for a in within(some, none, 5.0))
