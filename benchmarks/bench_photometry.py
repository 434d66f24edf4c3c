"""Cost of live photometry per frame, and the accuracy of a simulated transit's light curve.

1. Cost at 2 and 8.3 MP for 1 target + 20 comparison stars: what the worker does on the frame path (cut the
   stamps) and what the photometry thread does off it (measure them and form the differential magnitudes),
   beside the frame's own read + detect for scale. Median of repeated runs.
2. Accuracy: the simulated 2% transit of ``tests/test_photometry.py`` through ``Stacker`` and the photometer;
   the fitted depth and mid-transit time against the truth, and the constant stars' reduced chi-square.

Usage: ``python benchmarks/bench_photometry.py [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.optimize import curve_fit

from livestack.config import Config
from livestack.pipeline import Stacker
from livestack.simulate import SimConfig, Transit, render_frame, simulate
from livestack.stages.align import Transform
from livestack.stages.detect import detect
from livestack.stages.frames import read_frame
from livestack.stages.photometry import Photometer, PhotometryParams, PhotometryPlan, Star, plan_photometry

REPEATS = 15


def cost(size: tuple[int, int], repeats: int) -> dict[str, float]:
    """Median seconds per step for one frame of ``size`` (width, height)."""
    sim = SimConfig(frames=2, size=size, n_stars=int(size[0] * size[1] / 4000), seed=5, interval=0.0)
    image = render_frame(sim, 0).data.astype(np.float32)
    t0 = time.perf_counter()
    stars, quality = detect(image)
    t_detect = time.perf_counter() - t0
    params = PhotometryParams(gain=1.0, saturation=65535.0)
    clean = plan_photometry([], image, stars, quality.fwhm, 21, params).comparisons
    plan = PhotometryPlan(stars=(Star("target", clean[0].x, clean[0].y), *clean[1:]), params=params)
    matrix = Transform.identity().matrix
    cut, measure = [], []
    for _ in range(repeats):
        photometer = Photometer(plan)
        t0 = time.perf_counter()
        stamps = plan.cut(image, matrix, quality.fwhm)
        t1 = time.perf_counter()
        photometer.add(1, "frame", 0.0, stamps, quality.fwhm)
        t2 = time.perf_counter()
        cut.append(t1 - t0)
        measure.append(t2 - t1)
    return {
        "stars": float(len(plan.stars)),
        "cut": statistics.median(cut),
        "measure": statistics.median(measure),
        "detect": t_detect,
    }


def transit_accuracy(frames: int) -> dict[str, float]:
    """Fit the simulated transit; return the depth and mid-time errors and the constant stars' chi-square."""
    transit = Transit(
        x=210.0, y=150.0, flux=3.0e5, depth=0.02, mid=3750.0 * frames / 100, duration=2400.0, ingress=400.0
    )
    sim = SimConfig(
        frames=frames,
        interval=75.0,
        exptime=60.0,
        size=(512, 384),
        n_stars=500,
        fwhm=3.2,
        drift=(0.4, -0.25),
        rotation_per_frame=0.01,
        seeing_jitter=0.08,
        seed=11,
        transit=transit,
    )
    with tempfile.TemporaryDirectory() as work:
        paths = simulate(Path(work) / "frames", sim, sleep=lambda _s: None)
        stacker = Stacker(Config().with_overrides({"stack.method": "mean"}))
        params = PhotometryParams(gain=1.0, saturation=65535.0)
        photometer = None
        for i, path in enumerate(paths):
            result = stacker.process(path)
            assert result.transform is not None and result.quality is not None
            frame = read_frame(path)
            if photometer is None:
                target = Star("transit", transit.x, transit.y)
                assert stacker._ref_stars is not None
                clean = plan_photometry(
                    [target], frame.luminance, stacker._ref_stars, result.quality.fwhm, 23, params
                ).comparisons
                constants = [Star(f"K{k}", s.x, s.y) for k, s in enumerate(clean[:3])]
                photometer = Photometer(PhotometryPlan(stars=(target, *constants, *clean[3:]), params=params))
            stamps = photometer.plan.cut(frame.luminance, result.transform.matrix, result.quality.fwhm)
            photometer.add(i + 1, path.name, i * sim.interval + sim.exptime / 2, stamps, result.quality.fwhm)
    assert photometer is not None
    rows = photometer.curve.rows
    tr = [r for r in rows if r.target == "transit"]
    t = np.array([r.time for r in tr])
    m = np.array([r.magnitude for r in tr])
    e = np.array([r.error for r in tr])

    def model(tt: np.ndarray, base: float, depth: float, mid: float) -> np.ndarray:
        edge = np.abs(tt - mid) - (transit.duration / 2 - transit.ingress)
        return base - 2.5 * np.log10(1.0 - depth * np.clip(1.0 - edge / transit.ingress, 0.0, 1.0))

    fit, cov = curve_fit(
        model, t, m, p0=[np.median(m), 0.01, transit.mid - 200], sigma=e, absolute_sigma=True
    )
    chi2 = []
    for k in range(3):
        mk = np.array([r.magnitude for r in rows if r.target == f"K{k}"])
        ek = np.array([r.error for r in rows if r.target == f"K{k}"])
        mean = np.sum(mk / ek**2) / np.sum(1 / ek**2)
        chi2.append(float(np.sum(((mk - mean) / ek) ** 2) / (len(mk) - 1)))
    return {
        "depth": float(fit[1]),
        "depth_err": float(np.sqrt(cov[1, 1])),
        "mid_error_s": float(fit[2] - transit.mid),
        "mid_err_s": float(np.sqrt(cov[2, 2])),
        "point_error_mmag": float(np.median(e) * 1000),
        "chi2_min": min(chi2),
        "chi2_max": max(chi2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no 8.3 MP frame")
    args = parser.parse_args()
    repeats = 5 if args.quick else REPEATS
    sizes = [(1920, 1080)] if args.quick else [(1920, 1080), (3840, 2160)]
    print("| frame | stars measured | cut stamps (frame path) | measure (photometry thread) | detect |")
    print("| --- | --- | --- | --- | --- |")
    for size in sizes:
        c = cost(size, repeats)
        print(
            f"| {size[0] * size[1] / 1e6:.1f} MP | {c['stars']:.0f} | {c['cut'] * 1000:.2f} ms | "
            f"{c['measure'] * 1000:.1f} ms | {c['detect'] * 1000:.0f} ms |"
        )
    a = transit_accuracy(60 if args.quick else 100)
    print()
    print(
        f"transit depth {a['depth'] * 100:.2f}% +- {a['depth_err'] * 100:.2f} (true 2.00%); mid-transit "
        f"{a['mid_error_s']:+.0f} s +- {a['mid_err_s']:.0f} from the truth; {a['point_error_mmag']:.1f} mmag "
        f"per point; constant stars' reduced chi-square {a['chi2_min']:.2f}-{a['chi2_max']:.2f}"
    )


if __name__ == "__main__":
    main()
