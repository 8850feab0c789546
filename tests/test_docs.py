"""docs/architecture.md names only what exists: every `module.Name[.attr]` in its
"Follow one run" walk, and every module in its table, is checked against the code."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import worker

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def test_follow_one_run_names_exist() -> None:
    text = DOC.read_text()
    walk = text[text.index("## Follow one run") : text.index("Changes from DESIGN.md")]
    refs = set(re.findall(r"`([a-z_]+(?:\.[A-Za-z_]+)+)`", walk))
    assert len(refs) > 20
    for ref in sorted(refs):
        module_name, *attrs = ref.split(".")
        module = importlib.import_module(f"worker.{module_name}")
        obj: object = module
        for attr in attrs:
            fields = {a.name for a in getattr(obj, "__attrs_attrs__", ())}  # attrs fields: not on the class
            assert hasattr(obj, attr) or attr in fields, f"{ref} in docs/architecture.md does not exist"
            obj = getattr(obj, attr, None)


def test_module_table_lists_every_module() -> None:
    text = DOC.read_text()
    listed = set(re.findall(r"^\| `([a-z_]+)\.py` \|", text, re.M))
    actual = {p.stem for p in Path(worker.__file__).parent.glob("*.py") if not p.stem.startswith("_")}
    assert listed == actual
