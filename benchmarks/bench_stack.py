"""Time warp and the stack accumulators at 2, 8.3 and 26 MP; print a table.

Run: ``.venv/bin/python benchmarks/bench_stack.py [--sizes 2,8.3,26] [--median-frames 50]``.
Figures are the median of repeated runs, per frame, with OpenCV and numba on 2 threads. The numpy
kappa-sigma column is the same streaming update written with whole-array numpy operations, for comparison.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from functools import partial

import cv2
import numba
import numpy as np

from livestack.stages.stack import MIN_TEST_SAMPLES, KappaSigmaStack, MeanStack, MedianStack
from livestack.stages.warp import INTERPOLATIONS, warp

SIZES = {"2": (1200, 1680), "8.3": (2160, 3840), "26": (4160, 6240)}
THREADS = 2
REPEATS = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="2,8.3,26")
    parser.add_argument("--median-frames", type=int, default=50)
    args = parser.parse_args()
    cv2.setNumThreads(THREADS)
    numba.set_num_threads(THREADS)
    sizes = [s for s in args.sizes.split(",") if s in SIZES]
    rows: list[tuple[str, list[str]]] = []
    rng = np.random.default_rng(0)

    for colour in (False, True):
        for interpolation in INTERPOLATIONS:
            cells = []
            for size in sizes:
                shape = SIZES[size] + ((3,) if colour else ())
                frame = (1000 + 10 * rng.standard_normal(shape)).astype(np.float32)
                matrix = _similarity(-0.3, 3.4, -2.7)
                cells.append(_ms(partial(warp, frame, matrix, shape[:2], interpolation)))
            rows.append((f"warp {interpolation} {'colour' if colour else 'mono'}", cells))
    for angle in (-1.0, 0.0, 0.3, 1.0):
        frame = (1000 + 10 * rng.standard_normal(SIZES["8.3"])).astype(np.float32)
        matrix = _similarity(angle, 3.4, -2.7)
        cells = [""] * len(sizes)
        if "8.3" in sizes:
            cells[sizes.index("8.3")] = _ms(partial(warp, frame, matrix, SIZES["8.3"]))
        rows.append((f"warp bilinear mono, rotation {angle:+.1f} deg", cells))

    for colour in (False, True):
        label = "colour" if colour else "mono"
        mean_cells, numba_cells, numpy_cells, median_cells = [], [], [], []
        for size in sizes:
            shape = SIZES[size] + ((3,) if colour else ())
            frame = (1000 + 10 * rng.standard_normal(shape)).astype(np.float32)
            footprint = np.ones(shape[:2], dtype=bool)
            footprint[:5] = False
            mean = MeanStack(shape)
            mean_cells.append(_ms(partial(mean.add, frame, footprint)))
            del mean
            kappa = KappaSigmaStack(shape, warmup=3)
            for _ in range(3):
                kappa.add(frame + rng.standard_normal(shape).astype(np.float32), footprint)
            numba_cells.append(_ms(partial(kappa.add, frame, footprint)))
            state = kappa.state()
            del kappa
            numpy_cells.append(_ms(partial(_numpy_kappa_step, state, frame, footprint, 3.0)))
            del state
            with tempfile.TemporaryDirectory() as directory:
                median = MedianStack(shape, directory)
                median_cells.append(_ms(partial(median.add, frame, footprint)))
        rows.append((f"mean add {label}", mean_cells))
        rows.append((f"kappa-sigma add {label}, numba", numba_cells))
        rows.append((f"kappa-sigma add {label}, numpy", numpy_cells))
        rows.append((f"median append {label}", median_cells))

    if "8.3" in sizes:
        shape = SIZES["8.3"]
        with tempfile.TemporaryDirectory() as directory:
            median = MedianStack(shape, directory)
            footprint = np.ones(shape, dtype=bool)
            for _ in range(args.median_frames):
                median.add((1000 + 10 * rng.standard_normal(shape)).astype(np.float32), footprint)
            median.result()  # compile once outside the timing
            start = time.perf_counter()
            median.result()
            elapsed = time.perf_counter() - start
            cells = [""] * len(sizes)
            cells[sizes.index("8.3")] = f"{elapsed * 1000:.0f}"
            rows.append((f"median result, {args.median_frames} frames mono", cells))

    width = max(len(name) for name, _ in rows)
    header = f"ms per call, {THREADS} threads"
    print(f"{header:<{width}}  " + "  ".join(f"{s + ' MP':>8}" for s in sizes))
    for name, cells in rows:
        print(f"{name:<{width}}  " + "  ".join(f"{c:>8}" for c in cells))


def _ms(call: Callable[[], object]) -> str:
    call()  # warm caches and numba
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return f"{np.median(times) * 1000:.1f}"


def _similarity(angle_deg: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[np.cos(a), -np.sin(a), tx], [np.sin(a), np.cos(a), ty]])


def _numpy_kappa_step(state: dict[str, np.ndarray], image: np.ndarray, footprint: np.ndarray,
                      kappa: float) -> None:
    """One streaming kappa-sigma update with whole-array numpy (same arithmetic as the numba kernel)."""
    mean, m2, wsum, n = state["mean"], state["m2"], state["wsum"], state["n"]
    values = image.reshape(mean.shape)
    valid = footprint[:, :, None] & np.isfinite(values).all(axis=2, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma = np.maximum(np.sqrt(m2 / wsum * n / (n - 1)), state["floor"])
    delta = values - mean
    accept = valid & ~((n >= MIN_TEST_SAMPLES) & (np.abs(delta) > kappa * sigma))
    total = wsum + accept
    with np.errstate(invalid="ignore", divide="ignore"):
        new_mean = mean + np.where(accept, delta / total, 0)
    m2 += np.where(accept, delta * (values - new_mean), 0)
    mean[...] = new_mean
    wsum[...] = total
    n += accept


if __name__ == "__main__":
    main()
