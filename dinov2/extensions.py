"""Plug-ins: packages that extend dinov2 without dinov2 importing them.

A package declares an entry point in the group "dinov2.extensions"; loading it (and calling it
when it is callable) lets the package register datasets, pipelines and config defaults. This
module sits at the bottom of the import layers so that config handling and data code can both
make sure extensions are loaded before they look anything up.
"""
import importlib.metadata
import warnings

EXTENSIONS_GROUP = "dinov2.extensions"

_loaded = False


def load_extensions() -> None:
    """Import every installed dinov2 extension once per process (calling it if it is callable).

    A broken extension must not stop runs that do not need it, so its failure is a warning.
    """
    global _loaded
    if _loaded:
        return
    _loaded = True
    for entry_point in importlib.metadata.entry_points(group=EXTENSIONS_GROUP):
        try:
            loaded = entry_point.load()
            if callable(loaded):
                loaded()
        except Exception as exc:  # noqa: BLE001 - any failure of a plug-in is reported, not fatal
            warnings.warn(
                f"dinov2 extension '{entry_point.name}' ({entry_point.value}) failed to load: "
                f"{type(exc).__name__}: {exc}",
                RuntimeWarning,
                stacklevel=2,
            )
