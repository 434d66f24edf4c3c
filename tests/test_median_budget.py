"""The median's disk budget: a median stack whose cube of frames would pass ``[stack] median_disk_budget``
goes on as kappa-sigma over every frame, says so, and deletes its cube; no frame is lost or counted twice.

Small simulated frames (480x360 mono: 691,200 bytes a frame in the cube) and a budget of a few of them. The
independent answer is an in-process kappa-sigma ``Stacker`` over the same frames with equal weights (the
median weighs frames equally, so the frames folded in from its cube count equally too).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from test_daemon import N_STARS, SIZE, Recorder, decided, make_config, running

from livestack import events
from livestack.config import Config
from livestack.pipeline import Stacker
from livestack.simulate import SimConfig, simulate

FRAME_BYTES = SIZE[0] * SIZE[1] * 4
#: Room for three frames, not four.
BUDGET_GB = 3.5 * FRAME_BYTES / 1e9


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("budget-night")
    sim = SimConfig(frames=8, interval=10.0, size=SIZE, n_stars=N_STARS, seed=31, trails=(4,))
    return simulate(folder, sim, sleep=lambda _s: None)


def kappa_sigma(config: Config, paths: list[Path]) -> np.ndarray:
    stacker = Stacker(config.with_overrides({"stack.method": "kappa-sigma"}))
    for path in paths:
        assert stacker.process(path).accepted
    image = stacker.result()
    assert image is not None
    return image


def test_a_median_past_its_budget_goes_on_as_kappa_sigma_over_every_frame(
        tmp_path: Path, frames: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(tmp_path, **{"stack.method": "median", "stack.weights": "none",
                                      "stack.median_disk_budget": BUDGET_GB})
    work = tmp_path / "work"
    stacker = Stacker(config, workdir=work)
    with caplog.at_level(logging.WARNING, logger="livestack.pipeline"):
        for n, path in enumerate(frames, start=1):
            assert stacker.process(path).accepted
            cubes = list(work.glob("median-*.cube"))
            # The cube never holds more than the budget allows.
            assert sum(c.stat().st_size for c in cubes) <= BUDGET_GB * 1e9
            if n <= 3:
                assert not caplog.records
            for cube in stacker.take_retired():
                cube.discard()
    (record,) = caplog.records
    assert "disk budget" in record.getMessage() and "at 3 frames" in record.getMessage()
    assert "kappa-sigma" in record.getMessage()
    assert not list(work.glob("median-*.cube"))  # folded: the disk is given back
    assert stacker.count == len(frames)
    assert stacker.info().ncombine == len(frames)
    assert any("median disk budget reached at 3 frames" in h for h in stacker.info().history)
    image = stacker.result()
    assert image is not None
    assert np.array_equal(image, kappa_sigma(config, frames), equal_nan=True)

    # Under the budget nothing changes: the exact median of every frame.
    roomy = Stacker(config.with_overrides({"stack.median_disk_budget": 1.0}), workdir=tmp_path / "roomy")
    for path in frames:
        assert roomy.process(path).accepted
    assert len(list((tmp_path / "roomy").glob("median-*.cube"))) == 1
    assert not any("budget" in h for h in roomy.info().history)
    assert not np.array_equal(roomy.result(), image, equal_nan=True)


def test_the_daemon_says_so_loses_no_frame_and_recovers_the_folded_stack(
        tmp_path: Path, frames: list[Path]) -> None:
    config = make_config(tmp_path, **{"stack.method": "median", "stack.weights": "none",
                                      "stack.median_disk_budget": BUDGET_GB, "output.every_frames": 0,
                                      "state.checkpoint_every_frames": 1})
    watch = config.path(config.watch.folder)
    state = config.path(config.output.folder) / ".livestack-state"

    def folded(evs: list[events.Event]) -> bool:
        return any(e.topic == "status" and e["method"] == "median, then kappa-sigma (disk budget)"
                   for e in evs)

    def run(batch: list[Path]) -> Recorder:
        for path in batch:
            shutil.copyfile(path, watch / path.name)
        recorder = Recorder()
        with running(config, (recorder,)):
            recorder.wait_for(decided(len(batch)), f"{len(batch)} frames")
            recorder.wait_for(folded, "a status naming the method in use")
        return recorder

    # Past the budget in the first run: a log event says so, and the stack goes on.
    first = run(frames[:5])
    messages = [e["message"] for e in first.topic("log")]
    assert any("disk budget" in m and "kappa-sigma" in m for m in messages), messages
    assert [f["verdict"] for f in first.frames()] == ["accepted"] * 5
    # Restarted from its checkpoint (a kappa-sigma stack now, under a median configuration).
    run(frames[5:7])
    # Restarted with the checkpoints lost: the journal is replayed from the files, folding again.
    shutil.rmtree(state / "checkpoints")
    run(frames[7:])

    entries = [line for line in (state / "journal.jsonl").read_text().splitlines() if line]
    assert len(entries) == len(frames)
    (path,) = config.path(config.output.folder).rglob("stack.fits")
    with fits.open(path) as hdul:
        assert hdul[0].header["NCOMBINE"] == len(frames)
        assert hdul[0].header["STACKMET"] == "median, then kappa-sigma (disk budget)"
        assert any("median disk budget" in str(h) for h in hdul[0].header["HISTORY"])
        image = np.asarray(hdul[0].data, dtype=np.float32)
    assert np.array_equal(image, kappa_sigma(config, frames), equal_nan=True)
    assert not list(state.rglob("median-*.cube"))


def test_a_budget_that_cannot_hold_one_frame_says_so_and_stacks_kappa_sigma_from_the_start(
        tmp_path: Path, frames: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(tmp_path, **{"stack.method": "median", "stack.weights": "none",
                                      "stack.median_disk_budget": 0.5 * FRAME_BYTES / 1e9})
    stacker = Stacker(config, workdir=tmp_path / "work")
    with caplog.at_level(logging.WARNING, logger="livestack.pipeline"):
        for path in frames[:4]:
            assert stacker.process(path).accepted
    (record,) = caplog.records
    message = record.getMessage()
    assert "cannot hold one frame" in message and "kappa-sigma from the start" in message, message
    assert "at 0 frames" not in message and "those 0" not in message
    history = stacker.info().history
    assert any("cannot hold one frame" in h for h in history) and not any("at 0 frames" in h for h in history)
    assert np.array_equal(stacker.result(), kappa_sigma(config, frames[:4]), equal_nan=True)
    stacker.discard()
