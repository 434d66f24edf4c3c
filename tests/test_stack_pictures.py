"""The daemon's stack pictured while frames go on being stacked: a picture is computed out of the lock."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from livestack.config import Config
from livestack.live.reports import StackView
from livestack.live.stacks import Stacks
from livestack.simulate import SimConfig, simulate


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

    def slowly(filter: str | None = None) -> Callable[[], np.ndarray] | None:
        later = taken(filter)
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
