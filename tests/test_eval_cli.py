"""Evaluation commands end to end: model set-up from every weights layout, k-NN CLI, errors, results files."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import cli_error
from dinov2.configs import get_default_config
from dinov2.eval import knn
from dinov2.eval.results import markdown_table, write_results
from dinov2.eval.setup import get_args_parser, setup_and_build_model
from dinov2.utils.config import write_config
from tiny import INFERRED_HEADS, TINY_VIT, make_tiny_vit

REPO = Path(__file__).resolve().parents[1]


def _tiny_vit(**kwargs):
    """Saved as a released file unless a run config goes with it, hence the inferred head count."""
    torch.manual_seed(1)
    settings = dict(img_size=56, patch_size=14, num_heads=INFERRED_HEADS, init_values=1.0, block_chunks=0)
    return make_tiny_vit(**{**settings, **kwargs}).eval()


def _teacher_export(model: torch.nn.Module, path: Path) -> Path:
    """Our trainer's eval export: backbone keys under "backbone." plus head keys that eval ignores."""
    path.parent.mkdir(parents=True, exist_ok=True)
    teacher = {f"backbone.{key}": value for key, value in model.state_dict().items()}
    teacher["dino_head.last_layer.weight_g"] = torch.ones(8, 1)
    torch.save({"teacher": teacher}, path)
    return path


def _setup_args(*argv: str):
    return get_args_parser().parse_args(list(argv))


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> None:
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(a(images), b(images))


def test_hub_file_without_config_loads_with_inferred_architecture(tmp_path):
    source = _tiny_vit(num_register_tokens=2)
    torch.save(source.state_dict(), tmp_path / "hub.pth")
    model, dtype = setup_and_build_model(_setup_args("--pretrained-weights", str(tmp_path / "hub.pth")))
    assert dtype == torch.float32 and not model.training
    assert model.num_register_tokens == 2 and model.interpolate_offset == 0.0  # released _reg models' setting
    model.interpolate_offset, model.interpolate_antialias = source.interpolate_offset, source.interpolate_antialias
    _same_outputs(model, source)


def test_teacher_export_uses_its_run_config(tmp_path, tiny_vit):
    cfg = get_default_config()
    cfg.student.arch, cfg.student.patch_size, cfg.crops.global_crops_size = tiny_vit, 14, 56
    write_config(cfg, tmp_path)
    source = _tiny_vit(num_heads=TINY_VIT["num_heads"], init_values=1e-5, interpolate_offset=0.1)
    weights = _teacher_export(source, tmp_path / "eval" / "training_9" / "teacher_checkpoint.pth")
    model, _ = setup_and_build_model(_setup_args("--pretrained-weights", str(weights)))
    _same_outputs(model, source)
    # the same file against a config whose architecture differs: one error naming the file and the keys
    OmegaConf.save(OmegaConf.create({"student": {"arch": tiny_vit, "patch_size": 14, "ffn_layer": "swiglu"},
                                     "crops": {"global_crops_size": 56}}), tmp_path / "other.yaml")
    with pytest.raises(ValueError, match=r"teacher_checkpoint.pth: .*(missing|unexpected) keys"):
        setup_and_build_model(_setup_args("--pretrained-weights", str(weights), "--config-file",
                                          str(tmp_path / "other.yaml")))


@pytest.mark.slow
def test_knn_command_end_to_end(tmp_path):
    weights = _teacher_export(_tiny_vit(), tmp_path / "teacher_checkpoint.pth")
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "dinov2.eval.knn", "--pretrained-weights", str(weights),
        "--train-dataset", "Synthetic:n=64:size=56", "--val-dataset", "Synthetic:n=32:size=56",
        "--crop-size", "56", "--nb_knn", "5", "20", "--batch-size", "32", "--num-workers", "0",
        "--output-dir", str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| train | k | top-1 | top-5 |" in done.stdout and "k-NN done" in done.stdout
    results = json.loads((out / "results.json").read_text())["k-NN"]
    assert [(row["train"], row["k"]) for row in results["rows"]] == [("full", 5), ("full", 20)]
    assert all(0 <= row["top-1"] <= 100 for row in results["rows"])
    assert "## k-NN" in (out / "results.md").read_text()
    upstream = [json.loads(line) for line in (out / "results_eval_knn.json").read_text().splitlines()]
    assert {"('full', 5) Top 1", "('full', 20) Top 5"} <= {key for record in upstream for key in record}


@pytest.mark.slow
def test_knn_script_form_runs():
    done = subprocess.run([sys.executable, str(REPO / "dinov2" / "eval" / "knn.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--nb_knn" in done.stdout and "--level" in done.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--train-dataset", "Nope:n=3", "--val-dataset", "Synthetic:n=4"], "unknown dataset 'Nope'"),
        (["--train-dataset", "Synthetic:n=4", "--val-dataset", "Synthetic:n=4"], "weights file not found"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, argv, message):
    args = knn.get_args_parser().parse_args(
        [*argv, "--pretrained-weights", str(tmp_path / "missing.pth"), "--output-dir", str(tmp_path)]
    )
    assert message in cli_error(lambda: knn.main(args), capsys)


def test_results_json_keeps_every_evaluation_and_markdown_follows(tmp_path):
    write_results(tmp_path, "k-NN", [{"k": 10, "top-1": 81.234}], echo=False)
    write_results(tmp_path, "linear", [{"dataset": "a|b", "top-1": {"mean": 50.0, "std": 1.5}}],
                  details={"per-label": [{"label": "x", "AP": float("nan")}]}, info={"C": 1e-6})
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == ["k-NN", "linear"]
    markdown = (tmp_path / "results.md").read_text()
    assert "| 10 | 81.23 |" in markdown and "| a\\|b | 50.00 ± 1.50 |" in markdown
    assert "### per-label" in markdown and "| x | - |" in markdown and "- C: 1e-06" in markdown
    assert not list(tmp_path.glob(".*tmp"))


def test_markdown_table_columns_and_missing_cells():
    table = markdown_table([{"a": 1, "b": 2.0}, {"a": 3}], columns=["b", "a"])
    assert table.splitlines() == ["| b | a |", "| --- | --- |", "| 2.00 | 1 |", "| - | 3 |"]
