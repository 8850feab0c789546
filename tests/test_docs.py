"""docs/architecture.md names only what exists: every `module.Name[.attr]` in its
"Follow one run" walk, and every package and module in its package table, is checked
against the code."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from types import ModuleType

import worker

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
PACKAGE = Path(worker.__file__).parent


def module_named(name: str) -> ModuleType:
    """``worker.<package>.<name>``: the walk names modules by their file's name, which is
    unique across the packages."""
    (found,) = PACKAGE.glob(f"*/{name}.py")
    return importlib.import_module(f"worker.{found.parent.name}.{name}")


def test_follow_one_run_names_exist() -> None:
    text = DOC.read_text()
    walk = text[text.index("## Follow one run") : text.index("Changes from DESIGN.md")]
    refs = set(re.findall(r"`([a-z_]+(?:\.[A-Za-z_]+)+)`", walk))
    assert len(refs) > 20
    for ref in sorted(refs):
        module_name, *attrs = ref.split(".")
        obj: object = module_named(module_name)
        for attr in attrs:
            fields = {a.name for a in getattr(obj, "__attrs_attrs__", ())}  # attrs fields: not on the class
            assert hasattr(obj, attr) or attr in fields, f"{ref} in docs/architecture.md does not exist"
            obj = getattr(obj, attr, None)


def test_module_names_are_unique_across_packages() -> None:
    stems = [p.stem for p in PACKAGE.glob("*/*.py") if not p.stem.startswith("_")]
    assert len(stems) == len(set(stems))


def test_package_table_lists_every_package_and_module() -> None:
    text = DOC.read_text()
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| [^|]+ \| ([^|]+) \|", text, re.M))
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert set(rows) == packages
    for package, modules in rows.items():
        listed = set(re.findall(r"`([a-z_]+)\.py`", modules))
        actual = {p.stem for p in (PACKAGE / package).glob("*.py") if not p.stem.startswith("_")}
        assert listed == actual, f"worker/{package}/"
