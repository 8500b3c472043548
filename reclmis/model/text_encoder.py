"""The text encoder (paper section III-A): token features E of a note from a Hugging Face text model.

Two sources:

- a pretrained model, frozen by default as in the paper: a local directory saved with ``save_pretrained``
  or a hub id (fetched by transformers only when one is given). CLIP text towers (a ``CLIPTextModel``
  directory, or the text half of a full ``CLIPModel``), the BERT family (BERT, RoBERTa, MiniLM, PubMedBERT,
  BioClinicalBERT) and models with their own code (CXR-BERT, behind ``trust_remote_code``);
- a CLIP-style tower sized by the preset and trained from scratch with the model.

Every weight of a pretrained model must load: a directory whose tensors are missing or do not fit its
architecture is an error naming the directory and the tensors, never a partly random tower.
"""

from __future__ import annotations

import contextlib
import re
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, CLIPTextConfig, CLIPTextModel, PreTrainedModel

from reclmis.config import RecLMISConfig
from reclmis.model.tokenizer import BOS, EOS, NoteTokenizer

# Weights a pretrained checkpoint may lack without changing the token features: the pooler of BERT-family
# models (its output, a sentence vector, is never used here).
UNUSED_PREFIXES = ("pooler.",)
# Text towers whose self-attention is causal: with right padding no valid token can see a padded one, so they
# run without a padding mask (which keeps them on their causal fast path, free of host synchronisation).
CAUSAL_MODEL_TYPES = ("clip_text_model",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class TextEncoderError(ValueError):
    """A text encoder cannot be loaded as asked; the message names the source and what to do."""


def is_hub_id(source: str) -> bool:
    """Whether ``source``, which is no existing path, reads as a Hugging Face hub id ("org/name")."""
    return not Path(source).expanduser().exists() and bool(_HUB_ID.match(source))


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' own load report and progress bar stay quiet: this module checks the load itself."""
    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()


def _fetch_hint(source: str) -> str:
    return (
        f'on a machine with network, save it with `python -c "from transformers import AutoModel, '
        f"AutoTokenizer; AutoModel.from_pretrained('{source}').save_pretrained('DIR'); "
        f"AutoTokenizer.from_pretrained('{source}').save_pretrained('DIR')\"` and pass --text-encoder DIR"
    )


def resolve_source(source: str) -> tuple[str, bool]:
    """``(source, local)``: a local model directory (it must hold config.json) or a hub id."""
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise TextEncoderError(
                f"text_encoder={source} is not a Hugging Face model directory (no config.json)"
            )
        return str(path), True
    if not is_hub_id(source):
        raise FileNotFoundError(f"text_encoder={source}: no such directory (nor a hub id like 'org/name')")
    return source, False


def load_pretrained_model(source: str, trust_remote_code: bool = False) -> PreTrainedModel:
    """The text model of ``source`` with every one of its weights loaded (see the module docstring)."""
    source, local = resolve_source(source)
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(
                source, trust_remote_code=trust_remote_code, local_files_only=local
            )
            # a full CLIP model directory: its text half, whose weights carry the prefix text_model.
            model_class = CLIPTextModel if config.model_type == "clip" else AutoModel
            model, info = model_class.from_pretrained(
                source, trust_remote_code=trust_remote_code, local_files_only=local, output_loading_info=True
            )
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise TextEncoderError(
                f"text_encoder={source} runs its own code (as CXR-BERT does): review it, then pass "
                "--trust-remote-code (model.trust_remote_code=true)"
            ) from err
        raise TextEncoderError(f"text_encoder={source} cannot be loaded: {err}") from err
    except RuntimeError as err:  # transformers raises this for tensors whose shapes do not fit
        raise TextEncoderError(
            f"text_encoder={source}: its weights do not fit the architecture its config.json describes: "
            f"{str(err).splitlines()[0]}"
        ) from err
    except OSError as err:
        if local:
            raise TextEncoderError(f"text_encoder={source} cannot be read: {err}") from err
        raise TextEncoderError(
            f"text_encoder={source} could not be fetched from the Hugging Face hub ({type(err).__name__}); "
            + _fetch_hint(source)
        ) from err
    missing = sorted(k for k in info["missing_keys"] if not k.startswith(UNUSED_PREFIXES))
    mismatched = sorted(str(k) for k in info["mismatched_keys"])
    if missing or mismatched or info["error_msgs"]:
        problems = [f"{len(missing)} missing ({_some(missing)})"] if missing else []
        problems += [f"{len(mismatched)} of another shape ({_some(mismatched)})"] if mismatched else []
        problems += list(info["error_msgs"])
        raise TextEncoderError(
            f"text_encoder={source}: not every weight of its {type(model).__name__} loads: "
            f"{'; '.join(problems)}. A partly random text encoder is refused: check that the directory "
            "holds the model its config.json names"
        )
    if getattr(model.config, "is_encoder_decoder", False):
        model = model.get_encoder()
    return model


def _some(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")


class TextEncoder(nn.Module):
    """Token features E (B, L, width) of a note: the model's last hidden state under its own attention
    mask, with padded positions set to zero, so that padding never changes a valid token's feature.

    A frozen encoder stays in eval mode (no dropout) and runs without autograd.
    """

    def __init__(self, model: PreTrainedModel, frozen: bool, source: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.frozen = frozen
        self.source = source  # the pretrained directory or hub id, None for a tower trained from scratch
        self.padding_mask = model.config.model_type not in CAUSAL_MODEL_TYPES
        if frozen:
            self.model.requires_grad_(False)
            self.model.eval()

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    @classmethod
    def from_config(cls, config: RecLMISConfig, tokenizer: NoteTokenizer) -> TextEncoder:
        """A randomly initialised CLIP text tower sized by the preset, trained with the rest of the model."""
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
    def from_pretrained(
        cls, source: str | Path, max_text_len: int, frozen: bool = True, trust_remote_code: bool = False
    ) -> TextEncoder:
        """A pretrained text model from a local directory or a hub id (see :func:`load_pretrained_model`)."""
        model = load_pretrained_model(str(source), trust_remote_code)
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions is not None and max_text_len > positions:
            raise TextEncoderError(
                f"max_text_len={max_text_len} exceeds the {positions} positions of text_encoder={source}"
            )
        return cls(model, frozen=frozen, source=str(source))

    def spec(self) -> dict[str, Any]:
        """What rebuilds this encoder's architecture without its source (its weights are in the model's
        state dict): the model class, its configuration and where it came from."""
        return {
            "architecture": type(self.model).__name__,
            "config": self.model.config.to_dict(),
            "source": self.source,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any], frozen: bool, trust_remote_code: bool = False) -> TextEncoder:
        """An encoder of the architecture ``spec`` describes, its weights to be loaded from a checkpoint."""
        values = dict(spec["config"])
        architecture = getattr(transformers, spec["architecture"], None)
        if architecture is not None:
            config_class = architecture.config_class
            with _quiet_transformers():
                model = architecture(config_class.from_dict(values))
            return cls(model, frozen=frozen, source=spec.get("source"))
        # a model with its own code: the code comes from its source again
        source = spec.get("source")
        if not trust_remote_code or source is None:
            raise TextEncoderError(
                f"this checkpoint's text encoder ({spec['architecture']}) runs its own code, which is not "
                "stored in checkpoints: it needs trust_remote_code and its source "
                f"({source or 'unknown'}) available"
            )
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(source, trust_remote_code=True)
            model = AutoModel.from_config(config, trust_remote_code=True)
        return cls(model, frozen=frozen, source=source)

    def describe(self) -> str:
        """One line for the training log: the model, its source, width, depth and whether it learns."""
        layers = getattr(self.model.config, "num_hidden_layers", "?")
        origin = f"from {self.source}" if self.source else "trained from scratch"
        state = "frozen" if self.frozen else "trained"
        return f"{type(self.model).__name__} {origin}: width {self.width}, {layers} layers, {state}"

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if self.frozen:
            self.model.eval()  # a frozen encoder keeps its inference behaviour
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``attention_mask`` (B, L) bool marks a prefix of each row (right padding, as the tokenizer pads)."""
        mask = attention_mask.to(torch.long) if self.padding_mask else None
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return hidden * attention_mask[..., None].to(hidden.dtype)


class TextFeatureCache:
    """The token features of a frozen text encoder, computed once per distinct tokenised note.

    Notes repeat (MoNuSeg: 24 training notes, 9 distinct; QaTa-COV19's templates), so a frozen tower need not
    run in every step. Features live in rows of one tensor on the encoder's device; a note is found by its
    valid token ids, read from the host copy of the batch (no device read), and the least recently used
    note leaves when ``capacity`` notes are held. Padding is not part of the key: a valid token's feature
    does not depend on it.
    """

    def __init__(self, encoder: TextEncoder, capacity: int = 8192) -> None:
        if not encoder.frozen:
            raise ValueError("only a frozen text encoder's features can be cached: a trained one changes")
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1 note, got {capacity}")
        self.encoder = encoder
        self.capacity = capacity
        self.rows: OrderedDict[tuple[int, ...], int] = OrderedDict()  # note -> row, least recent first
        self.store: torch.Tensor | None = None  # (rows, max length, width)
        self.computed = 0  # notes run through the encoder so far

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        """Features (B, L, width) on ``device`` of the notes ``input_ids`` (B, L) on the host."""
        if input_ids.device.type != "cpu" or attention_mask.device.type != "cpu":
            raise ValueError("the text feature cache looks notes up by the host copy of input_ids")
        keys = [tuple(ids[valid].tolist()) for ids, valid in zip(input_ids, attention_mask, strict=True)]
        distinct = len(set(keys))
        if distinct > self.capacity:
            raise ValueError(
                f"a batch holds {distinct} distinct notes, more than the cache's {self.capacity}"
            )
        missing = list(dict.fromkeys(key for key in keys if key not in self.rows))
        for key in keys:
            if key in self.rows:
                self.rows.move_to_end(key)
        if missing:
            self._insert(missing, input_ids, attention_mask, keys, device)
        index = torch.tensor([self.rows[key] for key in keys], dtype=torch.long)
        return self.store.index_select(0, index.to(device, non_blocking=True))[:, : input_ids.shape[1]]

    def _insert(
        self,
        missing: list[tuple[int, ...]],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        keys: list[tuple[int, ...]],
        device: torch.device,
    ) -> None:
        first = [keys.index(key) for key in missing]
        ids, mask = input_ids[first].to(device), attention_mask[first].to(device)
        with torch.no_grad():
            features = self.encoder(ids, mask)
        length = max(input_ids.shape[1], 0 if self.store is None else self.store.shape[1])
        free = self._reserve(len(missing), length, features, device)
        self.store[free, : features.shape[1]] = features
        self.store[free, features.shape[1] :] = 0
        self.rows.update(zip(missing, free, strict=True))
        self.computed += len(missing)

    def _reserve(self, n: int, length: int, like: torch.Tensor, device: torch.device) -> list[int]:
        """Rows for ``n`` new notes: unused rows of the store (grown by doubling up to the capacity), else
        those of the least recently used notes (never one of the current batch, which were moved last)."""
        needed = len(self.rows) + n
        size = 0 if self.store is None else self.store.shape[0]
        too_short = self.store is not None and length > self.store.shape[1]
        if self.store is None or too_short or (needed > size and size < self.capacity):
            grown = min(self.capacity, max(needed, 2 * size, 16))
            store = like.new_zeros(grown, length, like.shape[-1], device=device)
            if self.store is not None:
                store[:size, : self.store.shape[1]] = self.store
            self.store = store
            size = grown
        free = sorted(set(range(size)) - set(self.rows.values()))[:n]
        while len(free) < n:
            free.append(self.rows.popitem(last=False)[1])
        return free
