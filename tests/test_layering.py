"""The package's layering (docs/DESIGN.md): cli on top; the two stages never import each other;
common imports neither; inside common, store < data < models (each imports only those below it);
the store imports no torch; only commands import click."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mealv2

PACKAGE = Path(mealv2.__file__).parent
FORBIDDEN = {  # folder (relative to the package) -> mealv2 modules it must not import
    "common": {"stage1_label", "stage2_train", "benchmarks", "cli", "demo", "synthetic"},
    "common/store": {"common.data", "common.models"},
    "common/data": {"common.models"},
    "stage1_label": {"stage2_train", "benchmarks", "demo"},
    "stage2_train": {"stage1_label", "benchmarks", "demo"},
}
# Modules that may import click: the click group and its parameter types, the commands, the benchmarks
# (each a command) and the demo command.
CLICK_ALLOWED = ("cli/", "stage1_label/commands.py", "stage1_label/store_commands.py", "stage2_train/commands.py",
                 "stage2_train/evaluate.py", "stage2_train/export.py", "benchmarks/", "demo.py")
NO_TORCH = ("common/store/", "common/errors.py", "common/config.py")


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, as dotted names: mealv2's relative to the package
    (``common.store.objects``), others as written (``torch.nn``)."""
    package = path.relative_to(PACKAGE).parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[:len(package) - node.level + 1])
                found.update(".".join(base + node.module.split(".")) if node.module else ".".join(base + [a.name])
                             for a in node.names)
            elif node.module and node.module.startswith("mealv2."):
                found.add(node.module.removeprefix("mealv2."))
            elif node.module:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("mealv2.") for a in node.names)
    return found


def _hits(names, prefixes) -> list[str]:
    """The names among ``names`` that are one of ``prefixes`` or inside one."""
    return sorted(n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes))


def _modules(folder: str = ""):
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), path


def test_every_package_imports_only_what_is_below_it():
    offenders = []
    for folder, forbidden in FORBIDDEN.items():
        for rel, path in _modules(folder):
            bad = _hits(_imports(path), forbidden)
            if bad:
                offenders.append(f"{rel} imports {bad}")
    assert offenders == []


def test_only_commands_import_click_and_the_store_imports_no_torch():
    offenders = []
    for rel, path in _modules():
        names = _imports(path)
        if _hits(names, ["click"]) and not rel.startswith(CLICK_ALLOWED):
            offenders.append(f"{rel} imports click")
        if rel.startswith(NO_TORCH) and _hits(names, ["torch", "timm", "torchvision", "nvidia"]):
            offenders.append(f"{rel} imports torch")
    assert offenders == []


def test_the_checker_sees_relative_imports():
    """_imports must resolve relative imports (``from ..stage1_label.labeler import x``), or the tests
    above prove nothing: `bench label` runs the real labeller, so its module imports stage 1."""
    assert _hits(_imports(PACKAGE / "benchmarks" / "label.py"), ["stage1_label"])
    assert "common.store.objects" in _imports(PACKAGE / "common" / "store" / "lease.py")
    assert _hits(_imports(PACKAGE / "common" / "data" / "dataset.py"), ["common.store"])
    assert _hits(_imports(PACKAGE / "stage1_label" / "commands.py"), ["click"])


def test_importing_the_store_loads_neither_torch_nor_click():
    """`inspect` and `verify` (without --data) read stores through this package; it must stay light."""
    code = ("import sys, mealv2.common.store.label_store, mealv2.common.store.objects, mealv2.common.store.lease; "
            "print(sorted(m for m in ('torch', 'click', 'timm', 'nvidia.dali') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
