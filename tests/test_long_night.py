"""A long night: what the daemon keeps per frame stays small, and a frame's cost does not grow with the night.

The 5,000-frame soak (``benchmarks/soak.py``) measures the daemon's memory, files and threads from outside;
these tests pin down the pieces that grew in it: the journal's memory of its entries, the FRAMES table made
again from the whole journal at each snapshot, and the writer's queue holding a copy of the stack for each
checkpoint it had not written yet.
"""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from livestack.config import Config
from livestack.errors import StateError
from livestack.live import ledger
from livestack.live import writer as writer_module
from livestack.live.health import Health
from livestack.live.stacks import Stacks
from livestack.live.state import CheckpointStore, Journal, JournalEntry, RemovalRecord
from livestack.live.writer import Outputs, Writer
from livestack.simulate import SimConfig, simulate
from livestack.stages.provenance import FrameRow


def _entry(seq: int, session: int = 1, filter: str = "L", verdict: str = "accepted") -> JournalEntry:
    """An entry shaped like the daemon's (``reports.journal_entry``): quality, timings, the frame's facts."""
    rng = np.random.default_rng(seq)
    matrix = [1.0, -1e-4 * seq, 0.31 * seq, 1e-4 * seq, 1.0, -0.17 * seq]
    quality = {"stars": int(rng.integers(100, 400)), "fwhm": float(rng.uniform(2, 4)),
               "ellipticity": float(rng.uniform(0, 0.2)), "background": float(rng.uniform(900, 1100)),
               "noise": float(rng.uniform(30, 50)), "sharpness": None}
    facts: dict[str, Any] = {
        "path": f"/night/frames/light_{seq:05d}.fits", "date_obs": f"2026-11-30T21:{seq // 60 % 60:02d}:"
        f"{seq % 60:02d}+00:00", "exptime": 10.0, "filter": filter, "object": "M31", **quality,
        "matrix": matrix, "dx": float(rng.normal()), "dy": float(rng.normal()), "rotation": 0.01,
        "scale": 1.0, "inliers": 120, "residual": 0.11, "method": "fast", "reference": seq == 1,
        "weight": 1.0, "sky": 1006.5, "transparency": 0.98, "defects": 3, "norm_scale": [1.0],
        "norm_offset": [0.0], "defect_pixels": [int(v) for v in rng.integers(0, 76800, 3)]}
    return JournalEntry(
        seq=seq, path=facts["path"], size=158400, mtime_ns=1_796_000_000_000_000_000 + seq,
        hash=f"xxh3:{seq:032x}", verdict=verdict, reason=None if verdict == "accepted" else "too few stars",
        session=session, transform=matrix if verdict == "accepted" else None, quality=quality,
        timings={"read": 0.07, "calibrate": 0.04, "detect": 0.2, "align": 0.08, "warp": 0.01, "stack": 0.001},
        latency=0.2, time="2026-11-30T21:00:00.000+00:00", reference=seq == 1, facts=facts)


def test_the_journal_keeps_an_entry_in_a_fraction_of_its_parsed_size(tmp_path: Path) -> None:
    n = 1500
    entries = [_entry(seq) for seq in range(1, n + 1)]
    gc.collect()
    tracemalloc.start()
    try:
        with Journal(tmp_path / "journal.jsonl") as journal:
            before = tracemalloc.get_traced_memory()[0]
            for entry in entries:
                journal.append(entry)
            gc.collect()
            per_entry = (tracemalloc.get_traced_memory()[0] - before) / n
            # What it keeps answers as the entries did.
            assert journal.entries() == tuple(entries)
            assert journal.entries(n - 2) == tuple(entries[-2:])
            assert journal.seen(entries[99].hash) == entries[99]
            assert journal.next_seq == n + 1
    finally:
        tracemalloc.stop()
    line = len(entries[0].to_json())
    # A parsed entry of this shape takes about 7 kB; its line about 1.3 kB.
    assert per_entry < 1.6 * line, f"{per_entry:.0f} bytes per entry for lines of {line} bytes"


def test_a_reopened_journal_refuses_a_second_acceptance_of_the_same_content(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        journal.append(_entry(1))
        journal.append(_entry(2))
    with Journal(path) as journal:
        assert journal.seen(_entry(2).hash) == _entry(2)
        with pytest.raises(StateError, match="accepted as seq 1"):
            twin = _entry(3)
            journal.append(JournalEntry(**{**{f: getattr(twin, f) for f in (
                "seq", "path", "size", "mtime_ns", "verdict", "session", "transform", "quality", "timings",
                "latency", "time", "reference", "facts")}, "hash": _entry(1).hash}))


def test_the_frames_ledger_makes_each_row_once_and_agrees_with_the_table_made_from_scratch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = 0
    from_facts = FrameRow.from_facts

    def counting(*args: Any, **kwargs: Any) -> FrameRow:
        nonlocal made
        made += 1
        return from_facts(*args, **kwargs)

    monkeypatch.setattr(FrameRow, "from_facts", counting)
    with Journal(tmp_path / "journal.jsonl") as journal:
        book = ledger.FrameLedger(journal)
        seq = 0
        for block in range(40):
            for _ in range(5):
                seq += 1
                journal.append(_entry(seq, filter="LR"[seq % 2], verdict="rejected" if seq % 7 == 0
                                      else "accepted"))
            made = 0
            rows = book.rows(journal.removals(), 1)
            assert made == 5, f"snapshot {block}: {made} rows made for 5 new frames"
        journal.append_removal(RemovalRecord(id=1, at=seq, session=1, action="remove", targets=(3, 8),
                                             reason="clouds", time="2026-11-30T23:00:00.000+00:00"))
        removals = journal.removals()
        for filter in (None, "L", "R"):
            for removing in ((), (10,)):
                scratch = ledger.frame_rows(journal.entries(), removals, 1, removing=removing, filter=filter)
                assert book.rows(removals, 1, removing=removing, filter=filter) == scratch
        rows = book.rows(removals, 1)
        assert len(rows) == 200
        changed = {r.seq: (r.state, r.reason) for r in rows if r.state != "stacked"}
        assert changed[8] == ("removed", "clouds")
        assert book.rows(removals, 2) == ()


@pytest.fixture
def outputs(tmp_path: Path) -> tuple[Outputs, Writer, CheckpointStore]:
    """Outputs over a stack of three frames, and a writer whose thread has not started (its queue grows)."""
    frames = simulate(tmp_path / "frames", SimConfig(frames=3, size=(96, 72), seed=5, n_stars=60))
    config = Config(base=tmp_path).with_overrides({"stack.method": "mean", "output.folder": "out"})
    stacks = Stacks(config, tmp_path / "state", tmp_path / "out")
    for path in frames:
        assert stacks.stacker.process(path).accepted
    store = CheckpointStore(tmp_path / "state" / "checkpoints")
    writer = Writer()
    return Outputs(config, stacks, store, writer, lambda event: None, Health()), writer, store


def test_a_writer_behind_the_frames_holds_one_interval_snapshot_and_one_checkpoint(
        outputs: tuple[Outputs, Writer, CheckpointStore]) -> None:
    out, writer, store = outputs
    for seq in range(1, 41):
        out.seq = seq
        out.queue_snapshot("interval")
        out.checkpoint()
    queued = writer._jobs.qsize()
    writer.close()
    writer.run()  # the queue, then the close: on this thread
    assert queued == 2, f"{queued} jobs queued for 40 frames"
    latest = store.latest()
    assert latest is not None and latest.seq == 40  # the newest copy, not the first one queued
    assert (out.stacks.folder() / "stack.fits").is_file()
    # The checkpoint resumes the stack (its reference's FWHM, unmeasured on these small frames, included).
    again = Stacks(out.config, out.stacks.state_dir, out.stacks.output_dir)
    again.restore(store.load(latest), latest.meta)
    assert again.stacker.count == out.stacks.stacker.count == 3
    np.testing.assert_array_equal(again.stacker.result(), out.stacks.stacker.result())


def test_snapshots_asked_for_a_reason_are_never_merged(
        outputs: tuple[Outputs, Writer, CheckpointStore]) -> None:
    out, writer, _ = outputs
    out.queue_snapshot("interval")
    out.queue_snapshot("interval")
    out.queue_snapshot("shutdown", out.stacks.stacker)
    out.queue_snapshot("shutdown", out.stacks.stacker)
    assert writer._jobs.qsize() == 3
    writer.close()
    writer.run()


def test_at_a_steady_cadence_the_idle_checkpoint_waits_for_a_pause(
        outputs: tuple[Outputs, Writer, CheckpointStore], monkeypatch: pytest.MonkeyPatch) -> None:
    # Frames 1.5 s apart: the worker's idle tick half a second after each must not write the accumulators
    # every time (160 MB at 8.3 MP, running into the next frame); a pause of twice the cadence does.
    out, writer, _ = outputs
    clock = [1000.0]
    monkeypatch.setattr(writer_module.time, "monotonic", lambda: clock[0])
    taken: list[float] = []

    def checkpoint() -> None:
        taken.append(clock[0])
        out._since_checkpoint = 0

    monkeypatch.setattr(out, "checkpoint", checkpoint)
    out._last_checkpoint = clock[0]
    for frame in range(8):
        clock[0] = 1000.0 + 1.5 * frame
        out.stacked()
        for idle in (0.5, 1.0):
            clock[0] = 1000.0 + 1.5 * frame + idle
            out.maybe_checkpoint(idle=True)
    # The first frame, before any cadence is known, as before; then none while frames keep coming.
    assert taken == [1000.5]
    clock[0] = 1000.0 + 1.5 * 7 + 3.0  # twice the cadence after the last frame
    out.maybe_checkpoint(idle=True)
    assert taken == [1000.5, clock[0]]
    writer.close()


def test_a_single_frame_is_checkpointed_once_the_worker_is_idle(
        outputs: tuple[Outputs, Writer, CheckpointStore], monkeypatch: pytest.MonkeyPatch) -> None:
    out, writer, _ = outputs
    clock = [50.0]
    monkeypatch.setattr(writer_module.time, "monotonic", lambda: clock[0])
    taken: list[float] = []
    monkeypatch.setattr(out, "checkpoint", lambda: taken.append(clock[0]))
    out._last_checkpoint = clock[0]
    out.stacked()
    clock[0] += 0.2
    out.maybe_checkpoint(idle=True)
    assert taken == []
    clock[0] += writer_module.IDLE_CHECKPOINT_WAIT
    out.maybe_checkpoint(idle=True)
    assert taken == [clock[0]]
    writer.close()
