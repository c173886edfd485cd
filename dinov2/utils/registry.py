"""Name -> object registries (architectures, datasets, pipelines), open to plug-ins.

Configs and command lines name what to build ("vit_small", "VetStudies:root=DATA", "multiview");
the code behind a name is registered once, by the module that defines it, and found at run time,
so adding one never means editing a table elsewhere. Two modules claiming one name is a mistake
that would otherwise silently make one of them unreachable, hence an error unless replacing is
asked for. Every read loads the installed extensions first, so a plug-in's entries are visible
to any dinov2 command that looks a name up.
"""
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar, overload

from dinov2.extensions import load_extensions
from dinov2.utils.errors import UserError

T = TypeVar("T")


def _definition(obj: object) -> tuple[str, str] | None:
    """Where `obj` is defined (qualified name, source file), when that can be told."""
    try:
        return obj.__qualname__, inspect.getfile(obj)
    except (AttributeError, TypeError):
        return None


def _module_of(obj: object) -> str:
    return getattr(obj, "__module__", None) or "unknown module"


class Registry(Generic[T]):
    """Names of one kind of thing (`kind`, e.g. "architecture", as error messages call it)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    @overload
    def register(self, name: str, obj: None = None, *, replace: bool = False) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T, *, replace: bool = False) -> T: ...

    def register(self, name: str, obj: T | None = None, *, replace: bool = False) -> T | Callable[[T], T]:
        """Register `obj` under `name`, or, without `obj`, return a decorator that does.

        The same definition registered again is not a duplicate: `python -m` re-runs a module that
        its package already imported (to register its contents) as `__main__`.
        """
        if obj is None:
            return lambda decorated: self.register(name, decorated, replace=replace)
        if name in self._entries and not replace:
            existing = self._entries[name]
            if _definition(existing) is None or _definition(existing) != _definition(obj):
                raise UserError(
                    f"{self.kind} '{name}' is already registered (by {_module_of(existing)}); "
                    "pass replace=True to replace it"
                )
        self._entries[name] = obj
        return obj

    def owner(self, name: str) -> str:
        """The module that registered `name`: what a user needs to find a clash or a plug-in's entry."""
        return _module_of(self.lookup(name))

    def lookup(self, name: str, *, what: str | None = None, where: str = "") -> T:
        """The object registered as `name`; an unknown name is a one-line error listing the known ones.

        `what` names the setting the name came from when that says more than the kind
        ("train.pipeline"), `where` adds where it was found (" in 'DATASET-STRING'").
        """
        load_extensions()
        if name not in self._entries:
            raise UserError(f"unknown {what or self.kind} '{name}'{where}; known: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        """Every registered name, extensions' included, sorted."""
        load_extensions()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        load_extensions()
        return name in self._entries

    @contextmanager
    def scope(self) -> Iterator[None]:
        """Undo, on leaving the block, whatever it registered or replaced (tests must leave no trace).

        Extensions are loaded on entry, so that their first loading, if it happened inside, is not
        undone with the block's own entries.
        """
        load_extensions()
        saved = dict(self._entries)
        try:
            yield
        finally:
            self._entries = saved

    @contextmanager
    def temporarily(self, name: str, obj: T, *, replace: bool = False) -> Iterator[T]:
        """`obj` registered as `name` for the block only."""
        with self.scope():
            self.register(name, obj, replace=replace)
            yield obj
