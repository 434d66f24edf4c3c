"""The viewer's page in headless Chromium, against a real daemon fed with simulated frames.

Debian's ``chromium`` driven by Playwright (``executable_path``; Playwright's own browsers are never
downloaded). One browser serves the module; one daemon and one viewer serve the checks that only watch them;
the restart check has its own. The page is observed from inside by an init script (a MutationObserver on the
counters and on the picture's ``src``, and a sampler on every animation frame), so what is asserted is what
the page did, not what a poll happened to catch.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from livestack import events
from livestack.clients.web.app import WebSettings
from livestack.clients.web.server import WebServer
from livestack.config import Config
from livestack.live.daemon import Daemon
from livestack.live.notify import Notifier
from livestack.simulate import SimConfig, simulate

CHROMIUM = "/usr/bin/chromium"
LOOPBACK = "tcp://127.0.0.1:*"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
TOKEN = "a-secret-for-the-host-only"
#: Seconds any one wait may take (two cores shared with other suites).
WAIT = 30.0
#: The issue's bound: the overlay's count follows an accepted frame within this many seconds.
COUNT_DELAY = 2.0

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")

playwright_api = pytest.importorskip("playwright.sync_api")

# Records, from inside the page, when the stacked count changed and every width the picture ever had.
INSTRUMENT = """
(() => {
  const log = window.__probe = { counts: [], widths: [], srcs: [], minWidth: Infinity, samples: 0 };
  const sample = () => {
    const img = document.getElementById('picture');
    if (img && img.getAttribute('src')) {
      log.samples += 1;
      log.minWidth = Math.min(log.minWidth, img.naturalWidth);
    }
  };
  const frame = () => { sample(); requestAnimationFrame(frame); };
  requestAnimationFrame(frame);
  setInterval(sample, 4);
  document.addEventListener('DOMContentLoaded', () => {
    const stacked = document.getElementById('stacked');
    new MutationObserver(() => log.counts.push([stacked.textContent, Date.now()]))
      .observe(stacked, { childList: true, characterData: true, subtree: true });
    const img = document.getElementById('picture');
    new MutationObserver(() => {
      log.srcs.push(img.getAttribute('src'));
      log.widths.push(img.naturalWidth);
      sample();
    }).observe(img, { attributes: true, attributeFilter: ['src'] });
  });
})();
"""


# -- the scene -------------------------------------------------------------------------------------------


class Recorder:
    """A daemon listener noting when each accepted frame was published (wall clock, like the page's)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.accepted: list[float] = []

    def __call__(self, event: events.Event) -> None:
        if event.topic == "frame" and event["verdict"] == "accepted":
            with self._cond:
                self.accepted.append(time.time())
                self._cond.notify_all()

    def wait_for(self, count: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.accepted) >= count, WAIT), \
                f"only {len(self.accepted)} frames accepted"


def daemon_config(root: Path, publish: str = LOOPBACK, control: str = LOOPBACK) -> Config:
    (root / "frames").mkdir(exist_ok=True)
    return Config(base=root).with_overrides({
        "watch.folder": str(root / "frames"), "output.folder": str(root / "out"),
        "state.folder": str(root / "state"), "watch.settle": 0.3, "watch.poll_interval": 0.1,
        "network.publish": publish, "network.control": control, "network.preview_interval": 0,
        "output.image_format": "png", "output.every_frames": 0, "output.every_seconds": 0,
        "web.display_interval": 0.2, "web.display_size": 320,
    })


def start_daemon(config: Config, recorder: Recorder | None = None) -> Daemon:
    daemon = Daemon(config, notifier=Notifier(environ={}), listeners=[recorder] if recorder else [])
    daemon.start()
    return daemon


def staged(root: Path, count: int, seed: int) -> list[Path]:
    simulate(root / "staging", SimConfig(frames=count, interval=0, size=(480, 360), n_stars=250, seed=seed),
             sleep=lambda _s: None)
    return sorted((root / "staging").glob("*.fits"))


def arrive(path: Path, daemon: Daemon) -> None:
    os.replace(path, daemon.watch_dir / path.name)  # complete at once, as a capture program's rename


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield launched
        finally:
            launched.close()


class Scene:
    def __init__(self, root: Path) -> None:
        self.recorder = Recorder()
        self.daemon = start_daemon(daemon_config(root), self.recorder)
        self.frames = staged(root, 6, seed=5)
        self.web = WebServer(WebSettings(self.daemon.publish_endpoint, self.daemon.control_endpoint,
                                         caption="Welcome to the star party", control_token=TOKEN),
                             "127.0.0.1:0")
        self.web.start()

    def close(self) -> None:
        self.web.stop()
        self.daemon.stop()


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    made = Scene(tmp_path_factory.mktemp("web-scene"))
    try:
        yield made
    finally:
        made.close()


def open_page(browser: Any, url: str, **options: Any) -> Any:
    page = browser.new_page(viewport={"width": 1280, "height": 720}, **options)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    page.add_init_script(INSTRUMENT)
    page.goto(url)
    return page


def until(page: Any, condition: str) -> None:
    """Wait for a JavaScript condition on the page (as a function: the page's CSP forbids eval)."""
    page.wait_for_function(f"() => {condition}", timeout=WAIT * 1000)


def live(page: Any) -> None:
    until(page, "document.getElementById('connection').hidden")


# -- the checks ----------------------------------------------------------------------------------------------


def test_count_follows_each_frame_and_pictures_swap_without_a_blank_frame_keeping_the_zoom(
        browser: Any, scene: Scene) -> None:
    page = open_page(browser, scene.web.url)
    live(page)
    assert page.text_content("#caption") == "Welcome to the star party"
    done = 0

    def feed(n: int) -> None:
        nonlocal done
        for _ in range(n):
            arrive(scene.frames[done], scene.daemon)
            done += 1
            scene.recorder.wait_for(done)
            until(page, f"document.getElementById('stacked').textContent === '{done}'")
            # And the picture of that stack, so that every frame brings a swap.
            until(page, f"document.getElementById('picture').dataset.frames === '{done}'")

    feed(2)
    # The visitor zooms in (twice, about the middle) and drags the picture aside.
    page.click("#zoom-in")
    page.click("#zoom-in")
    page.mouse.move(640, 360)
    page.mouse.down()
    page.mouse.move(560, 330, steps=4)
    page.mouse.up()
    zoom = page.get_attribute("#picture", "data-zoom")
    transform = page.eval_on_selector("#picture", "img => img.style.transform")
    assert zoom == "2.2500" and "scale" in transform
    feed(3)

    probe = page.evaluate("window.__probe")
    assert page.errors == []
    # Every accepted frame showed in the overlay within the bound, counted from its publication.
    shown = {}
    for text, when in probe["counts"]:
        shown.setdefault(text, when / 1000.0)
    delays = [shown[str(n)] - scene.recorder.accepted[n - 1] for n in range(1, done + 1)]
    assert all(d < COUNT_DELAY for d in delays), f"count delays {delays}"
    # Five pictures replaced one another, and the shown one never had a zero width, at any sample.
    assert len(set(probe["srcs"])) >= 5 and probe["samples"] > 50
    assert probe["minWidth"] == 320 and min(probe["widths"]) == 320
    # The visitor's zoom and pan are untouched by the swaps.
    assert page.get_attribute("#picture", "data-zoom") == zoom
    assert page.eval_on_selector("#picture", "img => img.style.transform") == transform
    page.close()


def test_kiosk_hides_the_controls_and_enlarges_the_overlay(browser: Any, scene: Scene) -> None:
    normal = open_page(browser, scene.web.url + f"?token={TOKEN}")
    live(normal)
    normal.wait_for_selector("#daemon-controls", state="visible", timeout=WAIT * 1000)
    kiosk = open_page(browser, scene.web.url + f"?kiosk=1&token={TOKEN}")
    live(kiosk)
    until(kiosk, "document.getElementById('stacked').textContent !== '0'")
    for selector in ("#controls", "#zoom-in", "#black", "#daemon-controls", "#stack-select"):
        assert not kiosk.is_visible(selector), selector
    assert kiosk.is_visible("#overlay") and kiosk.is_visible("#picture")

    def size(page: Any) -> float:
        return float(page.eval_on_selector("#target", "e => parseFloat(getComputedStyle(e).fontSize)"))

    assert size(kiosk) > 1.3 * size(normal)
    normal.close()
    kiosk.close()


def test_control_only_with_the_token(browser: Any, scene: Scene) -> None:
    visitor = open_page(browser, scene.web.url)
    live(visitor)
    assert not visitor.is_visible("#daemon-controls")
    # Even a visitor who writes the request by hand gets nothing done.
    for headers in ({}, {"Authorization": "Bearer guessed-token-123"}):
        reply = visitor.evaluate("""async (headers) => {
            const r = await fetch('api/control/pause', {method: 'POST', headers});
            return [r.status, await r.json()];
        }""", headers)
        assert reply[0] == 401 and reply[1]["ok"] is False
    assert scene.daemon.status()["state"] != "paused"

    host = open_page(browser, scene.web.url + f"?token={TOKEN}")
    live(host)
    host.wait_for_selector("#daemon-controls", state="visible", timeout=WAIT * 1000)
    assert "token" not in host.url  # taken out of the address bar (and so off the projector)
    host.click("#daemon-controls [data-cmd=pause]")
    until(host, "document.getElementById('notice').textContent === 'pause: done'")
    assert scene.daemon.status()["state"] == "paused"
    until(host, "document.getElementById('age').textContent.includes('paused')")
    host.click("#daemon-controls [data-cmd=resume]")
    until(host, "document.getElementById('notice').textContent === 'resume: done'")
    assert scene.daemon.status()["state"] != "paused"
    visitor.close()
    host.close()


def test_page_recovers_by_itself_when_the_daemon_and_the_viewer_restart(
        browser: Any, tmp_path: Path) -> None:
    frames = staged(tmp_path, 3, seed=9)
    first = start_daemon(daemon_config(tmp_path))
    publish, control = first.publish_endpoint, first.control_endpoint
    web = WebServer(WebSettings(publish, control), "127.0.0.1:0")
    web.start()
    second: Daemon | None = None
    try:
        page = open_page(browser, web.url + "?kiosk=1")
        live(page)
        arrive(frames[0], first)
        until(page, "document.getElementById('stacked').textContent === '1'")

        # The daemon goes away: the page says so, and keeps what it shows.
        first.stop()
        until(page, "!document.getElementById('connection').hidden && "
            "document.getElementById('connection').textContent.includes('reconnecting')")
        assert page.text_content("#stacked") == "1"
        # It comes back on the same sockets and state: the page follows without anyone touching it.
        second = start_daemon(daemon_config(tmp_path, publish, control))
        live(page)
        arrive(frames[1], second)
        until(page, "document.getElementById('stacked').textContent === '2'")

        # The viewer itself goes away and comes back on the same address (the network was cut).
        address = web.url.removeprefix("http://").rstrip("/")
        web.stop()
        until(page, "document.getElementById('connection').textContent.includes('to the viewer')")
        web = WebServer(WebSettings(publish, control), address)
        web.start()
        live(page)
        arrive(frames[2], second)
        until(page, "document.getElementById('stacked').textContent === '3'")
        until(page, "document.getElementById('picture').dataset.frames === '3'")
        assert page.errors == []
        assert "chrome-error" not in page.url
        page.close()
    finally:
        web.stop()
        if second is not None:
            second.stop()
        first.stop()
        shutil.rmtree(tmp_path / "state", ignore_errors=True)


def test_a_second_target_brings_the_selector_and_the_stretch_stays_in_the_browser(
        browser: Any, scene: Scene, tmp_path: Path) -> None:
    page = open_page(browser, scene.web.url)
    live(page)
    until(page, "document.getElementById('picture').dataset.frames !== undefined")
    assert not page.is_visible("#stack-select")
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    # The visitor's stretch changes what this browser shows, and asks the server nothing.
    page.fill("#black", "0.2")
    page.dispatch_event("#black", "input")
    assert "stretched" in (page.get_attribute("#picture", "class") or "")
    assert page.eval_on_selector("#picture", "img => getComputedStyle(img).filter").startswith("url(")
    table = page.get_attribute("#lut-r", "tableValues") or ""
    assert table.split()[0] == "0.0000" and table.split()[-1] == "1.0000" and len(table.split()) == 64
    assert requests == []

    # Another target starts a stack of its own (a new session in the daemon): the selector appears.
    simulate(tmp_path, SimConfig(frames=1, interval=0, size=(480, 360), n_stars=250, seed=21,
                                 object_name="M 42"), sleep=lambda _s: None)
    (other,) = sorted(tmp_path.glob("*.fits"))
    os.replace(other, scene.daemon.watch_dir / "m42_0001.fits")
    page.wait_for_selector("#stack-select", state="visible", timeout=WAIT * 1000)
    until(page, "document.getElementById('target').textContent === 'M 42'")  # it follows the latest
    options = page.eval_on_selector_all("#stack-select option", "os => os.map(o => o.textContent)")
    assert len(options) == 3 and options[0] == "follow the latest stack"
    assert any(o.startswith("SIM-FIELD") for o in options) and any(o.startswith("M 42") for o in options)
    field = page.eval_on_selector_all("#stack-select option", "os => os.map(o => o.value)")[
        next(i for i, o in enumerate(options) if o.startswith("SIM-FIELD"))]
    page.select_option("#stack-select", field)
    until(page, "document.getElementById('target').textContent === 'SIM-FIELD'")
    assert int(page.text_content("#stacked") or "0") >= 5
    page.close()


def test_on_a_phone_everything_fits_the_screen(browser: Any, scene: Scene) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                                  device_scale_factor=3)
    page = context.new_page()
    page.goto(scene.web.url)
    live(page)
    until(page, "document.getElementById('picture').naturalWidth > 0")
    width = page.evaluate("window.innerWidth")
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    for selector in ("#overlay", "#controls", "#picture"):
        box = page.locator(selector).bounding_box()
        assert box is not None and box["width"] > 0
        if selector != "#picture":
            assert box["x"] >= 0 and box["x"] + box["width"] <= width + 1, selector
    # The overlay and the controls do not cover each other.
    overlay, controls = page.locator("#overlay").bounding_box(), page.locator("#controls").bounding_box()
    assert overlay is not None and controls is not None
    assert controls["y"] + controls["height"] <= overlay["y"]
    context.close()
