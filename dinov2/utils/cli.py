"""What every command-line tool of the project shares: the entry-point wrapper and the parser
that takes config overrides (`key=value`) anywhere among its flags."""
import argparse
import sys
from typing import Callable, NoReturn, Sequence

from dinov2.utils.errors import UserError


class ConfigArgumentParser(argparse.ArgumentParser):
    """An argument parser whose `key=value` config overrides may come before, between or after
    the flags.

    Upstream collects overrides with `nargs=REMAINDER`, so everything after the first override
    is taken as one: `train.x=1 --output-dir OUT` turned `--output-dir` and OUT into overrides
    and failed much later, and a submitit launcher would even submit the job first. Users write
    both orders, so here the flags are parsed wherever they stand and the remaining words are the
    overrides; a word that is neither a known flag nor `key=value` is refused at once, by name.
    An override's value may itself hold `=` or start with `-` (`optim.min_lr=-1`): only the first
    character of a word decides whether it is a flag. Parsers built with this one as a parent
    need this class too, for the child's `parse_args` is the one that runs.
    """

    def add_overrides(self, help: str = "config overrides, key=value (before, between or after the flags)") -> None:
        self.add_argument("opts", nargs="*", default=[], metavar="KEY=VALUE", help=help)

    def parse_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        parsed = self.parse_intermixed_args(args, namespace)
        stray = [word for word in getattr(parsed, "opts", None) or [] if "=" not in word]
        if stray:
            self.error(f"unrecognized arguments: {' '.join(stray)} (config overrides are written key=value)")
        return parsed


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run `main`; a `UserError` becomes one `error: ...` line on stderr and exit status 2."""
    try:
        status = main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)
