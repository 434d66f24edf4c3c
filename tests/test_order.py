"""Order and reference: frames available together are stacked in observation order, a restart's backlog
included, and the reference is chosen among the first frames by quality, not by which file came first.

Real daemons on real folders (``running`` from the daemon tests), small simulated frames, and an independent
answer: an in-process ``Stacker`` over the same files in observation order, compared bit for bit with the
daemon's final ``stack.fits``.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits
from test_daemon import N_STARS, SIZE, WAIT, Recorder, decided, make_config, running

from livestack.config import Config
from livestack.pipeline import Stacker, order_by_time
from livestack.simulate import SimConfig, simulate


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Fifteen frames of one field, 10 s apart in DATE-OBS (kappa-sigma's warm-up is five frames)."""
    folder = tmp_path_factory.mktemp("order-night")
    sim = SimConfig(frames=15, interval=10.0, size=SIZE, n_stars=N_STARS, seed=17)
    return simulate(folder, sim, sleep=lambda _s: None)


def journal(config: Config) -> list[dict[str, Any]]:
    path = config.path(config.output.folder) / ".livestack-state" / "journal.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def final_stack(config: Config) -> tuple[np.ndarray, int]:
    (path,) = config.path(config.output.folder).rglob("stack.fits")
    with fits.open(path) as hdul:
        return np.asarray(hdul[0].data, dtype=np.float32), int(hdul[0].header["NCOMBINE"])


def uninterrupted(config: Config, paths: list[Path]) -> np.ndarray:
    """The stack of one uninterrupted run: every frame in observation order, in process."""
    stacker = Stacker(config)
    for path in order_by_time(paths):
        assert stacker.process(path).accepted
    image = stacker.result()
    assert image is not None
    return image


def test_a_restart_with_a_backlog_stacks_in_observation_order_and_equals_the_uninterrupted_run(
        tmp_path: Path, night: list[Path]) -> None:
    config = make_config(tmp_path, **{"stack.method": "kappa-sigma", "output.every_frames": 0})
    watch = config.path(config.watch.folder)

    # The first run stacks three frames as they arrive, one by one.
    first = Recorder()
    with running(config, (first,)):
        for n, path in enumerate(night[:3], start=1):
            shutil.copyfile(path, watch / path.name)
            first.wait_for(decided(n), f"frame {n}")

    # While the daemon is down, six frames pile up, copied so that their mtimes run against their DATE-OBS
    # (the newest observation has the oldest file time): the folder's own order is not the observation's.
    backlog = night[3:9]
    now = time.time()
    for age, path in enumerate(backlog):
        shutil.copyfile(path, watch / path.name)
        os.utime(watch / path.name, (now - 60 - age, now - 60 - age))

    # The second run finds the backlog, and new frames arrive while it is being stacked.
    later = night[9:]
    second = Recorder()

    def camera() -> None:
        for path in later:
            shutil.copyfile(path, watch / path.name)
            time.sleep(0.2)

    writer = threading.Thread(target=camera, name="test-camera")
    with running(config, (second,)):
        writer.start()
        try:
            second.wait_for(decided(len(backlog) + len(later)), "the backlog and the new frames",
                            timeout=3 * WAIT)
        finally:
            writer.join(WAIT)

    entries = journal(config)
    assert [e["verdict"] for e in entries] == ["accepted"] * len(night)
    assert [Path(e["path"]).name for e in entries] == [p.name for p in night]
    image, ncombine = final_stack(config)
    assert ncombine == len(night)
    expected = uninterrupted(config, [watch / p.name for p in night])
    assert np.array_equal(image, expected, equal_nan=True)
