"""ftlm-train: pretrain a GPT with DeepSpeed.

    ftlm-train model=gpt_125m trainer.max_steps=2000                 # one process (or one GPU)
    deepspeed --num_gpus 8 --module ftlm.train.main model=gpt_1_3b    # every GPU of this machine

The loop below only orders the components: data (ftlm.data), engine (engine.py), schedule (schedule.py),
checkpoints (checkpoint.py) and metrics (metrics.py).
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import signal
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from ftlm.config import hydra_app
from ftlm.model import GPTConfig
from ftlm.train import checkpoint
from ftlm.train.engine import build_ds_config, build_engine, build_model, init_distributed, resolve_precision
from ftlm.train.metrics import Metrics, StepTimer, memory_stats, setup_logging

log = logging.getLogger("ftlm.train")


def model_config(model_cfg, tokenizer_vocab: int) -> GPTConfig:
    """The GPT config from conf/model, with vocab_size taken from the tokenizer when left null."""
    values = OmegaConf.to_container(model_cfg, resolve=True)
    if values.get("vocab_size") is None:
        values["vocab_size"] = 64 * math.ceil(tokenizer_vocab / 64)  # a multiple of 64 keeps matmuls aligned
    elif values["vocab_size"] < tokenizer_vocab:
        raise ValueError(
            f"model.vocab_size={values['vocab_size']} is smaller than the tokenizer's vocabulary "
            f"({tokenizer_vocab}); set model.vocab_size=null to follow the tokenizer"
        )
    return GPTConfig.from_dict(values)


def check_trainer_config(t) -> None:
    """Fail on settings that cannot work before anything is allocated."""
    for key in ("max_steps", "micro_batch_size", "grad_accum", "seq_len", "log_interval"):
        if int(t[key]) <= 0:
            raise ValueError(f"trainer.{key} must be a positive integer, got {t[key]}")
    if float(t.lr) <= 0:
        raise ValueError(f"trainer.lr must be positive, got {t.lr}")
    if not 0.0 <= float(t.min_lr_ratio) <= 1.0:
        raise ValueError(f"trainer.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")


class StopSignal:
    """SIGTERM (sent by SLURM before preemption) or SIGINT: finish the step, save, exit cleanly."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.requested = True
        log.warning("received %s: saving a checkpoint after this step, then exiting", signal.Signals(signum).name)

    def any_rank(self, device) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg) -> dict:
    from ftlm.data.prepare import prepare
    from ftlm.data.stream import build_train_loader, build_val_loaders
    from ftlm.data.tokenizer import Tokenizer

    t = cfg.trainer
    check_trainer_config(t)
    # Every model key is checked now, before any data work: only the vocabulary waits for the tokenizer.
    early = model_config(cfg.model, tokenizer_vocab=1)
    if int(t.seq_len) > early.max_seq_len:
        raise ValueError(f"trainer.seq_len={t.seq_len} is longer than model.max_seq_len={early.max_seq_len}")
    run_dir = Path(str(t.out_dir)).expanduser()
    d = init_distributed(str(t.device))
    setup_logging(run_dir, d.rank)
    precision = resolve_precision(str(t.precision), d.device)

    # Data first: the tokenizer fixes the vocabulary, and a bad data config fails before the model is built.
    if d.is_main:
        prepared = prepare(cfg.data)
    dist.barrier()
    if not d.is_main:
        prepared = prepare(cfg.data)  # finds rank 0's finished preparation and returns at once
    tokenizer = Tokenizer.load(prepared.tokenizer_path)
    model_cfg = model_config(cfg.model, tokenizer.vocab_size)

    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        shutil.copyfile(prepared.tokenizer_path, run_dir / "tokenizer.json")

    seq_len, micro, accum = int(t.seq_len), int(t.micro_batch_size), int(t.grad_accum)
    global_seqs = micro * accum * d.world_size
    ds_config = build_ds_config(t, cfg.deepspeed, d.world_size, precision)
    log.info(
        "world size %d (%d nodes x %d per node), device %s, precision %s, DeepSpeed ZeRO stage %d",
        d.world_size,
        d.world_size // d.local_world_size,
        d.local_world_size,
        d.device.type,
        precision,
        ds_config["zero_optimization"]["stage"],
    )
    log.info(
        "global batch: %d sequences = %d micro-batch x %d accumulation x %d ranks = %s tokens per step",
        global_seqs,
        micro,
        accum,
        d.world_size,
        f"{global_seqs * seq_len:,}",
    )

    # Which checkpoint to continue from is settled before any weights exist, so a mismatch fails early.
    ckpt_root = run_dir / "checkpoints"
    resume_from = checkpoint.resolve_resume(t.resume, ckpt_root)
    tokenizer_sha256 = checkpoint.tokenizer_fingerprint(prepared.tokenizer_path)
    if resume_from is not None:
        checkpoint.check_compatible(resume_from, model_cfg, tokenizer.vocab_size, tokenizer_sha256)
        ds_config = checkpoint.adapt_ds_config(resume_from, ds_config, d.world_size, d.rank)

    seed_everything(int(t.seed))  # identical initial weights on every rank
    model = build_model(model_cfg, ds_config, d)
    model.activation_checkpointing = bool(t.activation_checkpointing)
    log.info(
        "model %s: %s parameters (%s without embeddings), %d layers, d_model %d, %d heads (%d kv), vocab %d",
        model_cfg.name,
        f"{model_cfg.num_params():,}",
        f"{model_cfg.num_params(include_embedding=False):,}",
        model_cfg.n_layer,
        model_cfg.d_model,
        model_cfg.n_head,
        model_cfg.n_kv_heads,
        model_cfg.vocab_size,
    )
    engine, scheduler = build_engine(model, t, cfg.deepspeed, ds_config, d)
    seed_everything(int(t.seed) + d.rank)  # dropout and sampling differ per rank

    train_loader = build_train_loader(cfg.data, seq_len, micro, d.rank, d.world_size, int(t.seed))
    val_loaders = build_val_loaders(cfg.data, seq_len, micro, d.rank, d.world_size, int(t.eval_batches))
    token_bytes = tokenizer.token_byte_lengths()

    step, tokens_seen = 0, 0
    if resume_from is not None:
        state, loader_state = checkpoint.load(engine, resume_from, d.rank, d.world_size)
        step, tokens_seen = int(state["step"]), int(state["tokens_seen"])
        if loader_state is not None:
            train_loader.load_state_dict(loader_state)
        log.info("resumed from %s at step %d (%s tokens seen)", resume_from, step, f"{tokens_seen:,}")

    from ftlm.plan import flops_per_token, peak_flops_per_device

    metrics = Metrics(
        run_dir,
        bool(t.tensorboard),
        d.is_main,
        d.world_size,
        global_seqs * seq_len,
        flops_per_token(model_cfg, seq_len),
        peak_flops_per_device(d.device, precision),
        start_step=step,
    )
    timer = StepTimer(d.device)
    stop = StopSignal()
    batches = iter(train_loader)
    history = {"loss": {}, "val": {}}
    window_loss = torch.zeros(2, dtype=torch.float64, device=d.device)  # loss sum, micro-batches
    start_step, start_time = step, time.perf_counter()

    def save():
        checkpoint.save(
            engine,
            ckpt_root,
            step,
            {
                "step": step,
                "tokens_seen": tokens_seen,
                "world_size": d.world_size,
                "model_config": asdict(model_cfg),
                "tokenizer_vocab": tokenizer.vocab_size,
                "tokenizer_sha256": tokenizer_sha256,
                "config": OmegaConf.to_container(cfg, resolve=True),
            },
            train_loader.state_dict(),
            int(t.keep_last),
            d.rank,
        )

    max_steps = int(t.max_steps)

    def due(at_step: int, every) -> bool:
        """Whether a periodic task runs after `at_step`: every `every` steps and after the last (0 turns it off)."""
        return int(every) > 0 and (at_step % int(every) == 0 or at_step == max_steps)

    log.info("training from step %d to %d; logs, checkpoints and TensorBoard in %s", step, max_steps, run_dir)
    while step < max_steps:
        lr = scheduler.get_last_lr()[0]  # the rate this step's update uses
        timer.measure_next(due(step + 1, t.log_interval))
        for _ in range(accum):
            with timer.phase("data_wait"):
                batch = next(batches).to(d.device, non_blocking=True)
            with timer.phase("forward"):
                _, loss = engine(batch[:, :-1], batch[:, 1:])
            with timer.phase("backward"):
                engine.backward(loss)
            with timer.phase("optimizer"):
                engine.step()  # DeepSpeed applies the update on the last micro-batch of the accumulation
            window_loss += torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64, device=d.device)])
        step += 1
        tokens_seen += global_seqs * seq_len
        metrics.tick()

        if due(step, t.log_interval):
            dist.all_reduce(window_loss)
            mean_loss = (window_loss[0] / window_loss[1]).item()
            window_loss.zero_()
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            values = {
                "train/loss": mean_loss,
                "train/lr": lr,
                "train/grad_norm": grad_norm,
                "train/tokens_seen": tokens_seen,
                **metrics.throughput(),
                **memory_stats(d.device),
            }
            values.update({f"time/{k}_s": v for k, v in timer.pop().items()})  # of this step alone
            metrics.scalars(values, step)
            history["loss"][step] = mean_loss
            elapsed = time.perf_counter() - start_time
            eta = elapsed / max(1, step - start_step) * (max_steps - step)
            mfu = f" | MFU {values['train/mfu']:.1%}" if "train/mfu" in values else ""
            log.info(
                "step %d/%d (%.0f%%) | loss %.4f | lr %.2e | grad norm %.3f | %s tokens/s%s | ETA %s",
                step,
                max_steps,
                100 * step / max_steps,
                mean_loss,
                lr,
                grad_norm,
                f"{values['train/tokens_per_sec']:,.0f}",
                mfu,
                _duration(eta),
            )

        if due(step, t.eval_interval):
            from ftlm.eval.loss import evaluate

            val = evaluate(engine.module, val_loaders, d.device, token_bytes)
            metrics.scalars(val, step)
            history["val"][step] = val
            log.info(
                "validation at step %d: %s",
                step,
                ", ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in sorted(val.items())),
            )

        if due(step, t.sample_interval) and step < max_steps:  # the last step's samples come below
            for prompt, text in samples(engine.module, tokenizer, t).items():
                metrics.text(f"samples/{prompt}", text, step)

        stopping = stop.any_rank(d.device)
        if due(step, t.save_interval) or step == max_steps or stopping:  # a final checkpoint always
            save()
        if stopping:
            log.warning("stopped at step %d after a signal; resume with trainer.resume=auto", step)
            break

    final = samples(engine.module, tokenizer, t)
    for prompt, text in final.items():
        log.info("sample  %r -> %r", prompt, text)
        metrics.text(f"samples/{prompt}", text, step)
    metrics.close()
    losses = list(history["loss"].values())
    if len(losses) >= 2:
        log.info(
            "loss went from %.4f to %.4f (%.0f%% of the first logged value)",
            losses[0],
            losses[-1],
            100 * losses[-1] / losses[0],
        )
    log.info("done: %d steps, run directory %s", step, run_dir)
    history["samples"] = final
    return history


def samples(model, tokenizer, t) -> dict[str, str]:
    """Greedy continuations of the configured prompts (every rank takes part: ZeRO-3 gathers weights)."""
    from ftlm.eval.generate import generate

    out = {}
    for prompt in t.sample_prompts:
        ids = list(generate(model, tokenizer.encode(prompt), int(t.sample_tokens), eos_id=tokenizer.eot_id))
        out[prompt] = prompt + tokenizer.decode(ids)
    return out


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


@hydra_app()
def main(cfg):
    train(cfg)


if __name__ == "__main__":
    main()
