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
