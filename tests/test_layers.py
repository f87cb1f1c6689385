"""The package's layers: imports point down only, and no module imports a project module inside a function.

Layers, bottom to top (docs/design.md): core (kernels, affinity, filters, spectral, spectral_filters, blocks,
presets, reference, compat, profiling) < models, data, integrations < runs < train, analysis, bench < apps < cli. A
module may import its own layer or a lower one; ``models``, ``data`` and ``integrations`` do not import each other
(``integrations``, the blocks inside other frameworks, imports the core only, and nothing imports it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "nonlocalnet"

CORE = {"registry", "kernels", "affinity", "filters", "spectral", "spectral_filters", "blocks", "presets", "reference",
        "testing", "compat",
        "profiling", "__init__"}
LEVEL = {"models": 1, "data": 1, "integrations": 1, "runs": 2, "train": 3, "analysis": 3, "bench": 3, "apps": 4,
         "cli": 5, "__main__": 6}


def _unit(module: str) -> str:
    """``nonlocalnet.runs.build`` -> ``runs``; core modules -> ``core``."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    return "core" if top in CORE else top


def _level(unit: str) -> int:
    return 0 if unit == "core" else LEVEL[unit]


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__") if rel.name == "__init__" else ".".join(rel.parts)
        out.append((name, path))
    return out


def _imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """``(imported project module, line, inside a function)`` for every import of ``nonlocalnet``."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.split(".")[0] == "nonlocalnet":
                        found.append((a.name, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".")
                    base = base if is_pkg else base[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                if mod.split(".")[0] == "nonlocalnet":
                    targets = [mod] if child.module else [f"{mod}.{a.name}" for a in child.names]
                    found.extend((t, child.lineno, in_function) for t in targets)
            visit(child, inner)

    visit(tree, False)
    return found


MODULES = _modules()

# The one exception to "no import inside a function": an optional extra, imported lazily where it is used, with a
# comment on the import line saying so. {module: extra}.
# (integrations/openmmlab.py imports mmengine, the extra 'openmmlab', at its top in a try: importing that module
# is what asks for it.)
OPTIONAL_EXTRAS = {"torchvision": "vision", "timm": "vision", "torch.utils.tensorboard": "tensorboard"}
# bench/peers.py: the public modules `bench --baseline peers` times (timm, mmcv-lite, mmsegmentation), the extra
# 'peers'.
OPTIONAL_EXTRAS.update({"timm": ("vision", "peers"), "mmcv": "peers", "mmseg.models.decode_heads": "peers",
                        "mmengine.registry": "peers"})


def _function_imports(path: Path) -> list[tuple[str, int, str]]:
    """``(module, line, source line)`` of every import statement inside a function."""
    lines = path.read_text().splitlines()
    found = []
    for fn in ast.walk(ast.parse(path.read_text())):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    found.extend((a.name, node.lineno, lines[node.lineno - 1]) for a in node.names)
                elif isinstance(node, ast.ImportFrom):
                    found.append(("." * node.level + (node.module or ""), node.lineno, lines[node.lineno - 1]))
    return found


@pytest.mark.parametrize("name,path", MODULES, ids=[m for m, _ in MODULES])
def test_imports_point_down(name, path):
    here = _unit(name)
    for target, line, in_function in _imports(name, path):
        there = _unit(target)
        assert not in_function, f"{name}:{line} imports {target} inside a function (import it at the top)"
        if there == here or there == "core" and here == "core":
            continue
        assert _level(there) < _level(here), (
            f"{name}:{line} imports {target}: layer {here!r} (level {_level(here)}) may not import "
            f"{there!r} (level {_level(there)})")


@pytest.mark.parametrize("name,path", MODULES, ids=[m for m, _ in MODULES])
def test_function_level_imports_are_optional_extras(name, path):
    for module, line, source in _function_imports(path):
        assert module in OPTIONAL_EXTRAS, (
            f"{name}:{line} imports {module} inside a function; only the optional extras "
            f"{sorted(OPTIONAL_EXTRAS)} may be imported lazily")
        extras = OPTIONAL_EXTRAS[module] if isinstance(OPTIONAL_EXTRAS[module], tuple) else (OPTIONAL_EXTRAS[module],)
        assert "optional" in source and any(e in source for e in extras), (
            f"{name}:{line}: a lazy import of {module} needs a comment naming the optional extra "
            f"{OPTIONAL_EXTRAS[module]!r}: {source.strip()}")


def test_every_layer_is_known():
    units = {_unit(name) for name, _ in MODULES}
    assert units <= {"core", *LEVEL}, units - {"core", *LEVEL}
    assert {"runs", "train", "analysis", "bench", "apps", "cli", "integrations"} <= units


def test_integrations_import_core_only_and_nothing_imports_them():
    for name, path in MODULES:
        targets = {_unit(t) for t, _, _ in _imports(name, path)}
        if _unit(name) == "integrations":
            assert targets <= {"core", "integrations"}, (name, targets)
        else:
            assert "integrations" not in targets, f"{name} imports nonlocalnet.integrations (an optional top layer)"


def test_one_entry_point():
    assert not (PKG / "cli_train.py").exists() and not (PKG / "bench" / "__main__.py").exists()
    assert "from nonlocalnet.cli import main" in (PKG / "__main__.py").read_text()
