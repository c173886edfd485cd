"""Side-by-side comparison of backbones on a prepared radiograph dataset: one table, one command.

Choosing between checkpoints (our pretraining vs released DINOv2 weights vs a random network)
needs every candidate measured the same way. For each one the images of the train and val
splits are embedded once (the last blocks' [CLS] tokens and the mean patch token, everything
the probes read), then k-NN, logistic regression and the linear-probe grid of dinov2.eval run
on those cached features, and cross-view retrieval on the val features. Rows are checkpoints,
columns metrics.

    python -m vet_ext.eval.suite --weights OUT/eval/training_9999/teacher_checkpoint.pth \
        dinov2_vits14_pretrain.pth --names ours released --data DATA --random-init vit_small \
        --output-dir OUT/suite
"""
import argparse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dinov2.data import make_dataset
from dinov2.eval.knn import eval_knn, get_args_parser as get_knn_args_parser
from dinov2.eval.linear import get_args_parser as get_linear_args_parser
from dinov2.eval.linear_heads import (
    CachedBatches, best_head, evaluate_heads, intermediate_tokens, n_last_blocks_list, setup_linear_classifiers,
)  # fmt: skip
from dinov2.eval.linear_training import train_linear_heads
from dinov2.eval.log_regression import c_grid, eval_log_regression
from dinov2.eval.metrics import MULTI, MetricType, is_binary, num_outputs, target_kind
from dinov2.eval.results import write_results
from dinov2.eval.setup import (
    add_image_arguments,
    build_model_for_eval,
    eval_config,
    get_autocast_dtype,
    make_eval_transform,
)
from dinov2.eval.utils import extract_features, label_names
from dinov2.models.vision_transformer import ARCHITECTURES
from dinov2.utils.cli import run_cli
from dinov2.utils.errors import UserError
from dinov2.utils.utils import fix_random_seeds
from vet_ext.downstream.eval.retrieval import cross_view_retrieval, images_dataset_str, study_views

@dataclass
class Candidate:
    """One row of the table: a name, where its weights come from, and how to build it."""

    name: str
    source: str
    weights: str | None = None  # None: a randomly initialised `arch`
    arch: str | None = None


@dataclass
class SplitFeatures:
    """Cached tokens of one split: [N, n_blocks + 1, D] = last blocks' [CLS] (oldest first), mean patch."""

    tokens: torch.Tensor
    targets: np.ndarray

    @property
    def cls(self) -> torch.Tensor:
        """The last block's normalised [CLS] token: what the backbone's forward returns."""
        return self.tokens[:, -2]


def reported_keys(targets: np.ndarray) -> list[str]:
    """Summary keys shown in the table, the selection metric first: accuracy for classes, AP and AUC
    for findings (binary or multi-label), whose rarity makes accuracy meaningless."""
    if target_kind(targets) == MULTI:
        return ["macro AP", "macro AUC"]
    return ["AP", "AUC"] if is_binary(targets) else ["top-1"]


def selection_metric(targets: np.ndarray) -> MetricType:
    """What picks the logistic-regression C and the linear head: the table's first metric."""
    return MetricType.MEAN_ACCURACY if reported_keys(targets) == ["top-1"] else MetricType.MACRO_AP


def build_candidate(candidate: Candidate, args: argparse.Namespace) -> tuple[nn.Module, torch.dtype]:
    """(frozen backbone in eval mode, autocast dtype), loaded strictly or randomly initialised (seeded)."""
    if candidate.weights is None:
        fix_random_seeds(args.seed)
        model = ARCHITECTURES.lookup(candidate.arch)(patch_size=args.patch_size, img_size=args.crop_size)
        model.eval().requires_grad_(False)
        if torch.cuda.is_available():
            model.cuda()
        return model, get_autocast_dtype(None)
    cfg = eval_config(args.config_file, candidate.weights)
    return build_model_for_eval(cfg, candidate.weights), get_autocast_dtype(cfg)


def embed(model: nn.Module, dataset, args: argparse.Namespace, autocast_dtype: torch.dtype, desc: str) -> SplitFeatures:
    """One backbone pass over a split, keeping every token the probes will read."""
    n_blocks = max(n_last_blocks_list(model.n_blocks))
    tokens, targets = extract_features(
        model, dataset, args.batch_size, args.num_workers, autocast_dtype=autocast_dtype, desc=desc,
        forward=lambda images: intermediate_tokens(model, images, n_blocks),
    )
    return SplitFeatures(tokens, targets)


def linear_probe(
    train: SplitFeatures, val: SplitFeatures, names: Sequence[str], args: argparse.Namespace, output_dir: Path
) -> dict[str, Any]:
    """dinov2.eval.linear's head grid on cached tokens; the best head's val summary and its name."""
    cached_blocks = train.tokens.shape[1] - 1
    heads, param_groups = setup_linear_classifiers(
        train.tokens.shape[-1], n_last_blocks_list(cached_blocks), args.learning_rates, args.batch_size,
        num_outputs(train.targets, val.targets),
    )
    heads.to("cuda" if torch.cuda.is_available() else "cpu")
    batches = CachedBatches(train.tokens, train.targets, args.batch_size)
    max_iter = args.linear_epochs * args.epoch_length
    train_linear_heads(
        heads, param_groups, lambda start: batches, max_iter=max_iter, output_dir=output_dir,
        resume=False, checkpoint_period=max_iter, named_checkpoint_period=max_iter + 1,
    )
    results = evaluate_heads(heads, val.tokens, val.targets, names)
    chosen = best_head(results, reported_keys(val.targets)[0])
    return {"head": chosen, **results[chosen][0]}


def evaluate_candidate(
    name: str,
    train: SplitFeatures,
    val: SplitFeatures,
    study_ids: np.ndarray,
    view_codes: np.ndarray,
    names: Sequence[str],
    args: argparse.Namespace,
) -> tuple[dict[str, Any], dict[str, list[dict]]]:
    """The table row of one candidate, and each evaluation's full rows for the details."""
    keys = reported_keys(val.targets)
    k = min(args.nb_knn, len(train.cls))
    knn_rows, _, _ = eval_knn(
        train.cls, train.targets, val.cls, val.targets, nb_knn=[k], temperature=args.temperature, label_names=names
    )
    logreg_rows, _, _, _ = eval_log_regression(
        (train.cls.double().numpy(), train.targets), (val.cls.double().numpy(), val.targets),
        metric=selection_metric(val.targets), grid=tuple(c_grid(args.c_grid_size)), label_names=names,
        max_iter=args.max_train_iters,
    )
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    linear = linear_probe(train, val, names, args, Path(args.output_dir) / "linear" / slug)
    retrieval = cross_view_retrieval(val.cls, study_ids, view_codes)
    row = {
        "checkpoint": name,
        **{f"k-NN {key}": knn_rows[0][key] for key in keys},
        **{f"log-reg {key}": logreg_rows[0][key] for key in keys},
        **{f"linear {key}": linear[key] for key in keys},
        "retrieval top-1": retrieval["top-1"],
        "retrieval top-5": retrieval["top-5"],
    }
    details = {
        "k-NN": [{"checkpoint": name, **knn_rows[0]}],
        "logistic regression": [{"checkpoint": name, **logreg_rows[0]}],
        "linear probe": [{"checkpoint": name, **linear}],
        "cross-view retrieval": [{"checkpoint": name, **retrieval}],
    }
    return row, details


def candidates(args: argparse.Namespace) -> list[Candidate]:
    """Checkpoints in command-line order, then the random network; names must be unique."""
    names = args.names or list(args.weights)
    if len(names) != len(args.weights):
        raise UserError(f"--names gives {len(names)} names for {len(args.weights)} --weights files")
    missing = [weights for weights in args.weights if not Path(weights).is_file()]
    if missing:
        raise UserError(f"{missing[0]}: weights file not found")
    result = [Candidate(name, weights, weights=weights) for name, weights in zip(names, args.weights)]
    if args.random_init:
        ARCHITECTURES.lookup(args.random_init, where=" (--random-init)")
        source = f"{args.random_init} with patch size {args.patch_size}, seed {args.seed}"
        result.append(Candidate(f"random {args.random_init}", source, arch=args.random_init))
    duplicated = sorted({c.name for c in result if [d.name for d in result].count(c.name) > 1})
    if duplicated:
        raise UserError(f"checkpoint names must be unique; repeated: {', '.join(duplicated)} (use --names)")
    if not result:
        raise UserError("nothing to compare: give --weights and/or --random-init")
    return result


def _check_args(args: argparse.Namespace) -> None:
    for name in ("batch_size", "nb_knn", "c_grid_size", "max_train_iters", "linear_epochs", "epoch_length"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.temperature <= 0 or any(lr <= 0 for lr in args.learning_rates):
        raise UserError("--temperature and --learning-rates must be positive")


def get_args_parser() -> argparse.ArgumentParser:
    """The single evaluations' defaults (upstream's k-NN temperature, linear learning-rate grid) are reused."""
    knn_defaults, linear_defaults = get_knn_args_parser(add_help=False), get_linear_args_parser(add_help=False)
    parser = argparse.ArgumentParser(prog="python -m vet_ext.eval.suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", nargs="*", default=[], help="backbone weights files to compare")
    parser.add_argument("--names", nargs="+", help="row names, one per --weights file (default: the paths)")
    parser.add_argument("--config-file", help="model configuration for every file (default: per file, as dinov2.eval)")
    parser.add_argument("--data", required=True, help="prepared DATA folder (python -m vet_ext.prepare)")
    parser.add_argument("--labels", default="all", help="labels evaluated: all or a comma-separated list")
    parser.add_argument("--random-init", metavar="ARCH", help="also evaluate a randomly initialised ARCH (vit_small)")
    parser.add_argument("--patch-size", type=int, default=14, help="patch size of the --random-init network")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --random-init weights")
    parser.add_argument("--output-dir", required=True, help="results.json, results.md and linear-probe checkpoints")
    parser.add_argument("--batch-size", type=int, default=64, help="feature extraction and linear-probe batch size")
    parser.add_argument("--nb-knn", type=int, default=20, help="k of the k-NN classifier (default 20)")
    parser.add_argument(
        "--temperature", type=float, default=knn_defaults.get_default("temperature"), help="k-NN vote temperature"
    )
    parser.add_argument("--c-grid-size", type=int, default=45, help="logistic-regression C values (default 45)")
    parser.add_argument("--max-train-iters", type=int, default=1000, help="logistic-regression L-BFGS iterations")
    parser.add_argument("--linear-epochs", type=int, default=10, help="linear-probe epochs (default 10)")
    parser.add_argument("--epoch-length", type=int, default=1250, help="linear-probe iterations per epoch")
    parser.add_argument(
        "--learning-rates", nargs="+", type=float, default=linear_defaults.get_default("learning_rates"),
        help="linear-probe learning-rate grid (default: upstream's 13 rates)",
    )
    add_image_arguments(parser, resize_ratio=256 / 224)
    return parser


def _split_data(args: argparse.Namespace, split: str, transform) -> tuple[str, Any]:
    dataset_str = f"{images_dataset_str(args.data, split)}:labels={args.labels}"
    dataset = make_dataset(dataset_str, transform=transform)
    targets = dataset.get_targets()
    if targets.ndim == 2 and targets.shape[1] == 0:
        raise UserError(f"{args.data}: the manifest has no label columns; prepare it with --labels LABELS.csv")
    if len(dataset) == 0:
        raise UserError(f"{dataset_str}: no images in the {split} split")
    return dataset_str, dataset


def _rows(args: argparse.Namespace, plan: list[Candidate]) -> Iterator[tuple[dict[str, Any], dict[str, list[dict]]]]:
    """Each candidate's row and details, one model in memory at a time."""
    transform = make_eval_transform(args)
    train_str, train_dataset = _split_data(args, "train", transform)
    val_str, val_dataset = _split_data(args, "val", transform)
    study_ids, view_codes = study_views(val_dataset, val_str)
    for candidate in plan:
        model, autocast_dtype = build_candidate(candidate, args)
        train = embed(model, train_dataset, args, autocast_dtype, desc=f"{candidate.name}: train")
        val = embed(model, val_dataset, args, autocast_dtype, desc=f"{candidate.name}: val")
        del model
        names = label_names(val_dataset, val.targets)
        yield evaluate_candidate(candidate.name, train, val, study_ids, view_codes, names, args)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    _check_args(args)
    plan = candidates(args)
    rows, details = [], {}
    for row, candidate_details in _rows(args, plan):
        rows.append(row)
        for title, table in candidate_details.items():
            details.setdefault(title, []).extend(table)
    info = {
        "data": f"{args.data} (train split fits, val split evaluates; labels {args.labels})",
        **{f"weights of {c.name}": c.source for c in plan},
        "k-NN": f"k = {args.nb_knn}, T = {args.temperature}",
        "linear probe": f"best of {len(args.learning_rates)} learning rates x heads on val, "
        f"{args.linear_epochs} x {args.epoch_length} iterations on cached features",
    }
    write_results(args.output_dir, "comparison", rows, details=details, info=info)
    print(f"comparison done: {len(rows)} backbones x 4 evaluations; results in {Path(args.output_dir) / 'results.md'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
