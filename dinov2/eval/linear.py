"""Linear probes on a frozen backbone, upstream DINOv2's protocol.

Inputs are the normalised outputs of the last 4 blocks (`get_intermediate_layers(n=4,
return_class_token=True)`). A grid of linear heads is trained jointly, one per combination of
{cls token of the last block, cls tokens of the last 4 blocks concatenated} x {without, with the
mean patch token of the last block} x learning rate (each scaled by batch size x world size / 256);
SGD with momentum 0.9, no weight decay, cosine decay to 0 over epochs x epoch-length iterations,
heads initialised N(0, 0.01) with zero bias. The head with the best validation metric is
reported on the test datasets (accuracy for classes; macro AP with a BCE loss for labels).

Upstream re-augments every training image at every step (random resized crop + flip), which
costs a backbone pass per step. By default (`--feature-cache`) the training images are embedded
once with the evaluation transform and the heads train on those cached tokens: the same
protocol without augmentation, hundreds of times cheaper on a CPU. `--train-augmentation`
restores upstream's behaviour (and turns the cache off).

As upstream, heads can start from a saved grid (`--classifier-fpath`; already trained to the
last iteration, they are only evaluated), and a class mapping lets heads trained on a larger
label space score a dataset whose classes are a subset of it (`--*-class-mapping-fpath*`).

    python -m dinov2.eval.linear --pretrained-weights W.pth --train-dataset STR --val-dataset STR \
        --output-dir OUT/linear --epochs 10 --epoch-length 100
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence

import numpy as np
from torch import nn

from dinov2 import distributed
from dinov2.data import make_dataset
from dinov2.data.augmentations import IMAGENET_MEAN, IMAGENET_STD
from dinov2.data.transforms import ClassificationTrainTransform
from dinov2.eval.linear_heads import (
    AugmentedBatches, CachedBatches, ClassMapping, best_head, check_heads_fit, evaluate_heads, head_logits,
    head_probabilities, intermediate_tokens, load_class_mapping, n_last_blocks_list, per_class_rows,
    setup_linear_classifiers,
)  # fmt: skip
from dinov2.eval.linear_training import HeadsCheckpoint, start_checkpoint, train_linear_heads
from dinov2.eval.metrics import MetricType, check_available, default_metric, evaluate_predictions, metric_key, num_outputs
from dinov2.eval.results import append_json_lines, write_results
from dinov2.eval.setup import (
    add_image_arguments,
    get_args_parser as get_setup_args_parser,
    get_eval_config,
    make_eval_transform,
    prepare_output_dir,
    setup_and_build_model,
)
from dinov2.eval.utils import extract_features, label_names, model_device, normalize_targets
from dinov2.utils.cli import run_cli
from dinov2.utils.errors import UserError

logger = logging.getLogger("dinov2")

METRICS_FILE = "results_eval_linear.json"


def get_args_parser(
    description: str | None = None,
    parents: Sequence[argparse.ArgumentParser] | None = None,
    add_help: bool = True,
) -> argparse.ArgumentParser:
    setup_parser = get_setup_args_parser(parents=parents, add_help=False)
    parser = argparse.ArgumentParser(description=description, parents=[setup_parser], add_help=add_help)
    parser.add_argument("--train-dataset", dest="train_dataset_str", type=str, help="training dataset")
    parser.add_argument("--val-dataset", dest="val_dataset_str", type=str, help="dataset that picks the best head")
    parser.add_argument(
        "--test-datasets", dest="test_dataset_strs", type=str, nargs="+", help="test datasets (default: val)"
    )
    parser.add_argument("--epochs", type=int, help="training epochs (default 10)")
    parser.add_argument("--batch-size", type=int, help="batch size per process (default 128)")
    parser.add_argument("--epoch-length", type=int, help="iterations per epoch (default 1250)")
    parser.add_argument(
        "--save-checkpoint-frequency", type=int, help="epochs between two named checkpoints (default 20)"
    )
    parser.add_argument("--eval-period-iterations", type=int, help="iterations between validations (default 1250)")
    parser.add_argument("--learning-rates", nargs="+", type=float, help="learning rates of the head grid")
    parser.add_argument("--no-resume", action="store_true", help="start afresh even if a checkpoint exists")
    parser.add_argument(
        "--val-metric-type", type=MetricType, choices=list(MetricType),
        help="metric that picks the best head (default: mean_accuracy for classes, macro_ap for labels; "
        "per_class_accuracy picks by its mean)",
    )
    parser.add_argument(
        "--test-metric-types", type=MetricType, choices=list(MetricType), nargs="+",
        help="metric of each test dataset (default: the val metric for every one); per_class_accuracy adds a "
        "table of every class's accuracy",
    )
    parser.add_argument(
        "--classifier-fpath", type=str,
        help="linear heads to start from (a running_checkpoint_linear_eval.pth or model_*.pth); this run's own "
        "running checkpoint wins when resuming; heads trained to the last iteration are only evaluated",
    )
    parser.add_argument(
        "--val-class-mapping-fpath", type=str,
        help=".npy integer array: the head output that scores each class of the val dataset",
    )
    parser.add_argument(
        "--test-class-mapping-fpaths", type=str, nargs="+",
        help=".npy class mapping of each test dataset, 'None' for a dataset without one (default: none)",
    )
    parser.add_argument(
        "--feature-cache", action=argparse.BooleanOptionalAction, default=None,
        help="embed training images once and train the heads on cached tokens "
        "(default: on, unless --train-augmentation)",
    )
    parser.add_argument(
        "--train-augmentation", action="store_true",
        help="upstream's random resized crop + flip at every step (a backbone pass per step; no cache)",
    )
    add_image_arguments(parser, resize_ratio=256 / 224)
    parser.set_defaults(
        train_dataset_str="ImageNet:split=TRAIN",
        val_dataset_str="ImageNet:split=VAL",
        test_dataset_strs=None,
        epochs=10,
        batch_size=128,
        num_workers=8,
        epoch_length=1250,
        save_checkpoint_frequency=20,
        eval_period_iterations=1250,
        learning_rates=[1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1],
        val_metric_type=None,
        test_metric_types=None,
        classifier_fpath=None,
        val_class_mapping_fpath=None,
        test_class_mapping_fpaths=None,
    )
    return parser


def _check_args(args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "epoch_length", "save_checkpoint_frequency"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if any(lr <= 0 for lr in args.learning_rates):
        raise UserError(f"--learning-rates must be positive, got {args.learning_rates}")
    if args.train_augmentation and args.feature_cache:
        raise UserError("--feature-cache cannot be combined with --train-augmentation (cached images are not re-augmented)")
    n_tests = len(args.test_dataset_strs or [args.val_dataset_str])
    for flag, values in (("--test-metric-types", args.test_metric_types),
                         ("--test-class-mapping-fpaths", args.test_class_mapping_fpaths)):
        if values is not None and len(values) != n_tests:
            raise UserError(f"{flag} has {len(values)} entries for {n_tests} test dataset(s); "
                            "give one per test dataset, in --test-datasets order, or none")
    for metric in (args.val_metric_type, *(args.test_metric_types or ())):
        if metric is not None:
            check_available(metric)


def _train_dataset(args: argparse.Namespace, eval_transform, use_cache: bool):
    """Cached tokens are embedded like evaluation images; the augmented stream gets upstream's train transform."""
    if use_cache:
        return make_dataset(args.train_dataset_str, transform=eval_transform)
    cfg = get_eval_config(args)
    mean, std = (tuple(cfg.crops.mean), tuple(cfg.crops.std)) if cfg is not None else (IMAGENET_MEAN, IMAGENET_STD)
    return make_dataset(args.train_dataset_str, transform=ClassificationTrainTransform(args.crop_size, mean, std))


def _training_batches(
    args: argparse.Namespace, train_dataset, use_cache: bool, model: nn.Module, autocast_dtype, extract: dict
) -> tuple[Callable[[int], Callable], np.ndarray | None]:
    """(make_batches for `train_linear_heads`, the training targets when known: they size the heads)."""
    if use_cache:
        tokens, targets = extract_features(
            model, train_dataset, args.batch_size, args.num_workers, desc="train tokens", **extract
        )
        cached = CachedBatches(tokens, targets, args.batch_size)
        return (lambda start: cached), targets
    targets = normalize_targets(train_dataset.get_targets()) if hasattr(train_dataset, "get_targets") else None
    return (
        lambda start: AugmentedBatches(model, train_dataset, args.batch_size, args.num_workers, start, autocast_dtype)
    ), targets


def _heads_width(start: HeadsCheckpoint | None, target_sets: list[np.ndarray], train_str: str) -> tuple[int, str]:
    """(outputs of every head, what decided it): the start file's heads, else every class seen."""
    if start is not None:
        return start.num_outputs, f"the heads in {start.path}"
    if not target_sets:
        raise UserError(f"{train_str}: its classes are unknown (no get_targets) and every evaluation dataset has a "
                        "class mapping; drop --train-augmentation so the training targets are read")
    return num_outputs(*target_sets), "the heads (one output per class of the datasets without a mapping)"


def _score_tests(
    head: nn.Module, tests: list[tuple[str, ClassMapping | None, MetricType]], eval_sets: dict, eval_datasets: dict
) -> tuple[list[dict], dict[str, list[dict]], set[str]]:
    """The chosen head on each test dataset: (one summary row each, detail tables, skipped labels)."""
    rows, per_label, per_class, skipped = [], [], [], set()
    for string, mapping, test_metric in tests:
        tokens, targets = eval_sets[string]
        logits = head_logits(head, tokens, mapping.indices if mapping else None)
        summary, label_rows, skipped_here = evaluate_predictions(
            head_probabilities(logits, targets), targets, label_names(eval_datasets[string], targets)
        )
        rows.append({"dataset": string, **summary})
        per_label += [{"dataset": string, **row} for row in label_rows]
        if test_metric == MetricType.PER_CLASS_ACCURACY:
            class_names = getattr(eval_datasets[string], "classes", None)  # ImageFolder's folder names
            class_names = class_names if isinstance(class_names, (list, tuple)) else None
            per_class += [{"dataset": string, **row} for row in per_class_rows(logits, targets, class_names)]
        skipped.update(skipped_here)
    tables = (("per-label AP / AUC", per_label), ("per-class accuracy", per_class))
    return rows, {title: table for title, table in tables if table}, skipped


def _training_note(
    args: argparse.Namespace, start: HeadsCheckpoint | None, trained_for: int, to_train: bool, use_cache: bool
) -> str:
    if not to_train:
        return f"none: heads from {start.path}, trained for {trained_for} iterations"
    note = f"{args.epochs * args.epoch_length} iterations of batch {args.batch_size}, " + (
        "cached features (no augmentation)" if use_cache else "augmented images"
    )
    return note + (f", continued from {start.path} after iteration {start.iteration}" if start is not None else "")


def main(args: argparse.Namespace) -> int:
    _check_args(args)
    output_dir = prepare_output_dir(args)
    test_strs = args.test_dataset_strs or [args.val_dataset_str]
    val_mapping = load_class_mapping(args.val_class_mapping_fpath)
    test_mappings = [load_class_mapping(path) for path in args.test_class_mapping_fpaths or [None] * len(test_strs)]
    max_iter = args.epochs * args.epoch_length
    start = start_checkpoint(output_dir, not args.no_resume, args.classifier_fpath)
    to_train = start is None or start.iteration + 1 < max_iter
    eval_transform = make_eval_transform(args)
    eval_strs = list(dict.fromkeys([args.val_dataset_str, *test_strs]))
    eval_datasets = {string: make_dataset(string, transform=eval_transform) for string in eval_strs}
    use_cache = not args.train_augmentation if args.feature_cache is None else args.feature_cache
    train_dataset = _train_dataset(args, eval_transform, use_cache) if to_train else None
    model, autocast_dtype = setup_and_build_model(args)
    blocks_list = n_last_blocks_list(model.n_blocks)
    forward = lambda images: intermediate_tokens(model, images, max(blocks_list))  # noqa: E731
    extract = dict(autocast_dtype=autocast_dtype, forward=forward)
    eval_sets = {
        string: extract_features(model, dataset, args.batch_size, args.num_workers, desc=f"{string} tokens", **extract)
        for string, dataset in eval_datasets.items()
    }
    make_batches, train_targets = (
        _training_batches(args, train_dataset, use_cache, model, autocast_dtype, extract) if to_train else (None, None)
    )
    val_tokens, val_targets = eval_sets[args.val_dataset_str]
    metric = args.val_metric_type or default_metric(val_targets)
    key = metric_key(metric, val_targets)
    tests = list(zip(test_strs, test_mappings, args.test_metric_types or [metric] * len(test_strs)))
    test_keys = [metric_key(test_metric, eval_sets[string][1]) for string, _, test_metric in tests]
    scored = [(args.val_dataset_str, val_mapping), *((string, mapping) for string, mapping, _ in tests)]
    if train_targets is not None:
        scored.append((args.train_dataset_str, None))
    targets_of = {string: targets for string, (_, targets) in eval_sets.items()}
    targets_of[args.train_dataset_str] = train_targets
    width, heads_source = _heads_width(
        start, [targets_of[string] for string, mapping in scored if mapping is None], args.train_dataset_str
    )
    for string, mapping in scored:
        check_heads_fit(width, heads_source, string, targets_of[string], mapping)
    heads, param_groups = setup_linear_classifiers(
        model.embed_dim, blocks_list, args.learning_rates, args.batch_size, width
    )
    heads.to(model_device(model))
    names = label_names(eval_datasets[args.val_dataset_str], val_targets)
    metrics_path = output_dir / METRICS_FILE

    def validate(iteration: int) -> str:
        results = evaluate_heads(
            heads, val_tokens, val_targets, names, class_mapping=val_mapping.indices if val_mapping else None
        )
        name = best_head(results, key)
        if distributed.is_main_process():
            record = {"iter": iteration, "best_classifier": {"name": name, key: results[name][0][key]}}
            append_json_lines(metrics_path, [record])
        return name

    trained_for = train_linear_heads(
        heads, param_groups, make_batches, max_iter=max_iter, output_dir=output_dir,
        resume=not args.no_resume, start=start, checkpoint_period=args.epoch_length,
        named_checkpoint_period=args.save_checkpoint_frequency * args.epoch_length,
        eval_period=args.eval_period_iterations, evaluate=validate,
    )
    chosen = validate(trained_for)
    rows, details, skipped = _score_tests(heads[chosen], tests, eval_sets, eval_datasets)
    if distributed.is_main_process():
        mappings = [f"{string}: {mapping.path}" for string, mapping in scored if mapping is not None]
        info = {
            "weights": args.pretrained_weights,
            "train": f"{args.train_dataset_str} "
            + (f"({len(train_dataset)} images)" if train_dataset is not None else "(not read: nothing left to train)"),
            "best head (on val)": chosen,
            "chosen by": f"{key} on {args.val_dataset_str}",
            "training": _training_note(args, start, trained_for, to_train, use_cache),
            **({"class mappings": "; ".join(mappings)} if mappings else {}),
            "skipped labels (one class only)": ", ".join(sorted(skipped)) or "none",
        }
        write_results(output_dir, "linear", rows, details=details or None, info=info)
        print(f"linear done: best head {chosen}; {test_strs[0]}: {test_keys[0]} {rows[0][test_keys[0]]:.2f}; "
              f"results in {output_dir / 'results.md'}")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser(description="DINOv2 linear evaluation").parse_args()))
