"""Render the README's picture of the browser viewer: a live daemon stacks simulated colour frames, the viewer
serves it, and headless Chromium (Debian's, driven by Playwright) takes the screenshot.

Usage: ``.venv/bin/python docs/web_screenshot.py docs/web.png [--frames 14]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

from livestack.clients.web.app import WebSettings
from livestack.clients.web.server import WebServer
from livestack.config import Config
from livestack.live.daemon import Daemon
from livestack.live.notify import Notifier
from livestack.simulate import SimConfig, simulate

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("--frames", type=int, default=24)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="livestack-shot-") as tmp:
        root = Path(tmp)
        simulate(root / "staging", SimConfig(frames=args.frames, interval=0, size=(1280, 960), seed=11,
                                             bayer="RGGB", bad_frames=(6,)), sleep=lambda _s: None)
        (root / "frames").mkdir()
        config = Config(base=root).with_overrides({
            "watch.folder": "frames", "output.folder": "out", "watch.settle": 0.3,
            "network.publish": "tcp://127.0.0.1:*", "network.control": "tcp://127.0.0.1:*",
            "web.display_interval": 0.5, "web.caption": "Welcome to the star party: ask us anything!"})
        daemon = Daemon(config, notifier=Notifier(environ={}))
        daemon.start()
        web = WebServer(WebSettings(daemon.publish_endpoint, daemon.control_endpoint,
                                    caption=config.web.caption), "127.0.0.1:0")
        web.start()
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 720})
                page.goto(web.url)
                for path in sorted((root / "staging").glob("*.fits")):
                    os.replace(path, root / "frames" / path.name)
                    time.sleep(0.8)
                deadline = time.monotonic() + 120
                while (daemon.stats.accepted + daemon.stats.rejected < args.frames
                       and time.monotonic() < deadline):
                    time.sleep(0.2)
                accepted = daemon.stats.accepted
                page.wait_for_function(f"() => document.getElementById('picture').dataset.frames === "
                                       f"'{accepted}'", timeout=60_000)
                time.sleep(2.5)
                page.screenshot(path=args.output)
                browser.close()
        finally:
            web.stop()
            daemon.stop()
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
