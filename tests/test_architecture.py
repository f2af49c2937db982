"""The package's layering (docs/ARCHITECTURE.md): imports flow down, never up, and never in a circle.

Read from the source (every ``import`` statement, module-level or inside a function), so a lazy
import that climbs a layer is caught too.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PKG = SRC / "qflash"

# module prefix -> modules it must never import (prefixes)
FORBIDDEN = {
    "qflash.config": ("qflash.spec", "qflash.kernels", "qflash.ops", "qflash.autograd", "qflash.api", "qflash.dropin"),
    "qflash.quant": ("qflash.spec", "qflash.kernels", "qflash.ops", "qflash.autograd", "qflash.api", "qflash.dropin"),
    "qflash.reference": ("qflash.kernels", "qflash.ops", "qflash.autograd", "qflash.api", "qflash.dropin"),
    "qflash.spec": ("qflash.kernels", "qflash.ops", "qflash.autograd", "qflash.api", "qflash.dropin"),
    "qflash.kernels": ("qflash.spec", "qflash.ops", "qflash.autograd", "qflash.api", "qflash.dropin",
                       "qflash.sage_compat", "qflash.integrations", "qflash.bench", "qflash.cli", "qflash.fused"),
    "qflash.fused": ("qflash.ops", "qflash.autograd", "qflash.api", "qflash.dropin", "qflash.integrations",
                     "qflash.bench"),
    "qflash.autograd": ("qflash.ops", "qflash.api", "qflash.dropin", "qflash.integrations", "qflash.bench"),
    "qflash.ops": ("qflash.api", "qflash.dropin", "qflash.integrations", "qflash.bench", "qflash.cli"),
    "qflash.api": ("qflash.dropin", "qflash.integrations", "qflash.bench", "qflash.cli"),
    "qflash.dropin": ("qflash.integrations", "qflash.bench", "qflash.cli"),
    "qflash.integrations": ("qflash.bench", "qflash.cli"),
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """qflash modules that ``name`` imports (resolved; ``from pkg import sub`` -> ``pkg.sub``)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in mods)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base[: len(base) - (node.level - 1)]
                mod = ".".join(pkg + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                if sub in mods:
                    out.add(sub)  # "from pkg import sub": the submodule
                elif mod in mods:
                    out.add(mod)  # "from mod import name"
    out.discard(name)
    return {m for m in out if m.startswith("qflash")}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def test_no_module_imports_a_layer_above_it(graph):
    bad = []
    for name, deps in graph.items():
        for prefix, forbidden in FORBIDDEN.items():
            if name == prefix or name.startswith(prefix + "."):
                bad += [f"{name} -> {d}" for d in deps if any(d == f or d.startswith(f + ".") for f in forbidden)]
    assert not bad, "imports that climb a layer:\n" + "\n".join(sorted(bad))


def test_no_import_cycles(graph):
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_every_family_is_registered_and_declares_support():
    from qflash.kernels import dispatch
    from qflash.kernels.family import FamilySupport

    kernels = PKG / "kernels"
    packages = sorted(p.name for p in kernels.iterdir() if (p / "__init__.py").is_file())
    assert set(packages) <= set(dispatch.FAMILIES), (packages, sorted(dispatch.FAMILIES))
    assert list(dispatch.FAMILIES)[-1] == "reference"  # auto's last resort supports everything
    for fam in dispatch.FAMILIES.values():
        assert isinstance(fam.support, FamilySupport)
        for meth in ("supports", "forward", "backward", "tuning"):
            assert callable(getattr(fam, meth)), (fam.name, meth)


def test_library_core_has_no_harness_code():
    """The timing harness lives in qflash.bench, pre-attention kernels in qflash.fused."""
    assert not (PKG / "integrations" / "flux_timing.py").exists()
    assert not (PKG / "kernels" / "prequant.py").exists()
    text = "".join(p.read_text() for p in PKG.rglob("*.py") if "bench" not in p.parts)
    assert "DESIGN.md" not in text.replace("docs/ARCHITECTURE.md", "")


if os.environ.get("QFLASH_PRINT_IMPORT_GRAPH"):  # debugging aid
    def test_print_graph(graph):
        for n in sorted(graph):
            print(n, "->", ", ".join(sorted(graph[n])))
