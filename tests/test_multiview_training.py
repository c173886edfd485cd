"""Multi-view and single-view pretraining end to end through the trainer, on prepared phantom studies."""
import json
from pathlib import Path

import numpy as np
import pytest

from dinov2.data import make_dataset, make_pipeline
from dinov2.train import train as train_module
from dinov2.utils.config import get_cfg, setup

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "vetdino"
# The shipped configs with a tiny ViT and small crops: the same code path in seconds on 2 cores.
SMALL = ["student.arch=vit_test_tiny", "train.batch_size_per_gpu=4", "train.num_workers=0", "train.device=cpu",
         "crops.global_crops_size=56", "crops.local_crops_size=28", "crops.local_crops_number=2",
         "train.log_period_iterations=1", "optim.warmup_epochs=1", "teacher.warmup_teacher_temp_epochs=1",
         "dino.head_n_prototypes=256", "ibot.head_n_prototypes=256"]


# a 2-block, 64-wide ViT (with the configs' 4 registers) instead of ViT-S/B/L
pytestmark = pytest.mark.usefixtures("one_thread", "tiny_vit")


def _train(config_file: Path, output_dir: Path, *opts: str) -> list[dict]:
    args = train_module.get_args_parser().parse_args(
        ["--config-file", str(config_file), "--output-dir", str(output_dir), *opts]
    )
    trainer = train_module.Trainer(setup(args))
    trainer.train(trainer.resume_or_load(resume=False))
    return [json.loads(line) for line in (output_dir / "training_metrics.json").read_text().splitlines()]


@pytest.mark.slow
def test_multiview_pretraining_lowers_the_loss(phantom_data, tmp_path):
    metrics = _train(
        CONFIGS / "demo_cpu.yaml", tmp_path / "run", *SMALL,
        f"train.dataset_path=VetStudies:root={phantom_data}:split=train",
        "train.OFFICIAL_EPOCH_LENGTH=20", "optim.epochs=2",  # 40 steps: the demo recipe does not collapse, so it learns slower
        "train.checkpoint_period_iterations=40", "evaluation.eval_period_iterations=40",
    )
    assert [m["iteration"] for m in metrics] == list(range(40))
    assert all(m["nonfinite_steps"] == 0 for m in metrics)
    losses = [m["total_loss"] for m in metrics]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, losses
    assert metrics[-1]["dino_global_crops_loss"] > 0 and metrics[-1]["ibot_loss"] > 0


@pytest.mark.slow
def test_singleview_config_trains_on_single_radiographs(phantom_data, tmp_path):
    metrics = _train(
        CONFIGS / "singleview_vits14.yaml", tmp_path / "run", *SMALL,
        f"train.dataset_path=VetImages:root={phantom_data}:split=train",
        "train.OFFICIAL_EPOCH_LENGTH=2", "optim.epochs=2", "train.head_warmup_iterations=2",
        "train.checkpoint_period_iterations=4", "evaluation.eval_period_iterations=4",
    )
    assert [m["iteration"] for m in metrics] == list(range(4))
    assert all(np.isfinite(m["total_loss"]) and m["nonfinite_steps"] == 0 for m in metrics)


def test_min_views_per_study_keeps_the_phantom_studies_with_two_views_or_more(phantom_data):
    studies = make_dataset(f"VetStudies:root={phantom_data}:split=train")
    view_counts = [len(studies.view_codes(i)) for i in range(len(studies))]
    assert 1 in view_counts and max(view_counts) >= 2, "the phantom set should mix 1-view and multi-view studies"
    cfg = get_cfg(opts=["crops.min_views_per_study=2"])
    cfg.train.pipeline = "multiview"
    selected = make_pipeline(cfg).dataset_for(studies)  # what the trainer feeds to its loader
    assert len(selected) == sum(count >= 2 for count in view_counts)
    assert all(len(selected[i][0]) >= 2 for i in range(len(selected)))
