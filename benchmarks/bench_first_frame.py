"""The first frame through a fresh process, with and without the daemon's warm-up, side by side.

Each run is a new interpreter (nothing loaded or called yet, numba's cache on disk as after an earlier run):
it optionally runs ``live.warmup.warm_up`` with the default settings, then stacks rendered frames one after
the other through a ``Stacker`` as the daemon's worker does (``prepare`` then ``commit``) and reports, per
frame, the wall time and the process's CPU time of that work. Runs with and without the warm-up alternate, so
that a shared machine's load falls on both alike.

What the warm-up is for shows in the first frame: the later ones are the same either way.

Usage: ``python benchmarks/bench_first_frame.py [--size 8.3] [--frames 3] [--runs 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SIZES = {"2": (1920, 1080), "8.3": (3840, 2160), "26": (6240, 4160)}

_RUN = """
import json, sys, threading, time
from pathlib import Path
from livestack.config import Config
from livestack.pipeline import Stacker
root, warm, frames = Path(sys.argv[1]), sys.argv[2] == "on", [Path(p) for p in sys.argv[3:]]
config = Config(base=root).with_overrides({"wcs.solve": "off"})
out = {"warm_up": None, "frames": []}
if warm:
    from livestack.live.warmup import warm_up
    wall, cpu = time.perf_counter(), time.process_time()
    warm_up(config, root / "warm-up", threading.Event())
    out["warm_up"] = (time.perf_counter() - wall, time.process_time() - cpu)
(root / "work").mkdir()
stacker = Stacker(config, workdir=root / "work")
for path in frames:
    wall, cpu = time.perf_counter(), time.process_time()
    result = stacker.commit(stacker.prepare(path))
    out["frames"].append((time.perf_counter() - wall, time.process_time() - cpu, result.verdict))
stacker.discard()
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="8.3", choices=sorted(SIZES))
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"# bench_first_frame: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} "
          f"cores, Python {platform.python_version()}; {' '.join(sys.argv[1:]) or 'defaults'}\n", flush=True)
    from astropy.io import fits

    from livestack.simulate import SimConfig, render_frame

    with tempfile.TemporaryDirectory(prefix="livestack-first-frame-") as tmp:
        root = Path(tmp)
        rendered = render_frame(SimConfig(frames=1, size=SIZES[args.size], seed=3, n_stars=2000), 0)
        header = fits.Header()
        for key, value in rendered.header.items():
            header[key] = value
        frames = []
        for index in range(args.frames):
            header["BENCHSEQ"] = index  # distinct content, the same pixels
            path = root / f"frame-{index}.fits"
            fits.PrimaryHDU(rendered.data, header=header).writeto(path)
            frames.append(path)
        got: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
        for run in range(args.runs):
            for warm in ("off", "on"):
                work = root / f"run-{run}-{warm}"
                work.mkdir()
                done = subprocess.run([sys.executable, "-c", _RUN, str(work), warm, *map(str, frames)],
                                      capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise SystemExit(done.stderr)
                got[warm].append(json.loads(done.stdout.splitlines()[-1]))
    print("| warm-up | frame | wall (median of runs) | CPU (median of runs) | wall, each run |")
    print("| --- | --- | --- | --- | --- |")
    for warm in ("off", "on"):
        for index in range(args.frames):
            walls = [r["frames"][index][0] for r in got[warm]]
            cpus = [r["frames"][index][1] for r in got[warm]]
            print(f"| {warm} | {index + 1} | {statistics.median(walls):.3f} s | "
                  f"{statistics.median(cpus):.3f} s | {', '.join(f'{w:.3f}' for w in walls)} |")
    spent = [r["warm_up"] for r in got["on"]]
    print(f"\nwarm-up itself (at start, on its own thread in the daemon): wall "
          f"{statistics.median(s[0] for s in spent):.2f} s, CPU "
          f"{statistics.median(s[1] for s in spent):.2f} s (median of {len(spent)})")


if __name__ == "__main__":
    main()
