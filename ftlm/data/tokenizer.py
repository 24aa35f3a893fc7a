"""Byte-level BPE tokenizer: train, reuse, extend, and the small interface the rest of ftlm uses.

Byte-level means every input byte has a token, so no text can ever produce an unknown token (WordPiece drops a
whole word when it meets a rare syllable such as 똻; this cannot). The normaliser is NFC, so decomposed Hangul
jamo and precomposed syllables encode the same. The whole tokenizer, special tokens included, is one
`tokenizer.json` that `transformers.PreTrainedTokenizerFast(tokenizer_file=...)` loads as is.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from functools import lru_cache

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

EOT = "<|endoftext|>"
PAD = "<|pad|>"


@lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable stand-in character of each byte -> the byte."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


class Tokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` that always has `<|endoftext|>` and `<|pad|>`."""

    def __init__(self, tokenizer: _HFTokenizer):
        missing = [t for t in (EOT, PAD) if tokenizer.token_to_id(t) is None]
        if missing:
            tokenizer.add_special_tokens(missing)
        # Text that happens to contain "<|endoftext|>" is data, not a document boundary.
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        self.eot_id: int = tokenizer.token_to_id(EOT)
        self.pad_id: int = tokenizer.token_to_id(PAD)

    # -- loading and saving ------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str) -> Tokenizer:
        path = os.path.expanduser(str(path))
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        return cls(_HFTokenizer.from_file(path))

    def save(self, path: str) -> None:
        path = os.path.expanduser(str(path))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        self._tok.save(tmp)
        os.replace(tmp, path)

    def to_str(self) -> str:
        return self._tok.to_str()

    @property
    def backend(self) -> _HFTokenizer:
        return self._tok

    # -- the interface used by training and evaluation --------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def special_tokens(self) -> list[str]:
        return [t.content for t in self._tok.get_added_tokens_decoder().values() if t.special]

    def is_byte_level(self) -> bool:
        return isinstance(self._tok.pre_tokenizer, pre_tokenizers.ByteLevel) or isinstance(
            self._tok.decoder, decoders.ByteLevel
        )

    def token_byte_lengths(self):
        """LongTensor[vocab_size]: UTF-8 bytes each token stands for (0 for special tokens), for bits per byte."""
        import torch

        lengths = torch.zeros(self.vocab_size, dtype=torch.long)
        specials = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        byte_of = _byte_of_char() if self.is_byte_level() else None
        added = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()}
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            if i in specials or i >= self.vocab_size:
                continue
            if i in added:
                lengths[i] = len(added[i].encode("utf-8"))
            elif byte_of is not None and all(c in byte_of for c in token):
                lengths[i] = len(token)  # one stand-in character per byte
            else:
                lengths[i] = len(self._tok.decode([i]).encode("utf-8"))
        return lengths


# -- training ------------------------------------------------------------------------------------------------
def _new_byte_level_bpe() -> _HFTokenizer:
    tok = _HFTokenizer(models.BPE())  # no unk_token: every byte is in the alphabet
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    extra_special_tokens: Sequence[str] = (),
    length: int | None = None,
    show_progress: bool = True,
) -> Tokenizer:
    specials = list(dict.fromkeys([EOT, PAD, *extra_special_tokens]))
    if vocab_size < 256 + len(specials) + 1:
        raise ValueError(
            f"data.tokenizer.vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
            f"256 byte tokens plus {len(specials)} special tokens"
        )
    tok = _new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return Tokenizer(tok)


def add_special_tokens(tokenizer: Tokenizer, tokens: Sequence[str]) -> Tokenizer:
    missing = [t for t in tokens if tokenizer.backend.token_to_id(t) is None]
    if missing:
        tokenizer.backend.add_special_tokens(missing)
    return tokenizer


def extend_tokenizer(
    base: Tokenizer,
    texts: Iterable[str],
    new_vocab_size: int,
    min_frequency: int = 2,
    length: int | None = None,
    show_progress: bool = True,
) -> Tokenizer:
    """Add the tokens a BPE trained on `texts` has and `base` lacks (the Llama-2-Ko recipe).

    Every existing token keeps its id, so a model trained with `base` keeps its embeddings; new tokens and their
    merges are appended after the last id. Only byte-level BPE tokenizers can be extended this way, because the
    merged strings of both vocabularies must be spelled in the same byte alphabet.
    """
    base_json = json.loads(base.to_str())
    model = base_json.get("model") or {}
    if model.get("type") != "BPE" or not base.is_byte_level():
        raise ValueError("data.tokenizer.extend_from: only byte-level BPE tokenizers (GPT-2 style) can be extended")
    learned = train_tokenizer(texts, new_vocab_size, min_frequency, length=length, show_progress=show_progress)
    learned_merges = json.loads(learned.to_str())["model"]["merges"]

    vocab: dict[str, int] = model["vocab"]
    merges: list = model["merges"]
    as_strings = bool(merges) and isinstance(merges[0], str)
    taken = set(vocab.values()) | {t["id"] for t in base_json.get("added_tokens", [])}
    next_id = max(taken) + 1
    added = 0
    for merge in learned_merges:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merged = left + right
        if merged in vocab or left not in vocab or right not in vocab:
            continue
        vocab[merged] = next_id
        next_id += 1
        added += 1
        merges.append(f"{left} {right}" if as_strings else [left, right])
    if base_json.get("normalizer") is None:
        base_json["normalizer"] = json.loads(normalizers.NFC().__getstate__())  # NFC like every ftlm tokenizer
    logger.info("extended the tokenizer with %d new tokens (%d -> %d)", added, base.vocab_size, base.vocab_size + added)
    return Tokenizer(_HFTokenizer.from_str(json.dumps(base_json, ensure_ascii=False)))
