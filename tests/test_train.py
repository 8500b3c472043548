"""Trainer: checkpoints, exact resume, fresh-run guard, evaluate and predict through the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from reclmis.cli import main
from reclmis.config import RecLMISConfig, TrainConfig
from reclmis.data import make_synthetic
from reclmis.inference import predict
from reclmis.train import Trainer, load_checkpoint, model_from_checkpoint


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("data"), size=32, n_train=24, n_val=8, n_test=8, seed=1)


def tiny_configs(**train) -> tuple[RecLMISConfig, TrainConfig]:
    model = RecLMISConfig.preset(
        "tiny", image_size=32, base_channels=8, text_width=32, text_layers=1, text_heads=2, vocab_size=300
    )
    options = dict(epochs=4, batch_size=8, lr=1e-3, num_workers=0, device="cpu", log_every=2, augment="full")
    return model, TrainConfig(**(options | train))


def test_resume_continues_exactly(synthetic, tmp_path) -> None:
    model_config, train_config = tiny_configs()
    straight = Trainer(model_config, train_config, synthetic, tmp_path / "straight", progress=False)
    straight.fit()

    Trainer(model_config, train_config, synthetic, tmp_path / "resumed", progress=False).fit(epochs=2)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1
    metrics = tmp_path / "resumed" / "metrics.csv"
    logged = metrics.read_text().splitlines()
    metrics.write_text("\n".join([*logged, logged[-1].replace("2,", "3,", 1)]) + "\n")  # stopped mid-save
    resumed = Trainer(
        model_config, train_config, synthetic, tmp_path / "resumed", resume=True, progress=False
    )
    assert resumed.start_epoch == 2
    resumed.fit()

    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=0, atol=0, msg=name)
    rows = list(csv.DictReader((tmp_path / "resumed" / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]


def test_checkpoint_contents_and_reload(synthetic, tmp_path) -> None:
    model_config, train_config = tiny_configs(epochs=1)
    trainer = Trainer(model_config, train_config, synthetic, tmp_path / "run", progress=False)
    trainer.fit()
    state = load_checkpoint(tmp_path / "run" / "best.pt")
    expected = {
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "epoch",
        "rng",
        "model_config",
        "train_config",
        "tokenizer",
    }
    assert expected <= set(state)
    assert not list((tmp_path / "run").glob(".*tmp*"))  # no temporary file left behind
    model, _ = model_from_checkpoint(tmp_path / "run" / "best.pt")
    images = torch.rand(2, 3, 32, 32)
    ids, mask = model.tokenize(["Upper left lung.", "Lower right lung."])
    with torch.no_grad():
        reloaded = model(images, ids, mask).logits
        original = trainer.model.eval()(images, ids, mask).logits
    torch.testing.assert_close(reloaded, original)
    assert (tmp_path / "run" / "tensorboard").is_dir()


def test_bf16_autocast_training(synthetic, tmp_path) -> None:
    """The mixed-precision step of GPU training, run on CPU: finite losses, fp32 weights in the checkpoint."""
    model_config, train_config = tiny_configs(epochs=1, precision="bf16")
    trainer = Trainer(model_config, train_config, synthetic, tmp_path / "run", progress=False)
    assert trainer.autocast_dtype == torch.bfloat16
    (result,) = trainer.fit()
    assert all(torch.isfinite(torch.tensor(v)) for v in result.train.values()), result.train
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert {v.dtype for v in state["model"].values() if v.is_floating_point()} == {torch.float32}


def test_fresh_run_refuses_to_overwrite_and_resume_needs_a_checkpoint(synthetic, tmp_path) -> None:
    model_config, train_config = tiny_configs(epochs=1)
    Trainer(model_config, train_config, synthetic, tmp_path / "run", progress=False).fit()
    with pytest.raises(ValueError, match="already holds a run"):
        Trainer(model_config, train_config, synthetic, tmp_path / "run", progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(model_config, train_config, synthetic, tmp_path / "other", resume=True, progress=False)
    changed = model_config.replace(recon_layers=2)
    with pytest.raises(ValueError, match="recon_layers"):
        Trainer(changed, train_config, synthetic, tmp_path / "run", resume=True, progress=False)


def test_cli_train_evaluate_predict(synthetic, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    args = ["train", "--data", str(synthetic), "--preset", "tiny", "--image-size", "32", "--epochs", "1",
            "--batch-size", "8", "--out", str(run), "--device", "cpu", "--workers", "0",
            "--set", "model.base_channels=8", "--set", "model.text_layers=1", "--set", "train.augment=none"]  # fmt: skip
    assert main(args) == 0
    assert (run / "best.pt").is_file() and (run / "last.pt").is_file() and (run / "metrics.csv").is_file()
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["base_channels"] == 8 and saved["train"]["augment"] == "none"

    out_json, overlays = tmp_path / "eval.json", tmp_path / "pred"
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(synthetic), "--json",
                 str(out_json), "--save-predictions", str(overlays), "--per-image-csv", str(tmp_path / "per.csv"),
                 "--device", "cpu"]) == 0  # fmt: skip
    metrics = json.loads(out_json.read_text())
    assert set(metrics) == {"dice", "iou", "n", "pooled_dice", "pooled_iou", "protocols", "mask_foreground",
                            "mask_resize", "empty_score", "notes"}  # fmt: skip
    assert metrics["n"] == 8 and 0 <= metrics["iou"] <= metrics["dice"] <= 1
    assert (metrics["mask_resize"], metrics["empty_score"]) == ("nearest", 1.0)  # as trained
    assert len(list(overlays.glob("*_overlay.png"))) == 8
    assert len(list(csv.DictReader((tmp_path / "per.csv").open()))) == 8
    assert "Dice" in capsys.readouterr().out
    official = tmp_path / "official.json"
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(synthetic), "--json",
                 str(official), "--official-metrics", "--device", "cpu"]) == 0  # fmt: skip
    scores = json.loads(official.read_text())
    assert (scores["mask_resize"], scores["empty_score"]) == ("bilinear", 0.0)
    assert "both-empty images score 0" in capsys.readouterr().out
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(synthetic),
                 "--official-metrics", "--empty-score", "1"]) == 2  # fmt: skip
    assert "--official-metrics" in capsys.readouterr().err
    probed = tmp_path / "probe.json"
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(synthetic), "--json",
                 str(probed), "--notes", "shuffled", "--device", "cpu"]) == 0  # fmt: skip
    scores = json.loads(probed.read_text())
    assert scores["notes"] == "own" and scores["probe"]["notes"] == "shuffled" and scores["probe"]["n"] == 8
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("test")]
    assert [row[1] for row in rows] == ["own", "shuffled"]

    image = next((synthetic / "Test_Folder" / "img").iterdir())
    out = tmp_path / "p.png"
    assert main(["predict", "--checkpoint", str(run / "best.pt"), "--image", str(image), "--text",
                 "Upper left lung.", "--out", str(out), "--explain", "--compare-text", "Lower right lung.",
                 "--device", "cpu"]) == 0  # fmt: skip
    for suffix in ("", "_overlay", "_wpoi", "_wwoi", "_compare"):
        assert (tmp_path / f"p{suffix}.png").is_file(), suffix


def test_explanations_depend_on_the_image_and_the_note(synthetic, tmp_path) -> None:
    model_config, train_config = tiny_configs(epochs=1)
    Trainer(model_config, train_config, synthetic, tmp_path / "run", progress=False).fit()
    model, _ = model_from_checkpoint(tmp_path / "run" / "best.pt")
    first, second = sorted((synthetic / "Test_Folder" / "img").iterdir())[:2]
    a = predict(model, first, "Upper left lung.")
    b = predict(model, second, "Upper left lung.")
    c = predict(model, first, "Lower right lung and middle left lung.")
    # a barely trained model's W_poi is close to uniform, but it must come from the image and the note
    assert a.w_poi.shape == (2, 2) and not torch.equal(a.w_poi, b.w_poi)
    assert not torch.equal(a.w_poi, c.w_poi)
    assert a.words[0] == "<|startoftext|>" and len(a.words) == len(a.w_woi)
    torch.testing.assert_close(a.w_woi.sum(), torch.tensor(1.0))


def test_cli_errors_are_clear(synthetic, tmp_path, capsys) -> None:
    assert (
        main(["train", "--data", str(tmp_path / "missing"), "--epochs", "1", "--out", str(tmp_path / "r")])
        == 2
    )
    assert "missing" in capsys.readouterr().err
    assert (
        main(["train", "--data", str(synthetic), "--set", "model.nope=1", "--out", str(tmp_path / "r")]) == 2
    )
    assert "nope" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(synthetic)]) == 2
    assert "none.pt" in capsys.readouterr().err


def test_checkpoint_from_before_the_memory_stack_loads_as_the_model_it_was(synthetic, tmp_path) -> None:
    """A version-1 checkpoint written before ``recon_memory_layers`` (and the official segmentation loss)
    existed rebuilds its own model through the upgrade chain: reconstructors without a memory stack,
    5 * (Dice + BCE) with a linear Dice, CI's residual injection.
    Weights that do not fit their configuration fail with a clear error, never silently."""
    from reclmis.model import NoteTokenizer, RecLMIS

    model_config, train_config = tiny_configs()
    legacy = model_config.replace(
        interaction_injection="residual",
        recon_memory_layers=0,
        dice_squared=False,
        dice_smooth=1.0,
        loss_weights={**model_config.to_dict()["loss_weights"], "dice": 1.0, "bce": 1.0},
    )
    torch.manual_seed(0)
    model = RecLMIS(legacy, NoteTokenizer.train(["Upper left lung."] * 4, legacy.max_text_len, 300))
    old_config = legacy.to_dict()
    for name in ("recon_memory_layers", "recon_causal", "w_head_dropout", "dice_squared", "dice_smooth"):
        del old_config[name]
    del old_config["interaction_injection"]
    old_config["interaction_residual"] = True  # version 1 named CI's residual form so
    old_config["loss_weights"] = {k: old_config["loss_weights"][k] for k in ("v2t", "t2v", "ccl", "seg")}
    state = {
        "model": model.state_dict(),
        "model_config": old_config,
        "train_config": {k: v for k, v in train_config.to_dict().items() if k in ("epochs", "lr", "min_lr")},
        "tokenizer": model.tokenizer.to_state(),
        "text_encoder_config": model.text_encoder.model.config.to_dict(),
    }
    torch.save({"format_version": 1, **state}, tmp_path / "old.pt")  # as reclmis wrote it then
    loaded, _ = model_from_checkpoint(tmp_path / "old.pt")
    assert loaded.config == legacy and len(loaded.cvr.memory) == 0
    assert loaded.config.loss_weights.dice == loaded.config.loss_weights.bce == 1.0

    torch.save(
        {"format_version": 1, **state, "model_config": legacy.replace(recon_memory_layers=2).to_dict()},
        tmp_path / "bad.pt",
    )
    with pytest.raises(
        ValueError, match=r"do not fit.*: cvr\.memory\.0\.self_attention.* missing, none unexpected"
    ):
        model_from_checkpoint(tmp_path / "bad.pt")

    (tmp_path / "run").mkdir()
    torch.save(
        {"format_version": 1, **state, "epoch": 0, "optimizer": {}, "scheduler": {}, "scaler": {}},
        tmp_path / "run" / "last.pt",
    )
    with pytest.raises(ValueError, match="recon_memory_layers"):
        Trainer(model_config, train_config, synthetic, tmp_path / "run", resume=True, progress=False)


def test_a_training_loader_without_a_batch_is_a_clear_error(synthetic, tmp_path) -> None:
    model_config, train_config = tiny_configs(epochs=1)
    trainer = Trainer(model_config, train_config, synthetic, tmp_path / "run", progress=False)
    nothing = torch.utils.data.Subset(trainer.train_set, [])
    sampler = torch.utils.data.DistributedSampler(nothing, num_replicas=1, rank=0)
    trainer.train_loader = torch.utils.data.DataLoader(nothing, sampler=sampler, batch_size=8)
    with pytest.raises(ValueError, match=r"yielded no batch \(24 images in the train split, batch size 8"):
        trainer.fit()
    assert not (tmp_path / "run" / "last.pt").exists()
