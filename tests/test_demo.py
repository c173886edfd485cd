"""`make demo` end to end at toy size: every step runs, and the report holds what it promises."""
import json

import pytest
from PIL import Image

from vet_ext import demo


@pytest.mark.slow
def test_demo_writes_report_with_knn_table_and_figures(tmp_path, tiny_vit):
    out = tmp_path / "demo"
    argv = ["--out", str(out), "--studies", "80", "--image-size", "128", "--device", "cpu",
            f"student.arch={tiny_vit}", "optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=4",
            "optim.warmup_epochs=0", "teacher.warmup_teacher_temp_epochs=0", "train.num_workers=0"]
    assert demo.main(argv) == 0

    results = json.loads((out / "results.json").read_text())
    assert [row["model"] for row in results["knn"]] == ["VET-DINO (this run)", "untrained (same init seed)"]
    assert all(0 <= row["macro AP"] <= 100 and 0 <= row["cross-view top-1"] <= 100 for row in results["knn"])
    report = (out / "report.md").read_text()
    assert "| VET-DINO (this run) |" in report and "loss_curve.png" in report and "cross-view top-1" in report
    for png in (out / "loss_curve.png", out / "attention" / "attention_overlay.png"):
        with Image.open(png) as image:
            assert image.width > 200 and image.height > 100

    # A second run reuses data and the finished training instead of redoing them.
    stamp = (out / "pretrain" / "model_final.rank_0.pth").stat().st_mtime_ns
    assert demo.main(argv) == 0
    assert (out / "pretrain" / "model_final.rank_0.pth").stat().st_mtime_ns == stamp
