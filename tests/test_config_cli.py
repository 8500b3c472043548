"""Configuration presets and recipes, the tokenizer, and the profile command."""

from __future__ import annotations

import json

import pytest
import torch

from reclmis.cli import main
from reclmis.config import PRESETS, RecLMISConfig, TrainConfig, load_recipe
from reclmis.data.tokenizer import NoteTokenizer


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
    assert main(["profile", "--preset", "paper", "--image-size", "224", "--tokens", "18", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert abs(result["gflops_inference"] - 23.8) / 23.8 < 0.05
    assert abs(result["params_inference_m"] - 18.4) / 18.4 < 0.10
    assert result["params_training_only_m"] > 5
    assert result["params_text_encoder_m"] > 30  # a 12-layer, 512-wide CLIP text tower


def test_profile_table(capsys) -> None:
    assert main(["profile", "--preset", "tiny", "--image-size", "64", "--tokens", "10"]) == 0
    assert "inference FLOPs" in capsys.readouterr().out


def test_profile_bad_size_is_a_clear_error(capsys) -> None:
    assert main(["profile", "--preset", "tiny", "--image-size", "70"]) == 2
    assert "image_size must be a positive multiple of 16" in capsys.readouterr().err
