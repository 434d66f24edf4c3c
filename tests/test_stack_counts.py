"""Kappa-sigma's per-pixel counts as uint16 while they fit: the same stack as with int32 counts.

The independent answer is the same stack with its counts kept as int32 from the start (``NARROW_COUNTS`` set
to 0), fed the same frames: results, coverage and states equal value for value.
"""

from __future__ import annotations

import numpy as np
import pytest

from livestack.stages import stack
from livestack.stages.stack import KappaSigmaStack


def frames(count: int, shape: tuple[int, ...], seed: int = 2) -> list[tuple[np.ndarray, np.ndarray]]:
    """Noisy frames with an outlier trail, NaN patches and footprints that miss an edge."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        image = rng.normal(200.0, 8.0, shape).astype(np.float32)
        image[(7 * i) % shape[0], :] += 400.0  # a trail to reject
        image[3:6, (5 * i) % shape[1]] = np.nan
        footprint = np.ones(shape[:2], dtype=bool)
        footprint[:, : i % 4] = False
        out.append((image, footprint))
    return out


def wide(monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...]) -> KappaSigmaStack:
    """A stack whose counts are int32 from its first frame (the layout before narrow counts)."""
    with monkeypatch.context() as m:
        m.setattr(stack, "NARROW_COUNTS", 0)
        return KappaSigmaStack(shape)


def assert_same(a: KappaSigmaStack, b: KappaSigmaStack) -> None:
    np.testing.assert_array_equal(a.result(), b.result())
    np.testing.assert_array_equal(a.coverage, b.coverage)
    assert a.count == b.count and a.rejected_fraction == b.rejected_fraction
    sa, sb = a.state(), b.state()
    assert sa.keys() == sb.keys()
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key])


@pytest.mark.parametrize("shape", [(40, 50), (40, 50, 3)])
def test_narrow_counts_give_the_wide_counts_stack(monkeypatch: pytest.MonkeyPatch,
                                                  shape: tuple[int, ...]) -> None:
    narrow, reference = KappaSigmaStack(shape), wide(monkeypatch, shape)
    assert reference.coverage.dtype == np.int32
    for image, footprint in frames(12, shape):
        narrow.add(image, footprint)
        reference.add(image, footprint)
    assert narrow.coverage.dtype == np.uint16 and narrow.state()["n"].dtype == np.uint16
    assert narrow.rejected_fraction > 0
    assert_same(narrow, reference)
    # 6 bytes per pixel for the coverage and the count instead of 8 per pixel and channel
    bytes_of = sum(v.nbytes for k, v in narrow.state().items() if k in ("n", "coverage"))
    assert bytes_of == 2 * 40 * 50 * (1 + (shape[2] if len(shape) == 3 else 1))


def test_counts_widen_before_they_could_overflow(monkeypatch: pytest.MonkeyPatch) -> None:
    shape = (30, 40)
    monkeypatch.setattr(stack, "NARROW_COUNTS", 8)
    narrow = KappaSigmaStack(shape)
    reference = wide(monkeypatch, shape)
    for i, (image, footprint) in enumerate(frames(11, shape), start=1):
        narrow.add(image, footprint)
        reference.add(image, footprint)
        assert narrow.coverage.dtype == (np.uint16 if i <= 8 else np.int32), i
    assert narrow.state()["n"].dtype == np.int32
    assert_same(narrow, reference)


@pytest.mark.parametrize("taken_at", [3, 9])
def test_a_checkpoint_with_int32_counts_resumes_into_narrow_counts(monkeypatch: pytest.MonkeyPatch,
                                                                   taken_at: int) -> None:
    shape = (30, 40)
    sequence = frames(12, shape, seed=5)
    old = wide(monkeypatch, shape)  # the stack as an older version checkpointed it
    for image, footprint in sequence[:taken_at]:
        old.add(image, footprint)
    state = old.state()
    assert state["coverage"].dtype == np.int32
    resumed = KappaSigmaStack(shape)
    resumed.restore(state)
    assert resumed.coverage.dtype == np.uint16
    for image, footprint in sequence[taken_at:]:
        resumed.add(image, footprint)
        old.add(image, footprint)
    np.testing.assert_array_equal(resumed.result(), old.result())
    np.testing.assert_array_equal(resumed.coverage, old.coverage)
    np.testing.assert_array_equal(resumed.state()["n"], old.state()["n"])
