"""Time surface registration (Moon frames) at 2 and 8.3 MP, beside the star path's detection + alignment.

Run: ``.venv/bin/python benchmarks/bench_surface.py [--sizes 2,8.3] [--frames 8]``, or with ``--accuracy`` the
registration error over several seeded sessions (384x288, 12 frames, the fixed pattern at 3x the texture's
contrast, 500 hot pixels; no turn, and 0.45 deg a frame up to 4.95 deg).

Simulated lunar frames (``simulate --target moon``: drift 1.3, -0.78 px and 0.05 deg per frame, seeing blur,
the sensor's fixed pattern at 1x the texture's contrast, 500 hot pixels) are rendered in memory first. Per
frame, timed separately: ``surface.measure`` (clean, bin, sharpness) and ``surface.register`` (rotation, phase
correlation, ECC), the previous transform as the guess as in the pipeline; the reference's one-off
``surface.reference`` is reported apart. Medians over the frames after the first; the registration error
against the simulator's truth is printed beside, so a fast wrong answer shows. For scale, the star path's
``detect`` + ``align`` on a simulated star field of the same size in the same run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import cv2

from livestack.simulate import SimConfig, render_frame
from livestack.stages import surface
from livestack.stages.align import Transform, align
from livestack.stages.detect import detect

SIZES = {"2": (1920, 1080), "8.3": (3840, 2160)}
THREADS = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="2,8.3")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--accuracy", action="store_true", help="errors over seeds instead of timings")
    parser.add_argument("--seeds", default="3,4,5,6,7")
    args = parser.parse_args()
    cv2.setNumThreads(THREADS)
    if args.accuracy:
        accuracy([int(v) for v in args.seeds.split(",")])
        return
    print("| size | measure | register | per frame | reference (once) | working binning | worst error "
          "| star path: detect + align |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for key in args.sizes.split(","):
        size = SIZES[key]
        config = SimConfig(frames=args.frames, size=size, target="moon", fixed_pattern=1.0, hot_pixels=500,
                           drift=(1.3, -0.78), rotation_per_frame=0.05, seed=11)
        frames = [render_frame(config, i) for i in range(args.frames)]
        t0 = time.perf_counter()
        first = surface.measure(frames[0].data)
        ref = surface.reference(first)
        t_ref = time.perf_counter() - t0
        t_measure, t_register, errors = [], [], []
        last: Transform | None = None
        for frame in frames[1:]:
            t0 = time.perf_counter()
            measured = surface.measure(frame.data, defects=first.spikes)
            t1 = time.perf_counter()
            found = surface.register(ref, measured, guess=last)
            t2 = time.perf_counter()
            t_measure.append(t1 - t0)
            t_register.append(t2 - t1)
            if found.transform is None:
                errors.append(math.inf)
                continue
            last = found.transform
            dx, dy = found.transform.centre_shift(frame.data.shape)
            tx, ty = frame.centre_shift
            errors.append(math.hypot(dx - tx, dy - ty))
        stars_config = SimConfig(frames=4, size=size, n_stars=2000, seed=11)
        star_frames = [render_frame(stars_config, i).data for i in range(4)]
        ref_stars, _ = detect(star_frames[0])
        t_stars = []
        for data in star_frames[1:]:
            t0 = time.perf_counter()
            stars, _ = detect(data)
            align(ref_stars, stars)
            t_stars.append(time.perf_counter() - t0)
        m, r = statistics.median(t_measure[1:]), statistics.median(t_register[1:])
        print(f"| {key} MP ({size[0]}x{size[1]}) | {m * 1000:.0f} ms | {r * 1000:.0f} ms | "
              f"{(m + r) * 1000:.0f} ms | {t_ref * 1000:.0f} ms | {first.binning}x{first.binning} | "
              f"{max(errors):.3f} px | {statistics.median(t_stars) * 1000:.0f} ms |")


def accuracy(seeds: list[int]) -> None:
    print("| seed | turn per frame | frames accepted | worst shift error | median shift error "
          "| worst turn error |")
    print("| --- | --- | --- | --- | --- | --- |")
    for seed in seeds:
        for turn in (0.0, 0.45):
            config = SimConfig(frames=12, size=(384, 288), target="moon", fixed_pattern=3.0, hot_pixels=500,
                               drift=(1.3, -0.78), rotation_per_frame=turn, seed=seed)
            first = surface.measure(render_frame(config, 0).data)
            ref = surface.reference(first)
            last: Transform | None = None
            shifts, turns = [], []
            for index in range(1, config.frames):
                frame = render_frame(config, index)
                found = surface.register(ref, surface.measure(frame.data, defects=first.spikes), guess=last)
                if found.transform is None:
                    continue
                last = found.transform
                dx, dy = found.transform.centre_shift(frame.data.shape)
                tx, ty = frame.centre_shift
                shifts.append(math.hypot(dx - tx, dy - ty))
                turns.append(abs(found.transform.rotation - frame.rotation_deg))
            print(f"| {seed} | {turn:g} deg | {len(shifts)} of {config.frames - 1} | {max(shifts):.3f} px | "
                  f"{statistics.median(shifts):.3f} px | {max(turns):.3f} deg |")


if __name__ == "__main__":
    main()
