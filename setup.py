"""Packaging for VET-DINO: the DINOv2-compatible core (`dinov2`) and the veterinary layer (`vet_ext`)."""
from setuptools import find_packages, setup

setup(
    name="vet-dino",
    version="0.1.0",
    description="Self-supervised multi-view pretraining of Vision Transformers on radiograph studies",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["dinov2", "dinov2.*", "vet_ext", "vet_ext.*"]),
    package_data={"dinov2": ["configs/*.yaml", "configs/*/*.yaml"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.8",  # why: MIN_TORCH in dinov2/__init__.py (tests/test_requirements.py keeps the two equal)
        "numpy",
        "fvcore",
        "omegaconf",
        "submitit",
        "pydicom>=3",
        "pylibjpeg",
        "pylibjpeg-libjpeg",
        "pylibjpeg-openjpeg",
        "pylibjpeg-rle",
        "imagecodecs",  # why: libjpeg-turbo decodes lossless JPEG ~4x faster than pylibjpeg; CharLS for JPEG-LS
        "pillow",
        "pandas",
        "pyarrow",
        "scikit-learn",
        "matplotlib",
        "tqdm",
        "safetensors",  # why: .safetensors weights, transformers / timm / RAD-DINO folders (dinov2.models.formats)
    ],
    extras_require={
        "xformers": ["xformers"],
        # transformers only for the tests that open our exports with it; exporting writes its files without it
        "dev": ["pytest", "pytest-timeout", "transformers"],
    },
    entry_points={
        "dinov2.extensions": ["vet_ext = vet_ext.plugins:register"],
    },
)
