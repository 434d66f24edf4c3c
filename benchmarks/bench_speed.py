"""Every speed figure of the live and the batch path in one command, beside the naive approach and Siril.

For each size (2, 8.3 and 26 MP) and kind (mono, colour = an RGGB mosaic), the simulator renders frames
(~2000 stars, drift and a slow rotation) into a staging folder first, so that rendering never competes with
what is measured. Then, on those same files:

live
    ``livestack run`` as its own process (default configuration: inotify, kappa-sigma, snapshots every 5
    frames, previews every 5 s) watches an empty folder; frames are written into it at a cadence as a
    temporary name renamed in place. The clock runs from the rename's return to a subscriber receiving the
    frame's ``accepted`` event. Reported: median and worst latency, the worst after the first frame and its
    ratio to the median, the frame that ends kappa-sigma's warm-up, the medians of the stages the daemon
    timed (read, detect, align, warp, stack), what the daemon adds around them (latency minus stages) and
    the daemon's peak resident memory over the whole run (``wait4``), its last snapshot included.
stack
    ``livestack stack`` as a whole process on the first 2 and on all N frames; per frame = (t_N - t_2) /
    (N - 2), for the default method (kappa-sigma) and for ``--method mean``, with each run's peak RSS
    (``wait4``), each the fastest of ``--repeat`` runs. The 2-frame run is the start-up figure; a
    throw-away run first warms numba's cache. CPU seconds (user + system) stand beside wall times: on a
    shared machine they are the steadier figure.
naive
    astropy read (and an OpenCV debayer for colour), ``astroalign.register`` onto the first frame and a numpy
    running mean: median per frame over frames 3..N, in-process.
siril
    ``siril-cli`` (convert, register, sigma-clip stack 3/3, ``setcpu 2``) as a whole process on the first 2
    (3 for sigma clipping) and all N frames: (t_N - t_small) / (N - small). Siril comes from Debian's
    ``siril`` package; this script installs it with apt-get when it is missing and it runs as root (pass
    ``--no-install`` to skip, ``--no-siril`` to leave Siril out).

Prints Markdown tables (paste into ``benchmarks/RESULTS.md``); ``--json FILE`` also writes the raw figures.

Usage::

    python benchmarks/bench_speed.py                   # everything: 2, 8.3, 26 MP, mono and colour
    python benchmarks/bench_speed.py --quick           # 8.3 MP mono, shorter runs: for iterating
    python benchmarks/bench_speed.py --sizes 8.3 --kinds mono --parts stack,naive,siril
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SIZES: dict[str, tuple[int, int]] = {"2": (1920, 1080), "8.3": (3840, 2160), "26": (6240, 4160)}
#: Seconds between frames in the live run: a little over the slowest frame's work, so that the daemon is
#: idle when each frame arrives (the latency is then the user's wait for one frame, not a queue).
CADENCE: dict[str, float] = {"2": 1.0, "8.3": 1.5, "26": 3.0}
KINDS: tuple[str, ...] = ("mono", "colour")
PARTS: tuple[str, ...] = ("live", "stack", "naive", "siril")
#: The pipeline's timings, in its order: calibrate includes the debayer of a colour frame, defects the
#: replacement of the defects found in consecutive frames (and a colour frame's second debayer).
STAGES: tuple[str, ...] = ("read", "calibrate", "detect", "align", "defects", "warp", "normalise", "stack")
#: kappa-sigma's default warm-up: the frame with this 1-based index ends it.
WARMUP = 5
LIVESTACK = Path(sys.executable).with_name("livestack")


# -- frames -------------------------------------------------------------------------------------------


def render(folder: Path, size: tuple[int, int], kind: str, frames: int) -> list[Path]:
    """Simulated frames, written to ``folder`` without waiting between them."""
    from livestack.simulate import SimConfig, simulate

    config = SimConfig(frames=frames, interval=0.0, size=size, seed=11, n_stars=2000, drift=(2.5, -1.5),
                       rotation_per_frame=0.03, bayer="RGGB" if kind == "colour" else None)
    return simulate(folder, config, sleep=lambda _s: None)


def source_env(source: Path | None) -> dict[str, str]:
    """Environment that makes ``livestack`` import the package from ``source`` (None: this checkout).

    Python may write its bytecode cache there: an installed package has it (pip compiles it at install), and
    without it every process compiles livestack's modules from source again (~0.1-0.3 s), which a shell with
    ``PYTHONDONTWRITEBYTECODE`` set would add to every start-up measured. The warm-up runs write it.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    if source is not None:
        env["PYTHONPATH"] = str(source)
    return env


def run_process(command: list[str], cwd: Path | None = None,
                env: dict[str, str] | None = None) -> tuple[float, int, float]:
    """Run a command to its end: wall seconds, peak resident memory in bytes (``wait4``'s maxrss) and CPU
    seconds (user + system; on a shared machine the steadier figure)."""
    t0 = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert process.stderr is not None
    errors = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - t0
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}): {errors.decode()[-2000:]}")
    return elapsed, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


# -- livestack stack ----------------------------------------------------------------------------------


def bench_stack(paths: list[Path], work: Path, source: Path | None = None, repeat: int = 1) -> dict[str, Any]:
    """Whole-process ``livestack stack`` times and peak RSS for kappa-sigma and mean (the best of
    ``repeat`` runs of each: on a shared machine the least disturbed one)."""
    out: dict[str, Any] = {}
    env = source_env(source)
    # numba compiles each kernel once per machine and caches it, Python its bytecode (``source_env``); the
    # first run pays that, not the figure.
    run_process([str(LIVESTACK), "stack", "-q", "-o", str(work / "warm"), *map(str, paths[:6])], env=env)
    n = len(paths)

    def best(method: str, files: list[Path]) -> tuple[float, int, float]:
        runs = [run_process([str(LIVESTACK), "stack", "-q", "--method", method, "-o",
                             str(work / f"{method}-{len(files)}"), *map(str, files)], env=env)
                for _ in range(repeat)]
        return min(r[0] for r in runs), max(r[1] for r in runs), min(r[2] for r in runs)

    for method in ("kappa-sigma", "mean"):
        small, small_rss, small_cpu = best(method, paths[:2])
        full, full_rss, full_cpu = best(method, paths)
        out[method] = {"t2": small, "tn": full, "per_frame": (full - small) / (n - 2),
                       "cpu2": small_cpu, "cpu_per_frame": (full_cpu - small_cpu) / (n - 2),
                       "rss2": small_rss, "rssn": full_rss}
    return out


# -- naive --------------------------------------------------------------------------------------------


def bench_naive(paths: list[Path], kind: str) -> dict[str, Any]:
    """astropy + astroalign.register + numpy mean, per frame (frames 3..N), in this process."""
    import astroalign
    import cv2
    import numpy as np
    from astropy.io import fits

    def load(path: Path) -> Any:
        data = fits.getdata(path)
        if kind == "colour":
            data = cv2.cvtColor(np.ascontiguousarray(data, dtype=np.uint16), cv2.COLOR_BayerBG2RGB)
        return data.astype(np.float32)

    reference = load(paths[0])
    total = np.zeros_like(reference)
    times: list[float] = []
    for i, path in enumerate(paths):
        t0 = time.perf_counter()
        data = load(path)
        aligned, _footprint = astroalign.register(data, reference)
        total += aligned
        _mean = total / (i + 1)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {"per_frame": statistics.median(times), "frames": len(times)}


# -- Siril --------------------------------------------------------------------------------------------


def ensure_siril(install: bool) -> str | None:
    """Path of siril-cli, installing Debian's ``siril`` when allowed and possible; None without it."""
    found = shutil.which("siril-cli")
    if found or not install:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        print("siril-cli is missing and cannot be installed here (needs root and apt-get)", file=sys.stderr)
        return None
    print("installing Debian's siril (apt-get) ...", file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=600", "siril"], check=False,
                   env=env, stdout=subprocess.DEVNULL)
    return shutil.which("siril-cli")


def _siril_run(siril: str, paths: list[Path], kind: str, work: Path) -> tuple[float, float]:
    work.mkdir(parents=True)
    source = work / "in"
    source.mkdir()
    for path in paths:
        (source / path.name).symlink_to(path)
    debayer = " -debayer" if kind == "colour" else ""
    script = work / "stack.ssf"
    script.write_text(
        "requires 1.0.0\n"
        "setcpu 2\n"
        f"cd {source}\n"
        f"convert f{debayer} -out={work / 'seq'}\n"
        f"cd {work / 'seq'}\n"
        "register f\n"
        "stack r_f rej s 3 3 -norm=addscale -out=result\n"
        "close\n")
    elapsed, _rss, cpu = run_process([siril, "-d", str(work), "-s", str(script)], cwd=work)
    if not list((work / "seq").glob("result*")):
        raise SystemExit(f"Siril wrote no stack in {work / 'seq'}")
    return elapsed, cpu


def bench_siril(siril: str, paths: list[Path], kind: str, work: Path) -> dict[str, Any]:
    """Whole-process Siril time on the first 3 and on all frames (sigma clipping needs 3)."""
    small = 3
    t_small, cpu_small = _siril_run(siril, paths[:small], kind, work / "small")
    t_full, cpu_full = _siril_run(siril, paths, kind, work / "full")
    return {"t_small": t_small, "tn": t_full, "per_frame": (t_full - t_small) / (len(paths) - small),
            "cpu_per_frame": (cpu_full - cpu_small) / (len(paths) - small)}


# -- live ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Daemon:
    """One ``livestack run`` watching its own folder, with a subscriber collecting its verdicts."""

    def __init__(self, work: Path, source: Path | None) -> None:
        from livestack.clients.bus import Subscriber

        self.watched = work / "frames"
        self.watched.mkdir(parents=True)
        self.log = work / "daemon.log"
        publish, control = _free_port(), _free_port()
        config = work / "livestack.toml"
        config.write_text(
            f'[watch]\nfolder = "{self.watched}"\n[output]\nfolder = "{work / "out"}"\n'
            f'[state]\nfolder = "{work / "state"}"\n'
            f'[network]\npublish = "tcp://127.0.0.1:{publish}"\ncontrol = "tcp://127.0.0.1:{control}"\n')
        self.arrived: dict[str, tuple[float, dict[str, Any]]] = {}
        self.completed: dict[str, float] = {}
        self.ready = threading.Event()
        self._stop = threading.Event()

        def listen() -> None:
            with Subscriber(f"tcp://127.0.0.1:{publish}") as sub:
                while not self._stop.is_set():
                    event = sub.recv(timeout=0.2)
                    if event is None:
                        continue
                    self.ready.set()
                    if event.topic == "frame" and event["verdict"] in ("accepted", "rejected"):
                        self.arrived[event["name"]] = (time.time(), dict(event.payload))

        self.process = subprocess.Popen([str(LIVESTACK), "run", "--config", str(config)],
                                        env=source_env(source), stdout=subprocess.DEVNULL,
                                        stderr=open(self.log, "wb"))  # noqa: SIM115 - lives with the daemon
        self._listener = threading.Thread(target=listen, name="bench-listener")
        self._listener.start()

    def write(self, name: str, blob: bytes) -> None:
        """Write a frame as a temporary name renamed in place; the clock starts at the rename's return."""
        temporary = self.watched / f".{name}.part"
        with open(temporary, "wb") as fh:
            fh.write(blob)
        os.replace(temporary, self.watched / name)
        self.completed[name] = time.time()

    def stop(self) -> int:
        """Stop the listener and the daemon: the daemon's peak resident memory, bytes."""
        self._stop.set()
        self._listener.join()
        self.process.terminate()
        # It writes a last snapshot first: on a loaded machine that can take a while.
        return _wait_rss(self.process, 300)


def bench_live(paths: list[Path], cadence: float, work: Path,
               sources: tuple[Path | None, ...] = (None,)) -> list[dict[str, Any]]:
    """Latency from a frame's rename into the watched folder to its ``accepted`` event, for each source tree.

    With several trees, one daemon per tree runs for the whole run, each watching its own folder, and they
    take turns on every frame (the order rotates from frame to frame): each gets the frame only once the one
    before it has published its verdict, so at most one daemon works at a time and both meet the same
    moments of the machine's load.
    """
    blobs = [(p.name, p.read_bytes()) for p in paths]
    daemons: list[_Daemon] = []
    rss: list[int] = []
    try:
        for i, source in enumerate(sources):
            daemons.append(_Daemon(work / f"tree{i}", source))
        for d in daemons:
            if not d.ready.wait(60):  # the periodic status event says the daemon is up and we are subscribed
                raise SystemExit(f"the daemon sent no event in 60 s; see {d.log}")
        for index, (name, blob) in enumerate(blobs):
            turn = index % len(daemons)
            for d in daemons[turn:] + daemons[:turn]:
                d.write(name, blob)
                deadline = time.time() + 120
                while name not in d.arrived and time.time() < deadline:
                    time.sleep(0.01)
                time.sleep(cadence / 2 if len(daemons) > 1 else 0.0)
            time.sleep(cadence)
        deadline = time.time() + 120
        while any(len(d.arrived) < len(blobs) for d in daemons) and time.time() < deadline:
            time.sleep(0.05)
    finally:
        rss = [d.stop() for d in daemons]
    return [_live_figures([n for n, _ in blobs], d, peak) for d, peak in zip(daemons, rss, strict=True)]


def _live_figures(names: list[str], daemon: _Daemon, daemon_rss: int) -> dict[str, Any]:
    arrived = daemon.arrived
    missing = [n for n in names if n not in arrived]
    if missing:
        raise SystemExit(f"no frame event for {missing}; see {daemon.log}")
    rejected = [f"{n} ({arrived[n][1].get('reason')})" for n in names
                if arrived[n][1]["verdict"] != "accepted"]
    if rejected:
        raise SystemExit(f"rejected: {', '.join(rejected)}")
    latencies = [arrived[n][0] - daemon.completed[n] for n in names]
    timings = [arrived[n][1].get("timings") or {} for n in names]
    stages = {s: statistics.median(t.get(s, 0.0) for t in timings[1:]) for s in STAGES}
    overhead = [lat - sum(t.values()) for lat, t in zip(latencies, timings, strict=True)][1:]
    median = statistics.median(latencies)
    after_first = max(latencies[1:])
    return {"latencies": latencies, "timings": timings, "median": median, "worst": max(latencies),
            "rss": daemon_rss,
            "worst_after_first": after_first, "worst_ratio": after_first / median,
            "warmup_end": latencies[WARMUP - 1],
            "warmup_end_stack": timings[WARMUP - 1].get("stack", 0.0), "stages": stages,
            "overhead": statistics.median(overhead)}


def _wait_rss(process: subprocess.Popen[bytes], timeout: float) -> int:
    """Wait for ``process`` to end (killing it after ``timeout`` seconds): its peak resident memory, bytes."""
    deadline = time.monotonic() + timeout
    while True:
        pid, _status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = 0  # reaped here: Popen must not wait for it again
            return usage.ru_maxrss * 1024
        if time.monotonic() > deadline:
            process.kill()
        time.sleep(0.1)


# -- report -------------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


def report(results: dict[str, Any], sizes: list[str], frames: int, live_frames: int,
           cadence: dict[str, float]) -> None:
    """Markdown tables of the figures."""
    if any("live" in r for r in results.values()):
        cadences = ", ".join(f"{k} MP {cadence[k]:g} s" for k in sizes)
        print(f"Live: rename -> `accepted` event, {live_frames} frames, cadence {cadences}\n")
        columns = ["median", "worst", "worst after the first (x median)", "warm-up end (its stack step)",
                   *STAGES, "daemon's own", "daemon's peak RSS"]
        print("| frames | " + " | ".join(columns) + " |")
        print("| --- " * (len(columns) + 1) + "|")
        for key, row in results.items():
            if "live" in row:
                lv = row["live"]
                cells = [f"{lv['median']:.3f} s", f"{lv['worst']:.3f} s",
                         f"{lv['worst_after_first']:.3f} s ({lv['worst_ratio']:.1f}x)",
                         f"{lv['warmup_end']:.3f} s ({_ms(lv['warmup_end_stack'])})",
                         *(_ms(lv["stages"][s]) for s in STAGES), _ms(lv["overhead"]), _mib(lv["rss"])]
                print(f"| {key} | " + " | ".join(cells) + " |")
        for size_key in sizes:
            mono, colour = results.get(f"{size_key} MP mono", {}), results.get(f"{size_key} MP colour", {})
            if "live" in mono and "live" in colour:
                ratio = colour["live"]["median"] / mono["live"]["median"]
                print(f"\ncolour / mono at {size_key} MP: {ratio:.2f}x", end="")
        print("\n")
    if any("stack" in r for r in results.values()):
        print(f"`livestack stack`, whole process, per frame = (t{frames} - t2) / {frames - 2}; naive and "
              "Siril in the same run on the same files\n")
        print("| frames | kappa-sigma per frame (CPU) | mean per frame | naive per frame "
              "| Siril per frame (CPU) | naive / kappa-sigma | Siril / kappa-sigma | 2-frame stack (process) "
              f"| peak RSS kappa-sigma 2 / {frames} | peak RSS mean 2 / {frames} |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for key, row in results.items():
            if "stack" not in row:
                continue
            ks, mean = row["stack"]["kappa-sigma"], row["stack"]["mean"]
            naive = row.get("naive", {}).get("per_frame")
            sir = row.get("siril", {}).get("per_frame")
            sir_cpu = row.get("siril", {}).get("cpu_per_frame")
            cells = [f"{ks['per_frame']:.3f} s ({ks['cpu_per_frame']:.3f} s)", f"{mean['per_frame']:.3f} s",
                     f"{naive:.3f} s" if naive else "-", f"{sir:.3f} s ({sir_cpu:.3f} s)" if sir else "-",
                     f"{naive / ks['per_frame']:.1f}x" if naive else "-",
                     f"{sir / ks['per_frame']:.1f}x" if sir else "-", f"{ks['t2']:.2f} s",
                     f"{_mib(ks['rss2'])} / {_mib(ks['rssn'])}",
                     f"{_mib(mean['rss2'])} / {_mib(mean['rssn'])}"]
            print(f"| {key} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="8.3 MP mono, 12 live and 8 stacked frames (unless given)")
    parser.add_argument("--sizes", help="comma-separated among 2, 8.3, 26 (default: all)")
    parser.add_argument("--kinds", help="comma-separated among mono, colour (default: both)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated among {', '.join(PARTS)}")
    parser.add_argument("--frames", type=int, help="frames for stack, naive and Siril (default 12)")
    parser.add_argument("--live-frames", type=int, help="frames in each live run (default 30)")
    parser.add_argument("--cadence", type=float,
                        help="seconds between frames in the live runs, for every size (default: "
                             + ", ".join(f"{k} MP {v:g} s" for k, v in CADENCE.items())
                             + "); longer on a loaded machine, so that the latency is not a queue")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each livestack stack command; the fastest counts (default 3)")
    parser.add_argument("--no-siril", action="store_true", help="leave Siril out")
    parser.add_argument("--no-install", action="store_true", help="do not install Siril when missing")
    parser.add_argument("--json", metavar="FILE", help="also write the raw figures to FILE")
    parser.add_argument("--baseline", metavar="DIR", type=Path,
                        help="also run livestack (stack and live) from this source tree, e.g. a worktree of "
                             "an earlier commit, beside this one: before and after in one run (the two live "
                             "daemons run together and take turns on every frame)")
    args = parser.parse_args()
    sizes = (args.sizes or ("8.3" if args.quick else "2,8.3,26")).split(",")
    kinds = (args.kinds or ("mono" if args.quick else "mono,colour")).split(",")
    parts = set(args.parts.split(","))
    frames = args.frames or (8 if args.quick else 12)
    live_frames = args.live_frames or (12 if args.quick else 30)
    cadence = {k: args.cadence or v for k, v in CADENCE.items()}
    siril = None
    if "siril" in parts and not args.no_siril:
        siril = ensure_siril(not args.no_install)

    print(f"# bench_speed: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} "
          f"cores, Python {platform.python_version()}, load average {os.getloadavg()[0]:.2f} at start\n",
          flush=True)
    results: dict[str, Any] = {}
    for size_key in sizes:
        for kind in kinds:
            key = f"{size_key} MP {kind}"
            row: dict[str, Any] = {}
            base: dict[str, Any] = {}
            with tempfile.TemporaryDirectory(prefix="livestack-speed-") as tmp:
                root = Path(tmp)
                paths = render(root / "staged", SIZES[size_key], kind, max(frames, live_frames))
                batch = paths[:frames]
                if "stack" in parts:
                    row["stack"] = bench_stack(batch, root / "stack", repeat=args.repeat)
                    if args.baseline:
                        base["stack"] = bench_stack(batch, root / "stack-base", args.baseline, args.repeat)
                if "naive" in parts:
                    row["naive"] = bench_naive(batch, kind)
                if "siril" in parts and siril:
                    row["siril"] = bench_siril(siril, batch, kind, root / "siril")
                if "live" in parts:
                    live = paths[:live_frames]
                    if args.baseline:
                        row["live"], base["live"] = bench_live(live, cadence[size_key], root / "live",
                                                               (None, args.baseline))
                    else:
                        row["live"], = bench_live(live, cadence[size_key], root / "live")
            if args.baseline:
                for name in ("naive", "siril"):
                    if name in row:
                        base[name] = row[name]
                results[f"{key} (baseline)"] = base
            results[key] = row
            for name, figures in ((key, row), (f"{key} (baseline)", base)):
                if "live" in figures:
                    listed = " ".join(f"{v:.3f}" for v in figures["live"]["latencies"])
                    print(f"{name} live latencies: {listed}", file=sys.stderr)
            print(f"{key}: done (load average {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
            if args.json:  # after every configuration: a long run that fails later keeps what it measured
                Path(args.json).write_text(json.dumps(results, indent=1))

    report(results, sizes, frames, live_frames, cadence)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
