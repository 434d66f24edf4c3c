"""Taking frames back out of a stack: the mean's exact subtraction, re-stacking from the journal."""

from __future__ import annotations

import queue
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits

from livestack import events
from livestack.cli import main
from livestack.config import Config
from livestack.errors import LivestackError, StateError
from livestack.live import ledger
from livestack.live.removal import Removals
from livestack.live.state import (
    Journal,
    JournalEntry,
    RemovalRecord,
    content_hash,
    read_journal,
    removed_seqs,
)
from livestack.pipeline import Stacker, frame_facts
from livestack.simulate import SimConfig, simulate
from livestack.stages.provenance import read_frames
from livestack.stages.stack import MeanStack


def _frames(n: int, shape: tuple[int, ...], seed: int) -> list[tuple[np.ndarray, np.ndarray, float]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        image = rng.normal(1000.0, 30.0, shape).astype(np.float32)
        footprint = np.ones(shape[:2], dtype=bool)
        dy, dx = rng.integers(0, 6, size=2)
        footprint[:dy, :] = False  # shifted frames cover different pixels
        footprint[:, footprint.shape[1] - dx:] = False
        image[rng.random(shape[:2]) < 0.001] = np.nan  # a NaN inside the footprint is skipped, not stacked
        out.append((image, footprint, float(rng.uniform(0.5, 2.0))))
    return out


@pytest.mark.parametrize("shape", [(40, 50), (30, 20, 3)])
def test_subtracting_five_of_thirty_frames_equals_a_fresh_mean_of_the_other_25(
        shape: tuple[int, ...]) -> None:
    frames = _frames(30, shape, seed=len(shape))
    removed = {3, 7, 11, 20, 29}
    stack = MeanStack(shape)
    for image, footprint, weight in frames:
        stack.add(image, footprint, weight)
    for i in sorted(removed):
        image, footprint, weight = frames[i]
        stack.subtract(image, footprint, weight)
    fresh = MeanStack(shape)
    for i, (image, footprint, weight) in enumerate(frames):
        if i not in removed:
            fresh.add(image, footprint, weight)
    assert stack.count == fresh.count == 25
    np.testing.assert_array_equal(stack.coverage, fresh.coverage)
    np.testing.assert_allclose(stack.result(), fresh.result(), rtol=1e-6)
    # And against numpy, independently: a weighted nanmean of the 25 inside their footprints.
    kept = [frames[i] for i in range(30) if i not in removed]
    values = np.stack([np.where(f[:, :, None] if img.ndim == 3 else f, img, np.nan) for img, f, _ in kept])
    if values.ndim == 4:  # a pixel counts only when every channel is finite
        values[~np.isfinite(values).all(axis=3)] = np.nan
    weights = np.array([w for _, _, w in kept]).reshape(-1, *([1] * (values.ndim - 1)))
    valid = np.isfinite(values)
    total = (np.where(valid, values, 0.0).astype(np.float64) * weights).sum(0)
    with np.errstate(invalid="ignore"):
        expected = total / (valid * weights).sum(0)
    np.testing.assert_allclose(stack.result(), expected.astype(np.float32), rtol=1e-5)


def test_subtracting_every_frame_leaves_an_empty_stack_and_adding_back_restores_it() -> None:
    frames = _frames(6, (20, 30), seed=9)
    stack = MeanStack((20, 30))
    for image, footprint, weight in frames:
        stack.add(image, footprint, weight)
    original = stack.result()
    for image, footprint, weight in frames:
        stack.subtract(image, footprint, weight)
    assert stack.count == 0
    assert not stack.coverage.any()
    assert np.isnan(stack.result()).all()
    assert not stack.state()["weight"].any() and not stack.state()["mean"].any()
    with pytest.raises(ValueError, match="empty"):
        stack.subtract(*frames[0])
    for image, footprint, weight in frames:
        stack.add(image, footprint, weight)
    np.testing.assert_allclose(stack.result(), original, rtol=1e-6)


# -- restack: a stack again from the journal's transforms ---------------------------------------------------

REMOVED = (4, 9, 13, 22, 27)  # journal seqs (1-based), the reference (seq 1) kept


@pytest.fixture(scope="module")
def thirty(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """30 small frames drifting and turning, a satellite trail in two of them (kappa-sigma clips it)."""
    folder = tmp_path_factory.mktemp("thirty")
    sim = SimConfig(frames=30, interval=20, size=(256, 192), seed=17, n_stars=800, trails=(6, 18),
                    drift=(0.4, -0.3), rotation_per_frame=0.02)
    return simulate(folder, sim, sleep=lambda _s: None)


def _journal_night(state: Path, frames: list[Path], method: str) -> Config:
    """Stack the night as the daemon's worker does, journaling each frame with its facts."""
    # Defects found from consecutive frames depend on the frames around each one: a fresh stack of fewer
    # frames finds others. Off, so that the fresh stack is the exact answer.
    config = Config().with_overrides({"stack.method": method, "calibration.defects": "off"})
    stacker = Stacker(config, workdir=state)
    with Journal(state / "journal.jsonl") as journal:
        for seq, path in enumerate(frames, start=1):
            result = stacker.process(path)
            st = path.stat()
            journal.append(JournalEntry(
                seq=seq, path=str(path), size=st.st_size, mtime_ns=st.st_mtime_ns, hash=content_hash(path),
                verdict="accepted" if result.accepted else "rejected", reason=result.reason, session=1,
                transform=[float(v) for v in result.transform.matrix.ravel()] if result.transform else None,
                reference=result.reference, facts=frame_facts(result)))
    stacker.discard()
    return config


def _fresh(config: Config, frames: list[Path], workdir: Path) -> np.ndarray:
    """A stack of the given frames from scratch: aligned again, onto the same reference frame."""
    workdir.mkdir(exist_ok=True)
    stacker = Stacker(config.with_overrides({"align.reference": str(frames[0])}), workdir=workdir)
    results = [stacker.process(p) for p in frames]
    assert all(r.accepted for r in results)
    image = stacker.result()
    assert image is not None
    stacker.discard()
    return image


@pytest.mark.parametrize("method", ["median", "kappa-sigma", "mean"])
def test_restack_without_five_frames_equals_a_fresh_stack_of_the_other_25(
        thirty: list[Path], tmp_path: Path, method: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    config = _journal_night(state, thirty, method)
    out = tmp_path / "restack.fits"
    excluded = [str(s) for s in REMOVED[:3]] + [thirty[s - 1].name for s in REMOVED[3:]]
    status = main(["restack", str(state), "-o", str(out), "--method", method, "--exclude", *excluded])
    assert status == 0
    kept = [p for i, p in enumerate(thirty, start=1) if i not in REMOVED]
    expected = _fresh(config, kept, tmp_path / "fresh")
    with fits.open(out) as hdul:
        restacked = hdul[0].data
        rows = read_frames(hdul["FRAMES"])
        assert hdul[0].header["NCOMBINE"] == 25
    if method == "mean":
        np.testing.assert_allclose(restacked, expected, rtol=1e-5)
    else:  # bit for bit, NaN where nothing covered included
        assert restacked.astype("<f4").tobytes() == expected.astype("<f4").tobytes()
    assert len(rows) == 30
    assert {r.seq for r in rows if r.state == "removed"} == set(REMOVED)
    assert all(r.reason == "excluded from this restack" for r in rows if r.state == "removed")


def test_restack_honours_the_journals_removals_and_refuses_what_it_cannot_do(
        thirty: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    state.mkdir()
    config = _journal_night(state, thirty[:8], "mean")
    with Journal(state / "journal.jsonl") as journal:
        journal.append_removal(RemovalRecord(id=1, at=8, session=1, action="remove", targets=(3, 5),
                                             reason="satellite"))
        journal.append_removal(RemovalRecord(id=2, at=8, session=1, action="reinclude", targets=(5,)))
    out = tmp_path / "out"
    assert main(["restack", str(state), "-o", str(out), "--method", "mean"]) == 0
    kept = [p for i, p in enumerate(thirty[:8], start=1) if i != 3]
    with fits.open(out / "stack.fits") as hdul:
        np.testing.assert_allclose(hdul[0].data, _fresh(config, kept, tmp_path / "fresh"), rtol=1e-5)
        rows = {r.seq: r for r in read_frames(hdul["FRAMES"])}
    assert rows[3].state == "removed" and rows[3].reason == "satellite" and rows[5].state == "stacked"
    capsys.readouterr()
    assert main(["restack", str(state), "-o", str(out), "--exclude", "99"]) == 2
    assert "which session 1 does not have" in capsys.readouterr().err
    assert main(["restack", str(tmp_path), "-o", str(out)]) == 2
    assert "holds no journal.jsonl" in capsys.readouterr().err


# -- the journal's removal records ------------------------------------------------------------------------

def _frame_entry(seq: int, session: int = 1, verdict: str = "accepted") -> JournalEntry:
    return JournalEntry(seq=seq, path=f"/night/f{seq}.fits", size=10, mtime_ns=1, hash=f"h{seq}",
                        verdict=verdict, session=session, transform=[1, 0, seq, 0, 1, 0],
                        facts={"date_obs": f"2026-11-30T01:{seq:02d}:00+00:00", "exptime": 30.0,
                               "weight": 0.5})


def test_removal_records_survive_a_reopen_and_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        for seq in (1, 2, 3):
            journal.append(_frame_entry(seq))
        journal.append_removal(RemovalRecord(id=1, at=3, session=1, action="remove", targets=(2, 3),
                                             reason="clouds"))
        journal.append(_frame_entry(4))
        journal.append_removal(RemovalRecord(id=2, at=4, session=1, action="reinclude", targets=(3,)))
    with path.open("ab") as fh:
        fh.write(b'{"v":1,"kind":"removal","id":3,"at":4,"ses')  # a crash in the middle of the line
    with Journal(path) as journal:
        assert [e.seq for e in journal.entries()] == [1, 2, 3, 4]
        assert [r.id for r in journal.removals()] == [1, 2]
        assert journal.next_seq == 5 and journal.next_removal == 3
        assert removed_seqs(journal.removals(), 1) == {2}
        assert journal.entries()[0].facts["weight"] == 0.5
        # Out of order, or naming frames not journaled yet: refused before anything is written.
        with pytest.raises(StateError, match="removal 5, not 3"):
            journal.append_removal(RemovalRecord(id=5, at=4, session=1, action="remove", targets=(1,)))
        with pytest.raises(StateError, match="after frame 2"):
            journal.append_removal(RemovalRecord(id=3, at=2, session=1, action="remove", targets=(1,)))
    entries, removals = read_journal(path)
    assert len(entries) == 4 and [r.action for r in removals] == ["remove", "reinclude"]
    with pytest.raises(ValueError, match="at least one frame"):
        RemovalRecord(id=1, at=1, session=1, action="remove", targets=())
    with pytest.raises(ValueError, match="'remove' or 'reinclude'"):
        RemovalRecord(id=1, at=1, session=1, action="drop", targets=(1,))


def test_select_names_frames_by_number_name_glob_and_time() -> None:
    entries = [_frame_entry(seq) for seq in range(1, 8)]
    assert [e.seq for e in ledger.select(entries, seqs=[5, 2])] == [2, 5]
    assert [e.seq for e in ledger.select(entries, names=["f3.fits", "f[67].fits"])] == [3, 6, 7]
    assert [e.seq for e in ledger.select(entries, names=["/night/f1.fits"])] == [1]
    start, end = ledger.parse_time("2026-11-30T01:02:00"), ledger.parse_time("2026-11-30T01:04:00+00:00")
    assert [e.seq for e in ledger.select(entries, start=start, end=end)] == [2, 3, 4]
    with pytest.raises(LivestackError, match="number 9"):
        ledger.select(entries, seqs=[9])
    with pytest.raises(LivestackError, match=r"called 'nope\.fits'"):
        ledger.select(entries, names=["nope.fits"])
    with pytest.raises(LivestackError, match="began between"):
        ledger.select(entries, start=ledger.parse_time("2027-01-01T00:00:00"))
    assert ledger.parse_exclusions(["3", "5-7,x.fits", "9-8"]) == ({3, 5, 6, 7, 8, 9}, ["x.fits"])


# -- the daemon's removals: exact subtraction, background re-integration, reinclude --------------------------

class _Owner:
    """The daemon's stack as ``Removals`` sees it: a stacker, its session, a lock, and a swap."""

    def __init__(self, stacker: Stacker) -> None:
        self.lock = threading.Lock()
        self.stacker = stacker
        self.session = 1
        self.changes = 0

    def swap(self, stacker: Stacker, session: int) -> Stacker:
        with self.lock:
            old, self.stacker, self.session = self.stacker, stacker, session
        return old


class _Live:
    """A worker's side of the daemon, on the test's thread: stacks frames, journals them, runs commands."""

    def __init__(self, root: Path, method: str) -> None:
        # Defects found from consecutive frames depend on the frames around each one (see _journal_night).
        self.config = Config().with_overrides({"stack.method": method, "calibration.defects": "off"})
        (root / "work").mkdir(parents=True)
        self.journal = Journal(root / "journal.jsonl")
        self.owner = _Owner(Stacker(self.config, workdir=root / "work"))
        self.events: list[events.Event] = []
        self.posted: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.removals = Removals(self.config, self.journal, self.owner, self.events.append,
                                 lambda name, args: self.posted.put((name, args)), self._changed)

    def _changed(self, old: Stacker | None) -> None:
        self.owner.changes += 1
        if old is not None:
            old.discard()

    def stack(self, path: Path) -> None:
        seq = self.journal.next_seq
        with self.owner.lock:
            result = self.owner.stacker.process(path)
        assert result.accepted, result.reason
        st = path.stat()
        self.journal.append(JournalEntry(
            seq=seq, path=str(path), size=st.st_size, mtime_ns=st.st_mtime_ns, hash=content_hash(path),
            verdict="accepted", session=1, transform=[float(v) for v in result.transform.matrix.ravel()],
            reference=result.reference, facts=frame_facts(result)))

    def switch(self) -> None:
        """Wait for the re-integration to ask for the switch, and do it (as the worker would)."""
        name, args = self.posted.get(timeout=120)
        self.removals.handle(name, args)

    def image(self) -> np.ndarray:
        image = self.owner.stacker.result()
        assert image is not None
        return image

    def close(self) -> None:
        self.removals.close()
        self.owner.stacker.discard()
        self.journal.close()


@pytest.mark.parametrize("method", ["mean", "kappa-sigma", "median"])
def test_removing_five_of_thirty_live_equals_a_fresh_stack_of_25_and_reinclude_restores_it(
        thirty: list[Path], tmp_path: Path, method: str) -> None:
    live = _Live(tmp_path / "state", method)
    try:
        for path in thirty[:27]:
            live.stack(path)
        original_27 = live.image()
        reply = live.removals.handle("remove", {"seq": list(REMOVED[:3]), "name": [thirty[21].name],
                                                "reason": "satellite"})
        assert reply["seqs"] == [4, 9, 13, 22]
        if method == "mean":
            assert reply["state"] == "done" and live.owner.stacker.count == 23
        else:
            assert reply["state"] == "re-integrating"
            assert live.removals.busy and {r.seq for r in live.removals.rows(1) if r.state == "removing"} == {
                4, 9, 13, 22}
        # Frames keep coming while the old stack is served and the new one is built.
        for path in thirty[27:]:
            live.stack(path)
        if method != "mean":
            live.switch()
        assert not live.removals.busy
        # The fifth by its file name, after the first removal finished.
        live.removals.handle("remove", {"name": thirty[26].name})
        if method != "mean":
            live.switch()
        kept = [p for i, p in enumerate(thirty, start=1) if i not in REMOVED]
        expected = _fresh(live.config, kept, tmp_path / "fresh")
        if method == "mean":
            np.testing.assert_allclose(live.image(), expected, rtol=1e-5)
        else:
            assert live.image().astype("<f4").tobytes() == expected.astype("<f4").tobytes()
        assert live.owner.stacker.count == 25
        assert live.owner.stacker.exptime == pytest.approx(25 * 10.0)
        done = [e for e in live.events if e.topic == "removal" and e["state"] == "done"]
        assert [e["seqs"] for e in done] == [[4, 9, 13, 22], [27]]
        assert done[0]["how"] == ("subtracted" if method == "mean" else "re-integrated")
        rows = live.removals.rows(1)
        assert {r.seq for r in rows if r.state == "removed"} == set(REMOVED)
        assert next(r for r in rows if r.seq == 4).reason == "satellite"
        # Put them all back: the original stack of 30.
        live.removals.handle("reinclude", {"seq": list(REMOVED)})
        if method != "mean":
            live.switch()
        original = _fresh(live.config, thirty, tmp_path / "fresh-30")
        if method == "mean":
            np.testing.assert_allclose(live.image(), original, rtol=1e-5)
        else:
            assert live.image().astype("<f4").tobytes() == original.astype("<f4").tobytes()
        assert live.owner.stacker.count == 30 and original_27.shape == original.shape
        assert live.owner.stacker.removals == 3
    finally:
        live.close()


def test_a_changed_file_cannot_be_subtracted_silently(thirty: list[Path], tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    copies = [Path(shutil.copy2(p, frames / p.name)) for p in thirty[:6]]
    live = _Live(tmp_path / "state", "mean")
    try:
        for path in copies:
            live.stack(path)
        before = live.image()
        with fits.open(copies[3], mode="update") as hdul:
            hdul[0].header["OBSERVER"] = "someone"  # the same pixels, but not the same file
        refused = r"sim_0004\.fits cannot be taken out of the mean exactly: the file changed since it was"
        with pytest.raises(LivestackError, match=refused):
            live.removals.handle("remove", {"seq": 4})
        copies[4].unlink()
        with pytest.raises(LivestackError, match="the file is gone; nothing was removed"):
            live.removals.handle("remove", {"seq": 5})
        assert live.journal.removals() == ()
        np.testing.assert_array_equal(live.image(), before)
        with pytest.raises(LivestackError, match="no stacked frame has the number 99"):
            live.removals.handle("remove", {"seq": 99})
        with pytest.raises(LivestackError, match="no removed frame"):
            live.removals.handle("reinclude", {"seq": 2})
        reply = live.removals.handle("undo_last", {})
        assert reply["seqs"] == [6] and reply["state"] == "done" and live.owner.stacker.count == 5
    finally:
        live.close()
