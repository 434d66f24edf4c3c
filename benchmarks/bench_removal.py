"""What taking a frame back out of a mean stack costs, beside what stacking a frame costs, in the same run.

The simulator writes a short 8.3 MP sequence (uint16 FITS, drift and slow rotation, ~2000 stars). A mean stack
takes all of them (``Stacker.process``: read, detect, align, warp, accumulate), timed per frame. Then frames
are taken out one by one the way the daemon does it: check the file's content hash against the journal's,
then ``Stacker.subtract_known`` (read, warp with the journaled transform, subtract), timed per frame.
Then a re-integration of the remaining frames (``fork`` + ``add_known``, what kappa-sigma and median do),
timed per frame, for comparison.

Finally, for kappa-sigma, the frame path while a re-integration runs: a kappa-sigma stack of the first half of
the frames is re-integrated on a background thread (as ``live.removal`` does) while the foreground stacks the
second half into the old stack (``Stacker.process``); each foreground frame's time is printed beside the same
frames stacked with nothing in the background. Were the frame path blocked, a frame would wait for the whole
re-integration.

The first two frames warm up (reference, numba compilation) and are not counted. Prints a Markdown table.

Usage: ``python benchmarks/bench_removal.py [--frames 10] [--size 3840x2160]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from livestack.config import Config
from livestack.live.state import content_hash
from livestack.pipeline import Stacker
from livestack.simulate import SimConfig, simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--size", default="3840x2160", help="WIDTHxHEIGHT")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="bench-removal-") as tmp:
        sim = SimConfig(frames=args.frames, interval=0.0, size=(width, height), seed=11, n_stars=2000,
                        drift=(2.5, -1.5), rotation_per_frame=0.03)
        paths = simulate(Path(tmp), sim, sleep=lambda _s: None)
        stacker = Stacker(Config().with_overrides({"stack.method": "mean"}))
        stack_times, transforms, hashes = [], [], []
        for path in paths:
            t0 = time.perf_counter()
            result = stacker.process(path)
            stack_times.append(time.perf_counter() - t0)
            if result.transform is None:
                raise SystemExit(f"{path.name} rejected: {result.reason}")
            transforms.append(result.transform.matrix.copy())
            hashes.append(content_hash(path))
        remove_times, hash_times = [], []
        for path, matrix, digest in list(zip(paths, transforms, hashes, strict=True))[2:]:
            t0 = time.perf_counter()
            if content_hash(path) != digest:
                raise SystemExit(f"{path} changed")
            t1 = time.perf_counter()
            stacker.subtract_known(path, matrix)
            remove_times.append(time.perf_counter() - t0)
            hash_times.append(t1 - t0)
        fork = stacker.fork()
        rebuild_times = []
        for path, matrix in list(zip(paths, transforms, strict=True))[2:]:
            t0 = time.perf_counter()
            fork.add_known(path, matrix)
            rebuild_times.append(time.perf_counter() - t0)
        background = _frame_path_during_reintegration(paths)
    counted = stack_times[2:]
    median_stack = statistics.median(counted)
    print(f"{width}x{height} ({width * height / 1e6:.1f} MP), {len(counted)} frames counted, "
          f"{platform.node()} {os.cpu_count()} cores, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n")
    print("| step | median per frame | vs stacking a frame |")
    print("| --- | --- | --- |")
    print(f"| stack a frame (read, detect, align, warp, add) | {median_stack * 1e3:.0f} ms | 1.00 |")
    for label, times in (("remove a frame (hash check, read, warp, subtract)", remove_times),
                         ("  of which the hash check", hash_times),
                         ("re-integrate: add a frame with its known transform", rebuild_times)):
        m = statistics.median(times)
        print(f"| {label} | {m * 1e3:.0f} ms | {m / median_stack:.2f} |")
    quiet, busy, duration = background
    print(f"\nKappa-sigma: frame path alone vs while a re-integration of {len(paths) // 2} frames runs "
          f"({duration:.2f} s in the background)\n")
    print("| frame | alone | during the re-integration |")
    print("| --- | --- | --- |")
    for i, (a, b) in enumerate(zip(quiet, busy, strict=True), start=len(paths) // 2 + 1):
        print(f"| {i} | {a * 1e3:.0f} ms | {b * 1e3:.0f} ms |")


def _frame_path_during_reintegration(paths: list[Path]) -> tuple[list[float], list[float], float]:
    """Per-frame times of the second half of ``paths``: alone, then while the first half re-integrates."""
    half = len(paths) // 2
    config = Config().with_overrides({"stack.method": "kappa-sigma"})
    times: list[list[float]] = []
    duration = 0.0
    for with_background in (False, True):
        stacker = Stacker(config)
        transforms = []
        for path in paths[:half]:
            result = stacker.process(path)
            assert result.transform is not None
            transforms.append(result.transform.matrix.copy())
        fork = stacker.fork()
        done = threading.Event()
        started = time.perf_counter()

        def reintegrate(fork: Stacker = fork, transforms: list[np.ndarray] = transforms,
                        done: threading.Event = done) -> None:
            for path, matrix in zip(paths[:half], transforms, strict=True):
                fork.add_known(path, matrix)
            done.set()

        thread = threading.Thread(target=reintegrate, name="bench-reintegrate")
        if with_background:
            thread.start()
        own = []
        for path in paths[half:]:
            t0 = time.perf_counter()
            stacker.process(path)
            own.append(time.perf_counter() - t0)
        if with_background:
            thread.join()
            duration = time.perf_counter() - started
            if not done.is_set():
                raise SystemExit("the re-integration did not finish")
        times.append(own)
    return times[0], times[1], duration


if __name__ == "__main__":
    main()
