"""Removal through the live daemon: control requests, events, snapshots with FRAMES, and kill -9 mid-removal.

An in-process ``Daemon`` on loopback sockets answers ``remove``, ``reinclude`` and ``undo_last``; a real
``livestack run`` process is killed with SIGKILL while a removal is under way, restarted, and must finish it:
the final stack equals a fresh stack of the frames that remain (bit for bit for kappa-sigma and median,
1e-5 relative for the mean).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from astropy.io import fits
from test_daemon import WAIT, Recorder, make_config, running
from test_provenance import fitsverify

from livestack.clients.bus import ControlClient
from livestack.config import Config
from livestack.errors import NetworkError
from livestack.live.state import read_journal
from livestack.pipeline import Stacker
from livestack.simulate import SimConfig, simulate
from livestack.stages.provenance import read_frames

REMOVED = (4, 9, 13, 22, 27)


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("night")
    sim = SimConfig(frames=30, interval=20, size=(256, 192), seed=17, n_stars=800, trails=(6, 18),
                    drift=(0.4, -0.3), rotation_per_frame=0.02)
    return simulate(folder, sim, sleep=lambda _s: None)


def fresh(config: Config, frames: list[Path], workdir: Path) -> np.ndarray:
    """A stack of these frames from scratch (aligned again, onto the first)."""
    workdir.mkdir(exist_ok=True)
    stacker = Stacker(config.with_overrides({"align.reference": str(frames[0])}), workdir=workdir)
    assert all(stacker.process(p).accepted for p in frames)
    image = stacker.result()
    assert image is not None
    stacker.discard()
    return image


def same(actual: np.ndarray, expected: np.ndarray, method: str) -> None:
    if method == "mean":
        np.testing.assert_allclose(actual, expected, rtol=1e-5)
    else:
        assert actual.astype("<f4").tobytes() == expected.astype("<f4").tobytes()


def _done(recorder: Recorder, count: int) -> None:
    recorder.wait_for(lambda evs: sum(e.topic == "removal" and e["state"] == "done" for e in evs) >= count,
                      f"{count} finished removal(s)")


@pytest.mark.parametrize("method", ["kappa-sigma", "mean"])
def test_remove_reinclude_and_undo_last_through_the_daemon(night: list[Path], tmp_path: Path,
                                                           method: str) -> None:
    frames = night[:12]
    config = make_config(tmp_path, **{"stack.method": method, "output.every_frames": 0,
                                      "output.every_seconds": 0.0, "output.frames_csv": True})
    for path in frames:
        shutil.copy2(path, tmp_path / "frames" / path.name)
    copies = [tmp_path / "frames" / p.name for p in frames]
    recorder = Recorder()
    with running(config, listeners=(recorder,)) as daemon:
        recorder.wait_for(lambda evs: len(recorder.frames("accepted")) == 12, "12 stacked frames")
        with ControlClient(daemon.control_endpoint, timeout=WAIT) as client:
            reply = client.request("remove", seq=[3, 5], reason="satellite")
            assert reply["ok"], reply
            assert reply["result"]["seqs"] == [3, 5]
            assert reply["result"]["state"] == ("done" if method == "mean" else "re-integrating")
            _done(recorder, 1)
            refused = client.request("remove", seq=3)
            assert not refused["ok"] and "no stacked frame has the number 3" in refused["error"]
            assert client.request("undo_last")["result"]["seqs"] == [12]
            _done(recorder, 2)
            snap = client.request("snapshot")["result"]
            kept = [p for i, p in enumerate(copies, start=1) if i not in (3, 5, 12)]
            with fits.open(snap["fits"]) as hdul:
                same(hdul[0].data, fresh(config, kept, tmp_path / "fresh"), method)
                assert hdul[0].header["NCOMBINE"] == 9
                rows = {r.seq: r for r in read_frames(hdul["FRAMES"])}
            assert {s for s, r in rows.items() if r.state == "removed"} == {3, 5, 12}
            assert len(rows) == 12 and all(r.hash for r in rows.values())
            fitsverify(Path(snap["fits"]))
            with (Path(snap["fits"]).parent / "stack.frames.csv").open() as fh:
                lines = list(csv.DictReader(fh))
            assert [(int(x["seq"]), x["state"]) for x in lines] == [(s, r.state) for s, r in rows.items()]
            assert rows[3].reason == "satellite" and rows[12].reason == "undo last"
            assert reply["result"]["frames"] in (10, 12)
            assert client.request("reinclude", seq=[3, 5, 12])["ok"]
            _done(recorder, 3)
            snap = client.request("snapshot")["result"]
            with fits.open(snap["fits"]) as hdul:
                same(hdul[0].data, fresh(config, copies, tmp_path / "fresh-all"), method)
                assert hdul[0].header["NCOMBINE"] == 12
    removals = [e for e in recorder.events if e.topic == "removal"]
    assert [(e["action"], e["state"]) for e in removals] == [
        ("remove", "started"), ("remove", "done"), ("remove", "started"), ("remove", "done"),
        ("reinclude", "started"), ("reinclude", "done")]


# -- a real process killed during a removal -------------------------------------------------------------

def _write_config(root: Path, method: str) -> Path:
    path = root / "livestack.toml"
    path.write_text(f"""
[watch]
folder = "{root / 'frames'}"
settle = 0.3
poll_interval = 0.1
[stack]
method = "{method}"
[calibration]
defects = "off"
[output]
folder = "{root / 'out'}"
every_frames = 0
every_seconds = 0.0
[network]
publish = "tcp://127.0.0.1:{_free_port()}"
control = "tcp://127.0.0.1:{_free_port()}"
preview_interval = 0.0
""")
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=WAIT)


def _start(config: Path, log: Path, processes: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:
        process = subprocess.Popen([sys.executable, "-m", "livestack.cli", "run", "--config", str(config)],
                                   stdout=fh, stderr=fh)
    processes.append(process)
    return process


def _control(config: Path) -> str:
    from livestack.config import load_config

    return load_config(config).network.control


def _journaled(state: Path, frames: int) -> bool:
    try:
        entries, _ = read_journal(state / "journal.jsonl")
    except Exception:
        return False
    return len(entries) >= frames


@pytest.mark.parametrize("method", ["median", "mean"])
def test_kill_9_during_a_removal_then_the_restart_finishes_it(night: list[Path], tmp_path: Path,
                                                             launcher: list[subprocess.Popen[bytes]],
                                                             method: str) -> None:
    (tmp_path / "frames").mkdir()
    config = _write_config(tmp_path, method)
    state = tmp_path / "out" / ".livestack-state"
    for path in night:
        shutil.copy2(path, tmp_path / "frames" / path.name)
    copies = [tmp_path / "frames" / p.name for p in night]
    log = tmp_path / "daemon.log"
    control = _control(config)
    process = _start(config, log, launcher)
    deadline = time.monotonic() + 4 * WAIT
    while not _journaled(state, 30):
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    # The request is journaled before the stack changes; kill the process while the removal runs.
    if method == "mean":
        # Without waiting for the reply: the worker is subtracting the frames when the kill comes.
        context: zmq.Context[Any] = zmq.Context()
        request = context.socket(zmq.REQ)
        request.connect(control)
        request.send(json.dumps({"cmd": "remove", "seq": list(REMOVED)}).encode())
        deadline = time.monotonic() + WAIT
        while not read_journal(state / "journal.jsonl")[1]:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
        request.close(linger=0)
        context.term()
    else:
        with ControlClient(control, timeout=WAIT) as client:
            reply = client.request("remove", seq=list(REMOVED))
        assert reply["ok"] and reply["result"]["state"] == "re-integrating", reply
        os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=WAIT)
    _, removals = read_journal(state / "journal.jsonl")
    assert [r.targets for r in removals] == [REMOVED]
    # The kill came before a checkpoint reflected the removal: the restart has it to finish.
    newest = max((state / "checkpoints").glob("ckpt-*.json"))
    assert json.loads(newest.read_text())["meta"].get("removals", 0) == 0
    # Restart: the removal finishes (the stack being served drops to 25 frames); a clean stop writes it.
    process = _start(config, log, launcher)
    deadline = time.monotonic() + 4 * WAIT
    frames = None
    while frames != 25:
        assert time.monotonic() < deadline, f"{frames} frames; {log.read_text()}"
        assert process.poll() is None, log.read_text()
        with ControlClient(control, timeout=2.0) as client:
            try:
                reply = client.request("status")
            except NetworkError:
                continue
        frames = reply["result"]["frames"] if reply.get("ok") else None
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=4 * WAIT) == 0, log.read_text()
    kept = [p for i, p in enumerate(copies, start=1) if i not in REMOVED]
    # Defects found from consecutive frames depend on the frames around each one: a fresh stack of fewer
    # frames finds others, so they are off on both sides.
    config_obj = Config().with_overrides({"stack.method": method, "calibration.defects": "off"})
    (final,) = (tmp_path / "out").rglob("stack.fits")  # in the target's folder
    with fits.open(final) as hdul:
        same(hdul[0].data, fresh(config_obj, kept, tmp_path / "fresh"), method)
        assert hdul[0].header["NCOMBINE"] == 25
        rows = read_frames(hdul["FRAMES"])
    assert {r.seq for r in rows if r.state == "removed"} == set(REMOVED)
    assert len(rows) == 30
