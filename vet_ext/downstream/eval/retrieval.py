"""Cross-view retrieval: does an image's nearest neighbour among other views come from its own study?

A backbone pretrained to match the views of a study should embed a lateral and a ventro-dorsal
radiograph of the same animal close together, although they look nothing alike. The test: every
image of a study with at least two views queries a gallery of all images with a different view
code (its own study's included); a hit is a nearest gallery image of the query's study, by
cosine similarity of [CLS] features. Same-view images are left out of the gallery, since finding
a second lateral of the same animal says nothing about cross-view matching.

    python -m vet_ext.eval.retrieval --weights OUT/eval/training_9999/teacher_checkpoint.pth \
        --data DATA --split val --output-dir OUT/retrieval
"""
import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dinov2.data import make_dataset
from dinov2.eval.results import write_results
from dinov2.eval.setup import add_image_arguments, make_eval_transform, setup_and_build_model
from dinov2.eval.utils import extract_features
from dinov2.utils.cli import run_cli
from dinov2.utils.errors import UserError

TOP_K = (1, 5)
QUERY_CHUNK = 1024  # query rows per similarity block: bounds memory at chunk x N floats


def _codes(values: Sequence[Any] | np.ndarray, name: str, count: int) -> tuple[torch.Tensor, int]:
    """Dense integer codes 0..n-1 of `values`, and n."""
    values = np.asarray(values)
    if values.shape != (count,):
        raise UserError(f"cross-view retrieval: {count} features but {name} has shape {values.shape}")
    distinct, codes = np.unique(values, return_inverse=True)
    return torch.from_numpy(codes.reshape(-1).astype(np.int64)), len(distinct)


def cross_view_retrieval(
    features: torch.Tensor | np.ndarray,
    study_ids: Sequence[Any] | np.ndarray,
    view_codes: Sequence[str] | np.ndarray,
    top_k: Sequence[int] = TOP_K,
) -> dict[str, float | int]:
    """Top-k hit rates over all queries, in percent like every other metric, and the chance rate.

    `chance top-1` is the mean over queries of (own-study gallery images / gallery size), the
    expected top-1 of a random ranking: the number to beat. Studies whose images all share one
    view code produce no query; with no query at all the rates are NaN.
    """
    features = F.normalize(torch.as_tensor(features, dtype=torch.float32), dim=1)
    count = features.shape[0]
    study, n_studies = _codes(study_ids, "study_ids", count)
    view, n_views = _codes(view_codes, "view_codes", count)
    images = torch.bincount(study * n_views + view, minlength=n_studies * n_views).reshape(n_studies, n_views)
    queries = torch.nonzero((images > 0).sum(dim=1)[study] >= 2).flatten()
    if len(queries) == 0:
        return {**{f"top-{k}": math.nan for k in top_k}, "chance top-1": math.nan, "queries": 0}
    own_study_gallery = images.sum(dim=1)[study] - images[study, view]
    gallery_size = count - images.sum(dim=0)[view]

    hits = {k: 0 for k in top_k}
    for start in range(0, len(queries), QUERY_CHUNK):
        rows = queries[start : start + QUERY_CHUNK]
        similarity = features[rows] @ features.t()
        similarity[view[rows, None] == view[None, :]] = -torch.inf
        best, neighbours = similarity.topk(min(max(top_k), count), dim=1)
        # fewer gallery images than k: the -inf (same-view) picks never count as hits
        is_hit = (study[neighbours] == study[rows, None]) & torch.isfinite(best)
        for k in top_k:
            hits[k] += int(is_hit[:, :k].any(dim=1).sum())
    return {
        **{f"top-{k}": 100.0 * hits[k] / len(queries) for k in top_k},
        "chance top-1": 100.0 * (own_study_gallery[queries] / gallery_size[queries]).mean().item(),
        "queries": len(queries),
    }


def study_views(dataset: Any, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(study id, view code) of every image of an image-level dataset such as VetImages."""
    if not hasattr(dataset, "study_ids") or not hasattr(dataset, "view_codes"):
        raise UserError(f"{source}: cross-view retrieval needs a dataset with study ids and view codes (VetImages)")
    views = np.array([dataset.view_codes(index)[0] for index in range(len(dataset))])
    return np.asarray(dataset.study_ids), views


def images_dataset_str(data: str | Path, split: str) -> str:
    return f"VetImages:root={data}:split={split}"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vet_ext.eval.retrieval", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--weights", dest="pretrained_weights", metavar="WEIGHTS", required=True, help="backbone weights file"
    )
    parser.add_argument("--config-file", help="model configuration (default: the run's config.yaml or the weights)")
    parser.add_argument("--data", required=True, help="prepared DATA folder (python -m vet_ext.prepare)")
    parser.add_argument("--split", default="val", help="split whose images are queries and gallery (default val)")
    parser.add_argument("--batch-size", type=int, default=64, help="feature extraction batch size (default 64)")
    parser.add_argument("--output-dir", help="also write results.json / results.md here")
    add_image_arguments(parser, resize_ratio=256 / 224)
    parser.set_defaults(opts=[])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    dataset_str = images_dataset_str(args.data, args.split)
    dataset = make_dataset(dataset_str, transform=make_eval_transform(args))
    study_ids, view_codes = study_views(dataset, dataset_str)
    model, autocast_dtype = setup_and_build_model(args)
    features, _ = extract_features(
        model, dataset, args.batch_size, args.num_workers, autocast_dtype=autocast_dtype, desc="features"
    )
    result = cross_view_retrieval(features, study_ids, view_codes)
    if args.output_dir:
        info = {"weights": args.pretrained_weights, "dataset": f"{dataset_str} ({len(dataset)} images)"}
        write_results(args.output_dir, "cross-view retrieval", [result], info=info)
    print(
        f"cross-view retrieval on {len(dataset)} images of {len(set(study_ids))} studies: "
        f"{result['queries']} queries, top-1 {result['top-1']:.2f} %, top-5 {result['top-5']:.2f} % "
        f"(chance top-1 {result['chance top-1']:.2f} %)"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
