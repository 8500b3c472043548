"""Training loop: Adam + the recipe's learning-rate schedule, mixed precision, channels_last, DDP under torchrun, exact
resume, torch.compile on request (``train.compile``).

The step never waits for the GPU: losses and Dice accumulate on the device and are read back every
``log_every`` steps. Rank 0 alone writes logs, progress bars and checkpoints (``last.pt`` every epoch,
``best.pt`` on a better validation Dice), each written atomically.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from reclmis.config import LOSS_TERMS, RecLMISConfig, TrainConfig
from reclmis.data import LViTDataset, TrainAugmentation
from reclmis.losses import GlobalBatch
from reclmis.metrics import DiceIoUMeter, binarize, dice_iou
from reclmis.model import NoteTokenizer, RecLMIS
from reclmis.model.text_encoder import TextFeatureCache
from reclmis.train.checkpoint import (
    checkpoint_model_config,
    copy_checkpoint,
    load_checkpoint,
    model_from_state,
    save_checkpoint,
)
from reclmis.train.compilation import compile_module, compile_notice, resolve_compile_mode
from reclmis.train.distributed import (
    all_gather_with_grad,
    all_reduce_sum,
    barrier,
    init_distributed,
)
from reclmis.train.run_folder import RunLock
from reclmis.train.schedules import build_optimizer, build_scheduler, check_same_schedule

LOGGED_LOSSES = ("total", *LOSS_TERMS)  # the running means of every training epoch


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; raised before anything of that epoch is saved."""


class NoteCollator:
    """Stacks images and masks and tokenizes the notes of a batch (runs in the DataLoader workers)."""

    def __init__(self, tokenizer: NoteTokenizer | None) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "images": torch.stack([item["image"] for item in items]),
            "masks": torch.stack([item["mask"] for item in items]),
            "names": [item["name"] for item in items],
            "texts": [item["text"] for item in items],
        }
        if self.tokenizer is not None:
            batch["input_ids"], batch["attention_mask"] = self.tokenizer(batch["texts"])
        return batch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. "auto": bf16 on CUDA where supported, else fp16; fp32 on CPU."""
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Reseed torch's generators from (seed, epoch, rank): every epoch's randomness (augmentation,
    dropout, weighted masking, worker seeds) is a function of these alone, so a run resumed at any epoch
    boundary, on any world size, continues the same stream."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint64)[0] >> 1))


def to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> dict[str, Any]:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    moved["images"] = moved["images"].contiguous(memory_format=memory_format)
    return moved


@dataclass
class EpochResult:
    epoch: int
    lr: float
    train: dict[str, float]
    val: dict[str, float]
    seconds: float


class Trainer:
    """Trains RecLMIS on an LViT-layout dataset; ``fit()`` runs to the configured epoch count."""

    def __init__(
        self,
        model_config: RecLMISConfig,
        train_config: TrainConfig,
        data_root: str | Path,
        out_dir: str | Path,
        *,
        resume: bool = False,
        progress: bool = True,
    ) -> None:
        self.model_config = model_config
        self.cfg = train_config
        self.out_dir = Path(out_dir)
        self.device = resolve_device(train_config.device)
        self.dist = init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.autocast_dtype = resolve_precision(train_config.precision, self.device)
        self.progress = progress and self.dist.is_main

        augmentation = None
        if train_config.augment != "none":
            augmentation = TrainAugmentation(
                geometric=train_config.augment in ("full", "official"),
                note_frame=train_config.note_frame if train_config.augment == "full" else None,
            )
        self.train_set = LViTDataset(
            data_root,
            "train",
            model_config.image_size,
            cache=train_config.cache_images,
            transform=augmentation,
            mask_resize=train_config.mask_resize,
        )
        self.val_set = LViTDataset(
            data_root,
            "val",
            model_config.image_size,
            cache=train_config.cache_images,
            mask_resize=train_config.mask_resize,
        )

        if self.dist.is_main:
            self.train_set.check_masks()
            self.val_set.check_masks()
        if len(self.val_set) < self.dist.world_size:
            raise ValueError(
                f"the validation split has {len(self.val_set)} images, fewer than {self.dist.world_size} processes"
            )
        state = self._claim_folder(resume)
        torch.manual_seed(train_config.seed)  # identical initial weights on every rank
        self.model = (
            model_from_state(state)
            if state is not None
            else RecLMIS.build(model_config, self.train_set.texts)
        )
        if train_config.sync_batchnorm and self.dist.enabled:
            if self.device.type != "cuda":
                raise ValueError(
                    "sync_batchnorm needs CUDA devices (torch's SyncBatchNorm does not run on CPU)"
                )
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model.to(self.device)
        if train_config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        global_ccl = train_config.global_contrastive
        if global_ccl is None:
            global_ccl = self.dist.enabled
        if global_ccl and self.dist.enabled:
            self.model.global_batch = GlobalBatch(all_gather_with_grad, self.dist.rank)

        self.text_cache = None
        if model_config.use_text and self.model.text_encoder.frozen and train_config.text_cache_size:
            self.text_cache = TextFeatureCache(self.model.text_encoder, train_config.text_cache_size)
        if model_config.use_text:
            self._warn_truncated_notes()

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, train_config, fused=self.device.type == "cuda")
        self.scheduler = build_scheduler(self.optimizer, train_config)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)
        self.start_epoch = 0
        self._first_bad: torch.Tensor | None = None
        self.best_dice = -math.inf
        self.stale_epochs = 0
        if state is not None:
            self._load_state(state)
        self.ddp = None
        if self.dist.enabled:
            self.ddp = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=model_config.use_text and not model_config.conditioned,  # W heads idle
            )
        # what runs the steps: DDP (training under torchrun) or the model, compiled on request; checkpoints
        # always save self.model's own state dict
        self.train_module: nn.Module = self.ddp if self.ddp is not None else self.model
        self.eval_module: nn.Module = self.model
        if train_config.compile:
            mode = resolve_compile_mode(train_config.compile_mode, self.device, self.dist.enabled)
            self.train_module = compile_module(self.train_module, mode, train_config.compile_backend)
            self.eval_module = compile_module(self.model, mode, train_config.compile_backend)
        self.train_loader = self._loader(self.train_set, train=True)
        self.val_loader = self._loader(self.val_set, train=False)

    # set-up -------------------------------------------------------------------------------------------
    def _loader(self, dataset: LViTDataset, train: bool) -> DataLoader:
        """Training: a DistributedSampler (equal shards, reshuffled per epoch from the seed). Validation:
        every process scores its own disjoint shard, so no image is counted twice."""
        if self.cfg.num_workers > 0:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers tokenize after a fork
            if self.cfg.cache_images:
                dataset.preload()  # decoded once, shared by the forked workers
        if train:
            sampler = DistributedSampler(
                dataset,
                num_replicas=self.dist.world_size,
                rank=self.dist.rank,
                shuffle=True,
                seed=self.cfg.seed,
            )
        else:
            sampler = list(range(self.dist.rank, len(dataset), self.dist.world_size))
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            num_workers=self.cfg.num_workers,
            collate_fn=NoteCollator(self.model.tokenizer),
            pin_memory=self.device.type == "cuda",
            drop_last=train and len(sampler) >= self.cfg.batch_size,  # equal batches for the global CCL
        )

    def _claim_folder(self, resume: bool) -> dict[str, Any] | None:
        """Lock the run folder (rank 0; released when ``fit`` returns or the process ends), then check
        that it holds what ``resume`` expects: the resumed run's state, or nothing."""
        self.lock = RunLock(self.out_dir) if self.dist.is_main else None
        if self.lock is not None:
            weakref.finalize(self, self.lock.release)
            self._take_lock()
        try:
            return self._resume_state() if resume else self._check_fresh_run()
        except BaseException:
            self.close()
            raise

    def _take_lock(self) -> None:
        if self.lock is not None and not self.lock.held:
            notice = self.lock.acquire()
            if notice is not None:
                tqdm.write(notice)

    def close(self) -> None:
        """Release the run folder's lock (``fit`` does so when it returns)."""
        if self.lock is not None:
            self.lock.release()

    def _warn_truncated_notes(self) -> None:
        notes = sorted(set(self.train_set.texts))
        long = self.model.tokenizer.overlong(notes)
        if long:
            warnings.warn(
                f"{len(long)} of the {len(notes)} distinct training notes have more than max_text_len="
                f"{self.model_config.max_text_len} tokens and are truncated, e.g. {long[0]!r}",
                stacklevel=3,
            )

    def text_encoder_summary(self) -> str:
        """The training log's line on the text encoder."""
        if not self.model_config.use_text:
            return "text encoder: none (text branch off)"
        cached = ", its features cached per note" if self.text_cache is not None else ""
        return f"text encoder: {self.model.text_encoder.describe()}{cached}"

    def _resume_state(self) -> dict[str, Any]:
        path = self.out_dir / "last.pt"
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint {path} to resume from")
        state = load_checkpoint(path)
        saved = checkpoint_model_config(state)
        if saved != self.model_config:
            changed = sorted(k for k, v in saved.to_dict().items() if self.model_config.to_dict()[k] != v)
            raise ValueError(f"--resume: the model configuration differs from the checkpoint's in {changed}")
        check_same_schedule(state["train_config"], self.cfg)
        if self.dist.is_main:
            self._restore_best(path, state)
        return state

    def _restore_best(self, last: Path, state: dict[str, Any]) -> None:
        """best.pt is written after last.pt: a run stopped between the two has a last.pt of its best epoch
        (``stale_epochs`` 0) and no best.pt, or an older one. Copy last.pt over it, or say what is lost."""
        best = self.out_dir / "best.pt"
        if state["stale_epochs"] == 0:
            if _saved_epoch(best) != state["epoch"]:
                copy_checkpoint(last, best)
                tqdm.write(f"{best}: rewritten from last.pt, the best epoch so far ({state['epoch'] + 1})")
        elif not best.is_file():
            tqdm.write(
                f"warning: {best} is missing and last.pt is not the best epoch (validation Dice "
                f"{state['best_dice']:.4f}): best.pt will be written at the next better epoch"
            )

    def _check_fresh_run(self) -> None:
        if (self.out_dir / "last.pt").exists():
            raise ValueError(
                f"{self.out_dir} already holds a run (last.pt); pass --resume to continue it or choose another --out"
            )

    def _load_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = state["epoch"] + 1
        self.best_dice = state["best_dice"]
        self.stale_epochs = state["stale_epochs"]

    def _state(self, epoch: int) -> dict[str, Any]:
        model = self.model
        return {
            "model": model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "best_dice": self.best_dice,
            "stale_epochs": self.stale_epochs,
            "rng": {"seed": self.cfg.seed, "next_epoch": epoch + 1},
            "model_config": self.model_config.to_dict(),
            "train_config": self.cfg.to_dict(),
            "tokenizer": model.tokenizer.to_state() if model.tokenizer is not None else None,
            "text_encoder": model.text_encoder.spec() if self.model_config.use_text else None,
        }

    # loop ---------------------------------------------------------------------------------------------
    def fit(self, epochs: int | None = None) -> list[EpochResult]:
        """Train to the configured epoch count, or for at most ``epochs`` more epochs in this call (a
        time-limited job that the next one continues with ``--resume``)."""
        end = self.cfg.epochs if epochs is None else min(self.cfg.epochs, self.start_epoch + epochs)
        results = []
        self._take_lock()
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(
                json.dumps({"model": self.model_config.to_dict(), "train": self.cfg.to_dict()}, indent=2)
            )
            self._drop_rows_after(self.start_epoch)
            tqdm.write(self.text_encoder_summary())
        writer = self._tensorboard()
        try:
            for epoch in range(self.start_epoch, end):
                start = time.perf_counter()
                seed_epoch(self.cfg.seed, epoch, self.dist.rank)
                self.train_loader.sampler.set_epoch(epoch)
                lr = self.optimizer.param_groups[0]["lr"]
                train = self._train_epoch(epoch)
                self.scheduler.step()
                val = self.validate()
                result = EpochResult(epoch, lr, train, val, time.perf_counter() - start)
                results.append(result)
                improved = val["dice"] > self.best_dice
                self.best_dice = max(self.best_dice, val["dice"])
                self.stale_epochs = 0 if improved else self.stale_epochs + 1
                if self.dist.is_main:
                    self._record(result, writer)
                    state = self._state(epoch)
                    save_checkpoint(state, self.out_dir / "last.pt")
                    if improved:
                        save_checkpoint(state, self.out_dir / "best.pt")
                barrier(self.dist)
                patience = self.cfg.early_stopping_patience
                if patience and self.stale_epochs >= patience:
                    if self.dist.is_main:
                        tqdm.write(f"early stopping: no better validation Dice for {patience} epochs")
                    break
        finally:
            if writer is not None:
                writer.close()
            self.close()
        return results

    def _text_features(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """A frozen text encoder's features of the batch's notes from the cache (read off the batch's host
        copy of the token ids, before it moves to the device), or None: the model runs its encoder."""
        if self.text_cache is None:
            return None
        return self.text_cache(batch["input_ids"], batch["attention_mask"], self.device)

    def _forward(
        self,
        batch: dict[str, Any],
        masks: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
    ):
        module = self.train_module if self.model.training else self.eval_module
        if self.cfg.compile:
            # a new step: CUDA graphs (mode "reduce-overhead") may reuse the previous step's output memory
            torch.compiler.cudagraph_mark_step_begin()
        with self._autocast():
            return module(
                batch["images"],
                batch.get("input_ids"),
                batch.get("attention_mask"),
                masks,
                text_features=text_features,
            )

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        sums = torch.zeros(len(LOGGED_LOSSES) + 2, device=self.device)  # loss terms, Dice sum, images
        logged = torch.zeros_like(sums)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", disable=not self.progress,
                   leave=False, dynamic_ncols=True)  # fmt: skip
        with self._compile_notice(bar):
            try:
                return self._train_steps(bar, sums, logged, epoch)
            except NonFiniteLossError:
                raise
            except Exception as err:  # NaN weights can fail a later step first (an op rejecting them)
                if self._first_bad is not None:
                    self._check_finite(float(self._first_bad), epoch, len(bar), err)
                raise

    def _compile_notice(self, bar: tqdm) -> contextlib.AbstractContextManager:
        return compile_notice(bar) if self.cfg.compile else contextlib.nullcontext()

    def _train_steps(
        self, bar: tqdm, sums: torch.Tensor, logged: torch.Tensor, epoch: int
    ) -> dict[str, float]:
        first_bad = torch.zeros((), device=self.device)  # the first step whose loss is not finite; 0: none
        self._first_bad = first_bad
        for step, batch in enumerate(bar, start=1):
            text_features = self._text_features(batch)
            batch = to_device(batch, self.device, self.cfg.channels_last)
            out = self._forward(batch, batch["masks"], text_features)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(out.losses["total"]).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            with torch.no_grad():
                zero = torch.zeros((), device=self.device)
                terms = torch.stack([out.losses.get(name, zero).detach().float() for name in LOGGED_LOSSES])
                n = batch["images"].shape[0]
                dice = self._batch_dice(out.logits, batch["masks"])
                sums += torch.cat(
                    [terms * n, dice.sum().view(1), torch.full((1,), float(n), device=self.device)]
                )
                first_bad = torch.where((first_bad == 0) & ~torch.isfinite(terms[0]), step, first_bad)
                self._first_bad = first_bad
            if step % self.cfg.log_every == 0 and self.progress:
                # the only host read of the step, every log_every steps
                *window, bad = torch.cat([sums - logged, first_bad.view(1)]).tolist()
                if not self.dist.enabled:  # under DDP every process stops together, at the epoch end
                    self._check_finite(bad, epoch, len(bar))
                logged.copy_(sums)
                bar.set_postfix(loss=f"{window[0] / window[-1]:.4f}", dice=f"{window[-2] / window[-1]:.4f}")
        all_reduce_sum(sums, self.dist)
        *totals, bad = torch.cat([sums, first_bad.view(1)]).tolist()
        if bad or not math.isfinite(totals[0]):  # the sums are NaN on every process if on one
            self._check_finite(bad or -1.0, epoch, len(bar))
        images = totals[-1]
        if images == 0:
            raise ValueError(
                f"the training loader yielded no batch ({len(self.train_set)} images in the train split, "
                f"batch size {self.cfg.batch_size}, {self.dist.world_size} process(es))"
            )
        computed = {"total", *self.model.loss_terms}
        means = {
            name: value / images
            for name, value in zip(LOGGED_LOSSES, totals, strict=False)
            if name in computed
        }
        means["dice_score"] = totals[-2] / images
        return means

    def _check_finite(self, first_bad: float, epoch: int, steps: int, cause: Exception | None = None) -> None:
        """Stop on a non-finite loss (``first_bad``: its step, -1 on another process, 0 none)."""
        if first_bad == 0:
            return
        where = f"step {int(first_bad)} of {steps}" if first_bad > 0 else "a step of another process"
        raise NonFiniteLossError(
            f"training stopped: the loss is not finite (NaN or infinite) at epoch {epoch + 1}, {where}; "
            f"nothing of epoch {epoch + 1} was saved. Lower the learning rate (lr={self.cfg.lr:g}) or check "
            "the data"
        ) from cause

    @staticmethod
    def _batch_dice(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return dice_iou(binarize(logits.float(), from_logits=True), masks > 0.5)[0]

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.model.eval()
        meter = DiceIoUMeter()
        bar = tqdm(
            self.val_loader, desc="validation", disable=not self.progress, leave=False, dynamic_ncols=True
        )
        with self._compile_notice(bar):
            for batch in bar:
                text_features = self._text_features(batch)
                batch = to_device(batch, self.device, self.cfg.channels_last)
                logits = self._forward(batch, text_features=text_features).logits
                meter.update(binarize(logits.float(), from_logits=True), batch["masks"] > 0.5)
        meter.all_reduce()
        return {k: float(v) for k, v in meter.compute().items()}

    # logging ------------------------------------------------------------------------------------------
    def _tensorboard(self):
        if not self.dist.is_main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.out_dir / "tensorboard"))

    def _drop_rows_after(self, epochs_done: int) -> None:
        """Remove metrics.csv rows of epochs that the checkpoint does not hold (a run stopped between
        logging an epoch and saving it): they are trained again, and logged once."""
        path = self.out_dir / "metrics.csv"
        if not path.exists():
            return
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            fields, rows = reader.fieldnames, list(reader)
        kept = [row for row in rows if int(row["epoch"]) <= epochs_done]
        if len(kept) != len(rows):
            tmp = path.with_suffix(".csv.tmp")
            with tmp.open("w", newline="") as handle:
                out = csv.DictWriter(handle, fieldnames=fields)
                out.writeheader()
                out.writerows(kept)
            tmp.replace(path)  # the log is never left half-written

    def _record(self, result: EpochResult, writer) -> None:
        row = {"epoch": result.epoch + 1, "lr": result.lr, "seconds": round(result.seconds, 2)}
        row |= {f"train_{k}": v for k, v in result.train.items()}
        row |= {"val_dice": result.val["dice"], "val_iou": result.val["iou"]}
        path = self.out_dir / "metrics.csv"
        new = not path.exists()
        with path.open("a", newline="") as handle:
            out = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                out.writeheader()
            out.writerow(row)
        for key, value in row.items():
            if key != "epoch":
                writer.add_scalar(key.replace("_", "/", 1), value, result.epoch + 1)
        writer.flush()
        tqdm.write(
            f"epoch {result.epoch + 1}/{self.cfg.epochs}  loss {result.train['total']:.4f}  "
            f"train dice {result.train['dice_score']:.4f}  val dice {result.val['dice']:.4f}  "
            f"val iou {result.val['iou']:.4f}  ({result.seconds:.1f}s)"
        )


def _saved_epoch(path: Path) -> int | None:
    """The epoch of the checkpoint at ``path`` (its tensors memory-mapped, not read), None if unreadable."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except Exception:  # missing, truncated or foreign: treated as absent
        return None
