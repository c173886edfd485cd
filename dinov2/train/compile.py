"""`train.compile`: torch.compile of the transformer blocks, the one compile lever of the trainer."""
from __future__ import annotations

import torch
from torch import nn


def compile_blocks(student: nn.ModuleDict, teacher: nn.ModuleDict) -> None:
    """torch.compile every transformer block of student and teacher, in place, before they are wrapped.

    The block's tensor forward is compiled, not the module call, so hooks added later (FSDP2's
    all-gathers) stay outside the graphs; keys and checkpoints are unchanged. Blocks alike share
    their graphs (one per crop size and grad mode: 3 for a whole ViT with uniform drop path), but
    a per-block drop-path rate is a constant of its graph, so the recompile limit is raised to
    keep every block compiled rather than let later ones fall back to eager.
    """
    blocks = [block for modules in (student, teacher) for block in modules["backbone"].iter_blocks()]
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(blocks))
    for block in blocks:
        block.forward_tensor = torch.compile(block.forward_tensor)
