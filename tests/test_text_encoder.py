"""Pretrained text encoders: CLIP text towers, the BERT family, models with their own code; every weight
loaded or an error; padding invariance; frozen by default; features cached per note; checkpoints that
need no pretrained directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import NOTES
from reclmis.cli import main
from reclmis.config import RecLMISConfig, TrainConfig
from reclmis.data import make_synthetic
from reclmis.model import NoteTokenizer, RecLMIS, TextEncoder, TextEncoderError, TextFeatureCache
from reclmis.train import Trainer, load_checkpoint, model_from_checkpoint


def encoder_and_tokenizer(path: Path, max_len: int = 24) -> tuple[TextEncoder, NoteTokenizer]:
    return TextEncoder.from_pretrained(path, max_len), NoteTokenizer.from_pretrained(path, max_len)


def pretrained_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_clip_text_dir", "tiny_clip_dir", "minilm_dir"])
def test_every_pretrained_weight_is_loaded(fixture: str, request) -> None:
    path = request.getfixturevalue(fixture)
    encoder, tokenizer = encoder_and_tokenizer(path)
    saved = pretrained_tensors(path)
    loaded = encoder.model.state_dict()
    prefix = "text_model." if fixture == "tiny_clip_dir" else ""  # the text half of a full CLIP model
    for name, value in loaded.items():
        if name.endswith("position_ids"):
            continue  # a buffer, not a weight
        torch.testing.assert_close(value, saved[prefix + name], rtol=0, atol=0, msg=name)
    assert encoder.frozen and not any(p.requires_grad for p in encoder.parameters())
    assert encoder.width == encoder.model.config.hidden_size
    ids, mask = tokenizer(NOTES)
    assert encoder(ids, mask).shape == (len(NOTES), 24, encoder.width)


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_clip_text_dir", "minilm_dir"])
def test_padding_never_changes_a_valid_tokens_feature(fixture: str, request) -> None:
    """The same notes padded to two lengths give the same features: a bidirectional model under its
    attention mask (BERT, MiniLM) and a causal one (CLIP)."""
    path = request.getfixturevalue(fixture)
    encoder = TextEncoder.from_pretrained(path, 40)
    short, long = NoteTokenizer.from_pretrained(path, 24), NoteTokenizer.from_pretrained(path, 40)
    (ids_s, mask_s), (ids_l, mask_l) = short(NOTES), long(NOTES)
    assert torch.equal(mask_s, mask_l[:, :24]) and not mask_l[:, 24:].any()
    features_s, features_l = encoder(ids_s, mask_s), encoder(ids_l, mask_l)
    # different lengths sum in another order: float noise of ~1e-6, where a padding leak moves features by ~1e-1
    torch.testing.assert_close(features_s, features_l[:, :24], rtol=1e-4, atol=1e-5)
    assert (features_l[:, 24:] == 0).all() and (features_s[~mask_s] == 0).all()


def copy_model(path: Path, tmp_path: Path) -> Path:
    copy = tmp_path / path.name
    shutil.copytree(path, copy)
    return copy


def test_weights_of_another_architecture_are_refused(tiny_bert_dir, tiny_clip_text_dir, tmp_path) -> None:
    """BERT weights under a CLIP config.json (the silent case of a CLIP loader reading a BERT directory)."""
    wrong = copy_model(tiny_bert_dir, tmp_path)
    shutil.copy(tiny_clip_text_dir / "config.json", wrong / "config.json")
    with pytest.raises(TextEncoderError, match=rf"{wrong}.*CLIPTextModel.*missing \(embeddings\."):
        TextEncoder.from_pretrained(wrong, 24)


def test_missing_and_misshapen_tensors_are_refused(tiny_bert_dir, tmp_path) -> None:
    missing = copy_model(tiny_bert_dir, tmp_path / "missing")
    tensors = pretrained_tensors(missing)
    del tensors["encoder.layer.1.attention.self.query.weight"]
    save_file(tensors, missing / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        TextEncoderError, match=r"1 missing \(encoder\.layer\.1\.attention\.self\.query\.weight\)"
    ):
        TextEncoder.from_pretrained(missing, 24)

    misshapen = copy_model(tiny_bert_dir, tmp_path / "misshapen")
    config = json.loads((misshapen / "config.json").read_text())
    (misshapen / "config.json").write_text(json.dumps(config | {"intermediate_size": 48}))
    with pytest.raises(TextEncoderError, match=rf"{misshapen}: its weights do not fit"):
        TextEncoder.from_pretrained(misshapen, 24)


def test_bad_sources_are_clear_errors(tiny_bert_dir, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no such directory"):
        TextEncoder.from_pretrained(tmp_path / "absent", 24)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TextEncoderError, match="not a Hugging Face model directory"):
        TextEncoder.from_pretrained(tmp_path / "empty", 24)
    with pytest.raises(TextEncoderError, match="exceeds the 64 positions"):
        TextEncoder.from_pretrained(tiny_bert_dir, 65)


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
        env={**os.environ, **env},
    )  # fmt: skip


def test_a_hub_id_without_network_says_how_to_save_it_locally(tmp_path) -> None:
    result = _run_python(
        """
        from reclmis.model import TextEncoder, TextEncoderError
        try:
            TextEncoder.from_pretrained("microsoft/BiomedVLP-CXR-BERT-specialized", 10)
        except TextEncoderError as err:
            print(err)
        """,
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert "could not be fetched from the Hugging Face hub" in result.stdout
    assert "save_pretrained('DIR')" in result.stdout and "--text-encoder DIR" in result.stdout


REMOTE_CONFIG = """
from transformers import PretrainedConfig

class NoteConfig(PretrainedConfig):
    model_type = "note_encoder"

    def __init__(self, vocab_size=50, hidden_size=16, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        super().__init__(**kwargs)
"""
REMOTE_MODEL = """
import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput
from .configuration_note import NoteConfig

class NoteModel(PreTrainedModel):
    config_class = NoteConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.post_init()

    def forward(self, input_ids, attention_mask=None):
        return BaseModelOutput(last_hidden_state=self.embed(input_ids))
"""


def test_a_model_with_its_own_code_needs_trust_remote_code(tiny_bert_dir, tmp_path) -> None:
    """As CXR-BERT: config.json maps AutoModel to code in the directory, run only when trusted, and a
    checkpoint of such a model rebuilds it from its source."""
    path = tmp_path / "note-encoder"
    path.mkdir()
    (path / "configuration_note.py").write_text(REMOTE_CONFIG)
    (path / "modeling_note.py").write_text(REMOTE_MODEL)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_bert_dir / name, path / name)
    auto_map = {"AutoConfig": "configuration_note.NoteConfig", "AutoModel": "modeling_note.NoteModel"}
    config = {"model_type": "note_encoder", "vocab_size": 50, "hidden_size": 16, "auto_map": auto_map}
    (path / "config.json").write_text(json.dumps(config | {"architectures": ["NoteModel"]}))
    save_file({"embed.weight": torch.randn(50, 16)}, path / "model.safetensors", metadata={"format": "pt"})
    result = _run_python(
        f"""
        import torch
        from reclmis.model import TextEncoder, TextEncoderError
        try:
            TextEncoder.from_pretrained({str(path)!r}, 12)
        except TextEncoderError as err:
            print("refused:", err)
        trusted = TextEncoder.from_pretrained({str(path)!r}, 12, trust_remote_code=True)
        rebuilt = TextEncoder.from_spec(trusted.spec(), frozen=True, trust_remote_code=True)
        rebuilt.load_state_dict(trusted.state_dict())
        ids, mask = torch.tensor([[2, 7, 3, 0]]), torch.tensor([[True, True, True, False]])
        print("features:", tuple(trusted(ids, mask).shape), torch.equal(trusted(ids, mask), rebuilt(ids, mask)))
        try:
            TextEncoder.from_spec(trusted.spec(), frozen=True)
        except TextEncoderError as err:
            print("spec refused:", err)
        """,
        HF_HOME=str(tmp_path / "hf"),
    )
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout and "--trust-remote-code" in result.stdout
    assert "features: (1, 4, 16) True" in result.stdout
    assert "spec refused:" in result.stdout and "runs its own code" in result.stdout


def test_the_cache_returns_the_encoders_features_and_evicts_the_least_recent(tiny_bert_dir) -> None:
    encoder, tokenizer = encoder_and_tokenizer(tiny_bert_dir)
    cache = TextFeatureCache(encoder, capacity=3)
    ids, mask = tokenizer(NOTES)
    first = cache(ids[:3], mask[:3], torch.device("cpu"))
    torch.testing.assert_close(first, encoder(ids[:3], mask[:3]))
    assert cache.computed == 3 and len(cache) == 3
    again = cache(ids[[2, 0, 0]], mask[[2, 0, 0]], torch.device("cpu"))
    torch.testing.assert_close(again, first[[2, 0, 0]], rtol=0, atol=0)
    assert cache.computed == 3  # nothing recomputed
    cache(ids[3:], mask[3:], torch.device("cpu"))  # evicts note 1, the least recently used
    assert cache.computed == 4 and len(cache) == 3
    cache(ids[[0, 2, 3]], mask[[0, 2, 3]], torch.device("cpu"))
    assert cache.computed == 4
    cache(ids[1:2], mask[1:2], torch.device("cpu"))
    assert cache.computed == 5
    with pytest.raises(ValueError, match="4 distinct notes, more than the cache's 3"):
        cache(ids, mask, torch.device("cpu"))
    short = NoteTokenizer.from_pretrained(tiny_bert_dir, 20)(NOTES[:2])  # another padded length
    torch.testing.assert_close(cache(*short, torch.device("cpu")), encoder(*short), rtol=1e-5, atol=1e-6)


def test_only_a_frozen_encoder_is_cached(tiny_bert_dir) -> None:
    with pytest.raises(ValueError, match="only a frozen text encoder"):
        TextFeatureCache(TextEncoder.from_pretrained(tiny_bert_dir, 24, frozen=False))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("data"), size=32, n_train=16, n_val=8, n_test=8, seed=3)


TINY = ["--preset", "tiny", "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--workers", "0",
        "--device", "cpu", "--set", "train.log_every=1", "--set", "model.base_channels=8",
        "--set", "model.max_text_len=24"]  # fmt: skip


def train_evaluate_predict_without_the_directory(
    source: Path, synthetic: Path, tmp_path: Path, capsys
) -> None:
    """Train with a copy of ``source`` as --text-encoder, delete the copy, then evaluate and predict."""
    copy = copy_model(source, tmp_path / "encoder")
    run = tmp_path / "run"
    code = main(["train", "--data", str(synthetic), "--out", str(run), "--text-encoder", str(copy), *TINY])
    assert code == 0, capsys.readouterr().err
    architecture = json.loads((copy / "config.json").read_text())["architectures"][0]
    assert f"text encoder: {architecture} from {copy}" in capsys.readouterr().out
    state = load_checkpoint(run / "best.pt")
    saved = pretrained_tensors(copy)
    for name, value in saved.items():
        if not name.startswith("pooler.") and not name.endswith("position_ids"):  # weights, not buffers
            torch.testing.assert_close(state["model"]["text_encoder.model." + name], value, rtol=0, atol=0)
    shutil.rmtree(copy)
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(synthetic),
                 "--device", "cpu", "--json", str(tmp_path / "test.json")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "test.json").read_text())["n"] == 8
    image = next((synthetic / "Test_Folder" / "img").iterdir())
    assert main(["predict", "--checkpoint", str(run / "best.pt"), "--image", str(image), "--text", NOTES[0],
                 "--out", str(tmp_path / "mask.png"), "--device", "cpu"]) == 0  # fmt: skip
    assert (tmp_path / "mask.png").is_file()


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_clip_text_dir"])
def test_cli_with_a_pretrained_directory(fixture: str, synthetic, tmp_path, capsys, request) -> None:
    train_evaluate_predict_without_the_directory(
        request.getfixturevalue(fixture), synthetic, tmp_path, capsys
    )


def test_cli_with_the_real_minilm(minilm_dir, synthetic, tmp_path, capsys) -> None:
    train_evaluate_predict_without_the_directory(minilm_dir, synthetic, tmp_path, capsys)


def test_a_training_step_leaves_a_frozen_tower_unchanged_and_runs_it_once_per_note(
    tiny_clip_text_dir, synthetic, tmp_path
) -> None:
    model_config = RecLMISConfig.preset(
        "tiny", image_size=32, base_channels=8, text_encoder=str(tiny_clip_text_dir), max_text_len=24
    )
    train_config = TrainConfig(epochs=1, batch_size=8, num_workers=0, device="cpu", augment="none")
    trainer = Trainer(model_config, train_config, synthetic, tmp_path / "run", progress=False)
    before = {k: v.clone() for k, v in trainer.model.text_encoder.state_dict().items()}
    trainer.fit()
    for name, value in trainer.model.text_encoder.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    notes = set(trainer.train_set.texts) | set(trainer.val_set.texts)
    assert trainer.text_cache.computed == len(notes)  # once per distinct note, training and validation
    assert "its features cached per note" in trainer.text_encoder_summary()
    model, _ = model_from_checkpoint(tmp_path / "run" / "last.pt")
    assert model.text_encoder.frozen and model.text_encoder.source == str(tiny_clip_text_dir)


def test_fine_tuning_a_pretrained_tower(tiny_bert_dir) -> None:
    config = RecLMISConfig.preset("tiny", text_encoder=str(tiny_bert_dir), freeze_text_encoder=False)
    model = RecLMIS.build(config).train()
    assert not model.text_encoder.frozen and all(p.requires_grad for p in model.text_encoder.parameters())
    images, masks = torch.rand(2, 3, 64, 64), (torch.rand(2, 1, 64, 64) > 0.5).float()
    ids, mask = model.tokenize(NOTES[:2])
    model(images, ids, mask, masks).losses["total"].backward()
    assert model.text_encoder.model.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_cached_features_give_the_models_own_output(tiny_bert_dir) -> None:
    config = RecLMISConfig.preset("tiny", text_encoder=str(tiny_bert_dir), ops_backend="reference")
    model = RecLMIS.build(config).eval()
    images = torch.rand(2, 3, 64, 64)
    ids, mask = model.tokenize(NOTES[2:])
    features = TextFeatureCache(model.text_encoder)(ids, mask, torch.device("cpu"))
    with torch.no_grad():
        direct = model(images, ids, mask).logits
        cached = model(images, ids, mask, text_features=features).logits
    torch.testing.assert_close(cached, direct, rtol=0, atol=0)


def test_truncated_training_notes_are_named_in_a_warning(tiny_bert_dir, synthetic, tmp_path) -> None:
    model_config = RecLMISConfig.preset(
        "tiny", image_size=32, text_encoder=str(tiny_bert_dir), max_text_len=10
    )
    train_config = TrainConfig(epochs=1, batch_size=8, num_workers=0, device="cpu")
    with pytest.warns(
        UserWarning, match=r"of the \d+ distinct training notes have more than max_text_len=10"
    ):
        Trainer(model_config, train_config, synthetic, tmp_path / "run", progress=False)
