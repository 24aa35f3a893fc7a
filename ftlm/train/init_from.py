"""trainer.init_from: continue pretraining an existing model (a Hugging Face directory or an ftlm model directory).

The model's shape comes from the source: a `model.*` key given on the command line that disagrees with it is an
error naming the key; conf/model's training settings (attention and norm kernels, dropout, doc_mask,
new_token_init) still apply. The data is tokenized with the source's tokenizer (or, with data.tokenizer.extend_from,
its extension, whose new rows are initialised by ftlm.hf.resize_vocab). Optimizer and schedule start fresh.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from ftlm.checkpoint import ARCH_KEYS
from ftlm.config import ConfigError
from ftlm.model import GPTConfig

log = logging.getLogger("ftlm.train")

# conf/model keys that say how to train, not what the model is: they come from the config, not from the source.
TRAINING_KEYS = ("attn_impl", "norm_impl", "dropout", "doc_mask", "new_token_init")


def source_config(path: str) -> tuple[GPTConfig, Path]:
    """The source's model config and tokenizer.json, read without loading a weight."""
    from ftlm.checkpoint import locate
    from ftlm.hf import inspect, is_hf_dir

    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"trainer.init_from: {p} does not exist (a Hugging Face or ftlm model directory)")
    if is_hf_dir(p):
        src = inspect(p)
        return src.config, Path(src.tokenizer_path)
    src = locate(p)
    return src.config, Path(src.tokenizer_path)


def explicit_model_overrides() -> dict[str, str]:
    """`model.<key>` -> value as given on the command line of this Hydra app (empty outside one)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    out = {}
    for override in HydraConfig.get().overrides.task:
        key, _, value = override.lstrip("+~").partition("=")
        if key.startswith("model."):
            out[key.removeprefix("model.")] = value
    return out


def continued_config(base: GPTConfig, model_cfg, explicit: dict[str, str], where: str) -> GPTConfig:
    """`base` (the source's, or a resumed checkpoint's config) with conf/model's training keys and the explicit
    overrides that do not change the model; an override of a shape key that disagrees is an error."""
    from omegaconf import OmegaConf

    wanted = OmegaConf.to_container(model_cfg, resolve=True)
    values = dataclasses.asdict(base)
    for key in TRAINING_KEYS:
        if key in wanted and key in values:
            values[key] = wanted[key]
    for key in explicit:
        if key not in values:
            continue  # GPTConfig.from_dict below names unknown keys
        if key in ARCH_KEYS or key == "vocab_size":
            if wanted.get(key) is not None and wanted[key] != values[key]:
                raise ConfigError(
                    f"model.{key}={wanted[key]} disagrees with the model trainer.init_from starts from ({where}: "
                    f"{key}={values[key]!r}); the shape comes from the source: drop the override"
                )
        else:
            values[key] = wanted[key]
    return GPTConfig.from_dict(values)


def check_train_only(t, source_tokenizer: Path, model_cfg: GPTConfig) -> int:
    """The number of rows that count as old for train_only=new_rows: the source tokenizer's size."""
    from ftlm.data.tokenizer import Tokenizer

    n_old = Tokenizer.load(source_tokenizer).vocab_size
    if n_old > model_cfg.vocab_size:
        raise ConfigError(f"{source_tokenizer}: {n_old} tokens but the model has {model_cfg.vocab_size} rows")
    return n_old


def source_weights(path: str, src_cfg: GPTConfig, src_tokenizer: Path, tokenizer_path: Path) -> tuple[dict, GPTConfig]:
    """The source's weights (CPU) under ftlm's names, with rows for the tokens an extended tokenizer added."""
    from ftlm.data.tokenizer import Tokenizer
    from ftlm.hf import load_pretrained, resize_vocab

    cfg, state, _ = load_pretrained(path)
    n_new, n_old = Tokenizer.load(tokenizer_path).vocab_size, Tokenizer.load(src_tokenizer).vocab_size
    if n_new > n_old:
        cfg = dataclasses.replace(cfg, new_token_init=src_cfg.new_token_init)
        state, cfg = resize_vocab(state, cfg, init=src_cfg.new_token_init, old_tokenizer=src_tokenizer,
                                  new_tokenizer=tokenizer_path)  # fmt: skip
    return state, cfg


def grown_config(src_cfg: GPTConfig, src_tokenizer: Path, tokenizer_path: Path) -> GPTConfig:
    """The model config once the vocabulary has rows for every token of `tokenizer_path` (a multiple of 64)."""
    from ftlm.data.tokenizer import Tokenizer
    from ftlm.hf import VOCAB_MULTIPLE

    n_new, n_old = Tokenizer.load(tokenizer_path).vocab_size, Tokenizer.load(src_tokenizer).vocab_size
    if n_new <= n_old:
        return src_cfg
    vocab = -(-max(n_new, src_cfg.vocab_size) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    return dataclasses.replace(src_cfg, vocab_size=vocab)


def check_fits(state: dict, model) -> None:
    """Refuse weights that lack a parameter of the built model or hold one in another shape. It runs on rank 0
    before the copy starts: a mismatch found inside load_into's gathers would stop rank 0 while the other ranks
    wait in the next collective. (Under ZeRO-3 a parameter's own shape is empty; ds_shape is the whole one.)"""
    shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}
    missing = [n for n in shapes if n not in state]
    if missing:
        raise ConfigError(f"trainer.init_from: the source has no weights for {', '.join(missing[:5])}")
    wrong = [f"{n} is {tuple(state[n].shape)}, the model's {s}" for n, s in shapes.items() if state[n].shape != s]
    if wrong:
        raise ConfigError(f"trainer.init_from: the source's weights do not fit the model: {'; '.join(wrong[:3])}")


@torch.no_grad()
def load_into(model, state: dict | None, zero3: bool, rank: int) -> None:
    """Copy `state` (held by rank 0 only, checked there by check_fits; None elsewhere) into the freshly built model,
    parameter by parameter: under ZeRO-3 each is gathered, set on rank 0 and re-partitioned, so no rank holds the
    full model twice."""
    import deepspeed
    import torch.distributed as dist

    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=zero3):
            if rank == 0:
                p.data.copy_(state[name].to(p.dtype))
        if not zero3 and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(p.data, src=0)  # ZeRO-0/1/2: every rank holds the whole parameter
