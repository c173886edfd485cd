"""Multi-head self-attention and the single place that picks the attention kernel.

PyTorch's `scaled_dot_product_attention` is the default everywhere: on an H100 its own kernel
choice (cuDNN or flash per shape) ran the global crops' attention 1.3-1.5x faster than the flash
kernels xformers uses (docs/performance.md). xformers' memory-efficient kernel is used only when
asked for (`DINOV2_ATTENTION=xformers`) on CUDA tensors with `XFORMERS_DISABLED` unset. A request
that cannot be met says so rather than quietly running PyTorch's kernel under xformers' name (a
benchmark would time SDPA twice): xformers missing or failing to import is an error, tensors on
another device get a warning once. If xformers turns out not to support the inputs
(NotImplementedError), the process falls back to PyTorch for good so the failure is paid once,
not at every call.
"""
import functools
import logging
import os
from types import ModuleType

import torch.nn.functional as F
from torch import Tensor, nn

from dinov2.utils.errors import UserError

logger = logging.getLogger("dinov2")

ATTENTION_BACKENDS = ("sdpa", "xformers")
# xformers kernels exist only for these devices (a module constant so tests can emulate CUDA).
XFORMERS_DEVICE_TYPES = ("cuda",)
_xformers_unsupported = False


def _requested_backend() -> str:
    backend = os.environ.get("DINOV2_ATTENTION", "sdpa")
    if backend not in ATTENTION_BACKENDS:
        raise UserError(f"DINOV2_ATTENTION={backend!r} is not an attention backend; known: {', '.join(ATTENTION_BACKENDS)}")
    return backend


@functools.cache
def _xformers_ops() -> ModuleType:
    try:
        from xformers import ops
    except Exception as exc:  # not installed, or built for another torch or CUDA
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"DINOV2_ATTENTION=xformers but xformers cannot be imported ({reason}); install it or unset DINOV2_ATTENTION"
        ) from None
    return ops


@functools.cache
def _warn_no_xformers_kernel(device_type: str) -> None:
    logger.warning("DINOV2_ATTENTION=xformers: xformers has no kernel for %s tensors; using PyTorch attention there", device_type)


def _xformers_for(q: Tensor) -> ModuleType | None:
    """xformers' ops when they are to run this attention, None for PyTorch's."""
    if _requested_backend() != "xformers" or _xformers_unsupported or "XFORMERS_DISABLED" in os.environ:
        return None
    if q.device.type not in XFORMERS_DEVICE_TYPES:
        _warn_no_xformers_kernel(q.device.type)
        return None
    return _xformers_ops()


def scaled_dot_product(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """softmax(q k^T / sqrt(d)) v on [B, T, heads, head_dim] tensors (xformers' layout)."""
    global _xformers_unsupported
    xformers_ops = _xformers_for(q)
    if xformers_ops is not None:
        try:
            return xformers_ops.memory_efficient_attention(q, k, v, p=dropout_p)
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
