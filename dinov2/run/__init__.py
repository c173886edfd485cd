"""SLURM launchers (submitit): `python -m dinov2.run.train.train` and `python -m dinov2.run.eval.{knn,linear,log_regression}`."""
