"""Every `path.py:Name` or `path.py:Class.method` that docs/architecture.md cites exists.

The contributor map must not rot when code moves: each citation is looked up in the file's AST
(a module-level function or class, or a method of that class).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
CITATION = re.compile(r"`([\w/]+\.py):([A-Za-z_][\w.]*)`")


def _citations() -> list[tuple[str, str]]:
    return sorted(set(CITATION.findall(DOC.read_text(encoding="utf-8"))))


def _defines(path: Path, dotted: str) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    scope: list[ast.stmt] = tree.body
    for part in dotted.split("."):
        found = [
            node
            for node in scope
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            and node.name == part
        ]
        if not found:
            return False
        scope = found[0].body
    return True


def test_the_architecture_doc_cites_something() -> None:
    assert len(_citations()) >= 10


@pytest.mark.parametrize(("path", "name"), _citations())
def test_each_cited_function_exists(path: str, name: str) -> None:
    file = ROOT / path
    assert file.is_file(), f"docs/architecture.md cites {path}, which does not exist"
    assert _defines(file, name), f"docs/architecture.md cites {path}:{name}, not defined there"


def test_a_wrong_citation_is_caught(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("class A:\n    def b(self) -> None: ...\n\ndef c() -> None: ...\n")
    assert _defines(module, "A.b") and _defines(module, "c")
    assert not _defines(module, "A.c") and not _defines(module, "b")
