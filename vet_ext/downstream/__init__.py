"""Downstream use of a pretrained backbone: fine-tuning, study-level models, evaluation, visualisation."""
