"""Tests of livestack.live.state: journal, checkpoints, recovery, and exactly-once stacking across SIGKILL."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash

from livestack.errors import StateError
from livestack.live.state import (
    CHECKPOINTS_KEPT,
    CheckpointStore,
    Journal,
    JournalEntry,
    content_hash,
    is_legacy_hash,
    recover,
)

REPO = Path(__file__).resolve().parents[1]


def _entry(
    seq: int, content: str, verdict: str = "accepted", session: int = 0, **fields: Any
) -> JournalEntry:
    values: dict[str, Any] = {
        "seq": seq,
        "path": f"/night/frame-{seq:04d}.fits",
        "size": 1000 + seq,
        "mtime_ns": 1_700_000_000_000_000_000 + seq,
        "hash": content,
        "verdict": verdict,
        "reason": None if verdict == "accepted" else "too few stars (3 < 8)",
        "session": session,
        "transform": [1.0, 0.0, 0.5 * seq, 0.0, 1.0, -0.25 * seq],
        "quality": {"stars": 120, "fwhm": 2.4, "ellipticity": None},
        "timings": {"read": 0.05, "align": 0.12},
        "latency": 0.8,
        "time": "2024-05-01T22:13:05.123+00:00",
    }
    values.update(fields)
    return JournalEntry(**values)


# --- content_hash -----------------------------------------------------------------------------------


def test_content_hash_identifies_content_not_name_or_time(tmp_path: Path) -> None:
    payload = np.random.default_rng(1).integers(0, 256, size=3 * (1 << 20) + 12345, dtype=np.uint8).tobytes()
    first = tmp_path / "light_0001.fits"
    first.write_bytes(payload)
    renamed = tmp_path / "sub" / "renamed.fit"
    renamed.parent.mkdir()
    shutil.copyfile(first, renamed)
    os.utime(renamed, ns=(1, 1))  # touch: a new mtime, the same content

    assert content_hash(first) == content_hash(renamed)
    assert content_hash(first) == "xxh3:" + xxhash.xxh3_128(payload).hexdigest()  # all bytes, >1 block
    # A digest from an earlier version's journal (BLAKE2b-128) is reproduced to compare with it.
    legacy = hashlib.blake2b(payload, digest_size=16).hexdigest()
    assert is_legacy_hash(legacy) and not is_legacy_hash(content_hash(first))
    assert content_hash(renamed, like=legacy) == legacy
    assert content_hash(renamed, like=content_hash(first)) == content_hash(first)
    changed = bytearray(payload)
    changed[len(changed) // 2] ^= 1  # another frame differs somewhere inside (noise, DATE-OBS)
    other = tmp_path / "light_0002.fits"
    other.write_bytes(bytes(changed))
    assert content_hash(other) != content_hash(first)


def test_content_hash_of_50_mb_is_fast(tmp_path: Path) -> None:
    path = tmp_path / "big.fits"
    path.write_bytes(np.random.default_rng(2).integers(0, 256, size=50_000_000, dtype=np.uint8).tobytes())
    start = time.perf_counter()
    content_hash(path)
    elapsed = time.perf_counter() - start
    # About 0.06 s measured; the bound leaves room for a busy shared machine.
    assert elapsed < 0.5


# --- JournalEntry -----------------------------------------------------------------------------------


def test_entry_round_trips_through_json() -> None:
    entry = _entry(7, "ab" * 16, reference=True)
    line = entry.to_json()
    assert "\n" not in line
    back = JournalEntry.from_json(line + "\n")
    assert back == entry
    assert back.transform == (1.0, 0.0, 3.5, 0.0, 1.0, -1.75)  # stored as an immutable tuple
    assert back.quality == {"stars": 120, "fwhm": 2.4, "ellipticity": None}
    assert back.reference is True


def test_entry_defaults_to_now_in_utc() -> None:
    entry = JournalEntry(seq=1, path="a.fits", size=1, mtime_ns=0, hash="00", verdict="rejected",
                         reason="unreadable")
    assert entry.time.endswith("+00:00")
    assert JournalEntry.from_json(entry.to_json()) == entry


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("verdict", "maybe"),
        ("seq", 0),
        ("seq", True),
        ("transform", [1.0, 0.0, 0.0, 0.0, 1.0]),
        ("transform", [1.0, 0.0, float("nan"), 0.0, 1.0, 0.0]),
        ("quality", {"fwhm": float("nan")}),
        ("timings", {"read": None}),
        ("time", "2024-05-01T22:13:05"),  # no offset: not unambiguously UTC
        ("time", "2024-05-01T22:13:05+02:00"),
        ("hash", ""),
    ],
)
def test_entry_refuses_malformed_values(field: str, value: Any) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(_entry(1, "aa"), **{field: value})


@pytest.mark.parametrize(
    "line",
    ["not json", "[1, 2]", '{"v": 99, "seq": 1}', '{"v": 1, "seq": 1}'],
)
def test_from_json_refuses_what_is_not_an_entry(line: str) -> None:
    with pytest.raises(StateError):
        JournalEntry.from_json(line)


# --- Journal ----------------------------------------------------------------------------------------


def test_journal_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "state" / "journal.jsonl"
    with Journal(path) as journal:
        assert journal.next_seq == 1
        assert journal.entries() == ()
        for seq in (1, 2, 3):
            journal.append(_entry(seq, f"{seq:02x}" * 16, verdict="rejected" if seq == 2 else "accepted"))
        assert journal.next_seq == 4
    assert journal.closed
    with Journal(path) as journal:
        assert [e.seq for e in journal.entries()] == [1, 2, 3]
        assert journal.next_seq == 4
        assert journal.seen("02" * 16) == _entry(2, "02" * 16, verdict="rejected")
        assert journal.seen("ff" * 16) is None
    assert len(path.read_text().splitlines()) == 3


@pytest.mark.parametrize("tail", [b'{"v":1,"seq":3,"path":"/night/fr', b"\x00" * 57])
def test_torn_last_line_is_ignored_and_cut_away(tmp_path: Path, tail: bytes) -> None:
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        journal.append(_entry(1, "aa"))
        journal.append(_entry(2, "bb"))
    with open(path, "ab") as fh:  # what a crash in the middle of a write leaves (or zeros, after power loss)
        fh.write(tail)

    with Journal(path) as journal:
        assert [e.seq for e in journal.entries()] == [1, 2]
        assert path.read_bytes().endswith(b"}\n")  # truncated on open
        journal.append(_entry(3, "cc"))
    with Journal(path) as journal:
        assert [e.seq for e in journal.entries()] == [1, 2, 3]
    assert all(json.loads(line)["seq"] for line in path.read_text().splitlines())


def test_damaged_line_in_the_middle_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        for seq in (1, 2, 3):
            journal.append(_entry(seq, f"h{seq}"))
    lines = path.read_bytes().split(b"\n")
    lines[1] = b"garbage"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(StateError, match=r"journal\.jsonl is damaged at line 2"):
        Journal(path)


def test_seen_dedupes_by_content_across_names_and_restarts(tmp_path: Path) -> None:
    frame = tmp_path / "frames" / "light_001.fits"
    frame.parent.mkdir()
    frame.write_bytes(b"SIMPLE  =                    T" + bytes(range(256)) * 40)
    copy = tmp_path / "frames" / "renamed" / "Light_001_final.fits"
    copy.parent.mkdir()
    shutil.copyfile(frame, copy)

    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        journal.append(_entry(1, content_hash(frame), path=str(frame)))
    with Journal(path) as journal:
        seen = journal.seen(content_hash(copy))
        assert seen is not None and seen.path == str(frame) and seen.verdict == "accepted"
        # The journal itself refuses to accept the same content twice.
        with pytest.raises(StateError, match="was accepted as seq 1"):
            journal.append(_entry(2, content_hash(copy), path=str(copy)))
        assert journal.next_seq == 2  # nothing was written


def test_seen_prefers_the_acceptance_over_rejections(tmp_path: Path) -> None:
    with Journal(tmp_path / "journal.jsonl") as journal:
        journal.append(_entry(1, "aa", verdict="rejected"))
        assert journal.seen("aa") == _entry(1, "aa", verdict="rejected")
        journal.append(_entry(2, "aa", session=1))  # retried after a reset, accepted this time
        journal.append(_entry(3, "aa", verdict="rejected", session=1))
        seen = journal.seen("aa")
        assert seen is not None and seen.seq == 2


def test_append_refuses_entries_out_of_order(tmp_path: Path) -> None:
    with Journal(tmp_path / "journal.jsonl") as journal:
        journal.append(_entry(5, "aa", session=2))
        with pytest.raises(StateError, match="seq 5"):
            journal.append(_entry(5, "bb", session=2))
        with pytest.raises(StateError, match="session 1"):
            journal.append(_entry(6, "bb", session=1))
        journal.append(_entry(9, "bb", session=2))  # gaps are fine, going back is not
        assert journal.next_seq == 10


def test_journal_is_locked_while_open_and_refuses_appends_when_closed(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    with pytest.raises(StateError, match="in use by another"):
        Journal(path)
    journal.close()
    journal.close()
    with pytest.raises(StateError, match="closed"):
        journal.append(_entry(1, "aa"))
    with Journal(path) as again:  # the lock went with the close
        assert len(again) == 0


# --- CheckpointStore --------------------------------------------------------------------------------


def _arrays(value: float) -> dict[str, np.ndarray]:
    return {
        "sum": np.full((4, 5), value, dtype=np.float64),
        "weight": np.arange(20, dtype=np.float32).reshape(4, 5) + value,
        "coverage": np.full((4, 5), int(value), dtype=np.int32),
        # Names that np.savez would take for its own keyword arguments.
        "file": np.array([value]),
        "allow_pickle": np.array([True, False]),
    }


def test_save_latest_load_round_trip(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    assert store.latest() is None
    manifest = store.save(12, 3, _arrays(2.0), {"method": "mean", "shape": [4, 5], "reference": "a.fits"})
    assert manifest.name == "ckpt-000000000012.json"

    checkpoint = store.latest()
    assert checkpoint is not None
    assert (checkpoint.seq, checkpoint.session, checkpoint.manifest) == (12, 3, manifest)
    assert checkpoint.meta == {"method": "mean", "shape": [4, 5], "reference": "a.fits"}
    assert checkpoint.hash == content_hash(checkpoint.arrays)
    loaded = store.load(checkpoint)
    expected = _arrays(2.0)
    assert loaded.keys() == expected.keys()
    for name, array in expected.items():
        assert loaded[name].dtype == array.dtype
        np.testing.assert_array_equal(loaded[name], array)
    with np.load(checkpoint.arrays) as npz:  # a plain .npz that anyone can open
        np.testing.assert_array_equal(npz["sum"], expected["sum"])
    assert not [p for p in checkpoint.arrays.parent.iterdir() if p.name.endswith(".tmp")]


def test_keeps_the_last_two_checkpoints(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for seq in (1, 2, 3, 4):
        store.save(seq, 0, _arrays(seq), {})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert CHECKPOINTS_KEPT == 2
    assert names == ["ckpt-000000000003.json", "ckpt-000000000003.npz",
                     "ckpt-000000000004.json", "ckpt-000000000004.npz"]


def _two_checkpoints(directory: Path) -> CheckpointStore:
    store = CheckpointStore(directory)
    store.save(5, 0, _arrays(5.0), {"n": 5})
    store.save(9, 0, _arrays(9.0), {"n": 9})
    return store


def test_missing_manifest_falls_back_to_the_previous_checkpoint(tmp_path: Path) -> None:
    store = _two_checkpoints(tmp_path)
    (tmp_path / "ckpt-000000000009.json").unlink()  # arrays written, manifest never renamed in
    checkpoint = store.latest()
    assert checkpoint is not None and checkpoint.seq == 5
    np.testing.assert_array_equal(store.load(checkpoint)["sum"], _arrays(5.0)["sum"])


def test_hash_mismatch_falls_back_to_the_previous_checkpoint(tmp_path: Path) -> None:
    store = _two_checkpoints(tmp_path)
    path = tmp_path / "ckpt-000000000009.npz"
    data = bytearray(path.read_bytes())
    data[-200] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    checkpoint = store.latest()
    assert checkpoint is not None and checkpoint.seq == 5


def test_checkpoints_from_before_xxh3_still_verify(tmp_path: Path) -> None:
    store = _two_checkpoints(tmp_path)
    for seq in (5, 9):  # as an earlier version wrote them: BLAKE2b-128 of the array file
        manifest = tmp_path / f"ckpt-{seq:012d}.json"
        record = json.loads(manifest.read_text())
        legacy = hashlib.blake2b((tmp_path / record["arrays"]).read_bytes(), digest_size=16).hexdigest()
        manifest.write_text(json.dumps({**record, "hash": legacy}))
    checkpoint = store.latest()
    assert checkpoint is not None and checkpoint.seq == 9 and is_legacy_hash(checkpoint.hash)
    np.testing.assert_array_equal(store.load(checkpoint)["sum"], _arrays(9.0)["sum"])
    path = tmp_path / "ckpt-000000000009.npz"
    data = bytearray(path.read_bytes())
    data[-200] ^= 0xFF  # same size, different content: the legacy hash still catches it
    path.write_bytes(bytes(data))
    checkpoint = store.latest()
    assert checkpoint is not None and checkpoint.seq == 5


@pytest.mark.parametrize("damage", ["truncate", "delete", "garble-manifest", "empty-manifest"])
def test_other_damage_falls_back_to_the_previous_checkpoint(tmp_path: Path, damage: str) -> None:
    store = _two_checkpoints(tmp_path)
    arrays, manifest = tmp_path / "ckpt-000000000009.npz", tmp_path / "ckpt-000000000009.json"
    if damage == "truncate":
        os.truncate(arrays, arrays.stat().st_size // 2)
    elif damage == "delete":
        arrays.unlink()
    elif damage == "garble-manifest":
        manifest.write_text('{"v": 1, "seq": 9, "arr')
    else:
        manifest.write_bytes(b"")
    checkpoint = store.latest()
    assert checkpoint is not None and checkpoint.seq == 5


def test_saving_again_after_a_fallback_replaces_the_damaged_checkpoint(tmp_path: Path) -> None:
    store = _two_checkpoints(tmp_path)
    os.truncate(tmp_path / "ckpt-000000000009.npz", 100)
    (tmp_path / ".ckpt-000000000010.npz.x1y2.tmp").write_bytes(b"left by a crash")
    store.save(9, 0, _arrays(9.5), {"n": 9})
    checkpoint = store.latest()
    assert checkpoint is not None and checkpoint.seq == 9 and checkpoint.meta == {"n": 9}
    np.testing.assert_array_equal(store.load(checkpoint)["sum"], _arrays(9.5)["sum"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-000000000005.json", "ckpt-000000000005.npz", "ckpt-000000000009.json", "ckpt-000000000009.npz"]


def test_save_refuses_going_back_and_bad_input(tmp_path: Path) -> None:
    store = _two_checkpoints(tmp_path)
    with pytest.raises(StateError, match="checkpoint 9"):
        store.save(8, 0, _arrays(8.0), {})
    with pytest.raises(ValueError):
        store.save(10, 0, {}, {})
    with pytest.raises(ValueError):
        store.save(10, 0, {"names": np.array(["a", "b"])}, {})
    with pytest.raises(ValueError):
        store.save(10, 0, _arrays(1.0), {"when": object()})


def test_load_refuses_a_file_changed_after_latest(tmp_path: Path) -> None:
    store = _two_checkpoints(tmp_path)
    checkpoint = store.latest()
    assert checkpoint is not None
    os.truncate(checkpoint.arrays, 10)
    with pytest.raises(StateError, match=r"ckpt-000000000009\.npz"):
        store.load(checkpoint)


def test_save_and_load_an_8_megapixel_mean_stack(tmp_path: Path) -> None:
    shape = (2160, 3840)  # 8.3 MP: 66 MB of float64 sum, 33 MB weight, 33 MB coverage
    arrays: dict[str, np.ndarray] = {
        "sum": np.random.default_rng(3).random(shape),
        "weight": np.full(shape, 17.0, dtype=np.float32),
        "coverage": np.full(shape, 17, dtype=np.int32),
    }
    store = CheckpointStore(tmp_path)
    start = time.perf_counter()
    store.save(17, 0, arrays, {"method": "mean"})
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0  # about 0.3 s measured; generous for a shared machine
    checkpoint = store.latest()
    assert checkpoint is not None
    loaded = store.load(checkpoint)
    np.testing.assert_array_equal(loaded["sum"], arrays["sum"])
    np.testing.assert_array_equal(loaded["coverage"], arrays["coverage"])


# --- recover ----------------------------------------------------------------------------------------


def test_recover_from_nothing(tmp_path: Path) -> None:
    with Journal(tmp_path / "journal.jsonl") as journal:
        recovery = recover(journal, CheckpointStore(tmp_path / "checkpoints"))
    assert recovery.checkpoint is None
    assert (recovery.replay, recovery.rejected, recovery.superseded) == ((), (), ())
    assert recovery.hashes == frozenset()
    assert (recovery.session, recovery.next_seq, recovery.reference) == (0, 1, None)


def test_recover_loads_the_checkpoint_and_replays_what_came_after(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    with Journal(tmp_path / "journal.jsonl") as journal:
        for seq in range(1, 8):
            verdict = "rejected" if seq in (2, 5) else "accepted"
            journal.append(_entry(seq, f"h{seq}", verdict=verdict, reference=seq == 1))
            if seq == 3:
                store.save(3, 0, _arrays(3.0), {})
        recovery = recover(journal, store)
    assert recovery.checkpoint is not None and recovery.checkpoint.seq == 3
    assert [e.seq for e in recovery.replay] == [4, 6, 7]
    assert [e.seq for e in recovery.rejected] == [5]
    assert recovery.superseded == ()
    assert recovery.hashes == {f"h{seq}" for seq in range(1, 8)}
    assert recovery.reference is not None and recovery.reference.seq == 1
    assert recovery.next_seq == 8


def test_recover_after_a_reset_replays_only_the_new_session(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    with Journal(tmp_path / "journal.jsonl") as journal:
        for seq in range(1, 5):
            journal.append(_entry(seq, f"h{seq}", reference=seq == 1))
        store.save(3, 0, _arrays(3.0), {})
        # Reset: session 1 begins, but the daemon died before checkpointing the empty stack.
        journal.append(_entry(5, "h5", session=1, reference=True))
        journal.append(_entry(6, "h6", session=1, verdict="rejected"))
        journal.append(_entry(7, "h7", session=1))
        recovery = recover(journal, store)
    assert recovery.checkpoint is None  # session 0's stack is not the one to continue
    assert recovery.session == 1
    assert [e.seq for e in recovery.replay] == [5, 7]
    assert [e.seq for e in recovery.rejected] == [6]
    assert [e.seq for e in recovery.superseded] == [4]
    assert recovery.reference is not None and recovery.reference.seq == 5


def test_recover_after_a_reset_that_was_checkpointed(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    with Journal(tmp_path / "journal.jsonl") as journal:
        for seq in range(1, 5):
            journal.append(_entry(seq, f"h{seq}"))
        store.save(4, 1, {"sum": np.zeros((4, 5))}, {"reset": True})  # the empty stack of session 1
        recovery = recover(journal, store)
    assert recovery.checkpoint is not None and recovery.checkpoint.session == 1
    assert recovery.session == 1
    assert recovery.replay == () and recovery.superseded == ()


def test_recover_refuses_a_checkpoint_ahead_of_the_journal(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    store.save(10, 0, _arrays(1.0), {})
    with Journal(tmp_path / "journal.jsonl") as journal:
        journal.append(_entry(1, "aa"))
        with pytest.raises(StateError, match=r"journal\.jsonl ends at seq 1"):
            recover(journal, store)


# --- crashes with real processes ---------------------------------------------------------------------

#: A toy daemon: stacks "frames" (.npy files: the frame id, then seeded pixels) into a running sum with a
#: per-id count, journaling each one and checkpointing every EVERY seqs, exactly as the real one must.
#: argv: state dir, frames dir, EVERY, death ("none", "journal": tear the Nth+1 journal line and die,
#: "manifest": die at the Nth+1 checkpoint, after its arrays and before its manifest), N.
_WORKER = r'''
import os, signal, sys
from pathlib import Path
import numpy as np
from livestack.live import state

state_dir, frames_dir = Path(sys.argv[1]), Path(sys.argv[2])
every, death, allowed = int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
shape, n_ids = (SHAPE), N_IDS

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if death == "journal":
    real_write, calls = os.write, [0]
    def torn_write(fd, data):
        calls[0] += 1
        if calls[0] > allowed:
            real_write(fd, bytes(data)[: len(data) // 2])
            die()
        return real_write(fd, data)
    os.write = torn_write
elif death == "manifest":
    real_atomic, saves = state.atomic_write, [0]
    def dying_atomic(path, data, *mode):
        saves[0] += 1
        if saves[0] > allowed:
            die()
        real_atomic(path, data, *mode)
    state.atomic_write = dying_atomic

def add(acc, pixels):
    acc["sum"] += pixels[1:].reshape(shape)
    acc["counts"][int(pixels[0])] += 1

journal = state.Journal(state_dir / "journal.jsonl")
store = state.CheckpointStore(state_dir / "checkpoints")
recovery = state.recover(journal, store)
if recovery.checkpoint is None:
    acc = {"sum": np.zeros(shape), "counts": np.zeros(n_ids, dtype=np.int64)}
else:
    acc = store.load(recovery.checkpoint)
for entry in recovery.replay:
    if state.content_hash(entry.path) != entry.hash:
        sys.exit(f"frame {entry.path} changed on disk")
    add(acc, np.load(entry.path))
has_reference = recovery.reference is not None
for path in sorted(frames_dir.iterdir()):
    content = state.content_hash(path)
    if journal.seen(content) is not None:
        continue
    pixels = np.load(path)
    accepted = int(pixels[0]) % 5 != 3
    info = path.stat()
    entry = state.JournalEntry(
        seq=journal.next_seq, path=str(path), size=info.st_size, mtime_ns=info.st_mtime_ns, hash=content,
        verdict="accepted" if accepted else "rejected", reason=None if accepted else "toy: cloudy",
        session=0, transform=[1, 0, 0, 0, 1, 0], quality={"id": int(pixels[0])}, timings={"total": 0.001},
        latency=0.01, reference=accepted and not has_reference)
    journal.append(entry)
    print(entry.seq, flush=True)
    if accepted:
        add(acc, pixels)
        has_reference = True
    if entry.seq % every == 0:
        store.save(entry.seq, 0, acc, {"frames": int(acc["counts"].sum())})
store.save(journal.next_seq - 1, 0, acc, {"frames": int(acc["counts"].sum())})
journal.close()
print("done", flush=True)
'''

_SHAPE = (32, 48)
_N_IDS = 160
_DUPLICATES = (7, 40, 77)  # also written under a second name, byte for byte


def _make_frames(directory: Path) -> None:
    directory.mkdir()
    for fid in range(_N_IDS):
        pixels = np.random.default_rng(fid).integers(0, 60_000, size=_SHAPE[0] * _SHAPE[1], dtype=np.int64)
        np.save(directory / f"frame-{fid:04d}.npy", np.concatenate([[fid], pixels]))
    for fid in _DUPLICATES:  # one copy sorts before the original, one after
        name = f"a-renamed-{fid}.npy" if fid % 2 else f"zz-copy-{fid}.npy"
        shutil.copyfile(directory / f"frame-{fid:04d}.npy", directory / name)


def _batch_answer(ids: set[int]) -> tuple[np.ndarray, np.ndarray]:
    total = np.zeros(_SHAPE)
    counts = np.zeros(_N_IDS, dtype=np.int64)
    for fid in ids:
        total += np.random.default_rng(fid).integers(0, 60_000, size=_SHAPE, dtype=np.int64)
        counts[fid] += 1
    return total, counts


def _worker(tmp_path: Path, every: int, death: str = "none", allowed: int = 0) -> subprocess.Popen[str]:
    script = tmp_path / "toy_daemon.py"
    if not script.exists():
        script.write_text(_WORKER.replace("SHAPE", repr(_SHAPE)).replace("N_IDS", str(_N_IDS)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "state"), str(tmp_path / "frames"), str(every), death,
         str(allowed)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _finish(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out


def _check_state(state_dir: Path) -> tuple[np.ndarray, np.ndarray, list[JournalEntry]]:
    """Recover as the daemon would, and check that the stack is exactly the journal's accepted frames."""
    with Journal(state_dir / "journal.jsonl") as journal:
        entries = list(journal.entries())
        store = CheckpointStore(state_dir / "checkpoints")
        recovery = recover(journal, store)
        if recovery.checkpoint is None:
            acc = {"sum": np.zeros(_SHAPE), "counts": np.zeros(_N_IDS, dtype=np.int64)}
        else:
            acc = store.load(recovery.checkpoint)
        for entry in recovery.replay:
            assert content_hash(entry.path) == entry.hash
            pixels = np.load(entry.path)
            acc["sum"] += pixels[1:].reshape(_SHAPE)
            acc["counts"][int(pixels[0])] += 1
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    assert len({e.hash for e in entries}) == len(entries)  # each content journaled once
    accepted = [int(e.quality["id"] or 0) for e in entries if e.verdict == "accepted"]
    assert len(accepted) == len(set(accepted))
    total, counts = _batch_answer(set(accepted))
    np.testing.assert_array_equal(acc["counts"], counts)
    np.testing.assert_array_equal(acc["sum"], total)
    assert sum(e.reference for e in entries) == (1 if accepted else 0)
    return acc["sum"], acc["counts"], entries


def _check_complete(tmp_path: Path) -> None:
    total, counts, entries = _check_state(tmp_path / "state")
    expected_ids = {fid for fid in range(_N_IDS) if fid % 5 != 3}
    expected_total, expected_counts = _batch_answer(expected_ids)
    np.testing.assert_array_equal(counts, expected_counts)  # every accepted frame exactly once
    np.testing.assert_array_equal(total, expected_total)  # the uninterrupted sum
    assert len(entries) == _N_IDS  # duplicates by content were never journaled
    checkpoints = sorted(p.name for p in (tmp_path / "state" / "checkpoints").iterdir())
    assert len(checkpoints) == 2 * CHECKPOINTS_KEPT and not [n for n in checkpoints if n.endswith(".tmp")]


def test_sigkill_at_random_moments_stacks_every_frame_exactly_once(tmp_path: Path) -> None:
    _make_frames(tmp_path / "frames")
    rng = random.Random(20240501)
    kills = 0
    for _ in range(14):  # each run does a few frames at most, so that nearly every kill lands mid-work
        proc = _worker(tmp_path, every=4)
        assert proc.stdout is not None
        if rng.random() < 0.2:
            time.sleep(rng.uniform(0.0, 0.2))  # anywhere: start-up, recovery, replay or work
        else:
            for _ in range(rng.randint(1, 6)):  # after some progress, plus a little
                if proc.stdout.readline() in ("", "done\n"):
                    break
            time.sleep(rng.uniform(0.0, 0.005))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        _, err = proc.communicate(timeout=60)
        assert proc.returncode in (0, -signal.SIGKILL), err
        _check_state(tmp_path / "state")  # after every kill, recovery gives exactly the journaled frames
    assert kills >= 10
    _finish(_worker(tmp_path, every=4))
    _check_complete(tmp_path)


def test_crash_while_writing_a_journal_line(tmp_path: Path) -> None:
    _make_frames(tmp_path / "frames")
    proc = _worker(tmp_path, every=4, death="journal", allowed=9)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    raw = (tmp_path / "state" / "journal.jsonl").read_bytes()
    assert not raw.endswith(b"\n") and raw.count(b"\n") == 9  # a real torn line
    _, _, entries = _check_state(tmp_path / "state")
    assert len(entries) == 9

    _finish(_worker(tmp_path, every=4))
    _check_complete(tmp_path)


def test_crash_between_the_arrays_and_the_manifest(tmp_path: Path) -> None:
    _make_frames(tmp_path / "frames")
    proc = _worker(tmp_path, every=4, death="manifest", allowed=2)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    checkpoints = tmp_path / "state" / "checkpoints"
    assert (checkpoints / "ckpt-000000000012.npz").exists()  # the third checkpoint's arrays made it...
    assert not (checkpoints / "ckpt-000000000012.json").exists()  # ...its manifest did not
    latest = CheckpointStore(checkpoints).latest()
    assert latest is not None and latest.seq == 8
    with Journal(tmp_path / "state" / "journal.jsonl") as journal:
        recovery = recover(journal, CheckpointStore(checkpoints))
    assert sorted(e.seq for e in recovery.replay + recovery.rejected) == [9, 10, 11, 12]
    _check_state(tmp_path / "state")

    _finish(_worker(tmp_path, every=4))
    _check_complete(tmp_path)
