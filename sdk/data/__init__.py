"""Target data: dataset readers, robust image decoding, synthetic FER domains.

Readers return an :class:`ImageDataset`; :meth:`ImageDataset.load` decodes
it robustly (bad files skipped and counted, reports with hashed ids only).
``sourcefree.data.synthetic`` renders the synthetic FER benchmark domains.
Importing this package never imports torch (nor OpenCV).
"""

from __future__ import annotations

from sourcefree.data.dataset import (
    REASONS,
    Fingerprint,
    ImageDataset,
    LoadedImages,
    ReadReport,
    Sample,
    crop_box,
    hashed_id,
)
from sourcefree.data.formats import (
    read_affectnet,
    read_ckplus,
    read_expw,
    read_fer2013,
    read_ferplus,
    read_jaffe,
    read_rafdb,
)
from sourcefree.data.labels import FER7, FER8, LabelMap, canonical_name
from sourcefree.data.readers import read_image_folder, read_labeled_folder, read_labels_csv
from sourcefree.data.sources import FORMATS, open_dataset

__all__ = [
    "FER7",
    "FER8",
    "FORMATS",
    "REASONS",
    "Fingerprint",
    "ImageDataset",
    "LabelMap",
    "LoadedImages",
    "ReadReport",
    "Sample",
    "canonical_name",
    "crop_box",
    "hashed_id",
    "open_dataset",
    "read_affectnet",
    "read_ckplus",
    "read_expw",
    "read_fer2013",
    "read_ferplus",
    "read_image_folder",
    "read_jaffe",
    "read_labeled_folder",
    "read_labels_csv",
    "read_rafdb",
]
