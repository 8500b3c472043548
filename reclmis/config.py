"""Configuration: dataclasses with presets, loadable from YAML recipes (``configs/*.yaml``).

A recipe has two sections, ``model`` (RecLMISConfig) and ``train`` (TrainConfig); the ``model`` section may
name a ``preset`` whose values it then overrides.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

AUGMENTATIONS = ("full", "official", "photometric", "none")
INJECTIONS = (
    "gated",
    "zero_init",
    "residual",
    "official",
)  # interaction_injection (reclmis.model.interaction)
# the frames a note's sides are stated in (reclmis.data.note_geometry)
NOTE_FRAMES = ("image", "radiological", "axial")


# The loss terms of Eq. 11 as RecLMISOutput.losses, LossWeights.per_term and the training logs name them:
# L_T2V (CVR, Eq. 8), L_V2T (CLR, Eq. 10), L_CCL (Eq. 6) and the two halves of L_seg.
AUXILIARY_TERMS = ("t2v", "v2t", "ccl")
SEGMENTATION_TERMS = ("dice", "bce")
LOSS_TERMS = (*SEGMENTATION_TERMS, *AUXILIARY_TERMS)


@dataclass
class LossWeights:
    """Eq. 11: L = v2t * L_V2T + t2v * L_T2V + ccl * L_CCL + seg * (dice * L_Dice + bce * L_BCE).

    The defaults are the official code's: 5 * (0.5 Dice + 0.5 BCE).
    """

    v2t: float = 1.0
    t2v: float = 1.0
    ccl: float = 0.2
    seg: float = 5.0
    dice: float = 0.5
    bce: float = 0.5

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if not value >= 0:
                raise ValueError(f"loss_weights.{name} must be non-negative, got {value}")

    def per_term(self) -> dict[str, float]:
        """The weight of each term of ``LOSS_TERMS`` in Eq. 11 (the segmentation weight folded into Dice
        and BCE)."""
        weights = {name: getattr(self, name) for name in AUXILIARY_TERMS}
        return weights | {name: self.seg * getattr(self, name) for name in SEGMENTATION_TERMS}


@dataclass
class RecLMISConfig:
    """Every size of the model derives from these fields and the image size."""

    image_size: int = 224
    in_channels: int = 3
    base_channels: int = 64  # c: the U-Net runs c, 2c, 4c, 8c, 8c; visual tokens have width 8c
    max_text_len: int = 18  # L: tokens per note, padding included (18 QaTa/MosMed, 10 MoNuSeg)
    # the text tower trained from scratch (ignored when text_encoder names a pretrained model)
    vocab_size: int = 4096  # size of the BPE tokenizer trained on the notes
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    # a pretrained Hugging Face text model and its tokenizer: a local directory or a hub id (CLIP text towers,
    # the BERT family, models with their own code behind trust_remote_code); None: a CLIP-style tower sized
    # by text_width/text_layers/text_heads, trained from scratch with a BPE tokenizer fitted on the notes
    text_encoder: str | None = None
    freeze_text_encoder: bool = True  # applies to a pretrained text encoder only
    trust_remote_code: bool = False  # let a pretrained text encoder run the code it ships (CXR-BERT)
    interaction_heads: int = 4
    # how the note enters the decoder (reclmis.model.interaction): "gated", the stage-4 features plus CI's
    # image attention through a per-channel tanh gate initialised at 0 (the image-only network at
    # initialisation); "residual", CI's visual output V' = V + MHA(V, E'); "official", the official module
    # without residual sums (docs/differences.md)
    interaction_injection: str = "gated"
    # the gated injection's gate is tanh(gate_speed * alpha): Adam moves alpha by about the learning rate per
    # step, so the gate opens (or closes) gate_speed times faster than a plain tanh(alpha)
    injection_gate_speed: float = 1.0
    # the note also scales the visual tokens in the residual form: V' = g * V + MHA(V, E'), with
    # g = 2 sigmoid(Linear(MHA(V, E'))) per patch and channel, zero-initialised (g = 1 at the start)
    interaction_gate: bool = False
    # LayerNorm on each CI attention's output before it is added: E' = E + LN(MHA(E, V)),
    # V' = V + LN(MHA(V, E')), which bounds what the attentions add to E and V whatever scale their weights
    # reach (docs/differences.md); off = the paper's sum
    interaction_norm: bool = False
    # each reconstructor (CVR, CLR): a memory stack encoding the condition source, then a reconstruction
    # stack rebuilding the masked tokens (the official DualTransformer: 3 + 3, 4 + 4 in the QaTa recipe)
    recon_memory_layers: int = 3
    recon_layers: int = 3
    recon_heads: int = 4
    recon_dropout: float = 0.1
    # the official causal mask in the reconstructors' self-attentions (token i attends to tokens <= i, in
    # raster order for the image); off by default (docs/differences.md)
    recon_causal: bool = False
    attention_mode: str = "reweight"  # "reweight" (official code) or "scale" (literal Eq. 7)
    # dropout on V' and E' before the W_poi / W_woi heads, in training (official: 0.5 MosMed and MoNuSeg)
    w_head_dropout: float = 0.0
    img_mask_ratio: float = 0.5
    text_mask_ratio: float = 0.3
    detach_recon_targets: bool = True  # detach W_poi/W_woi and the targets in Eq. 8/10
    # standardise each target token (LayerNorm without affine, as MAE's normalised-pixel loss): a text tower
    # trained from scratch can otherwise inflate its features and with them L_V2T; off = raw features
    normalize_recon_targets: bool = True
    # Dice loss 1 - (2 sum(p t) + s) / (sum(p^2) + sum(t^2) + s) with squared terms (official, V-Net) or
    # 1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s) (off); s = dice_smooth
    dice_squared: bool = True
    dice_smooth: float = 4e-5  # official: 1e-5 on prediction and mask both halved, the same loss as 4e-5 here
    logit_scale_init: float = math.log(1 / 0.07)
    # L_CCL without the pairs of different images whose notes are the same token sequence among the negatives
    # (QaTa-COV19 repeats its notes): the official loss pushes such a pair apart although no note could tell
    # the two images apart; off = the official loss
    ccl_exclude_same_notes: bool = True
    logit_scale_max: float = 100.0
    loss_weights: LossWeights = field(default_factory=LossWeights)
    # ablations (paper Table III/IV)
    use_text: bool = True  # off: no text encoder, no CI, no reconstruction or contrastive loss (row e)
    use_cvr: bool = True
    use_clr: bool = True
    use_ccl: bool = True
    conditioned: bool = True  # off: reconstructors and CCL ignore W_poi/W_woi (uniform condition)
    ops_backend: str = "auto"  # backend of the custom ops: "auto" or "reference" (the official choices)

    def __post_init__(self) -> None:
        if isinstance(self.loss_weights, dict):
            self.loss_weights = LossWeights(**self.loss_weights)
        self.validate()

    @property
    def visual_width(self) -> int:
        return 8 * self.base_channels

    @property
    def text_encoder_frozen(self) -> bool:
        """Only a pretrained encoder is frozen; one trained from scratch always learns."""
        return self.text_encoder is not None and self.freeze_text_encoder

    @property
    def grid_size(self) -> int:
        return self.image_size // 16

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def validate(self) -> None:
        if self.image_size < 16 or self.image_size % 16:
            raise ValueError(
                f"image_size must be a positive multiple of 16 (four 2x poolings), got {self.image_size}"
            )
        if self.attention_mode not in ("reweight", "scale"):
            raise ValueError(f"attention_mode must be 'reweight' or 'scale', got {self.attention_mode!r}")
        for name in ("img_mask_ratio", "text_mask_ratio", "recon_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.w_head_dropout < 1.0:
            raise ValueError(f"w_head_dropout must be in [0, 1), got {self.w_head_dropout}")
        for name in ("recon_memory_layers", "recon_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.recon_layers < 1 and (self.use_cvr or self.use_clr):
            raise ValueError("recon_layers must be at least 1 while use_cvr or use_clr is on")
        if self.interaction_injection not in INJECTIONS:
            raise ValueError(
                f"interaction_injection must be one of {INJECTIONS}, got {self.interaction_injection!r}"
            )
        if not self.injection_gate_speed > 0:
            raise ValueError(f"injection_gate_speed must be positive, got {self.injection_gate_speed}")
        if self.interaction_gate and self.interaction_injection != "residual":
            raise ValueError(
                "interaction_gate scales CI's residual visual tokens: it needs interaction_injection='residual'"
            )
        if not self.dice_smooth > 0:
            raise ValueError(f"dice_smooth must be positive, got {self.dice_smooth}")
        for name, heads in (("interaction_heads", self.interaction_heads), ("recon_heads", self.recon_heads)):
            if self.visual_width % heads:
                raise ValueError(
                    f"{name}={heads} must divide the visual width 8*base_channels={self.visual_width}"
                )
        if self.text_width % self.text_heads:
            raise ValueError(f"text_heads={self.text_heads} must divide text_width={self.text_width}")
        if self.max_text_len < 2:
            raise ValueError(
                f"max_text_len must be at least 2 (begin and end tokens), got {self.max_text_len}"
            )
        if self.ops_backend not in ("auto", "reference"):
            raise ValueError(f"ops_backend must be 'auto' or 'reference', got {self.ops_backend!r}")

    def replace(self, **changes: Any) -> RecLMISConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RecLMISConfig:
        values = dict(values)
        preset = values.pop("preset", None)
        _reject_unknown(cls, values, "model")
        return cls.preset(preset, **values) if preset is not None else cls(**values)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> RecLMISConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, RecLMISConfig] = {
    # DESIGN shapes: U-Net base 64, CLIP ViT-B/32 text tower (12 layers, width 512, 8 heads)
    "paper": RecLMISConfig(),
    "small": RecLMISConfig(base_channels=32, text_width=256, text_layers=4, text_heads=4),
    # trains on CPU in minutes at 64x64
    "tiny": RecLMISConfig(
        image_size=64, base_channels=16, text_width=128, text_layers=2, text_heads=4, vocab_size=1024
    ),
}


COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
SCHEDULERS = ("cosine", "cosine_restarts", "exponential", "constant")
MASK_RESIZE_MODES = ("nearest", "bilinear")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping; the paper's values live in the recipes (configs/*_paper.yaml)."""

    epochs: int = 100
    batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.0  # Adam's L2 penalty; the official recipes use none
    # learning rate per epoch e (stepped once per epoch), never below min_lr:
    #   "cosine_restarts"  min_lr + (lr - min_lr) (1 + cos(pi (e mod restart_epochs) / restart_epochs)) / 2
    #                      (SGDR; the official QaTa and MoNuSeg schedule, and the default)
    #   "cosine"           the same with one period of `epochs` epochs: one annealing over the run
    #   "exponential"      max(lr * lr_decay^e, min_lr) (official MosMedData+)
    #   "constant"         lr
    scheduler: str = "cosine_restarts"
    min_lr: float = 1e-4
    restart_epochs: int = 10
    lr_decay: float = 0.99
    precision: str = (
        "auto"  # "auto" (bf16 on CUDA when supported, else fp16; fp32 on CPU), "fp32", "fp16", "bf16"
    )
    channels_last: bool = True
    num_workers: int = 2
    # "full": the official augmentation (blur, colour, rot90/flip or rotation) with the note's positional
    # words moved with the image (note_frame); "official": the same without rewriting the note, as the
    # official code; "photometric": blur and colour only; "none"
    augment: str = "full"
    # the frame of the notes' positions (reclmis.data.note_geometry): "radiological" (chest radiographs:
    # "left" is the patient's left, on the image's right), "image" (pathology tiles: "left" is the image's
    # left) or "axial" (axial CT slices: sides as radiological, "upper"/"lower" name lobes, not rows)
    note_frame: str = "radiological"
    early_stopping_patience: int = 50  # epochs without a better validation Dice; 0 disables
    log_every: int = 10  # steps between host reads of the running losses
    seed: int = 0
    device: str = "auto"
    sync_batchnorm: bool = False
    global_contrastive: bool | None = None  # None: on when the world size is above 1
    # cache_images: every split decoded once into uint8 tensors, batches gathered by index and augmented
    # as a batch on the training device (reclmis.data.cached); off: a DataLoader of per-sample transforms.
    # cache_device: where the cached training and validation splits live, "cpu" (host memory; batches
    # gathered into pinned memory for a GPU) or "cuda" (the training GPU)
    cache_images: bool = True
    cache_device: str = "cpu"
    # features of a frozen pretrained text encoder kept per distinct tokenised note (so the tower runs once
    # per note, not once per step): at most this many notes on the model's device; 0 runs it every step
    text_cache_size: int = 8192
    # torch.compile the model (off by default until measured on a GPU: docs/performance.md). compile_mode
    # "auto" is "reduce-overhead" (CUDA graphs) on one CUDA device, "max-autotune-no-cudagraphs" under DDP on
    # CUDA and the default mode on CPU; compile_backend "aot_eager" traces without generating code (a quick
    # check)
    compile: bool = False
    compile_mode: str = "auto"
    compile_backend: str = "inductor"
    # masks brought to the model's image size: "nearest", or "bilinear" as the official loader (bilinear
    # resampling of the 0/255 mask, then every value above 0 is foreground: a slightly dilated mask)
    mask_resize: str = "nearest"

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}")
        if self.note_frame not in NOTE_FRAMES:
            raise ValueError(f"note_frame must be one of {NOTE_FRAMES}, got {self.note_frame!r}")
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise ValueError(f"precision must be auto, fp32, fp16 or bf16, got {self.precision!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise ValueError(
                f"compile_backend must be one of {COMPILE_BACKENDS}, got {self.compile_backend!r}"
            )
        for name in ("epochs", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.cache_device not in ("cpu", "cuda"):
            raise ValueError(f"cache_device must be cpu or cuda, got {self.cache_device!r}")
        if self.mask_resize not in MASK_RESIZE_MODES:
            raise ValueError(f"mask_resize must be nearest or bilinear, got {self.mask_resize!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.restart_epochs < 1:
            raise ValueError(f"restart_epochs must be at least 1, got {self.restart_epochs}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        for name in ("num_workers", "early_stopping_patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.text_cache_size < 0:
            raise ValueError(
                f"text_cache_size must be non-negative (0 disables the cache), got {self.text_cache_size}"
            )
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {self.weight_decay}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        _reject_unknown(cls, values, "train")
        return cls(**values)


def _reject_unknown(cls: type, values: dict[str, Any], section: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in the {section!r} section; known keys: {sorted(known)}")


def read_recipe(path: str | Path) -> dict[str, dict[str, Any]]:
    """The raw ``model`` and ``train`` sections of a YAML recipe."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"recipe {path} must be a mapping with 'model' and 'train' sections")
    unknown = sorted(set(raw) - {"model", "train"})
    if unknown:
        raise ValueError(f"recipe {path}: unknown section(s) {unknown}; expected 'model' and 'train'")
    return {"model": dict(raw.get("model") or {}), "train": dict(raw.get("train") or {})}


def build_configs(
    sections: dict[str, dict[str, Any]], origin: str = "recipe"
) -> tuple[RecLMISConfig, TrainConfig]:
    try:
        return RecLMISConfig.from_dict(sections["model"]), TrainConfig.from_dict(sections["train"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{origin}: {err}") from err


def load_recipe(path: str | Path) -> tuple[RecLMISConfig, TrainConfig]:
    """Read a YAML recipe with ``model`` and ``train`` sections."""
    return build_configs(read_recipe(path), f"recipe {path}")
