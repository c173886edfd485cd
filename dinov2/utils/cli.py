"""Entry-point wrapper shared by every command-line tool of the project."""
import sys
from typing import Callable, NoReturn

from dinov2.utils.errors import UserError


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
