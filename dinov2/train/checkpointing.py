"""Training checkpoints in upstream's file layout, written atomically, readable on any world size.

Layout in OUTPUT, for single-process and DDP runs: `model_{iteration:07d}.rank_0.pth` (the newest
`max_to_keep` kept) and `model_final.rank_0.pth`, whole tensors written by rank 0. FSDP runs
write a torch.distributed.checkpoint folder instead, `model_{iteration:07d}/` (or `model_final/`)
with its `.metadata` and one shard file per rank. Either way `last_checkpoint.rank_0` names the
newest checkpoint. Upstream keeps one shard file and one pointer per rank, which ties a run to
its world size; here one pointer serves every rank and both forms load into any number of
processes with any strategy, because keys and optimizer state are stored by parameter name.

A checkpoint holds {"model", "optimizer", "iteration"} like upstream's, plus "grad_scaler" when
one is used. A run killed while saving leaves the previous checkpoint and the pointer to it
untouched: files and folders are written under a temporary name and renamed once complete.
"""
from __future__ import annotations

import logging
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner

from dinov2 import distributed
from dinov2.fsdp import load_full_module_state, module_shapes
from dinov2.models.weights import state_differences
from dinov2.utils.errors import UserError
from dinov2.utils.io import atomic_write, atomic_write_text

logger = logging.getLogger("dinov2")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    atomic_write(path, lambda file: torch.save(obj, file))


def load_torch_file(path: str | os.PathLike) -> Any:
    """Tensors and plain containers only: a pickled file from elsewhere cannot run code here.

    The file is memory-mapped rather than read into memory: when every rank of a sharded (FSDP)
    run resumes from one whole checkpoint, the ranks of a node share its pages through the page
    cache instead of each holding a private copy of all of it, and a tensor's bytes are read only
    when it is copied into the model or optimizer. Every file `torch.save` writes (a zip archive
    since torch 1.6) can be mapped.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint file not found: {path}") from None
    except Exception as exc:  # a truncated, foreign or code-carrying pickle
        if not zipfile.is_zipfile(path):  # torch's own words for it are a bare seek or miniz error
            reason = "not a complete zip archive as torch.save writes (truncated, or another format)"
        else:
            reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        raise UserError(f"cannot read checkpoint {path}: {reason}") from None


class Checkpointer:
    """Saves and finds training checkpoints; call its methods on every rank (they synchronise)."""

    def __init__(self, output_dir: str | os.PathLike, rank: int = 0, max_to_keep: int = 3) -> None:
        self.output_dir = Path(output_dir)
        self.rank = rank
        self.max_to_keep = max_to_keep

    @property
    def pointer(self) -> Path:
        return self.output_dir / "last_checkpoint.rank_0"

    def path_for(self, iteration: int | None, sharded: bool = False) -> Path:
        tag = "final" if iteration is None else f"{iteration:07d}"
        return self.output_dir / (f"model_{tag}" if sharded else f"model_{tag}.rank_0.pth")

    def save(self, state: dict[str, Any], iteration: int, final: bool = False) -> Path:
        """Whole-tensor state (complete on rank 0, which alone writes it)."""
        path = self.path_for(None if final else iteration)
        if self.rank == 0:
            atomic_torch_save({**state, "iteration": iteration}, path)
            self._publish(path)
        distributed.barrier()
        return path

    def save_sharded(self, state: dict[str, Any], iteration: int, final: bool = False) -> Path:
        """Each rank's shards into one torch.distributed.checkpoint folder."""
        path = self.path_for(None if final else iteration, sharded=True)
        staging = path.with_name(f".{path.name}.tmp")
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
        distributed.barrier()
        dcp.save({**state, "iteration": iteration}, checkpoint_id=staging)
        distributed.barrier()
        if self.rank == 0:
            _replace_dir(staging, path)
            self._publish(path)
        distributed.barrier()
        return path

    def _publish(self, path: Path) -> None:
        atomic_write_text(self.pointer, path.name)
        self._prune()
        logger.info("saved checkpoint %s", path)

    def _prune(self) -> None:
        periodic = sorted(self.output_dir.glob("model_[0-9]*"))  # files and checkpoint folders
        for old in periodic[: max(0, len(periodic) - self.max_to_keep)]:
            if old.is_dir():
                shutil.rmtree(old)
            else:
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

    def load_sharded(self, path: str | os.PathLike, state: dict[str, Any]) -> dict[str, Any]:
        """Fill `state` (model/optimizer state of this process's layout, sharded or whole) from a
        checkpoint folder written with any number of ranks; entries the folder lacks are kept."""
        if not (Path(path) / ".metadata").exists():
            raise UserError(f"{path} is not a sharded training checkpoint (no .metadata)")
        dcp.load(state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))
        return state


def _replace_dir(source: Path, target: Path) -> None:
    """Move a finished folder into place; an old one of the same name (model_final) goes only after."""
    if target.exists():
        retired = target.with_name(f".{target.name}.old")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(target, retired)
        os.replace(source, target)
        shutil.rmtree(retired)
    else:
        os.replace(source, target)


def export_teacher(output_dir: str | os.PathLike, tag: str, teacher_state: dict[str, torch.Tensor]) -> Path:
    """Upstream's eval export: `eval/<tag>/teacher_checkpoint.pth` = {"teacher": state dict}."""
    path = Path(output_dir) / "eval" / tag / "teacher_checkpoint.pth"
    atomic_torch_save({"teacher": teacher_state}, path)
    return path


def load_strict(module: torch.nn.Module, state: dict, what: str) -> None:
    """Load whole tensors, however the module is spread, after checking every key and shape."""
    differences = state_differences(module_shapes(module), state)
    if differences:
        raise UserError(f"{what} does not fit the model: {differences.describe()}")
    load_full_module_state(module, state)
