"""Crash soak: ``kill -9`` the live daemon at random moments, restart it, and check the exactly-once contract.

Run: ``.venv/bin/python benchmarks/crash_soak.py [--kills 50] [--frames 120] [--seed 1] [--method M] [-v]``.

A simulated night (a satellite trail, a cloudy frame) is rendered once into a staging folder. Each round
copies the next few frames into the watched folder (some before the daemon starts, the rest once it logs
that it is watching, as a camera would), starts ``livestack run`` as a real subprocess, waits a seeded random
delay and sends SIGKILL: some kills land during start-up and recovery, the others while frames are read,
stacked, journaled, checkpointed or snapshotted. After the last kill the remaining frames are released, one
more run processes everything and is stopped with SIGTERM. Then:

- the final ``stack.fits`` must equal the stack of an uninterrupted, in-process ``pipeline.Stacker`` over
  the same files in time order (same NaN mask; the script reports whether it is bit-exact);
- the journal must hold every frame file exactly once, every accepted content hash exactly once, and the
  same verdicts as the uninterrupted run.

The summary tells where the kills landed (before the daemon was ready, while frames were pending, while
idle; with a torn journal line, a half-written checkpoint, frames journaled after the newest checkpoint
that recovery had to stack again) and how long each restart took to be ready (Python start-up included).
``tests/test_crash.py`` runs the same harness with fewer kills.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from livestack.config import AlignConfig, load_config
from livestack.live.state import Journal, JournalEntry
from livestack.pipeline import Stacker, order_by_time
from livestack.simulate import SimConfig, simulate

#: Seconds a run may take to log that it is watching, or to finish, before the soak gives up on it.
START_TIMEOUT = 60.0
FINISH_TIMEOUT = 120.0
#: The line ``livestack run`` logs once it has recovered and watches the folder.
READY_MARK = "livestack.live.daemon: watching "
_RESUMED = re.compile(r"resumed session \d+: (\d+) frames from the checkpoint, (\d+) stacked again")


@dataclass(frozen=True)
class Kill:
    """Where one SIGKILL landed."""

    round: int
    before_ready: bool  # during imports, recovery (replay, the recovery checkpoint) or socket binding
    delay: float  # seconds after spawn (before ready) or after the frames were released (after ready)
    released: int  # frames in the watched folder when the kill was sent
    journaled_before: int  # journal lines when the round started
    journaled_after: int  # complete journal lines after the kill
    torn_journal: bool  # the journal ended in a partial line
    checkpoint_seq: int | None  # newest checkpoint manifest on disk after the kill
    checkpoint_temp: bool  # a half-written checkpoint (temporary file) was left behind
    ready_time: float | None  # spawn to ready, when it got there

    @property
    def where(self) -> str:
        if self.before_ready:
            return "start-up/recovery"
        if self.journaled_after >= self.released:
            return "idle, all frames journaled"
        if self.journaled_after == self.journaled_before:
            return "frames pending, none journaled yet in this run"
        return "mid-stream, frames journaled and pending"

    @property
    def replay_needed(self) -> int:
        """Frames journaled after the newest checkpoint: recovery must stack them again."""
        return self.journaled_after - (self.checkpoint_seq or 0)


@dataclass
class SoakResult:
    """What a soak found."""

    method: str
    frames: int
    kills: list[Kill] = field(default_factory=list)
    ready_times: list[float] = field(default_factory=list)  # every run that got ready, first included
    replayed: list[int] = field(default_factory=list)  # frames stacked again from files, per recovery
    final_exit: int | None = None
    ncombine: int | None = None
    accepted: int = 0
    rejected: int = 0
    bit_exact: bool = False
    same_nan_mask: bool = False
    max_rel_diff: float = float("inf")
    journal_problems: list[str] = field(default_factory=list)
    stray_cubes: int = 0  # median cubes beyond the one the stack uses
    leftover_temporaries: list[str] = field(default_factory=list)  # half-written outputs never cleaned up
    elapsed: float = 0.0

    @property
    def stack_equal(self) -> bool:
        return self.same_nan_mask and self.max_rel_diff <= 1e-6

    def table(self) -> str:
        """One line per kill."""
        rows = ["round  where                                           delay  released  journal  ckpt  "
                "torn  tmp"]
        for k in self.kills:
            rows.append(f"{k.round:5d}  {k.where:46s}  {k.delay:5.2f}  {k.released:8d}  "
                        f"{k.journaled_before:3d}>{k.journaled_after:<3d}  {k.checkpoint_seq or 0:4d}  "
                        f"{k.torn_journal!s:5s} {k.checkpoint_temp!s:5s}")
        return "\n".join(rows)

    def summary(self) -> str:
        where = Counter(k.where for k in self.kills)
        ready = self.ready_times
        lines = [
            f"method {self.method}: {self.frames} frames, {len(self.kills)} kills, "
            f"{len(ready)} runs got ready, {self.elapsed:.1f} s",
            "kills landed: " + ", ".join(f"{n} {w}" for w, n in sorted(where.items())),
            f"  with a torn journal line: {sum(k.torn_journal for k in self.kills)}; "
            f"a half-written checkpoint: {sum(k.checkpoint_temp for k in self.kills)}; "
            f"frames journaled after the newest checkpoint: "
            f"{sum(k.replay_needed > 0 for k in self.kills)} "
            f"(up to {max((k.replay_needed for k in self.kills), default=0)})",
            f"recoveries that stacked frames again from files: {sum(n > 0 for n in self.replayed)} "
            f"({sum(self.replayed)} frames)",
        ]
        if ready:
            lines.append(f"spawn to ready (Python start-up, recovery, sockets): median "
                         f"{statistics.median(ready):.2f} s, max {max(ready):.2f} s, "
                         f"first run {ready[0]:.2f} s")
        lines.append(f"final run exit status {self.final_exit}; NCOMBINE {self.ncombine}; "
                     f"journal {self.accepted} accepted + {self.rejected} rejected")
        lines.append(f"final stack vs uninterrupted: same NaN mask {self.same_nan_mask}, bit-exact "
                     f"{self.bit_exact}, max relative difference {self.max_rel_diff:.3g}")
        lines.append("journal: " + ("every frame once, every accepted hash once, same verdicts"
                                    if not self.journal_problems else "; ".join(self.journal_problems)))
        lines.append(f"stray median cubes: {self.stray_cubes}; temporary files left in the output and state "
                     f"folders: {len(self.leftover_temporaries)} {self.leftover_temporaries[:3]}")
        return "\n".join(lines)


def render_night(folder: Path, frames: int, seed: int = 7, size: tuple[int, int] = (800, 600)) -> list[Path]:
    """Render the staging frames: a trail during the warm-up and one after, one cloudy frame."""
    trails = tuple(i for i in (2, frames // 3) if 0 < i < frames)
    clouds = tuple(i for i in (frames // 2,) if 0 < i < frames and i not in trails)
    sim = SimConfig(frames=frames, interval=0.0, size=size, seed=seed, n_stars=400, trails=trails,
                    cloud_frames=clouds)
    return simulate(folder, sim, sleep=lambda _s: None)


def write_config(root: Path, method: str, *, checkpoint_every: int = 3, snapshot_every: int = 4) -> Path:
    """A configuration for one soak: its own folders, ephemeral loopback ports, frequent checkpoints."""
    path = root / "livestack.toml"
    path.write_text(
        "[watch]\n"
        'folder = "watched"\n'
        "settle = 0.2\n"
        "[state]\n"
        'folder = "state"\n'
        f"checkpoint_every_frames = {checkpoint_every}\n"
        "[stack]\n"
        f'method = "{method}"\n'
        "[output]\n"
        'folder = "out"\n'
        f"every_frames = {snapshot_every}\n"
        "[network]\n"
        'publish = "tcp://127.0.0.1:*"\n'
        'control = "tcp://127.0.0.1:*"\n',
        encoding="utf-8")
    (root / "watched").mkdir(exist_ok=True)
    return path


def reference_stack(config_path: Path, paths: Sequence[Path],
                    workdir: Path) -> tuple[np.ndarray, dict[str, str]]:
    """The uninterrupted answer: one in-process ``Stacker`` over the files in time order."""
    config = load_config(config_path)
    workdir.mkdir(parents=True, exist_ok=True)
    stacker = Stacker(config, workdir=workdir)
    verdicts = {}
    for path in order_by_time(paths):
        verdicts[path.name] = stacker.process(path).verdict
    image = stacker.result()
    assert image is not None, "the uninterrupted stack is empty"
    return image, verdicts


class Soak:
    """One soak in ``root``: staging frames are released into ``root/watched`` round by round."""

    def __init__(self, root: Path, staging: Sequence[Path], method: str, seed: int,
                 python: str = sys.executable) -> None:
        self.root = root
        self.staging = sorted(staging)
        self.config = write_config(root, method)
        self.watched = root / "watched"
        self.state = root / "state"
        self.journal = self.state / "journal.jsonl"
        self.checkpoints = self.state / "checkpoints"
        self.rng = random.Random(seed)
        self.python = python
        self.released = 0
        self.runs = 0
        self.result = SoakResult(method=method, frames=len(self.staging))

    # -- the rounds -----------------------------------------------------------------------------------

    def run(self, kills: int) -> SoakResult:
        t0 = time.monotonic()
        per_round = max(1, -(-len(self.staging) // (kills + 1)))
        for number in range(kills):
            self._round(number, per_round)
        self._final_run()
        self._check()
        self.result.elapsed = time.monotonic() - t0
        return self.result

    def _round(self, number: int, per_round: int) -> None:
        before = min(self.rng.randint(0, per_round), len(self.staging) - self.released)
        self._release(before)
        journaled_before = self._journal_lines()
        proc, log = self._spawn()
        spawned = time.monotonic()
        ready_ones = self.result.ready_times
        # The first round always reaches "ready" so that there is a start-up time to aim the others at.
        early = bool(ready_ones) and self.rng.random() < 0.3
        ready_time: float | None = None
        if early:
            delay = self.rng.uniform(0.1, statistics.median(ready_ones) * 1.05)
            self._sleep_until(spawned + delay)
            if self._is_ready(log):
                ready_time = time.monotonic() - spawned
        else:
            ready_time = self._wait_ready(proc, log, spawned)
            self.result.ready_times.append(ready_time)
            self._release(per_round - before)
            # The first frame after start-up takes about 0.2 s (numba caches, the first warp), then about
            # 0.03 s per 800x600 frame: aim across the whole batch and a little beyond it. Before any frame
            # is journaled, the stack has no reference: the first frames wait for the reference window
            # (up to ``reference_wait`` seconds) and are read once more to choose it.
            window = 0.0 if journaled_before else AlignConfig().reference_wait + 0.3
            released = time.monotonic()
            if self.rng.random() < 0.5 or self.released <= journaled_before:
                delay = self.rng.uniform(0.05, 0.3 + 0.05 * per_round + window)
                self._sleep_until(released + delay)
            else:
                # Aimed by what the daemon has done, not by the clock: a loaded machine can be slower than
                # any fixed aim. A moment after the round's first frame is journaled, the rest are pending.
                self._wait_journaled(proc, journaled_before + 1, released + FINISH_TIMEOUT)
                self._sleep_until(time.monotonic() + self.rng.uniform(0.0, 0.02 * per_round))
                delay = time.monotonic() - released
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        self._note_replay(log)
        self.result.kills.append(Kill(
            round=number, before_ready=ready_time is None, delay=delay, released=self.released,
            journaled_before=journaled_before, journaled_after=self._journal_lines(),
            torn_journal=self._torn_journal(), checkpoint_seq=self._newest_checkpoint(),
            checkpoint_temp=self._checkpoint_temp(), ready_time=ready_time))
        self._check_snapshot_whole()

    def _final_run(self) -> None:
        self._release(len(self.staging) - self.released)
        proc, log = self._spawn()
        spawned = time.monotonic()
        self.result.ready_times.append(self._wait_ready(proc, log, spawned))
        deadline = time.monotonic() + FINISH_TIMEOUT
        while self._journal_lines() < len(self.staging):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"the final run stopped or stalled with {self._journal_lines()} of "
                                   f"{len(self.staging)} frames journaled:\n{log.read_text()}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        self.result.final_exit = proc.wait(timeout=FINISH_TIMEOUT)
        self._note_replay(log)
        self.final_log = log.read_text()

    # -- the checks -----------------------------------------------------------------------------------

    def _check(self) -> None:
        r = self.result
        stacks = list((self.root / "out").rglob("stack.fits"))
        if len(stacks) != 1:
            raise RuntimeError(f"expected one stack.fits, found {stacks}")
        with fits.open(stacks[0]) as hdul:
            final = np.asarray(hdul[0].data, dtype=np.float32)
            r.ncombine = int(hdul[0].header["NCOMBINE"])
        expected, verdicts = reference_stack(self.config, self.staging, self.root / "reference-work")
        nan_final, nan_expected = np.isnan(final), np.isnan(expected)
        r.same_nan_mask = final.shape == expected.shape and bool(np.array_equal(nan_final, nan_expected))
        if r.same_nan_mask:
            both = ~nan_final
            r.bit_exact = bool(np.array_equal(final, expected, equal_nan=True))
            diff = np.abs(final[both].astype(np.float64) - expected[both])
            scale = np.maximum(np.abs(expected[both].astype(np.float64)), 1e-30)
            r.max_rel_diff = float((diff / scale).max()) if diff.size else 0.0
        r.journal_problems = journal_problems(self.journal, self.staging, verdicts)
        entries = Journal(self.journal).entries()  # the lock is free: every process has exited
        r.accepted = sum(e.verdict == "accepted" for e in entries)
        r.rejected = len(entries) - r.accepted
        if r.method == "median":
            r.stray_cubes = len(list((self.state / "work").rglob("median-*.cube"))) - 1
        folders = (self.root / "out", self.state)
        r.leftover_temporaries = sorted(str(p.relative_to(self.root)) for folder in folders
                                        for p in folder.rglob("*.tmp"))
        if r.ncombine != r.accepted:
            r.journal_problems.append(f"NCOMBINE {r.ncombine} but {r.accepted} accepted in the journal")

    def _check_snapshot_whole(self) -> None:
        # Never a half file: whatever stack.fits a kill leaves behind opens and has its header.
        for path in (self.root / "out").rglob("stack.fits"):
            with fits.open(path) as hdul:
                if "NCOMBINE" not in hdul[0].header or hdul[0].data is None:
                    raise RuntimeError(f"{path} is not a whole snapshot after a kill")

    # -- helpers --------------------------------------------------------------------------------------

    def _spawn(self) -> tuple[subprocess.Popen[bytes], Path]:
        self.runs += 1
        log = self.root / f"run-{self.runs:03d}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen([self.python, "-m", "livestack.cli", "run", "--config", str(self.config)],
                                    stdin=subprocess.DEVNULL, stdout=fh, stderr=fh, cwd=self.root)
        return proc, log

    def _wait_ready(self, proc: subprocess.Popen[bytes], log: Path, spawned: float) -> float:
        while not self._is_ready(log):
            if proc.poll() is not None or time.monotonic() - spawned > START_TIMEOUT:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"run {self.runs} did not get ready:\n{log.read_text()}")
            time.sleep(0.005)
        return time.monotonic() - spawned

    @staticmethod
    def _is_ready(log: Path) -> bool:
        return READY_MARK in log.read_text(errors="replace")

    @staticmethod
    def _sleep_until(t: float) -> None:
        time.sleep(max(0.0, t - time.monotonic()))

    def _release(self, n: int) -> None:
        # As a careful capture program does: a temporary name, then a rename into place (mtime kept).
        for path in self.staging[self.released:self.released + n]:
            part = self.watched / f"{path.name}.part"
            shutil.copy2(path, part)
            os.replace(part, self.watched / path.name)
        self.released += max(0, min(n, len(self.staging) - self.released))

    def _note_replay(self, log: Path) -> None:
        m = _RESUMED.search(log.read_text(errors="replace"))
        if m:
            self.result.replayed.append(int(m.group(2)))

    def _wait_journaled(self, proc: subprocess.Popen[bytes], lines: int, deadline: float) -> None:
        """Wait until the journal holds ``lines`` complete lines (or the daemon ended, or the deadline)."""
        while self._journal_lines() < lines and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)

    def _journal_lines(self) -> int:
        try:
            return self.journal.read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0

    def _torn_journal(self) -> bool:
        try:
            data = self.journal.read_bytes()
        except FileNotFoundError:
            return False
        return bool(data) and not data.endswith(b"\n")

    def _newest_checkpoint(self) -> int | None:
        if not self.checkpoints.is_dir():
            return None
        seqs = [int(m.group(1)) for m in (re.match(r"ckpt-(\d+)\.json$", n)
                                          for n in os.listdir(self.checkpoints)) if m]
        return max(seqs, default=None)

    def _checkpoint_temp(self) -> bool:
        return self.checkpoints.is_dir() and any(n.endswith(".tmp") for n in os.listdir(self.checkpoints))


def journal_problems(journal: Path, frames: Sequence[Path], verdicts: dict[str, str]) -> list[str]:
    """What is wrong with the journal after a soak: empty when every frame is there once, as expected."""
    with Journal(journal) as j:
        entries: tuple[JournalEntry, ...] = j.entries()
    problems = []
    names = Counter(Path(e.path).name for e in entries)
    expected = {p.name for p in frames}
    twice = sorted(n for n, c in names.items() if c > 1)
    if twice:
        problems.append(f"journaled more than once: {twice}")
    missing = sorted(expected - names.keys())
    if missing:
        problems.append(f"never journaled: {missing}")
    stray = sorted(names.keys() - expected)
    if stray:
        problems.append(f"journaled but not a frame: {stray}")
    hashes = Counter(e.hash for e in entries if e.verdict == "accepted")
    if any(c > 1 for c in hashes.values()):
        problems.append("an accepted content hash appears more than once")
    differ = sorted(Path(e.path).name for e in entries if verdicts.get(Path(e.path).name) != e.verdict)
    if differ:
        problems.append(f"verdicts differ from the uninterrupted run: {differ}")
    seqs = [e.seq for e in entries]
    if seqs != sorted(set(seqs)):
        problems.append("sequence numbers are not strictly increasing")
    return problems


def soak(root: Path, staging: Sequence[Path], *, kills: int, method: str = "kappa-sigma",
         seed: int = 1) -> SoakResult:
    """Run one soak in ``root`` (which must be empty) over frames already rendered into ``staging``."""
    return Soak(root, staging, method, seed).run(kills)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--method", choices=("mean", "kappa-sigma", "median"), default="kappa-sigma")
    parser.add_argument("--size", default="800x600", help="frame WIDTHxHEIGHT")
    parser.add_argument("-v", "--verbose", action="store_true", help="print one line per kill")
    parser.add_argument("--keep", metavar="DIR",
                        help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    import tempfile

    with tempfile.TemporaryDirectory(prefix="livestack-soak-") as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        staging = render_night(base / "staging", args.frames, seed=args.seed, size=(width, height))
        frames = [p for p in staging if p.suffix == ".fits"]
        root = base / "soak"
        root.mkdir()
        result = soak(root, frames, kills=args.kills, method=args.method, seed=args.seed)
        if args.verbose:
            print(result.table())
        print(result.summary())
        ok = result.final_exit == 0 and result.stack_equal and not result.journal_problems
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
