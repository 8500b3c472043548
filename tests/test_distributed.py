"""torchrun-style training with DistributedDataParallel on CPU (gloo), and the global contrastive loss."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reclmis.config import RecLMISConfig, TrainConfig
from reclmis.data import make_synthetic
from reclmis.losses import GlobalBatch, conditioned_contrastive_loss
from reclmis.train import Trainer, load_checkpoint
from reclmis.train.distributed import all_gather_with_grad

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)


def _spawn(fn, *args) -> None:
    mp.spawn(fn, args=(_free_port(), *args), nprocs=WORLD, join=True)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("data"), size=32, n_train=32, n_val=8, n_test=4, seed=2)


def tiny_configs(epochs: int) -> tuple[RecLMISConfig, TrainConfig]:
    model = RecLMISConfig.preset(
        "tiny", image_size=32, base_channels=8, text_width=32, text_layers=1, text_heads=2, vocab_size=300
    )
    train = TrainConfig(epochs=epochs, batch_size=4, lr=1e-3, num_workers=0, device="cpu", augment="full")
    return model, train


# -- global contrastive loss ------------------------------------------------------------------------------


def _features(batch: int = 2 * WORLD) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(batch, 6, 16, generator=g), torch.randn(batch, 5, 16, generator=g)
    w_poi = torch.softmax(torch.randn(batch, 6, generator=g), -1)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 1:] = False
    w_woi = torch.softmax(torch.randn(batch, 5, generator=g).masked_fill(~mask, float("-inf")), -1)
    # notes 0 and 3 are the same (on different ranks); note 1 starts as note 0 but is shorter
    ids = torch.randint(1, 50, (batch, 5), generator=g)
    ids[3], ids[1, :3] = ids[0], ids[0, :3]
    mask[3] = True
    return [img, txt, w_poi, w_woi, mask, ids]


def _contrastive_rank(rank: int, port: int, out: str, same_notes: bool) -> None:
    _join(rank, port)
    dist.init_process_group("gloo")
    chunk = [t.chunk(WORLD)[rank].clone() for t in _features()]
    leaves = [t.requires_grad_() for t in chunk[:4]]
    loss = conditioned_contrastive_loss(*leaves, chunk[4], torch.tensor(10.0), backend="reference",
                                        note_ids=chunk[5] if same_notes else None,
                                        global_batch=GlobalBatch(all_gather_with_grad, rank))  # fmt: skip
    (loss / WORLD).backward()  # DDP averages over ranks; the gathered slices receive every rank's share
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = [all_gather_with_grad(t.grad) for t in leaves]
    if rank == 0:
        torch.save({"loss": total / WORLD, "grads": grads}, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("same_notes", [False, True], ids=["all-negatives", "same-notes-excluded"])
def test_global_contrastive_loss_equals_single_process(tmp_path, same_notes) -> None:
    _spawn(_contrastive_rank, str(tmp_path / "ddp.pt"), same_notes)
    ddp = torch.load(tmp_path / "ddp.pt")
    full = _features()
    leaves = [t.clone().requires_grad_() for t in full[:4]]
    loss = conditioned_contrastive_loss(*leaves, full[4], torch.tensor(10.0), backend="reference",
                                        note_ids=full[5] if same_notes else None)  # fmt: skip
    loss.backward()
    torch.testing.assert_close(ddp["loss"], loss.detach())
    for got, leaf in zip(ddp["grads"], leaves, strict=True):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-5, atol=1e-7)


# -- DDP training -----------------------------------------------------------------------------------------


def _train_rank(rank: int, port: int, data: str, out: str, epochs: int, resume: bool, log: str) -> None:
    _join(rank, port)
    model_config, train_config = tiny_configs(epochs)
    trainer = Trainer(model_config, train_config, data, out, resume=resume, progress=False)
    checksums: list[list[float]] = []

    def compare_ranks(*_) -> None:
        flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        both = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(both, flat)
        checksums.append([float((both[0] - both[1]).abs().max()), float(flat.abs().sum())])

    trainer.optimizer.register_step_post_hook(compare_ranks)
    saves = []
    import reclmis.train.trainer as trainer_module

    original = trainer_module.save_checkpoint
    trainer_module.save_checkpoint = lambda state, path: saves.append(str(path)) or original(state, path)
    trainer.fit(epochs=1)
    Path(f"{log}.{rank}").write_text(json.dumps({"checksums": checksums, "saves": saves,
                                                 "gathers": trainer.model.global_batch is not None}))  # fmt: skip
    dist.destroy_process_group()


def _read_logs(log: Path) -> list[dict]:
    return [json.loads(Path(f"{log}.{rank}").read_text()) for rank in range(WORLD)]


def test_ddp_ranks_stay_identical_and_checkpoint_once(synthetic, tmp_path) -> None:
    run, log = tmp_path / "run", tmp_path / "log"
    _spawn(_train_rank, str(synthetic), str(run), 2, False, str(log))
    logs = _read_logs(log)
    steps = 32 // (4 * WORLD)
    for entry in logs:
        assert entry["gathers"]  # global-batch contrastive loss on by default under DDP
        assert len(entry["checksums"]) == steps
        assert all(diff == 0.0 for diff, _ in entry["checksums"])
    assert logs[0]["saves"] == [str(run / "last.pt"), str(run / "best.pt")]
    assert logs[1]["saves"] == []
    assert load_checkpoint(run / "last.pt")["epoch"] == 0


def test_resume_across_world_sizes(synthetic, tmp_path) -> None:
    # two processes, then one
    run = tmp_path / "two_then_one"
    _spawn(_train_rank, str(synthetic), str(run), 2, False, str(tmp_path / "a"))
    model_config, train_config = tiny_configs(2)
    single = Trainer(model_config, train_config, synthetic, run, resume=True, progress=False)
    assert single.start_epoch == 1
    single.fit()
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    # one process, then two
    run = tmp_path / "one_then_two"
    Trainer(model_config, train_config, synthetic, run, progress=False).fit(epochs=1)
    _spawn(_train_rank, str(synthetic), str(run), 2, True, str(tmp_path / "b"))
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert len(_read_logs(tmp_path / "b")[0]["checksums"]) == 32 // (4 * WORLD)


# -- DDP with train.compile -------------------------------------------------------------------------------


def _compiled_train_rank(rank: int, port: int, data: str, out: str, log: str) -> None:
    _join(rank, port)
    model_config, train_config = tiny_configs(1)
    train_config = TrainConfig(**(train_config.to_dict() | {"compile": True, "compile_backend": "eager"}))
    trainer = Trainer(model_config, train_config, data, out, progress=False)
    diffs: list[float] = []

    def compare_ranks(*_) -> None:
        flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        both = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(both, flat)
        diffs.append(float((both[0] - both[1]).abs().max()))

    trainer.optimizer.register_step_post_hook(compare_ranks)
    trainer.fit()
    compiled = trainer.train_module is not trainer.ddp
    Path(f"{log}.{rank}").write_text(json.dumps({"diffs": diffs, "compiled": compiled}))
    dist.destroy_process_group()


def test_ddp_with_compile(synthetic, tmp_path) -> None:
    # dynamo traces the DDP module, split at its gradient buckets; the "eager" backend keeps this quick
    # (resume with compile: tests/test_compile.py)
    run = tmp_path / "run"
    _spawn(_compiled_train_rank, str(synthetic), str(run), str(tmp_path / "log"))
    for entry in _read_logs(tmp_path / "log"):
        assert entry["compiled"] and len(entry["diffs"]) == 32 // (4 * WORLD)
        assert all(diff == 0.0 for diff in entry["diffs"])
    state = load_checkpoint(run / "last.pt")
    assert not [key for key in state["model"] if key.startswith(("module.", "_orig_mod."))]
