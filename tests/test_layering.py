"""The package's layering (docs/DESIGN.md): cli on top; the two stages never import each other;
common imports neither; benchmarks may use both stages but no stage uses benchmarks."""
from __future__ import annotations

import ast
from pathlib import Path

import mealv2

PACKAGE = Path(mealv2.__file__).parent
FORBIDDEN = {  # package -> packages it must not import
    "common": {"stage1_label", "stage2_train", "benchmarks", "cli", "demo"},
    "stage1_label": {"stage2_train", "benchmarks", "demo"},
    "stage2_train": {"stage1_label", "benchmarks", "demo"},
}


def _imported(path: Path) -> set[str]:
    """Top-level mealv2 subpackages/modules that ``path`` imports (relative or absolute)."""
    package = path.relative_to(PACKAGE).parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[:len(package) - node.level + 1])
                parts = base + (node.module.split(".") if node.module else [a.name for a in node.names][:1])
            elif node.module and node.module.startswith("mealv2."):
                parts = node.module.split(".")[1:]
            else:
                continue
        elif isinstance(node, ast.Import):
            parts = next((a.name.split(".")[1:] for a in node.names if a.name.startswith("mealv2.")), [])
        else:
            continue
        if parts:
            found.add(parts[0])
    return found


def test_stages_and_common_keep_their_layers():
    offenders = []
    for package, forbidden in FORBIDDEN.items():
        for path in (PACKAGE / package).rglob("*.py"):
            bad = _imported(path) & forbidden
            if bad:
                offenders.append(f"{path.relative_to(PACKAGE)} imports {sorted(bad)}")
    assert offenders == []


def test_the_checker_sees_relative_imports():
    """_imported must see relative imports (``from ..stage1_label.labeler import x``), or the test above
    proves nothing: `bench label` runs the real labeller, so its module imports stage 1."""
    assert {"common", "stage1_label"} <= _imported(PACKAGE / "benchmarks" / "label.py")
    assert "common" in _imported(PACKAGE / "stage2_train" / "trainer.py")
