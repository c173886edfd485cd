"""`training_metrics.json`: one JSON object per logged iteration, as upstream writes it.

Values are window medians (window 20) of per-iteration scalars, like upstream's metric logger.
Per-iteration values stay tensors until a logging iteration, so the training step does not
wait on the GPU for numbers nobody reads.
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict, deque
from pathlib import Path

import torch

from dinov2.utils.io import atomic_write_text


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """Every logged iteration of a `training_metrics.json`, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class MetricsLog:
    def __init__(self, path: str | Path, window: int = 20) -> None:
        self.path = Path(path)
        self.window = window
        self._values: dict[str, deque] = defaultdict(lambda: deque(maxlen=window))

    def truncate_after(self, iteration: int) -> None:
        """On resume, drop lines logged after the checkpoint we restart from (they will be redone)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["iteration"] <= iteration]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))  # a crash here must not lose the log

    def update(self, **values: float | torch.Tensor) -> None:
        for name, value in values.items():
            self._values[name].append(value.detach() if isinstance(value, torch.Tensor) else value)

    def medians(self) -> dict[str, float]:
        out = {}
        for name, values in self._values.items():
            # torch's median (upstream's) takes the lower middle value of an even window
            out[name] = statistics.median_low(float(v) for v in values)
        return out

    def write(self, iteration: int, **extra: float) -> dict[str, float]:
        record = {"iteration": iteration, **extra, **self.medians()}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        return record
