"""The layering rule: `modeling/` imports neither `trainer/` nor `data_prep/`; `data_prep/` never imports
`trainer/` (checked on every import statement of their files, also those inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"modeling": ("visprune.trainer", "visprune.data_prep"), "data_prep": ("visprune.trainer",)}


def imported_modules(path: Path) -> list[str]:
    """Absolute names of every module `path` imports (relative imports resolved against its package)."""
    package = ["visprune", *path.relative_to(ROOT).parent.parts]
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_never_import_higher_ones(layer):
    bad = [f"{path.relative_to(ROOT)}: {name}" for path in sorted((ROOT / layer).rglob("*.py"))
           for name in imported_modules(path) if name.startswith(FORBIDDEN[layer])]
    assert not bad, bad
    assert imported_modules(ROOT / "data_prep" / "check.py")  # the walk sees imports at all
