"""Start-up stays light: what a command imports is what it uses.

Each check runs a fresh interpreter and reads its ``sys.modules``: the command-line module alone imports no
third-party library, and a whole ``livestack stack`` imports none of the libraries that only other commands,
the daemon or its clients use (the k-d tree of scipy, astropy's table machinery, the dashboard, the web
viewer, photometry). An import that creeps back onto the stack's path fails here before it costs every
short run a few tenths of a second.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from livestack.simulate import SimConfig, simulate

#: Never imported by ``livestack stack`` (astroalign imports scipy.spatial only inside its search).
NOT_FOR_STACK = ("scipy.spatial", "scipy.ndimage", "astropy.table", "astropy.wcs", "photutils", "skimage",
                 "textual", "starlette", "uvicorn", "zmq", "watchdog")


def _modules(code: str) -> set[str]:
    report = "\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code + report], capture_output=True, text=True, timeout=240,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def _imported(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


def test_the_command_line_module_imports_no_third_party_library() -> None:
    modules = _modules("import livestack.cli")
    ours = {"livestack", "__main__", "_distutils_hack"}  # and the editable install's import hook
    third_party = sorted(m for m in {m.split(".")[0] for m in modules} - set(sys.stdlib_module_names) - ours
                         if not m.startswith("__editable__"))
    assert not third_party, third_party


def test_a_stack_imports_only_what_stacking_uses(tmp_path: Path) -> None:
    simulate(tmp_path / "frames", SimConfig(frames=2, interval=0, size=(320, 240), seed=3, n_stars=150),
             sleep=lambda _s: None)
    frames = sorted(str(p) for p in (tmp_path / "frames").rglob("*.fits"))
    assert len(frames) == 2
    out = tmp_path / "out" / "stack.fits"
    modules = _modules("from livestack.cli import main\n"
                       f"assert main(['stack', '-q', '-o', {str(out)!r}, *{frames!r}]) == 0")
    assert out.exists()
    assert "livestack.stages.stack" in modules  # the run did stack
    assert not _imported(modules, NOT_FOR_STACK), _imported(modules, NOT_FOR_STACK)
