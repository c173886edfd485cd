"""DINOv2-compatible core of VET-DINO. Importing it checks that the installed torch is new enough,
so that an old one stops here with one line rather than deep inside a distributed run."""
import re
from importlib import metadata

# The oldest torch release with everything dinov2 uses; the newest requirement sets it:
# - 2.8: FSDP2 honours reshard_after_forward=True on the root module (pytorch#154704 and #155319,
#   June 2025, after 2.7 and before the 2.8 branch cut of 2025-06-24, pytorch#156745). Before,
#   the root kept its parameters gathered after forward, and the teacher's EMA update
#   (dinov2/fsdp/wrap.py, shard(..., forward_only=True)) relies on them being resharded.
# - 2.7: torch._dynamo.config.recompile_limit, renamed from cache_size_limit (pytorch#143709,
#   2024-12-22); torch 2.6 has only the old name.
# - 2.6: fully_shard, MixedPrecisionPolicy and FSDPModule importable from torch.distributed.fsdp
#   (pytorch#141868, "targeting 2.6"); before, only from torch.distributed._composable.fsdp.
# - 2.5: DTensor at its public path torch.distributed.tensor (pytorch#133881).
# - older, none binding: torch.amp.GradScaler("cuda") (torch.cuda.amp's deprecated for it in 2.4,
#   pytorch#126527), torch.distributed.checkpoint.state_dict, F.scaled_dot_product_attention,
#   torch.load(weights_only=True).
MIN_TORCH = (2, 8)
MIN_TORCH_REASONS = "FSDP2 resharding of the root module, fully_shard at top level, dynamo recompile_limit"


def check_torch_version(version: str) -> None:
    """Refuse a torch older than MIN_TORCH, naming the version needed and why.

    Only major.minor count: a nightly or source build of the minimum ("2.8.0a0+git...") already
    has its features, and local suffixes ("+cpu", "+cu130") say nothing about them. A version
    string that does not start with major.minor is let through: torch's own imports will fail
    if the features are missing.
    """
    release = re.match(r"(\d+)\.(\d+)", version)
    if release and tuple(map(int, release.groups())) < MIN_TORCH:
        needed = ".".join(map(str, MIN_TORCH))
        raise ImportError(
            f"dinov2 needs torch>={needed} ({MIN_TORCH_REASONS}); found {version}: pip install -U 'torch>={needed}'"
        )


def _check_installed_torch() -> None:
    """Reads the installed distribution rather than importing torch: the torch-free parts (DICOM
    preparation, phantoms) import dinov2 in each of their worker processes, which should not pay
    torch's import time."""
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return  # no torch at all: the first `import torch` says so
    check_torch_version(version)


_check_installed_torch()
