"""Time calibration and sky normalisation per frame at 2, 8.3 and 26 MP; print a table.

Run: ``.venv/bin/python benchmarks/bench_calibrate.py [--sizes 2,8.3,26]``.

What a frame pays, step by step, with numba on 2 threads (median of repeated runs):

- ``apply``: ``(mosaic - (bias + scale * dark)) * (1 / flat)`` on the raw mosaic, one pass (the combined
  pedestal and the flat's inverse are made once per set of masters and cached);
- ``dark defects``: replacing the master dark's hot pixels (0.1% of the sensor) by same-colour neighbours;
- ``sky``: the star-masked, sigma-clipped sky level and noise (1000 stars masked);
- ``normalise``: ``image * scale + offset`` on the warped frame;
- ``frame defects``: without darks, the defect candidates of the frame and the persistence over 3 frames.

"calibration + normalisation" is apply + dark defects + sky + normalise: the path with masters.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numba
import numpy as np

from livestack.stages import calibrate, normalise
from livestack.stages.detect import Stars

SIZES = {"2": (1200, 1680), "8.3": (2160, 3840), "26": (4160, 6240)}
THREADS = 2
REPEATS = 9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="2,8.3,26")
    args = parser.parse_args()
    numba.set_num_threads(THREADS)
    sizes = [s for s in args.sizes.split(",") if s in SIZES]
    rng = np.random.default_rng(0)
    table: dict[str, list[str]] = {}
    for size in sizes:
        for name, value in _measure(SIZES[size], rng).items():
            table.setdefault(name, []).append(f"{value:6.2f}")
    width = max(len(k) for k in table)
    print(f"{'ms per frame':<{width}}  " + "  ".join(f"{s + ' MP':>8}" for s in sizes))
    for name, cells in table.items():
        print(f"{name:<{width}}  " + "  ".join(f"{c:>8}" for c in cells))


def _measure(shape: tuple[int, int], rng: np.random.Generator) -> dict[str, float]:
    """Milliseconds per frame of each step at one frame size."""
    raw = (1500 + 20 * rng.standard_normal(shape)).astype(np.float32)
    offset = (500 + rng.standard_normal(shape)).astype(np.float32)
    gain = (1.0 + 0.1 * rng.random(shape)).astype(np.float32)
    defects = np.unique(rng.choice(raw.size, raw.size // 1000, replace=False)).astype(np.int64)
    stars = _stars(rng, shape, 1000)
    norm = normalise.Normalisation(scale=(1.0,), offset=(-12.5,), weight=1.0)
    colour = np.repeat(raw[:, :, None], 3, axis=2)
    norm3 = normalise.Normalisation(scale=(1.0,) * 3, offset=(-12.5, 3.0, 4.0), weight=1.0)
    history = [calibrate.defect_candidates(raw, None) for _ in range(2)]
    work = raw.copy()
    out = {
        "apply (bias, scaled dark, flat)": _ms(lambda: calibrate.apply(work, offset, gain)),
        "dark defects (0.1% of pixels)": _ms(lambda: calibrate.replace_defects(work, defects, "RGGB")),
        "sky (1000 stars masked)": _ms(lambda: normalise.measure_sky(raw, stars)),
        "normalise mono": _ms(lambda: normalise.apply(work, norm)),
    }
    out["calibration + normalisation, mono"] = sum(out.values())
    out["copy of the frame (memory-bandwidth yardstick)"] = _ms(lambda: np.copyto(work, raw))
    out["normalise colour (3 channels)"] = _ms(lambda: normalise.apply(colour, norm3))
    out["sky colour"] = _ms(lambda: normalise.measure_sky(colour, stars))
    out["frame defects (candidates + persistence)"] = _ms(lambda: calibrate.persistent_defects(
        [*history, calibrate.defect_candidates(raw, None)], 3))
    return out


def _stars(rng: np.random.Generator, shape: tuple[int, int], n: int) -> Stars:
    def frozen(a: np.ndarray) -> np.ndarray:
        a.flags.writeable = False
        return a

    x = frozen(rng.uniform(0, shape[1], n))
    y = frozen(rng.uniform(0, shape[0], n))
    return Stars(x=x, y=y, flux=frozen(rng.uniform(1e3, 1e5, n)), fwhm=frozen(np.full(n, 3.0)),
                 a=frozen(np.full(n, 1.3)), b=frozen(np.full(n, 1.2)), theta=frozen(np.zeros(n)),
                 flags=frozen(np.zeros(n, dtype=np.int64)), shape=shape)


def _ms(fn: Callable[[], object]) -> float:
    fn()  # compile and warm the caches
    samples = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(samples))


if __name__ == "__main__":
    main()
