"""Shared test set-up: fixture paths, determinism, float32 tolerances, the tiny ViT, the one-line
error check, and CUDA tests (skipped without a GPU)."""
import json
import socket
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

from dinov2.models.vision_transformer import ARCHITECTURES
from dinov2.utils.cli import run_cli
from tiny import TINY_ARCH, make_tiny_vit

FIXTURES = Path(__file__).parent / "fixtures" / "dinov2_reference"

FLOAT32_EPS = torch.finfo(torch.float32).eps  # 1.19e-7
# How many float32 epsilons of a tensor's largest magnitude two correct computations may differ by.
# Reordered sums of n terms differ by about sqrt(n) eps of the magnitudes summed (n eps at worst):
# one short reduction (a softmax row over 64 prototypes, a 16-tap bicubic stencil, a mean over a
# batch) stays within 16 eps; a whole forward or forward-backward through the ViT and its heads
# chains reductions of ~650 token rows over 2 blocks, hence 64 eps (7.6e-6 of the largest entry).
# Measured against the fixtures on AMD EPYC with its AVX-512 kernels and with ATEN_CPU_CAPABILITY=
# avx2 or default: at most 19 eps for gradients, 7 for forward features, 5 for the bicubic
# positional embeddings, 3 for the losses.
SHORT_SUM_EPS = 16 * FLOAT32_EPS
WHOLE_PASS_EPS = 64 * FLOAT32_EPS


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA, none available")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def assert_close_scaled(
    actual: torch.Tensor, expected: torch.Tensor, *, rtol: float = 0.0, eps: float = WHOLE_PASS_EPS, msg: str | None = None
) -> None:
    """Float32 results against a reference computed on another machine, to within rounding.

    A fixed atol fails on CPUs whose kernels sum in another order (AVX-512 against AVX2, a GPU):
    a sum's rounding error scales with the magnitudes summed, not with the entry it lands in, so a
    small gradient entry beside entries of 2.5 carries errors of 1e-6 from the terms that cancelled
    into it. The absolute tolerance is therefore `eps` times the expected tensor's largest
    magnitude; `rtol` adds the caller's per-entry relative allowance.
    """
    scale = expected.abs().max().item() if expected.numel() else 0.0
    atol = eps * scale

    def message(generated: str) -> str:
        tolerance = f"atol = {eps / FLOAT32_EPS:g} eps * max|expected| {scale:.3g} = {atol:.3g}"
        return f"{msg + ': ' if msg else ''}{generated}\n({tolerance})"

    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=message)


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_vit() -> Iterator[str]:
    """`student.arch=vit_test_tiny` (tests/tiny.py) for the test's own process, gone afterwards so
    that no other test depends on it by accident."""
    with ARCHITECTURES.temporarily(TINY_ARCH, make_tiny_vit):
        yield TINY_ARCH


@pytest.fixture
def fixture_vit() -> Iterator[str]:
    """The tiny ViT under the name the reference fixtures' configs give it (upstream's generator
    built them with the same architecture)."""
    with ARCHITECTURES.temporarily("vit_fixture_tiny", make_tiny_vit):
        yield "vit_fixture_tiny"


def single_error_line(stderr: str, *, after_progress: bool = False) -> str:
    """A command refusing its input says why in one line, `error: ...`, with no traceback, so the
    user reads the cause at once; the line is returned for the test to check its words.

    after_progress: the command ran a while (a training's progress bar and warnings) before it
    failed; the failure must still be one error line among them and no traceback.
    """
    lines = stderr.strip().splitlines()
    if after_progress:
        assert "Traceback" not in stderr, stderr
        lines = [line for line in lines if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def cli_error(main: Callable[[], object], capsys, *, after_progress: bool = False) -> str:
    """`main` run as its command must refuse: exit status 2 (bad input, not a crash) and one error line."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    assert exit_info.value.code == 2
    return single_error_line(capsys.readouterr().err, after_progress=after_progress)


def free_port() -> int:
    """A local TCP port free now, for the rendezvous of processes a test starts right after."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def state_dict_cases() -> list:
    """Upstream's architectures with their state-dict keys and shapes, one test case each."""
    cases = json.loads((FIXTURES / "state_dict_keys.json").read_text())
    return [pytest.param(case, id=name) for name, case in cases.items() if name != "meta"]


@pytest.fixture
def no_tf32():
    """CUDA float32 that is float32: TF32 keeps 10 mantissa bits (errors ~1e-3 relative), and it is
    switched separately for cuBLAS matmuls and cuDNN convolutions (the patch embedding); cuDNN
    allows it by default. Restored by hand: monkeypatch would undo the cuBLAS flag with delattr,
    which torch's cuBLASModule refuses."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture
def one_thread():
    """Tiny tensors: a second thread only adds hand-offs, which are costly on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def phantom_data(tmp_path_factory) -> Path:
    """12 phantom studies (1 to 4 views each) at 128 px, all in train: prepared once for every
    test of the session that trains on studies."""
    from vet_ext.ingestion.phantoms import generate_studies
    from vet_ext.ingestion.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("phantoms")
    generate_studies(root / "RAW", n_studies=12, seed=1, size=128, workers=1)  # seed 1: two 1-view studies
    prepare(PrepareConfig(out=root / "DATA", dicom_root=root / "RAW", workers=1, cache_size=128,
                          val_fraction=0.0, test_fraction=0.0, progress=False))
    return root / "DATA"
