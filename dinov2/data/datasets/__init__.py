"""Built-in datasets; importing this package registers them by name."""
import warnings

from dinov2.data.datasets.image_folder import ImageFolder
from dinov2.data.datasets.image_net import ImageNet
from dinov2.data.datasets.synthetic import SyntheticImages

# `python -m dinov2.data.datasets.image_net` runs a module this package has already imported (to register it);
# runpy warns about that, but the command only writes files and needs nothing from the first copy.
warnings.filterwarnings(
    "ignore", message=r"'dinov2\.data\.datasets\.image_net' found in sys\.modules", category=RuntimeWarning
)

__all__ = ["ImageFolder", "ImageNet", "SyntheticImages"]
