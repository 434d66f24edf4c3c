"""Configuration: the shipped config.toml, validation sentences and overrides."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from livestack.config import Config, load_config, render_toml
from livestack.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_lists_every_key_with_its_default() -> None:
    shipped = (ROOT / "config.toml").read_text()
    assert shipped == render_toml(), "config.toml is out of step: regenerate with `livestack config`"
    loaded = load_config(ROOT / "config.toml")
    assert loaded == Config()
    data = tomllib.loads(shipped)
    for section in (f.name for f in dataclasses.fields(Config) if f.name != "base"):
        assert section in data


def test_values_are_read_and_paths_resolve_against_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text('[stack]\nmethod = "median"\nkappa = 2\n[watch]\nfolder = "incoming"\n')
    config = load_config(cfg)
    assert config.stack.method == "median"
    assert config.stack.kappa == 2.0 and isinstance(config.stack.kappa, float)
    assert config.path(config.watch.folder) == tmp_path / "incoming"
    assert config.detect.threshold == Config().detect.threshold


@pytest.mark.parametrize(("text", "words"), [
    ('[stack]\nmetod = "mean"\n', ["unknown key 'metod'", "[stack]", "method"]),
    ('[stak]\nmethod = "mean"\n', ["unknown section [stak]", "[stack]"]),
    ('[stack]\nkappa = "three"\n', ["[stack] kappa must be a number", "'three'"]),
    ('[stack]\nkappa = -1\n', ["[stack] kappa must be greater than 0.0", "-1"]),
    ('[stack]\nmethod = "average"\n', ['[stack] method is "average"', '"mean", "kappa-sigma", "median"']),
    ('[watch]\nrecursive = 1\n', ["[watch] recursive must be true or false"]),
    ('[detect]\nmax_stars = 2.5\n', ["[detect] max_stars must be a whole number"]),
    ('[watch]\npatterns = []\n', ["[watch] patterns must be a non-empty list of strings"]),
    ("[stack\n", ["not valid TOML"]),
])
def test_bad_files_are_one_sentence_naming_file_and_key(tmp_path: Path, text: str, words: list[str]) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    message = str(info.value)
    assert message.startswith(str(cfg))
    assert "\n" not in message
    for word in words:
        assert word in message


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "absent.toml")


def test_command_line_overrides_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text('[stack]\nmethod = "median"\n')
    config = load_config(cfg).with_overrides({"stack.method": "mean", "align.reference": None})
    assert config.stack.method == "mean"
    assert config.align.reference == ""
    with pytest.raises(ConfigError, match=r"the command line: \[stack\] method is \"sum\""):
        config.with_overrides({"stack.method": "sum"})


def test_readme_documents_every_key_with_its_default() -> None:
    from livestack.config import _toml_value

    readme = (ROOT / "README.md").read_text()
    config = Config()
    for section in (f.name for f in dataclasses.fields(Config) if f.name != "base"):
        assert f"**[{section}]**" in readme, section
        table = readme.split(f"**[{section}]**", 1)[1].split("**[", 1)[0]
        for f in dataclasses.fields(getattr(config, section)):
            row = next((line for line in table.splitlines() if line.startswith(f"| `{f.name}` |")), None)
            assert row is not None, f"README lacks [{section}] {f.name}"
            default = _toml_value(f.default)
            assert default in row or isinstance(f.default, tuple), (section, f.name, default)


def test_readme_architecture_names_every_module() -> None:
    # Modules inside a client package (tui, web) are named through their package.
    readme = (ROOT / "README.md").read_text()
    package = ROOT / "livestack"
    for path in sorted(package.rglob("*.py")):
        if path.name == "__init__.py" or "__pycache__" in path.parts:
            continue
        name = path.relative_to(package).with_suffix("").as_posix()
        named = {name, name.rsplit("/", 1)[0]} if name.startswith("clients/") else {name}
        assert any(f"`{n}`" in readme for n in named), f"README's architecture section lacks {name}"
