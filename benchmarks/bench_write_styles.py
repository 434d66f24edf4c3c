"""Writer's completion to ``accepted`` event per write style, OS events and polling, through the live daemon.

For each size, a daemon (default settings but for its folders and ports) watches an empty folder; a reference
frame is written first (not measured). Then each write style writes frames one after the other, each waiting
for its verdict: the clock starts when the writer's last call returns (the copy, the rename, the chmod, the
close) and stops when a subscriber on the daemon's PUB socket receives the frame's ``accepted`` event. The
daemon's own ``latency`` of the same event is shown beside it, and the smallest difference (reported minus
waited: it must not be below -0.1 s).

Frames of one size have the same pixels (a header card differs, so each is a new frame to the daemon): what is
timed is the daemon's path, not the star field.

The first frame of each daemon (the reference) is shown on its own line: it waits for the reference window
(``[align] reference_wait``) unless more frames come, by design.

Usage: ``python benchmarks/bench_write_styles.py [--sizes 2,8.3,26] [--repeat 2] [--modes inotify,polling]
[--warm-up on,off]``
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from astropy.io import fits

from livestack.clients.bus import Subscriber
from livestack.config import Config
from livestack.live.daemon import Daemon
from livestack.simulate import SimConfig, render_frame

SIZES = {"2": (1920, 1080), "8.3": (3840, 2160), "26": (6240, 4160)}
#: Seconds to wait for one verdict before giving up on it.
WAIT = 120.0


# -- write styles: write ``data`` as ``name`` into ``watch``; return when the writer is done ---------------


def shutil_copy(src: Path, watch: Path, name: str) -> None:
    shutil.copy(src, watch / name)


def cp_p(src: Path, watch: Path, name: str) -> None:
    subprocess.run(["cp", "-p", str(src), str(watch / name)], check=True)


def rsync(src: Path, watch: Path, name: str) -> None:
    subprocess.run(["rsync", "-t", str(src), str(watch / name)], check=True)


def mv_from_beside(src: Path, watch: Path, name: str) -> None:
    beside = watch.parent / "beside"
    beside.mkdir(exist_ok=True)
    shutil.copyfile(src, beside / name)
    os.rename(beside / name, watch / name)


def temp_rename(src: Path, watch: Path, name: str) -> None:
    shutil.copyfile(src, watch / f"{name}.part")
    os.replace(watch / f"{name}.part", watch / name)


def slow_1mb(src: Path, watch: Path, name: str) -> None:
    data = src.read_bytes()
    step, start = 1 << 18, time.monotonic()
    with open(watch / name, "wb") as handle:
        for offset in range(0, len(data), step):
            handle.write(data[offset:offset + step])
            handle.flush()
            if offset + step < len(data):  # no pause after the last chunk: the writer is done
                time.sleep(max(0.0, start + (offset + step) / 1e6 - time.monotonic()))


def new_subfolder(src: Path, watch: Path, name: str) -> None:
    night = watch / f"night-{name.split('.')[0]}"
    night.mkdir()
    shutil.copyfile(src, night / name)


def folder_made_again(src: Path, watch: Path, name: str) -> None:
    shutil.rmtree(watch)
    watch.mkdir()
    shutil.copyfile(src, watch / name)


STYLES: dict[str, Callable[[Path, Path, str], None]] = {
    "shutil.copy (chmod last)": shutil_copy,
    "cp -p": cp_p,
    "rsync": rsync,
    "mv from beside": mv_from_beside,
    "temp + rename": temp_rename,
    "1 MB/s in place": slow_1mb,
    "new subfolder": new_subfolder,
    "folder deleted, made again": folder_made_again,
}


def stage(folder: Path, size: tuple[int, int], count: int) -> list[Path]:
    """A rendered frame written ``count`` times with a distinct BENCHSEQ card (distinct content)."""
    frame = render_frame(SimConfig(frames=1, size=size, seed=3, n_stars=2000), 0)
    header = fits.Header()
    for key, value in frame.header.items():
        header[key] = value
    paths = []
    for index in range(count):
        header["BENCHSEQ"] = index
        buffer = io.BytesIO()
        fits.PrimaryHDU(frame.data, header=header).writeto(buffer)
        path = folder / f"staged-{index:03d}.fits"
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


class Verdicts:
    """A subscriber thread: when each frame's verdict arrived (the subscriber's clock) and its latency."""

    def __init__(self, endpoint: str) -> None:
        self._cond = threading.Condition()
        self.got: dict[str, tuple[float, str, float | None]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(endpoint,), name="bench-subscriber")
        self._thread.start()

    def _run(self, endpoint: str) -> None:
        with Subscriber(endpoint, topics=("frame",)) as sub:
            while not self._stop.is_set():
                event = sub.recv(timeout=0.2)
                if event is not None and event.topic == "frame" and event["verdict"] != "received":
                    with self._cond:
                        self.got[event["name"]] = (time.time(), event["verdict"], event["latency"])
                        self._cond.notify_all()

    def wait(self, name: str) -> tuple[float, str, float | None] | None:
        with self._cond:
            self._cond.wait_for(lambda: name in self.got, WAIT)
            return self.got.get(name)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def measure(size_key: str, polling: bool, repeat: int, staged: list[Path], warm: bool = True) -> list[str]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="livestack-styles-") as tmp:
        root = Path(tmp)
        watch = root / "frames"
        watch.mkdir()
        config = Config(base=root).with_overrides({
            "watch.folder": "frames", "output.folder": "out", "state.folder": "state",
            "watch.polling": polling, "network.publish": "tcp://127.0.0.1:*", "network.control": "tcp://127.0.0.1:*",
            "wcs.solve": "off", "watch.warm_up": warm})
        daemon = Daemon(config)
        daemon.start()
        verdicts = Verdicts(daemon.publish_endpoint)
        time.sleep(0.5)  # the subscriber connects
        try:
            queue = iter(staged)
            temp_rename(next(queue), watch, "reference.fits")
            finished = time.time()
            first = verdicts.wait("reference.fits")
            if first is None:
                raise SystemExit("the reference frame got no verdict")
            mode = f"{'polling' if polling else 'inotify'}{'' if warm else ', no warm-up'}"
            rows.append(f"| {size_key} MP | {mode} | the first frame (reference window: waits "
                        f"{config.align.reference_wait:g} s for more) | {first[0] - finished:.3f} s | | "
                        f"{first[2]:.3f} s | |")
            print(rows[-1], flush=True)
            for style, write in STYLES.items():
                if style == "rsync" and shutil.which("rsync") is None:
                    rows.append(f"| {size_key} MP | {mode} | {style} | not installed | | | |")
                    continue
                waited, reported = [], []
                for n in range(repeat):
                    name = f"s{len(verdicts.got):03d}-{n}.fits"
                    write(next(queue), watch, name)
                    finished = time.time()
                    got = verdicts.wait(name)
                    if got is None or got[1] != "accepted":
                        raise SystemExit(f"{style}: {name} got {got}")
                    waited.append(got[0] - finished)
                    reported.append(got[2] if got[2] is not None else float("nan"))
                margin = min(r - w for r, w in zip(reported, waited, strict=True))
                rows.append(f"| {size_key} MP | {mode} | {style} | "
                            f"{statistics.median(waited):.3f} s | {max(waited):.3f} s | "
                            f"{statistics.median(reported):.3f} s | {margin:+.3f} s |")
                print(rows[-1], flush=True)
        finally:
            verdicts.close()
            daemon.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2,8.3,26")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--modes", default="inotify,polling")
    parser.add_argument("--warm-up", default="on", help="on, off, or on,off: the daemon's [watch] warm_up")
    args = parser.parse_args()
    print(f"# bench_write_styles: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{' '.join(sys.argv[1:]) or 'defaults'}\n")
    print("| size | mode | style | waited (median) | waited (worst) | reported latency (median) | "
          "reported - waited (least) |")
    print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    modes = args.modes.split(",")
    for key in args.sizes.split(","):
        with tempfile.TemporaryDirectory(prefix="livestack-styles-staged-") as tmp:
            staged = stage(Path(tmp), SIZES[key], 1 + len(STYLES) * args.repeat)
            for mode in modes:
                for warm in args.warm_up.split(","):
                    measure(key, mode == "polling", args.repeat, staged, warm == "on")


if __name__ == "__main__":
    main()
