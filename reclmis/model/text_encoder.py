"""CLIP-style text encoder (paper section III-A): transformers' CLIPTextModel built from the preset, or a
pretrained one loaded from a local Hugging Face directory and frozen."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from reclmis.config import RecLMISConfig
from reclmis.model.tokenizer import BOS, EOS, NoteTokenizer


class TextEncoder(nn.Module):
    """Token features E (B, L, text_width) of a note; padded positions are set to zero."""

    def __init__(self, model: CLIPTextModel, frozen: bool) -> None:
        super().__init__()
        self.model = model
        self.frozen = frozen
        if frozen:
            self.model.requires_grad_(False)

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    @classmethod
    def from_config(cls, config: RecLMISConfig, tokenizer: NoteTokenizer) -> TextEncoder:
        """A randomly initialised text tower sized by the preset, trained with the rest of the model."""
        text_config = CLIPTextConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=config.text_width,
            intermediate_size=4 * config.text_width,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=config.max_text_len,
            pad_token_id=tokenizer.pad_id,
            bos_token_id=tokenizer.token_id(BOS),
            eos_token_id=tokenizer.token_id(EOS),
        )
        return cls(CLIPTextModel(text_config), frozen=False)

    @classmethod
    def from_hf_config(cls, values: dict, frozen: bool) -> TextEncoder:
        """An encoder of the architecture described by a saved ``CLIPTextConfig`` dict (weights loaded later)."""
        return cls(CLIPTextModel(CLIPTextConfig.from_dict(values)), frozen=frozen)

    def hf_config(self) -> dict:
        return self.model.config.to_dict()

    @classmethod
    def from_pretrained(cls, path: str | Path, max_text_len: int, frozen: bool = True) -> TextEncoder:
        """Load a CLIP text model saved with ``save_pretrained`` from local disk (never from the hub)."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"text_encoder={path} is not a Hugging Face model directory (no config.json)"
            )
        model = CLIPTextModel.from_pretrained(str(path), local_files_only=True)
        if max_text_len > model.config.max_position_embeddings:
            raise ValueError(
                f"max_text_len={max_text_len} exceeds the {model.config.max_position_embeddings} positions "
                f"of the text encoder in {path}"
            )
        return cls(model, frozen=frozen)

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if self.frozen:
            self.model.eval()  # a frozen encoder keeps its inference behaviour
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``attention_mask`` marks a prefix of each row (right padding, as the tokenizer pads). The tower's
        causal attention never lets a token see later positions, so the padding needs no mask of its own:
        passing none keeps the transformer on its causal fast path without a host synchronisation."""
        hidden = self.model(input_ids=input_ids).last_hidden_state
        return hidden * attention_mask[..., None].to(hidden.dtype)
