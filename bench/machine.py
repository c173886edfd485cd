"""What a benchmark prints about the machine it ran on, so its numbers can be compared."""
import os
import platform
import sys
from types import ModuleType


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (FileNotFoundError, StopIteration):
        return platform.processor() or "unknown"


def print_run_header(library: ModuleType) -> None:
    """The command, the load before it and the machine (with the `library` whose speed it measures)."""
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"load average before: {os.getloadavg()[0]:.2f} (other processes share these cores)")
    versions = f"python {platform.python_version()}, {library.__name__} {library.__version__}"
    print(f"machine: {os.cpu_count()} cores, {cpu_model()}, {versions}")


def print_load_after() -> None:
    """Printed last: a load that rose during the run means other work shared the cores."""
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def print_targets(*targets: tuple[str, bool, str]) -> None:
    """One line of (goal, whether it was met, what was measured): the verdict a reader looks for first."""
    verdicts = [f"{goal} ({'met' if met else 'MISSED'}: {measured})" for goal, met, measured in targets]
    print("target: " + ", ".join(verdicts))
