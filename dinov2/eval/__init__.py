"""Upstream-compatible evaluations of a frozen backbone: k-NN, linear probes, logistic regression.

`setup` builds the backbone from any weights file, `utils` extracts features once, `metrics`
and `results` are shared by every evaluation (and by vet_ext's fine-tuning and retrieval).
"""
