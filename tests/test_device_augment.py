"""Crops rendered from plans, batched on the device ("multiview_device") or per study ("multiview"):
the resampler against F.interpolate, every photometric op against dinov2's per-image ops, both
pipelines against each other through the real loader and trainer, and bench/data_pipeline.py."""
import dataclasses
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import single_error_line
from dinov2.data import make_pipeline
from dinov2.data.loaders import make_training_loader
from dinov2.data.transforms import Normalize, adjust_brightness, gaussian_blur, resized_crop
from dinov2.train import train as train_module
from dinov2.utils.config import get_cfg, setup
from vet_ext.pretraining import crop_render
from vet_ext.pretraining.crop_render import BRIGHTNESS, CONTRAST, CropGroupPlan, render_crops, resize_crops_matmul

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SMALL_CROPS = ["student.patch_size=14", "crops.global_crops_size=56", "crops.local_crops_size=28",
               "crops.local_crops_number=2"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def render_batched_on_cpu(monkeypatch) -> None:
    """Render CPU tensors the way an accelerator does: batched matmuls and selects."""
    monkeypatch.setattr(crop_render, "batched_on", lambda device: True)


def reference_resize(view: torch.Tensor, box, size: int, flip: bool) -> torch.Tensor:
    """dinov2's resized_crop (F.interpolate bicubic antialias, then clamp), then the flip."""
    crop = resized_crop(view[None], *box, size)[0]
    return crop.flip(-1) if flip else crop


# ------------------------------------------------------------------------------------ resampling

RESAMPLING_CASES = {
    "downscale": ((5, 7, 90, 80), 28),
    "upscale": ((10, 20, 12, 9), 28),
    "identity size": ((3, 4, 28, 28), 28),
    "non-square box": ((0, 10, 30, 70), 28),
    "whole view, touching every border": ((0, 0, 96, 120), 56),
    "bottom-right corner": ((80, 100, 16, 20), 56),
    "one-pixel box": ((95, 119, 1, 1), 14),
}


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("case", RESAMPLING_CASES, ids=str)
def test_matmul_resampling_equals_antialiased_bicubic(case, flip):
    box, size = RESAMPLING_CASES[case]
    views = torch.rand(2, 96, 120, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[box], [box]])
    crops = resize_crops_matmul(views, boxes, torch.tensor([[flip], [flip]]), size)
    for index in range(2):
        expected = reference_resize(views[index], box, size, flip)
        torch.testing.assert_close(crops[index, 0], expected, rtol=0, atol=1e-5)


def test_matmul_resampling_of_several_crops_per_view_on_a_padded_canvas():
    """Each view's crops share one matmul; the zero padding around the smaller view is never sampled."""
    generator = torch.Generator().manual_seed(1)
    small, large = torch.rand(40, 50, generator=generator), torch.rand(70, 64, generator=generator)
    canvas = torch.zeros(2, 70, 64)
    canvas[0, :40, :50], canvas[1] = small, large
    boxes = torch.tensor([[[0, 0, 40, 50], [10, 25, 30, 25], [39, 49, 1, 1]], [[0, 0, 70, 64], [35, 2, 35, 20], [5, 5, 9, 12]]])
    flips = torch.tensor([[False, True, False], [True, False, True]])
    crops = resize_crops_matmul(canvas, boxes, flips, 21)
    for view, image in enumerate((small, large)):
        for crop in range(3):
            expected = reference_resize(image, boxes[view, crop].tolist(), 21, bool(flips[view, crop]))
            torch.testing.assert_close(crops[view, crop], expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------ photometry


def reference_crop(view: torch.Tensor, plan: CropGroupPlan, size: int) -> torch.Tensor:
    """One crop made by dinov2's per-image ops and the formulas of the config's changes, one by one."""
    crop = reference_resize(view, plan.boxes.tolist(), size, bool(plan.hflip))[None]
    if plan.intensity:
        brightness, contrast, gamma = plan.intensity_factors.tolist()
        for change in plan.intensity_order.tolist():
            if change == BRIGHTNESS:
                crop = adjust_brightness(crop, brightness)
            elif change == CONTRAST:
                crop = (contrast * crop + (1 - contrast) * crop.mean()).clamp(0, 1)
            else:
                crop = crop.clamp(0, 1).pow(gamma)
    if plan.blur_sigma > 0:
        crop = gaussian_blur(crop, 9, float(plan.blur_sigma))
    if plan.solarize:
        crop = torch.where(crop >= 128 / 255, 1 - crop, crop)
    return Normalize(MEAN, STD)(crop.expand(3, -1, -1))


UNCHANGED_CROP = 6  # in every_change_plan: no intensity change, blur or solarisation


def every_change_plan(n_views: int, height: int, width: int) -> CropGroupPlan:
    """Per view: the 6 intensity orders (with strong factors), no jitter, blurs, solarisation, a flip."""
    orders = list(itertools.permutations(range(3)))
    n = len(orders) + 4
    generator = torch.Generator().manual_seed(2)
    tops = torch.randint(0, height // 3, (n_views, n), generator=generator)
    lefts = torch.randint(0, width // 3, (n_views, n), generator=generator)
    heights = torch.randint(8, 2 * height // 3, (n_views, n), generator=generator)
    widths = torch.randint(8, 2 * width // 3, (n_views, n), generator=generator)
    hflip = torch.zeros(n_views, n, dtype=torch.bool)
    hflip[:, -1] = True
    intensity = torch.ones(n_views, n, dtype=torch.bool)
    intensity[:, len(orders)] = False
    order = torch.tensor(orders + [(0, 1, 2)] * 4).expand(n_views, n, 3)
    factors = torch.tensor([1.35, 0.6, 0.75]).expand(n_views, n, 3)
    sigma = torch.zeros(n_views, n)
    sigma[:, 1], sigma[:, len(orders) + 1], sigma[:, len(orders) + 2] = 0.4, 1.9, 0.8
    solarize = torch.zeros(n_views, n, dtype=torch.bool)
    solarize[:, 2], solarize[:, len(orders) + 2] = True, True
    boxes = torch.stack([tops, lefts, heights, widths], dim=-1)
    return CropGroupPlan(boxes, hflip, intensity, order.clone(), factors.clone(), sigma, solarize)


@pytest.mark.parametrize("batched", [False, True], ids=["per crop", "batched"])
def test_rendering_a_plan_equals_the_per_image_ops_crop_by_crop(batched, monkeypatch):
    if batched:
        render_batched_on_cpu(monkeypatch)
    ramp = torch.linspace(0.1, 0.9, 72)[None, :] * torch.linspace(0.5, 1.0, 60)[:, None]
    texture = torch.rand(2, 60, 72, generator=torch.Generator().manual_seed(3)) * 0.1
    views = ((ramp + texture) * 255).round().to(torch.uint8)
    plan = every_change_plan(2, 60, 72)
    crops = render_crops(views, plan, 28, MEAN, STD)
    assert crops.shape == (2, *plan.shape[1:], 3, 28, 28)
    for view, crop in itertools.product(range(2), range(plan.shape[1])):
        expected = reference_crop(views[view].float() / 255, plan.map(lambda t: t[view, crop]), 28)
        torch.testing.assert_close(crops[view, crop], expected, rtol=0, atol=1e-4)
    # the plan exercises every change: each crop but the unchanged one differs from its plain resize
    unchanged = dataclasses.replace(plan, intensity=torch.zeros_like(plan.intensity),
                                    blur_sigma=torch.zeros_like(plan.blur_sigma), solarize=torch.zeros_like(plan.solarize))
    plain = render_crops(views, unchanged, 28, MEAN, STD)
    changed = (crops - plain).abs().amax(dim=(0, 2, 3, 4)) > 0.05
    assert changed.tolist() == [crop != UNCHANGED_CROP for crop in range(plan.shape[1])]


# ------------------------------------------------------------------------------------ pipelines


class StudiesOfDifferentSizes:
    """Studies with 1 to 3 uint8 views, every view of another size (so the batch canvas is padded)."""

    def __len__(self):
        return 9

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        views = [
            torch.randint(0, 256, (1, 50 + 9 * k + 3 * index, 44 + 5 * index - 4 * k), dtype=torch.uint8, generator=generator)
            for k in range(1 + index % 3)
        ]
        return views, index


def first_batches(name: str, n_batches: int = 2, *opts: str) -> list[dict]:
    cfg = get_cfg(opts=[f"train.pipeline={name}", *SMALL_CROPS, *opts])
    pipeline = make_pipeline(cfg)
    loader = iter(make_training_loader(StudiesOfDifferentSizes(), pipeline, batch_size=4, num_workers=0, seed=5))
    batches = [next(loader) for _ in range(n_batches)]
    return [pipeline.on_device(batch) for batch in batches] if pipeline.on_device else batches


@pytest.mark.parametrize("batched", [False, True], ids=["per crop", "batched"])
def test_device_pipeline_gives_the_multiview_batches(batched, monkeypatch):
    options = ("multiview.hflip_probability=0.5",)
    expected = first_batches("multiview", 2, *options)
    if batched:
        render_batched_on_cpu(monkeypatch)
    rendered = first_batches("multiview_device", 2, *options)
    for device_batch, cpu_batch in zip(rendered, expected):
        assert set(device_batch) == set(cpu_batch)
        for key in ("collated_global_crops", "collated_local_crops"):
            assert device_batch[key].dtype == torch.float32
            torch.testing.assert_close(device_batch[key], cpu_batch[key], rtol=0, atol=1e-4)
        for key in ("collated_masks", "teacher_global_index", "masks_weight", "mask_indices_list", "n_masked_patches"):
            assert torch.equal(device_batch[key], cpu_batch[key]), key
        assert (device_batch["upperbound"], device_batch["n_global_crops"]) == (cpu_batch["upperbound"], 4)
    assert rendered[0]["collated_masks"].any() and not torch.equal(rendered[0]["collated_global_crops"][:4], rendered[1]["collated_global_crops"][:4])


def test_device_collate_sends_uint8_views_padded_to_the_batch_canvas():
    cfg = get_cfg(opts=["train.pipeline=multiview_device", *SMALL_CROPS])
    pipeline = make_pipeline(cfg)
    batch = next(iter(make_training_loader(StudiesOfDifferentSizes(), pipeline, batch_size=4, num_workers=0, seed=5)))
    views = batch["views"]
    assert views.dtype == torch.uint8 and views.shape[:2] == (4, 2)
    assert batch.global_plan.boxes.shape == (4, 2, 2, 4) and batch.local_plan.boxes.shape == (4, 2, 2, 4)
    # every box lies inside its own (unpadded) view: the nonzero extent of random pixels
    for study, view in itertools.product(range(4), range(2)):
        rows = views[study, view].any(dim=1).nonzero().max() + 1
        columns = views[study, view].any(dim=0).nonzero().max() + 1
        for boxes in (batch.global_plan.boxes, batch.local_plan.boxes):
            top, left, height, width = boxes[study, view].unbind(-1)
            assert bool(((top + height <= rows) & (left + width <= columns)).all())


# ------------------------------------------------------------------------------------ training


def _losses(pipeline: str, data: Path, output_dir: Path) -> list[float]:
    opts = ["student.arch=vit_test_tiny", "train.batch_size_per_gpu=4", "train.num_workers=0", "train.device=cpu",
            *SMALL_CROPS, "train.OFFICIAL_EPOCH_LENGTH=3", "optim.epochs=1", "optim.warmup_epochs=0",
            "teacher.warmup_teacher_temp_epochs=0", "train.log_period_iterations=1", "dino.head_n_prototypes=128",
            "ibot.head_n_prototypes=128", "train.checkpoint_period_iterations=100", "evaluation.eval_period_iterations=100",
            f"train.dataset_path=VetStudies:root={data}:split=train", f"train.pipeline={pipeline}"]  # fmt: skip
    args = train_module.get_args_parser().parse_args(
        ["--config-file", str(REPO / "configs" / "vetdino" / "demo_cpu.yaml"), "--output-dir", str(output_dir), *opts]
    )
    trainer = train_module.Trainer(setup(args))
    trainer.train(trainer.resume_or_load(resume=False))
    lines = (output_dir / "training_metrics.json").read_text().splitlines()
    return [json.loads(line)["total_loss"] for line in lines]


@pytest.mark.usefixtures("tiny_vit")
@pytest.mark.slow
def test_training_with_the_device_pipeline_gives_the_multiview_losses(phantom_data, tmp_path):
    expected = _losses("multiview", phantom_data, tmp_path / "multiview")
    losses = _losses("multiview_device", phantom_data, tmp_path / "device")
    assert len(losses) == len(expected) == 3 and all(math.isfinite(loss) for loss in losses)
    assert losses == pytest.approx(expected, rel=1e-4, abs=1e-5)


# ------------------------------------------------------------------------------------ bench


@pytest.mark.slow
def test_data_pipeline_bench_reports_rates_and_the_ratio_to_the_step(phantom_data, tmp_path):
    step_json = tmp_path / "step.json"
    step_json.write_text(json.dumps({"train_step smoke": {"rows": [
        {"arch": "vit_base", "mode": "multiview", "studies_per_s": 2.0},
        {"arch": "vit_base", "mode": "singleview", "studies_per_s": None},
    ]}}))  # fmt: skip
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "bench/data_pipeline.py", "--data", str(phantom_data), "--workers", "0", "--batches", "2",
         "--warmup-batches", "0", "--batch-size", "2", "--device", "cpu", "--step-json", str(step_json),
         "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((out / "results.json").read_text())["data_pipeline"]
    rows = {row["pipeline"]: row for row in payload["rows"]}
    assert set(rows) == {"multiview", "multiview_device"}
    for row in rows.values():
        assert row["studies_per_s"] > 0 and row["workers"] == 0
        # multiview_vitb14.yaml: 2 views x (2 global + 10 local crops)
        assert row["crops_per_s"] == pytest.approx(24 * row["studies_per_s"], rel=1e-9)
        assert row["ratio_to_step"] == pytest.approx(row["studies_per_s"] / 2.0, rel=1e-9)
        assert row["meets_1.5x"] == (row["studies_per_s"] >= 3.0)
    assert "| multiview_device |" in (out / "results.md").read_text()
    assert "studies/s" in proc.stdout


@pytest.mark.slow
def test_data_pipeline_bench_names_a_step_file_without_a_rate(tmp_path):
    step_json = tmp_path / "step.json"
    step_json.write_text(json.dumps({"train_step": {"rows": [{"arch": "vit_base", "studies_per_s": None}]}}))
    proc = subprocess.run(
        [sys.executable, "bench/data_pipeline.py", "--step-json", str(step_json), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 2
    error = single_error_line(proc.stderr)
    assert "step.json" in error and "studies_per_s" in error


# ------------------------------------------------------------------------------------ CUDA


@pytest.mark.cuda
@pytest.mark.usefixtures("no_tf32")  # resampling is matmuls (cuBLAS), the blur convolutions (cuDNN)
def test_rendering_on_cuda_equals_rendering_on_cpu():
    generator = torch.Generator().manual_seed(4)
    views = torch.randint(0, 256, (6, 120, 100), dtype=torch.uint8, generator=generator)
    plan = every_change_plan(6, 120, 100)
    on_cpu = render_crops(views, plan, 56, MEAN, STD)
    on_cuda = render_crops(views.cuda(), plan.map(lambda t: t.cuda()), 56, MEAN, STD)
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, rtol=0, atol=1e-4)


@pytest.mark.cuda
def test_rendering_on_cuda_never_waits_for_the_gpu():
    """The batch is rendered between the transfer and the step: a host sync there would stall the GPU."""
    generator = torch.Generator().manual_seed(5)
    views = torch.randint(0, 256, (6, 120, 100), dtype=torch.uint8, generator=generator).cuda()
    plan = every_change_plan(6, 120, 100).map(lambda t: t.cuda())
    render_crops(views, plan, 56, MEAN, STD)  # warm-up: first kernel launches may initialise lazily
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        render_crops(views, plan, 56, MEAN, STD)
    finally:
        torch.cuda.set_sync_debug_mode("default")
