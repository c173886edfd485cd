"""Run logging: a `dinov2` logger to the console and OUTPUT/logs, rank 0 loud and others quiet."""
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from dinov2.distributed import get_global_rank


class _TqdmHandler(logging.StreamHandler):
    """Console messages printed above a running progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(output_dir: str | Path | None = None, level: int = logging.INFO) -> logging.Logger:
    logger = logging.getLogger("dinov2")
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    rank = get_global_rank()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if rank == 0:
        console = _TqdmHandler(sys.stderr)
        console.setFormatter(fmt)
        console.setLevel(logging.WARNING)  # the progress bar carries routine progress
        logger.addHandler(console)
    if output_dir:
        log_dir = Path(output_dir) / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        name = "log.txt" if rank == 0 else f"log.txt.rank{rank}"
        file_handler = logging.FileHandler(log_dir / name)
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    return logger
