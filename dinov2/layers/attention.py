"""Multi-head self-attention and the single place that picks the attention kernel.

PyTorch's `scaled_dot_product_attention` is the default everywhere: on an H100 its own kernel
choice (cuDNN or flash per shape) ran the global crops' attention 1.3-1.5x faster than the flash
kernels xformers uses (docs/performance.md). xformers' memory-efficient kernel is used only when
asked for (`DINOV2_ATTENTION=xformers`), installed, the tensors are on CUDA and `XFORMERS_DISABLED`
is unset; if it turns out not to support the inputs (NotImplementedError), the process falls back
to PyTorch for good so the failure is paid once, not at every call.
"""
import functools
import logging
import os
from types import ModuleType

import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger("dinov2")

# xformers kernels exist only for these devices (a module constant so tests can emulate CUDA).
XFORMERS_DEVICE_TYPES = ("cuda",)
_xformers_unsupported = False


@functools.cache
def _xformers_ops() -> ModuleType | None:
    try:
        from xformers import ops
    except Exception as exc:  # a broken optional kernel must never break the model
        if not isinstance(exc, ImportError):
            logger.warning("xformers failed to import (%s); using PyTorch attention", exc)
        return None
    return ops


def _use_xformers(q: Tensor) -> bool:
    return (
        os.environ.get("DINOV2_ATTENTION", "sdpa") == "xformers"
        and q.device.type in XFORMERS_DEVICE_TYPES
        and not _xformers_unsupported
        and "XFORMERS_DISABLED" not in os.environ
        and _xformers_ops() is not None
    )


def scaled_dot_product(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """softmax(q k^T / sqrt(d)) v on [B, T, heads, head_dim] tensors (xformers' layout)."""
    global _xformers_unsupported
    if _use_xformers(q):
        try:
            return _xformers_ops().memory_efficient_attention(q, k, v, p=dropout_p)
        except NotImplementedError as exc:
            _xformers_unsupported = True
            logger.warning("xformers cannot run this attention (%s); using PyTorch from now on", exc)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p
    )
    return out.transpose(1, 2)


class Attention(nn.Module):
    """Keys `qkv` (rows [q | k | v], head-major within each) and `proj`, as upstream."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).unbind(2)
        heads = scaled_dot_product(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(heads.reshape(batch, tokens, dim)))


# Upstream's name for the xformers-backed variant; here every Attention chooses its kernel.
MemEffAttention = Attention
