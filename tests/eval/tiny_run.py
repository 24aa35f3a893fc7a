"""Builds a tiny training run directory the way ftlm-train lays it out: used by the `tiny_run_dir` fixture.

    python tests/eval/tiny_run.py <run dir> [model.key=value ...] [deepspeed=zero2]

Runs in its own process so that torch.distributed (DeepSpeed's group of one) stays out of pytest's.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

TEXTS = [
    "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.",
    "한국어와 영어를 함께 배우는 작은 언어 모델입니다. 오늘 날씨가 맑고 따뜻합니다.",
    "The function returns the sum of its arguments. A small language model learns Korean and English.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "서울은 한국의 수도이며, 부산은 두 번째로 큰 도시이다. Seoul is the capital of Korea.",
]


def train_tokenizer(path: Path, vocab_size: int = 400) -> int:
    from ftlm.data.tokenizer import train_tokenizer as train

    tokenizer = train(TEXTS * 4, vocab_size, min_frequency=1, show_progress=False)
    tokenizer.save(str(path))
    return tokenizer.vocab_size


def model_overrides(extra: list[str]) -> dict:
    from omegaconf import OmegaConf

    from ftlm.config import compose

    model = compose(["model=tiny"]).model  # conf/model/tiny.yaml over base.yaml
    small = ["n_layer=2", "d_model=64", "n_head=4", "n_kv_heads=2", "max_seq_len=64", "vocab_size=512"]
    model.merge_with_dotlist(small + [e.removeprefix("model.") for e in extra])
    return OmegaConf.to_container(model, resolve=True)


def main(run_dir: Path, extra: list[str]) -> None:
    import torch
    from omegaconf import OmegaConf

    from ftlm.checkpoint import tokenizer_fingerprint
    from ftlm.config import compose
    from ftlm.model import GPTConfig
    from ftlm.train import checkpoint
    from ftlm.train.engine import build_ds_config, build_engine, build_model, init_distributed, shutdown_distributed

    run_dir.mkdir(parents=True, exist_ok=True)
    n_vocab = train_tokenizer(run_dir / "tokenizer.json")
    model_cfg = GPTConfig.from_dict(model_overrides([e for e in extra if e.startswith("model.")]))
    assert n_vocab <= model_cfg.vocab_size
    # The trainer and deepspeed groups as the apps compose them from conf/, so the fixture follows the shipped
    # defaults (the trainer group refers to the model's and data's keys, so it is composed whole).
    preset = next((e.split("=", 1)[1] for e in extra if e.startswith("deepspeed=")), "zero3")
    small = ["micro_batch_size=2", "grad_accum=1", "seq_len=32", "warmup_steps=0", "max_steps=2", "lr=1e-2"]
    full = compose([f"deepspeed={preset}"] + [f"trainer.{o}" for o in small])
    trainer, ds_cfg = full.trainer, full.deepspeed

    d = init_distributed("cpu")
    ds_config = build_ds_config(trainer, ds_cfg, d.world_size, "fp32")
    torch.manual_seed(0)
    model = build_model(model_cfg, ds_config, d)
    engine, _ = build_engine(model, trainer, ds_cfg, ds_config, d)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        batch = torch.randint(0, n_vocab, (2, 33), generator=gen)
        _, loss = engine(batch[:, :-1], batch[:, 1:])
        engine.backward(loss)
        engine.step()
    config = {"model": asdict(model_cfg), "trainer": OmegaConf.to_container(trainer, resolve=True)}
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(config))
    state = {
        "step": 2,
        "tokens_seen": 2 * 2 * 32,
        "world_size": d.world_size,
        "model_config": asdict(model_cfg),
        "tokenizer_vocab": n_vocab,
        "tokenizer_sha256": tokenizer_fingerprint(run_dir / "tokenizer.json"),
        "config": config,
    }
    checkpoint.save(engine, run_dir / "checkpoints", 2, state, {"position": 0}, keep_last=3, rank=d.rank)
    # The trained weights, gathered by DeepSpeed itself, so tests can check consolidation against them.
    import deepspeed
    from safetensors.torch import save_file

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        reference = {k: v.detach().clone().contiguous() for k, v in engine.module.state_dict().items()}
    save_file(reference, str(run_dir / "reference_weights.safetensors"))
    shutdown_distributed()
    print(json.dumps({"run_dir": str(run_dir), "vocab": n_vocab}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main(Path(sys.argv[1]), sys.argv[2:])
