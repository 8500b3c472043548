"""RecLMIS (paper Fig. 2): U-Net+PLAM segmentation guided by a clinical note through Conditioned
Interaction, trained with conditioned reconstruction (CVR, CLR) and the conditioned contrastive loss."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from reclmis.config import AUXILIARY_TERMS, SEGMENTATION_TERMS, RecLMISConfig
from reclmis.losses import (
    GlobalBatch,
    bce_loss,
    conditioned_contrastive_loss,
    contrastive_scale,
    dice_loss,
    weighted_reconstruction_loss,
)
from reclmis.model.interaction import ConditionedInteraction, InterestWeights, masked_conv1d
from reclmis.model.reconstruction import ConditionedReconstructor
from reclmis.model.text_encoder import TextEncoder
from reclmis.model.tokenizer import NoteTokenizer
from reclmis.model.unet import UNetDecoder, UNetEncoder
from reclmis.ops import weighted_mask


@dataclass
class RecLMISOutput:
    """logits (B, 1, S, S); W_poi (B, N) and W_woi (B, L) in training or when asked; in training, every
    loss term of Eq. 11 under ``losses`` with the weighted sum under ``losses["total"]``."""

    logits: torch.Tensor
    w_poi: torch.Tensor | None = None
    w_woi: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)


class RecLMIS(nn.Module):
    def __init__(
        self,
        config: RecLMISConfig,
        tokenizer: NoteTokenizer | None = None,
        text_encoder: TextEncoder | None = None,
    ) -> None:
        """``text_encoder`` defaults to the pretrained directory ``config.text_encoder`` or, without one,
        to a CLIP text tower sized by the preset and trained from scratch."""
        super().__init__()
        config.validate()
        self.config = config
        self.tokenizer = tokenizer
        # set by the trainer under torchrun: L_CCL over the global batch of all ranks
        self.global_batch: GlobalBatch | None = None
        c, width = config.base_channels, config.visual_width
        self.encoder = UNetEncoder(config.in_channels, c)
        self.decoder = UNetDecoder(c)
        self.cvr: ConditionedReconstructor | None = None
        self.clr: ConditionedReconstructor | None = None
        self.logit_scale: nn.Parameter | None = None
        if not config.use_text:
            return
        if tokenizer is None:
            raise ValueError("a tokenizer is required when config.use_text is on")
        if text_encoder is None and config.text_encoder is not None:
            text_encoder = TextEncoder.from_pretrained(
                config.text_encoder,
                config.max_text_len,
                frozen=config.text_encoder_frozen,
                trust_remote_code=config.trust_remote_code,
            )
        self.text_encoder = text_encoder or TextEncoder.from_config(config, tokenizer)
        self.text_projection = nn.Conv1d(self.text_encoder.width, width, kernel_size=3, padding=1)
        self.interaction = ConditionedInteraction(
            width,
            config.num_patches,
            config.interaction_heads,
            injection=config.interaction_injection,
            note_gate=config.interaction_gate,
            norm=config.interaction_norm,
            gate_speed=config.injection_gate_speed,
        )
        self.poi_head = InterestWeights(width, config.w_head_dropout)  # W_poi
        self.woi_head = InterestWeights(width, config.w_head_dropout)  # W_woi
        recon = dict(
            width=width,
            memory_layers=config.recon_memory_layers,
            layers=config.recon_layers,
            heads=config.recon_heads,
            dropout=config.recon_dropout,
            mode=config.attention_mode,
            backend=config.ops_backend,
            causal=config.recon_causal,
        )
        self.cvr = ConditionedReconstructor(**recon) if config.use_cvr else None
        self.clr = ConditionedReconstructor(**recon) if config.use_clr else None
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init)) if config.use_ccl else None

    @classmethod
    def build(cls, config: RecLMISConfig, notes: Sequence[str] | None = None) -> RecLMIS:
        """A model with its tokenizer: the pretrained directory's (``config.text_encoder``), or a BPE
        trained on ``notes`` (the training notes), or none when the text branch is off."""
        if not config.use_text:
            return cls(config)
        if config.text_encoder is not None:
            tokenizer = NoteTokenizer.from_pretrained(
                config.text_encoder, config.max_text_len, trust_remote_code=config.trust_remote_code
            )
            return cls(config, tokenizer)
        if not notes:
            raise ValueError(
                "training notes are required to build the tokenizer of a text encoder trained from scratch"
            )
        return cls(config, NoteTokenizer.train(notes, config.max_text_len, config.vocab_size))

    @property
    def loss_terms(self) -> tuple[str, ...]:
        """The terms of Eq. 11 that this configuration computes in training (the keys of
        ``RecLMISOutput.losses`` besides "total")."""
        auxiliary = {"t2v": self.cvr, "v2t": self.clr, "ccl": self.logit_scale}
        return (*SEGMENTATION_TERMS, *(name for name in AUXILIARY_TERMS if auxiliary[name] is not None))

    def training_only_parameters(self) -> list[nn.Parameter]:
        """Parameters that never run at inference: the reconstructors and the contrastive logit scale."""
        params = [p for m in (self.cvr, self.clr) if m is not None for p in m.parameters()]
        return params + ([self.logit_scale] if self.logit_scale is not None else [])

    def tokenize(
        self, notes: Sequence[str], device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, ...]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (config.use_text is off)")
        return tuple(t.to(device) for t in self.tokenizer(notes))

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        *,
        text_features: torch.Tensor | None = None,
        return_weights: bool = False,
    ) -> RecLMISOutput:
        """``text_features`` (B, L, text width): the text encoder's output for ``input_ids`` when it is
        already known (a frozen encoder's cached features, ``TextFeatureCache``); the encoder then does not
        run."""
        self._check_inputs(images, input_ids, attention_mask, masks)
        *skips, stage4 = self.encoder(images)  # stage4 (B, 8c, g, g)
        if not self.config.use_text:
            out = RecLMISOutput(self.decoder(stage4, skips))
            if self.training and masks is not None:
                out.losses = self._weighted_total(self._segmentation_losses(out.logits, masks))
            return out

        text_mask = attention_mask.bool()
        if text_features is None:
            text_features = self.text_encoder(input_ids, text_mask)  # (B, L, text width)
        text = (
            masked_conv1d(self.text_projection, text_features, text_mask) * text_mask[..., None]
        )  # E (B, L, C)
        v_ci, decoder_input, e_ci = self.interaction(stage4, text, text_mask)  # V' (B, N, C), E' (B, L, C)
        logits = self.decoder(decoder_input, skips)
        out = RecLMISOutput(logits)
        if self.training or return_weights:
            out.w_poi = self.poi_head(v_ci)
            out.w_woi = self.woi_head(e_ci, text_mask)
        if self.training:
            visual = stage4.flatten(2).transpose(1, 2)  # V (B, N, C)
            losses = self._auxiliary_losses(visual, text, text_mask, input_ids, out.w_poi, out.w_woi)
            if masks is not None:
                losses.update(self._segmentation_losses(logits, masks))
            out.losses = self._weighted_total(losses)
        return out

    def _auxiliary_losses(
        self,
        visual: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        input_ids: torch.Tensor,
        w_poi: torch.Tensor,
        w_woi: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """L_T2V (Eq. 8, CVR: the masked V rebuilt from the memory of E under W_woi), L_V2T (Eq. 10, CLR:
        the masked E rebuilt from the memory of V under W_poi) and L_CCL (Eq. 6; ``ccl_exclude_same_notes``: pairs
        of images with the same note are no negatives)."""
        cfg = self.config
        if not cfg.conditioned:  # ablation: uniform conditions in place of W_poi / W_woi
            w_poi = torch.full_like(w_poi, 1.0 / w_poi.shape[1])
            w_woi = text_mask.float() / text_mask.sum(1, keepdim=True).clamp_min(1)
        losses: dict[str, torch.Tensor] = {}
        if self.cvr is not None:
            # the weights are softmax outputs, valid by construction: no eager read-back of them
            masked, _ = weighted_mask(visual, w_poi.detach(), cfg.img_mask_ratio, check_weights=False)
            v_hat = self.cvr(masked, None, text, w_woi, text_mask)
            losses["t2v"] = weighted_reconstruction_loss(v_hat, *self._targets(visual, w_poi))
        if self.clr is not None:
            lengths = text_mask.sum(1)
            masked, _ = weighted_mask(text, w_woi.detach(), cfg.text_mask_ratio, lengths, check_weights=False)
            e_hat = self.clr(masked, text_mask, visual, w_poi, None)
            losses["v2t"] = weighted_reconstruction_loss(e_hat, *self._targets(text, w_woi), text_mask)
        if self.logit_scale is not None:
            scale = contrastive_scale(self.logit_scale, cfg.logit_scale_max)
            losses["ccl"] = conditioned_contrastive_loss(
                visual,
                text,
                w_poi,
                w_woi,
                text_mask,
                scale,
                note_ids=input_ids if cfg.ccl_exclude_same_notes else None,
                backend=cfg.ops_backend,
                global_batch=self.global_batch,
            )
        return losses

    def _targets(self, tokens: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction target and weight of Eq. 8 / 10, detached and standardised as configured."""
        if self.config.detach_recon_targets:
            tokens, weight = tokens.detach(), weight.detach()
        if self.config.normalize_recon_targets:
            tokens = F.layer_norm(tokens.float(), tokens.shape[-1:])
        return tokens, weight

    def _segmentation_losses(self, logits: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.config
        dice = dice_loss(logits, masks, cfg.dice_smooth, squared=cfg.dice_squared)
        return {"dice": dice, "bce": bce_loss(logits, masks)}

    def _weighted_total(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Eq. 11: L = w_v2t L_V2T + w_t2v L_T2V + w_ccl L_CCL + w_seg (w_dice L_Dice + w_bce L_BCE)."""
        weights = self.config.loss_weights.per_term()
        losses["total"] = sum(weights[name] * value for name, value in losses.items())
        return losses

    def _check_inputs(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> None:
        cfg = self.config
        size = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != size:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must have shape (B, {', '.join(map(str, size))}), got {shape}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got {images.dtype}")
        batch = images.shape[0]
        if masks is not None and (masks.dim() != 4 or tuple(masks.shape) != (batch, 1, *size[1:])):
            raise ValueError(
                f"masks must have shape ({batch}, 1, {size[1]}, {size[2]}), got {tuple(masks.shape)}"
            )
        if not cfg.use_text:
            return
        if input_ids is None or attention_mask is None:
            raise ValueError("input_ids and attention_mask are required when config.use_text is on")
        if input_ids.dim() != 2 or input_ids.shape[0] != batch:
            raise ValueError(f"input_ids must have shape ({batch}, L), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.shape[1] > cfg.max_text_len:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens, more than max_text_len={cfg.max_text_len}"
            )
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if attention_mask.dtype not in (torch.bool, torch.int32, torch.int64):
            raise TypeError(f"attention_mask must be a bool or integer tensor, got {attention_mask.dtype}")
