"""Data: LViT-layout datasets, training augmentation and synthetic language-guided data."""

from reclmis.data.dataset import DatasetError, LViTDataset, Sample, find_notes_file, load_image, read_notes
from reclmis.data.synthetic import ZONES, describe_zones, make_synthetic, zone_boxes
from reclmis.data.transforms import TrainAugmentation

__all__ = [
    "ZONES",
    "DatasetError",
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
