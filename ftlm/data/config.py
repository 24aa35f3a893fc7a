"""Typed schema of conf/data (registered in Hydra's ConfigStore as data/schema by ftlm/config.py).

The values live in the yaml files only (conf/data/base.yaml and the presets; every field here is MISSING): the
schema gives each key its type, so a misspelt key or a value of the wrong type fails when the config is composed,
naming the key. Ranges and cross-key rules are checked by checks.py before any work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from .clean import CleanConfig
from .dedup import DedupConfig


@dataclass
class TokenizerConfig:
    path: str | None = MISSING
    extend_from: str | None = MISSING
    vocab_size: int = MISSING
    min_frequency: int = MISSING
    sample_chars: int = MISSING
    sample_shares: dict[str, float] | None = MISSING
    special_tokens: list[str] = MISSING


@dataclass
class DataConfig:
    name: str = MISSING
    sources: dict[str, Any] = MISSING  # stream -> list of files/globs/dirs (or one string)
    text_field: str = MISSING
    lang: dict[str, str | None] = MISSING
    mix: dict[str, float] | None = MISSING
    out_dir: str = MISSING
    remote: str | None = MISSING
    cache_dir: str = MISSING
    cache_limit: Any = MISSING  # null, bytes, or a size such as "50gb"
    num_workers: int | None = MISSING
    executor: str = MISSING  # local | ray (ftlm.data.executor)
    task_bytes: int | None = MISSING  # a bigger .jsonl / .parquet is cleaned by several tasks
    ray_address: str | None = MISSING  # Ray head host:port or auto; null = a Ray on this machine
    val_fraction: float = MISSING
    val_min_docs: int = MISSING
    max_line_bytes: int = MISSING
    shard_compression: str | None = MISSING
    shard_size_limit: int = MISSING
    epoch_size: int | None = MISSING
    keep_clean_text: bool = MISSING
    source_change: str = MISSING
    packing: str = MISSING
    packing_buffer: int = MISSING
    clean: CleanConfig = MISSING
    dedup: DedupConfig = MISSING
    tokenizer: TokenizerConfig = MISSING


def data_dict(cfg) -> dict:
    """`cfg` (an OmegaConf node or a mapping) checked against DataConfig, as a plain resolved dict.

    An unknown key, a value of the wrong type or a key without a value raises DataConfigError naming `data.<key>`.
    """
    from omegaconf.errors import OmegaConfBaseException

    from .checks import DataConfigError

    if isinstance(cfg, DictConfig):  # resolved where it sits: its interpolations may reach other groups
        cfg = OmegaConf.to_container(cfg, resolve=True)
    try:
        node = OmegaConf.merge(OmegaConf.structured(DataConfig), cfg)
        out = OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or ""
        first = str(err).splitlines()[0]
        raise DataConfigError(f"data.{key}: {first}" if key else f"data: {first}") from None
    # {} and null say the same (equal shares; natural shares): one spelling, so the fingerprint sees one value.
    # base.yaml writes {} for sample_shares because Hydra cannot merge an override into a null mapping.
    out["tokenizer"]["sample_shares"] = out["tokenizer"]["sample_shares"] or None
    out["mix"] = out["mix"] or None
    return out


GROUPS = ("clean", "dedup", "tokenizer")  # sub-configs completed key by key by with_defaults


def with_defaults(cfg) -> dict:
    """A data config that may lack keys (a test's, a notebook's) completed with conf/data/base.yaml's values, so the
    yaml stays the one place defaults live: a missing key takes base's value, a group (clean, dedup, tokenizer) its
    missing keys. Nothing is checked here (checks.py does that)."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    base = preset("base")
    out = {**base, **cfg}
    for group in GROUPS:
        if isinstance(cfg.get(group), dict):
            out[group] = {**base[group], **cfg[group]}
    return out


def preset(name: str, conf_dir: str | None = None) -> dict:
    """conf/data/<name>.yaml with its `defaults` (base.yaml) applied, as Hydra composes it, as a plain unresolved
    dict: for tests, benchmarks and notebooks that want a data config without composing the whole app."""
    import os

    if conf_dir is None:
        from ftlm.config import CONF_DIR

        conf_dir = str(CONF_DIR)

    def load(preset_name: str):
        node = OmegaConf.load(os.path.join(conf_dir, "data", f"{preset_name}.yaml"))
        layers = []
        for entry in node.pop("defaults", []):
            if entry == "schema":
                layers.append(OmegaConf.structured(DataConfig))
            elif entry != "_self_":
                layers.append(load(str(entry)))
        return OmegaConf.merge(*layers, node) if layers else node

    return OmegaConf.to_container(load(name), resolve=False)
