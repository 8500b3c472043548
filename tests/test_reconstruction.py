"""Conditioned reconstructors (CVR/CLR): the official memory + reconstruction stacks, their sizes, and that
the masked tokens are rebuilt from the condition source through the memory under W."""

from __future__ import annotations

import pytest
import torch

import reclmis.model.reconstruction as reconstruction
from reclmis.model import ConditionedReconstructor
from reclmis.model.reconstruction import MemoryLayer, ReconstructionLayer


def official_parameter_count(width: int, memory_layers: int, layers: int) -> int:
    """The official DualTransformer's running parameters: attention 4C^2 + 4C (q, k, v, out with biases),
    LayerNorm 2C, FFN C->2C->C 4C^2 + 3C. A memory layer runs self-attention, FFN and two LayerNorms; a
    reconstruction layer self-attention, cross-attention, FFN and three LayerNorms."""
    c = width
    attention, norm, ffn = 4 * c * c + 4 * c, 2 * c, 4 * c * c + 3 * c
    return memory_layers * (attention + ffn + 2 * norm) + layers * (2 * attention + ffn + 3 * norm)


def reconstructor(width=64, memory_layers=2, layers=2, mode="reweight", causal=False, dropout=0.0):
    torch.manual_seed(0)
    return ConditionedReconstructor(
        width, memory_layers, layers, 4, dropout, mode, "reference", causal
    ).eval()


def inputs(batch=2, t=5, nk=7, width=64, valid_lengths=(7, 4)):
    torch.manual_seed(1)
    masked, source = torch.randn(batch, t, width), torch.randn(batch, nk, width)
    source_valid = torch.arange(nk)[None] < torch.tensor(valid_lengths)[:, None]
    cond = torch.rand(batch, nk).masked_fill(~source_valid, 0)
    return masked, source, cond / cond.sum(1, keepdim=True), source_valid


@pytest.mark.parametrize(("memory_layers", "layers", "millions"), [(3, 3, 15.77), (4, 4, 21.03)])
def test_official_structure_and_parameter_count(memory_layers: int, layers: int, millions: float) -> None:
    module = ConditionedReconstructor(512, memory_layers, layers, heads=4, dropout=0.1, mode="reweight")
    assert [type(m) for m in module.memory] == [MemoryLayer] * memory_layers
    assert [type(m) for m in module.layers] == [ReconstructionLayer] * layers
    assert not hasattr(module.memory[0], "cross_attention")  # the official memory layers' idle weights
    count = sum(p.numel() for p in module.parameters())
    assert count == official_parameter_count(512, memory_layers, layers)
    assert round(count / 1e6, 2) == millions  # x2 (CVR + CLR): 31.5M at 3+3, 42.1M at 4+4 (the paper's)
    layer = module.layers[0]
    assert layer.ffn[0].out_features == 1024 and layer.self_attention.num_heads == 4
    assert layer.cross_attention.heads == 4 and layer.dropout == 0.1


def test_masked_tokens_are_rebuilt_from_the_memory() -> None:
    module = reconstructor()
    masked, source, cond, source_valid = inputs()
    source.requires_grad_(True)
    out = module.train()(masked, None, source, cond, source_valid)
    out.square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert source.grad[source_valid].abs().sum(-1).gt(0).all()  # every valid source token matters
    assert (source.grad[~source_valid] == 0).all()  # padded ones never do
    # the reconstruction stack reads the memory, not the raw source
    memory = module.eval().encode(source, cond, source_valid)
    assert not torch.allclose(memory, source)


def test_w_conditions_the_memory_and_the_cross_attention() -> None:
    """With W on source token 0 alone, the memory self-attention and the cross-attention both see only
    that token: the reconstruction ignores every other source token. Under a uniform W it does not."""
    module = reconstructor()
    masked, source, _, _ = inputs()
    other = source.clone()
    other[:, 1:] = torch.randn_like(other[:, 1:])
    one_hot = torch.zeros(2, 7)
    one_hot[:, 0] = 1
    with torch.no_grad():
        a = module(masked, None, source, one_hot, None)
        b = module(masked, None, other, one_hot, None)
        uniform = torch.full((2, 7), 1 / 7)
        c = module(masked, None, source, uniform, None)
        d = module(masked, None, other, uniform, None)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (c - d).abs().max() > 1e-2


def test_every_attention_under_w_is_the_conditioned_attention_op(monkeypatch) -> None:
    calls: list[tuple[int, int]] = []
    op = reconstruction.conditioned_attention

    def counting(q, k, v, cond, mask=None, **kwargs):
        calls.append((q.shape[2], k.shape[2]))
        return op(q, k, v, cond, mask, **kwargs)

    monkeypatch.setattr(reconstruction, "conditioned_attention", counting)
    module = reconstructor(memory_layers=3, layers=2)
    masked, source, cond, source_valid = inputs()
    with torch.no_grad():
        module(masked, None, source, cond, source_valid)
    assert calls == [(7, 7)] * 3 + [(5, 7)] * 2  # memory self-attention, then cross-attention


def test_causal_switch_hides_later_tokens() -> None:
    module = reconstructor(causal=True)
    masked, source, cond, _ = inputs()
    later = masked.clone()
    later[:, 3:] = torch.randn_like(later[:, 3:])
    with torch.no_grad():
        a = module(masked, None, source, cond, None)
        b = module(later, None, source, cond, None)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert (a[:, 3:] - b[:, 3:]).abs().max() > 1e-3
    non_causal = reconstructor()
    with torch.no_grad():
        c = non_causal(masked, None, source, cond, None)
        d = non_causal(later, None, source, cond, None)
    assert (c[:, :3] - d[:, :3]).abs().max() > 1e-3
