"""Filters in the live daemon: a snapshot per filter, the colour composite, per-filter counts in events."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits
from test_daemon import SIZE, Recorder, decided, make_config, running

from livestack.config import Config
from livestack.live import writer as writer_module
from livestack.live.writer import ColourSnapshots
from livestack.pipeline import Stacker, build_composite
from livestack.simulate import SimConfig, simulate

WHEEL = ("L", "R", "G", "B")


def _no_sleep(seconds: float) -> None:
    del seconds


def _sim(**fields: object) -> SimConfig:
    base: dict[str, object] = {"interval": 0.0, "size": SIZE, "n_stars": 250, "seed": 11,
                               "rotation_per_frame": 0.03, "drift": (1.2, -0.6)}
    base.update(fields)
    return SimConfig(**base)  # type: ignore[arg-type]


def _batch(config: Config, paths: list[Path]) -> Stacker:
    stacker = Stacker(config)
    for path in paths:
        assert stacker.process(path).accepted, path
    return stacker


def _same(live: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_array_equal(np.isnan(live), np.isnan(expected))
    covered = ~np.isnan(expected)
    np.testing.assert_allclose(live[covered], expected[covered], rtol=1e-6)


def test_the_daemon_snapshots_each_filter_and_composes_them(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config(tmp_path, **{"stack.method": "mean", "output.every_frames": 4,
                                      "compose.every_seconds": 0.0})
    recorder = Recorder()
    threads: list[str] = []

    def traced(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return build_composite(*args, **kwargs)

    monkeypatch.setattr(writer_module, "build_composite", traced)
    sim = _sim(frames=8, filters=WHEEL)
    with running(config, (recorder,)):
        paths = simulate(tmp_path / "frames", sim, sleep=_no_sleep)
        recorder.wait_for(decided(8), "8 frames decided")
        recorder.wait_for(lambda evs: any(e.topic == "status" and len(e.payload.get("filters") or []) == 4
                                          and sum(f["frames"] for f in e["filters"]) == 8 for e in evs),
                          "a status with four filters")
    target = tmp_path / "out" / "SIM-FIELD"
    batch = _batch(config, paths)
    for name in WHEEL:
        with fits.open(target / name / "stack.fits") as hdul:
            header, data = hdul[0].header, hdul[0].data
        assert header["FILTER"] == name and header["NCOMBINE"] == 2
        _same(data, batch.result(name))
        assert (target / name / "stack.png").stat().st_size > 0
    with fits.open(target / "stack.fits") as hdul:
        header, data = hdul[0].header, hdul[0].data
    assert data.shape == (3, SIZE[1], SIZE[0])
    assert header["RECIPE"] == "LRGB" and header["NCOMBINE"] == 8 and header["LUMSRC"] == "L"
    snapshots = recorder.topic("snapshot")
    assert {s.get("filter") for s in snapshots} >= set(WHEEL)
    composites = [s for s in snapshots if s.get("recipe")]
    # every_seconds = 0: none during the night, one at shutdown.
    assert [s["reason"] for s in composites] == ["shutdown"] and composites[0]["frames"] == 8
    # Composites are made on the writer's thread, never on the worker's (the frame path).
    assert threads == ["livestack-writer"]
    # Viewers get the composite's picture beside each channel's, keyed by the recipe.
    pictures = [e for e in recorder.events if e.topic == "display"]
    assert any(e["filter"] == "LRGB" and e["frames"] == 8 for e in pictures)
    stacks = recorder.topic("stack")
    assert [f["filter"] for f in stacks[-1]["filters"]] == list(WHEEL)
    frames = recorder.frames("accepted")
    assert [f["filter"] for f in frames] == [*WHEEL, *WHEEL]


def test_frames_of_another_target_go_to_that_target_and_leave_the_first_whole(tmp_path: Path) -> None:
    config = make_config(tmp_path, **{"stack.method": "mean", "output.every_frames": 1,
                                      "compose.every_seconds": 0.0})
    recorder = Recorder()
    first = _sim(frames=4, filters=("L", "R"), object_name="NGC-1")
    other = _sim(frames=2, filters=("L",), object_name="NGC-2", seed=12,
                 start=first.start + timedelta(minutes=10))
    with running(config, (recorder,)):
        a = simulate(tmp_path / "frames" / "a", first, sleep=_no_sleep)
        recorder.wait_for(decided(4), "the first target's frames")
        b = simulate(tmp_path / "frames" / "b", other, sleep=_no_sleep)
        recorder.wait_for(decided(6), "the other target's frames")
    assert len(recorder.frames("accepted")) == 6
    out = tmp_path / "out"
    first_target = _batch(config, a)
    for name in ("L", "R"):
        with fits.open(out / "NGC-1" / name / "stack.fits") as hdul:
            assert hdul[0].header["NCOMBINE"] == 2 and hdul[0].header["OBJECT"] == "NGC-1"
            _same(hdul[0].data, first_target.result(name))
    with fits.open(out / "NGC-1" / "stack.fits") as hdul:
        assert hdul[0].header["RECIPE"] == "mono" and hdul[0].header["NCOMBINE"] == 4
    with fits.open(out / "NGC-2" / "stack.fits") as hdul:
        assert hdul[0].header["NCOMBINE"] == 2 and hdul[0].header["OBJECT"] == "NGC-2"
        _same(hdul[0].data, _batch(config, b).result("L"))


def test_composites_are_rate_limited_and_only_rebuilt_when_a_channel_changed() -> None:
    now = [100.0]
    schedule = ColourSnapshots(15.0, clock=lambda: now[0])
    folder = Path("target")
    counts = (("L", 2), ("R", 1))
    assert schedule.composite_due(folder, counts, forced=False)
    now[0] += 5.0
    assert not schedule.composite_due(folder, (("L", 3), ("R", 1)), forced=False)  # too soon
    assert schedule.composite_due(folder, (("L", 3), ("R", 1)), forced=True)  # asked for
    now[0] += 20.0
    assert not schedule.composite_due(folder, (("L", 3), ("R", 1)), forced=False)  # nothing changed
    assert schedule.composite_due(folder, (("L", 3), ("R", 2)), forced=False)
    never = ColourSnapshots(0.0, clock=lambda: now[0])
    assert not never.composite_due(folder, counts, forced=False)
    assert never.composite_due(folder, counts, forced=True)
    assert schedule.filter_changed(folder, "L", 3)
    schedule.filter_written(folder, "L", 3)
    assert not schedule.filter_changed(folder, "L", 3) and schedule.filter_changed(folder, "L", 4)
    schedule.composite_failed(folder)  # a write that failed is retried, even with nothing new
    assert schedule.composite_due(folder, (("L", 3), ("R", 2)), forced=True)


def test_a_target_interrupted_by_another_goes_on_where_it_was(tmp_path: Path) -> None:
    config = make_config(tmp_path, **{"stack.method": "mean", "output.every_frames": 1,
                                      "compose.every_seconds": 0.0})
    recorder = Recorder()
    first = _sim(frames=4, filters=("L", "R"), object_name="NGC-1")
    other = _sim(frames=2, filters=("L",), object_name="NGC-2", seed=12,
                 start=first.start + timedelta(minutes=10))
    again = _sim(frames=2, filters=("R",), object_name="NGC-1", start=first.start + timedelta(minutes=20))
    with running(config, (recorder,)):
        a1 = simulate(tmp_path / "frames" / "a1", first, sleep=_no_sleep)
        recorder.wait_for(decided(4), "the first target's frames")
        b = simulate(tmp_path / "frames" / "b", other, sleep=_no_sleep)
        recorder.wait_for(decided(6), "the other target's frames")
        a2 = simulate(tmp_path / "frames" / "a2", again, sleep=_no_sleep)
        recorder.wait_for(decided(8), "the first target's frames again")
    assert len(recorder.frames("accepted")) == 8
    out = tmp_path / "out"
    first_target = _batch(config, [*a1, *a2])
    for name, frames in (("L", 2), ("R", 4)):
        with fits.open(out / "NGC-1" / name / "stack.fits") as hdul:
            assert hdul[0].header["NCOMBINE"] == frames
            _same(hdul[0].data, first_target.result(name))
    with fits.open(out / "NGC-2" / "stack.fits") as hdul:
        assert hdul[0].header["NCOMBINE"] == 2 and hdul[0].header["OBJECT"] == "NGC-2"
        _same(hdul[0].data, _batch(config, b).result("L"))
