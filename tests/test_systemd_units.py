"""The systemd units, checked by systemd itself.

``systemd-analyze verify`` loads a unit the way the service manager would, and also checks that the
``ExecStart`` program exists and is executable. The units name ``/usr/local/bin/livestack``, which need not
exist on the machine running the tests, so each test builds a small root folder: the host's own system
units (for ``sysinit.target``, ``network.target`` and the like), an executable stand-in at the unit's
``ExecStart`` path, and the unit files copied byte for byte into ``etc/systemd/system``. It then runs
``systemd-analyze verify --root=ROOT``: the files verified are the files in the repository, unchanged.

``verify`` reports unknown keys and unparsable values as warnings without failing, so the tests also fail on
any line of its output that names one of our units.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"
ANALYZE = shutil.which("systemd-analyze")
HOST_UNITS = next((Path(p) for p in ("/usr/lib/systemd/system", "/lib/systemd/system")
                   if (Path(p) / "sysinit.target").exists()), None)

needs_systemd = pytest.mark.skipif(
    ANALYZE is None or HOST_UNITS is None,
    reason="systemd-analyze or the host's system units are absent (Debian/Ubuntu: apt-get install systemd)",
)

#: unit file -> the name systemd-analyze is asked about (a template needs an instance).
CASES = {"livestack.service": "livestack.service", "livestack@.service": "livestack@seestar.service"}


def directives(unit: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file, in order, ignoring comments and sections."""
    found: dict[str, list[str]] = {}
    for line in (UNITS / unit).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def make_root(tmp_path: Path, unit: str) -> Path:
    assert HOST_UNITS is not None
    root = tmp_path / "root"
    shutil.copytree(HOST_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    # The host units' symlinks may point into /lib; resolve that inside the root as merged-/usr does.
    (root / "lib").symlink_to("usr/lib")
    program = Path(directives(unit)["ExecStart"][0].split()[0])
    stand_in = root / program.relative_to("/")
    stand_in.parent.mkdir(parents=True, exist_ok=True)
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    target = root / "etc/systemd/system"
    target.mkdir(parents=True)
    shutil.copy2(UNITS / unit, target / unit)
    return root


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=60, check=False)


@needs_systemd
@pytest.mark.parametrize("unit", sorted(CASES))
def test_systemd_verifies_the_unit(tmp_path: Path, unit: str) -> None:
    root = make_root(tmp_path, unit)
    result = analyze("verify", "--man=no", f"--root={root}", CASES[unit])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    ours = [line for line in output.splitlines() if "livestack" in line]
    assert not ours, "\n".join(ours)


@needs_systemd
def test_verify_catches_a_missing_program(tmp_path: Path) -> None:
    # The check above means something only if verify really looks at ExecStart inside the root.
    root = make_root(tmp_path, "livestack.service")
    (root / "usr/local/bin/livestack").unlink()
    result = analyze("verify", "--man=no", f"--root={root}", "livestack.service")
    assert result.returncode != 0
    assert "/usr/local/bin/livestack is not executable" in result.stderr


@needs_systemd
@pytest.mark.parametrize("unit", sorted(CASES))
def test_the_unit_is_hardened(tmp_path: Path, unit: str) -> None:
    if "--offline" not in analyze("--help").stdout:
        pytest.skip("this systemd-analyze cannot review unit files offline (needs systemd 250 or later)")
    root = make_root(tmp_path, unit)
    # Exposure runs from 0 (locked down) to 10 (unprotected), --threshold counts tenths; ours is 1.4 on
    # systemd 252, so weakening the hardening fails here.
    result = analyze("security", "--offline=yes", "--threshold=20", f"--root={root}", CASES[unit])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("unit", sorted(CASES))
def test_the_unit_runs_livestack_under_systemd_supervision(unit: str) -> None:
    found = directives(unit)
    instance = "%i" if "@" in unit else "livestack"
    assert found["ExecStart"] == [f"/usr/local/bin/livestack run --config /etc/livestack/{instance}.toml"]
    assert found["Type"] == ["notify"]
    assert found["NotifyAccess"] == ["main"]
    assert found["WatchdogSec"] == ["60"]
    assert found["Restart"] == ["on-failure"]
    assert found["KillSignal"] == ["SIGTERM"]
    assert found["User"] == ["livestack"]
    state = "livestack/%i" if "@" in unit else "livestack"
    assert found["StateDirectory"] == [state]
    assert found["ReadWritePaths"] == [f"/var/lib/{state}"]
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectKernelTunables"):
        assert found[key] == ["yes"], key
    assert found["ProtectSystem"] == ["strict"]
    assert found["ProtectHome"] == ["read-only"]
