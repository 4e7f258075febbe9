"""The import direction of DESIGN.md §2, read from the source (every import statement, including
those inside functions): ``store`` never imports ``xelion``, ``pipeline`` or ``delivery``; ``admin``
never imports ``xelion.source``, ``pipeline`` or ``delivery.worker``; ``jsontext``, ``events``, ``el``,
``errors`` and ``config`` import nothing of ours but each other's leaves (``el`` reads date-times
with ``events``' parser, ``events`` reads and writes JSON with ``jsontext``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "cti_bridge"

FORBIDDEN = {
    "store": ("cti_bridge.xelion", "cti_bridge.pipeline", "cti_bridge.delivery"),
    "admin": ("cti_bridge.xelion.source", "cti_bridge.pipeline", "cti_bridge.delivery.worker"),
}
# The bottom layer: what each may import of ours.
LEAVES = {
    "jsontext": set(),
    "events": {"cti_bridge.jsontext"},
    "errors": set(),
    "config": {"cti_bridge.errors"},
    "el": {"cti_bridge.el", "cti_bridge.events"},
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "cti_bridge" or name.startswith("cti_bridge.")}


def modules(part: str) -> list[Path]:
    folder = PACKAGE / part
    return sorted(folder.rglob("*.py")) if folder.is_dir() else [PACKAGE / f"{part}.py"]


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_a_layer_does_not_import_what_is_above_it(part: str) -> None:
    wrong = {
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in modules(part)
        for name in imports_of(path)
        if name.startswith(FORBIDDEN[part])
    }
    assert not wrong


@pytest.mark.parametrize("part", sorted(LEAVES))
def test_the_bottom_layer_imports_nothing_of_ours_above_it(part: str) -> None:
    allowed = LEAVES[part]
    wrong = {
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in modules(part)
        for name in imports_of(path)
        if not any(name == a or name.startswith(a + ".") for a in allowed)
        and name != "cti_bridge"  # ``from cti_bridge import __version__`` style: the package itself
    }
    assert not wrong


def test_the_checks_see_imports() -> None:
    """The reader finds imports at module level and inside functions (so the tests above can fail)."""
    found = imports_of(PACKAGE / "store" / "tokens.py") | imports_of(PACKAGE / "app.py")
    assert "cti_bridge.store.db" in found
    assert any(name.startswith("cti_bridge.delivery") for name in found)  # app.py knows everything
