"""Time livestack's pipeline per stage and per frame, beside the naive approach, in the same run.

For each size (2, 8.3 and 26 MP) the simulator writes a short sequence of uint16 FITS frames (drift and slow
rotation, ~2000 stars); then

- livestack, one by one: ``Stacker.process`` on each file (read, detect, align, warp, kappa-sigma by
  default), timed end to end per frame and per stage, without snapshots;
- livestack, overlapped: ``Stacker.stream`` with a one-thread executor (as ``livestack stack`` runs),
  reading and detecting frame N+1 while frame N is warped and accumulated: the median interval
  between successive frames;
- naive: read with astropy, ``astroalign.register`` onto the first frame, then a numpy running mean.

The first two frames warm up (reference, numba compilation) and are not counted. Prints a Markdown table.

Usage: ``python benchmarks/bench_pipeline.py [--frames 8] [--sizes 2,8.3,26] [--method kappa-sigma]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import astroalign
import numpy as np
from astropy.io import fits

from livestack.config import Config
from livestack.pipeline import Stacker
from livestack.simulate import SimConfig, simulate

SIZES = {"2": (1920, 1080), "8.3": (3840, 2160), "26": (6240, 4160)}
STAGES = ("read", "detect", "align", "warp", "stack")


def make_frames(folder: Path, size: tuple[int, int], frames: int) -> list[Path]:
    """Simulated frames written to disk (as a camera would)."""
    config = SimConfig(frames=frames, interval=0.0, size=size, seed=11, n_stars=2000,
                       drift=(2.5, -1.5), rotation_per_frame=0.03)
    return simulate(folder, config, sleep=lambda _s: None)


def time_livestack(paths: list[Path], method: str,
                   workdir: Path) -> tuple[list[float], dict[str, list[float]]]:
    config = Config().with_overrides({"stack.method": method})
    stacker = Stacker(config, workdir=workdir)
    totals: list[float] = []
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    for i, path in enumerate(paths):
        t0 = time.perf_counter()
        result = stacker.process(path)
        elapsed = time.perf_counter() - t0
        if not result.accepted:
            raise SystemExit(f"{path.name} rejected: {result.reason}")
        if i >= 2:
            totals.append(elapsed)
            for s in STAGES:
                stages[s].append(result.timings.get(s, 0.0))
    return totals, stages


def time_streamed(paths: list[Path], method: str, workdir: Path) -> list[float]:
    """Seconds between successive results when reading and detecting the next frame overlaps stacking
    this one: the steady rate of ``livestack stack``."""
    config = Config().with_overrides({"stack.method": method})
    stacker = Stacker(config, workdir=workdir)
    intervals: list[float] = []
    with ThreadPoolExecutor(max_workers=1) as ahead:
        last = time.perf_counter()
        for i, _result in enumerate(stacker.stream(paths, ahead)):
            now = time.perf_counter()
            if i >= 2:  # warm-up, as in time_livestack
                intervals.append(now - last)
            last = now
    return intervals


def time_naive(paths: list[Path]) -> list[float]:
    ref = fits.getdata(paths[0]).astype(np.float32)
    total = np.zeros_like(ref)
    times: list[float] = []
    for i, path in enumerate(paths):
        t0 = time.perf_counter()
        data = fits.getdata(path).astype(np.float32)
        aligned, _footprint = astroalign.register(data, ref)
        total += aligned
        _mean = total / (i + 1)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--sizes", default="2,8.3,26")
    parser.add_argument("--method", default="kappa-sigma")
    parser.add_argument("--naive-frames", type=int, default=5, help="frames for the (slow) naive run")
    args = parser.parse_args()
    print(f"# bench_pipeline: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}, method {args.method}\n")
    print("| size | one by one: per frame (median / max) | read | detect | align | warp | stack "
          "| overlapped: per frame (median) | naive per frame (median) | speed-up one by one / overlapped |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key in args.sizes.split(","):
        size = SIZES[key]
        with tempfile.TemporaryDirectory(prefix="livestack-bench-") as tmp:
            folder = Path(tmp)
            paths = make_frames(folder / "frames", size, args.frames)
            (folder / "work").mkdir()
            totals, stages = time_livestack(paths, args.method, folder / "work")
            streamed = time_streamed(paths, args.method, folder / "work")
            naive = time_naive(paths[: args.naive_frames])
        ours = statistics.median(totals)
        overlapped = statistics.median(streamed)
        theirs = statistics.median(naive)
        cells = " | ".join(f"{statistics.median(stages[s]) * 1000:.0f} ms" for s in STAGES)
        print(f"| {key} MP ({size[0]}x{size[1]}) | {ours:.3f} s / {max(totals):.3f} s | {cells} | "
              f"{overlapped:.3f} s | {theirs:.3f} s | {theirs / ours:.1f}x / {theirs / overlapped:.1f}x |",
              flush=True)


if __name__ == "__main__":
    main()
