"""Typed schemas of conf/trainer and conf/deepspeed (registered in Hydra's ConfigStore by ftlm/config.py).

The values live in the yaml files only (every field here is MISSING): the schema gives each key its type, so a
misspelt key or a value of the wrong type fails when the config is composed, naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from ftlm.config import ConfigError

TRAIN_ONLY = ("all", "embeddings", "new_rows")


@dataclass
class TrainerConfig:
    run_name: str = MISSING
    runs_dir: str = MISSING
    out_dir: str = MISSING
    max_steps: int = MISSING
    seq_len: int = MISSING
    micro_batch_size: int = MISSING
    grad_accum: int = MISSING
    lr: float = MISSING
    min_lr_ratio: float = MISSING
    warmup_steps: int = MISSING
    decay_steps: int | None = MISSING
    weight_decay: float = MISSING
    betas: list[float] = MISSING
    adam_eps: float = MISSING
    grad_clip: float = MISSING
    precision: str = MISSING
    device: str = MISSING
    activation_checkpointing: bool = MISSING
    seed: int = MISSING
    log_interval: int = MISSING
    eval_interval: int = MISSING
    eval_batches: int = MISSING
    save_interval: int = MISSING
    keep_last: int = MISSING
    resume: str | None = MISSING
    sample_interval: int = MISSING
    sample_prompts: list[str] = MISSING
    sample_tokens: int = MISSING
    tensorboard: bool = MISSING
    init_from: str | None = MISSING
    train_only: str = MISSING
    unfreeze_at: int | None = MISSING
    forgetting_warn: float = MISSING
    bench_tasks: list[str] = MISSING
    bench_interval: int = MISSING
    bench_limit: int | None = MISSING
    bench_include_path: str | None = MISSING


@dataclass
class DeepSpeedConfig:
    stage: int = MISSING
    offload_optimizer: bool = MISSING
    offload_params: bool = MISSING
    overlap_comm: bool = MISSING
    contiguous_gradients: bool = MISSING
    reduce_bucket_size: int = MISSING
    stage3_prefetch_bucket_size: int = MISSING
    stage3_param_persistence_threshold: int = MISSING
    stage3_max_live_parameters: int = MISSING
    stage3_gather_16bit_weights_on_model_save: bool = MISSING
    extra: dict[str, Any] = MISSING


def typed(node, schema: type):
    """A composed config group as its dataclass (resolved); also accepts a group composed without the schema."""
    if isinstance(node, schema):
        return node
    if isinstance(node, DictConfig):  # resolved where it sits: its interpolations may reach other groups
        node = OmegaConf.to_container(node, resolve=True)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))


def check_trainer_config(t) -> None:
    """Fail on settings that cannot work before anything is allocated (types were checked at compose time)."""
    for key in ("max_steps", "micro_batch_size", "grad_accum", "seq_len", "log_interval"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"trainer.{key} must be a positive integer, got {getattr(t, key)}")
    for key in ("eval_interval", "save_interval", "sample_interval", "bench_interval", "warmup_steps"):
        if getattr(t, key) < 0:
            raise ConfigError(f"trainer.{key} must be 0 (off) or a positive integer, got {getattr(t, key)}")
    for key in ("eval_batches", "sample_tokens"):
        if getattr(t, key) < 1:
            raise ConfigError(f"trainer.{key} must be a positive integer, got {getattr(t, key)}")
    if t.keep_last < 0:
        raise ConfigError(f"trainer.keep_last must be a number of checkpoints (0 keeps every one), got {t.keep_last}")
    if t.lr <= 0:
        raise ConfigError(f"trainer.lr must be positive, got {t.lr}")
    for key in ("weight_decay", "grad_clip", "forgetting_warn"):
        if getattr(t, key) < 0:
            raise ConfigError(f"trainer.{key} must be >= 0, got {getattr(t, key)}")
    if t.adam_eps <= 0:
        raise ConfigError(f"trainer.adam_eps must be positive, got {t.adam_eps}")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise ConfigError(f"trainer.betas must be two numbers in [0, 1) (AdamW's beta1, beta2), got {list(t.betas)}")
    if t.decay_steps is not None and t.decay_steps < 0:
        raise ConfigError(f"trainer.decay_steps must be null (until max_steps) or >= 0, got {t.decay_steps}")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(f"trainer.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    if t.train_only not in TRAIN_ONLY:
        raise ConfigError(f"trainer.train_only: '{t.train_only}' is not one of {', '.join(TRAIN_ONLY)}")
    if t.train_only != "all" and t.init_from is None:
        raise ConfigError(
            f"trainer.train_only={t.train_only} freezes the rows of a model trained before: "
            "it needs trainer.init_from=<model dir>"
        )
    if t.unfreeze_at is not None and t.unfreeze_at < 0:
        raise ConfigError(f"trainer.unfreeze_at must be null or a step >= 0, got {t.unfreeze_at}")
    if t.bench_tasks and t.bench_interval == 0:
        raise ConfigError("trainer.bench_tasks is set but trainer.bench_interval=0 would never run them")
    if t.bench_limit is not None and t.bench_limit <= 0:
        raise ConfigError(f"trainer.bench_limit must be null or positive, got {t.bench_limit}")


def check_deepspeed_config(ds) -> None:
    """conf/deepspeed values DeepSpeed itself would only reject deep inside its initialisation."""
    if ds.stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.stage must be a ZeRO stage 0, 1, 2 or 3, got {ds.stage}")
