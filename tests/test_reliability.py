"""Faults and hostile inputs (docs/reliability.md): nothing lost, no silent wrong answer, clear errors."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reclmis.cli import build_parser, main, train_configs
from reclmis.config import RecLMISConfig, TrainConfig
from reclmis.data import MASK_RULE, LViTDataset, make_synthetic
from reclmis.inference import evaluate
from reclmis.model import RecLMIS
from reclmis.train import Trainer, load_checkpoint, save_checkpoint
from reclmis.train.run_folder import LOCK_NAME, RunLock
from reclmis.train.trainer import NoteCollator


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("data"), size=32, n_train=16, n_val=8, n_test=8, seed=2)


def tiny_configs(**train) -> tuple[RecLMISConfig, TrainConfig]:
    model = RecLMISConfig.preset(
        "tiny", image_size=32, base_channels=8, text_width=32, text_layers=1, text_heads=2, vocab_size=300
    )
    options = dict(epochs=2, batch_size=8, lr=1e-3, num_workers=0, device="cpu", log_every=1, augment="none")
    return model, TrainConfig(**(options | train))


@pytest.fixture(scope="module")
def one_epoch_run(synthetic, tmp_path_factory) -> Path:
    """A run folder after the first of two epochs (copy it before changing it)."""
    run = tmp_path_factory.mktemp("runs") / "run"
    Trainer(*tiny_configs(), synthetic, run, progress=False).fit(epochs=1)
    return run


@pytest.fixture(scope="module")
def untrained_checkpoint(synthetic, tmp_path_factory) -> Path:
    trainer = Trainer(*tiny_configs(), synthetic, tmp_path_factory.mktemp("untrained"), progress=False)
    trainer.close()
    return save_checkpoint(trainer._state(0), tmp_path_factory.mktemp("checkpoints") / "untrained.pt")


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


# -- data losses ---------------------------------------------------------------------------------------


def test_resume_rewrites_best_pt_lost_between_the_two_saves(
    synthetic, one_epoch_run, tmp_path, capsys
) -> None:
    """Killed after last.pt and before best.pt in the first epoch: the resumed run must rewrite best.pt
    (the restored best Dice may never be beaten again, so it would otherwise never be written)."""
    run = copy_run(one_epoch_run, tmp_path)
    (run / "best.pt").unlink()
    trainer = Trainer(*tiny_configs(), synthetic, run, resume=True, progress=False)
    trainer.close()
    assert "best.pt: rewritten from last.pt, the best epoch so far (1)" in capsys.readouterr().out
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    assert best["epoch"] == last["epoch"] == 0
    for name, value in last["model"].items():
        assert torch.equal(best["model"][name], value), name

    state = load_checkpoint(run / "last.pt")  # last.pt of an epoch that was not the best: say what is lost
    (run / "best.pt").unlink()
    save_checkpoint(
        {k: v for k, v in state.items() if k != "format_version"} | {"stale_epochs": 1}, run / "last.pt"
    )
    Trainer(*tiny_configs(), synthetic, run, resume=True, progress=False).close()
    assert "best.pt is missing and last.pt is not the best epoch" in capsys.readouterr().out
    assert not (run / "best.pt").exists()


def _hold_lock(folder: str, ready, stop) -> None:
    lock = RunLock(folder)
    lock.acquire()
    ready.set()
    stop.wait(60)


def test_one_training_run_per_folder_and_a_dead_runs_lock_taken_over(synthetic, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    context = multiprocessing.get_context("fork")
    ready, stop = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(str(run), ready, stop))
    holder.start()
    try:
        assert ready.wait(30)
        args = ["train", "--data", str(synthetic), "--preset", "tiny", "--image-size", "32", "--epochs", "1",
                "--out", str(run), "--device", "cpu", "--workers", "0"]  # fmt: skip
        assert main(args) == 2
        error = capsys.readouterr().err
        assert f"run folder {run} is in use by another training run (pid {holder.pid}" in error
        with pytest.raises(BlockingIOError, match=f"pid {holder.pid}"):
            Trainer(*tiny_configs(), synthetic, run, progress=False)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
    assert f"{holder.pid} " in (run / LOCK_NAME).read_text()  # left behind by the killed process
    trainer = Trainer(*tiny_configs(), synthetic, run, progress=False)
    notice = capsys.readouterr().out
    assert f"taking over the lock of a run that is no longer running (pid {holder.pid}" in notice
    assert f"{os.getpid()} " in (run / LOCK_NAME).read_text()
    trainer.close()
    assert not (run / LOCK_NAME).exists()


def test_predict_refuses_to_overwrite_its_inputs(untrained_checkpoint, synthetic, tmp_path, capsys) -> None:
    image = tmp_path / "a.png"
    shutil.copy(next((synthetic / "Test_Folder" / "img").iterdir()), image)
    original = image.read_bytes()
    base = [
        "predict",
        "--checkpoint",
        str(untrained_checkpoint),
        "--text",
        "Upper left lung.",
        "--device",
        "cpu",
    ]
    cases = [
        (["--image", str(image), "--out", str(image)], "would overwrite the input image"),
        (["--image", str(image), "--out", str(tmp_path / "sub" / ".." / "a.png")], "would overwrite the input image"),
        (["--image", str(tmp_path / "p_compare.png"), "--out", str(tmp_path / "p.png"), "--compare-text", "x"],
         "p_compare.png would overwrite the input image"),
        (["--image", str(image), "--out", str(untrained_checkpoint)], "a mask is written as"),
    ]  # fmt: skip
    shutil.copy(image, tmp_path / "p_compare.png")
    (tmp_path / "sub").mkdir()
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
    model = tmp_path / "model.png"  # a checkpoint under an image's name is an input too
    shutil.copy(untrained_checkpoint, model)
    assert main([*base[:2], str(model), *base[3:], "--image", str(image), "--out", str(model)]) == 2
    assert f"{model} would overwrite the input checkpoint" in capsys.readouterr().err
    assert image.read_bytes() == original and (tmp_path / "p_compare.png").read_bytes() == original
    assert load_checkpoint(untrained_checkpoint)["epoch"] == 0


# -- silent wrong answers ------------------------------------------------------------------------------


class NaNLossAt(torch.nn.Module):
    """Makes the training loss NaN from the ``step``-th forward pass on."""

    def __init__(self, module: torch.nn.Module, step: int) -> None:
        super().__init__()
        self.module, self.step, self.calls = module, step, 0

    def forward(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        self.calls += 1
        if self.calls >= self.step:
            out.losses["total"] = out.losses["total"] * float("nan")
        return out


@pytest.mark.parametrize(
    ("use_text", "progress", "steps_run"),
    [(False, True, 4), (False, False, 8), (True, False, 3)],
    ids=["at a log read", "at the epoch end", "when an op rejects the NaN weights of the next step"],
)
def test_a_non_finite_loss_stops_training_before_anything_is_saved(
    synthetic, tmp_path, use_text, progress, steps_run
) -> None:
    """The step is found on the device (no host read added to the step) and read where the trainer
    already reads: every log_every steps, at the epoch end, or when a later step fails because of it."""
    run = tmp_path / "run"
    model_config, train_config = tiny_configs(batch_size=2, log_every=2)
    trainer = Trainer(
        model_config.replace(use_text=use_text), train_config, synthetic, run, progress=progress
    )
    trainer.train_module = NaNLossAt(trainer.train_module, step=3)
    with pytest.raises(
        FloatingPointError, match=r"not finite .* at epoch 1, step 3 of 8; nothing of epoch 1"
    ):
        trainer.fit()
    assert trainer.train_module.calls == steps_run
    assert not (run / "last.pt").exists() and not (run / "best.pt").exists()
    assert not (run / LOCK_NAME).exists()


def test_a_diverged_run_is_a_clear_error(synthetic, tmp_path, capsys) -> None:
    """The issue's run: --lr 1e6 without the text branch printed 'loss nan', exited 0, saved NaN weights."""
    run = tmp_path / "run"
    args = ["train", "--data", str(synthetic), "--preset", "tiny", "--image-size", "32", "--epochs", "1",
            "--batch-size", "4", "--lr", "1e6", "--out", str(run), "--device", "cpu", "--workers", "0",
            "--set", "model.use_text=false", "--set", "model.base_channels=8", "--set", "train.augment=none",
            "--set", "train.min_lr=0"]  # fmt: skip
    assert main(args) == 2
    assert "training stopped: the loss is not finite" in capsys.readouterr().err
    assert not (run / "last.pt").exists()


def test_resume_refuses_a_changed_learning_rate(synthetic, one_epoch_run, tmp_path) -> None:
    run = copy_run(one_epoch_run, tmp_path)
    recorded = (run / "config.json").read_text()
    model_config, train_config = tiny_configs(lr=1e-2)
    with pytest.raises(ValueError, match=r"trained with lr=0\.001; the configuration asks for lr=0\.01"):
        Trainer(model_config, train_config, synthetic, run, resume=True, progress=False)
    assert (run / "config.json").read_text() == recorded
    assert json.loads(recorded)["train"]["lr"] == 1e-3
    with pytest.raises(ValueError, match=r"weight_decay=0\.0.*weight_decay=0\.1"):
        Trainer(model_config, tiny_configs(weight_decay=0.1)[1], synthetic, run, resume=True, progress=False)
    trainer = Trainer(*tiny_configs(), synthetic, run, resume=True, progress=False)  # the lock was released
    trainer.close()


@pytest.fixture(scope="module")
def encoded_copies(synthetic, tmp_path_factory) -> dict[str, Path]:
    """The test split with its masks as background 3 / foreground 255 and as white with the mask in alpha."""
    copies = {}
    for name in ("background 3", "alpha"):
        root = Path(shutil.copytree(synthetic, tmp_path_factory.mktemp("encoded") / "data"))
        for path in (root / "Test_Folder" / "labelcol").iterdir():
            foreground = np.asarray(Image.open(path).convert("L")) > 0
            if name == "background 3":
                Image.fromarray(np.where(foreground, 255, 3).astype(np.uint8)).save(path)
            else:
                white = np.full((*foreground.shape, 3), 255, np.uint8)
                Image.fromarray(np.dstack([white, foreground.astype(np.uint8) * 255])).save(path)
        copies[name] = root
    return copies


def test_masks_in_other_encodings_score_as_the_clean_masks(synthetic, encoded_copies) -> None:
    model_config, _ = tiny_configs()
    torch.manual_seed(0)
    model = RecLMIS.build(model_config, ["Upper left lung.", "Lower right lung."]).eval()
    dataset = LViTDataset(synthetic, "test", model_config.image_size, cache=False)
    batch = NoteCollator(model.tokenizer)([dataset[i] for i in range(len(dataset))])
    head = next(p for name, p in model.named_parameters() if name.endswith("head.bias"))
    with torch.no_grad():  # a random model that marks about half of the pixels
        head -= model(batch["images"], batch["input_ids"], batch["attention_mask"]).logits.median()
    clean = evaluate(model, synthetic, "test", progress=False)
    assert 0 < clean["dice"] < 1 and clean["mask_foreground"] == MASK_RULE
    for name, root in encoded_copies.items():
        assert evaluate(model, root, "test", progress=False) == clean, name


# -- checkpoints ---------------------------------------------------------------------------------------


def test_unreadable_checkpoints_say_why(untrained_checkpoint, tmp_path) -> None:
    empty, text, truncated = tmp_path / "empty.pt", tmp_path / "notes.pt", tmp_path / "cut.pt"
    empty.write_bytes(b"")
    text.write_text("Image,Description\n")
    data = untrained_checkpoint.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    hostile = tmp_path / "hostile.pt"
    torch.save({"format_version": 1, "model": Payload()}, hostile)
    for path, message in [
        (empty, r"empty\.pt cannot be read: the file is empty \(0 bytes\)"),
        (text, r"notes\.pt cannot be read: it is not a checkpoint .* with b'Imag'"),
        (truncated, rf"cut\.pt cannot be read: the file is truncated \({len(data) // 2} bytes"),
        (hostile, r"hostile\.pt cannot be read: it holds Python objects .* could run code .*system"),
        (tmp_path, r"is a directory, not a checkpoint file"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pt")


def test_a_save_removes_the_temporaries_of_killed_writes(tmp_path) -> None:
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    dead, alive = tmp_path / f".last.pt.tmp-{finished.pid}", tmp_path / f".best.pt.tmp-{os.getppid()}"
    own, other = tmp_path / f".x.pt.tmp-{os.getpid()}", tmp_path / ".notes.tmp-draft"
    for path in (dead, alive, own, other):
        path.write_bytes(b"partial")
    save_checkpoint({"model": {}}, tmp_path / "last.pt")
    assert not dead.exists() and alive.exists() and own.exists() and other.exists()
    assert load_checkpoint(tmp_path / "last.pt")["model"] == {}


# -- the command line ----------------------------------------------------------------------------------


def test_log_every_zero_is_a_clear_error(synthetic, tmp_path, capsys) -> None:
    args = ["train", "--data", str(synthetic), "--set", "train.log_every=0", "--out", str(tmp_path / "r")]
    assert main(args) == 2
    assert "log_every must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="num_workers must be non-negative"):
        TrainConfig(num_workers=-1)


def test_predict_writes_the_format_its_suffix_names(
    untrained_checkpoint, synthetic, tmp_path, capsys
) -> None:
    image = next((synthetic / "Test_Folder" / "img").iterdir())
    base = ["predict", "--checkpoint", str(untrained_checkpoint), "--image", str(image), "--text", "Upper left.",
            "--device", "cpu", "--out"]  # fmt: skip
    masks = {}
    for suffix, kind in ((".png", "PNG"), (".tif", "TIFF"), (".bmp", "BMP")):
        assert main([*base, str(tmp_path / f"m{suffix}")]) == 0
        with Image.open(tmp_path / f"m{suffix}") as written:
            assert written.format == kind and written.mode == "L"
            masks[suffix] = np.asarray(written)
    assert set(np.unique(masks[".png"])) <= {0, 255}
    assert all(np.array_equal(mask, masks[".png"]) for mask in masks.values())
    for name, message in (("m.jpg", "(a lossy format"), ("m", "not a name without suffix")):
        assert main([*base, str(tmp_path / name)]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / name).exists()


def test_outputs_that_cannot_be_written_are_clear_errors_before_the_work(synthetic, tmp_path, capsys) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    absent = str(tmp_path / "absent.pt")  # every check below comes before the checkpoint is read
    evaluate_args = ["evaluate", "--checkpoint", absent, "--data", str(synthetic)]
    cases = [
        (["predict", "--checkpoint", absent, "--image", "i.png", "--out", str(blocker / "o.png")],
         f"cannot be written: {blocker} is a file, not a folder"),
        ([*evaluate_args, "--json", str(tmp_path)], f"--json {tmp_path} is a folder; give a file name"),
        ([*evaluate_args, "--per-image-csv", str(blocker / "a" / "b.csv")], f"{blocker} is a file"),
        ([*evaluate_args, "--save-predictions", str(blocker)], f"--save-predictions {blocker} is a file"),
        (["train", "--data", str(synthetic), "--out", str(blocker / "run")], f"{blocker} is a file"),
    ]  # fmt: skip
    for args, message in cases:
        assert main(args) == 2, args
        assert message in capsys.readouterr().err, args


def _main_unprivileged(args: list[str], stderr: int) -> None:
    """``reclmis ARGS`` in a forked process, as an unprivileged user when run as root (who writes anywhere)."""
    if os.geteuid() == 0:
        os.setgid(65534)
        os.setuid(65534)
    os.dup2(stderr, 2)
    sys.stderr = os.fdopen(2, "w", closefd=False)
    code = main(args)
    sys.stderr.flush()
    os._exit(code)


def test_an_unwritable_folder_is_a_clear_error(synthetic) -> None:
    shared = Path(tempfile.mkdtemp(prefix="reclmis-readonly-"))  # reachable by the unprivileged user
    locked = shared / "locked"
    locked.mkdir()
    try:
        shared.chmod(0o777)
        locked.chmod(0o555)
        out = locked / "m.json"
        args = ["evaluate", "--checkpoint", "absent.pt", "--data", str(synthetic), "--json", str(out)]
        with (shared / "stderr").open("w+") as stderr:
            child = multiprocessing.get_context("fork").Process(
                target=_main_unprivileged, args=(args, stderr.fileno())
            )
            child.start()
            child.join(60)
            stderr.seek(0)
            message = stderr.read()
        assert child.exitcode == 2, message
        assert f"--json {out} cannot be written: no permission to write in {locked}" in message
    finally:
        locked.chmod(0o755)
        shutil.rmtree(shared)


# -- kill -9 at any moment -----------------------------------------------------------------------------

KILL_TEST_ARGS = ["--preset", "tiny", "--image-size", "32", "--epochs", "3", "--batch-size", "4", "--device", "cpu",
                  "--workers", "0", "--set", "model.base_channels=8", "--set", "model.text_layers=1",
                  "--set", "model.text_width=32", "--set", "model.text_heads=2", "--set", "model.vocab_size=300",
                  "--set", "train.augment=none", "--set", "train.log_every=1"]  # fmt: skip


class Training:
    """``reclmis train`` in a subprocess, its output in files, to be killed at a chosen moment."""

    def __init__(
        self, data: Path, run: Path, logs: Path, *extra: str, pause_write: str | None = None
    ) -> None:
        env = dict(os.environ)
        env.pop("RECLMIS_TEST_PAUSE_WRITE", None)
        if pause_write is not None:
            env["RECLMIS_TEST_PAUSE_WRITE"] = pause_write
        self.out, self.err = logs.with_suffix(".out"), logs.with_suffix(".err")
        with self.out.open("w") as out, self.err.open("w") as err:
            command = [sys.executable, "-m", "reclmis", "train", "--data", str(data), "--out", str(run)]
            self.process = subprocess.Popen(
                [*command, *KILL_TEST_ARGS, *extra], stdout=out, stderr=err, env=env
            )

    def wait_for(self, condition, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(
                    f"training ended early ({self.process.returncode}): {self.err.read_text()}"
                )
            if time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"timed out: {self.err.read_text()[-2000:]}")
            time.sleep(0.02)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def finish(self) -> str:
        assert self.process.wait(timeout=600) == 0, self.err.read_text()
        return self.out.read_text()


def temporaries(run: Path) -> list[str]:
    return sorted(p.name for p in run.glob(".*.tmp-*"))


def test_training_killed_at_any_moment_loses_nothing_and_resumes_exactly(tmp_path) -> None:
    """SIGKILL mid-write of last.pt, mid-write of best.pt and mid-epoch (the RECLMIS_TEST_PAUSE_WRITE hook
    holds a write halfway): the checkpoints on disk always load, the next run removes the dead writes'
    temporary files and takes over the dead run's lock, and the resumed run ends as an uninterrupted one."""
    data = make_synthetic(tmp_path / "data", size=64, n_train=8, n_val=4, n_test=2, seed=3)
    run = tmp_path / "run"

    first = Training(data, run, tmp_path / "first", pause_write="last.pt")
    first.wait_for(lambda: temporaries(run) and (run / f".last.pt.tmp-{first.process.pid}").stat().st_size)
    first.kill()
    assert temporaries(run) == [f".last.pt.tmp-{first.process.pid}"] and not (run / "last.pt").exists()

    second = Training(data, run, tmp_path / "second", pause_write="best.pt")  # no last.pt: a fresh start
    second.wait_for(lambda: (run / f".best.pt.tmp-{second.process.pid}").exists())
    second.kill()
    assert (
        f"taking over the lock of a run that is no longer running (pid {first.process.pid}"
        in second.out.read_text()
    )
    assert temporaries(run) == [f".best.pt.tmp-{second.process.pid}"] and not (run / "best.pt").exists()
    assert load_checkpoint(run / "last.pt")["epoch"] == 0

    third = Training(data, run, tmp_path / "third", "--resume")
    third.wait_for(lambda: "epoch 2/3" in third.err.read_text())  # training its second epoch
    third.kill()
    assert "best.pt: rewritten from last.pt" in third.out.read_text()
    assert load_checkpoint(run / "best.pt")["epoch"] == 0 and load_checkpoint(run / "last.pt")["epoch"] in (
        0,
        1,
    )

    output = Training(data, run, tmp_path / "last", "--resume").finish()
    assert "done: best validation Dice" in output
    assert temporaries(run) == [] and not (run / LOCK_NAME).exists()
    last, best = load_checkpoint(run / "last.pt"), load_checkpoint(run / "best.pt")
    assert last["epoch"] == 2 and best["epoch"] <= 2
    epochs = [int(line.split(",")[0]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs == [1, 2, 3]

    model_config, train_config = train_configs(
        build_parser().parse_args(["train", "--data", "x", *KILL_TEST_ARGS])
    )
    Trainer(model_config, train_config, data, tmp_path / "straight", progress=False).fit()
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    for name, value in straight["model"].items():
        assert torch.equal(last["model"][name], value), name
