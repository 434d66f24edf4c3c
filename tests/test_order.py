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
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits
from scipy.ndimage import gaussian_filter
from test_daemon import N_STARS, SIZE, WAIT, Recorder, decided, make_config, running

from livestack import events
from livestack.config import Config
from livestack.errors import ConfigError
from livestack.pipeline import (
    Prepared,
    ReferenceCandidate,
    Stacker,
    choose_reference,
    order_by_time,
    reference_first,
)
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


# -- the reference: the best of the first frames ------------------------------------------------------------

#: Stars in view: enough that a defocused frame still has the stars a reference needs.
DENSE = 1000


@pytest.fixture(scope="module")
def poor_start(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Eight frames whose first is defocused (FWHM 6 px instead of 3: fewer, fatter stars), the rest good."""
    folder = tmp_path_factory.mktemp("poor-start")
    good = SimConfig(frames=8, interval=10.0, size=SIZE, n_stars=DENSE, seed=23)
    paths = simulate(folder, good, sleep=lambda _s: None)
    blurred = tmp_path_factory.mktemp("poor-start-blurred")
    (defocused,) = simulate(blurred, SimConfig(frames=1, interval=10.0, size=SIZE, n_stars=DENSE, seed=23,
                                               fwhm=6.0), sleep=lambda _s: None)
    shutil.copyfile(defocused, paths[0])
    return paths


def test_the_poor_first_frame_is_what_the_test_says(poor_start: list[Path], tmp_path: Path) -> None:
    # Independent of the choice: the first frame has fewer and much fatter stars than the others.
    stacker = Stacker(make_config(tmp_path))
    first, second = (stacker.prepare(p) for p in poor_start[:2])
    assert isinstance(first, Prepared) and isinstance(second, Prepared)
    assert first.quality.fwhm > 1.8 * second.quality.fwhm
    assert first.quality.stars < 0.5 * second.quality.stars
    assert first.quality.stars >= 15  # it could be the reference: only a choice keeps it from being one


def test_choose_reference_prefers_many_sharp_stars_then_the_earliest() -> None:
    c = ReferenceCandidate
    assert choose_reference([c(40, 7.0), c(120, 3.1), c(118, 2.9), c(60, 3.0)]) == 1
    assert choose_reference([c(120, 3.0), c(121, 3.0)]) == 0  # as good as the best: the earliest
    assert choose_reference([c(120, 4.0), c(115, 2.5)]) == 1  # many stars, but much fatter
    assert choose_reference([None, c(200, 3.0, problem="too few"), c(30, 3.0)]) == 2
    assert choose_reference([c(2, float("nan"), "surface"), c(50, 3.0)]) == 1
    assert choose_reference([c(2, float("nan"), "surface"), c(3, float("nan"), "surface")]) == 0
    assert choose_reference([None, c(200, 3.0, problem="too few")]) is None


def test_the_batch_stack_stacks_the_chosen_reference_first(poor_start: list[Path], tmp_path: Path) -> None:
    stacker = Stacker(make_config(tmp_path))
    ordered = reference_first(stacker, order_by_time(poor_start))
    assert ordered == [poor_start[1], poor_start[0], *poor_start[2:]]
    assert stacker.process(ordered[0]).reference
    one = Stacker(make_config(tmp_path, **{"align.reference_window": 1}))
    assert reference_first(one, poor_start) == poor_start


def stack_of(config: Config) -> np.ndarray:
    image, _ = final_stack(config)
    return image


@pytest.mark.parametrize("arrival", ["burst", "live"])
def test_a_poor_first_frame_does_not_become_the_reference_and_recovery_keeps_the_chosen_one(
        tmp_path: Path, poor_start: list[Path], arrival: str) -> None:
    # The uninterrupted run: in a burst every frame is waiting at start; live, the defocused frame comes
    # first and the good ones a little later, within the reference window.
    (tmp_path / "whole").mkdir()
    (tmp_path / "split").mkdir()
    whole = make_config(tmp_path / "whole", **{"stack.method": "kappa-sigma", "output.every_frames": 0})
    watch = whole.path(whole.watch.folder)
    recorder = Recorder()
    if arrival == "burst":
        for path in poor_start:
            shutil.copyfile(path, watch / path.name)
    with running(whole, (recorder,)):
        if arrival == "live":
            for path in poor_start:
                shutil.copyfile(path, watch / path.name)
                time.sleep(0.1)
        recorder.wait_for(decided(len(poor_start)), "every frame")
    entries = journal(whole)
    reference = [e for e in entries if e["reference"]]
    assert [Path(e["path"]).name for e in reference] == [poor_start[1].name]
    assert entries[0] is reference[0]  # stacked first, then the others in observation order
    others = [poor_start[0], *poor_start[2:]]
    assert [Path(e["path"]).name for e in entries[1:]] == [p.name for p in others]
    (poor,) = [e for e in entries if Path(e["path"]).name == poor_start[0].name]
    assert poor["verdict"] == "rejected" and "blurred" in poor["reason"]
    expected = stack_of(whole)

    # Interrupted: four frames, a stop, the checkpoints lost (as after a kill before the first one: the
    # journal is replayed from the files), then the rest.
    split = make_config(tmp_path / "split", **{"stack.method": "kappa-sigma", "output.every_frames": 0})
    watch = split.path(split.watch.folder)
    for path in poor_start[:4]:
        shutil.copyfile(path, watch / path.name)
    with running(split, (first := Recorder(),)):
        first.wait_for(decided(4), "the first four frames")
    shutil.rmtree(split.path(split.output.folder) / ".livestack-state" / "checkpoints")
    for path in poor_start[4:]:
        shutil.copyfile(path, watch / path.name)
    with running(split, (second := Recorder(),)):
        second.wait_for(decided(len(poor_start) - 4), "the rest")
    assert [e["reference"] for e in journal(split)] == [e["reference"] for e in entries]
    assert np.array_equal(stack_of(split), expected, equal_nan=True)


@pytest.fixture(scope="module")
def two_targets(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Path]]:
    """Two 4-frame sessions (M31, M42) whose first frames are blurred (same header), interleaved in time."""
    folder = tmp_path_factory.mktemp("two-targets")
    sessions = []
    for name, seed, offset in (("M31", 31, 0), ("M42", 32, 5)):
        start = SimConfig().start + timedelta(seconds=offset)
        paths = simulate(folder / name, SimConfig(frames=4, interval=10.0, size=(400, 300), object_name=name,
                                                  seed=seed, start=start), sleep=lambda _s: None)
        with fits.open(paths[0]) as hdul:
            header = hdul[0].header.copy()
            blurred = gaussian_filter(np.asarray(hdul[0].data, dtype=np.float32), sigma=2.0)
        fits.writeto(paths[0], blurred.astype(np.float32), header, overwrite=True)
        sessions.append(paths)
    return sessions[0], sessions[1]


def test_the_second_target_read_ahead_also_gets_its_reference_chosen(
        tmp_path: Path, two_targets: tuple[list[Path], list[Path]]) -> None:
    # A_1, B_1, A_2, B_2 ... arrive 0.3 s apart: M42's first frame is read ahead while M31's frames stack,
    # and must still wait for its target's reference window instead of becoming the reference unchosen.
    m31, m42 = two_targets
    config = make_config(tmp_path, **{"output.every_frames": 0})
    stacker = Stacker(config)
    for paths in (m31, m42):
        blurred, sharp = (stacker.prepare(p) for p in paths[:2])
        assert isinstance(blurred, Prepared) and isinstance(sharp, Prepared)
        assert blurred.quality.fwhm > 1.4 * sharp.quality.fwhm  # independent of the choice
    watch = config.path(config.watch.folder)
    recorder = Recorder()
    with running(config, (recorder,)):
        for a, b in zip(m31, m42, strict=True):
            shutil.copyfile(a, watch / f"a-{a.name}")
            time.sleep(0.3)
            shutil.copyfile(b, watch / f"b-{b.name}")
            time.sleep(0.3)
        recorder.wait_for(decided(8), "every frame")
    entries = journal(config)
    for prefix, paths in (("a-", m31), ("b-", m42)):
        mine = [e for e in entries if Path(e["path"]).name.startswith(prefix)]
        references = [Path(e["path"]).name for e in mine if e["reference"]]
        assert len(references) == 1 and references[0] != prefix + paths[0].name
        # The chosen one first, then the others in observation order.
        assert Path(mine[0]["path"]).name == references[0]
        rest = [prefix + p.name for p in paths if prefix + p.name != references[0]]
        assert [Path(e["path"]).name for e in mine[1:]] == rest


def test_a_frame_held_for_the_reference_window_is_reported_as_choosing(tmp_path: Path,
                                                                        night: list[Path]) -> None:
    # One frame of five wanted: it waits up to reference_wait seconds, and status and the log say why.
    config = make_config(tmp_path, **{"align.reference_wait": 4.0})
    watch = config.path(config.watch.folder)
    recorder = Recorder()
    with running(config, (recorder,)) as daemon:
        shutil.copyfile(night[0], watch / night[0].name)
        deadline = time.monotonic() + WAIT
        while (status := daemon.status())["state"] != "choosing":
            assert status["received"] == 0 and time.monotonic() < deadline, status
            time.sleep(0.05)
        assert status["queue"] == 1
        assert status["choosing"].startswith("SIM-FIELD: 1 of 5 first frames, at most ")
        left = float(status["choosing"].split("at most ")[1].split(" s")[0])
        assert 0.0 < left <= 4.0
        recorder.wait_for(decided(1), "the frame after the wait")
        wait_until_state = time.monotonic() + WAIT
        while daemon.status()["state"] != "waiting":
            assert time.monotonic() < wait_until_state
            time.sleep(0.05)
        assert daemon.status()["choosing"] is None
    opened = [e["message"] for e in recorder.topic("log") if "choosing the reference" in e["message"]]
    assert opened == ["choosing the reference of SIM-FIELD: its first frames wait up to 4 s for 5 of them"]
    statuses = [e for e in recorder.topic("status") if e["state"] == "choosing"]
    assert statuses and all(s["choosing"] for s in statuses)
    for payload in statuses:
        events.validate(payload)


def test_reference_wait_has_a_maximum(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="reference_wait"):
        make_config(tmp_path, **{"align.reference_wait": 61.0})
