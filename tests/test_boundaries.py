"""Architecture rules that keep the packages apart."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("doppel", "data", "consent", "trainer", "inference", "models", "bot")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_bot_imports_discord() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for pkg in PACKAGES
        if pkg != "bot"
        for path in (ROOT / pkg).rglob("*.py")
        if "discord" in _imports(path)
    ]
    assert offenders == []


def test_boundary_check_sees_an_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from discord import app_commands\n", encoding="utf-8")
    assert "discord" in _imports(probe)


def test_every_module_uses_postponed_annotations() -> None:
    missing = [
        str(path.relative_to(ROOT))
        for pkg in PACKAGES
        for path in (ROOT / pkg).rglob("*.py")
        if path.read_text(encoding="utf-8").strip()
        and "from __future__ import annotations" not in path.read_text(encoding="utf-8")
    ]
    assert missing == []
