"""Data: LViT-layout datasets, training augmentation and synthetic language-guided data."""

from reclmis.data.dataset import (
    MASK_RULE,
    DatasetError,
    DatasetWarning,
    LViTDataset,
    Sample,
    find_notes_file,
    load_image,
    read_notes,
)
from reclmis.data.synthetic import ZONES, describe_zones, make_synthetic, zone_boxes
from reclmis.data.transforms import TrainAugmentation

__all__ = [
    "MASK_RULE",
    "ZONES",
    "DatasetError",
    "DatasetWarning",
    "LViTDataset",
    "Sample",
    "TrainAugmentation",
    "describe_zones",
    "find_notes_file",
    "load_image",
    "make_synthetic",
    "read_notes",
    "zone_boxes",
]
