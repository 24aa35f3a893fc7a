import math
import os

import pytest
import torch

from ftlm.config import compose, strip_launcher_args
from ftlm.model import GPT, GPTConfig
from ftlm.train.engine import build_ds_config, param_groups, resolve_precision
from ftlm.train.main import check_trainer_config
from ftlm.train.schedule import lr_multiplier


def test_ds_config_from_conf_groups():
    cfg = compose(["trainer.micro_batch_size=4", "trainer.grad_accum=3", "trainer.grad_clip=0.5"])
    ds = build_ds_config(cfg.trainer, cfg.deepspeed, world_size=8, precision="bf16")
    assert ds["train_batch_size"] == 4 * 3 * 8
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert "offload_optimizer" not in ds["zero_optimization"]


@pytest.mark.parametrize("group,stage,offload", [("zero2", 2, False), ("zero3_offload", 3, True)])
def test_other_deepspeed_groups(group, stage, offload):
    cfg = compose([f"deepspeed={group}", "+deepspeed.extra.wall_clock_breakdown=true"])
    ds = build_ds_config(cfg.trainer, cfg.deepspeed, world_size=1, precision="fp32")
    assert ds["zero_optimization"]["stage"] == stage
    assert ("offload_optimizer" in ds["zero_optimization"]) == offload
    assert ("offload_param" in ds["zero_optimization"]) == offload
    assert not ds["bf16"]["enabled"]
    assert ds["wall_clock_breakdown"] is True  # deepspeed.extra is merged last


def test_param_offload_needs_stage_3():
    cfg = compose(["deepspeed=zero2", "deepspeed.offload_params=true"])
    with pytest.raises(ValueError, match="deepspeed.offload_params"):
        build_ds_config(cfg.trainer, cfg.deepspeed, world_size=1, precision="fp32")


def test_precision_follows_device():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    with pytest.raises(ValueError, match="trainer.precision"):
        resolve_precision("fp8", torch.device("cpu"))


def test_no_weight_decay_on_norms_biases_embeddings():
    model = GPT(
        GPTConfig(vocab_size=64, max_seq_len=16, n_layer=2, n_head=2, d_model=32, bias=True, tie_embeddings=False)
    )
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith("weight") and "norm" not in n and "embed" not in n for n in decayed)
    assert "blocks.0.attn.qkv.weight" in decayed and "lm_head.weight" in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_schedule_warmup_cosine_floor():
    warm, decay, floor = 10, 90, 0.1
    assert lr_multiplier(0, warm, decay, floor) == pytest.approx(0.1)
    assert lr_multiplier(9, warm, decay, floor) == pytest.approx(1.0)
    assert lr_multiplier(10, warm, decay, floor) == pytest.approx(1.0)
    mid = lr_multiplier(10 + 45, warm, decay, floor)
    assert mid == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(100, warm, decay, floor) == pytest.approx(floor)
    assert lr_multiplier(10_000, warm, decay, floor) == pytest.approx(floor)
    values = [lr_multiplier(s, warm, decay, floor) for s in range(warm, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize(
    "argv,expected,local_rank",
    [
        (["prog", "--local_rank=1", "model=tiny"], ["prog", "model=tiny"], "1"),
        (["prog", "model=tiny", "--local_rank", "3"], ["prog", "model=tiny"], "3"),
        (["prog", "--local-rank=0", "trainer.lr=1e-3"], ["prog", "trainer.lr=1e-3"], "0"),
    ],
)
def test_launcher_local_rank_never_reaches_hydra(argv, expected, local_rank, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "")  # recorded first, so monkeypatch restores the variable as it was
    monkeypatch.delenv("LOCAL_RANK")
    assert strip_launcher_args(argv) == expected
    assert os.environ["LOCAL_RANK"] == local_rank  # kept where torch.distributed looks for it


@pytest.mark.parametrize(
    "key,value",
    [
        ("max_steps", 0),
        ("micro_batch_size", -1),
        ("lr", 0),
        ("min_lr_ratio", 2),
        ("betas", "[0.9]"),
        ("betas", "[1.5,0.95]"),
        ("grad_clip", -1),
        ("weight_decay", -1),
        ("adam_eps", 0),
        ("decay_steps", -5),
        ("keep_last", -1),
        ("eval_batches", 0),
        ("sample_tokens", -5),
    ],
)
def test_trainer_config_errors_name_the_key(key, value):
    cfg = compose([f"trainer.{key}={value}"])
    with pytest.raises(ValueError, match=f"trainer.{key}"):
        check_trainer_config(cfg.trainer)


def test_settings_deepspeed_would_refuse_deep_inside_are_named_first():
    from ftlm.train.config import DeepSpeedConfig, check_deepspeed_config, typed

    with pytest.raises(ValueError, match="deepspeed.stage must be a ZeRO stage 0, 1, 2 or 3, got 5"):
        check_deepspeed_config(typed(compose(["deepspeed.stage=5"]).deepspeed, DeepSpeedConfig))
    with pytest.raises(ValueError, match="trainer.precision=fp16 needs a GPU"):
        resolve_precision("fp16", torch.device("cpu"))
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.d_model=102", "model.d_model"),
        ("model.n_kv_heads=3", "model.n_kv_heads"),
        ("model.attn_impl=fast", "model.attn_impl"),
        ("trainer.seq_len=4096", "trainer.seq_len"),
    ],
)
def test_train_refuses_a_bad_config_before_any_work(override, key, tmp_path, monkeypatch):
    """The trainer fails on the config before preparing data, starting processes or allocating the model."""
    from ftlm.train import main as train_main

    def must_not_run(*a, **k):
        raise AssertionError("work started before the config was checked")

    monkeypatch.setattr(train_main, "init_distributed", must_not_run)
    cfg = compose([override, f"trainer.out_dir={tmp_path}"])
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        train_main.train(cfg)
