"""Shared test set-up: fixture paths, determinism, and skipping CUDA tests without a GPU."""
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures" / "dinov2_reference"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA, none available")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


TINY_ARCH = "vit_test_tiny"


@pytest.fixture
def tiny_vit(monkeypatch) -> str:
    """Register a 2-block, 64-wide ViT as `student.arch=vit_test_tiny`: real code paths, seconds on CPU."""
    from functools import partial

    from dinov2.models import vision_transformer as vits

    tiny = partial(vits.DinoVisionTransformer, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4)
    monkeypatch.setitem(vits.ARCHITECTURES, TINY_ARCH, tiny)
    return TINY_ARCH


@pytest.fixture
def one_thread():
    """Tiny tensors: a second thread only adds hand-offs, which are costly on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
