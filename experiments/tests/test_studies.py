"""The accuracy studies' plumbing: gathering results files, the models' own diagnoses, the demo's record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _run_file(path: Path, commit: str, rows: list[dict], **top) -> str:
    payload = {"environment": {"git_commit": commit}, "recipe": "monuseg_cpu.yaml", "rows": rows} | top
    path.write_text(json.dumps(payload))
    return str(path)


def _monuseg_row(variant: str, seed: int, dice: float) -> dict:
    score = {"dice": dice, "iou": dice - 0.1, "n": 14}
    return {"variant": variant, "seed": seed, "test": score, "test_last": score}


def test_monuseg_combine_keeps_each_runs_environment_and_summarises_over_seeds(tmp_path) -> None:
    from experiments.monuseg_cpu import combine

    paths = [
        _run_file(tmp_path / "a.json", "aaa", [_monuseg_row("reclmis", 0, 0.70)]),
        _run_file(tmp_path / "b.json", "bbb", [_monuseg_row("reclmis", 1, 0.80)]),
        _run_file(tmp_path / "c.json", "ccc", [_monuseg_row("no_text", 0, 0.75)]),
    ]
    payload = combine(paths)
    assert [row["environment"]["git_commit"] for row in payload["rows"]] == ["aaa", "bbb", "ccc"]
    assert list(payload["variants"]) == ["reclmis", "no_text"]
    assert payload["variants"]["no_text"] == {"model": {"use_text": False}, "train": {}}
    dice = payload["summary"]["reclmis"]["test"]["dice"]
    assert dice["mean"] == 0.75 and abs(dice["std"] - 0.0707107) < 1e-6  # sample std of 0.70 and 0.80
    assert payload["summary"]["no_text"]["test_last"]["dice"] == {"mean": 0.75, "std": 0.0}


def test_combine_refuses_a_run_twice_and_another_recipe(tmp_path) -> None:
    from experiments.monuseg_cpu import combine

    first = _run_file(tmp_path / "a.json", "aaa", [_monuseg_row("reclmis", 0, 0.70)])
    again = _run_file(tmp_path / "b.json", "bbb", [_monuseg_row("reclmis", 0, 0.71)])
    with pytest.raises(ValueError, match=r"more than one file.*'reclmis', 0"):
        combine([first, again])
    other = _run_file(tmp_path / "c.json", "ccc", [_monuseg_row("no_text", 0, 0.75)], recipe="other.yaml")
    with pytest.raises(ValueError, match=r"c\.json: not the same recipe as"):
        combine([first, other])


def test_note_following_combine_checks_the_seed_and_refuses_a_variant_twice(tmp_path) -> None:
    from experiments.note_following import combine

    row = {"variant": "reclmis", "test": {"dice": 0.8}}
    seed0 = _run_file(tmp_path / "a.json", "aaa", [row], recipe="synthetic_tiny.yaml", seed=0)
    seed1 = _run_file(tmp_path / "b.json", "bbb", [row], recipe="synthetic_tiny.yaml", seed=1)
    assert combine([seed0])["rows"][0]["environment"] == {"git_commit": "aaa"}
    with pytest.raises(ValueError, match=r"b\.json: not the same seed as"):
        combine([seed0, seed1])
    with pytest.raises(ValueError, match=r"more than one file: \['reclmis'\]"):
        combine([seed0, seed0])


def test_monuseg_diagnosis_combine_keeps_each_rows_environment(tmp_path) -> None:
    from experiments.monuseg_diagnosis import combine

    first = _run_file(tmp_path / "a.json", "aaa", [{"run": "reclmis-seed0"}, {"run": "no_text-seed0"}])
    second = _run_file(tmp_path / "b.json", "bbb", [{"run": "reclmis-seed1"}])
    rows = combine([first, second])["rows"]
    assert [(row["run"], row["environment"]["git_commit"]) for row in rows] == [
        ("reclmis-seed0", "aaa"),
        ("no_text-seed0", "aaa"),
        ("reclmis-seed1", "bbb"),
    ]
    gathered = tmp_path / "all.json"
    gathered.write_text(json.dumps({"rows": rows}))
    assert combine([str(gathered)])["rows"] == rows  # a gathered file gathers again
    with pytest.raises(ValueError, match=r"more than one file: \['no_text-seed0', 'reclmis-seed0'\]"):
        combine([first, first])


@pytest.mark.parametrize("norm", [False, True])
def test_monuseg_diagnosis_reads_ci_from_the_models_own_forward(norm: bool) -> None:
    from experiments.monuseg_diagnosis import ci_scales
    from reclmis.config import RecLMISConfig
    from reclmis.model import RecLMIS

    torch.manual_seed(0)
    notes = ["The nuclei density in the upper right is high.", "Nuclei are sparse on the left."]
    config = RecLMISConfig.preset("tiny", ops_backend="reference", interaction_norm=norm)
    model = RecLMIS.build(config, notes).train()
    images = torch.randn(2, 3, 64, 64)
    scales = ci_scales(model, images, notes)
    assert model.training  # the diagnosis restores the mode it found
    model.eval()
    with torch.no_grad():
        ci, stage4 = model.interaction, model.encoder(images)[-1]
        v = ci.patch_embedding(stage4).flatten(2).transpose(1, 2) + ci.position_embedding
    assert scales["rms_stage4"] == pytest.approx(stage4.pow(2).mean().sqrt().item(), rel=1e-5)
    assert scales["rms_V"] == pytest.approx(v.pow(2).mean().sqrt().item(), rel=1e-5)
    assert scales["ratio_mha_to_V"] == pytest.approx(scales["rms_mha_v_e"] / scales["rms_V"])
    if norm:  # a LayerNorm at its initial affine (1, 0): unit RMS per token
        assert scales["rms_mha_v_e"] == pytest.approx(1.0, abs=1e-3)


def test_aux_hundredth_is_the_demo_recipes_weights() -> None:
    """note_following's aux_hundredth row is what `make demo` trains with; both read the weights as floats."""
    from experiments.variants import auxiliary_weights
    from reclmis.config import LossWeights, load_recipe

    model_config, _ = load_recipe(ROOT / "configs" / "synthetic_tiny.yaml")
    assert LossWeights(**auxiliary_weights(100)) == model_config.loss_weights
    assert LossWeights(**auxiliary_weights()) == LossWeights()


def test_text_gradients_splits_the_text_towers_gradient_by_loss_term(tmp_path) -> None:
    from experiments.text_gradients import text_gradients
    from reclmis.data import make_synthetic

    data = make_synthetic(tmp_path / "data", n_train=16, n_val=4, n_test=4, seed=0)
    row = text_gradients(ROOT / "configs" / "synthetic_tiny.yaml", data, seed=0, batches=1)
    assert all(norm > 0 for norm in row["unweighted"].values()), row["unweighted"]
    official, tenth = row["weighted"]["official"], row["weighted"]["auxiliary_tenth"]
    assert tenth["auxiliary"] == pytest.approx(0.1 * official["auxiliary"], rel=1e-4)
    assert tenth["segmentation"] == pytest.approx(official["segmentation"], rel=1e-6)
    with pytest.raises(ValueError, match="fewer than 2 batches of 16"):
        text_gradients(ROOT / "configs" / "synthetic_tiny.yaml", data, seed=0, batches=2)


def test_demo_results_gathers_what_make_demo_wrote(tmp_path) -> None:
    from experiments.demo_results import demo_results

    score = {"dice": 0.9, "iou": 0.8, "n": 100, "notes": "own"}
    (tmp_path / "run").mkdir()
    (tmp_path / "counterfactual.json").write_text(json.dumps(score))
    (tmp_path / "run" / "metrics.csv").write_text("epoch,seconds,val_dice\n1,30,0.51234\n2,90,0.9\n")
    with pytest.raises(FileNotFoundError, match=r"test\.json"):
        demo_results(tmp_path)
    (tmp_path / "test.json").write_text(json.dumps(score | {"probe": score | {"dice": 0.3}}))
    payload = demo_results(tmp_path)
    assert payload["test"] == score and payload["test_shuffled_notes"]["dice"] == 0.3
    assert payload["val_dice_per_epoch"] == [0.5123, 0.9] and payload["train_minutes"] == 2.0
