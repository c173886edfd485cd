"""Fine-tuning: it learns a small separable problem, early-stops, resumes, LoRA touches only adapters."""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2.models.weights import extract_backbone_state_dict, load_backbone_weights
from conftest import cli_error
from test_suite import data  # noqa: F401 - prepared two-view studies with two findings
from vet_ext.downstream import finetune
from vet_ext.downstream.finetune import (
    FinetuneOptions,
    Task,
    build_classifier,
    classification_loss,
    infer_task,
    sample_per_label,
)
from tiny import INFERRED_HEADS, make_tiny_vit
from vet_ext.downstream.fitting import make_optimizer

DEPTH = 2


def tiny_backbone():
    """Saved as a released-style file below, so with the head count a load infers."""
    return make_tiny_vit(img_size=32, patch_size=8, depth=DEPTH, num_heads=INFERRED_HEADS)


def spot_image(rng: np.random.Generator, has_spot: bool) -> np.ndarray:
    """Noise (sd 25) with, for class 1, a faint 8 x 8 spot (+25) somewhere: a finding to detect."""
    image = rng.normal(90, 25, (32, 32))
    if has_spot:
        row, column = rng.integers(0, 24, 2)
        image[row : row + 8, column : column + 8] += 25
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    """Disjoint train / val ImageFolders of the spot problem and a teacher export of a tiny ViT."""
    root = tmp_path_factory.mktemp("spots")
    rng = np.random.default_rng(0)
    for split, count in (("train", 48), ("val", 24)):
        for index in range(count):
            label = index % 2
            folder = root / split / ("spot" if label else "clear")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(spot_image(rng, bool(label))).save(folder / f"{index}.png")
    torch.manual_seed(0)
    backbone = tiny_backbone()
    weights = root / "teacher_checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}}, weights)
    return root, weights, backbone.state_dict()


def run(problem, output_dir, *extra: str) -> None:
    root, weights, _ = problem
    finetune.main([
        "--weights", str(weights), "--train-dataset", f"ImageFolder:root={root / 'train'}",
        "--val-dataset", f"ImageFolder:root={root / 'val'}", "--output-dir", str(output_dir),
        "--batch-size", "16", "--image-size", "32", "--num-workers", "0", "--warmup-epochs", "0", *extra,
    ])


def results(output_dir) -> dict:
    return json.loads((output_dir / "results.json").read_text())


def test_fine_tuning_learns_the_problem_and_stops_early(problem, tmp_path):
    run(problem, tmp_path, "--epochs", "30", "--patience", "2", "--lr", "3e-3", "--layerwise-decay", "1.0", "--test-dataset",
        f"ImageFolder:root={problem[0] / 'val'}")
    payload = results(tmp_path)["fine-tune"]
    history = payload["details"]["epochs"]
    aps = [row["AP"] for row in history]
    assert max(aps) >= 90.0, aps
    assert max(aps) > aps[0], "validation AP should improve over training"
    best_epoch = int(np.argmax(aps)) + 1
    assert len(history) == best_epoch + 2 < 30, "two epochs without improvement end the run"
    rows = {row["split"]: row for row in payload["rows"]}
    assert rows["val"]["AP"] == pytest.approx(max(aps))  # the reported model is the best epoch's
    assert rows["test"]["AP"] == pytest.approx(rows["val"]["AP"])  # same images
    assert (tmp_path / "results.md").read_text().count("| val |") == 1

    best = torch.load(tmp_path / "best.pth", weights_only=True)
    assert best["epoch"] == best_epoch and best["metrics"]["AP"] == pytest.approx(max(aps))
    load_backbone_weights(tiny_backbone(), tmp_path / "best.pth")  # strict: a plain DINOv2 backbone
    assert set(best["model"]) - {f"backbone.{k}" for k in problem[2]} == {"head.weight", "head.bias"}


def test_lora_moves_only_the_attention_projections(problem, tmp_path):
    run(problem, tmp_path, "--epochs", "2", "--peft", "lora", "--lora-rank", "2", "--lr", "1e-2")
    merged = extract_backbone_state_dict(torch.load(tmp_path / "best.pth", weights_only=True))
    original = problem[2]
    assert merged.keys() == original.keys()
    adapted = {f"blocks.0.{i}.attn.{p}.weight" for i in range(DEPTH) for p in ("qkv", "proj")}
    changed = {key for key in original if not torch.equal(merged[key], original[key])}
    assert changed and changed <= adapted


def test_resume_continues_the_recorded_history(problem, tmp_path):
    run(problem, tmp_path, "--epochs", "2", "--patience", "10")
    first = results(tmp_path)["fine-tune"]["details"]["epochs"]
    last = torch.load(tmp_path / "last.pth", weights_only=True)
    assert last["state"]["epoch"] == 2
    run(problem, tmp_path, "--epochs", "3", "--patience", "10")
    resumed = results(tmp_path)["fine-tune"]["details"]["epochs"]
    assert [row["epoch"] for row in resumed] == [1, 2, 3]
    assert resumed[:2] == first


def test_few_shot_reports_mean_and_std_over_tries(problem, tmp_path):
    run(problem, tmp_path, "--epochs", "1", "--n-per-class", "2,4", "--n-tries", "2")
    rows = results(tmp_path)["fine-tune few-shot"]["rows"]
    assert [(row["train"], row["split"]) for row in rows] == [("2 per class", "val"), ("4 per class", "val")]
    assert set(rows[0]["AP"]) == {"mean", "std"}
    assert not (tmp_path / "best.pth").exists(), "few-shot tries keep no checkpoints"


def test_missing_annotations_do_not_contribute_to_the_loss():
    task = Task("multilabel", 3, "macro AP")
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    targets = torch.tensor([[1.0, float("nan"), 0.0], [float("nan"), 1.0, float("nan")]])
    # mean over the three annotated entries of -log(sigmoid(z)) for positives, -log(1 - sigmoid(z)) for negatives
    expected = (
        -torch.log(torch.sigmoid(torch.tensor(2.0)))
        - torch.log(1 - torch.sigmoid(torch.tensor(0.5)))
        - torch.log(torch.sigmoid(torch.tensor(3.0)))
    ) / 3
    torch.testing.assert_close(classification_loss(task, logits, targets), expected)
    nothing = torch.full((2, 3), float("nan"))
    assert classification_loss(task, logits.requires_grad_(), nothing).item() == 0.0


def test_task_follows_the_targets():
    assert infer_task([np.array([0, 1, -1]), np.array([1, 0])], []) == Task("binary", 1, "AP")
    assert infer_task([np.array([0, 2, 1]), np.array([3, 0])], []).num_outputs == 4
    multi = infer_task([np.zeros((2, 3), np.float32)] * 2, ["a", "b", "c"])
    assert (multi.kind, multi.num_outputs, multi.metric) == ("multilabel", 3, "macro AP")


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_optimizer_decays_the_learning_rate_towards_the_input(peft):
    options = FinetuneOptions(layerwise_decay=0.5, peft=peft, lora_rank=2)
    model = build_classifier(tiny_backbone(), Task("binary", 1, "AP"), options)
    optimizer = make_optimizer(model, [], options)
    multiplier = {id(p): group["lr_multiplier"] for group in optimizer.param_groups for p in group["params"]}
    names = {id(p): name for name, p in model.named_parameters()}
    optimised = {names[i] for i in multiplier}
    if peft == "lora":
        assert optimised == {n for n in names.values() if "lora_" in n or n.startswith("head.")}
    else:
        assert optimised == set(names.values())
        assert multiplier[id(model.backbone.patch_embed.proj.weight)] == 0.5 ** (DEPTH + 1)
    last_block = [p for n, p in model.named_parameters() if f"blocks.0.{DEPTH - 1}.attn" in n and p.requires_grad]
    assert last_block and all(multiplier[id(p)] == 0.5 for p in last_block)
    assert multiplier[id(model.head.weight)] == 1.0


@pytest.mark.parametrize(
    "swap, message",
    [({"--train-dataset": "Nope:root=x"}, "unknown dataset 'Nope'"), ({"--weights": "missing.pth"}, "not found")],
)
def test_bad_input_is_one_error_line(problem, tmp_path, monkeypatch, capsys, swap, message):
    root, weights, _ = problem
    arguments = {
        "--weights": str(weights), "--train-dataset": f"ImageFolder:root={root / 'train'}",
        "--val-dataset": f"ImageFolder:root={root / 'val'}", "--output-dir": str(tmp_path), **swap,
    }
    monkeypatch.setattr(sys, "argv", ["finetune", *[item for pair in arguments.items() for item in pair]])
    assert message in cli_error(finetune.main, capsys)


def test_findings_of_prepared_studies_train_with_bce_and_per_label_results(data, problem, tmp_path):
    finetune.main([
        "--weights", str(problem[1]), "--train-dataset", f"VetImages:root={data}:split=train:labels=all",
        "--val-dataset", f"VetImages:root={data}:split=val:labels=all", "--output-dir", str(tmp_path),
        "--epochs", "2", "--batch-size", "16", "--image-size", "32", "--num-workers", "0",
    ])
    payload = results(tmp_path)["fine-tune"]
    assert payload["rows"][0]["split"] == "val" and "macro AP" in payload["rows"][0]
    assert [row["label"] for row in payload["details"]["val per-label AP / AUC"]] == ["mass", "effusion"]
    best = torch.load(tmp_path / "best.pth", weights_only=True)
    assert best["task"]["kind"] == "multilabel" and best["model"]["head.weight"].shape == (2, 64)


def test_few_shot_findings_take_n_positives_of_every_label():
    targets = np.array([[1, 0], [1, np.nan], [0, 1], [1, 1], [0, 1], [0, 0]], dtype=np.float32)
    for seed in range(5):
        chosen = sample_per_label(targets, 1, seed)
        assert all((targets[chosen, j] == 1).sum() >= 1 for j in range(2))
        assert len(chosen) <= 2
    assert len({tuple(sample_per_label(targets, 1, seed)) for seed in range(10)}) > 1
