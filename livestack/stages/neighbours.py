"""Neighbours: which stars of one list lie within a radius of the stars of another.

Public API:

- ``within(points, queries, radius) -> (query_index, point_index, distance)``: every pair closer than
  ``radius`` (inclusive), in no particular order.
- ``nearest(points, queries, radius) -> (distance, index)``: each query's nearest point within ``radius``,
  ``inf`` and ``len(points)`` where there is none (the convention of a k-d tree's bounded query).

Points are ``(N, 2)`` arrays of ``(x, y)``. The lists matched here hold hundreds to a few thousand stars and
the radii are a small part of the field, so a sweep along x (sort the points once, take each query's slab
``|dx| <= radius`` by binary search, then test the few candidates in it) answers exactly in
``O((N + M) log N + K)`` for ``K`` candidates, with nothing beyond numpy: the alignment's fast path, the
transparency and the composite's common stars no longer import a spatial library at start-up.
"""

from __future__ import annotations

import numpy as np

__all__ = ["nearest", "within"]


def within(points: np.ndarray, queries: np.ndarray,
           radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (query, point) pair at most ``radius`` apart.

    Parameters
    ----------
    points, queries : ndarray
        ``(N, 2)`` and ``(M, 2)`` coordinates.
    radius : float
        Non-negative.

    Returns
    -------
    query_index, point_index : ndarray
        int64 indices into ``queries`` and ``points``, one entry per pair.
    distance : ndarray
        float64 distance of each pair.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    queries = np.asarray(queries, dtype=np.float64).reshape(-1, 2)
    empty = np.empty(0, dtype=np.int64)
    if len(points) == 0 or len(queries) == 0 or not radius >= 0:
        return empty, empty, np.empty(0, dtype=np.float64)
    order = np.argsort(points[:, 0], kind="stable")
    xs = points[order, 0]
    low = np.searchsorted(xs, queries[:, 0] - radius, side="left")
    high = np.searchsorted(xs, queries[:, 0] + radius, side="right")
    counts = high - low
    total = int(counts.sum())
    if total == 0:
        return empty, empty, np.empty(0, dtype=np.float64)
    # Flatten the slabs: candidate k belongs to query q_k and is the j-th point of that query's slab.
    query_index = np.repeat(np.arange(len(queries), dtype=np.int64), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    point_index = order[np.repeat(low, counts) + (np.arange(total) - starts)]
    delta = points[point_index] - queries[query_index]
    distance = np.hypot(delta[:, 0], delta[:, 1])
    keep = distance <= radius
    return query_index[keep], point_index[keep], distance[keep]


def nearest(points: np.ndarray, queries: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Each query's nearest point within ``radius``.

    Parameters
    ----------
    points, queries : ndarray
        ``(N, 2)`` and ``(M, 2)`` coordinates.
    radius : float
        Non-negative.

    Returns
    -------
    distance : ndarray
        float64 ``(M,)``: the distance to the nearest point, ``inf`` where none lies within ``radius``.
    index : ndarray
        int64 ``(M,)``: that point's index, ``len(points)`` where there is none.
    """
    queries = np.asarray(queries, dtype=np.float64).reshape(-1, 2)
    count = len(np.asarray(points).reshape(-1, 2))
    distance = np.full(len(queries), np.inf)
    index = np.full(len(queries), count, dtype=np.int64)
    query_index, point_index, separation = within(points, queries, radius)
    if query_index.size:
        # Closest first within each query; the first pair of each query is then its nearest point.
        ranked = np.lexsort((point_index, separation, query_index))
        query_index, point_index, separation = query_index[ranked], point_index[ranked], separation[ranked]
        first = np.flatnonzero(np.r_[True, query_index[1:] != query_index[:-1]])
        distance[query_index[first]] = separation[first]
        index[query_index[first]] = point_index[first]
    return distance, index
