"""Checkpoints: written atomically (temporary file, then rename), loaded with ``weights_only``.

A checkpoint holds everything needed to continue training exactly or to run the model elsewhere: model,
optimizer, scheduler and grad-scaler states, the epoch, the best validation Dice, the configuration and the
tokenizer. Randomness is re-derived from (seed, epoch, rank) at every epoch start (see
``reclmis.train.trainer.seed_epoch``), so the RNG state of a run is its seed and epoch, both stored here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from reclmis.config import RecLMISConfig
from reclmis.data.tokenizer import NoteTokenizer
from reclmis.model import RecLMIS, TextEncoder

FORMAT_VERSION = 1


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` through a temporary file in the same folder, so a crash mid-write never
    leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save({"format_version": FORMAT_VERSION, **state}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise ValueError(f"checkpoint {path} cannot be read: {err}") from err
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION or "model" not in state:
        raise ValueError(f"{path} is not a reclmis checkpoint (format version {FORMAT_VERSION})")
    return state


def model_from_state(state: dict[str, Any]) -> RecLMIS:
    """Rebuild the model of a loaded checkpoint with its tokenizer, text encoder and weights (train mode);
    a pretrained text encoder's directory is not needed again."""
    config = RecLMISConfig.from_dict(state["model_config"])
    tokenizer = NoteTokenizer.from_state(state["tokenizer"]) if state.get("tokenizer") else None
    text_encoder = None
    if state.get("text_encoder_config") is not None:
        text_encoder = TextEncoder.from_hf_config(
            state["text_encoder_config"], frozen=config.text_encoder_frozen
        )
    model = RecLMIS(config, tokenizer, text_encoder)
    model.load_state_dict(state["model"])
    return model


def model_from_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[RecLMIS, dict[str, Any]]:
    """The model of a checkpoint file in eval mode on ``device``, and the checkpoint itself."""
    state = load_checkpoint(path)
    return model_from_state(state).to(device).eval(), state
