"""The `dinov2.extensions` entry point: makes vet_ext's datasets known to every dinov2 command.

dinov2 never imports vet_ext; it loads this entry point, and importing the modules below runs
their `register_dataset` decorators, so "VetStudies:root=DATA" resolves in any dataset string.
"""


def register() -> None:
    import vet_ext.pretraining.datasets  # noqa: F401 - imported for its registrations
    import vet_ext.pretraining.pipelines  # noqa: F401 - imported for its registrations


