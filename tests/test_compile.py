"""torch.compile over the whole training step: one graph, the eager losses and gradients, and the trainer's
compile switch end to end with resume.

On CPU the backend is "aot_eager" (dynamo and AOT autograd trace forward and backward, the ops run eagerly):
it checks what CUDA graphs need, a single graph with every op registered, without inductor's C++ build,
which takes minutes on two cores. The ops run their reference backends, weighted masking the extension.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from reclmis.cli import main
from reclmis.config import RecLMISConfig, TrainConfig
from reclmis.data import make_synthetic
from reclmis.model import NoteTokenizer, RecLMIS
from reclmis.train import load_checkpoint
from reclmis.train.compilation import resolve_compile_mode


def _tiny_model(ops_backend: str = "reference", device: str = "cpu") -> RecLMIS:
    config = RecLMISConfig.preset(
        "tiny", image_size=32, base_channels=8, text_width=32, text_layers=1, text_heads=2, vocab_size=300,
        recon_layers=1, ops_backend=ops_backend,
    )  # fmt: skip
    torch.manual_seed(0)
    model = RecLMIS(config, NoteTokenizer.placeholder(config.vocab_size, config.max_text_len))
    return model.to(device).train()


def _batch(model: RecLMIS, batch: int = 3, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    images = torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=g)
    ids = torch.randint(4, cfg.vocab_size, (batch, cfg.max_text_len), generator=g)
    mask = torch.ones(batch, cfg.max_text_len, dtype=torch.bool)
    mask[1, 6:] = False  # padded notes: the CLR masks by per-row lengths
    mask[2, 3:] = False
    masks = (torch.rand(batch, 1, cfg.image_size, cfg.image_size, generator=g) > 0.7).float()
    return tuple(t.to(device) for t in (images, ids, mask, masks))


def _step(model, net, batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One training step's losses and gradients; dropout and both weighted masks draw from the seed."""
    torch.manual_seed(2)
    losses = net(*batch).losses
    losses["total"].backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return {name: value.detach() for name, value in losses.items()}, grads


def test_training_step_is_one_graph_and_matches_eager() -> None:
    model, counter = _tiny_model(), CompileCounterWithBackend("aot_eager")
    batch = _batch(model)
    eager_losses, eager_grads = _step(model, model, batch)
    compiled = torch.compile(model, backend=counter, fullgraph=True)  # fullgraph: a break is an error
    losses, grads = _step(model, compiled, batch)

    assert counter.frame_count == 1
    (graph,) = counter.graphs
    ops = [node.target for node in graph.graph.nodes if node.op == "call_function"]
    assert ops.count(torch.ops.reclmis.weighted_mask) == 2  # both masks: the registered op, in the graph
    assert set(losses) == {"total", "dice", "bce", "t2v", "v2t", "ccl"}
    for name, value in eager_losses.items():
        torch.testing.assert_close(losses[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert grads.keys() == eager_grads.keys()
    for name, value in eager_grads.items():
        torch.testing.assert_close(grads[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_augmented_cached_batches_feed_the_one_graph_step(tmp_path) -> None:
    """The batched augmentation runs before the compiled step, on the batch's device: the step that takes
    its batches (notes rewritten, tokens looked up) is still one graph, equal to eager."""
    from reclmis.data import LViTDataset, TrainAugmentation
    from reclmis.data.cached import CachedLoader, CachedSplit
    from reclmis.data.note_table import NoteTable

    model, counter = _tiny_model(), CompileCounterWithBackend("aot_eager")
    data = make_synthetic(tmp_path / "data", size=32, n_train=6, n_val=1, n_test=1, seed=2)
    dataset = LViTDataset(data, "train", image_size=32)
    augmentation = TrainAugmentation(note_frame="radiological")
    loader = CachedLoader(
        CachedSplit(*dataset.stacked(), dataset.names),
        NoteTable(dataset.texts, model.tokenizer, "radiological"),
        list(range(6)),
        3,
        augmentation=augmentation,
    )
    torch.manual_seed(0)
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for batch in loader:
        inputs = (batch["images"], batch["input_ids"], batch["attention_mask"], batch["masks"])
        eager_losses, _ = _step(model, model, inputs)
        losses, _ = _step(model, compiled, inputs)
        torch.testing.assert_close(losses["total"], eager_losses["total"], rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


def test_cli_train_compile_end_to_end_with_resume(tmp_path, capsys) -> None:
    data = make_synthetic(tmp_path / "data", size=32, n_train=8, n_val=4, n_test=2, seed=3)
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--preset", "tiny", "--image-size", "32", "--batch-size", "4",
            "--out", str(run), "--device", "cpu", "--workers", "0", "--compile",
            "--set", "train.compile_backend=eager", "--set", "model.base_channels=8",
            "--set", "model.text_layers=1", "--set", "model.recon_layers=1", "--set", "train.augment=none"]  # fmt: skip
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert main([*args, "--epochs", "1"]) == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > before  # training and evaluation graphs
    assert "compiling the model" in capsys.readouterr().err  # on the progress bar while it compiles
    assert main([*args, "--epochs", "2", "--resume"]) == 0

    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 1 and state["train_config"]["compile"]
    assert not [key for key in state["model"] if "_orig_mod" in key]  # the module's own state dict
    assert (run / "metrics.csv").read_text().count("\n") == 3  # header and two epochs
    assert (
        main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(data), "--device", "cpu"]) == 0
    )


def test_compile_mode_follows_the_device() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_compile_mode("auto", cpu, distributed=False) is None  # inductor's default
    assert resolve_compile_mode("auto", cuda, distributed=False) == "reduce-overhead"
    assert resolve_compile_mode("auto", cuda, distributed=True) == "max-autotune-no-cudagraphs"
    assert resolve_compile_mode("max-autotune", cuda, distributed=False) == "max-autotune"
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        TrainConfig(compile_mode="fast")
    with pytest.raises(ValueError, match="compile_backend must be one of"):
        TrainConfig(compile_backend="tvm")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_step_is_one_graph_and_replays_in_cuda_graphs() -> None:
    # the fused kernels (Triton, the CUDA masking) traced into one graph, then captured by "reduce-overhead"
    model, counter = _tiny_model("auto", "cuda"), CompileCounterWithBackend("inductor")
    batch = _batch(model, device="cuda")
    torch.compile(model, backend=counter, fullgraph=True)(*batch).losses["total"].backward()
    assert counter.frame_count == 1
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):  # warm-up, recording, then replays
        torch.compiler.cudagraph_mark_step_begin()
        loss = compiled(*batch).losses["total"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses))) and len(set(losses)) == len(losses)
