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


def test_analysis_import_does_not_import_torch():
    code = "import sys, analysis; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
