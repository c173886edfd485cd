"""L2-regularised logistic regression on frozen features, upstream DINOv2's protocol on scikit-learn.

Upstream fits cuML on the GPU; this uses scikit-learn's L-BFGS solver on the CPU so it runs
anywhere. The regularisation C is chosen over 10**linspace(-6, 5, 45) (`--c-grid-size` makes
the grid coarser): each C is fitted on 90 % of train and scored on the other 10 % (seeded), or on
`--finetune-dataset-str`, or on val with `--finetune-on-val`; the chosen C is then refitted on
train plus the selection split (not with `--finetune-on-val`) and evaluated on val. Multi-label
targets get one binary model per label (one-vs-rest), each on the samples annotated for it.

    python -m dinov2.eval.log_regression --pretrained-weights W.pth \
        --train-dataset VetImages:root=DATA:split=train:label=fracture \
        --val-dataset VetImages:root=DATA:split=val:label=fracture --output-dir OUT/logreg
"""
from __future__ import annotations

import argparse
import logging
import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from tqdm import tqdm

from dinov2 import distributed
from dinov2.data import make_dataset
from dinov2.eval.metrics import (
    SINGLE,
    MetricType,
    default_metric,
    evaluate_predictions,
    metric_key,
    num_outputs,
    summarize_tries,
    target_kind,
)
from dinov2.eval.results import append_json_lines, write_results
from dinov2.eval.setup import (
    LEVEL_NOUNS,
    add_image_arguments,
    add_level_argument,
    get_args_parser as get_setup_args_parser,
    make_eval_transform,
    prepare_output_dir,
    setup_and_build_model,
)
from dinov2.eval.utils import dataset_features, sample_per_class
from dinov2.utils.cli import run_cli
from dinov2.utils.errors import UserError

logger = logging.getLogger("dinov2")

DEFAULT_MAX_ITER = 1_000
C_POWER_RANGE = (-6.0, 5.0)
C_GRID_SIZE = 45
SELECTION_FRACTION = 10  # 1/10 of train chooses C
TRAIN_DTYPES = {"float64": np.float64, "float32": np.float32}


def get_args_parser(
    description: str | None = None,
    parents: Sequence[argparse.ArgumentParser] | None = None,
    add_help: bool = True,
) -> argparse.ArgumentParser:
    setup_parser = get_setup_args_parser(parents=parents, add_help=False)
    parser = argparse.ArgumentParser(description=description, parents=[setup_parser], add_help=add_help)
    parser.add_argument("--train-dataset", dest="train_dataset_str", type=str, help="training dataset")
    parser.add_argument("--val-dataset", dest="val_dataset_str", type=str, help="evaluated dataset")
    parser.add_argument(
        "--finetune-dataset-str", dest="finetune_dataset_str", type=str, help="dataset that chooses C (optional)"
    )
    parser.add_argument(
        "--finetune-on-val", action="store_true", help="without a finetune dataset, choose C on val, not 10%% of train"
    )
    parser.add_argument(
        "--metric-type", type=MetricType, choices=list(MetricType),
        help="metric that chooses C (default: mean_accuracy for classes, macro_ap for labels)",
    )
    parser.add_argument("--train-features-device", type=str, help="where the fit runs: only cpu (scikit-learn)")
    parser.add_argument("--train-dtype", type=str, choices=sorted(TRAIN_DTYPES), help="fit precision (float64)")
    parser.add_argument("--max-train-iters", type=int, help="L-BFGS iterations per fit (default %(default)s)")
    parser.add_argument("--c-grid-size", type=int, help=f"number of C values in 10**linspace(-6, 5, n) ({C_GRID_SIZE})")
    parser.add_argument("--tol", type=float, help="L-BFGS tolerance (upstream's cuML uses 1e-12; default 1e-6)")
    parser.add_argument("--batch-size", type=int, help="feature extraction batch size (default 256)")
    parser.add_argument(
        "--n-per-class-list", nargs="+", type=int, help="training samples per class; -1 = all (default -1)"
    )
    parser.add_argument("--n-tries", type=int, help="random subsets per few-shot setting (default 1)")
    add_image_arguments(parser, resize_ratio=1.0)
    add_level_argument(parser)
    parser.set_defaults(
        train_dataset_str="ImageNet:split=TRAIN",
        val_dataset_str="ImageNet:split=VAL",
        finetune_dataset_str=None,
        metric_type=None,
        train_features_device="cpu",
        train_dtype="float64",
        max_train_iters=DEFAULT_MAX_ITER,
        c_grid_size=C_GRID_SIZE,
        tol=1e-6,
        batch_size=256,
        n_per_class_list=[-1],
        n_tries=1,
    )
    return parser


def c_grid(size: int = C_GRID_SIZE) -> np.ndarray:
    """Upstream's log-spaced grid 10**linspace(-6, 5, 45), or the same range with `size` points."""
    return 10.0 ** np.linspace(*C_POWER_RANGE, size)


class LogisticProbe:
    """One multinomial model for classes, or one binary model per label; probabilities out."""

    def __init__(self, C: float, max_iter: int = DEFAULT_MAX_ITER, tol: float = 1e-6, dtype=np.float64):
        self.C, self.max_iter, self.tol, self.dtype = C, max_iter, tol, dtype

    def _estimator(self) -> LogisticRegression:
        return LogisticRegression(C=self.C, max_iter=self.max_iter, tol=self.tol, solver="lbfgs")

    def fit(self, features: np.ndarray, targets: np.ndarray, num_outputs: int) -> "LogisticProbe":
        """`num_outputs`: classes (columns of predict_proba) or labels."""
        features = features.astype(self.dtype)
        self.num_outputs, self.kind = num_outputs, target_kind(targets)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # upstream runs to max_iter too
            if self.kind == SINGLE:
                labelled = targets >= 0
                self.models = [self._fit_or_constant(features[labelled], targets[labelled])]
            else:
                self.models = []
                for j in range(targets.shape[1]):
                    annotated = ~np.isnan(targets[:, j])
                    self.models.append(self._fit_or_constant(features[annotated], targets[annotated, j].astype(int)))
        return self

    def _fit_or_constant(self, features: np.ndarray, targets: np.ndarray) -> LogisticRegression | int:
        """A label with a single class in training is predicted as that class with certainty."""
        classes = np.unique(targets)
        if len(classes) == 0:
            raise UserError("logistic regression: no labelled training sample")
        if len(classes) == 1:
            return int(classes[0])
        return self._estimator().fit(features, targets)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        features = features.astype(self.dtype)
        if self.kind == SINGLE:
            probabilities = np.zeros((len(features), self.num_outputs))
            model = self.models[0]
            if isinstance(model, int):
                probabilities[:, model] = 1.0
            else:
                probabilities[:, model.classes_] = model.predict_proba(features)
            return probabilities
        columns = [
            np.full(len(features), float(model)) if isinstance(model, int) else model.predict_proba(features)[:, 1]
            for model in self.models
        ]
        return np.stack(columns, axis=1)


def sweep_c(
    train: tuple[np.ndarray, np.ndarray],
    selection: tuple[np.ndarray, np.ndarray],
    metric: MetricType,
    grid: Sequence[float],
    *,
    num_outputs: int,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = 1e-6,
    dtype=np.float64,
) -> tuple[float, list[dict[str, float]]]:
    """The C of `grid` with the best `metric` on `selection` (first of equals), and every C's score."""
    key = metric_key(metric, selection[1])
    scores = []
    for C in tqdm(grid, desc="C sweep", unit="C", disable=not distributed.is_main_process(), dynamic_ncols=True):
        probe = LogisticProbe(C, max_iter, tol, dtype).fit(*train, num_outputs)
        summary, _, _ = evaluate_predictions(probe.predict_proba(selection[0]), selection[1])
        scores.append({"C": float(C), key: summary[key]})
    best = max(scores, key=lambda row: -math.inf if math.isnan(row[key]) else row[key])
    return best["C"], scores


def _split_selection(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, selection indices): a seeded 1/10 of train chooses C, as upstream."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).numpy()
    cut = size // SELECTION_FRACTION
    if cut == 0:
        raise UserError(f"choosing C on 10% of train needs at least {SELECTION_FRACTION} training samples, got {size}")
    return order[cut:], order[:cut]


def eval_log_regression(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    *,
    finetune: tuple[np.ndarray, np.ndarray] | None = None,
    finetune_on_val: bool = False,
    metric: MetricType | None = None,
    grid: Sequence[float] = tuple(c_grid()),
    n_per_class_list: Sequence[int] = (-1,),
    n_tries: int = 1,
    label_names: Sequence[str] | None = None,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = 1e-6,
    dtype=np.float64,
) -> tuple[list[dict], list[dict], list[str], list[dict]]:
    """(rows, per-label rows, skipped labels, C sweep rows) for each training-set setting.

    Few-shot settings draw n samples per class (seed = try) from the part of train that is not
    used to choose C; their C is chosen on the same selection set and not refitted with it.
    """
    metric = metric or default_metric(train[1])
    width = num_outputs(train[1], val[1], *([finetune[1]] if finetune else []))
    fit_kwargs = dict(num_outputs=width, max_iter=max_iter, tol=tol, dtype=dtype)
    if finetune is not None:
        fit_set, selection, refit = train, finetune, True
    elif finetune_on_val:
        fit_set, selection, refit = train, val, False
    else:
        fit_index, selection_index = _split_selection(len(train[0]))
        fit_set = (train[0][fit_index], train[1][fit_index])
        selection, refit = (train[0][selection_index], train[1][selection_index]), True
    rows, per_label, skipped, sweeps = [], [], set(), []
    for n_per_class in n_per_class_list:
        if n_per_class < 0:
            setting, subsets = "full", [np.arange(len(fit_set[0]))]
        else:
            setting = f"{n_per_class} per class"
            subsets = [sample_per_class(fit_set[1], n_per_class, seed=t) for t in range(n_tries)]
        tries = []
        for try_index, subset in enumerate(subsets):
            subset_data = (fit_set[0][subset], fit_set[1][subset])
            best_c, sweep = sweep_c(subset_data, selection, metric, grid, **fit_kwargs)
            sweeps += [{"train": setting, "try": try_index, **row} for row in sweep]
            if refit and n_per_class < 0:
                subset_data = tuple(np.concatenate(parts) for parts in zip(subset_data, selection))
            probe = LogisticProbe(best_c, max_iter, tol, dtype).fit(*subset_data, width)
            summary, label_rows, skipped_now = evaluate_predictions(probe.predict_proba(val[0]), val[1], label_names)
            tries.append({**summary, "C": best_c})
            skipped.update(skipped_now)
            if n_per_class < 0:
                per_label += label_rows
        rows.append({"train": setting, **summarize_tries(tries)})
    return rows, per_label, sorted(skipped), sweeps


def _check_args(args: argparse.Namespace) -> None:
    if args.train_features_device != "cpu":
        raise UserError(f"--train-features-device {args.train_features_device}: scikit-learn fits on the cpu only")
    if args.c_grid_size < 1 or args.max_train_iters < 1 or args.n_tries < 1:
        raise UserError("--c-grid-size, --max-train-iters and --n-tries must be at least 1")
    if any(n == 0 or n < -1 for n in args.n_per_class_list):
        raise UserError(f"--n-per-class-list values must be -1 (all) or positive, got {args.n_per_class_list}")
    if args.finetune_on_val and args.finetune_dataset_str:
        raise UserError("give --finetune-dataset-str or --finetune-on-val, not both")


def main(args: argparse.Namespace) -> int:
    _check_args(args)
    output_dir = prepare_output_dir(args)
    transform = make_eval_transform(args)
    dataset_strs = {"train": args.train_dataset_str, "val": args.val_dataset_str}
    if args.finetune_dataset_str:
        dataset_strs["finetune"] = args.finetune_dataset_str
    datasets = {name: make_dataset(string, transform=transform) for name, string in dataset_strs.items()}
    model, autocast_dtype = setup_and_build_model(args)
    features, names = {}, []
    for name, dataset in datasets.items():
        feats, targets, names_here = dataset_features(
            dataset, dataset_strs[name], model, batch_size=args.batch_size, num_workers=args.num_workers,
            autocast_dtype=autocast_dtype, level=args.level, desc=f"{name} features",
        )
        features[name] = (feats.double().numpy(), targets)
        names = names or names_here
    rows, per_label, skipped, sweeps = eval_log_regression(
        features["train"], features["val"], finetune=features.get("finetune"), finetune_on_val=args.finetune_on_val,
        metric=args.metric_type, grid=tuple(c_grid(args.c_grid_size)), n_per_class_list=args.n_per_class_list,
        n_tries=args.n_tries, label_names=names, max_iter=args.max_train_iters, tol=args.tol,
        dtype=TRAIN_DTYPES[args.train_dtype],
    )
    if distributed.is_main_process():
        append_json_lines(
            output_dir / "results_eval_log_regression.json",
            [{row["train"]: {key: value for key, value in row.items() if key != "train"}} for row in rows],
        )
        info = {
            "weights": args.pretrained_weights,
            **{name: f"{string} ({len(features[name][0])} {LEVEL_NOUNS[args.level]})" for name, string in dataset_strs.items()},
            "C chosen on": "finetune dataset" if args.finetune_dataset_str
            else "val" if args.finetune_on_val else "10% of train",
            "skipped labels (one class only)": ", ".join(skipped) or "none",
        }
        details = {"C sweep": sweeps}
        if per_label:
            details["per-label AP / AUC (full training set)"] = per_label
        write_results(output_dir, "logistic regression", rows, details=details, info=info)
        full = rows[0]
        print(f"logistic regression done: {len(features['val'][0])} {LEVEL_NOUNS[args.level]} evaluated; "
              f"{full['train']}: " + ", ".join(f"{k} {v:.4g}" for k, v in full.items() if isinstance(v, float))
              + f"; results in {output_dir / 'results.md'}")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser(description="DINOv2 logistic regression evaluation").parse_args()))
