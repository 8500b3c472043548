"""Optimizer and learning-rate schedules of the recipes (``TrainConfig.scheduler``), stepped once per epoch.

The official code trains with Adam (no weight decay) and, per dataset, cosine annealing with warm restarts
(QaTa-COV19 and MoNuSeg: periods of 10 epochs down to 1e-4) or an exponential decay with a floor
(MosMedData+: lr * max(0.99^epoch, 0.1)). The learning rate of epoch e (counted from 0):

    cosine            min_lr + (lr - min_lr) * (1 + cos(pi * e / epochs)) / 2
    cosine_restarts   min_lr + (lr - min_lr) * (1 + cos(pi * (e mod restart_epochs) / restart_epochs)) / 2
    exponential       max(lr * lr_decay^e, min_lr)
    constant          lr
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, CosineAnnealingWarmRestarts, LambdaLR, LRScheduler

from reclmis.config import TrainConfig

# The TrainConfig fields that shape each schedule (a resumed run must keep them). Every schedule also keeps
# lr and weight_decay, restored with the optimizer's state; the cosine's period (epochs) is in its own.
OPTIMIZER_FIELDS = ("lr", "weight_decay")
SCHEDULE_FIELDS = {
    "cosine": ("min_lr", "epochs"),
    "cosine_restarts": ("min_lr", "restart_epochs"),
    "exponential": ("min_lr", "lr_decay"),
    "constant": (),
}


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig, fused: bool) -> torch.optim.Adam:
    """Adam at ``cfg.lr`` with ``cfg.weight_decay`` as L2 penalty (0 in the official recipes)."""
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LRScheduler:
    """The per-epoch schedule ``cfg.scheduler`` (see the module docstring for the closed forms)."""
    if cfg.scheduler == "cosine":
        return CosineAnnealingLR(optimizer, T_max=cfg.epochs, eta_min=cfg.min_lr)
    if cfg.scheduler == "cosine_restarts":
        return CosineAnnealingWarmRestarts(optimizer, T_0=cfg.restart_epochs, eta_min=cfg.min_lr)
    if cfg.scheduler == "exponential":
        floor = cfg.min_lr / cfg.lr

        def factor(epoch: int) -> float:
            return max(cfg.lr_decay**epoch, floor)

        return LambdaLR(optimizer, factor)
    if cfg.scheduler == "constant":
        return LambdaLR(optimizer, lambda epoch: 1.0)
    raise ValueError(f"unknown scheduler {cfg.scheduler!r}")


def check_same_schedule(saved: dict[str, Any], cfg: TrainConfig) -> None:
    """Raise ValueError when a checkpoint's training configuration (a dict; checkpoints written before
    ``scheduler`` existed used "cosine") schedules the learning rate otherwise than ``cfg``: a scheduler's
    saved state only makes sense for the schedule that wrote it, and the restored optimizer state keeps the
    checkpoint's lr and weight decay, which the run's config.json must then not contradict."""
    defaults = TrainConfig().to_dict() | {"scheduler": "cosine"}
    saved = defaults | saved
    names = ("scheduler", *OPTIMIZER_FIELDS, *SCHEDULE_FIELDS[cfg.scheduler])
    changed = [name for name in names if saved[name] != getattr(cfg, name)]
    if changed:
        was = ", ".join(f"{name}={saved[name]!r}" for name in changed)
        now = ", ".join(f"{name}={getattr(cfg, name)!r}" for name in changed)
        raise ValueError(
            f"--resume: the checkpoint was trained with {was}; the configuration asks for {now}. A resumed "
            "run keeps its optimizer and schedule: drop the change, or start a new run"
        )
