"""The layering rules of DESIGN.md, read off the source, and the command names users type.

A misplaced import does not fail any other test until the day it makes a cycle or drags CUDA
code into the ingestion workers, so the rules are checked here, on every module.
"""
import ast
import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vet_ext.commands import COMMANDS, module_for

ROOT = Path(__file__).resolve().parents[1]
VET_LAYERS = ("ingestion", "pretraining", "downstream")  # each may import only itself and those before it
DOCUMENTED = [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "docs").glob("*.md")),
              *sorted((ROOT / "slurm").glob("*")), *sorted((ROOT / "configs").rglob("*.yaml")),
              *sorted((ROOT / "bench").glob("*.py"))]  # fmt: skip


def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports, lazily imported ones (inside functions) included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _part(path: Path, package: str) -> str:
    """The first folder (or top-level module) under `package` a file belongs to."""
    relative = path.relative_to(ROOT / package)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def test_dinov2_never_imports_vet_ext():
    offenders = [f"{p.relative_to(ROOT)}: {m}" for p in _modules("dinov2") for m in _imports(p) if m.startswith("vet_ext")]
    assert not offenders, offenders


def test_dinov2_packages_import_each_other_without_cycles():
    graph: dict[str, set[str]] = {}
    for path in _modules("dinov2"):
        source = _part(path, "dinov2")
        targets = {m.split(".")[1] for m in _imports(path) if m.startswith("dinov2.")}
        graph.setdefault(source, set()).update(targets - {source})

    def cycle_from(node: str, stack: list[str]) -> list[str] | None:
        if node in stack:
            return stack[stack.index(node) :] + [node]
        for target in sorted(graph.get(node, ())):
            found = cycle_from(target, stack + [node])
            if found:
                return found
        return None

    for package in sorted(graph):
        cycle = cycle_from(package, [])
        assert cycle is None, "dinov2 import cycle: " + " -> ".join(cycle)


def test_vet_ext_layers_import_downwards_only():
    offenders = []
    for path in _modules("vet_ext"):
        layer = _part(path, "vet_ext")
        if layer not in VET_LAYERS:
            continue  # plugins, commands, demo: the top, free to use every layer
        allowed = VET_LAYERS[: VET_LAYERS.index(layer) + 1]
        for name in _imports(path):
            if not name.startswith("vet_ext."):
                continue
            target = name.split(".")[1]
            if target not in allowed:
                offenders.append(f"{path.relative_to(ROOT)} ({layer}) imports {name}")
    assert not offenders, offenders


def test_code_imports_modules_by_their_real_paths():
    """Command names are for people; code that used them would hide where a module lives."""
    offenders = [f"{p.relative_to(ROOT)}: {m}" for package in ("vet_ext", "bench", "tests") for p in _modules(package)
                 for m in _imports(p) if module_for(m) is not None]  # fmt: skip
    assert not offenders, offenders


def test_command_names_are_the_real_modules():
    for command, module in COMMANDS.items():
        assert importlib.import_module(command) is importlib.import_module(module), command
    suite = importlib.import_module("vet_ext.eval.suite")
    assert suite is importlib.import_module("vet_ext.downstream.eval.suite")
    assert module_for("vet_ext.viz.__main__") == "vet_ext.downstream.viz.__main__"
    assert module_for("vet_ext.demo") is None and module_for("vet_ext.prepared") is None


def test_every_documented_command_resolves():
    """Each `python -m vet_ext.X` / `python -m dinov2.X` written in the docs names a runnable module."""
    commands = set()
    for path in DOCUMENTED:
        if path.is_file():
            commands.update(re.findall(r"-m ((?:vet_ext|dinov2)(?:\.\w+)*)(?=[\s`'\")\],]|$)", path.read_text(encoding="utf-8")))
    assert {"vet_ext.prepare", "vet_ext.viz", "vet_ext.demo"} <= commands
    for command in sorted(commands):
        spec = importlib.util.find_spec(command)
        assert spec is not None, f"documented command python -m {command} names no module"
        if spec.submodule_search_locations is not None:
            assert importlib.util.find_spec(command + ".__main__") is not None, f"python -m {command}: no __main__"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["vet_ext.prepare", "vet_ext.viz", "vet_ext.eval.suite"])
def test_command_runs_as_main(command):
    result = subprocess.run([sys.executable, "-m", command, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m {command}"), result.stdout[:200]
