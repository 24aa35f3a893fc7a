"""Tokenizers: train a byte-level BPE, reuse or extend one (also an imported SentencePiece-style one), and the small
interface the rest of ftlm uses.

Byte-level means every input byte has a token, so no text can ever produce an unknown token (WordPiece drops a
whole word when it meets a rare syllable such as 똻; this cannot). The normaliser is NFC, so decomposed Hangul
jamo and precomposed syllables encode the same. The whole tokenizer, special tokens included, is one
`tokenizer.json` that `transformers.PreTrainedTokenizerFast(tokenizer_file=...)` loads as is.

Imported tokenizers keep their own special tokens: the end-of-text token is the first of <|endoftext|>, </s>,
<|end_of_text|>, <eos> the tokenizer has (ftlm adds <|endoftext|> only when it has none), the padding token <|pad|> or
<pad> (else the end-of-text token; padding positions are never trained on). SentencePiece-style tokenizers (Llama-2,
Mistral, SOLAR: a BPE with byte fallback, spaces spelled "▁") also never produce an unknown token.

Text is data: a literal "<|endoftext|>" (or "</s>") inside a document is encoded as ordinary text, never as the
special id, so no document can forge a document boundary. The Hugging Face export does the same
(split_special_tokens=True).
"""

from __future__ import annotations

import json
import logging
import os
import unicodedata
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


# The special tokens of the tokenizers ftlm imports, by role, most preferred first.
EOT_NAMES = (EOT, "</s>", "<|end_of_text|>", "<eos>")
PAD_NAMES = (PAD, "<pad>")
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>")
SPACE = "\u2581"  # "▁", SentencePiece's spelling of a space


class Tokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` with an end-of-text id (eot_id) and a padding id (pad_id).

    A tokenizer with neither gets `<|endoftext|>` and `<|pad|>` added (ftlm's own tokenizers have both); an imported
    one keeps its own (see the module docstring), so its size, and the model's rows, do not change.
    """

    def __init__(self, tokenizer: _HFTokenizer):
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        eot = next((t for t in EOT_NAMES if t in vocab), None)
        pad = next((t for t in PAD_NAMES if t in vocab), None)
        if eot is None:
            missing = [EOT] + ([PAD] if pad is None else [])
            tokenizer.add_special_tokens(missing)
            eot, pad = EOT, pad or PAD
        # Text that happens to contain "<|endoftext|>" is data, not a document boundary.
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        # The library recounts its vocabulary on every get_vocab_size (~3 ms at 32k); a Tokenizer grows only through
        # add_special_tokens below (extending one builds a new one), so it is counted then.
        self._vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eot_id: int = tokenizer.token_to_id(eot)
        self.pad_id: int = tokenizer.token_to_id(pad) if pad is not None else self.eot_id
        bos = next((t for t in BOS_NAMES if t in vocab), None)
        self.bos_id: int | None = tokenizer.token_to_id(bos) if bos is not None else None
        # Llama-style tokenizers put BOS before every text (their post-processor's template); ftlm then starts every
        # document with it, as the model was trained and as Hugging Face inference feeds it.
        self.adds_bos: bool = self.bos_id is not None and tokenizer.encode("a").ids[:1] == [self.bos_id]

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
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    @property
    def document_start(self) -> list[int]:
        """What every document begins with before its text: [BOS] for a tokenizer that adds one, else nothing."""
        return [self.bos_id] if self.adds_bos else []

    @property
    def prefix_id(self) -> int:
        """The token text follows when nothing comes before it: BOS where the vocabulary has one, else end-of-text
        (the exported tokenizer's bos_token; what lm-eval starts an empty context from)."""
        return self.bos_id if self.bos_id is not None else self.eot_id

    def encode_document(self, text: str) -> list[int]:
        """A document's ids as training sees them: document_start, then the text's ids."""
        return self.document_start + self.encode(text)

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

    def has_byte_fallback(self) -> bool:
        """A BPE / Unigram that spells any character it lacks as <0xNN> byte tokens (all 256 present)."""
        model = json.loads(self._tok.to_str()).get("model") or {}
        if not model.get("byte_fallback"):
            return False
        vocab = self._tok.get_vocab(with_added_tokens=True)
        return all(f"<0x{b:02X}>" in vocab for b in range(256))

    def never_unknown(self) -> bool:
        """No input text can produce an unknown token (byte-level BPE, or byte fallback)."""
        return self.is_byte_level() or self.has_byte_fallback()

    def tokens_per_char(self, texts: Iterable[str]) -> float:
        """Tokens per character over `texts` (lower is a more compact tokenizer for that text)."""
        texts = list(texts)
        chars = sum(len(t) for t in texts)
        return sum(len(ids) for ids in self.encode_batch(texts)) / max(chars, 1)

    def token_byte_lengths(self):
        """LongTensor[vocab_size]: UTF-8 bytes each token stands for (0 for special tokens), for bits per byte."""
        import torch

        lengths = torch.zeros(self.vocab_size, dtype=torch.long)
        specials = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        byte_of = _byte_of_char() if self.is_byte_level() else None
        fallback = self.has_byte_fallback()
        added = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()}
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            if i in specials or i >= self.vocab_size:
                continue
            if i in added:
                lengths[i] = len(added[i].encode("utf-8"))
            elif byte_of is not None and all(c in byte_of for c in token):
                lengths[i] = len(token)  # one stand-in character per byte
            elif fallback and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                lengths[i] = 1  # a byte-fallback token is one byte of a character the vocabulary lacks
            elif fallback:
                # SentencePiece spells a space "▁"; the space it prepends to a text counts as one byte too
                lengths[i] = len(token.replace(SPACE, " ").encode("utf-8"))
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
        tokenizer._vocab_size = tokenizer.backend.get_vocab_size(with_added_tokens=True)
    return tokenizer


class TokenizerExtensionError(ValueError):
    """A tokenizer that cannot be extended; the message says why."""


def extend_tokenizer(
    base: Tokenizer,
    texts: Iterable[str],
    new_vocab_size: int,
    min_frequency: int = 2,
    length: int | None = None,
    show_progress: bool = True,
    multiple_of: int = 64,
) -> Tokenizer:
    """Add the tokens a tokenizer trained on `texts` has and `base` lacks (the Llama-2-Ko / EEVE recipe).

    Every existing token keeps its id, so a model trained with `base` keeps its embeddings; new tokens are appended
    after the last id. `new_vocab_size` is the size of the tokenizer the new tokens are learned from. Two kinds of
    base can be extended, because only they spell new tokens in an alphabet every text reaches:
        byte-level BPE (GPT-2 style): new merges in the byte alphabet;
        SentencePiece-style BPE with byte fallback (Llama-2, Mistral, SOLAR): new tokens in the base's own spelling
        ("▁" for a space), each containing a letter outside ASCII (Hangul here), so text without such letters
        (English, code) encodes to exactly the ids it had; single new characters need no merge, so Korean
        syllables the base spelled as <0xNN> bytes become tokens of their own.
    The number added is trimmed so the vocabulary ends on a multiple of `multiple_of` (no padding rows) where that
    keeps at least one new token. The tokens per character of the Korean part of the sample, before and after, are
    logged and kept in `extended.extension_stats`.
    """
    sample: list[str] = []

    def keep_sample(it):
        for text in it:
            if len(sample) < 2000:
                sample.append(text)
            yield text

    base_json = json.loads(base.to_str())
    model = base_json.get("model") or {}
    kind = model.get("type")
    if kind == "BPE" and base.is_byte_level():
        extended, added = _extend_byte_level(base_json, keep_sample(texts), new_vocab_size, min_frequency, length,
                                             show_progress, base.vocab_size, multiple_of)  # fmt: skip
    elif kind == "BPE" and base.has_byte_fallback():
        extended, added = _extend_sentencepiece(base, base_json, keep_sample(texts), new_vocab_size, min_frequency,
                                                length, show_progress, multiple_of)  # fmt: skip
    else:
        raise TokenizerExtensionError(_why_not_extensible(base, model))
    korean = [t for t in sample if _hangul_share(t) >= 0.3] or sample
    before, after = base.tokens_per_char(korean), extended.tokens_per_char(korean)
    logger.info(
        "extended the tokenizer with %d new tokens (%d -> %d); Korean tokens per character %.3f -> %.3f (x%.2f)",
        added, base.vocab_size, extended.vocab_size, before, after, after / max(before, 1e-9),
    )  # fmt: skip
    extended.extension_stats = {
        "added_tokens": added,
        "vocab_before": base.vocab_size,
        "vocab_after": extended.vocab_size,
        "korean_tokens_per_char_before": before,
        "korean_tokens_per_char_after": after,
    }
    return extended


def _hangul_share(text: str) -> float:
    letters = [c for c in text if not c.isspace()]
    return sum("\uac00" <= c <= "\ud7a3" or "\u1100" <= c <= "\u11ff" for c in letters) / max(len(letters), 1)


def _why_not_extensible(base: Tokenizer, model: dict) -> str:
    kind = model.get("type")
    head = "data.tokenizer.extend_from: this tokenizer cannot be extended: "
    if kind in ("WordPiece", "WordLevel"):
        return head + (
            f"a {kind} model turns every character it lacks into {model.get('unk_token', '[UNK]')}, so new text "
            "would lose characters; only byte-level BPE (GPT-2 style) and BPE with byte fallback (Llama-2, Mistral, "
            "SOLAR) spell every input"
        )
    if kind == "Unigram":
        return head + (
            "a Unigram model's tokens are chosen by learned scores, which new tokens would not have comparable "
            "values for; only byte-level BPE and BPE with byte fallback are extended"
        )
    if kind == "BPE" and model.get("byte_fallback"):
        vocab = base.backend.get_vocab(with_added_tokens=True)
        missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab]
        return head + f"byte_fallback is on but {len(missing)} byte tokens are missing (e.g. {missing[0]})"
    if kind == "BPE":
        return head + (
            f"a BPE that is neither byte-level nor byte-fallback maps characters outside its alphabet to "
            f"{model.get('unk_token')!r}; only byte-level BPE and BPE with byte fallback are extended"
        )
    return head + f"model type {kind!r} is not a BPE"


def _trimmed(new_tokens: list, base_size: int, multiple_of: int) -> list:
    """Drop the last (least frequent) new tokens so the vocabulary ends on a multiple of `multiple_of`."""
    if multiple_of <= 1:
        return new_tokens
    total = base_size + len(new_tokens)
    keep = len(new_tokens) - total % multiple_of
    return new_tokens[:keep] if keep > 0 else new_tokens


def _extend_byte_level(base_json, texts, new_vocab_size, min_frequency, length, show_progress, base_size,
                       multiple_of) -> tuple[Tokenizer, int]:  # fmt: skip
    learned = train_tokenizer(texts, new_vocab_size, min_frequency, length=length, show_progress=show_progress)
    learned_merges = json.loads(learned.to_str())["model"]["merges"]
    model = base_json["model"]
    vocab: dict[str, int] = model["vocab"]
    merges: list = model["merges"]
    as_strings = bool(merges) and isinstance(merges[0], str)
    known = set(vocab)
    new: list[tuple[str, str]] = []
    for merge in learned_merges:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        if left + right in known or left not in known or right not in known:
            continue
        known.add(left + right)
        new.append((left, right))
    new = _trimmed(new, base_size, multiple_of)
    # Added tokens outside the model's vocabulary (the <|endoftext|> and <|pad|> that Tokenizer gives a base that
    # has no end-of-text token) go into it at their ids: the library re-numbers an added token the model lacks past
    # the new merges when the file is read back, leaving holes where it was and moving its row.
    for token in base_json.get("added_tokens", []):
        vocab.setdefault(token["content"], token["id"])
    next_id = max(vocab.values()) + 1
    for left, right in new:
        vocab[left + right] = next_id
        next_id += 1
        merges.append(f"{left} {right}" if as_strings else [left, right])
    if base_json.get("normalizer") is None:
        base_json["normalizer"] = json.loads(normalizers.NFC().__getstate__())  # NFC like every ftlm tokenizer
    return Tokenizer(_HFTokenizer.from_str(json.dumps(base_json, ensure_ascii=False))), len(new)


def _base_text(token: str) -> bool:
    """True for a token without a letter outside ASCII (English, code, digits, punctuation such as ‘ ’ — ):
    the new vocabulary is for the new language's words, and text without them must encode exactly as before."""
    return not any(not c.isascii() and unicodedata.category(c).startswith("L") for c in token)


def _extend_sentencepiece(base: Tokenizer, base_json, texts, new_vocab_size, min_frequency, length, show_progress,
                          multiple_of) -> tuple[Tokenizer, int]:  # fmt: skip
    """New tokens learned on the base's own spelling of `texts` (its normaliser and pre-tokeniser, "▁" for spaces).

    A BPE learner is trained on the base's pieces, each piece further split before every "▁" as SentencePiece splits
    at whitespace. The learner's single characters (for a byte-fallback base, characters it spelled as bytes) and
    its merges are appended when they contain a letter outside ASCII and their parts are already tokens.
    """
    import re

    backend = base.backend
    norm, pre = backend.normalizer, backend.pre_tokenizer
    word = re.compile(f"{SPACE}*[^{SPACE}\\s]+|{SPACE}+")

    def pieces(it):
        for text in it:
            t = norm.normalize_str(text) if norm is not None else text
            parts = [p for p, _ in pre.pre_tokenize_str(t)] if pre is not None else [t]
            yield " ".join(w for p in parts for w in word.findall(p))

    learner = _HFTokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=new_vocab_size, min_frequency=min_frequency, show_progress=show_progress)
    learner.train_from_iterator(pieces(texts), trainer=trainer, length=length)
    learned = json.loads(learner.to_str())["model"]
    model = base_json["model"]
    vocab: dict[str, int] = model["vocab"]
    merges: list = model["merges"]
    as_strings = bool(merges) and isinstance(merges[0], str)
    known = set(vocab) | {t["content"] for t in base_json.get("added_tokens", [])}
    new: list[tuple[str, str | None]] = []  # (token, None) for a single character, (left, right) for a merge
    for token, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        if len(token) == 1 and token not in known and not _base_text(token) and not token.isspace():
            known.add(token)
            new.append((token, None))
    for merge in learned["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merged = left + right
        if merged in known or left not in known or right not in known or _base_text(merged):
            continue
        known.add(merged)
        new.append((left, right))
    new = _trimmed(new, base.vocab_size, multiple_of)
    taken = set(vocab.values()) | {t["id"] for t in base_json.get("added_tokens", [])}
    next_id = max(taken) + 1
    for left, right in new:
        vocab[left if right is None else left + right] = next_id
        next_id += 1
        if right is not None:
            merges.append(f"{left} {right}" if as_strings else [left, right])
    return Tokenizer(_HFTokenizer.from_str(json.dumps(base_json, ensure_ascii=False))), len(new)
