"""Training checkpoints in upstream's file layout, written atomically, read without pickle code.

Layout in OUTPUT: `model_{iteration:07d}.rank_{r}.pth` (the newest `max_to_keep` kept),
`model_final.rank_{r}.pth`, and `last_checkpoint.rank_{r}` naming the newest file, so
upstream's tools find them. A file holds {"model", "optimizer", "iteration"} like upstream's,
plus "grad_scaler" when one is used. A run killed while saving leaves the previous checkpoint
and the pointer to it untouched, because both are replaced only once fully written.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from dinov2.utils.errors import UserError

logger = logging.getLogger("dinov2")


def _temp_beside(path: Path) -> tuple[int, str]:
    """A temporary file next to `path` (same file system, so os.replace is atomic), umask-respecting."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    path = Path(path)
    fd, tmp = _temp_beside(path)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_torch_file(path: str | os.PathLike) -> Any:
    """Tensors and plain containers only: a pickled file from elsewhere cannot run code here."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint file not found: {path}") from None
    except Exception as exc:  # a truncated, foreign or code-carrying pickle
        raise UserError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None


class Checkpointer:
    def __init__(self, output_dir: str | os.PathLike, rank: int = 0, max_to_keep: int = 3) -> None:
        self.output_dir = Path(output_dir)
        self.rank = rank
        self.max_to_keep = max_to_keep

    @property
    def pointer(self) -> Path:
        return self.output_dir / f"last_checkpoint.rank_{self.rank}"

    def path_for(self, iteration: int | None) -> Path:
        tag = "final" if iteration is None else f"{iteration:07d}"
        return self.output_dir / f"model_{tag}.rank_{self.rank}.pth"

    def save(self, state: dict[str, Any], iteration: int, final: bool = False) -> Path:
        path = self.path_for(None if final else iteration)
        atomic_torch_save({**state, "iteration": iteration}, path)
        atomic_write_text(path.name, self.pointer)
        self._prune()
        logger.info("saved checkpoint %s", path)
        return path

    def _prune(self) -> None:
        periodic = sorted(self.output_dir.glob(f"model_[0-9]*.rank_{self.rank}.pth"))
        for old in periodic[: max(0, len(periodic) - self.max_to_keep)]:
            old.unlink(missing_ok=True)

    def last_checkpoint(self) -> Path | None:
        if not self.pointer.exists():
            return None
        path = self.output_dir / self.pointer.read_text().strip()
        if not path.exists():
            raise UserError(f"{self.pointer} names {path.name}, which does not exist; remove the file or use --no-resume")
        return path

    def load(self, path: str | os.PathLike) -> dict[str, Any]:
        state = load_torch_file(path)
        if not isinstance(state, dict) or "model" not in state:
            raise UserError(f"{path} is not a training checkpoint (no 'model' entry)")
        return state


def export_teacher(output_dir: str | os.PathLike, tag: str, teacher_state: dict[str, torch.Tensor]) -> Path:
    """Upstream's eval export: `eval/<tag>/teacher_checkpoint.pth` = {"teacher": state dict}."""
    path = Path(output_dir) / "eval" / tag / "teacher_checkpoint.pth"
    atomic_torch_save({"teacher": teacher_state}, path)
    return path
