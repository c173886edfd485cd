"""Weighted k-NN classification on frozen features, upstream DINOv2's protocol.

Each query takes the max(k) training samples with the highest cosine similarity; their weights
are softmax(similarity / T) over those max(k) neighbours and are NOT renormalised for smaller k,
and the score of a class for a given k is the sum of the first k weights whose sample has that
class (upstream's numbers depend on this). Multi-label targets vote per label the same way; for
ranking metrics a vote is divided by the weight of the neighbours annotated for that label, which
turns it into a probability without changing the arg-max of class scores.

    python -m dinov2.eval.knn --pretrained-weights OUT/eval/training_99/teacher_checkpoint.pth \
        --train-dataset VetImages:root=DATA:split=train:labels=all \
        --val-dataset VetImages:root=DATA:split=val:labels=all --output-dir OUT/knn
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dinov2 import distributed
from dinov2.data import make_dataset
from dinov2.eval.metrics import SINGLE, evaluate_predictions, num_outputs, summarize_tries, target_kind
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

QUERY_CHUNK = 1024  # queries per similarity matrix: bounds memory at QUERY_CHUNK x train size
VOTE_ELEMENTS = 2**25  # bound on a chunk's [queries, max_k, classes] vote tensor (128 MiB in float32)


def get_args_parser(
    description: str | None = None,
    parents: Sequence[argparse.ArgumentParser] | None = None,
    add_help: bool = True,
) -> argparse.ArgumentParser:
    setup_parser = get_setup_args_parser(parents=parents, add_help=False)
    parser = argparse.ArgumentParser(description=description, parents=[setup_parser], add_help=add_help)
    parser.add_argument("--train-dataset", dest="train_dataset_str", type=str, help="training (neighbour) dataset")
    parser.add_argument("--val-dataset", dest="val_dataset_str", type=str, help="evaluated dataset")
    parser.add_argument("--nb_knn", nargs="+", type=int, help="numbers of neighbours (default 10 20 100 200)")
    parser.add_argument("--temperature", type=float, help="softmax temperature of the votes (default 0.07)")
    parser.add_argument(
        "--gather-on-cpu", action="store_true", help="keep the training features on the CPU (slower, no GPU memory)"
    )
    parser.add_argument("--batch-size", type=int, help="feature extraction batch size (default 256)")
    parser.add_argument(
        "--n-per-class-list", nargs="+", type=int, help="training samples per class; -1 = all (default -1)"
    )
    parser.add_argument("--n-tries", type=int, help="random subsets per few-shot setting (default 1)")
    add_image_arguments(parser, resize_ratio=256 / 224)
    add_level_argument(parser)
    parser.set_defaults(
        train_dataset_str="ImageNet:split=TRAIN",
        val_dataset_str="ImageNet:split=VAL",
        nb_knn=[10, 20, 100, 200],
        temperature=0.07,
        batch_size=256,
        n_per_class_list=[-1],
        n_tries=1,
    )
    return parser


def knn_class_scores(
    train_features: torch.Tensor,
    train_votes: torch.Tensor,
    query_features: torch.Tensor,
    ks: Sequence[int],
    temperature: float,
    device: torch.device | str = "cpu",
) -> dict[int, torch.Tensor]:
    """Upstream's score [Q, C] for each k: sum of the first k neighbours' softmax weights x votes.

    `train_votes` [N, C] is one-hot for classes (upstream) or any per-label vote matrix. Features
    are L2-normalised here, so similarity is cosine.
    """
    max_k = max(ks)
    if max_k > len(train_features):
        raise UserError(f"k = {max_k} neighbours asked for, but only {len(train_features)} training samples")
    train_t = F.normalize(train_features.float(), dim=1).to(device).T
    votes = train_votes.float().to(device)
    scores: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    chunk_size = max(1, min(QUERY_CHUNK, VOTE_ELEMENTS // (max_k * votes.shape[1])))
    for chunk in query_features.split(chunk_size):
        similarity = F.normalize(chunk.float(), dim=1).to(device) @ train_t
        top_similarity, top_index = similarity.topk(max_k, dim=1, largest=True, sorted=True)
        weights = torch.softmax(top_similarity / temperature, dim=1)
        weighted_votes = votes[top_index] * weights[..., None]  # [chunk, max_k, C]
        cumulative = weighted_votes.cumsum(dim=1)
        for k in ks:
            scores[k].append(cumulative[:, k - 1].cpu())
    return {k: torch.cat(parts) for k, parts in scores.items()}


def knn_probabilities(
    train_features: torch.Tensor,
    train_targets: np.ndarray,
    query_features: torch.Tensor,
    ks: Sequence[int],
    temperature: float,
    num_classes: int,
    device: torch.device | str = "cpu",
) -> dict[int, np.ndarray]:
    """Per-k probabilities [Q, C] (classes) or [Q, L] (labels): votes over the weight of voters.

    Training samples without a class are left out; a label not annotated on a neighbour
    neither votes for nor against it.
    """
    single = target_kind(train_targets) == SINGLE
    if single:
        labelled = train_targets >= 0
        votes = F.one_hot(torch.from_numpy(train_targets[labelled]), num_classes).float()
        train_features = train_features[torch.from_numpy(labelled)]
    else:
        annotated = torch.from_numpy(~np.isnan(train_targets)).float()
        votes = torch.cat((torch.from_numpy(np.nan_to_num(train_targets, nan=0.0)), annotated), dim=1)
    result = {}
    for k, score in knn_class_scores(train_features, votes, query_features, ks, temperature, device).items():
        positive, voters = (score, score.sum(dim=1, keepdim=True)) if single else score.chunk(2, dim=1)
        result[k] = (positive / voters.clamp_min(torch.finfo(torch.float32).tiny)).numpy()
    return result


def _usable_ks(nb_knn: Sequence[int], n_train: int) -> list[int]:
    ks = sorted({k for k in nb_knn if k <= n_train})
    dropped = sorted({k for k in nb_knn if k > n_train})
    if dropped:
        logger.warning("k = %s skipped: only %d training samples", dropped, n_train)
    if not ks:
        raise UserError(f"--nb_knn {list(nb_knn)}: every k exceeds the {n_train} training samples")
    return ks


def eval_knn(
    train_features: torch.Tensor,
    train_targets: np.ndarray,
    val_features: torch.Tensor,
    val_targets: np.ndarray,
    *,
    nb_knn: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    n_per_class_list: Sequence[int] = (-1,),
    n_tries: int = 1,
    label_names: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[list[dict], list[dict], list[str]]:
    """k-NN metrics for every training-set setting and k: (rows, per-label rows, skipped labels).

    A setting is the full training set (`-1`) or n samples per class drawn with seed = try index
    (upstream's few-shot, whose ks are those <= n, plus n itself); tries are averaged (mean ± std).
    """
    if target_kind(train_targets) != target_kind(val_targets):
        raise UserError("train and val datasets have different kinds of targets (class vs labels)")
    num_classes = num_outputs(train_targets, val_targets)
    rows, per_label, skipped = [], [], set()
    for n_per_class in n_per_class_list:
        if n_per_class < 0:
            setting, subsets = "full", [np.arange(len(train_features))]
            ks = _usable_ks(nb_knn, len(train_features))
        else:
            setting = f"{n_per_class} per class"
            subsets = [sample_per_class(train_targets, n_per_class, seed=t) for t in range(n_tries)]
            ks = _usable_ks([k for k in {*nb_knn, n_per_class} if k <= n_per_class], min(map(len, subsets)))
        tries: dict[int, list[dict[str, float]]] = {k: [] for k in ks}
        for subset in subsets:
            probabilities = knn_probabilities(
                train_features[torch.from_numpy(subset)], train_targets[subset], val_features,
                ks, temperature, num_classes, device,
            )
            for k in ks:
                summary, label_rows, skipped_k = evaluate_predictions(probabilities[k], val_targets, label_names)
                tries[k].append(summary)
                skipped.update(skipped_k)
                if n_per_class < 0:
                    per_label += [{"k": k, **row} for row in label_rows]
        rows += [{"train": setting, "k": k, **summarize_tries(tries[k])} for k in ks]
    return rows, per_label, sorted(skipped)


def _mean(value: float | dict[str, float]) -> float:
    return value["mean"] if isinstance(value, dict) else value


def _upstream_records(rows: Sequence[dict]) -> list[dict[str, float]]:
    """upstream's results_eval_knn.json lines: {"('full', 20) Top 1": 82.1}, means for few-shot."""
    names = {"top-1": "Top 1", "top-5": "Top 5"}
    records = []
    for row in rows:
        for key, value in row.items():
            if key in ("train", "k"):
                continue
            records.append({f"{(row['train'], row['k'])} {names.get(key, key)}": _mean(value)})
    return records


def _check_args(args: argparse.Namespace) -> None:
    if any(k <= 0 for k in args.nb_knn):
        raise UserError(f"--nb_knn values must be positive, got {args.nb_knn}")
    if args.temperature <= 0:
        raise UserError(f"--temperature must be positive, got {args.temperature}")
    if args.n_tries < 1 or args.batch_size < 1:
        raise UserError("--n-tries and --batch-size must be at least 1")
    if any(n == 0 or n < -1 for n in args.n_per_class_list):
        raise UserError(f"--n-per-class-list values must be -1 (all) or positive, got {args.n_per_class_list}")


def main(args: argparse.Namespace) -> int:
    _check_args(args)
    output_dir = prepare_output_dir(args)
    transform = make_eval_transform(args)
    train_dataset = make_dataset(args.train_dataset_str, transform=transform)
    val_dataset = make_dataset(args.val_dataset_str, transform=transform)
    model, autocast_dtype = setup_and_build_model(args)
    common = dict(
        model=model, batch_size=args.batch_size, num_workers=args.num_workers,
        autocast_dtype=autocast_dtype, level=args.level,
    )
    train_features, train_targets, names = dataset_features(
        train_dataset, args.train_dataset_str, desc="train features", **common
    )
    val_features, val_targets, _ = dataset_features(val_dataset, args.val_dataset_str, desc="val features", **common)
    device = "cuda" if torch.cuda.is_available() and not args.gather_on_cpu else "cpu"
    rows, per_label, skipped = eval_knn(
        train_features, train_targets, val_features, val_targets,
        nb_knn=args.nb_knn, temperature=args.temperature, n_per_class_list=args.n_per_class_list,
        n_tries=args.n_tries, label_names=names, device=device,
    )
    if distributed.is_main_process():
        append_json_lines(output_dir / "results_eval_knn.json", _upstream_records(rows))
        info = {
            "weights": args.pretrained_weights,
            "train": f"{args.train_dataset_str} ({len(train_features)} {LEVEL_NOUNS[args.level]})",
            "val": f"{args.val_dataset_str} ({len(val_features)} {LEVEL_NOUNS[args.level]})",
            "temperature": args.temperature,
            "skipped labels (one class only)": ", ".join(skipped) or "none",
        }
        details = {"per-label AP / AUC (full training set)": per_label} if per_label else None
        write_results(output_dir, "k-NN", rows, details=details, info=info)
        metric = "top-1" if "top-1" in rows[0] else "macro AP"
        best = max(rows, key=lambda row: _mean(row[metric]))
        print(
            f"k-NN done: {len(val_features)} {LEVEL_NOUNS[args.level]} evaluated; best {metric} {_mean(best[metric]):.2f} "
            f"({best['train']}, k={best['k']}); results in {output_dir / 'results.md'}"
        )
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser(description="DINOv2 k-NN evaluation").parse_args()))
