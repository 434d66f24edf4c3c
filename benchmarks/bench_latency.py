"""Latency of the live daemon: from a frame file being complete on disk to its ``frame`` accepted event.

For each size, the daemon watches an empty folder (inotify, default settings, snapshots every 5 frames) and
the simulator writes frames into it at a cadence, atomically (temporary name, then rename). The clock starts
when the rename returns and stops when a subscriber on the daemon's PUB socket receives the frame's
``accepted`` event. The first frames pay one-off costs (the reference, numba's first calls, the end of
kappa-sigma's warm-up); the table gives the median and the worst over all frames, and the worst after the
warm-up.

Usage: ``python benchmarks/bench_latency.py [--frames 12] [--sizes 2,8.3,26]``
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

from livestack.clients.bus import Subscriber
from livestack.config import Config
from livestack.live.daemon import Daemon
from livestack.simulate import SimConfig, simulate

SIZES = {"2": ((1920, 1080), 1.5), "8.3": ((3840, 2160), 2.5), "26": ((6240, 4160), 5.0)}


def measure(size: tuple[int, int], interval: float, frames: int) -> tuple[list[float], int]:
    """Latencies in seconds, in frame order, and the warm-up length."""
    with tempfile.TemporaryDirectory(prefix="livestack-latency-") as tmp:
        root = Path(tmp)
        (root / "frames").mkdir()
        config = Config(base=root).with_overrides({
            "watch.folder": "frames", "output.folder": "out", "state.folder": "state",
            "network.publish": "tcp://127.0.0.1:*", "network.control": "tcp://127.0.0.1:*"})
        completed: dict[str, float] = {}
        arrived: dict[str, float] = {}
        daemon = Daemon(config)
        daemon.start()
        stop = threading.Event()

        def listen() -> None:
            with Subscriber(daemon.publish_endpoint) as sub:
                while not stop.is_set():
                    event = sub.recv(timeout=0.2)
                    if event is not None and event.topic == "frame" and event["verdict"] == "accepted":
                        arrived[event["name"]] = time.time()

        listener = threading.Thread(target=listen, name="bench-listener")
        listener.start()
        time.sleep(0.5)  # let the subscriber connect before the first frame
        try:
            sim = SimConfig(frames=frames, interval=interval, size=size, seed=3, n_stars=2000,
                            write_mode="atomic")
            simulate(root / "frames", sim, on_written=lambda p: completed.__setitem__(p.name, time.time()))
            deadline = time.time() + 60
            while len(arrived) < frames and time.time() < deadline:
                time.sleep(0.1)
        finally:
            stop.set()
            listener.join()
            daemon.stop()
        names = sorted(completed)
        missing = [n for n in names if n not in arrived]
        if missing:
            raise SystemExit(f"no accepted event for {missing}")
        return [arrived[n] - completed[n] for n in names], config.stack.warmup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--sizes", default="2,8.3,26")
    args = parser.parse_args()
    print(f"# bench_latency: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}\n")
    print("| size | cadence | frames | median | worst | worst after warm-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    for key in args.sizes.split(","):
        size, interval = SIZES[key]
        latencies, warmup = measure(size, interval, args.frames)
        steady = latencies[warmup + 1:] or latencies
        print(f"| {key} MP ({size[0]}x{size[1]}) | {interval:g} s | {len(latencies)} | "
              f"{statistics.median(latencies):.3f} s | {max(latencies):.3f} s | {max(steady):.3f} s |",
              flush=True)


if __name__ == "__main__":
    main()
