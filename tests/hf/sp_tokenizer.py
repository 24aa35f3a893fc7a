"""A small SentencePiece-style tokenizer.json (Llama-2 / Mistral layout) built locally: BPE with byte fallback,
"▁" for spaces, <unk> <s> </s> and the 256 <0xNN> byte tokens first, trained on English only (so Korean falls back to
bytes, as it mostly does for Llama-2)."""

from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers


def build(texts: list[str], vocab_size: int = 600, legacy: bool = False) -> str:
    """The tokenizer's JSON text. legacy: Llama-2's original conversion (Prepend/Replace normaliser, no
    pre-tokeniser) instead of the Metaspace pre-tokeniser newer conversions write."""
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    learner.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for token, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [m if isinstance(m, str) else " ".join(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))  # fmt: skip
    tok.add_special_tokens(specials)
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok.to_str()
