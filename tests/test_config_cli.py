"""Configuration presets and recipes, the tokenizer, and the profile command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reclmis.cli import main
from reclmis.config import PRESETS, RecLMISConfig, TrainConfig, load_recipe
from reclmis.model.tokenizer import NoteTokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_presets_derive_sizes_from_config() -> None:
    paper = PRESETS["paper"]
    assert (paper.base_channels, paper.visual_width, paper.num_patches) == (64, 512, 196)
    assert (paper.text_layers, paper.text_width, paper.text_heads) == (12, 512, 8)
    small, tiny = PRESETS["small"], PRESETS["tiny"]
    assert (small.base_channels, small.text_layers, small.text_width) == (32, 4, 256)
    assert (tiny.base_channels, tiny.text_layers, tiny.text_width, tiny.image_size) == (16, 2, 128, 64)
    assert RecLMISConfig.preset("paper", image_size=352).num_patches == 22 * 22


def test_recipe_round_trip_and_errors(tmp_path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model:\n  preset: tiny\n  max_text_len: 10\n  loss_weights: {ccl: 0.5}\ntrain:\n  lr: 0.01\n"
    )
    model, train = load_recipe(recipe)
    assert model.base_channels == 16 and model.max_text_len == 10 and model.loss_weights.ccl == 0.5
    assert model.loss_weights.seg == 5.0 and train.lr == 0.01
    recipe.write_text("model:\n  base_chanels: 8\n")
    with pytest.raises(ValueError, match="base_chanels"):
        load_recipe(recipe)
    recipe.write_text("model:\n  preset: huge\n")
    with pytest.raises(ValueError, match="huge"):
        load_recipe(recipe)
    recipe.write_text("optimiser: {}\n")
    with pytest.raises(ValueError, match="optimiser"):
        load_recipe(recipe)
    with pytest.raises(FileNotFoundError):
        load_recipe(tmp_path / "none.yaml")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)


def test_tokenizer_pads_truncates_and_round_trips() -> None:
    notes = ["Two infected areas, upper left lung and lower right lung.", "One area, middle right lung."]
    tok = NoteTokenizer.train(notes * 5, max_len=12, vocab_size=400)
    ids, mask = tok(["One area.", " ".join(notes * 3)])
    assert ids.shape == mask.shape == (2, 12) and ids.dtype == torch.int64 and mask.dtype == torch.bool
    assert mask[1].all() and not mask[0].all()
    assert (ids[0][~mask[0]] == tok.pad_id).all()
    n = int(mask[0].sum())
    assert mask[0, :n].all()  # valid tokens form a prefix
    assert ids[1, -1] == tok.token_id("<|endoftext|>")  # truncation keeps the end token
    again = NoteTokenizer.from_state(tok.to_state())
    assert torch.equal(again(notes)[0], tok(notes)[0])
    with pytest.raises(TypeError, match="sequence of strings"):
        tok("a single note")
    with pytest.raises(ValueError, match="every note is empty"):
        NoteTokenizer.train(["", " "], max_len=8)


def test_profile_json_matches_paper_figures(capsys) -> None:
    """The QaTa recipe against the official code counted with fvcore: 23.8 GFLOPs and 18.4M parameters at
    inference, 42.1M running training-only parameters (two 4+4 reconstructors)."""
    recipe = str(ROOT / "configs" / "qata_paper.yaml")
    args = ["profile", "--config", recipe, "--image-size", "224", "--tokens", "18", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert abs(result["gflops_inference"] - 23.8) / 23.8 < 0.05
    assert abs(result["params_inference_m"] - 18.4) / 18.4 < 0.10
    assert abs(result["params_training_only_m"] - 42.1) / 42.1 < 0.05
    assert result["recon_layers"] == "4+4" and result["preset"] == "qata_paper"
    assert result["params_text_encoder_m"] > 30  # a 12-layer, 512-wide CLIP text tower


def test_profile_table(capsys) -> None:
    assert main(["profile", "--preset", "tiny", "--image-size", "64", "--tokens", "10"]) == 0
    assert "inference FLOPs" in capsys.readouterr().out


def test_profile_bad_size_is_a_clear_error(capsys) -> None:
    assert main(["profile", "--preset", "tiny", "--image-size", "70"]) == 2
    assert "image_size must be a positive multiple of 16" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("recipe", "layers", "w_dropout", "img_ratio"),
    [("qata_paper", 4, 0.0, 0.5), ("mosmed_paper", 3, 0.5, 0.3), ("monuseg_paper", 3, 0.5, 0.5)],
)
def test_paper_recipes_hold_the_official_values(recipe, layers, w_dropout, img_ratio) -> None:
    model, train = load_recipe(ROOT / "configs" / f"{recipe}.yaml")
    assert (model.recon_memory_layers, model.recon_layers, model.recon_heads) == (layers, layers, 4)
    assert (model.recon_dropout, model.w_head_dropout, model.img_mask_ratio) == (0.1, w_dropout, img_ratio)
    w = model.loss_weights
    assert (w.v2t, w.t2v, w.ccl, w.seg, w.dice, w.bce) == (1.0, 1.0, 0.2, 5.0, 0.5, 0.5)
    assert model.dice_squared and train.weight_decay == 0.0 and train.mask_resize == "bilinear"


def reclmis_imports(module: str) -> set[str]:
    """Every ``reclmis`` module that importing ``module`` loads, read from the sources (the import
    statements of each module and of the packages above it), without importing anything."""
    import ast

    package_root = ROOT / "reclmis"
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # a module's parent packages are imported first
            prefix = ".".join(parts[:depth])
            if prefix in seen:
                continue
            path = package_root.joinpath(*parts[1:depth])
            source = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
            if not source.is_file():
                continue
            seen.add(prefix)
            for node in ast.walk(ast.parse(source.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("reclmis"):
                    todo += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
                elif isinstance(node, ast.Import):
                    todo += [alias.name for alias in node.names if alias.name.startswith("reclmis")]
    return seen


def test_model_and_data_know_nothing_of_each_other() -> None:
    """The model takes token ids (its tokenizer sits beside the text encoder); the trainer joins the two."""
    model, data = reclmis_imports("reclmis.model"), reclmis_imports("reclmis.data")
    assert "reclmis.model.tokenizer" in model and "reclmis.ops.conditioned_attention" in model
    assert not {m for m in model if m.startswith("reclmis.data")}
    assert not {m for m in data if m.startswith("reclmis.model")}
    trainer = reclmis_imports("reclmis.train.trainer")
    assert "reclmis.data.dataset" in trainer and "reclmis.model.reclmis" in trainer


def test_profile_defaults_and_recipe_override(capsys) -> None:
    assert main(["profile", "--preset", "tiny", "--image-size", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 18 and result["recon_layers"] == "3+3" and result["preset"] == "tiny"


def test_profile_of_a_text_off_recipe(tmp_path, capsys) -> None:
    """The image-only ablation has no text encoder, interaction or reconstructors to count."""
    recipe = tmp_path / "no_text.yaml"
    recipe.write_text("model: {preset: tiny, use_text: false}\ntrain: {}\n")
    assert main(["profile", "--config", str(recipe), "--json"]) == 0
    profile = json.loads(capsys.readouterr().out)
    assert profile["params_text_encoder_m"] == profile["params_training_only_m"] == 0
    assert profile["params_inference_m"] > 0 and profile["gflops_inference"] > 0
