"""torch.compile over the whole training step: one graph, the eager losses and gradients, and the trainer's
compile switch end to end with resume.

On CPU the backend is "aot_eager" (dynamo and AOT autograd trace forward and backward, the ops run eagerly):
it checks what CUDA graphs need, a single graph with every op registered, without inductor's C++ build,
which takes minutes on two cores. The ops run their reference backends, weighted masking the extension.
"""

from __future__ import annotations

import torch
from torch._dynamo.testing import CompileCounterWithBackend

from reclmis.cli import main
from reclmis.config import RecLMISConfig
from reclmis.data import make_synthetic
from reclmis.data.tokenizer import NoteTokenizer
from reclmis.model import RecLMIS
from reclmis.train import load_checkpoint


def _tiny_model() -> RecLMIS:
    config = RecLMISConfig.preset(
        "tiny", image_size=32, base_channels=8, text_width=32, text_layers=1, text_heads=2, vocab_size=300,
        recon_layers=1, ops_backend="reference",
    )  # fmt: skip
    torch.manual_seed(0)
    return RecLMIS(config, NoteTokenizer.placeholder(config.vocab_size, config.max_text_len)).train()


def _batch(model: RecLMIS, batch: int = 3) -> tuple[torch.Tensor, ...]:
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    images = torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=g)
    ids = torch.randint(4, cfg.vocab_size, (batch, cfg.max_text_len), generator=g)
    mask = torch.ones(batch, cfg.max_text_len, dtype=torch.bool)
    mask[1, 6:] = False  # padded notes: the CLR masks by per-row lengths
    mask[2, 3:] = False
    masks = (torch.rand(batch, 1, cfg.image_size, cfg.image_size, generator=g) > 0.7).float()
    return images, ids, mask, masks


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
