"""Learning-rate schedules of the recipes against their closed forms, and the optimizer they drive."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from reclmis.config import TrainConfig, load_recipe
from reclmis.train.schedules import build_optimizer, build_scheduler, check_same_schedule

RECIPES = Path(__file__).resolve().parents[1] / "configs"


def lr_curve(cfg: TrainConfig, epochs: int) -> list[float]:
    """The learning rate of each epoch as the trainer sees it: read before the epoch, stepped after."""
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg, fused=False)
    scheduler = build_scheduler(optimizer, cfg)
    curve = []
    for _ in range(epochs):
        curve.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return curve


def test_cosine_restarts_is_the_official_qata_schedule() -> None:
    _, cfg = load_recipe(f"{RECIPES}/qata_paper.yaml")
    assert (cfg.scheduler, cfg.restart_epochs, cfg.min_lr, cfg.lr) == ("cosine_restarts", 10, 1e-4, 3e-4)
    expected = [1e-4 + (3e-4 - 1e-4) * (1 + math.cos(math.pi * (e % 10) / 10)) / 2 for e in range(35)]
    assert lr_curve(cfg, 35) == pytest.approx(expected, rel=1e-9)
    curve = lr_curve(cfg, 35)
    assert curve[0] == curve[10] == curve[20] == pytest.approx(3e-4) and min(curve) > 1e-4


def test_exponential_with_floor_is_the_official_mosmed_schedule() -> None:
    _, cfg = load_recipe(f"{RECIPES}/mosmed_paper.yaml")
    assert (cfg.scheduler, cfg.lr_decay, cfg.min_lr, cfg.lr) == ("exponential", 0.99, 3e-5, 3e-4)
    expected = [3e-4 * max(0.99**e, 0.1) for e in range(400)]  # the official lambda
    assert lr_curve(cfg, 400) == pytest.approx(expected, rel=1e-9)
    assert expected[229] > 3e-5 and expected[230] == pytest.approx(3e-5)  # 0.99^e < 0.1 from e = 230


def test_monuseg_recipe_uses_the_official_warm_restarts() -> None:
    _, cfg = load_recipe(f"{RECIPES}/monuseg_paper.yaml")
    expected = [1e-4 + (1e-3 - 1e-4) * (1 + math.cos(math.pi * (e % 10) / 10)) / 2 for e in range(25)]
    assert lr_curve(cfg, 25) == pytest.approx(expected, rel=1e-9)


def test_single_cosine_and_constant() -> None:
    assert (TrainConfig().scheduler, TrainConfig().restart_epochs, TrainConfig().min_lr) == (
        "cosine_restarts",
        10,
        1e-4,
    )
    cfg = TrainConfig(epochs=20, lr=1e-3, min_lr=1e-5, scheduler="cosine")
    expected = [1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * e / 20)) / 2 for e in range(20)]
    assert lr_curve(cfg, 20) == pytest.approx(expected, rel=1e-9)
    assert lr_curve(TrainConfig(lr=2e-4, scheduler="constant"), 5) == pytest.approx([2e-4] * 5)


@pytest.mark.parametrize("recipe", ["qata_paper", "mosmed_paper", "monuseg_paper"])
def test_paper_recipes_use_adam_without_weight_decay(recipe: str) -> None:
    _, cfg = load_recipe(f"{RECIPES}/{recipe}.yaml")
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg, fused=False)
    assert type(optimizer) is torch.optim.Adam and optimizer.param_groups[0]["weight_decay"] == 0


def test_scheduler_state_resumes_the_curve() -> None:
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, scheduler="exponential", lr_decay=0.9)
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg, fused=False)
    scheduler = build_scheduler(optimizer, cfg)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    fresh_optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg, fused=False)
    fresh_optimizer.load_state_dict(optimizer.state_dict())
    fresh = build_scheduler(fresh_optimizer, cfg)
    fresh.load_state_dict(state)
    fresh_optimizer.step()
    fresh.step()
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.9**8)


def test_resume_refuses_another_schedule() -> None:
    cfg = TrainConfig(scheduler="cosine_restarts", min_lr=1e-5)
    check_same_schedule(cfg.to_dict(), cfg)
    with pytest.raises(ValueError, match=r"scheduler='cosine'.*scheduler='cosine_restarts'"):
        check_same_schedule({"min_lr": 1e-5}, cfg)  # a checkpoint from before the field: cosine
    with pytest.raises(ValueError, match=r"restart_epochs=10.*restart_epochs=5"):
        check_same_schedule(
            cfg.to_dict(), TrainConfig(scheduler="cosine_restarts", min_lr=1e-5, restart_epochs=5)
        )


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"scheduler": "step"}, "scheduler must be one of"),
        ({"min_lr": 1e-2}, "min_lr must be in"),
        ({"restart_epochs": 0}, "restart_epochs must be at least 1"),
        ({"lr_decay": 1.5}, "lr_decay must be in"),
        ({"mask_resize": "bicubic"}, "mask_resize must be nearest or bilinear"),
    ],
)
def test_bad_schedule_fields_name_the_field(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**changes)
