"""The daemon's warm-up: after it, the first frames make no first call of their own."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from livestack.config import Config
from livestack.live.daemon import Daemon
from livestack.live.notify import Notifier
from livestack.live.warmup import warm_up

#: In a fresh interpreter: the numba specialisations that exist after the warm-up, and those that stacking
#: frames of another size (a mono camera's, then a colour one's), taking the stack and writing its snapshot
#: add to them.
_PROBE = textwrap.dedent("""
    import json, sys, threading
    from dataclasses import replace
    from pathlib import Path
    import numba
    from livestack.config import Config
    from livestack.live.warmup import warm_up
    from livestack.pipeline import Stacker
    from livestack.simulate import SimConfig, simulate
    from livestack.stages import calibrate, detect, normalise, stack, warp
    from livestack.stages.snapshot import write_snapshot

    def signatures():
        out = set()
        for module in (calibrate, detect, normalise, stack, warp):
            for name, value in vars(module).items():
                if isinstance(value, numba.core.registry.CPUDispatcher):
                    out.update(f"{module.__name__}.{name}{sig}" for sig in value.signatures)
        return out

    root = Path(sys.argv[1])
    config = Config(base=root).with_overrides({"wcs.solve": "off"})
    warm_up(config, root / "warm-up", threading.Event())
    warmed = signatures()
    for bayer in (None, "GBRG"):
        frames = simulate(root / f"frames-{bayer}", SimConfig(frames=7, interval=0.0, size=(256, 192), seed=3,
                                                           n_stars=800, bayer=bayer), sleep=lambda s: None)
        (root / f"work-{bayer}").mkdir()
        stacker = Stacker(config, workdir=root / f"work-{bayer}")
        for path in frames:
            assert stacker.process(path).accepted
            stacker.result()
        write_snapshot(root / f"stack-{bayer}.fits", stacker.result(), stacker.info(), image_format="png")
    print(json.dumps({"warmed": sorted(warmed), "new": sorted(signatures() - warmed),
                      "left": (root / "warm-up").exists()}))
""")


def test_after_the_warm_up_stacking_a_mono_and_a_colour_camera_makes_no_first_numba_call(
        tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path)], capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.splitlines()[-1])
    assert len(found["warmed"]) >= 10  # the warm-up ran the kernels of every stage
    assert found["new"] == []
    assert not found["left"]


def test_a_stop_asked_before_the_warm_up_ends_it_at_the_next_frame(tmp_path: Path) -> None:
    stop = threading.Event()
    stop.set()
    started = time.monotonic()
    warm_up(Config(base=tmp_path), tmp_path / "warm-up", stop)
    assert time.monotonic() - started < 5.0
    assert not (tmp_path / "warm-up").exists()


def test_the_daemon_warms_up_as_it_starts_and_leaves_nothing(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="livestack.live.daemon")
    (tmp_path / "frames").mkdir()
    (tmp_path / "state" / "warm-up" / "mono").mkdir(parents=True)  # left by a run killed in its warm-up
    config = Config(base=tmp_path).with_overrides({
        "output.folder": "out", "state.folder": "state", "network.publish": "tcp://127.0.0.1:*",
        "network.control": "tcp://127.0.0.1:*", "wcs.solve": "off"})
    daemon = Daemon(config, notifier=Notifier(environ={}))
    daemon.start()

    def warmed() -> bool:
        return any(r.getMessage().startswith("warmed up in") for r in caplog.records)

    try:
        deadline = time.monotonic() + 120
        while not warmed() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        daemon.stop()
    assert warmed(), [r.getMessage() for r in caplog.records]
    assert not (tmp_path / "state" / "warm-up").exists()
    assert daemon.stats.received == 0  # its frames are its own
