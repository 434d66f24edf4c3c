"""What a picture of the running stack holds the stack's lock for: the whole stack against a picture's worth.

The daemon's writer takes, under the lock the worker needs to commit each frame, what it pictures: a preview
(``[network] preview_size``, 160 px, every ``preview_interval``) with its signal-to-noise sample, the
viewers' picture (``[web] display_size``, 2048 px, every ``display_interval``) and the snapshot (the whole
stack, every few frames). What is read under the lock is ``Accumulator.result_later(step, sample)``; the
rest of a picture (stretch, encoding) is made after it. This times that call on a steady stack (mean and
kappa-sigma past its warm-up, filled with noise frames) at 8.3 and 26 MP, mono and colour:

- the whole stack (``step`` 1) into a new array (as every snapshot, preview and picture took it before,
  then with ``np.where``);
- the whole stack into an array kept from call to call, what a snapshot takes now (``into``);
- a preview and its sample (the steps ``Stacker.result_later(side=160)`` and ``Stacker.sample_later`` use);
- the viewers' picture (``side=2048``).

Each figure is the median of ``--repeat`` calls, once back to back and once after ``--pause`` seconds (the
live cadence): a virtual machine may hand memory freed a while ago back to its host, and touching it again
then costs page faults that a physical machine does not pay (``benchmarks/RESULTS.md``, the 26 MP traces).

Usage: ``python benchmarks/bench_pictures.py [--sizes 8.3,26] [--pause 3] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np

from livestack.pipeline import _sample_step
from livestack.stages.stack import Accumulator, KappaSigmaStack, MeanStack

SIZES: dict[str, tuple[int, int]] = {"8.3": (3840, 2160), "26": (6240, 4160)}


def filled(method: str, shape: tuple[int, ...], frames: int = 6) -> Accumulator:
    """A steady stack of ``method`` over noise frames whose footprints leave a margin uncovered."""
    rng = np.random.default_rng(3)
    acc: Accumulator = MeanStack(shape) if method == "mean" else KappaSigmaStack(shape, warmup=5)
    footprint = np.zeros(shape[:2], dtype=bool)
    footprint[8:-8, 12:-12] = True
    for _ in range(frames):
        acc.add((1000.0 + 10.0 * rng.standard_normal(shape)).astype(np.float32), footprint)
    acc.settle()
    return acc


def timed(call: Callable[[], object], repeat: int, pause: float) -> float:
    """Median seconds of ``call`` over ``repeat`` calls, each after ``pause`` seconds."""
    times = []
    for _ in range(repeat):
        time.sleep(pause)
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def picture_times(acc: Accumulator, repeat: int, pause: float) -> list[tuple[float, float]]:
    """Back-to-back and paused medians of the whole stack (a new array, then one kept from call to call), a
    preview with its sample, a 2048-px picture."""
    rows, cols = acc.coverage.shape
    preview, picture = max(1, max(rows, cols) // 160), max(1, max(rows, cols) // 2048)
    sample = _sample_step(rows * cols)
    kept = np.empty(acc.result_later()().shape, dtype=np.float32)
    calls: list[Callable[[], object]] = [
        lambda: acc.result_later(),
        lambda: acc.result_later(into=lambda _shape: kept),
        lambda: (acc.result_later(preview), acc.result_later(sample, sample=True)),
        lambda: acc.result_later(picture),
    ]
    times = []
    for call in calls:
        call()  # compiled kernels loaded, first touches paid
        times.append((timed(call, repeat, 0.0), timed(call, repeat, pause)))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8.3,26", help="comma-separated among 8.3, 26")
    parser.add_argument("--kinds", default="mono,colour", help="comma-separated among mono, colour")
    parser.add_argument("--methods", default="kappa-sigma,mean",
                        help="comma-separated among kappa-sigma, mean")
    parser.add_argument("--pause", type=float, default=3.0,
                        help="seconds before each timed call (the cadence)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    print(f"# bench_pictures: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    print()
    print("Under the stack's lock (`result_later`), median of the calls, back to back / after a "
          f"{args.pause:g} s pause:")
    print()
    print("| stack | whole stack, new array | whole stack, kept array (a snapshot) "
          "| 160-px preview + SNR sample | 2048-px picture |")
    print("| --- | --- | --- | --- | --- |")
    for size in args.sizes.split(","):
        width, height = SIZES[size]
        for kind in args.kinds.split(","):
            shape: tuple[int, ...] = (height, width) if kind == "mono" else (height, width, 3)
            for method in args.methods.split(","):
                cells = [f"{1000 * fast:.0f} / {1000 * paused:.0f} ms"
                         for fast, paused in picture_times(filled(method, shape), args.repeat, args.pause)]
                print(f"| {size} MP {kind}, {method} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
