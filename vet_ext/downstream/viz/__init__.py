"""Seeing what the model learned: attention per head, cross-view patch similarity, PCA of patches.

Command line: `python -m vet_ext.viz {attention,patch-similarity,pca} --help`. From Python:

    checkpoint = load_checkpoint("OUT/eval/training_999/teacher_checkpoint.pth", "teacher")
    view = load_study("DATA", study_id)[0]
    maps = attention_maps(checkpoint.model, checkpoint.inputs(view, 448)[1])  # [heads, h, w]
    write_attention_grid("attention.png", [view], {"teacher": [maps]})
"""
from vet_ext.downstream.viz.attention import (
    attention_maps, last_block_attention, mass_mask, write_attention_grid, write_attention_overlay,
)  # fmt: skip
from vet_ext.downstream.viz.loading import Checkpoint, View, load_checkpoint, load_dicom_views, load_study
from vet_ext.downstream.viz.pca import pca_rgb, write_pca_figure
from vet_ext.downstream.viz.similarity import cosine_similarity_map, write_similarity_figure

__all__ = [
    "Checkpoint", "View", "attention_maps", "cosine_similarity_map", "last_block_attention", "load_checkpoint",
    "load_dicom_views", "load_study", "mass_mask", "pca_rgb", "write_attention_grid", "write_attention_overlay",
    "write_pca_figure", "write_similarity_figure",
]  # fmt: skip
