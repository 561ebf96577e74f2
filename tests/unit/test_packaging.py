"""The installed import names (ferryd, ferry_repair) cover every package folder.

pyproject.toml maps the layout's folders to names no other distribution
installs (DESIGN.md, Layout); setuptools cannot discover packages under a
mapped name, so the list is written out and a new folder must be added there.
"""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _config() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        setuptools: dict[str, object] = tomllib.load(f)["tool"]["setuptools"]
    return setuptools


def test_every_package_folder_is_installed() -> None:
    config = _config()
    mapping = config["package-dir"]
    assert isinstance(mapping, dict)
    expected = set()
    for name, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            expected.add(".".join((name, *parts)))
    packages = config["packages"]
    assert isinstance(packages, list)
    assert expected == set(packages)


def test_layout_folders_are_not_import_names() -> None:
    """No module imports the folder names, which python-daemon also installs."""
    offenders = []
    for path in ROOT.glob("**/*.py"):
        if ".venv" in path.parts or "build" in path.parts:
            continue
        for line in path.read_text().splitlines():
            words = line.split()
            if words[:1] in (["import"], ["from"]) and len(words) > 1:
                top = words[1].split(".")[0]
                if top in ("daemon", "repair_helper"):
                    offenders.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert offenders == []
