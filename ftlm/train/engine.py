"""Distributed setup and the DeepSpeed engine: process group, DeepSpeed config, optimizer, ZeRO-3 model init."""

from __future__ import annotations

import atexit
import logging
import os
import socket
import warnings
from dataclasses import dataclass

import torch

from ftlm.checkpoint import resolve_device
from ftlm.config import ConfigError
from ftlm.train.config import DeepSpeedConfig, TrainerConfig, typed

log = logging.getLogger(__name__)


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device_name: str) -> Dist:
    """Join the process group the launcher set up, or make a group of one when run without a launcher."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `python -m ftlm.train.main` or `ftlm-train`
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    # The deepspeed launcher says LOCAL_SIZE; torchrun, and mosaicml-streaming's rank logic, read LOCAL_WORLD_SIZE.
    if "LOCAL_WORLD_SIZE" not in os.environ and "LOCAL_SIZE" in os.environ:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]
    device = resolve_device(device_name, option="trainer.device")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if device.type == "cpu":
        skip_cpu_inference_comm_build()
    quiet_deepspeeds_deprecated_collectives()
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return Dist(
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        local_world_size=local_world,
        node_rank=rank // max(1, local_world),
        device=device,
    )


def shutdown_distributed(at_exit: bool = False) -> None:
    """Wait for every rank, then leave the process group (now, or when the process exits: a Hydra sweep trains its
    next job in this process, and DeepSpeed keeps its groups for it). A rank that exits while a peer still talks to
    it can abort in teardown ("terminate called without an active exception", SIGABRT), and the launcher then
    reports a finished job as failed. Call it only where every rank arrives: after a failure it would wait forever."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    torch.distributed.barrier()
    if not at_exit:
        torch.distributed.destroy_process_group()
    elif not _leave_at_exit:
        _leave_at_exit.append(True)
        atexit.register(lambda: torch.distributed.is_initialized() and torch.distributed.destroy_process_group())


_leave_at_exit: list[bool] = []


def skip_cpu_inference_comm_build() -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce (over a minute of g++ per fresh machine)
    that only its inference engine uses; training never calls it, so mark it unavailable instead."""
    import deepspeed.ops

    if "__compatible_ops__" not in vars(deepspeed.ops):
        deepspeed.ops.__compatible_ops__ = {}  # also skips probing every op's compiler, which nothing here needs
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def quiet_deepspeeds_deprecated_collectives() -> None:
    """PyTorch 2.14 deprecates the collectives ZeRO calls on every step (all_gather_into_tensor,
    reduce_scatter_tensor); DeepSpeed 0.19 still calls them, and the FutureWarning (nothing a user can act on)
    came back on every step of a run's log. Only those two messages are ignored."""
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning,
    )


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"trainer.precision: '{precision}' is not one of auto, bf16, fp16, fp32")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"trainer.precision=fp16 needs a GPU (DeepSpeed has no fp16 on the {device.type}): use bf16 or fp32"
        )
    return precision


def build_ds_config(trainer_cfg, ds_cfg, world_size: int, precision: str) -> dict:
    """The DeepSpeed JSON config, generated from conf/trainer and conf/deepspeed (TrainerConfig, DeepSpeedConfig)."""
    t, ds = typed(trainer_cfg, TrainerConfig), typed(ds_cfg, DeepSpeedConfig)
    zero = {
        "stage": ds.stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": ds.contiguous_gradients,
        "reduce_bucket_size": ds.reduce_bucket_size,
    }
    if ds.stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": ds.stage3_prefetch_bucket_size,
                "stage3_param_persistence_threshold": ds.stage3_param_persistence_threshold,
                "stage3_max_live_parameters": ds.stage3_max_live_parameters,
                "stage3_gather_16bit_weights_on_model_save": ds.stage3_gather_16bit_weights_on_model_save,
            }
        )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        if ds.stage != 3:
            raise ConfigError("deepspeed.offload_params needs deepspeed.stage=3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        # ftlm passes its own AdamW (param groups without decay on norms, biases, embeddings).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # ftlm logs progress itself
        "wall_clock_breakdown": False,
    }
    config.update(ds.extra)
    return config


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: never on norms, biases or embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = len(getattr(p, "ds_shape", p.shape)) >= 2  # ZeRO-3 keeps the full shape in ds_shape
        (decay if is_matrix and "embed" not in name else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(model, trainer_cfg: TrainerConfig, ds_cfg: DeepSpeedConfig, device):
    groups = param_groups(model, trainer_cfg.weight_decay)
    kwargs = dict(lr=trainer_cfg.lr, betas=tuple(trainer_cfg.betas), eps=trainer_cfg.adam_eps)
    if ds_cfg.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # the fast CPU Adam that ZeRO-Offload expects

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, fused=device.type == "cuda", **kwargs)


def build_model(model_cfg, ds_config: dict, dist: Dist):
    """Construct the GPT; under ZeRO-3 each rank only ever holds its partition of the weights."""
    import deepspeed

    from ftlm.model import GPT

    zero3 = ds_config["zero_optimization"]["stage"] == 3
    with deepspeed.zero.Init(
        config_dict_or_path=ds_config,
        enabled=zero3,
        remote_device="cpu" if "offload_param" in ds_config["zero_optimization"] else None,
    ):
        model = GPT(model_cfg)
    if zero3:
        # Inside zero.Init every submodule is partitioned as soon as it is built, so the GPT's own
        # initialisation ran on empty shards: redo it with each module's parameters gathered.
        for module in model.modules():
            params = list(module.parameters(recurse=False))
            if params:
                with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                    if dist.rank == 0:
                        model._init_weights(module)
    return model


def build_engine(model, trainer_cfg, ds_cfg, ds_config: dict, dist: Dist):
    import deepspeed

    from ftlm.train.schedule import build_scheduler

    optimizer = build_optimizer(model, trainer_cfg, ds_cfg, dist.device)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, lr_scheduler=lambda opt: build_scheduler(opt, trainer_cfg)
    )
    return engine, scheduler
