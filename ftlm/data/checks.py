"""Validation of the `data` config, run before any file is read or any memory is allocated.

Every message names the key (`data.mix`, `data.tokenizer.vocab_size`, ...) so a user knows what to change.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from .clean import SCRIPTS, CleanConfig
from .dedup import DedupConfig
from .packing import PACKINGS
from .shards import COMPRESSIONS

SOURCE_CHANGE = ("prepare", "refuse")

_STREAM_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


class DataConfigError(ValueError):
    pass


def as_dict(cfg) -> dict:
    """A plain, resolved dict from an OmegaConf node or a mapping, checked against the schema (config.py)."""
    from .config import data_dict

    return data_dict(cfg)


def stream_names(cfg: Mapping[str, Any]) -> list[str]:
    sources = cfg.get("sources")
    if not isinstance(sources, Mapping) or not sources:
        raise DataConfigError(
            "data.sources must map each stream name to a list of files or globs, "
            "e.g. {ko: [corpus/ko/*.jsonl], en: [corpus/en/*.jsonl]}"
        )
    for name, files in sources.items():
        if not _STREAM_NAME.match(str(name)):
            raise DataConfigError(f"data.sources: stream name {name!r} may only hold letters, digits, '_' and '-'")
        if isinstance(files, str):
            files = [files]
        if not files:
            raise DataConfigError(f"data.sources.{name}: no files given")
    return [str(n) for n in sources]


def check_mix(cfg: Mapping[str, Any], streams: list[str]) -> dict[str, float]:
    """`data.mix` as {stream: share of training tokens}; None means each stream in its natural share."""
    mix = cfg.get("mix")
    if mix is None:
        return {}
    if not isinstance(mix, Mapping) or not mix:
        raise DataConfigError("data.mix must map stream names to shares of training tokens, e.g. {ko: 0.7, en: 0.3}")
    unknown = sorted(set(map(str, mix)) - set(streams))
    if unknown:
        raise DataConfigError(f"data.mix names unknown stream(s) {unknown}; data.sources has {streams}")
    missing = sorted(set(streams) - set(map(str, mix)))
    if missing:
        raise DataConfigError(
            f"data.mix has no share for stream(s) {missing} (give 0.0 to prepare a stream without training on it)"
        )
    shares = {}
    for name, share in mix.items():
        if not isinstance(share, (int, float)) or isinstance(share, bool) or not math.isfinite(share) or share < 0:
            raise DataConfigError(f"data.mix.{name} must be a number >= 0, got {share!r}")
        shares[str(name)] = float(share)
    total = sum(shares.values())
    if abs(total - 1.0) > 1e-6:
        raise DataConfigError(f"data.mix shares must sum to 1, they sum to {total:g}: {shares}")
    return shares


def check_data_config(cfg: Mapping[str, Any]) -> list[str]:
    """Raise DataConfigError naming the first bad key; return the stream names. `cfg` is as_dict's output."""
    streams = stream_names(cfg)
    check_mix(cfg, streams)
    if not cfg["out_dir"]:
        raise DataConfigError("data.out_dir must be set (where preparations are written)")
    if not cfg["text_field"]:
        raise DataConfigError("data.text_field must name the field holding the text in .jsonl and .parquet inputs")
    for name, code in dict(cfg["lang"] or {}).items():
        if str(name) not in streams:
            raise DataConfigError(f"data.lang names unknown stream {name!r}; data.sources has {streams}")
        if code is not None and code not in SCRIPTS:
            raise DataConfigError(f"data.lang.{name} must be one of {sorted(SCRIPTS)} or null, got {code!r}")
    if not 0.0 <= cfg["val_fraction"] <= 0.5:
        raise DataConfigError(f"data.val_fraction must be in [0, 0.5], got {cfg['val_fraction']!r}")
    if cfg["val_min_docs"] < 0:
        raise DataConfigError("data.val_min_docs must be >= 0")
    if cfg["num_workers"] is not None and cfg["num_workers"] < 0:
        raise DataConfigError(f"data.num_workers must be null (all cores) or >= 0, got {cfg['num_workers']!r}")
    if cfg.get("task_bytes") is not None and cfg["task_bytes"] < 1:
        raise DataConfigError(f"data.task_bytes must be null (one task per file) or > 0, got {cfg['task_bytes']!r}")
    if cfg.get("executor", "local") not in ("local", "ray"):  # ftlm.data.executor.EXECUTORS
        raise DataConfigError(f"data.executor must be local or ray, got {cfg.get('executor')!r}")
    if cfg["shard_compression"] not in COMPRESSIONS:
        raise DataConfigError(
            f"data.shard_compression must be one of {list(COMPRESSIONS)}, got {cfg['shard_compression']!r}"
        )
    for key in ("shard_size_limit", "max_line_bytes"):
        if cfg[key] < 1024:
            raise DataConfigError(f"data.{key} must be >= 1024 (bytes), got {cfg[key]!r}")
    if cfg["epoch_size"] is not None and cfg["epoch_size"] < 1:
        raise DataConfigError(f"data.epoch_size must be null or a positive number of documents: {cfg['epoch_size']!r}")
    if cfg["source_change"] not in SOURCE_CHANGE:
        raise DataConfigError(f"data.source_change must be one of {list(SOURCE_CHANGE)}, got {cfg['source_change']!r}")
    if cfg["packing"] not in PACKINGS:
        raise DataConfigError(f"data.packing must be one of {list(PACKINGS)}, got {cfg['packing']!r}")
    if cfg["packing_buffer"] < 1:
        raise DataConfigError(f"data.packing_buffer must be a positive number of documents: {cfg['packing_buffer']!r}")
    try:
        CleanConfig.from_cfg(cfg["clean"])
        DedupConfig.from_cfg(cfg["dedup"])
    except (TypeError, ValueError) as err:
        raise DataConfigError(str(err)) from None
    _check_tokenizer(cfg["tokenizer"], streams)
    return streams


def _check_tokenizer(tok: Mapping[str, Any], streams: list[str]) -> None:
    if tok["path"] and tok["extend_from"]:
        raise DataConfigError(
            "data.tokenizer.path (reuse as is) and data.tokenizer.extend_from (extend) "
            "exclude each other; set one of them to null"
        )
    vocab = tok["vocab_size"]
    if vocab < 300 or vocab > 1 << 22:
        raise DataConfigError(f"data.tokenizer.vocab_size must be in [300, 4194304], got {vocab!r}")
    if tok["sample_chars"] < 1:
        raise DataConfigError("data.tokenizer.sample_chars must be a positive integer")
    shares = tok["sample_shares"]
    if shares is not None:
        unknown_streams = sorted(set(map(str, shares)) - set(streams))
        if unknown_streams:
            raise DataConfigError(
                f"data.tokenizer.sample_shares names unknown stream(s) {unknown_streams}; data.sources has {streams}"
            )
        if any(v < 0 for v in shares.values()) or sum(shares.values()) <= 0:
            raise DataConfigError("data.tokenizer.sample_shares must be numbers >= 0 with a positive sum")
    if not all(t for t in tok["special_tokens"]):
        raise DataConfigError("data.tokenizer.special_tokens must be a list of non-empty strings")
