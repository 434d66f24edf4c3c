"""``livestack demo`` and ``livestack run --tui`` in a real terminal: tmux runs them, the test reads the
screen and presses q.

This is what a user sees: the dashboard attached to the demo's own daemon, counters rising as the simulated
camera writes frames, the stack preview in colour, the camera's end reported in the log, and, after q, the
daemon stopped (final snapshot) and the summary printed on the normal screen. The tmux server has its own
socket (``tmux -L``) and no configuration file, so a user's tmux is never touched.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

TMUX = shutil.which("tmux")

pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed")

#: The terminal's size, the one the dashboard is designed for.
COLUMNS, ROWS = 120, 40
#: Seconds allowed for the whole night (12 frames every 0.5 s, plus start-up on a busy 2-core machine).
DEADLINE_S = 90.0
FRAMES = 12


class Tmux:
    """One detached session on a private tmux server, killed with its server at ``close``."""

    def __init__(self, folder: Path) -> None:
        assert TMUX is not None
        self.socket = f"livestack-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.session = "demo"
        # No user configuration; a finished program's pane stays (dead) so that its last screen can be read.
        self.config = folder / "tmux.conf"
        self.config.write_text("set -g remain-on-exit on\nset -g history-limit 2000\n")
        self._base = [TMUX, "-u", "-L", self.socket, "-f", str(self.config)]

    def __call__(self, *args: str) -> str:
        proc = subprocess.run([*self._base, *args], capture_output=True, timeout=20, check=False)
        if proc.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)} failed: {proc.stderr.decode(errors='replace')}")
        return proc.stdout.decode("utf-8", errors="replace")

    def start(self, command: str, cwd: Path) -> None:
        self("new-session", "-d", "-s", self.session, "-x", str(COLUMNS), "-y", str(ROWS), "-c", str(cwd),
             command)

    def screen(self, escapes: bool = False) -> str:
        """The visible screen (the alternate one while the dashboard runs), with colour codes if asked."""
        return self("capture-pane", "-p", *(["-e"] if escapes else []), "-t", self.session)

    def pane(self, fmt: str) -> str:
        return self("display-message", "-p", "-t", self.session, fmt).strip()

    def close(self) -> None:
        subprocess.run([*self._base, "kill-server"], capture_output=True, timeout=20, check=False)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    session = Tmux(tmp_path)
    try:
        yield session
    finally:
        session.close()


def _wait_for(what: str, tmux: Tmux, test: Callable[[str], bool], deadline: float) -> str:
    """Read the screen every 0.25 s until ``test`` holds; fail with the last screen at the deadline."""
    while True:
        screen = tmux.screen()
        if test(screen):
            return screen
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; the screen was:\n{screen}")
        time.sleep(0.25)


def _stacked(screen: str) -> int | None:
    match = re.search(r"\bstacked (\d+)", screen)
    return None if match is None else int(match.group(1))


def test_demo_in_a_terminal_shows_the_live_dashboard_and_quits_on_q(tmux: Tmux, tmp_path: Path) -> None:
    output = tmp_path / "out"
    exit_file = tmp_path / "exit-status"
    demo = [sys.executable, "-m", "livestack.cli", "demo", "--size", "800x600", "--frames", str(FRAMES),
            "--interval", "0.5", "--output", str(output)]
    # COLUMNS and LINES (set in a test run's environment) would override the terminal's real size.
    record_exit = f"echo EXIT=$? > {shlex.quote(str(exit_file))}"
    tmux.start(f"env -u COLUMNS -u LINES {shlex.join(demo)}; {record_exit}", cwd=tmp_path)
    deadline = time.monotonic() + DEADLINE_S

    # The dashboard comes up, hears the daemon and starts counting.
    first = _wait_for("the first stacked frame", tmux,
                      lambda s: "● connected" in s and (_stacked(s) or 0) >= 1, deadline)
    count = _stacked(first)
    assert count is not None
    later = _wait_for("the stacked count to rise", tmux, lambda s: (_stacked(s) or 0) > count, deadline)
    assert "SIM-FIELD" in later.splitlines()[0], later
    # The camera waits for the dashboard, so the table has the night's first frame.
    _wait_for("all frames in the table", tmux, lambda s: "sim_0001.fits" in s and "sim_0008.fits" in s,
              deadline)

    # The preview: rows of half blocks in the right-hand panel, painted in colour.
    coloured = tmux.screen(escapes=True)
    preview_rows = [line for line in coloured.splitlines() if line.count("▀") >= 20]
    assert len(preview_rows) >= 5, tmux.screen()
    assert any(re.search(r"\x1b\[[0-9;]*(38;[25];|3[0-7]m)", row) for row in preview_rows)

    # The camera's end is said in the log, and the dashboard stays for the observer to read.
    done = _wait_for("the camera's end in the log", tmux,
                     lambda s: f"camera finished: {FRAMES} frames" in s, deadline)
    _wait_for("every frame received", tmux, lambda s: re.search(rf"received {FRAMES}\b", s) is not None,
              deadline)
    # Nothing of the daemon's stderr logging lands on the dashboard.
    assert " INFO " not in done and " WARNING " not in done, done
    assert tmux.pane("#{pane_dead}") == "0"

    tmux("send-keys", "-t", tmux.session, "q")
    while tmux.pane("#{pane_dead}") != "1":
        if time.monotonic() > deadline:
            pytest.fail(f"the demo did not end after q; the screen was:\n{tmux.screen()}")
        time.sleep(0.25)

    # Back on the normal screen: the summary printed after the dashboard left, and a clean exit.
    summary = tmux.screen()
    assert exit_file.read_text().strip() == "EXIT=0", summary
    match = re.search(r"demo: (\d+) stacked, (\d+) rejected of (\d+) frames", summary)
    assert match is not None, summary
    stacked, rejected, received = (int(v) for v in match.groups())
    assert received == FRAMES and stacked + rejected == FRAMES and stacked >= FRAMES - 2
    assert "snapshots: " in summary
    # The daemon's final snapshot holds every stacked frame.
    fits_files = list(output.rglob("stack.fits"))
    assert len(fits_files) == 1
    from astropy.io import fits

    with fits.open(fits_files[0]) as hdul:
        assert hdul[0].header["NCOMBINE"] == stacked


def test_run_with_tui_shows_its_own_daemon_and_stops_it_on_q(tmux: Tmux, tmp_path: Path) -> None:
    watch, output = tmp_path / "frames", tmp_path / "out"
    watch.mkdir()
    config = tmp_path / "livestack.toml"
    config.write_text('[network]\npublish = "tcp://127.0.0.1:*"\ncontrol = "tcp://127.0.0.1:*"\n')
    exit_file = tmp_path / "exit-status"
    run = [sys.executable, "-m", "livestack.cli", "run", "--tui", "--config", str(config),
           "--watch", str(watch), "--output", str(output)]
    record_exit = f"echo EXIT=$? > {shlex.quote(str(exit_file))}"
    tmux.start(f"env -u COLUMNS -u LINES {shlex.join(run)}; {record_exit}", cwd=tmp_path)
    deadline = time.monotonic() + DEADLINE_S

    screen = _wait_for("the dashboard of the waiting daemon", tmux,
                       lambda s: "● connected" in s and "waiting for frames" in s, deadline)
    assert "received 0" in screen and " INFO " not in screen, screen

    tmux("send-keys", "-t", tmux.session, "q")
    while tmux.pane("#{pane_dead}") != "1":
        if time.monotonic() > deadline:
            pytest.fail(f"livestack run did not end after q; the screen was:\n{tmux.screen()}")
        time.sleep(0.25)
    summary = tmux.screen()
    assert exit_file.read_text().strip() == "EXIT=0", summary
    assert "livestack: stopped; 0 stacked, 0 rejected of 0 frames" in summary, summary
