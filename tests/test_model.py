"""The RecLMIS model: shapes, gradients, eval-mode graph, padding invariance, input errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from reclmis.config import RecLMISConfig
from reclmis.model import RecLMIS
from reclmis.model.tokenizer import BOS, EOS, PAD, NoteTokenizer

NOTES = [
    "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.",
    "Unilateral pulmonary infection, one infected area, middle right lung.",
    "The nuclei density in the upper right is high.",
]


def make_model(preset: str = "tiny", **overrides) -> RecLMIS:
    torch.manual_seed(0)
    config = RecLMISConfig.preset(preset, ops_backend="reference", **overrides)
    return RecLMIS(config, NoteTokenizer.train(NOTES * 4, config.max_text_len, vocab_size=300))


def make_batch(model: RecLMIS, batch: int = 3):
    cfg = model.config
    images = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    masks = (torch.rand(batch, 1, cfg.image_size, cfg.image_size) > 0.7).float()
    input_ids, attention_mask = model.tokenize((NOTES * batch)[:batch])
    return images, input_ids, attention_mask, masks


@pytest.mark.parametrize(
    ("preset", "image_size"), [("tiny", 64), ("tiny", 80), ("small", 112), ("paper", 48)], ids=str
)
def test_train_and_eval_shapes(preset: str, image_size: int) -> None:
    model = make_model(preset, image_size=image_size)
    images, ids, mask, masks = make_batch(model, batch=2)
    out = model.train()(images, ids, mask, masks)
    n = (image_size // 16) ** 2
    assert out.logits.shape == (2, 1, image_size, image_size)
    assert out.w_poi.shape == (2, n) and out.w_woi.shape == ids.shape
    assert set(out.losses) == {"t2v", "v2t", "ccl", "dice", "bce", "total"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.losses.values())
    torch.testing.assert_close(out.w_poi.sum(1), torch.ones(2))
    torch.testing.assert_close(out.w_woi.sum(1), torch.ones(2))
    assert (out.w_woi[~mask] == 0).all()
    with torch.no_grad():
        eval_out = model.eval()(images, ids, mask)
    assert eval_out.logits.shape == (2, 1, image_size, image_size)
    assert eval_out.w_poi is None and eval_out.losses == {}


def test_total_is_eq11_weighted_sum() -> None:
    model = make_model()
    out = model.train()(*make_batch(model))
    l = out.losses
    expected = l["v2t"] + l["t2v"] + 0.2 * l["ccl"] + 5 * (0.5 * l["dice"] + 0.5 * l["bce"])  # official
    torch.testing.assert_close(l["total"], expected)
    weights = {"seg": 2.0, "dice": 1.0, "bce": 0.0, "ccl": 0.0, "t2v": 0.0, "v2t": 3.0}
    w = make_model(loss_weights=weights).train()(*make_batch(model)).losses
    torch.testing.assert_close(w["total"], 3 * w["v2t"] + 2 * w["dice"])


def test_segmentation_loss_is_the_official_dice_by_default() -> None:
    model = make_model()
    images, ids, mask, masks = make_batch(model)
    out = model.train()(images, ids, mask, masks)
    probs = torch.sigmoid(out.logits).flatten(1)
    target = masks.flatten(1)
    squared = 1 - (2 * (probs * target).sum(1) + 4e-5) / ((probs**2).sum(1) + (target**2).sum(1) + 4e-5)
    torch.testing.assert_close(out.losses["dice"], squared.mean())
    model = make_model(dice_squared=False, dice_smooth=1.0)
    out = model.train()(images, ids, mask, masks)
    probs = torch.sigmoid(out.logits).flatten(1)
    linear = 1 - (2 * (probs * target).sum(1) + 1) / (probs.sum(1) + target.sum(1) + 1)
    torch.testing.assert_close(out.losses["dice"], linear.mean())


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"recon_causal": True},
        {"w_head_dropout": 0.5},
        {"attention_mode": "scale"},
        {"recon_memory_layers": 0},
        {"interaction_injection": "residual"},
        {"interaction_injection": "official"},
        {"interaction_injection": "residual", "interaction_gate": True},
        {"interaction_norm": True},
    ],
    ids=str,
)
def test_every_trainable_parameter_gets_a_gradient(overrides: dict) -> None:
    """No parameter that never receives a gradient (the official memory layers' idle cross-attention)."""
    model = make_model(**overrides)
    model.train()(*make_batch(model)).losses["total"].backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert missing == []


def test_mixed_precision_training_step() -> None:
    """The AMP path of the trainer (bf16 autocast; CPU here, CUDA on a GPU): finite losses and a gradient
    for every trainable parameter, with parameters and BatchNorm statistics kept in fp32."""
    model = make_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.train()(*make_batch(model))
    assert all(torch.isfinite(v).all() for v in out.losses.values()), out.losses
    out.losses["total"].backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert missing == []
    assert {b.dtype for b in model.buffers() if b.is_floating_point()} == {torch.float32}


def test_eval_mode_runs_no_training_only_module() -> None:
    model = make_model().eval()
    called: list[str] = []
    for name in ("cvr", "clr", "poi_head", "woi_head"):
        getattr(model, name).register_forward_hook(lambda *_, name=name: called.append(name))
    images, ids, mask, _ = make_batch(model)
    with torch.no_grad():
        model(images, ids, mask)
    assert called == []
    with torch.no_grad():
        out = model(images, ids, mask, return_weights=True)
    assert sorted(called) == ["poi_head", "woi_head"]
    assert out.w_poi is not None and out.w_woi is not None


def test_padding_changes_nothing() -> None:
    model = make_model().eval()
    images, *_ = make_batch(model, batch=1)
    long_ids, long_mask = model.tokenize(["Upper left lung."])  # padded to max_text_len = 18
    n = int(long_mask.sum())
    short_ids, short_mask = long_ids[:, : n + 2], long_mask[:, : n + 2]
    assert n < 16 and not short_mask[0, -1]
    with torch.no_grad():
        a = model(images, long_ids, long_mask, return_weights=True)
        b = model(images, short_ids, short_mask, return_weights=True)
        garbage = long_ids.masked_fill(~long_mask, 7)  # padded ids must not matter either
        c = model(images, garbage, long_mask)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.w_poi, b.w_poi, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.w_woi[:, : n + 2], b.w_woi, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.logits, c.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("switch", ["use_cvr", "use_clr", "use_ccl"], ids=lambda s: f"{s}=False")
def test_ablation_switches_drop_their_loss(switch: str) -> None:
    model = make_model(**{switch: False})
    out = model.train()(*make_batch(model))
    dropped = {"use_cvr": "t2v", "use_clr": "v2t", "use_ccl": "ccl"}[switch]
    assert dropped not in out.losses and "total" in out.losses
    assert not any(name in n for n, _ in model.named_parameters() for name in (dropped,))


def test_use_text_off_is_a_plain_unet_with_plam() -> None:
    torch.manual_seed(0)
    model = RecLMIS(RecLMISConfig.preset("tiny", use_text=False))
    assert not hasattr(model, "text_encoder") and not hasattr(model, "interaction")
    images = torch.randn(2, 3, 64, 64)
    out = model.train()(images, masks=torch.zeros(2, 1, 64, 64))
    assert set(out.losses) == {"dice", "bce", "total"}
    assert model.eval()(images).logits.shape == (2, 1, 64, 64)


def test_unconditioned_ablation_trains() -> None:
    model = make_model(conditioned=False)
    out = model.train()(*make_batch(model))
    out.losses["total"].backward()
    assert torch.isfinite(out.losses["total"])


def test_scale_mode_trains() -> None:
    model = make_model(attention_mode="scale")
    assert torch.isfinite(model.train()(*make_batch(model)).losses["total"])


def test_pretrained_text_encoder_loads_offline_and_is_frozen(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bpe = NoteTokenizer.train(NOTES * 4, max_len=24, vocab_size=300).tokenizer
    bpe.no_padding()
    bpe.no_truncation()
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    hf_tokenizer.save_pretrained(tmp_path)
    text_config = CLIPTextConfig(
        vocab_size=bpe.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=24,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPTextModel(text_config).save_pretrained(tmp_path)

    config = RecLMISConfig.preset("tiny", text_encoder=str(tmp_path), ops_backend="reference")
    model = RecLMIS.build(config)
    assert model.tokenizer.vocab_size == bpe.get_vocab_size()
    assert all(not p.requires_grad for p in model.text_encoder.parameters())
    saved = CLIPTextModel.from_pretrained(tmp_path).state_dict()
    for name, value in model.text_encoder.model.state_dict().items():
        torch.testing.assert_close(value, saved[name])
    out = model.train()(*make_batch(model))
    out.losses["total"].backward()
    assert model.text_projection.weight.grad is not None
    assert not model.text_encoder.model.training  # frozen encoder stays in eval mode


def test_pretrained_text_encoder_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="text_encoder="):
        RecLMIS.build(RecLMISConfig.preset("tiny", text_encoder=str(tmp_path / "missing")))


def test_build_needs_notes_without_pretrained_encoder() -> None:
    with pytest.raises(ValueError, match="notes"):
        RecLMIS.build(RecLMISConfig.preset("tiny"))


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda b: (b[0][0], *b[1:]), ValueError, "images"),
        (lambda b: (b[0][:, :, :32, :32], *b[1:]), ValueError, "images"),
        (lambda b: (b[0].long(), *b[1:]), TypeError, "images"),
        (lambda b: (b[0], b[1][:2], *b[2:]), ValueError, "input_ids"),
        (lambda b: (b[0], b[1].float(), *b[2:]), TypeError, "input_ids"),
        (lambda b: (b[0], b[1], b[2][:, :5], b[3]), ValueError, "attention_mask"),
        (lambda b: (b[0], b[1], b[2].float(), b[3]), TypeError, "attention_mask"),
        (lambda b: (*b[:3], b[3][:2]), ValueError, "masks"),
        (lambda b: (b[0], torch.cat([b[1], b[1]], 1), torch.cat([b[2], b[2]], 1), b[3]), ValueError, "max_text_len"),
    ],
    ids=["images-rank", "images-size", "images-dtype", "ids-batch", "ids-dtype", "mask-shape", "mask-dtype",
         "masks-batch", "too-long"],
)  # fmt: skip
def test_bad_inputs_name_the_argument(mutate, error, match) -> None:
    model = make_model().train()
    with pytest.raises(error, match=match):
        model(*mutate(make_batch(model)))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"image_size": 100}, "image_size"),
        ({"img_mask_ratio": 1.5}, "img_mask_ratio"),
        ({"text_mask_ratio": -0.1}, "text_mask_ratio"),
        ({"attention_mode": "softmax"}, "attention_mode"),
        ({"recon_heads": 3}, "recon_heads"),
        ({"interaction_gate": True}, "interaction_gate"),  # the note gate needs the residual injection
        ({"interaction_injection": "sum"}, "interaction_injection"),
    ],
)
def test_bad_config_names_the_field(overrides, match) -> None:
    with pytest.raises(ValueError, match=match):
        RecLMISConfig.preset("tiny", **overrides)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_the_gated_injection_starts_as_the_image_only_network(train: bool) -> None:
    """With the encoder and decoder weights of a text-off model, the default (gated) model gives its logits
    exactly at initialisation, in eval and in train mode (CI's dropout acts on CI's own tokens only), and
    the gate receives a gradient, so training can open the note's path."""
    text_on = make_model()
    text_off = RecLMIS(text_on.config.replace(use_text=False))
    text_off.encoder.load_state_dict(text_on.encoder.state_dict())
    text_off.decoder.load_state_dict(text_on.decoder.state_dict())
    images, ids, mask, masks = make_batch(text_on)
    text_on.train(train), text_off.train(train)
    torch.manual_seed(1)
    on = text_on(images, ids, mask, masks)
    off = text_off(images, masks=masks)
    torch.testing.assert_close(on.logits, off.logits, rtol=0, atol=0)
    if train:
        on.losses["total"].backward()
        alpha = text_on.interaction.alpha
        assert alpha.grad is not None and alpha.grad.abs().sum() > 0 and (alpha == 0).all()
    with torch.no_grad():
        text_on.interaction.alpha.fill_(0.5)  # an opened gate: the note now changes the segmentation
    assert not torch.allclose(text_on.eval()(images, ids, mask).logits, text_off.eval()(images).logits)


def test_note_gate_starts_as_the_ungated_model_and_then_scales_visual_tokens() -> None:
    """The note gate's Linear is zero-initialised (g = 1): the model computes the residual one's function
    until training moves it; a trained gate scales V by the note."""
    plain = make_model(interaction_injection="residual")
    gated = make_model(interaction_injection="residual", interaction_gate=True)
    missing, unexpected = gated.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and sorted(missing) == [
        "interaction.note_gate.bias",
        "interaction.note_gate.weight",
    ]
    images, ids, mask, _ = make_batch(plain)
    plain.eval(), gated.eval()
    torch.testing.assert_close(gated(images, ids, mask).logits, plain(images, ids, mask).logits)
    with torch.no_grad():
        gated.interaction.note_gate.bias.fill_(-3.0)  # g = 2 sigmoid(-3): the visual tokens scaled by 0.095
    assert not torch.allclose(gated(images, ids, mask).logits, plain(images, ids, mask).logits)


@pytest.mark.parametrize("injection", ["residual", "official"])
def test_interaction_norm_bounds_what_the_attentions_add(injection: str) -> None:
    """With interaction_norm the logits do not change when both attentions' output projections are scaled
    up 1000x (the drift it guards against); without it they do."""
    images, ids, mask, _ = make_batch(make_model())
    for norm in (True, False):
        model = make_model(interaction_norm=norm, interaction_injection=injection).eval()
        before = model(images, ids, mask).logits
        with torch.no_grad():
            for attention in (model.interaction.text_attention, model.interaction.image_attention):
                attention.out_proj.weight.mul_(1000)
                attention.out_proj.bias.mul_(1000)
        after = model(images, ids, mask).logits
        assert torch.allclose(after, before, rtol=1e-3, atol=1e-3) == norm


def test_masked_batch_norm_equals_batch_norm_over_valid_tokens() -> None:
    from reclmis.model.interaction import MaskedBatchNorm1d

    torch.manual_seed(0)
    x = torch.randn(3, 5, 8) * 3 + 1
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    masked, plain = MaskedBatchNorm1d(8), nn.BatchNorm1d(8)
    for _ in range(2):
        out = masked.train()(x, mask)
        torch.testing.assert_close(out[mask], plain.train()(x[mask]))
        assert (out[~mask] == 0).all()
    torch.testing.assert_close(masked.running_mean, plain.running_mean)
    torch.testing.assert_close(masked.running_var, plain.running_var)
    torch.testing.assert_close(masked.eval()(x, mask)[mask], plain.eval()(x[mask]))
    assert masked.state_dict().keys() == plain.state_dict().keys()  # checkpoints load either way
    torch.testing.assert_close(masked.num_batches_tracked, plain.num_batches_tracked)


def test_masked_batch_norm_takes_statistics_in_fp32_for_half_inputs() -> None:
    from reclmis.model.interaction import MaskedBatchNorm1d

    torch.manual_seed(0)
    x = torch.randn(32, 18, 8) * 3 + 1
    mask = torch.arange(18) < torch.randint(1, 19, (32, 1))  # 300+ valid tokens: inexact in bf16
    full, half = MaskedBatchNorm1d(8), MaskedBatchNorm1d(8)
    expected = full.train()(x, mask)
    out = half.train()(x.bfloat16(), mask)
    assert out.dtype == torch.bfloat16 and half.running_mean.dtype == torch.float32
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)
    torch.testing.assert_close(half.running_mean, full.running_mean, atol=0.01, rtol=0.01)
