"""`python -m dinov2 --list`: what the names in configs and dataset strings can be.

Architectures, datasets and pipelines are registered by the modules that define them, installed
extensions included, so no file lists them all; this prints each name with the module that
registered it, which is also where to look when a plug-in's name does not show up.
"""
import argparse

from dinov2.data import DATASETS, PIPELINES
from dinov2.models.vision_transformer import ARCHITECTURES
from dinov2.utils.cli import run_cli
from dinov2.utils.registry import Registry

REGISTRIES: tuple[tuple[str, str, Registry], ...] = (
    ("architectures", "student.arch", ARCHITECTURES),
    ("datasets", "first word of a dataset string", DATASETS),
    ("pipelines", "train.pipeline", PIPELINES),
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dinov2", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--list", action="store_true", help="print the registered architectures, datasets and pipelines"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if not args.list:
        parser.error("nothing to do: --list prints what is registered")
    counts = []
    for title, used_as, registry in REGISTRIES:
        names = registry.names()
        width = max(map(len, names), default=0)
        print(f"{title} ({used_as}):")
        for name in names:
            print(f"  {name:<{width}}  {registry.owner(name)}")
        counts.append(f"{len(names)} {title}")
    print(f"registered, installed extensions included: {', '.join(counts)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
