"""Training: the trainer, checkpoints and torchrun support."""

from reclmis.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from reclmis.train.trainer import Trainer

__all__ = ["Trainer", "load_checkpoint", "model_from_checkpoint", "save_checkpoint"]
