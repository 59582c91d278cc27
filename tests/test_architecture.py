"""The import arrows of DESIGN.md, enforced.

experiments -> {vradam, eos_toolkit, analysis}; analysis -> eos_toolkit.record
only; vradam and eos_toolkit never import each other; analysis does not import
torch when it is imported.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vradam", "eos_toolkit", "experiments", "analysis")

# package -> packages of this project it must not import (at any depth)
FORBIDDEN = {
    "vradam": {"eos_toolkit", "experiments", "analysis"},
    "eos_toolkit": {"vradam", "experiments", "analysis"},
    "analysis": {"vradam", "experiments"},
    "experiments": set(),
}


def _imported_top_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_import_arrows(package):
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = _imported_top_modules(path) & FORBIDDEN[package]
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, "\n".join(offenders)


def test_vradam_imports_torch_only():
    # The optimizer could ship alone: the standard library, torch, and triton for the fused path.
    allowed = set(sys.stdlib_module_names) | {"torch", "triton", "vradam"}
    offenders = []
    for path in sorted((ROOT / "vradam").rglob("*.py")):
        bad = _imported_top_modules(path) - allowed
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, "\n".join(offenders)


def test_the_optimizer_package_is_testable_alone():
    """vradam could ship alone, so its tests import nothing of the other packages."""
    forbidden = {"eos_toolkit", "experiments", "analysis"}
    offenders = []
    for path in sorted((ROOT / "tests" / "vradam").rglob("*.py")):
        bad = _imported_top_modules(path) & forbidden
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, "\n".join(offenders)


def _module_imports(path: Path, package_root: Path) -> set[str]:
    """The project modules a file imports (absolute and relative), as dotted names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = path.relative_to(package_root).with_suffix("").parts
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = here[:len(here) - node.level]  # "." is the package the file is in
                base = ".".join([*parent, *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def test_no_import_circles_between_modules():
    """No two modules of the project import each other, directly or through others (package faces aside)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    graph = {name: {m for m in _module_imports(path, ROOT) if m in modules and m != name
                    and not modules[m].name == "__init__.py"}
             for name, path in modules.items() if path.name != "__init__.py"}
    circles, state = [], {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, "\n".join(circles)


def test_analysis_import_does_not_import_torch():
    code = "import sys, analysis; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
