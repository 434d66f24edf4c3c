"""Stack: running accumulators that each cost O(pixels) per frame.

Public API (one small interface, three methods):

- ``Accumulator`` protocol: ``add(image, footprint, weight=1.0)``, ``result() -> ndarray`` (float32, NaN
  where never covered), ``coverage -> ndarray`` (int32 count of frames per pixel), ``count -> int``,
  ``rejected_fraction -> float``, ``method -> str``, ``state() -> dict[str, ndarray]`` and
  ``restore(state)`` for checkpoints.
- ``MeanStack(shape)``, ``KappaSigmaStack(shape, kappa=3.0, warmup=5)``,
  ``MedianStack(shape, directory, max_frames=...)``.
- ``make_accumulator(method, shape, *, kappa, warmup, directory) -> Accumulator``.

``shape`` is ``(H, W)`` for mono or ``(H, W, C)`` for colour; footprints are always ``(H, W)`` bool.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

__all__ = ["METHODS", "Accumulator", "make_accumulator"]

METHODS: tuple[str, ...] = ("mean", "kappa-sigma", "median")


class Accumulator(Protocol):
    """What every stacking method offers."""

    method: str

    @property
    def count(self) -> int: ...

    @property
    def coverage(self) -> np.ndarray: ...

    @property
    def rejected_fraction(self) -> float: ...

    def add(self, image: np.ndarray, footprint: np.ndarray, weight: float = 1.0) -> None: ...

    def result(self) -> np.ndarray: ...

    def state(self) -> dict[str, np.ndarray]: ...

    def restore(self, state: dict[str, np.ndarray]) -> None: ...
