"""The house rule: data flows one way. A module of moeprune imports (at module level or inside a
function) only the units listed before its own in `LAYERS`; README's Development section shows
the same order."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "moeprune"
# bottom to top
LAYERS = [
    "errors", "interrupts", "quiet", "registry", "preflight", "arch", "plan", "data", "observe", "criteria",
    "surgery", "fitness", "racing", "evolve", "allocate", "merge", "evaluate", "report", "recipe", "execute",
    "pipelines", "testbed", "demo", "api", "cli",
]  # fmt: skip


def _unit(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> set[str]:
    """moeprune units that `path` imports (relative or absolute)."""
    package = list(path.relative_to(ROOT).parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            target = base + [p for p in (node.module or "").split(".") if p]
            names = target[:1] or [a.name for a in node.names]
            found.update(names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moeprune."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("moeprune."))
    return found


def test_every_unit_is_in_the_layer_order():
    units = {_unit(p) for p in ROOT.rglob("*.py")} - {"__init__"}
    assert units == set(LAYERS), units ^ set(LAYERS)


def test_no_module_imports_a_unit_above_its_own():
    wrong = []
    for path in ROOT.rglob("*.py"):
        unit = _unit(path)
        if unit == "__init__":  # the package root re-exports the public names
            continue
        for target in _imports(path) - {unit, "__version__"}:
            if LAYERS.index(target) > LAYERS.index(unit):
                wrong.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not wrong, wrong
