"""What a benchmark prints about the machine it ran on, so its numbers can be compared."""
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (FileNotFoundError, StopIteration):
        return platform.processor() or "unknown"
