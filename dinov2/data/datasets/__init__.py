"""Built-in datasets; importing this package registers them by name."""
from dinov2.data.datasets.image_folder import ImageFolder
from dinov2.data.datasets.synthetic import SyntheticImages

__all__ = ["ImageFolder", "SyntheticImages"]
