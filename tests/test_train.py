"""The training loop end to end on CPU: outputs, exact resume, learning, skipped steps, bad input."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli_error
from dinov2.models import build_model_from_cfg
from dinov2.models.weights import load_backbone_weights
from dinov2.train import train as train_module
from dinov2.train.checkpointing import Checkpointer
from dinov2.utils.config import setup
from dinov2.utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "dinov2" / "configs" / "train" / "vits14_cpu_smoke.yaml"
# Small enough for a few seconds per run on 2 cores; the same code path as a real run.
TINY = ["student.arch=vit_test_tiny", "train.OFFICIAL_EPOCH_LENGTH=3", "optim.epochs=2", "optim.warmup_epochs=1", "train.batch_size_per_gpu=4",
        "train.log_period_iterations=1", "train.checkpoint_period_iterations=3", "evaluation.eval_period_iterations=3"]


pytestmark = pytest.mark.usefixtures("tiny_vit")  # in-process runs on a 2-block ViT


def _args(output_dir, *opts, no_resume=False):
    return train_module.get_args_parser().parse_args(
        ["--config-file", str(SMOKE), "--output-dir", str(output_dir), *(["--no-resume"] if no_resume else []), *opts]
    )


def _run(output_dir, *opts) -> dict:
    args = _args(output_dir, *opts)
    cfg = setup(args)
    trainer = train_module.Trainer(cfg)
    return trainer.train(trainer.resume_or_load(resume=True))


def _metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "training_metrics.json").read_text().splitlines()]


def _final_state(output_dir) -> dict:
    return torch.load(Path(output_dir) / "model_final.rank_0.pth", weights_only=True)["model"]


@pytest.mark.slow
def test_smoke_command_writes_upstream_outputs(tmp_path):
    out = tmp_path / "smoke"
    proc = subprocess.run(
        [sys.executable, "-m", "dinov2.train.train", "--config-file", str(SMOKE), "--output-dir", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "config.yaml").exists()
    metrics = _metrics(out)
    expected_keys = {"iteration", "iter_time", "data_time", "lr", "wd", "mom", "last_layer_lr", "current_batch_size",
                     "total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss"}
    assert expected_keys <= set(metrics[-1])
    pointer = (out / "last_checkpoint.rank_0").read_text().strip()
    assert (out / pointer).exists()
    exports = sorted((out / "eval").glob("training_*/teacher_checkpoint.pth"))
    assert exports, "no teacher export"
    teacher = torch.load(exports[-1], weights_only=True)["teacher"]
    assert any(k.startswith("dino_head.") for k in teacher)
    cfg = setup(_args(tmp_path / "fresh"))
    backbone, _ = build_model_from_cfg(cfg, only_teacher=True)
    load_backbone_weights(backbone, exports[-1], strict=True)
    torch.testing.assert_close(backbone.state_dict()["cls_token"], teacher["backbone.cls_token"])


class _KillAfterFirstSave(Exception):
    pass


@pytest.mark.parametrize("warmup", [(), ("train.head_warmup_iterations=4",)], ids=["plain", "checkpoint_in_head_warmup"])
@pytest.mark.slow
def test_resume_is_exact(tmp_path, monkeypatch, warmup):
    """Killed after iteration 2's checkpoint and resumed. Inside a head warm-up the backbone has
    had no gradient yet when the checkpoint is written, and must still resume exactly."""
    run = [*TINY, *warmup]
    _run(tmp_path / "whole", *run)

    original_save = Checkpointer.save

    def save_then_die(self, state, iteration, final=False):
        original_save(self, state, iteration, final)
        raise _KillAfterFirstSave

    monkeypatch.setattr(Checkpointer, "save", save_then_die)
    with pytest.raises(_KillAfterFirstSave):
        _run(tmp_path / "split", *run)
    monkeypatch.setattr(Checkpointer, "save", original_save)
    summary = _run(tmp_path / "split", *run)
    assert summary["iterations"] == 3  # resumed after iteration 2's checkpoint, not from scratch

    whole, split = _final_state(tmp_path / "whole"), _final_state(tmp_path / "split")
    assert set(whole) == set(split)
    for name in whole:
        assert torch.equal(whole[name], split[name]), name
    # The metrics file keeps one line per iteration across the restart (log period 1).
    assert [m["iteration"] for m in _metrics(tmp_path / "split")] == list(range(6))


def _write_image_folder(root: Path, n: int = 48, size: int = 64) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cls = i % 3
        img = rng.normal(40, 10, (size, size))
        cy, cx, r = rng.uniform(16, 48), rng.uniform(16, 48), rng.uniform(8, 16)
        shape = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2) if cls == 0 else ((abs(yy - cy) < r) & (abs(xx - cx) < r / 3))
        if cls == 2:
            shape = (abs((yy - cy) - (xx - cx)) < 3) & (abs(yy - cy) < r)
        img[shape] += 160
        folder = root / f"class{cls}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")


@pytest.mark.slow
def test_forty_iterations_on_image_folder_lower_the_loss(tmp_path):
    data = tmp_path / "images"
    _write_image_folder(data)
    out = tmp_path / "run"
    # Sinkhorn-Knopp targets: with softmax centring the DINO terms first rise while the centre
    # flattens the teacher, which takes longer than 40 iterations to turn around.
    _run(out, "student.arch=vit_test_tiny", "train.centering=sinkhorn_knopp", f"train.dataset_path=ImageFolder:root={data}", "train.OFFICIAL_EPOCH_LENGTH=10", "optim.epochs=4",
         "optim.warmup_epochs=1", "train.log_period_iterations=1", "train.batch_size_per_gpu=8",
         "evaluation.eval_period_iterations=40", "train.checkpoint_period_iterations=40")
    losses = [m["total_loss"] for m in _metrics(out)]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
    cfg = setup(_args(tmp_path / "fresh", "student.arch=vit_test_tiny"))
    backbone, _ = build_model_from_cfg(cfg, only_teacher=True)
    load_backbone_weights(backbone, out / "eval" / "training_39" / "teacher_checkpoint.pth", strict=True)


@pytest.mark.slow
def test_non_finite_step_is_skipped_and_counted(tmp_path, monkeypatch):
    original = train_module.SSLMetaArch.compute_losses
    calls = {"n": 0}

    def sometimes_nan(self, images, teacher_temp, **kwargs):
        losses = original(self, images, teacher_temp, **kwargs)
        calls["n"] += 1
        return losses._replace(total=losses.total * float("nan")) if calls["n"] == 2 else losses

    monkeypatch.setattr(train_module.SSLMetaArch, "compute_losses", sometimes_nan)
    summary = _run(tmp_path / "run", *TINY)
    assert summary["nonfinite_steps"] == 1
    assert _metrics(tmp_path / "run")[-1]["nonfinite_steps"] == 1
    assert all(torch.isfinite(v).all() for v in _final_state(tmp_path / "run").values() if v.is_floating_point())


@pytest.mark.slow
def test_non_finite_losses_in_a_row_stop_the_run_keeping_the_checkpoint(tmp_path, monkeypatch, capsys):
    original = train_module.SSLMetaArch.compute_losses
    calls = {"n": 0}

    def nan_after_first_checkpoint(self, images, teacher_temp, **kwargs):
        losses = original(self, images, teacher_temp, **kwargs)
        calls["n"] += 1
        return losses._replace(total=losses.total * float("nan")) if calls["n"] > 3 else losses

    monkeypatch.setattr(train_module.SSLMetaArch, "compute_losses", nan_after_first_checkpoint)
    out = tmp_path / "run"
    argv = ["--config-file", str(SMOKE), "--output-dir", str(out), *TINY, "train.max_consecutive_nonfinite=2"]
    message = cli_error(lambda: train_module.main(argv), capsys, after_progress=True)
    assert "non-finite" in message and "model_0000002.rank_0.pth" in message
    state = torch.load(out / "model_0000002.rank_0.pth", weights_only=True)
    assert state["iteration"] == 2


@pytest.mark.parametrize(
    "opts, needle",
    [
        (["optim.no_such_key=1"], "optim.no_such_key"),
        (["train.dataset_path=ImageFolder:root=/does/not/exist"], "/does/not/exist"),
        (["train.dataset_path=NoSuchDataset:root=x"], "NoSuchDataset"),
    ],
)
def test_bad_input_gives_one_error_line(tmp_path, capsys, opts, needle):
    argv = ["--config-file", str(SMOKE), "--output-dir", str(tmp_path / "o"), *opts]
    assert needle in cli_error(lambda: train_module.main(argv), capsys)


def test_pretrained_weights_with_wrong_keys_are_listed(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    torch.save({"not_a_vit.weight": torch.zeros(3), "cls_token": torch.zeros(1, 1, 384)}, bad)
    argv = ["--config-file", str(SMOKE), "--output-dir", str(tmp_path / "o"), f"student.pretrained_weights={bad}"]
    message = cli_error(lambda: train_module.main(argv), capsys)
    assert "not_a_vit.weight" in message and "missing" in message.lower()


@pytest.mark.slow
def test_head_warmup_freezes_the_backbone_and_trains_the_heads(tmp_path):
    args = _args(tmp_path / "run", *TINY, "train.head_warmup_iterations=6")
    trainer = train_module.Trainer(setup(args))
    before = {k: v.clone() for k, v in trainer.model.student.state_dict().items()}
    trainer.train(0)
    after = trainer.model.student.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("backbone."))
    assert not torch.equal(after["dino_head.mlp.0.weight"], before["dino_head.mlp.0.weight"])


@pytest.mark.slow
def test_model_weights_continue_from_a_teacher_export_with_heads(tmp_path):
    _run(tmp_path / "first", *TINY)
    export = tmp_path / "first" / "eval" / "training_5" / "teacher_checkpoint.pth"
    teacher = torch.load(export, weights_only=True)["teacher"]
    trainer = train_module.Trainer(setup(_args(tmp_path / "second", *TINY, f"MODEL.WEIGHTS={export}")))
    assert trainer.resume_or_load(resume=True) == 0
    for name, value in teacher.items():
        assert torch.equal(trainer.model.student.state_dict()[name], value), name
        assert torch.equal(trainer.model.teacher.state_dict()[name], value), name


def test_model_weights_that_do_not_fit_are_refused_with_the_keys(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"teacher": {"backbone.cls_token": torch.zeros(1, 1, 7)}}, bad)
    trainer = train_module.Trainer(setup(_args(tmp_path / "run", *TINY, f"MODEL.WEIGHTS={bad}")))
    with pytest.raises(UserError, match=r"missing keys \d+: .*shape mismatches 1: backbone.cls_token \[1, 1, 7\] in file"):
        trainer.resume_or_load(resume=True)
