"""The ``livestack`` command line: stack, simulate, config and keys, run as a user would."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from livestack.cli import main
from livestack.simulate import SimConfig, render_frame, simulate


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "livestack.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=240, check=False)


@pytest.fixture(scope="module")
def sequence(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SimConfig]:
    folder = tmp_path_factory.mktemp("seq")
    sim = SimConfig(frames=6, interval=0, size=(480, 360), seed=21, n_stars=500, trails=(4,),
                    subdir_every=3)
    simulate(folder, sim, sleep=lambda _s: None)
    (folder / "empty.fits").write_bytes(b"")
    return folder, sim


def test_stack_writes_fits_picture_and_a_report(sequence: tuple[Path, SimConfig], tmp_path: Path) -> None:
    folder, sim = sequence
    out = tmp_path / "out" / "m1.fits"
    report = tmp_path / "report.csv"
    proc = _run("stack", str(folder), "-o", str(out), "--report", str(report), "--method", "mean", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "6 of 7 frames stacked (mean)" in proc.stderr
    assert "rejected 1:" in proc.stderr and "empty" in proc.stderr
    with fits.open(out) as hdul:
        header = hdul[0].header
        assert hdul[0].data.shape == (360, 480)
        assert header["NCOMBINE"] == 6
        assert header["EXPTIME"] == pytest.approx(6 * sim.exptime)
        assert header["STACKMET"] == "mean"
    assert out.with_suffix(".jpg").stat().st_size > 1000
    with report.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 7
    assert {"file", "verdict", "reason", "m00", "m01", "m02", "m10", "m11", "m12", "rotation_deg", "scale",
            "inliers", "rms", "stars", "fwhm", "background", "t_read", "t_detect", "t_align", "t_warp",
            "t_stack"} <= set(rows[0])
    by_name = {Path(r["file"]).name: r for r in rows}
    assert by_name["empty.fits"]["verdict"] == "rejected" and by_name["empty.fits"]["reason"]
    for index in range(sim.frames):
        row = by_name[f"sim_{index + 1:04d}.fits"]
        assert row["verdict"] == "accepted"
        found = np.array([[float(row[f"m{i}{j}"]) for j in range(3)] for i in range(2)])
        truth = render_frame(sim, index).matrix
        corners = np.array([[0, 0, 1], [479, 0, 1], [0, 359, 1], [479, 359, 1]], dtype=float)
        assert np.abs(corners @ found.T - corners @ truth.T).max() < 0.1
        assert float(row["t_read"]) > 0 and float(row["t_detect"]) > 0


def test_stack_into_a_folder_uses_kappa_sigma(sequence: tuple[Path, SimConfig], tmp_path: Path) -> None:
    folder, _ = sequence
    assert main(["stack", str(folder / "sim_*.fits"), str(folder / "night2"), "-o", str(tmp_path), "-q"]) == 0
    with fits.open(tmp_path / "stack.fits") as hdul:
        assert hdul[0].header["STACKMET"] == "kappa-sigma"
        assert hdul[0].header["NCOMBINE"] == 6


def test_stack_fails_clearly_when_nothing_stacks(tmp_path: Path) -> None:
    (tmp_path / "a.fits").write_text("not a frame")
    proc = _run("stack", str(tmp_path / "a.fits"), "-o", str(tmp_path / "out.fits"), "-q")
    assert proc.returncode == 1
    assert "no frame could be stacked" in proc.stderr
    assert not (tmp_path / "out.fits").exists()
    proc = _run("stack", str(tmp_path / "nothing-*.fits"), "-o", str(tmp_path / "out.fits"))
    assert proc.returncode == 1 and "no files match" in proc.stderr


def test_bad_configuration_is_one_sentence_and_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[stack]\nkappa = "x"\n')
    proc = _run("stack", str(tmp_path), "-o", str(tmp_path / "o.fits"), "--config", str(cfg))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"livestack: {cfg}: [stack] kappa must be a number, not 'x'"]
    proc = _run("config", "--check", str(cfg))
    assert proc.returncode == 2


def test_config_prints_the_shipped_file() -> None:
    proc = _run("config")
    assert proc.returncode == 0
    assert proc.stdout == (Path(__file__).resolve().parents[1] / "config.toml").read_text()


def test_simulate_writes_frames_and_truth(tmp_path: Path) -> None:
    proc = _run("simulate", str(tmp_path), "--frames", "3", "--interval", "0", "--size", "320x240",
                "--bayer", "RGGB", "--write-mode", "mixed")
    assert proc.returncode == 0, proc.stderr
    frames = sorted(tmp_path.glob("sim_*.fits"))
    assert len(frames) == 3
    with fits.open(frames[0]) as hdul:
        assert hdul[0].header["BAYERPAT"] == "RGGB"
        assert hdul[0].data.shape == (240, 320)
    with (tmp_path / "truth.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 3


def test_keys_makes_a_pair_and_never_overwrites(tmp_path: Path) -> None:
    proc = _run("keys", str(tmp_path / "keys"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "keys" / "server.key").exists()
    assert (tmp_path / "keys" / "server.key_secret").stat().st_mode & 0o077 == 0
    again = _run("keys", str(tmp_path / "keys"))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_stack_prints_the_method_used_when_a_median_passes_its_disk_budget(
        sequence: tuple[Path, SimConfig], tmp_path: Path) -> None:
    folder, _ = sequence
    config = tmp_path / "livestack.toml"
    # Room for two 480x360 frames of the cube (691,200 bytes each), not three.
    config.write_text(f"[stack]\nmedian_disk_budget = {2.5 * 480 * 360 * 4 / 1e9!r}\n")
    out = tmp_path / "m.fits"
    proc = _run("stack", str(folder / "sim_*.fits"), "-o", str(out), "--method", "median", "--config",
                str(config), "-q")
    assert proc.returncode == 0, proc.stderr
    method = fits.getheader(out)["STACKMET"]
    assert method == "median, then kappa-sigma (disk budget)"
    n = len(list(folder.glob("sim_*.fits")))
    assert n >= 3 and f"{n} of {n} frames stacked ({method})" in proc.stderr, proc.stderr
