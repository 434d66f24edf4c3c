"""Crashes: ``kill -9`` the daemon at random moments, restart it, and the stack and journal are exact.

Two kinds of test:

- Real processes, real SIGKILL: ``livestack run`` is started as a subprocess on a simulated night whose frames
  arrive round by round, killed after a seeded random delay (during start-up and recovery, or while frames
  are read, stacked, journaled, checkpointed and snapshotted), restarted, and finally stopped with SIGTERM.
  The final ``stack.fits`` must be bit-for-bit the stack of an uninterrupted in-process ``Stacker`` over the
  same files, and the journal must hold every frame once. The harness is ``benchmarks/crash_soak.py``,
  which also runs longer soaks from the command line.
- In-process, deterministic: the state folder as a crash leaves it at every step of the exactly-once
  protocol (a frame stacked but not journaled, journaled but not checkpointed, checkpointed; plus a torn
  journal line, a half-written and a damaged checkpoint) is recovered by ``Daemon._recover``, and the rest of
  the night stacked on top must again give the uninterrupted stack exactly.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from livestack.config import Config, load_config
from livestack.live.daemon import Daemon
from livestack.live.state import CheckpointStore, Journal, JournalEntry, content_hash
from livestack.pipeline import FrameResult, Prepared, Stacker
from livestack.simulate import SimConfig, simulate

REPO = Path(__file__).resolve().parents[1]


def _load_harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("crash_soak", REPO / "benchmarks" / "crash_soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


soak_harness = _load_harness()


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """48 frames, 800x600: trails in sim_0003 and sim_0017 (clipped), sim_0025 cloudy (rejected)."""
    return list(soak_harness.render_night(tmp_path_factory.mktemp("night"), 48))


# -- real processes, real SIGKILL ---------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "kills", "seed"), [
    ("kappa-sigma", 12, 1),
    ("median", 10, 2),   # its cube lives on disk: extra bytes of a frame never checkpointed are truncated
    ("mean", 6, 3),
])
def test_kill_9_at_random_points_then_the_final_stack_equals_the_uninterrupted_one(
        night: list[Path], tmp_path: Path, method: str, kills: int, seed: int) -> None:
    result = soak_harness.soak(tmp_path, night, kills=kills, method=method, seed=seed)
    print(result.table())
    print(result.summary())
    assert len(result.kills) == kills
    assert result.final_exit == 0
    assert not result.journal_problems, result.summary()
    assert result.accepted == len(night) - 1 and result.rejected == 1  # the cloudy frame
    assert result.ncombine == result.accepted
    assert result.same_nan_mask, result.summary()
    assert result.bit_exact, result.summary()
    assert result.stray_cubes == 0, result.summary()
    # The kills must hit the daemon at work, not only in Python's start-up.
    assert any(k.where.startswith("mid-stream") for k in result.kills), result.table()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_soak_30_kills_over_90_frames(tmp_path: Path) -> None:
    frames = list(soak_harness.render_night(tmp_path / "staging", 90, seed=11))
    root = tmp_path / "soak"
    root.mkdir()
    result = soak_harness.soak(root, frames, kills=30, method="kappa-sigma", seed=5)
    print(result.table())
    print(result.summary())
    assert result.final_exit == 0
    assert not result.journal_problems, result.summary()
    assert result.bit_exact, result.summary()
    assert sum(k.where.startswith("mid-stream") for k in result.kills) >= 3, result.table()
    assert sum(n > 0 for n in result.replayed) >= 1, result.summary()


# -- in-process: every step of the protocol ----------------------------------------------------------------

CHECKPOINT_EVERY = 3


@pytest.fixture(scope="module")
def small_night(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """10 small frames: trails in 2 (during the kappa-sigma warm-up) and 6, frame 4 cloudy."""
    folder = tmp_path_factory.mktemp("small")
    sim = SimConfig(frames=10, interval=0, size=(400, 300), seed=3, n_stars=300, trails=(2, 6),
                    cloud_frames=(4,))
    return simulate(folder, sim, sleep=lambda _s: None)


def _config(root: Path, method: str, watched: Path) -> Config:
    root.mkdir(parents=True, exist_ok=True)
    path = soak_harness.write_config(root, method, checkpoint_every=CHECKPOINT_EVERY)
    text = path.read_text().replace('folder = "watched"', f'folder = "{watched}"')
    path.write_text(text)
    return load_config(path)


def _entry(seq: int, path: Path, result: FrameResult, session: int = 1) -> JournalEntry:
    st = path.stat()
    return JournalEntry(
        seq=seq, path=str(path), size=st.st_size, mtime_ns=st.st_mtime_ns, hash=content_hash(path),
        verdict="accepted" if result.accepted else "rejected", reason=result.reason, session=session,
        transform=[float(v) for v in result.transform.matrix.ravel()] if result.transform else None,
        reference=result.reference)


def _crash_states(config: Config, frames: list[Path], state: Path, keep: Path) -> list[tuple[str, Path, int]]:
    """Run the night as the daemon's worker does, copying the state folder at every point a kill can hit.

    Returns (label, copy, frames journaled) for: a frame stacked but not journaled (the median cube already
    holds its bytes), journaled but not checkpointed, and just checkpointed.
    """
    copies: list[tuple[str, Path, int]] = []

    def copy(label: str, journaled: int) -> None:
        target = keep / f"{len(copies):03d}-{label}"
        shutil.copytree(state, target)
        copies.append((label, target, journaled))

    stacker = Stacker(config, workdir=state / "work" / "session-1")
    if config.stack.method == "median":
        (state / "work" / "session-1").mkdir(parents=True)
    store = CheckpointStore(state / "checkpoints")
    since = 0
    with Journal(state / "journal.jsonl") as journal:
        for seq, path in enumerate(frames, start=1):
            prepared = stacker.prepare(path)
            assert isinstance(prepared, Prepared)
            result = stacker.commit(prepared)
            copy(f"frame-{seq}-stacked-not-journaled", seq - 1)
            journal.append(_entry(seq, path, result))
            copy(f"frame-{seq}-journaled", seq)
            since += result.accepted
            if since >= CHECKPOINT_EVERY:
                arrays, meta = stacker.checkpoint()
                store.save(seq, 1, arrays, {**meta, "session": 1})
                since = 0
                copy(f"frame-{seq}-checkpointed", seq)
    return copies


def _recover_and_finish(config: Config, frames: list[Path], journaled: int) -> tuple[Daemon, np.ndarray]:
    """Recover as ``livestack run`` starts, then stack the frames never journaled, as its worker would."""
    daemon = Daemon(config)
    daemon._recover()
    try:
        assert daemon._outputs.seq == journaled
        for path in frames[journaled:]:
            daemon.stacker.process(path)
        image = daemon.stacker.result()
        assert image is not None
        return daemon, image
    finally:
        assert daemon._journal is not None
        daemon._journal.close()


def _damage(state: Path) -> None:
    """What else a crash can leave: a torn journal line, a half-written checkpoint, a damaged newest one."""
    with (state / "journal.jsonl").open("ab") as fh:
        fh.write(b'{"v":1,"seq":999,"path":"/half')
    checkpoints = state / "checkpoints"
    checkpoints.mkdir(exist_ok=True)
    (checkpoints / ".ckpt-000000000999.npz.abcd.tmp").write_bytes(b"PK\x03\x04 half")
    arrays = sorted(checkpoints.glob("ckpt-*.npz"))
    if len(arrays) == 2:  # the newest is damaged: recovery must fall back to the older one
        with arrays[-1].open("r+b") as fh:
            fh.seek(100)
            fh.write(b"\xff" * 16)


@pytest.mark.parametrize("method", ["kappa-sigma", "median", "mean"])
def test_recovery_from_every_crash_point_gives_the_uninterrupted_stack(
        small_night: list[Path], tmp_path: Path, method: str) -> None:
    frames = small_night
    config = _config(tmp_path / "live", method, frames[0].parent)
    expected_stacker = Stacker(config, workdir=tmp_path / "expected-work")
    (tmp_path / "expected-work").mkdir()
    verdicts = [expected_stacker.process(p).verdict for p in frames]
    assert verdicts.count("rejected") == 1  # the cloudy frame
    expected = expected_stacker.result()
    assert expected is not None

    copies = _crash_states(config, frames, tmp_path / "live" / "state", tmp_path / "copies")
    assert len(copies) >= 2 * len(frames) + 2
    live = tmp_path / "live" / "state"
    for label, copy, journaled in copies:
        for damaged in (False, True):
            shutil.rmtree(live)
            shutil.copytree(copy, live)
            if damaged:
                _damage(live)
            daemon, image = _recover_and_finish(config, frames, journaled)
            where = f"{label}{' + damage' if damaged else ''}"
            assert daemon.stacker.count == len(frames) - 1, where
            assert np.array_equal(image, expected, equal_nan=True), where
            if method == "median":  # one cube: none left behind by a crash before the first checkpoint
                assert len(list((live / "work" / "session-1").glob("median-*.cube"))) == 1, where
            # Killed again right after recovering: the recovery's own checkpoint gives the same stack.
            again, image_again = _recover_and_finish(config, frames, journaled)
            assert np.array_equal(image_again, expected, equal_nan=True), f"{where}, recovered twice"
            assert again.stats.accepted + again.stats.rejected == journaled, where


def _journal_two_sessions(config: Config, frames: list[Path], state: Path,
                          second: Callable[[Stacker], list[FrameResult]]) -> None:
    """Session 1 stacked and checkpointed; then a reset whose checkpoint a kill prevented, then ``second``."""
    stacker = Stacker(config, workdir=state / "work" / "session-1")
    store = CheckpointStore(state / "checkpoints")
    with Journal(state / "journal.jsonl") as journal:
        seq = 0
        for path in frames[:3]:
            seq += 1
            journal.append(_entry(seq, path, stacker.process(path)))
        arrays, meta = stacker.checkpoint()
        store.save(seq, 1, arrays, {**meta, "session": 1})
        for path, result in zip(frames[3:], second(Stacker(config)), strict=False):
            seq += 1
            journal.append(_entry(seq, path, result, session=2))


def test_recovery_after_a_reset_continues_the_new_session_even_with_nothing_accepted_yet(
        small_night: list[Path], tmp_path: Path) -> None:
    # After a reset, only rejected frames were journaled in session 2 and the kill came before the writer
    # saved session 2's empty checkpoint. The restarted daemon must stack into session 2 (empty), not resume
    # session 1: else its next journal line (session 1 after session 2) is refused and every frame is lost.
    frames = small_night
    config = _config(tmp_path, "kappa-sigma", frames[0].parent)
    cloudy = frames[4]
    state = tmp_path / "state"

    def rejected_only(s: Stacker) -> list[FrameResult]:
        result = s.process(cloudy)
        assert not result.accepted
        return [result]

    _journal_two_sessions(config, [*frames[:3], cloudy], state, rejected_only)
    daemon = Daemon(config)
    daemon._recover()
    try:
        assert daemon.stacks.session == 2
        assert daemon.stacker.count == 0
        assert daemon._journal is not None
        result = daemon.stacker.process(frames[5])
        assert result.accepted
        daemon._journal.append(_entry(daemon._outputs.seq + 1, frames[5], result,
                                      session=daemon.stacks.session))
    finally:
        assert daemon._journal is not None
        daemon._journal.close()
