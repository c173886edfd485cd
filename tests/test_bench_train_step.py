"""bench/train_step.py on the CPU: the smoke test the issue asks for, checking what the report says."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_step_bench_reports_both_layouts_consistently(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "bench/train_step.py", "--device", "cpu", "--arch", "vit_tiny", "--batch-size", "2",
         "--local-crops", "2", "--iterations", "2", "--warmup", "1", "--matmul-size", "256", "--out", str(out),
         "--label", "smoke", "crops.global_crops_size=56", "crops.local_crops_size=28", "dino.head_n_prototypes=256"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())["train_step smoke"]
    rows = {row["mode"]: row for row in results["rows"]}
    multi, single = rows["multiview"], rows["singleview"]
    # multi-view: 2 views x (2 global + 2 local) per study; single-view: 2 global + 2 local per image
    assert multi["student_crops_per_item"] == 8 and single["student_crops_per_item"] == 4
    for row in (multi, single):
        assert row["step_ms"] > 0 and math.isfinite(row["loss"])
        assert math.isclose(row["crops_per_s"], row["student_crops_per_item"] * row["batch"] * 1000 / row["step_ms"], rel_tol=1e-6)
        # drop path 0.3 (upstream's setting) skips 30 % of the samples in every block
        assert 0.6 < row["tflop_executed"] / row["tflop_nominal"] < 0.85
        assert math.isclose(row["mfu_nominal"] / row["mfu_executed"], row["tflop_nominal"] / row["tflop_executed"], rel_tol=1e-6)
    assert math.isclose(multi["images_per_s"], 2 * multi["studies_per_s"], rel_tol=1e-9)
    assert single["studies_per_s"] is None
    # twice the student crops, the same number of teacher crops per item
    assert 1.5 < multi["tflop_nominal"] / single["tflop_nominal"] < 2.0
    assert results["info"]["overrides"].startswith("crops.global_crops_size=56")
    assert (out / "train_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "configurations in" in proc.stdout


def test_out_of_memory_falls_back_to_the_smaller_batch(monkeypatch):
    sys.path.insert(0, str(REPO / "bench"))
    import train_step

    tried = []

    def time_case(args, case, peak_rate):
        tried.append(case.batch_size)
        if case.batch_size > 32:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return {"arch": case.arch, "batch": case.batch_size, "step_ms": 1.0}

    monkeypatch.setattr(train_step, "time_case", time_case)
    args = train_step.get_args_parser().parse_args(["--fallback-batch-size", "32"])
    row = train_step.run_case(args, train_step.Case("vit_large", "multiview", 64, 10), peak_rate=1.0)
    assert tried == [64, 32]
    assert row["batch"] == 32 and row["note"] == "batch 64 out of memory"
