"""Parameter and FLOP counts in the columns of the paper's Table II (fvcore; one multiply-add = one flop)."""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn

from reclmis.config import RecLMISConfig
from reclmis.model import NoteTokenizer, RecLMIS


@dataclass
class ModelProfile:
    preset: str  # the preset or recipe profiled
    image_size: int
    tokens: int
    gflops_inference: float  # eval-mode graph, batch 1, text encoder included
    params_inference_m: float  # eval-mode modules outside the text encoder
    params_text_encoder_m: float
    params_training_only_m: float  # reconstructors and contrastive logit scale
    recon_layers: str  # memory + reconstruction layers per reconstructor, e.g. "4+4"

    @property
    def params_training_m(self) -> float:
        return self.params_inference_m + self.params_text_encoder_m + self.params_training_only_m

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def table(self) -> str:
        rows = [
            ("preset / image size / tokens", f"{self.preset} / {self.image_size} / {self.tokens}"),
            ("inference FLOPs (G, batch 1)", f"{self.gflops_inference:.2f}"),
            ("inference params (M, without text encoder)", f"{self.params_inference_m:.2f}"),
            ("text encoder params (M)", f"{self.params_text_encoder_m:.2f}"),
            ("training-only params (M)", f"{self.params_training_only_m:.2f}"),
            ("reconstructor layers (memory+reconstruction)", self.recon_layers),
            ("training params (M, all)", f"{self.params_training_m:.2f}"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


class _InferenceGraph(nn.Module):
    """The eval-mode forward returning logits only, for tracing."""

    def __init__(self, model: RecLMIS) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        return self.model(images, input_ids, attention_mask).logits


def _millions(params: list[nn.Parameter]) -> float:
    return sum(p.numel() for p in params) / 1e6


def profile_model(model: RecLMIS, tokens: int, preset: str = "custom") -> ModelProfile:
    from fvcore.nn import FlopCountAnalysis

    cfg = model.config
    model = model.eval()
    images = torch.randn(1, cfg.in_channels, cfg.image_size, cfg.image_size)
    input_ids = torch.full((1, tokens), model.tokenizer.pad_id if model.tokenizer else 0, dtype=torch.int64)
    attention_mask = torch.ones(1, tokens, dtype=torch.bool)
    inference = [*model.encoder.parameters(), *model.decoder.parameters()]
    text_params: list[nn.Parameter] = []
    if cfg.use_text:
        inference += [*model.text_projection.parameters(), *model.interaction.parameters()]
        text_params = list(model.text_encoder.parameters())
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter of torch.jit
        flops = FlopCountAnalysis(_InferenceGraph(model), (images, input_ids, attention_mask))
        flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        total = flops.total()
    return ModelProfile(
        preset=preset,
        image_size=cfg.image_size,
        tokens=tokens,
        gflops_inference=total / 1e9,
        params_inference_m=_millions(inference),
        params_text_encoder_m=_millions(text_params),
        params_training_only_m=_millions(model.training_only_parameters()),
        recon_layers=f"{cfg.recon_memory_layers}+{cfg.recon_layers}",
    )


def profile_config(config: RecLMISConfig, tokens: int, name: str = "custom") -> ModelProfile:
    """Profile the model of ``config`` with notes of ``tokens`` tokens (its ``max_text_len``) and a
    placeholder tokenizer of its vocabulary size."""
    config = config.replace(max_text_len=max(tokens, 2))
    tokenizer = NoteTokenizer.placeholder(config.vocab_size, config.max_text_len)
    return profile_model(RecLMIS(config, tokenizer), tokens, name)


def profile_preset(preset: str, image_size: int, tokens: int) -> ModelProfile:
    """Profile a preset at ``image_size`` with notes of ``tokens`` tokens."""
    return profile_config(RecLMISConfig.preset(preset, image_size=image_size), tokens, preset)
