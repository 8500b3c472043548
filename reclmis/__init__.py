"""RecLMIS: language-guided medical image segmentation by cross-modal conditioned reconstruction."""

from reclmis.config import PRESETS, RecLMISConfig, TrainConfig

__version__ = "0.1.0"

__all__ = ["PRESETS", "RecLMISConfig", "TrainConfig", "__version__"]
