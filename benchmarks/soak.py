"""Soak: thousands of small frames through a live daemon (its own process) with a subscriber attached.

The daemon runs as ``livestack run`` with default settings (kappa-sigma, snapshots every 5 frames,
checkpoints every 10) but for its folders, its loopback ports and no plate solving. This script writes frames
into the watched folder (a temporary name, then a rename), keeping a few in flight, and removes each file once
its verdict is in (the journal keeps it; the disk stays small). Every ``--every`` frames it samples the
daemon's resident memory, open file descriptors and threads from /proc; at the end it times the stop (SIGTERM
to exit: the last checkpoint and snapshot). A daemon that holds on to something per frame shows it as growth
after the first frames (caches and numba's compilations come first).

Each frame is one rendered field with a distinct header card (distinct content, the same pixels), so every
frame is accepted and what is measured is the daemon, not the star field.

Not part of the test suite.

Usage: ``python benchmarks/soak.py [--frames 5000] [--every 250] [--size 320x240]``
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from astropy.io import fits

from livestack.clients.bus import Subscriber
from livestack.simulate import SimConfig, render_frame

#: Frames written but without a verdict yet, at most.
IN_FLIGHT = 4
#: Seconds to wait for the daemon to be ready, or for one verdict.
WAIT = 120.0
_ENDPOINTS = re.compile(r"events on (\S+), control on (\S+)")


def sample(pid: int) -> tuple[float, int, int]:
    """Resident memory (MB), open file descriptors and threads of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", status)[1]) / 1024  # type: ignore[index]
    threads = int(re.search(r"Threads:\s+(\d+)", status)[1])  # type: ignore[index]
    return rss, len(os.listdir(f"/proc/{pid}/fd")), threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=5000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--size", default="320x240")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    print(f"# soak: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; {' '.join(sys.argv[1:]) or 'defaults'}\n", flush=True)
    rendered = render_frame(SimConfig(frames=1, size=(width, height), seed=9, n_stars=300), 0)
    header = fits.Header()
    for key, value in rendered.header.items():
        header[key] = value
    with tempfile.TemporaryDirectory(prefix="livestack-soak-") as tmp:
        root = Path(tmp)
        watch = root / "frames"
        watch.mkdir()
        config = root / "livestack.toml"
        config.write_text('[watch]\nfolder = "frames"\n[output]\nfolder = "out"\n[state]\nfolder = "state"\n'
                          '[network]\npublish = "tcp://127.0.0.1:*"\ncontrol = "tcp://127.0.0.1:*"\n'
                          '[wcs]\nsolve = "off"\n')
        log = root / "daemon.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "livestack.cli", "run", "--config", str(config)],
                                    stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + WAIT
            while not (found := _ENDPOINTS.search(log.read_text(errors="replace"))):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the daemon did not start:\n{log.read_text()}")
                time.sleep(0.1)
            publish = found[1]
            verdicts: dict[str, str] = {}
            cond = threading.Condition()
            stop = threading.Event()

            def listen() -> None:
                with Subscriber(publish) as sub:
                    while not stop.is_set():
                        event = sub.recv(timeout=0.2)
                        if event is not None and event.topic == "frame" and event["verdict"] != "received":
                            with cond:
                                verdicts[event["name"]] = event["verdict"]
                                cond.notify_all()

            listener = threading.Thread(target=listen, name="soak-subscriber")
            listener.start()
            time.sleep(0.5)
            print("| frames | daemon RSS | open files | threads | elapsed |")
            print("| --- | --- | --- | --- | --- |", flush=True)
            samples: list[tuple[int, float, int, int]] = []
            started = time.monotonic()
            try:
                for index in range(args.frames):
                    header["SOAKSEQ"] = index
                    buffer = io.BytesIO()
                    fits.PrimaryHDU(rendered.data, header=header).writeto(buffer)
                    name = f"soak-{index:05d}.fits"
                    (watch / f"{name}.part").write_bytes(buffer.getvalue())
                    os.replace(watch / f"{name}.part", watch / name)
                    done = index + 1 - IN_FLIGHT
                    if done >= 0:
                        _wait_and_remove(cond, verdicts, watch, f"soak-{done:05d}.fits")
                    if (index + 1) % args.every == 0:
                        rss, fds, threads = sample(proc.pid)
                        samples.append((index + 1, rss, fds, threads))
                        print(f"| {index + 1} | {rss:.0f} MB | {fds} | {threads} | "
                              f"{time.monotonic() - started:.0f} s |", flush=True)
                for done in range(max(0, args.frames - IN_FLIGHT + 1), args.frames):
                    _wait_and_remove(cond, verdicts, watch, f"soak-{done:05d}.fits")
            finally:
                stop.set()
                listener.join()
            rejected = sum(v != "accepted" for v in verdicts.values())
            print(f"\n{len(verdicts)} verdicts, {rejected} not accepted, "
                  f"{args.frames / (time.monotonic() - started):.1f} frames/s")
            base = next((s for s in samples if s[0] >= 500), samples[0])
            for column, label in ((1, "RSS"), (2, "open files"), (3, "threads")):
                later = [s[column] for s in samples if s[0] > base[0]]
                if later:
                    growth = (max(later) - base[column]) / base[column]
                    print(f"{label}: {base[column]:.0f} at frame {base[0]}, at most {max(later):.0f} after: "
                          f"growth {growth:+.1%}")
        finally:
            # A stop after a long night: the last checkpoint and snapshot, then exit.
            stopping = time.monotonic()
            proc.terminate()
            try:
                proc.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                print(f"stop: the daemon did not exit within {WAIT:g} s of SIGTERM (killed)")
            else:
                print(f"stop: {time.monotonic() - stopping:.1f} s from SIGTERM to exit, "
                      f"status {proc.returncode}")


def _wait_and_remove(cond: threading.Condition, verdicts: dict[str, str], watch: Path, name: str) -> None:
    with cond:
        if not cond.wait_for(lambda: name in verdicts, WAIT):
            raise SystemExit(f"no verdict for {name} within {WAIT:g} s")
    (watch / name).unlink()


if __name__ == "__main__":
    main()
