"""Growing a pretrained model's vocabulary: the embedding rows of new tokens (model.new_token_init).

Rows of an extended model (V_old = the old tokenizer's size, V_new = the new one's, V = V_new rounded up to 64):
    [0, V_old)        old tokens: kept bit for bit
    [V_old, V_new)    new tokens, initialised by model.new_token_init:
                        subtoken_mean (default; EEVE, arXiv 2402.14714): the mean of the rows of the old tokens the
                                      new token's string splits into under the old tokenizer
                        vocab_mean    the mean of all old rows (Hewitt 2021)
                        normal        N(0, model.init_std), as a from-scratch model
    [V_new, V)        padding no text produces: the old row where the old model had one, else the mean of old rows

The untied LM head gets the same rule as the input embedding, on its own rows. Why: with subtoken_mean a new
token's logit starts as the mean of its pieces' logits, and by Jensen exp(mean z) <= mean exp(z), so the new token
never starts more probable than its pieces are on average: where the pieces are unlikely (Korean bytes after English
text) the new token is unlikely too, and the distribution over old tokens barely moves (tests/hf measure KL on
English text at step 0). Copying the first piece's row instead (another common rule) would give every new token that
starts with the same byte that byte's full logit and multiply its probability by the number of such tokens.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ftlm.model import GPTConfig

from .convert import pad_to_multiple

log = logging.getLogger(__name__)

INITS = ("subtoken_mean", "vocab_mean", "normal")
VOCAB_MULTIPLE = 64
ROW_PARAMS = ("embed.weight", "lm_head.weight")


def _as_tokenizer(tok):
    from ftlm.data.tokenizer import Tokenizer

    return tok if isinstance(tok, Tokenizer) else Tokenizer.load(str(tok))


def subtoken_ids(old_tokenizer, new_tokenizer, token_id: int) -> list[int]:
    """The old tokenizer's ids for what new token `token_id` stands for.

    The token's own string is split by the old tokenizer's model (BPE / Unigram) without normalising or
    pre-tokenising again, so a byte-level token that is only part of a UTF-8 character, or a SentencePiece token
    with its leading "▁", splits into exactly the old pieces that spell it.
    """
    old, new = _as_tokenizer(old_tokenizer), _as_tokenizer(new_tokenizer)
    backend = new.backend
    added = backend.get_added_tokens_decoder()
    piece = backend.id_to_token(token_id)
    if piece is None:
        return []
    if token_id not in added:
        ids = [t.id for t in old.backend.model.tokenize(piece)]
        known = old.backend.get_vocab_size(with_added_tokens=True)
        if ids and all(0 <= i < known for i in ids):
            return ids
    return old.encode(new.decode([token_id]))


def resize_vocab(
    state_dict: dict[str, torch.Tensor],
    cfg: GPTConfig,
    new_vocab: int | None = None,
    init: str | None = None,
    old_tokenizer=None,
    new_tokenizer=None,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], GPTConfig]:
    """(state dict, config) of the model with rows for every id of `new_tokenizer`, padded to a multiple of 64.

    new_vocab: ids the new tokenizer has (default: new_tokenizer's size); init: subtoken_mean | vocab_mean | normal
    (default cfg.new_token_init); old_tokenizer / new_tokenizer: Tokenizer objects or tokenizer.json paths
    (old_tokenizer is needed for subtoken_mean and to know which rows are old). The input state dict is not changed.
    """
    from dataclasses import replace

    init = init or cfg.new_token_init
    if init not in INITS:
        raise ValueError(f"model.new_token_init={init!r}: not one of {', '.join(INITS)}")
    if old_tokenizer is None:
        raise ValueError("resize_vocab: old_tokenizer is needed to know which rows are old")
    old = _as_tokenizer(old_tokenizer)
    new = _as_tokenizer(new_tokenizer) if new_tokenizer is not None else None
    n_new = int(new_vocab if new_vocab is not None else new.vocab_size)
    n_old = old.vocab_size
    if n_new < n_old:
        raise ValueError(f"resize_vocab: the new vocabulary ({n_new}) is smaller than the old one ({n_old})")
    if init == "subtoken_mean" and new is None and n_new > n_old:
        raise ValueError("resize_vocab: new_token_init=subtoken_mean needs the new tokenizer")
    if new is not None:
        _check_prefix(old, new)
    V = pad_to_multiple(max(n_new, cfg.vocab_size), VOCAB_MULTIPLE)
    pieces = {t: subtoken_ids(old, new, t) for t in range(n_old, n_new)} if init == "subtoken_mean" else {}
    empty = sorted(t for t, ids in pieces.items() if not ids)
    if empty:
        log.warning("%d new tokens have no old pieces (e.g. id %d); they start at the vocabulary mean", len(empty),
                    empty[0])  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    out = dict(state_dict)
    for name in ROW_PARAMS:
        if name not in state_dict:
            continue
        w = state_dict[name]
        rows = torch.empty(V, w.shape[1], dtype=torch.float32)
        keep = min(w.shape[0], V)
        rows[:keep] = w[:keep].float()
        mean = w[:n_old].float().mean(dim=0)
        for t in range(n_old, n_new):
            if init == "subtoken_mean" and pieces.get(t):
                rows[t] = w[pieces[t]].float().mean(dim=0)
            elif init == "normal":
                rows[t] = torch.randn(w.shape[1], generator=gen) * cfg.init_std
            else:
                rows[t] = mean
        rows[max(n_new, keep) :] = mean  # padding rows beyond the old matrix
        out[name] = rows.to(w.dtype)
    log.info(
        "vocabulary %d -> %d tokens (model rows %d -> %d, a multiple of %d); new rows: %s",
        n_old, n_new, cfg.vocab_size, V, VOCAB_MULTIPLE, init,
    )  # fmt: skip
    return out, replace(cfg, vocab_size=V)


def _check_prefix(old, new) -> None:
    """Every old token keeps its id in the new tokenizer, or the old rows would stand for other text."""
    new_vocab = new.backend.get_vocab(with_added_tokens=True)
    moved = [t for t, i in old.backend.get_vocab(with_added_tokens=True).items() if new_vocab.get(t) != i]
    if moved:
        raise ValueError(
            f"the new tokenizer does not keep the old ids ({len(moved)} tokens moved or missing, e.g. {moved[0]!r}): "
            "extend the model's own tokenizer (data.tokenizer.extend_from) rather than training a new one"
        )


def old_rows_of(tokenizer_path: str | Path) -> int:
    """How many rows are 'old' for trainer.train_only=new_rows: the size of the tokenizer the model came with."""
    return _as_tokenizer(tokenizer_path).vocab_size
