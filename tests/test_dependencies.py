"""Declared dependencies match the imports: every third-party import of ``livestack/`` is declared in
``pyproject.toml``, and every declared runtime dependency is imported somewhere in ``livestack/``.

Import names are mapped to distributions by the installed packages' own metadata
(``importlib.metadata.packages_distributions``: ``cv2`` -> ``opencv-python-headless``, ``zmq`` -> ``pyzmq``),
not by a table kept here.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    """The runtime dependencies of ``[project] dependencies``, normalised."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = set()
    for requirement in project["dependencies"]:
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
        assert match, f"cannot read the requirement {requirement!r}"
        names.add(_normalise(match.group(0)))
    return names


def _imported_modules() -> dict[str, set[str]]:
    """Top-level module names imported anywhere in ``livestack/`` (functions included), with where."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / "livestack").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(REPO)))
    return found


def _third_party(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    return {name: where for name, where in modules.items()
            if name not in sys.stdlib_module_names and name != "livestack"}


def test_the_import_scan_sees_known_imports() -> None:
    # The scan itself: imports at the top, inside functions and as ``from x.y import z`` are all found.
    modules = _imported_modules()
    assert {"numpy", "cv2", "zmq", "astropy", "livestack", "threading"} <= set(modules)
    assert "livestack/stages/warp.py" in modules["cv2"]


def test_every_third_party_import_is_a_declared_dependency() -> None:
    distributions = importlib.metadata.packages_distributions()
    declared = _declared()
    missing = []
    for module, where in sorted(_third_party(_imported_modules()).items()):
        owners = {_normalise(d) for d in distributions.get(module, [])}
        assert owners, f"{module} (imported in {sorted(where)}) is not installed: its distribution is unknown"
        if not owners & declared:
            missing.append(f"{module} ({'/'.join(sorted(owners))}, imported in {', '.join(sorted(where))})")
    assert not missing, "imported but not declared in pyproject.toml: " + "; ".join(missing)


def test_every_declared_dependency_is_imported() -> None:
    distributions = importlib.metadata.packages_distributions()
    imported = set()
    for module in _third_party(_imported_modules()):
        imported |= {_normalise(d) for d in distributions.get(module, [])}
    unused = sorted(_declared() - imported)
    assert not unused, f"declared in pyproject.toml but never imported by livestack/: {', '.join(unused)}"
