"""What browser viewers cost the daemon: frame latency with none, 20 viewers and slow browsers, side by side.

``livestack run --web`` runs as a subprocess: the daemon and the viewer's server in one process, the heaviest
arrangement (they share the GIL and the machine's cores). This script writes simulated frames into its folder
at a steady cadence (copied under a temporary name inside the folder, then renamed, the fastest way a file
arrives) and times each from the rename to the frame's ``accepted`` event on a subscriber of the daemon, as
``bench_latency.py`` does. Phases alternate within one run, round after round:

- **none**: nobody has the page open;
- **20 viewers**: 20 clients in another process, each holding the event stream open and fetching every new
  picture it announces, which is what the page does (the browsers' drawing happens on the viewers' machines);
- **slow browsers**: a headless Chromium with its network throttled to 16 kB/s and 500 ms and its CPU slowed
  20x, showing the page (a picture takes it seconds to download, so the server's sends to it back up), plus a
  client that opens the event stream and never reads from it;
- **Chromium alone**: the control for the phase before: the same throttled Chromium on this machine, showing
  an empty page, not the viewer. What it costs the daemon is what running a browser on a 2-core machine costs,
  not what serving one does.

The helper processes run at the lowest CPU priority (``nice 19``): on real nights the browsers are on other
machines, and this measures what serving them costs the daemon, not what drawing pages costs this machine.

The daemon's process CPU time per frame comes from ``/proc``. A warm-up (the reference frame, the end of
kappa-sigma's warm-up) runs first and is not counted. The daemon publishes a picture after every frame
(``display_interval`` 0.5 s, shorter than the cadence), so viewers fetch one per frame.

Usage: ``python benchmarks/bench_web.py [--frames 10] [--rounds 3] [--size 1920x1080] [--interval 1.0]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
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

from livestack.clients.bus import Subscriber
from livestack.simulate import SimConfig, simulate

PHASES = ("none", "20 viewers", "slow browsers", "Chromium alone")
VIEWERS = 20
WARMUP = 7
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


# -- helper processes: the viewers ---------------------------------------------------------------------------


async def _viewer(host: str, port: int, counts: dict[str, int]) -> None:
    """One page's traffic: the event stream, and each announced picture fetched on a connection of its own."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /events HTTP/1.1\r\nHost: bench\r\n\r\n")
    await writer.drain()
    name = ""
    while line := await reader.readline():
        text = line.decode().rstrip("\r\n")
        if text.startswith("event: "):
            name = text[7:]
        elif text.startswith("data: "):
            counts["events"] += 1
            if name == "picture":
                url = json.loads(text[6:])["picture"]["url"]
                counts["bytes"] += await _fetch(host, port, "/" + url)
                counts["pictures"] += 1


async def _fetch(host: str, port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    body = await reader.read()
    writer.close()
    return len(body)


def run_viewers(url: str, count: int) -> None:
    host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    counts = {"events": 0, "pictures": 0, "bytes": 0}

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        tasks = [asyncio.create_task(_viewer(host, int(port), counts)) for _ in range(count)]
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    print(json.dumps(counts), flush=True)


def run_slow_browsers(url: str, viewer: bool) -> None:
    from playwright.sync_api import sync_playwright

    host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    stalled = socket.socket()
    if viewer:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect((host, int(port)))
        stalled.sendall(b"GET /events HTTP/1.1\r\nHost: bench\r\n\r\n")  # and never read a byte
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        cdp = page.context.new_cdp_session(page)
        cdp.send("Network.enable")
        cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 500,
                                                      "downloadThroughput": 16 * 1024,
                                                      "uploadThroughput": 16 * 1024})
        cdp.send("Emulation.setCPUThrottlingRate", {"rate": 20})
        page.goto(url if viewer else "about:blank", wait_until="commit")
        while not stop.is_set():
            page.wait_for_timeout(200)
        shown = page.evaluate("document.getElementById('stacked').textContent") if viewer else None
        browser.close()
    stalled.close()
    print(json.dumps({"stacked_shown": shown}), flush=True)


# -- the measurement ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int) -> float:
    """CPU seconds of a process and its descendants (alive ones, and the children they have reaped)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            parents[int(entry.name)] = int(fields[1])
            times[int(entry.name)] = sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(times.get(pid, 0.0) for pid in tree)


def helper(mode: str, *args: str) -> subprocess.Popen[str]:
    command = ["nice", "-n", "19", sys.executable, __file__, mode, *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def stop_helper(process: subprocess.Popen[str]) -> dict[str, Any]:
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=60)
    return json.loads(out.strip().splitlines()[-1]) if out.strip() else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=10, help="frames per phase")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", default="1920x1080")
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    total = WARMUP + args.rounds * len(PHASES) * args.frames
    with tempfile.TemporaryDirectory(prefix="livestack-bench-web-") as tmp:
        root = Path(tmp)
        staging, frames = root / "staging", root / "frames"
        frames.mkdir()
        simulate(staging, SimConfig(frames=total, interval=0, size=(width, height), seed=3, n_stars=2000),
                 sleep=lambda _s: None)
        paths = sorted(staging.glob("*.fits"))
        publish, control, web = free_port(), free_port(), free_port()
        config = root / "bench.toml"
        config.write_text(f'[network]\npublish = "tcp://127.0.0.1:{publish}"\n'
                          f'control = "tcp://127.0.0.1:{control}"\n[web]\ndisplay_interval = 0.5\n')
        log = root / "daemon.log"
        with log.open("w") as log_file:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "livestack.cli", "run", "--config", str(config),
                 "--watch", str(frames), "--output", str(root / "out"), "--web", f"127.0.0.1:{web}"],
                stderr=log_file, env={**os.environ, "LIVESTACK_CONTROL_TOKEN": ""})
        url = f"http://127.0.0.1:{web}/"
        judged: dict[str, tuple[str, str | None, float]] = {}
        stop = threading.Event()
        heard = threading.Event()

        def listen() -> None:
            with Subscriber(f"tcp://127.0.0.1:{publish}", topics=("frame", "status")) as sub:
                while not stop.is_set():
                    event = sub.recv(timeout=0.2)
                    if event is not None:
                        heard.set()
                    if event is not None and event.topic == "frame" and event["verdict"] != "received":
                        judged[event["name"]] = (event["verdict"], event["reason"], time.time())

        listener = threading.Thread(target=listen, name="bench-listener")
        listener.start()
        rows: dict[str, list[tuple[list[float], float, float]]] = {phase: [] for phase in PHASES}
        helpers_said: dict[str, list[dict[str, Any]]] = {phase: [] for phase in PHASES}
        try:
            if not heard.wait(120):  # the daemon has started and the subscriber hears it
                raise SystemExit(f"the daemon never spoke:\n{log.read_text()[-2000:]}")
            queue = iter(paths)

            def feed(count: int, helpers: list[subprocess.Popen[str]]) -> tuple[list[float], float, float]:
                start_cpu = cpu_seconds(daemon.pid)
                start_helpers = sum(tree_cpu(h.pid) for h in helpers)
                done: dict[str, float] = {}
                for _ in range(count):
                    path = next(queue)
                    tick = time.monotonic()
                    shutil.copyfile(path, frames / f"{path.name}.tmp")  # *.tmp is never taken as a frame
                    os.replace(frames / f"{path.name}.tmp", frames / path.name)
                    done[path.name] = time.time()
                    time.sleep(max(0.0, args.interval - (time.monotonic() - tick)))
                deadline = time.monotonic() + 120
                while any(n not in judged for n in done) and time.monotonic() < deadline:
                    time.sleep(0.05)
                missing = [n for n in done if n not in judged]
                if missing:
                    raise SystemExit(f"no verdict for {missing}; the daemon said:\n{log.read_text()[-2000:]}")
                cpu = (cpu_seconds(daemon.pid) - start_cpu) / count
                helpers_cpu = (sum(tree_cpu(h.pid) for h in helpers) - start_helpers) / count
                for n in done:
                    if judged[n][0] != "accepted":
                        print(f"{n} rejected: {judged[n][1]}", file=sys.stderr)
                latencies = [judged[n][2] - t for n, t in done.items() if judged[n][0] == "accepted"]
                return latencies, cpu, helpers_cpu

            feed(WARMUP, [])
            for _ in range(args.rounds):
                for phase in PHASES:
                    started = []
                    if phase == "20 viewers":
                        started = [helper("--viewers", url, str(VIEWERS))]
                    elif phase == "slow browsers":
                        started = [helper("--slow-browser", url)]
                    elif phase == "Chromium alone":
                        started = [helper("--chromium-alone", url)]
                    time.sleep(3.0 if started else 0.5)  # connected, page loaded
                    rows[phase].append(feed(args.frames, started))
                    helpers_said[phase] += [stop_helper(p) for p in started]
        finally:
            stop.set()
            listener.join()
            daemon.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.wait(timeout=60)
            if daemon.poll() is None:
                daemon.kill()

    print(f"# bench_web: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; {width}x{height} frames every {args.interval:g} s, "
          f"{args.frames} per phase, {args.rounds} rounds interleaved\n")
    print("| phase | frames | latency median | latency worst | daemon CPU per frame | helpers' CPU per frame "
          "| viewers' traffic |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for phase in PHASES:
        latencies = [x for lat, _, _ in rows[phase] for x in lat]
        cpu = statistics.mean(c for _, c, _ in rows[phase])
        helpers_cpu = statistics.mean(h for _, _, h in rows[phase])
        said = helpers_said[phase]
        traffic = ""
        if phase == "20 viewers":
            megabytes = sum(s["bytes"] for s in said) / 1e6
            traffic = (f"{sum(s['pictures'] for s in said)} pictures ({megabytes:.1f} MB), "
                       f"{sum(s['events'] for s in said)} events")
        elif phase == "slow browsers":
            traffic = "throttled page showed " + ", ".join(f"{s.get('stacked_shown')} stacked" for s in said)
        elif phase == "Chromium alone":
            traffic = "an empty page, no viewer"
        print(f"| {phase} | {len(latencies)} | {statistics.median(latencies):.3f} s | "
              f"{max(latencies):.3f} s | {cpu:.3f} s | {helpers_cpu:.3f} s | {traffic} |")
    for phase in PHASES:
        per_round = ", ".join(f"{statistics.median(lat):.3f}" for lat, _, _ in rows[phase])
        print(f"\n{phase}: median latency per round {per_round} s", end="")
    print()


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--viewers":
        run_viewers(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) >= 3 and sys.argv[1] in ("--slow-browser", "--chromium-alone"):
        run_slow_browsers(sys.argv[2], viewer=sys.argv[1] == "--slow-browser")
    else:
        main()
