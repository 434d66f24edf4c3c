"""Time a composite refresh (``compose.compose``) at 8.3 MP, beside one frame's warp + accumulate.

Run: ``.venv/bin/python benchmarks/bench_compose.py [--size 3840x2160] [--repeats 5]``.

Builds seeded L, R, G, B and Ha, OIII stacks of one field (Moffat stars with per-filter colours, different
sky levels and gradients, stack-like noise), then times the refresh the daemon runs off the frame path for
each recipe and option: LRGB and HOO, weighted mean and Lupton, mesh and level backgrounds, star or weight
scaling. Figures are the median of ``--repeats`` runs, with OpenCV and numba on 2 threads. For scale, the
same run times one frame's warp (bicubic) and kappa-sigma update at the same size.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numba
import numpy as np

from livestack.simulate import render_stars
from livestack.stages.compose import compose
from livestack.stages.snapshot import StackInfo, write_snapshot
from livestack.stages.stack import KappaSigmaStack
from livestack.stages.warp import warp

THREADS = 2

# filter -> (star gain, sky level, gradient direction)
BANDS = {"L": (2.7, 2000.0, 0.3), "R": (1.0, 1000.0, 1.2), "G": (1.0, 800.0, 2.0), "B": (1.0, 600.0, 2.8),
         "Ha": (0.2, 60.0, 0.5), "OIII": (0.12, 50.0, 1.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="3840x2160")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cv2.setNumThreads(THREADS)
    numba.set_num_threads(THREADS)
    width, height = (int(v) for v in args.size.split("x"))
    stacks = _stacks(height, width)
    cases: list[tuple[str, Callable[[], object]]] = [
        ("LRGB, mean, mesh, stars", lambda: compose(_pick(stacks, "LRGB"))),
        ("LRGB, mean, level, stars", lambda: compose(_pick(stacks, "LRGB"), background="level")),
        ("LRGB, mean, mesh, weights", lambda: compose(_pick(stacks, "LRGB"), scale="weights")),
        ("LRGB, lupton, mesh, stars", lambda: compose(_pick(stacks, "LRGB"), combine="lupton")),
        ("RGB (synthetic L), mean, mesh, stars", lambda: compose(_pick(stacks, "RGB"))),
        ("HOO, mean, mesh, stars", lambda: compose({k: stacks[k] for k in ("Ha", "OIII")})),
    ]
    print(f"composite refresh at {width}x{height} ({width * height / 1e6:.1f} MP), median of {args.repeats}, "
          f"{THREADS} threads, load average {os.getloadavg()[0]:.2f}")
    print("| case | seconds |\n| --- | --- |")
    for label, run in cases:
        print(f"| {label} | {_median_seconds(run, args.repeats):.3f} |")
    result = compose(_pick(stacks, "LRGB"))
    info = StackInfo(ncombine=40, exptime=1200.0, date_obs=None, date_end=None, method="kappa-sigma",
                     filter=result.recipe, cards=result.cards)
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)

        def write() -> None:
            write_snapshot(folder / "composite.fits", result.image, info, flatten=True)

        seconds = _median_seconds(write, args.repeats)
        print(f"| writing it: 3-plane FITS + flattened, stretched JPEG | {seconds:.3f} |")
    frame = stacks["L"]
    matrix = np.array([[1.0, 0.0005, 3.4], [-0.0005, 1.0, -2.7]])
    acc = KappaSigmaStack((height, width), warmup=3)
    footprint = np.ones((height, width), dtype=bool)
    for _ in range(3):
        acc.add(frame, footprint)

    def one_frame() -> None:
        aligned, fp = warp(frame, matrix, (height, width), "bicubic")
        acc.add(aligned, fp)

    seconds = _median_seconds(one_frame, args.repeats)
    print(f"| for scale: one frame's warp + kappa-sigma update | {seconds:.3f} |")


def _pick(stacks: dict[str, np.ndarray], names: str) -> dict[str, np.ndarray]:
    return {k: stacks[k] for k in (["L", "R", "G", "B"] if names == "LRGB" else ["R", "G", "B"])}


def _stacks(height: int, width: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = int(width * height / 4000)
    x, y = rng.uniform(0, width - 1, n), rng.uniform(0, height - 1, n)
    flux = 500.0 / (1.0 - rng.random(n) * (1.0 - 500.0 / 2e6))
    colour = rng.uniform(-0.35, 0.35, n)
    response = {"L": np.ones(n), "R": 1 + colour, "G": np.ones(n), "B": 1 - colour, "Ha": 1 + colour,
                "OIII": 1 - colour / 2}
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = {}
    for name, (gain, sky, direction) in BANDS.items():
        stars = render_stars((height, width), x, y, flux * gain * response[name], fwhm=3.0).astype(np.float32)
        tilt = np.cos(direction) * (xx / width - 0.5) + np.sin(direction) * (yy / height - 0.5)
        gradient = 1 + 0.3 * tilt
        noise = rng.standard_normal((height, width), dtype=np.float32) * np.float32(np.sqrt(sky) / 3)
        out[name] = stars + np.float32(sky) * gradient + noise
    return out


def _median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # the first call compiles and warms caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


if __name__ == "__main__":
    main()
