"""VET-DINO's veterinary layer: radiograph studies in, multi-view pretraining data out, downstream use.

Three layers, each a folder, importing downwards only (ingestion <- pretraining <- downstream):
- `ingestion/`: DICOM reading and writing, view codes, phantom studies, `prepare` (a tree of
  radiographs -> DATA/), the image cache and the manifest.
- `pretraining/`: datasets over DATA/, crop plans and rendering, the multi-view augmentation and
  collate, and the pipelines `train.pipeline` names.
- `downstream/`: fine-tuning (one fitting loop), LoRA, the study model, evaluation, visualisation.
`plugins.py` registers the datasets and pipelines with dinov2 (its entry point), `commands.py`
keeps `python -m vet_ext.<command>` stable, and `demo.py` runs the whole path.
"""
from vet_ext import commands

commands.install()
