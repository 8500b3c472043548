"""torch.compile for the trainer (``train.compile``): the mode chosen by device, and a progress-bar notice
while a graph is being compiled.

The model's training step is one graph (no graph break: tests/test_compile.py), so on a single CUDA device
"reduce-overhead" captures it, forward and backward, in CUDA graphs, which at the paper's shapes removes
most of the launch overhead. Under DDP the mode is "max-autotune-no-cudagraphs": DDP splits the graph at
its gradient buckets, and CUDA graphs of those pieces with the BatchNorm buffers mutated inside them are
skipped or crash in torch releases to date (pytorch/pytorch#139207, #128218). On CPU the default mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

COMPILING = "compiling the model (the first steps of each graph are slow)"


def resolve_compile_mode(mode: str, device: torch.device, distributed: bool) -> str | None:
    """The torch.compile mode for ``mode``: "auto" is "reduce-overhead" on one CUDA device,
    "max-autotune-no-cudagraphs" on CUDA under DDP, and inductor's default (None) on CPU."""
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return None
    return "max-autotune-no-cudagraphs" if distributed else "reduce-overhead"


def compile_module(module: nn.Module, mode: str | None, backend: str) -> nn.Module:
    """``torch.compile(module)``; the mode applies to inductor only. The compiled wrapper shares the module's
    parameters, so checkpoints keep saving the module's own state dict (no ``_orig_mod.`` prefix)."""
    if backend != "inductor":
        return torch.compile(module, backend=backend)
    return torch.compile(module, backend=backend, mode=mode)


@contextlib.contextmanager
def compile_notice(bar: tqdm) -> Iterator[None]:
    """Show COMPILING on ``bar`` while torch.compile traces, compiles a backward or records a CUDA graph.

    Uses dynamo's compile-start/end callbacks (``torch._dynamo.callback``, private but present since torch
    2.2); should a release drop them, the notice is written once instead, when the bar opens.
    """
    from torch._dynamo import callback

    handler = getattr(callback, "callback_handler", None)
    if handler is None or bar.disable:
        if not bar.disable:
            bar.write(COMPILING)
        yield
        return
    saved: list[str | None] = []

    def start(*_: object) -> None:
        saved.append(bar.postfix)
        bar.set_postfix_str(COMPILING)

    def end(*_: object) -> None:
        bar.postfix = saved.pop() if saved else None
        bar.refresh()

    handler.register_start_callback(start)
    handler.register_end_callback(end)
    try:
        yield
    finally:
        handler.remove_start_callback(start)
        handler.remove_end_callback(end)
