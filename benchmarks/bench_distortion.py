"""What the wide-field distortion correction costs: the fit in ``align`` and the dense-map warp, beside the
affine path, in the same run.

The simulator renders two frames of a wide field (1% barrel distortion at the corners, dithers of up to 250
px, ~2000 stars) at each size; ``detect`` finds their stars. Then, per call, median of ``--repeat`` runs:

- ``align`` with ``distortion`` off, auto and on (the fit on the matched stars, its cross-validation), from a
  guess close to the answer (the fast path);
- ``warp`` with the affine matrix alone (OpenCV ``warpAffine``) and with the fitted correction (the dense
  float32 map, OpenCV ``remap``), bilinear and bicubic, mono and 3-channel colour;
- ``dense_map`` alone (the map and the footprint).

Prints a Markdown table (paste into ``benchmarks/RESULTS.md``).

Usage: ``python benchmarks/bench_distortion.py [--sizes 2,8.3] [--repeat 9]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

import cv2
import numpy as np

from livestack.simulate import SimConfig, render_frame
from livestack.stages.align import AlignParams, align
from livestack.stages.detect import detect
from livestack.stages.warp import dense_map, warp

SIZES: dict[str, tuple[int, int]] = {"2": (1920, 1080), "8.3": (3840, 2160), "26": (6240, 4160)}


def _median_ms(call: Callable[[], object], repeat: int) -> float:
    call()  # warm-up: numba's compilation or cache load, OpenCV's first allocation
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def _measure(size: str, repeat: int) -> tuple[dict[str, float], str]:
    """Milliseconds per call of each step at one size, and a note on the fit."""
    width, height = SIZES[size]
    sim = SimConfig(frames=2, size=(width, height), seed=4, n_stars=2000, drift=(0.0, 0.0),
                    rotation_per_frame=0.0, dither=250.0, barrel=0.01, hot_pixels=0)
    images = [render_frame(sim, i).data.astype(np.float32) for i in range(2)]
    ref, stars = (detect(image)[0] for image in images)
    figures: dict[str, float] = {}
    found = align(ref, stars, params=AlignParams(distortion="auto")).transform
    assert found is not None and found.distortion is not None, "the correction should be fitted here"
    # Guessed from the answer, so that the fast path runs and the figures are the fit's own cost (without a
    # guess, a 250 px dither sends every mode through astroalign's triangle search first).
    for mode in ("off", "auto", "on"):
        params = AlignParams(distortion=mode)  # type: ignore[arg-type]
        figures[f"align (fast path), distortion {mode}"] = _median_ms(
            lambda p=params: align(ref, stars, guess=found, params=p), repeat)
    note = (f"{size} MP: {found.inliers} stars matched, residual RMS {found.rms_before:.2f} px without the "
            f"correction, {found.rms_after:.2f} px with it (method {found.method})")
    matrix, distortion, shape = found.matrix, found.distortion, images[0].shape
    colour = np.ascontiguousarray(np.repeat(images[1][:, :, None], 3, axis=2))
    for kind, image in (("mono", images[1]), ("colour", colour)):
        for method in ("bilinear", "bicubic"):
            figures[f"warp {method} {kind}, affine"] = _median_ms(
                lambda i=image, m=method: warp(i, matrix, shape, m), repeat)
            figures[f"warp {method} {kind}, with the correction"] = _median_ms(
                lambda i=image, m=method: warp(i, matrix, shape, m, distortion), repeat)
    figures["dense map alone (map + footprint)"] = _median_ms(
        lambda: dense_map(matrix, distortion, shape, shape), repeat)
    return figures, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2,8.3", help="comma-separated: 2, 8.3, 26 (megapixels)")
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    sizes = [s.strip() for s in args.sizes.split(",")]
    cv2.setNumThreads(2)
    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs, "
          f"OpenCV {cv2.__version__}, {args.repeat} runs per figure (median)\n")
    measured = {size: _measure(size, args.repeat) for size in sizes}
    print("| step, ms per call | " + " | ".join(f"{s} MP" for s in sizes) + " |")
    print("| --- |" + " --- |" * len(sizes))
    for name in measured[sizes[0]][0]:
        print(f"| {name} | " + " | ".join(f"{measured[s][0][name]:.1f}" for s in sizes) + " |")
    print()
    for size in sizes:
        print(f"- {measured[size][1]}")


if __name__ == "__main__":
    main()
