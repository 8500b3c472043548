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
from reclmis.model import RecLMIS, TextEncoder
from reclmis.model.tokenizer import NoteTokenizer

FORMAT_VERSION = 2


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
    """A checkpoint file in today's format (an older one is converted by :func:`upgrade_checkpoint`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise ValueError(f"checkpoint {path} cannot be read: {err}") from err
    version = state.get("format_version") if isinstance(state, dict) else None
    if (version not in _UPGRADES and version != FORMAT_VERSION) or "model" not in state:
        raise ValueError(f"{path} is not a reclmis checkpoint (format versions 1 to {FORMAT_VERSION})")
    return upgrade_checkpoint(state)


# Version 1 predates fields whose defaults changed: the values that rebuild the model such a checkpoint was
# written from (reconstructors without a memory stack, the segmentation loss 5 * (Dice + BCE) with a linear
# Dice denominator and smoothing 1), applied where the checkpoint lacks the field.
LEGACY_MODEL_FIELDS: dict[str, Any] = {"recon_memory_layers": 0, "dice_squared": False, "dice_smooth": 1.0}
LEGACY_LOSS_WEIGHTS: dict[str, float] = {"dice": 1.0, "bce": 1.0}


def _from_version_1(state: dict[str, Any]) -> dict[str, Any]:
    """Version 1 -> 2: the text encoder was always a CLIPTextModel, stored as its config alone."""
    values = dict(state["model_config"])
    for name, value in LEGACY_MODEL_FIELDS.items():
        values.setdefault(name, value)
    if isinstance(values.get("loss_weights"), dict):
        values["loss_weights"] = LEGACY_LOSS_WEIGHTS | values["loss_weights"]
    text_config = state.get("text_encoder_config")
    text_encoder = None
    if text_config is not None:
        text_encoder = {
            "architecture": "CLIPTextModel",
            "config": text_config,
            "source": values.get("text_encoder"),
        }
    state = {k: v for k, v in state.items() if k != "text_encoder_config"}
    return state | {"model_config": values, "text_encoder": text_encoder}


_UPGRADES = {1: _from_version_1}


def upgrade_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """The one place where checkpoints of earlier formats become today's: each step converts one version
    to the next, so a checkpoint of any supported version loads as the model that wrote it."""
    version = state["format_version"]
    while version != FORMAT_VERSION:
        state = _UPGRADES[version](state) | {"format_version": version + 1}
        version += 1
    return state


def checkpoint_model_config(state: dict[str, Any]) -> RecLMISConfig:
    """The model configuration of a loaded checkpoint."""
    return RecLMISConfig.from_dict(state["model_config"])


def model_from_state(state: dict[str, Any]) -> RecLMIS:
    """Rebuild the model of a loaded checkpoint with its tokenizer, text encoder and weights (train mode);
    a pretrained text encoder's directory is not needed again. Weights that do not fit the model its
    configuration describes raise ValueError naming the parameters."""
    config = checkpoint_model_config(state)
    tokenizer = NoteTokenizer.from_state(state["tokenizer"]) if state.get("tokenizer") else None
    text_encoder = None
    if state.get("text_encoder") is not None:
        text_encoder = TextEncoder.from_spec(
            state["text_encoder"],
            frozen=config.text_encoder_frozen,
            trust_remote_code=config.trust_remote_code,
        )
    model = RecLMIS(config, tokenizer, text_encoder)
    try:
        result = model.load_state_dict(state["model"], strict=False)
    except RuntimeError as err:  # shapes that differ
        raise ValueError(
            f"the checkpoint's weights do not fit the model its configuration describes: {err}"
        ) from err
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            "the checkpoint's weights do not fit the model its configuration describes (written by another "
            f"version of reclmis?): {_some(result.missing_keys)} missing, "
            f"{_some(result.unexpected_keys)} unexpected"
        )
    return model


def _some(names: list[str], shown: int = 3) -> str:
    if not names:
        return "none"
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def model_from_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[RecLMIS, dict[str, Any]]:
    """The model of a checkpoint file in eval mode on ``device``, and the checkpoint itself."""
    state = load_checkpoint(path)
    return model_from_state(state).to(device).eval(), state
