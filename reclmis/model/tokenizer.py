"""Tokenizer for clinical notes: a byte-level BPE trained on the training notes, or the tokenizer of a
pretrained text model. Either way a ``tokenizers.Tokenizer`` with begin/end tokens,
fixed-length padding and truncation; it is serialised into every checkpoint."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

BOS, EOS, PAD = "<|startoftext|>", "<|endoftext|>", "<|pad|>"


class NoteTokenizer:
    """Turns notes into ``input_ids`` (B, L) int64 and ``attention_mask`` (B, L) bool (True = token)."""

    def __init__(self, tokenizer: Tokenizer, max_len: int, pad_token: str = PAD) -> None:
        if max_len < 2:
            raise ValueError(f"max_len must be at least 2 (begin and end tokens), got {max_len}")
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"the tokenizer has no padding token {pad_token!r}")
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.pad_token = pad_token
        self.pad_id = pad_id
        tokenizer.enable_truncation(max_length=max_len)
        tokenizer.enable_padding(length=max_len, pad_id=pad_id, pad_token=pad_token)

    @classmethod
    def train(cls, notes: Iterable[str], max_len: int, vocab_size: int = 4096) -> NoteTokenizer:
        """Train a lower-cased byte-level BPE on ``notes``."""
        tokenizer = Tokenizer(models.BPE())
        tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[PAD, BOS, EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        notes = [note for note in notes if note.strip()]
        if not notes:
            raise ValueError("cannot train a tokenizer without notes: every note is empty")
        tokenizer.train_from_iterator(notes, trainer=trainer)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}",
            special_tokens=[(BOS, tokenizer.token_to_id(BOS)), (EOS, tokenizer.token_to_id(EOS))],
        )
        return cls(tokenizer, max_len)

    @classmethod
    def placeholder(cls, vocab_size: int, max_len: int) -> NoteTokenizer:
        """A word-level tokenizer of ``vocab_size`` entries with no learned vocabulary: for profiling and
        shape checks, where only the vocabulary size matters."""
        specials = [PAD, BOS, EOS, "<|unk|>"]
        if vocab_size < len(specials):
            raise ValueError(f"vocab_size must be at least {len(specials)}, got {vocab_size}")
        vocab = {tok: i for i, tok in enumerate(specials + [f"<|unused{i}|>" for i in range(vocab_size - 4)])}
        tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
        )
        return cls(tokenizer, max_len)

    @classmethod
    def from_pretrained(
        cls, source: str | Path, max_len: int, trust_remote_code: bool = False
    ) -> NoteTokenizer:
        """The fast tokenizer of a pretrained text model: a local directory (``tokenizer.json``) or a hub
        id (see ``reclmis.model.text_encoder.resolve_source``)."""
        from transformers import AutoTokenizer

        from reclmis.model.text_encoder import TextEncoderError, resolve_source

        source, local = resolve_source(str(source))
        try:
            hf = AutoTokenizer.from_pretrained(
                source, local_files_only=local, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as err:
            raise TextEncoderError(f"text_encoder={source}: its tokenizer cannot be loaded: {err}") from err
        if not getattr(hf, "is_fast", False):
            raise TextEncoderError(f"text_encoder={source}: a fast tokenizer (tokenizer.json) is required")
        pad = hf.pad_token or hf.eos_token
        if pad is None:
            raise TextEncoderError(
                f"text_encoder={source}: the tokenizer defines neither a padding nor an end token"
            )
        return cls(Tokenizer.from_str(hf.backend_tokenizer.to_str()), max_len, pad_token=pad)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def __call__(self, notes: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(notes, str):
            raise TypeError("notes must be a sequence of strings, not a single string")
        encodings = self.tokenizer.encode_batch(list(notes))
        input_ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
        attention_mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.bool)
        return input_ids, attention_mask

    def overlong(self, notes: Sequence[str]) -> list[str]:
        """The notes of ``notes`` that have more than ``max_len`` tokens (truncated by ``__call__``)."""
        encodings = self.tokenizer.encode_batch(list(notes))
        return [note for note, e in zip(notes, encodings, strict=True) if e.overflowing]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def tokens(self, note: str) -> list[str]:
        """The readable tokens of one note (special tokens included, padding excluded)."""
        encoding = self.tokenizer.encode(note)
        return [
            self.tokenizer.decode([i], skip_special_tokens=False).strip() or tok
            for i, tok, m in zip(encoding.ids, encoding.tokens, encoding.attention_mask, strict=True)
            if m
        ]

    def to_state(self) -> dict[str, object]:
        return {
            "tokenizer_json": self.tokenizer.to_str(),
            "max_len": self.max_len,
            "pad_token": self.pad_token,
        }

    @classmethod
    def from_state(cls, state: dict[str, object]) -> NoteTokenizer:
        return cls(
            Tokenizer.from_str(str(state["tokenizer_json"])), int(state["max_len"]), str(state["pad_token"])
        )
