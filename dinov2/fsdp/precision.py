"""The run's numeric precision, resolved once from `compute_precision` so that autocast, every
FSDP2 policy and the gradient scaler cannot disagree.

They used to be read separately (autocast and the scaler from the student backbone's
`param_dtype`, each FSDP2 policy from its own module's keys), so overriding one key left the
heads, the teacher and the gradient reduction in fp16 with no scaler. `resolve_precision` reads
the config once; everything else asks the `Precision` it returns.

`compute_precision.precision` (project key) is the one switch:
- `bf16`: autocast in bf16; every student and teacher module (backbone, DINO head, iBOT head)
  gathers its parameters in bf16 under FSDP2 and reduces its gradients in float32; no scaler,
  as bf16 has float32's range.
- `fp16`: the same in fp16, with a GradScaler (fp16 gradients underflow without one).
- `fp32`: no autocast, float32 everywhere, no scaler.
- `null`: upstream's per-module keys (`compute_precision.<student|teacher>.<module>.
  mixed_precision.{param,reduce,buffer}_dtype` and `grad_scaler`), as upstream configs give them.
  Their `param_dtype`s must agree, autocast having one dtype. Upstream's keys describe CUDA runs
  (its defaults are fp16), so on CPU they are checked but the run stays float32.

An explicit switch is honoured on CPU as well: CPU autocast, FSDP2 over gloo and
`GradScaler("cpu")` all take bf16 and fp16, which is how CI exercises the reduced-precision
paths. Gradients are reduced in float32 under the switch, torchtitan's default
(`mixed_precision_reduce = "float32"` next to bf16 parameters): a sum over ranks in bf16 keeps 8
bits of mantissa, in fp16 it risks the range the scaler is there to protect, and the cost (twice
the gradient traffic) is what DDP pays anyway. Buffers stay float32, as in all upstream defaults.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch.distributed.fsdp import MixedPrecisionPolicy

from dinov2.configs import dinov2_default_config
from dinov2.utils.errors import UserError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OWNERS = ("student", "teacher")
MODULES = ("backbone", "dino_head", "ibot_head")
DTYPE_KEYS = ("param_dtype", "reduce_dtype", "buffer_dtype")
SWITCH = "compute_precision.precision"


@dataclass(frozen=True)
class ModulePrecision:
    """What FSDP2 does with one student or teacher module's tensors."""

    param: torch.dtype
    reduce: torch.dtype
    buffer: torch.dtype


@dataclass(frozen=True)
class Precision:
    """The resolved setting; `origin` says in words where it came from, for the run's log."""

    compute: torch.dtype
    modules: dict[str, ModulePrecision]  # "student.backbone" -> its dtypes, for every owner x module
    scaler: bool
    device_type: str
    origin: str

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.compute == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute)

    def make_scaler(self) -> torch.amp.GradScaler | None:
        """Under FSDP2 the scaler's inf check on sharded (DTensor) gradients is reduced over the
        ranks by DTensor itself, so every rank skips the same steps and keeps the same scale."""
        return torch.amp.GradScaler(self.device_type) if self.scaler else None

    def policy(self, owner: str, module: str) -> MixedPrecisionPolicy:
        dtypes = self.modules[f"{owner}.{module}"]
        return MixedPrecisionPolicy(param_dtype=dtypes.param, reduce_dtype=dtypes.reduce)

    def buffer_dtype(self, owner: str, module: str) -> torch.dtype:
        return self.modules[f"{owner}.{module}"].buffer

    def __str__(self) -> str:
        reduce = sorted({_name(m.reduce) for m in self.modules.values()})
        scaler = "with a gradient scaler" if self.scaler else "no gradient scaler"
        return f"{_name(self.compute)} compute, gradients reduced in {'/'.join(reduce)}, {scaler} ({self.origin})"


def resolve_precision(cfg: DictConfig, device: torch.device) -> Precision:
    """The precision of a run on `device` from the `compute_precision` node; refuses (UserError,
    naming the keys) a setting that cannot be honoured, on any device, so that a config which
    would fail on the cluster already fails on a laptop."""
    setting = cfg.get("precision")
    if setting is None:
        return _from_upstream_keys(cfg, device)
    if setting not in DTYPES:
        raise UserError(f"{SWITCH} must be one of {', '.join(DTYPES)} or null, got {setting!r}")
    overridden = [f"compute_precision.{key}={value}" for key, value, default in _dtype_keys(cfg) if value != default]
    if overridden:
        raise UserError(f"{SWITCH}={setting} sets every module's dtypes; remove {', '.join(overridden)}")
    dtype = DTYPES[setting]
    _check_scaler(cfg, dtype == torch.float16, f"{SWITCH}=fp16")
    module = ModulePrecision(param=dtype, reduce=torch.float32, buffer=torch.float32)
    return Precision(
        compute=dtype,
        modules={name: module for name in _module_names()},
        scaler=dtype == torch.float16,
        device_type=device.type,
        origin=f"{SWITCH}={setting}",
    )


def _from_upstream_keys(cfg: DictConfig, device: torch.device) -> Precision:
    """Upstream's per-module keys, kept so that upstream's configs run unchanged; they are
    checked on every device and honoured on CUDA, the only device upstream wrote them for."""
    modules = {}
    for name in _module_names():
        owner, module = name.split(".")
        mixed = cfg[owner][module].mixed_precision
        dtypes = (_dtype(f"compute_precision.{name}.mixed_precision.{key}", mixed[key]) for key in DTYPE_KEYS)
        modules[name] = ModulePrecision(*dtypes)
    params = {name: m.param for name, m in modules.items()}
    if len(set(params.values())) > 1:
        raise UserError(
            f"compute_precision.<owner>.<module>.mixed_precision.param_dtype disagree ({_grouped(params)}) "
            f"but autocast has one dtype: set {SWITCH}={_name(params['student.backbone'])} instead, which sets them all"
        )
    (compute,) = set(params.values())
    for name, m in modules.items():
        if m.reduce == torch.float16 and compute != torch.float16:
            raise UserError(
                f"compute_precision.{name}.mixed_precision.reduce_dtype=fp16 with {_name(compute)} parameters: "
                f"unscaled gradients underflow in fp16 (only fp16 runs have the scaler); use fp32"
            )
    _check_scaler(cfg, compute == torch.float16, "compute_precision.*.mixed_precision.param_dtype=fp16")
    if device.type != "cuda":
        full = ModulePrecision(torch.float32, torch.float32, torch.float32)
        return Precision(
            compute=torch.float32,
            modules={name: full for name in modules},
            scaler=False,
            device_type=device.type,
            origin=f"upstream's compute_precision keys describe CUDA runs, so this {device.type} run stays float32; "
                   f"{SWITCH}=bf16 or fp16 applies on {device.type} too",
        )
    return Precision(
        compute=compute,
        modules=modules,
        scaler=compute == torch.float16,
        device_type=device.type,
        origin=f"from upstream's per-module compute_precision keys, {SWITCH} being null",
    )


def _check_scaler(cfg: DictConfig, fp16: bool, what: str) -> None:
    if fp16 and not cfg.grad_scaler:
        raise UserError(
            f"{what} needs compute_precision.grad_scaler=true: fp16 gradients underflow without the scaler "
            f"(or use {SWITCH}=bf16)"
        )


def _module_names() -> Iterator[str]:
    return (f"{owner}.{module}" for owner in OWNERS for module in MODULES)


def _dtype_keys(cfg: DictConfig) -> Iterator[tuple[str, object, object]]:
    """(key under compute_precision, value, upstream default) for every per-module dtype key."""
    defaults = dinov2_default_config.compute_precision
    for name in _module_names():
        owner, module = name.split(".")
        for key in DTYPE_KEYS:
            yield (f"{name}.mixed_precision.{key}", cfg[owner][module].mixed_precision[key],
                   defaults[owner][module].mixed_precision[key])


def _dtype(key: str, name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"{key} must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def _grouped(params: dict[str, torch.dtype]) -> str:
    """'bf16: student.backbone; fp16: student.dino_head, ...' for a one-line message."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name, dtype in params.items():
        by_dtype.setdefault(dtype, []).append(name)
    return "; ".join(f"{_name(dtype)}: {', '.join(names)}" for dtype, names in by_dtype.items())
