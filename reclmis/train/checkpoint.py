"""Checkpoints: written atomically (temporary file, then rename), loaded with ``weights_only``.

A checkpoint holds everything needed to continue training exactly or to run the model elsewhere: model,
optimizer, scheduler and grad-scaler states, the epoch, the best validation Dice, the configuration and the
tokenizer. Randomness is re-derived from (seed, epoch, rank) at every epoch start (see
``reclmis.train.trainer.seed_epoch``), so the RNG state of a run is its seed and epoch, both stored here.

A write goes to ``.NAME.tmp-PID`` beside ``NAME``, then is renamed over it; every save also removes the
temporary files that killed processes (dead pids) left in its folder. Test hook: with the environment
variable ``RECLMIS_TEST_PAUSE_WRITE=NAME[:SECONDS]`` a save of a file called NAME stops halfway through
writing its temporary file for SECONDS (default 600), so a test can kill the process mid-write.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

from reclmis.config import RecLMISConfig
from reclmis.model import RecLMIS, TextEncoder
from reclmis.model.tokenizer import NoteTokenizer
from reclmis.train.run_folder import process_alive

FORMAT_VERSION = 3


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` through a temporary file in the same folder, so a crash mid-write never
    leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = _temporary(path)
    try:
        state = {"format_version": FORMAT_VERSION, **state}
        pause = _test_pause(path.name)
        if pause is None:
            torch.save(state, tmp)
        else:
            _save_slowly(state, tmp, pause)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def copy_checkpoint(source: str | Path, path: str | Path) -> Path:
    """Copy a checkpoint file as :func:`save_checkpoint` writes one: temporary file, then rename."""
    path = Path(path)
    remove_stale_temporaries(path.parent)
    tmp = _temporary(path)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the ``.NAME.tmp-PID`` files in ``folder`` whose process is no longer running (a write that
    was killed); returns them. Those of running processes, this one included, stay."""
    removed = []
    for candidate in Path(folder).glob(".*.tmp-*"):
        match = _TEMPORARY.match(candidate.name)
        if match and int(match[1]) != os.getpid() and not process_alive(int(match[1])):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _test_pause(name: str) -> float | None:
    """Seconds to pause the write of ``name`` (the RECLMIS_TEST_PAUSE_WRITE test hook), else None."""
    target, _, seconds = os.environ.get("RECLMIS_TEST_PAUSE_WRITE", "").partition(":")
    return (float(seconds) if seconds else 600.0) if target == name else None


def _save_slowly(state: dict[str, Any], tmp: Path, pause: float) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getbuffer()
    with tmp.open("wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        time.sleep(pause)
        handle.write(data[len(data) // 2 :])


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint file in today's format (an older one is converted by :func:`upgrade_checkpoint`)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a directory, not a checkpoint file (e.g. {path / 'best.pt'})")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    _check_readable(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise ValueError(f"checkpoint {path} cannot be read: {_load_failure(err)}") from err
    version = state.get("format_version") if isinstance(state, dict) else None
    if (version not in _UPGRADES and version != FORMAT_VERSION) or "model" not in state:
        raise ValueError(f"{path} is not a reclmis checkpoint (format versions 1 to {FORMAT_VERSION})")
    return upgrade_checkpoint(state)


def _check_readable(path: Path) -> None:
    """Name what is wrong with a file that is no checkpoint: empty, foreign, or cut short."""
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"checkpoint {path} cannot be read: the file is empty (0 bytes)")
    with path.open("rb") as handle:
        head = handle.read(4)
    if head[:1] == b"\x80":  # torch.save's format before the zip archive
        return
    if head != b"PK\x03\x04":
        raise ValueError(
            f"checkpoint {path} cannot be read: it is not a checkpoint (a torch.save archive begins with "
            f"'PK', this file with {head!r})"
        )
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"checkpoint {path} cannot be read: the file is truncated ({size} bytes, the archive's end is "
            "missing: an interrupted copy or download?)"
        )


def _load_failure(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        found = next((line for line in lines if "GLOBAL" in line), "")
        return (
            "it holds Python objects besides tensors and plain data, refused since loading them could run "
            f"code ({found})"
        )
    return lines[0] if lines else type(err).__name__


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


def _from_version_2(state: dict[str, Any]) -> dict[str, Any]:
    """Version 2 -> 3: ``interaction_residual`` (on: CI's residual form, off: the official module) became
    ``interaction_injection``, whose default is now the gated injection."""
    values = dict(state["model_config"])
    residual = values.pop("interaction_residual", True)
    values.setdefault("interaction_injection", "residual" if residual else "official")
    return state | {"model_config": values}


_UPGRADES = {1: _from_version_1, 2: _from_version_2}


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
