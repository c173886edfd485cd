"""The command names users type, `python -m vet_ext.<command>`, wherever their modules live.

Commands are an interface: READMEs, SLURM scripts and users' notes spell them. The modules behind
them live in the layer folders (and may move again), so one meta-path finder maps each command
name to its module: `python -m vet_ext.prepare` runs `vet_ext.ingestion.prepare` as `__main__`,
and `import vet_ext.prepare` returns that same module object, never a second copy.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import CodeType, ModuleType

COMMANDS = {
    "vet_ext.phantoms": "vet_ext.ingestion.phantoms",
    "vet_ext.prepare": "vet_ext.ingestion.prepare",
    "vet_ext.finetune": "vet_ext.downstream.finetune",
    "vet_ext.train_study": "vet_ext.downstream.train_study",
    "vet_ext.eval": "vet_ext.downstream.eval",
    "vet_ext.viz": "vet_ext.downstream.viz",
}


def module_for(name: str) -> str | None:
    """The module a command name (or a name inside a command package) stands for; None if it is no command."""
    for command, module in COMMANDS.items():
        if name == command or name.startswith(command + "."):
            return module + name[len(command) :]
    return None


class _CommandLoader(importlib.abc.Loader):
    def __init__(self, module: str) -> None:
        self.module = module

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        # The import system returns whatever sys.modules holds under the name once this returns.
        sys.modules[module.__name__] = importlib.import_module(self.module)

    def get_code(self, fullname: str) -> CodeType | None:
        """What runpy executes for `python -m <command>`: the real module's code."""
        spec = importlib.util.find_spec(self.module)
        return spec.loader.get_code(self.module)


class _CommandFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        module = module_for(fullname)
        if module is None:
            return None
        real = importlib.util.find_spec(module)
        if real is None:
            return None
        is_package = real.submodule_search_locations is not None
        # The real origin: runpy makes it sys.argv[0] (argparse's program name) and __file__.
        return importlib.machinery.ModuleSpec(fullname, _CommandLoader(module), origin=real.origin, is_package=is_package)


def install() -> None:
    """Put the finder first on sys.meta_path (once), so a command name never resolves to a stray copy."""
    if not any(isinstance(finder, _CommandFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _CommandFinder())
