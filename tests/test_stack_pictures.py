"""The daemon's stack pictured while frames go on being stacked: a picture is computed out of the lock,
and a picture for people never needs the whole stack."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from astropy.io import fits

from livestack import events
from livestack.config import Config
from livestack.live.health import Health
from livestack.live.reports import StackView
from livestack.live.stacks import Stacks
from livestack.live.state import CheckpointStore
from livestack.live.writer import Outputs, Writer
from livestack.simulate import SimConfig, simulate
from livestack.stages.snapshot import preview_array
from livestack.stages.stack import KappaSigmaStack


def test_a_picture_of_the_warmup_leaves_the_lock_to_the_worker(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer's picture of a kappa-sigma warm-up (its costliest, ~0.3 s at 8.3 MP mono, ~1 s in
    colour) is computed after the lock is given back: the worker commits the next frames meanwhile, and the
    warm-up's end waits for the picture, which shows the stack as it was when it was taken."""
    paths = simulate(tmp_path / "frames", SimConfig(frames=5, interval=0.0, size=(320, 240), seed=3,
                                                    n_stars=150), sleep=lambda _s: None)
    config = Config(base=tmp_path).with_overrides({"stack.method": "kappa-sigma", "stack.warmup": 5,
                                                   "output.folder": "out"})
    stacks = Stacks(config, tmp_path / "state", tmp_path / "out")
    stacker = stacks.stacker
    for path in paths[:3]:
        with stacks.lock:
            assert stacker.process(path).accepted
    expected = stacker.result()
    assert expected is not None

    started, go_on = threading.Event(), threading.Event()
    taken = stacker.result_later

    def slowly(filter: str | None = None, side: int = 0,
               into: Callable[[tuple[int, ...]], np.ndarray] | None = None,
               ) -> Callable[[], np.ndarray] | None:
        later = taken(filter, side, into)
        assert later is not None

        def compute() -> np.ndarray:
            started.set()
            assert go_on.wait(30)
            return later()
        return compute

    monkeypatch.setattr(stacker, "result_later", slowly)
    views: list[StackView] = []
    writer = threading.Thread(target=lambda: views.append(stacks.view(image=True)))
    writer.start()
    try:
        assert started.wait(30)
        # The worker's commits while the picture is computed.
        assert stacks.lock.acquire(timeout=10), "the writer kept the lock while it computed the picture"
        try:
            for path in paths[3:]:
                assert stacker.process(path).accepted
        finally:
            stacks.lock.release()
        assert not stacker.settled
        # The warm-up's end waits for the picture of its frames (the worker takes computing first).
        assert not stacks.computing.acquire(blocking=False)
    finally:
        go_on.set()
        writer.join(30)
    with stacks.computing, stacks.lock:
        assert stacker.settle()
    assert len(views) == 1
    view = views[0]
    assert view.info.ncombine == 3
    assert view.image is not None
    np.testing.assert_array_equal(view.image, expected)
    assert stacker.count == 5 and stacker.settled


def test_previews_and_the_viewers_picture_never_make_the_whole_stack(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the stack's lock, the writer's preview, its signal-to-noise figure and the viewers' picture
    read a picture's worth of the running stack (block means, a sample), never the whole stack: at 26 MP
    making it took 30 ms, and up to 200 ms where fresh memory is slow to touch, while the worker waited
    to commit. They show what the whole stack would."""
    # Big enough for the signal-to-noise sample to be every other pixel (over 800,000 pixels).
    paths = simulate(tmp_path / "frames", SimConfig(frames=4, interval=0.0, size=(1280, 720), seed=4,
                                                    n_stars=300, drift=(1.5, -1.0)), sleep=lambda _s: None)
    config = Config(base=tmp_path).with_overrides({
        "stack.method": "kappa-sigma", "stack.warmup": 2, "output.folder": "out",
        "network.preview_size": 160, "web.display_size": 400,
        # Flattening fits a sky to the picture, which the whole stack's NaN edges shift: compared without.
        "output.flatten_background": False})
    stacks = Stacks(config, tmp_path / "state", tmp_path / "out")
    for path in paths:
        assert stacks.stacker.process(path).accepted
    assert stacks.stacker.settled
    whole = stacks.stacker.result()
    assert whole is not None and np.isnan(whole).any()  # the drift leaves edges some frames missed

    asked: list[tuple[int, bool]] = []
    taken = KappaSigmaStack.result_later

    def spy(self: KappaSigmaStack, step: int = 1, sample: bool = False,
            into: Callable[[tuple[int, ...]], np.ndarray] | None = None) -> Callable[[], np.ndarray]:
        asked.append((step, sample))
        return taken(self, step, sample, into)

    monkeypatch.setattr(KappaSigmaStack, "result_later", spy)
    emitted: list[events.Event] = []
    writer = Writer()  # not started: its jobs run below, on this thread
    outputs = Outputs(config, stacks, CheckpointStore(tmp_path / "state" / "checkpoints"), writer,
                      emitted.append, Health())
    outputs.stack_event()
    outputs.maybe_display()
    writer.close()
    writer.run()

    assert sorted(asked) == [(2, True), (3, False), (8, False)], f"the whole stack was made: {asked}"
    stack = next(e for e in emitted if e.topic == "stack")
    assert stack["snr"] == stacks.stacker.snr(whole)
    assert stack.preview is not None
    expected = preview_array(whole, max_side=160)  # the whole stack, area-averaged down
    assert stack.preview.shape[:2] == expected.shape
    # The same picture, but for edge blocks that some pixels of which no frame covered: the whole stack
    # makes them NaN (black), the block means the mean of what is covered.
    inner = np.s_[1:-1, 1:-1]
    assert np.abs(stack.preview[:, :, 0][inner].astype(int) - expected[inner].astype(int)).max() <= 1
    display = next(e for e in emitted if e.topic == "display")
    assert display.picture is not None
    picture = cv2.imdecode(np.frombuffer(display.picture, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    assert picture.shape == (225, 400)


def test_snapshots_take_the_stack_into_memory_kept_from_the_last(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot, and the viewers' picture of a stack no bigger than it, take the whole stack under the
    lock into an array the writer keeps from one to the next (a new 100 MB array costs up to ~200 ms of
    page faults on a virtual machine); each FITS file holds the stack as it was when its snapshot was
    taken."""
    paths = simulate(tmp_path / "frames", SimConfig(frames=6, interval=0.0, size=(320, 240), seed=6,
                                                    n_stars=150, drift=(1.5, -1.0)), sleep=lambda _s: None)
    config = Config(base=tmp_path).with_overrides({"stack.method": "kappa-sigma", "stack.warmup": 2,
                                                   "output.folder": "out", "web.display_size": 0})
    stacks = Stacks(config, tmp_path / "state", tmp_path / "out")
    given: list[np.ndarray] = []
    taken = KappaSigmaStack.result_later

    def spy(self: KappaSigmaStack, step: int = 1, sample: bool = False,
            into: Callable[[tuple[int, ...]], np.ndarray] | None = None) -> Callable[[], np.ndarray]:
        later = taken(self, step, sample, into)
        if into is not None:
            given.append(later())
        return later

    monkeypatch.setattr(KappaSigmaStack, "result_later", spy)
    writer = Writer()  # not started: its jobs run on this thread
    outputs = Outputs(config, stacks, CheckpointStore(tmp_path / "state" / "checkpoints"), writer,
                      lambda event: None, Health())
    written = []
    for count, path in enumerate(paths, start=1):
        assert stacks.stacker.process(path).accepted
        if count >= 4:  # past the warm-up
            expected = stacks.stacker.result()
            written.append(outputs.write_snapshot("request"))
            with fits.open(written[-1]["fits"]) as hdul:
                np.testing.assert_array_equal(hdul[0].data, expected)
    outputs.maybe_display()  # the viewers' picture, at the stack's own size
    writer.close()
    writer.run()
    assert len(given) == 4 and all(array is given[0] for array in given)
