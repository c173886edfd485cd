"""GPU checks of the core: bf16 numerics against upstream's fixtures and the smoke run on CUDA.

Skipped without CUDA (see conftest). bf16 keeps 8 mantissa bits, so outputs of size ~5 carry
errors of a few 1e-2; the tolerance below is bf16's, not float32's.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinov2.models.vision_transformer import DinoVisionTransformer

FIXTURES = Path(__file__).parent / "fixtures" / "dinov2_reference"
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["vit_mlp", "vit_swiglu_reg4"])
def test_bf16_autocast_forward_matches_upstream(name):
    reference = torch.load(FIXTURES / f"{name}.pt", weights_only=True)
    model = DinoVisionTransformer(**reference["kwargs"])
    model.load_state_dict(reference["state_dict"], strict=True)
    model = model.cuda().eval()
    for size in ("x224", "x98", "x_rect"):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.forward_features(reference["inputs"][size].cuda())
        for key in ("x_norm_clstoken", "x_norm_patchtokens"):
            expected = reference["forward_features"][size][key]
            torch.testing.assert_close(out[key].float().cpu(), expected, atol=0.1, rtol=0.05, msg=f"{size} {key}")


@pytest.mark.cuda
@pytest.mark.slow
def test_smoke_run_on_cuda_in_bf16(tmp_path):
    out = tmp_path / "smoke"
    proc = subprocess.run(
        [sys.executable, "-m", "dinov2.train.train", "--config-file",
         str(REPO / "dinov2/configs/train/vits14_cpu_smoke.yaml"), "--output-dir", str(out), "train.device=cuda",
         "compute_precision.precision=bf16"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model_final.rank_0.pth").exists()
    last = json.loads((out / "training_metrics.json").read_text().splitlines()[-1])
    assert last["max_mem_mib"] > 0  # upstream's "max mem", logged on CUDA
    assert list((out / "eval").glob("training_*/teacher_checkpoint.pth"))
