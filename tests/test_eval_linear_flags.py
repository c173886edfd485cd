"""Upstream's remaining linear-eval flags: --classifier-fpath, class mappings, --test-metric-types.

One short training run (A) on small ImageFolder trees is shared by the tests; other runs start
from its checkpoints. Expected numbers are recomputed here from the backbone and the saved
head weights, without dinov2.eval.linear's own token or head code.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli_error
from dinov2.data import make_dataset
from dinov2.data.datasets import SyntheticImages
from dinov2.eval import linear
from dinov2.eval.linear import get_args_parser
from dinov2.eval.linear_heads import load_class_mapping
from dinov2.eval.setup import make_eval_transform
from dinov2.utils.errors import UserError
from tiny import INFERRED_HEADS, make_tiny_vit

SIZE = 56
CLASS_STYLES = {"a": 0, "b": 1, "c": 2}  # folder name -> Synthetic class whose images it holds


def _image_folder(root: Path, counts: dict[str, int], offset: int) -> str:
    """ImageFolder tree whose folder `name` holds `counts[name]` images of Synthetic class CLASS_STYLES[name]."""
    synthetic = SyntheticImages(n=3 * (offset + max(counts.values())), size=SIZE, classes=3)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(offset, offset + count):
            image = synthetic.image(3 * i + CLASS_STYLES[name])
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / name / f"{i:03d}.png")
    return f"ImageFolder:root={root}"


class Setup:
    """Weights, datasets and the argument lists every run shares."""

    def __init__(self, root: Path):
        torch.manual_seed(3)
        self.model = make_tiny_vit(img_size=SIZE, patch_size=14, num_heads=INFERRED_HEADS, init_values=1.0, block_chunks=0).eval()
        self.weights = root / "teacher_checkpoint.pth"
        torch.save({"teacher": {f"backbone.{k}": v for k, v in self.model.state_dict().items()}}, self.weights)
        self.train = _image_folder(root / "train", {"a": 10, "b": 10, "c": 10}, offset=0)
        self.val = _image_folder(root / "val", {"a": 5, "b": 5, "c": 5}, offset=10)
        self.subset = _image_folder(root / "subset", {"a": 6, "c": 6}, offset=15)  # classes a=0, c=1
        self.imbalanced = _image_folder(root / "imbalanced", {"a": 12, "b": 2, "c": 3}, offset=21)
        self.root = root
        self.subset_mapping = self.mapping("subset_mapping.npy", [0, 2])  # a -> output 0, c -> output 2

    def argv(self, output: str, *extra: str, train: str | None = None) -> list[str]:
        return [
            "--pretrained-weights", str(self.weights), "--train-dataset", train or self.train,
            "--val-dataset", self.val, "--crop-size", str(SIZE), "--num-workers", "0", "--batch-size", "8",
            "--epochs", "2", "--epoch-length", "10", "--save-checkpoint-frequency", "1",
            "--learning-rates", "2", "8", "--output-dir", str(self.root / output), *extra,
        ]

    def run(self, output: str, *extra: str, train: str | None = None) -> dict:
        assert linear.main(get_args_parser().parse_args(self.argv(output, *extra, train=train))) == 0
        return json.loads((self.root / output / "results.json").read_text())["linear"]

    def mapping(self, name: str, indices) -> str:
        path = self.root / name
        np.save(path, np.asarray(indices))
        return str(path)

    @torch.no_grad()
    def logits(self, output: str, checkpoint: str, head: str, dataset_str: str) -> tuple[torch.Tensor, np.ndarray]:
        """A saved head's logits on a dataset, from the backbone's layers and the raw weight matrix."""
        args = get_args_parser().parse_args(self.argv(output))
        dataset = make_dataset(dataset_str, transform=make_eval_transform(args))
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        layers = self.model.get_intermediate_layers(images, n=2, return_class_token=True, norm=True)
        n_blocks = int(head.split("_")[1])
        parts = [class_token for _, class_token in layers[2 - n_blocks :]]
        if "avgpool_True" in head:
            parts.append(layers[-1][0].mean(dim=1))
        heads = torch.load(self.root / output / checkpoint, weights_only=True)["heads"]
        weight, bias = heads[f"{head}.linear.weight"], heads[f"{head}.linear.bias"]
        return torch.cat(parts, dim=1) @ weight.T + bias, np.array([dataset[i][1] for i in range(len(dataset))])


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    setup = Setup(tmp_path_factory.mktemp("linear_flags"))
    setup.results_a = setup.run(
        "A", "--test-datasets", setup.val, setup.subset, "--test-metric-types", "per_class_accuracy",
        "mean_accuracy", "--test-class-mapping-fpaths", "None", setup.subset_mapping,
    )
    yield setup
    torch.set_num_threads(threads)


def _best_head(results: dict) -> str:
    return results["info"]["best head (on val)"]


def test_class_mapping_scores_the_mapped_logits(setup):
    head = _best_head(setup.results_a)
    logits, targets = setup.logits("A", "model_0000019.pth", head, setup.subset)
    mapped_top1 = 100.0 * (logits[:, [0, 2]].argmax(dim=1).numpy() == targets).mean()
    unmapped_top1 = 100.0 * (logits[:, :2].argmax(dim=1).numpy() == targets).mean()
    subset_row = setup.results_a["rows"][1]
    assert subset_row["dataset"] == setup.subset
    assert subset_row["top-1"] == pytest.approx(mapped_top1)
    assert mapped_top1 != unmapped_top1  # the mapping changes the answer, so the row shows it was applied
    assert setup.subset_mapping in setup.results_a["info"]["class mappings"]


def test_per_class_table_of_the_per_class_test_set_only(setup):
    head = _best_head(setup.results_a)
    logits, targets = setup.logits("A", "model_0000019.pth", head, setup.val)
    predictions = logits.argmax(dim=1).numpy()
    table = setup.results_a["details"]["per-class accuracy"]
    assert {row["dataset"] for row in table} == {setup.val}  # the subset test set asked for mean_accuracy
    assert [(row["class"], row["name"], row["samples"]) for row in table] == [(0, "a", 5), (1, "b", 5), (2, "c", 5)]
    for row in table:
        expected = 100.0 * (predictions[targets == row["class"]] == row["class"]).mean()
        assert row["accuracy"] == pytest.approx(expected)
    accuracies = [row["accuracy"] for row in table]
    assert len(set(accuracies)) > 1  # classes differ: the mean below is not trivially equal
    val_row = setup.results_a["rows"][0]
    assert np.mean(accuracies) == pytest.approx(val_row["mean per-class acc"])


def test_per_class_val_metric_picks_the_head_by_its_mean(setup):
    """On a val set of 12 a, 2 b, 3 c, heads that always answer "a" have a better top-1 (12/17) and a worse
    mean per-class accuracy (1/3) than a trained head made never to answer "a" (at most 5/17, up to 2/3)."""
    final = torch.load(setup.root / "A" / "model_0000019.pth", weights_only=True)
    names = list(dict.fromkeys(key.rsplit(".linear.", 1)[0] for key in final["heads"]))
    logits, targets = setup.logits("A", "model_0000019.pth", names[-1], setup.imbalanced)
    logits[:, 0] = -1e4
    never_a = logits.argmax(dim=1).numpy()
    mean_per_class = np.mean([(never_a[targets == c] == c).mean() for c in range(3)])
    assert mean_per_class > 0.4  # the premise: the trained head gets enough b and c right
    heads = {key: value.clone() for key, value in final["heads"].items()}
    for name in names[:-1]:  # always "a"
        heads[f"{name}.linear.weight"].zero_()
        heads[f"{name}.linear.bias"] = torch.tensor([1.0, 0.0, 0.0])
    heads[f"{names[-1]}.linear.weight"][0] = 0.0  # never "a"
    heads[f"{names[-1]}.linear.bias"][0] = -1e4
    crafted = setup.root / "crafted_heads.pth"
    torch.save({"heads": heads, "iteration": 19}, crafted)
    common = ("--classifier-fpath", str(crafted), "--val-dataset", setup.imbalanced)
    by_mean = setup.run("per_class_val", *common, "--val-metric-type", "per_class_accuracy")
    assert _best_head(by_mean) == names[-1] and by_mean["info"]["chosen by"].startswith("mean per-class acc")
    assert by_mean["rows"][0]["mean per-class acc"] == pytest.approx(100 * mean_per_class)
    assert {row["dataset"] for row in by_mean["details"]["per-class accuracy"]} == {setup.imbalanced}  # test = val
    by_top1 = setup.run("top1_val", *common, "--val-metric-type", "mean_accuracy")
    assert _best_head(by_top1) == names[0] and by_top1["rows"][0]["top-1"] == pytest.approx(1200 / 17)


def test_permuting_mapping_on_heads_from_the_final_checkpoint(setup):
    permuted = setup.mapping("permuted.npy", [2, 0])  # a scored by output 2, c by output 0
    results = setup.run("permuted", "--classifier-fpath", str(setup.root / "A" / "model_0000019.pth"),
                        "--test-datasets", setup.subset, "--test-class-mapping-fpaths", permuted)
    logits, targets = setup.logits("A", "model_0000019.pth", _best_head(results), setup.subset)
    expected = 100.0 * (logits[:, [2, 0]].argmax(dim=1).numpy() == targets).mean()
    assert results["rows"][0]["top-1"] == pytest.approx(expected)


def test_final_checkpoint_only_evaluates_and_reports_the_same(setup):
    final = setup.root / "A" / "model_0000019.pth"
    results = setup.run(
        "B", "--classifier-fpath", str(final), "--test-datasets", setup.val, setup.subset, "--test-metric-types",
        "per_class_accuracy", "mean_accuracy", "--test-class-mapping-fpaths", "None", setup.subset_mapping,
        train=f"ImageFolder:root={setup.root / 'no_such_dir'}",  # nothing left to train: never read
    )
    assert results["rows"] == setup.results_a["rows"]
    assert results["details"] == setup.results_a["details"]
    assert _best_head(results) == _best_head(setup.results_a)
    assert results["info"]["training"].startswith("none")
    assert not (setup.root / "B" / "running_checkpoint_linear_eval.pth").exists()


def test_mid_run_checkpoint_continues_to_the_same_heads(setup):
    results = setup.run("C", "--classifier-fpath", str(setup.root / "A" / "model_0000009.pth"))
    final_a = torch.load(setup.root / "A" / "model_0000019.pth", weights_only=True)
    final_c = torch.load(setup.root / "C" / "model_0000019.pth", weights_only=True)
    assert final_c["iteration"] == 19 and "model_0000009.pth" not in {p.name for p in (setup.root / "C").iterdir()}
    for key, value in final_a["heads"].items():
        torch.testing.assert_close(final_c["heads"][key], value, rtol=0, atol=1e-6)
    row, row_a = results["rows"][0], setup.results_a["rows"][0]
    assert row.keys() == row_a.keys() and all(row[key] == pytest.approx(row_a[key]) for key in row if key != "dataset")


def test_upstream_fvcore_layout_of_the_heads_loads(setup):
    """Upstream saves AllClassifiers (its ModuleDict under `classifiers_dict`) as "model"."""
    ours = torch.load(setup.root / "A" / "model_0000019.pth", weights_only=True)
    upstream = {"model": {f"classifiers_dict.{key}": value for key, value in ours["heads"].items()},
                "optimizer": ours["optimizer"], "scheduler": ours["scheduler"], "iteration": ours["iteration"]}
    torch.save(upstream, setup.root / "upstream_heads.pth")
    results = setup.run("upstream", "--classifier-fpath", str(setup.root / "upstream_heads.pth"))
    assert results["rows"][0] == setup.results_a["rows"][0] and results["info"]["training"].startswith("none")


def test_running_checkpoint_of_the_run_wins_over_the_given_file(setup):
    """Upstream's resume_or_load order: a finished run's own checkpoint is used, the given file (no heads
    in it) is not read; with --no-resume it is, and refused."""
    (setup.root / "G").mkdir()
    running = "running_checkpoint_linear_eval.pth"
    (setup.root / "G" / running).write_bytes((setup.root / "A" / running).read_bytes())
    results = setup.run("G", "--classifier-fpath", str(setup.weights))
    assert results["info"]["training"].startswith("none") and results["rows"][0] == setup.results_a["rows"][0]
    with pytest.raises(UserError, match="teacher_checkpoint.pth: holds no linear heads"):
        setup.run("G", "--classifier-fpath", str(setup.weights), "--no-resume")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make_file, message",
    [
        (lambda s: s.root / "missing.pth", "missing.pth: linear heads checkpoint not found"),
        (lambda s: _write(s.root / "garbage.pth", b"not a checkpoint"), "garbage.pth: not a PyTorch checkpoint"),
        (lambda s: s.weights, "teacher_checkpoint.pth: holds no linear heads"),
    ],
)
def test_bad_classifier_file_is_one_error_line(setup, capsys, make_file, message):
    args = get_args_parser().parse_args(setup.argv("bad", "--classifier-fpath", str(make_file(setup))))
    assert message in cli_error(lambda: linear.main(args), capsys)


def test_heads_that_do_not_fit_name_the_file(setup):
    mid = setup.root / "A" / "model_0000009.pth"
    with pytest.raises(UserError, match=r"model_0000009.pth: linear heads that do not fit .*lr_0_"):
        setup.run("D", "--classifier-fpath", str(mid), "--learning-rates", "3", "--no-resume")
    with pytest.raises(UserError, match=r"model_0000009.pth: .*schedule"):  # continuing needs A's 20 iterations
        setup.run("D", "--classifier-fpath", str(mid), "--epochs", "3", "--no-resume")


def test_out_of_range_mapping_is_refused_naming_the_file(setup):
    too_far = setup.mapping("too_far.npy", [0, 3])  # the heads have 3 outputs
    with pytest.raises(UserError, match=r"too_far.npy: index 3 is out of range .* 3 outputs"):
        setup.run("E", "--test-datasets", setup.subset, "--test-class-mapping-fpaths", too_far,
                  "--classifier-fpath", str(setup.root / "A" / "model_0000019.pth"))


@pytest.mark.parametrize(
    "array, message",
    [
        (np.array([0.0, 2.0]), "1-D integer array"),
        (np.array([[0, 2]]), "1-D integer array"),
        (np.array([0, -1]), "no negative index"),
    ],
)
def test_malformed_mapping_files(tmp_path, array, message):
    path = tmp_path / "mapping.npy"
    np.save(path, array)
    with pytest.raises(UserError, match=f"mapping.npy: .*{message}"):
        load_class_mapping(str(path))
    assert load_class_mapping("None") is None and load_class_mapping(None) is None


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--test-metric-types", "per_class_accuracy"], "--test-metric-types has 1 entries for 2 test dataset"),
        (["--test-class-mapping-fpaths", "m.npy", "m.npy", "m.npy"], "--test-class-mapping-fpaths has 3 entries"),
        (["--test-metric-types", "mean_accuracy", "imagenet_real_accuracy"], "ImageNet-ReaL labels"),
    ],
)
def test_counts_and_unavailable_metric_are_one_error_line(setup, capsys, extra, message):
    args = get_args_parser().parse_args(setup.argv("F", "--test-datasets", setup.val, setup.subset, *extra))
    assert message in cli_error(lambda: linear.main(args), capsys)
