"""ftlm-train: pretrain a GPT with DeepSpeed.

    ftlm-train model=gpt_125m trainer.max_steps=2000                 # one process (or one GPU)
    deepspeed --num_gpus 8 --module ftlm.train.main model=gpt_1_3b    # every GPU of this machine

`Trainer.__init__` settles the run (checks, data, engine, components) and `Trainer.train` is the loop: one step,
then each component that is due (metrics, validation, samples, benchmarks, checkpoints). The parts live in
engine.py (distributed + DeepSpeed), schedule.py, checkpoint.py, metrics.py and components.py.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from ftlm.checkpoint import CheckpointError, TrainerState, tokenizer_fingerprint, write_atomic
from ftlm.config import ConfigError, expand_path, hydra_app
from ftlm.data.prepare import REFUSALS as DATA_REFUSALS
from ftlm.hf import HFImportError
from ftlm.model import ConfigError as ModelConfigError
from ftlm.model import GPTConfig
from ftlm.train import checkpoint
from ftlm.train.components import Bench, Checkpointer, Forgetting, Sampler, StopSignal, Validator
from ftlm.train.config import DeepSpeedConfig, TrainerConfig, check_deepspeed_config, check_trainer_config, typed
from ftlm.train.engine import (
    build_ds_config,
    build_engine,
    build_model,
    init_distributed,
    resolve_precision,
    shutdown_distributed,
)
from ftlm.train.init_from import (
    check_fits,
    continued_config,
    explicit_model_overrides,
    grown_config,
    load_into,
    source_config,
    source_weights,
)
from ftlm.train.metrics import Metrics, StepTimer, attach_log_file, close_logging, setup_logging
from ftlm.train.rundir import RunLock, RunLockError

log = logging.getLogger("ftlm.train")

__all__ = ["Trainer", "check_trainer_config", "model_config", "train"]


def model_config(model_cfg, tokenizer_vocab: int) -> GPTConfig:
    """The GPT config from conf/model, with vocab_size taken from the tokenizer when left null."""
    values = OmegaConf.to_container(model_cfg, resolve=True) if not isinstance(model_cfg, dict) else dict(model_cfg)
    if values.get("vocab_size") is None:
        values["vocab_size"] = 64 * math.ceil(tokenizer_vocab / 64)  # a multiple of 64 keeps matmuls aligned
    elif values["vocab_size"] < tokenizer_vocab:
        raise ConfigError(
            f"model.vocab_size={values['vocab_size']} is smaller than the tokenizer's vocabulary "
            f"({tokenizer_vocab}); set model.vocab_size=null to follow the tokenizer"
        )
    return GPTConfig.from_dict(values)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg) -> dict:
    """Train as configured; returns the history (logged losses, validations, final samples)."""
    t: TrainerConfig = typed(cfg.trainer, TrainerConfig)
    ds: DeepSpeedConfig = typed(cfg.deepspeed, DeepSpeedConfig)
    check_trainer_config(t)
    check_deepspeed_config(ds)
    # Every model key is checked now, before any data work: only the vocabulary waits for the tokenizer.
    early = model_config(cfg.model, tokenizer_vocab=1)
    if t.seq_len > early.max_seq_len and not t.init_from:  # with init_from the source's length counts
        raise ConfigError(f"trainer.seq_len={t.seq_len} is longer than model.max_seq_len={early.max_seq_len}")
    run_dir = Path(expand_path(t.out_dir))
    d = init_distributed(t.device)
    setup_logging(d.rank)
    lock = RunLock(run_dir)
    try:
        hold(lock, d)  # before anything reads the run directory: one training per run directory
        history = Trainer(cfg, t, ds, run_dir, d).train()
        shutdown_distributed(at_exit=True)  # every rank got here; a failure skips it (its barrier would wait)
        return history
    finally:
        lock.release()
        close_logging()


def hold(lock: RunLock, d) -> None:
    """Rank 0 takes the run directory's lock (a file: it holds across nodes sharing the directory); every rank
    learns whether it did, so a refused run stops everywhere with the holder's name."""

    def acquire():
        try:
            lock.acquire()
        except OSError as e:
            raise RunLockError(f"could not take the lock {lock.path}: {e}") from e

    on_rank_0(d, acquire)


class NonFiniteLoss(RuntimeError):
    """The loss diverged (NaN or inf on some rank): the run stops before it saves, every rank at the same step."""


class StoppedWithRank0(RuntimeError):
    """What the other ranks raise when rank 0's share of the setup failed; the message is rank 0's error."""


def on_rank_0(d, work):
    """`work()` on rank 0 alone, and every rank learns how it went (returns its result there, None elsewhere).

    When it raises, rank 0 raises the error as it is and every other rank raises the same refusal (or
    StoppedWithRank0) with its message, at once: a barrier would leave them waiting for a peer that has gone,
    until the process group's timeout, on every node.
    """
    result, error = None, None
    if d.is_main:
        try:
            result = work()
        except Exception as e:
            error = e
    kinds = (ConfigError, *REFUSALS)
    shared = [
        None if error is None else (next((i for i, k in enumerate(kinds) if isinstance(error, k)), -1), str(error))
    ]
    dist.broadcast_object_list(shared, src=0)
    if error is not None:
        raise error
    if shared[0] is not None:
        kind, message = shared[0]
        raise kinds[kind](message) if kind >= 0 else StoppedWithRank0(f"rank 0 stopped: {message}")
    return result


class Trainer:
    def __init__(self, cfg, t: TrainerConfig, ds: DeepSpeedConfig, run_dir: Path, d):
        from ftlm.data.stream import build_train_loader, build_val_loaders
        from ftlm.data.tokenizer import Tokenizer

        self.cfg, self.t, self.run_dir, self.d = cfg, t, run_dir, d
        self.precision = precision = resolve_precision(t.precision, d.device)
        self.zero_stage = ds.stage
        ckpt_root = run_dir / "checkpoints"

        # 1. What this run continues from, and every check against it, before anything is written.
        resume_from = checkpoint.resolve_resume(t.resume, ckpt_root)
        if resume_from is not None and TrainerState.from_file(resume_from).step > t.max_steps:
            raise ConfigError(
                f"trainer.max_steps={t.max_steps} is before the step of the checkpoint this run resumes from "
                f"({resume_from}): it would train nothing; give a larger trainer.max_steps, or resume from an "
                "earlier checkpoint with trainer.resume=<its path>"
            )
        tokenizer, model_cfg = self._settle_tokenizer_and_model(resume_from)

        # 2. Data (prepared with the run's own tokenizer when it has one), then the run's files.
        self.tokenizer, self.model_cfg = tokenizer, model_cfg
        self._write_run_files(resume_from)

        seq_len, micro, accum = t.seq_len, t.micro_batch_size, t.grad_accum
        self.tokens_per_step = micro * accum * d.world_size * seq_len
        ds_config = build_ds_config(t, ds, d.world_size, precision)
        self._log_setup(precision, ds_config["zero_optimization"]["stage"])
        if resume_from is not None:
            ds_config = checkpoint.adapt_ds_config(resume_from, ds_config, d.world_size, d.rank)

        # 3. Model (from trainer.init_from's weights, or initialised) and engine.
        seed_everything(t.seed)  # identical initial weights on every rank
        model = build_model(model_cfg, ds_config, d)
        model.activation_checkpointing = t.activation_checkpointing
        if t.init_from and resume_from is None:
            self._load_source(model, ds_config["zero_optimization"]["stage"] == 3)
        self._log_model()
        self.engine, self.scheduler = build_engine(model, t, ds, ds_config, d)
        seed_everything(t.seed + d.rank)  # dropout and sampling differ per rank

        prep = self.prepared  # this run's preparation, even if another has been made beside it since
        self.train_loader = build_train_loader(cfg.data, seq_len, micro, d.rank, d.world_size, t.seed, prep)
        val_loaders = build_val_loaders(cfg.data, seq_len, micro, d.rank, d.world_size, t.eval_batches, prep)

        self.state = TrainerState(
            step=0,
            tokens_seen=0,
            world_size=d.world_size,
            model_config=asdict(model_cfg),
            tokenizer_vocab=tokenizer.vocab_size,
            tokenizer_sha256=self.tokenizer_sha256,
            config=OmegaConf.to_container(cfg, resolve=True),
            precision=precision,
            zero_stage=ds_config["zero_optimization"]["stage"],
        )
        if resume_from is not None:
            saved, loader_state = checkpoint.load(self.engine, resume_from, d.rank, d.world_size)
            self.state.step, self.state.tokens_seen = saved.step, saved.tokens_seen
            self.state.extra = dict(saved.extra)  # what components keep there (the forgetting monitor's start)
            if loader_state is not None:
                self.train_loader.load_state_dict(loader_state)
            log.info(
                "resumed from %s at step %d (%s tokens seen)", resume_from, self.state.step, f"{saved.tokens_seen:,}"
            )
            if t.resume == "auto" and t.run_name == f"{cfg.model.name}-{cfg.data.name}":
                log.info(
                    "(%s is the default run name <model>-<data>, so this continued the earlier run of that name; "
                    "a separate run needs its own trainer.run_name=NAME)",
                    t.run_name,
                )

        # 4. The components the loop calls.
        from ftlm.plan import flops_per_token, peak_flops_per_device

        self.metrics = Metrics(
            run_dir,
            t.tensorboard,
            d.is_main,
            d.world_size,
            self.tokens_per_step,
            d.device,
            t.max_steps,
            t.log_interval,
            flops_per_token(model_cfg, seq_len),
            peak_flops_per_device(d.device, precision),
            start_step=self.state.step,
        )
        module = self.engine.module
        self.validator = Validator(
            module, val_loaders, d.device, tokenizer.token_byte_lengths(), t.eval_interval, t.max_steps, self.metrics
        )
        self.sampler = Sampler(
            module, tokenizer, t.sample_prompts, t.sample_tokens, t.sample_interval, t.max_steps, self.metrics
        )
        self.bench = Bench(module, tokenizer, t, d, self.metrics)
        self.forgetting = Forgetting(self.validator, t.forgetting_warn, self.state) if t.init_from else None
        self.checkpointer = Checkpointer(
            self.engine, ckpt_root, self.state, self.train_loader, t.save_interval, t.max_steps, t.keep_last, d.rank
        )
        self.frozen = None
        if t.train_only != "all" and (t.unfreeze_at is None or self.state.step < t.unfreeze_at):
            from ftlm.hf import FrozenWeights

            n_old = Tokenizer.load(self.source_tokenizer).vocab_size
            self.frozen = FrozenWeights(self.engine, t.train_only, n_old_rows=n_old)
        self.timer = StepTimer(d.device)
        self.stop = StopSignal(d.device)

    def _load_source(self, model, zero3: bool) -> None:
        t = self.t

        def read():  # one copy of the source's weights, on rank 0, checked before any rank starts copying
            state = source_weights(t.init_from, self.model_cfg, self.source_tokenizer, self.tokenizer_path)[0]
            check_fits(state, model)
            return state

        state = on_rank_0(self.d, read)
        load_into(model, state, zero3, self.d.rank)
        log.info("initialised from %s; optimizer and learning-rate schedule start fresh", self.t.init_from)

    # -- the loop ------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        t, state = self.t, self.state
        batches = iter(self.train_loader)
        log.info(
            "training from step %d to %d; logs, checkpoints and TensorBoard in %s",
            state.step,
            t.max_steps,
            self.run_dir,
        )
        if state.step >= t.max_steps:
            log.info("the run is at step %d, trainer.max_steps, already: nothing to train", state.step)
        checked = state.step  # the last step the loss check passed
        while state.step < t.max_steps:
            lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses
            self.train_step(batches, measure=self.metrics.due(state.step + 1))
            state.step += 1
            state.tokens_seen += self.tokens_per_step
            step = state.step

            if self.metrics.due(step):
                self.metrics.log(step, self.step_values(lr))
            if self.validator.due(step):
                self.validator.run(step)
                if self.forgetting is not None:
                    self.forgetting.after_validation(step)
            if self.sampler.due(step):
                self.sampler.run(step)
            if self.bench.due(step):
                self.bench.run(step)
            if self.frozen is not None and t.unfreeze_at is not None and step >= t.unfreeze_at:
                self.frozen.release()  # trainer.unfreeze_at: every weight trains from the next step
                self.frozen = None
            # The stop flag and the loss check cost a collective and a host sync: at log and save boundaries only.
            stopping = False
            if self.metrics.due(step) or self.checkpointer.due(step):
                stopping, nonfinite = self.stop.any_rank(self.metrics.nonfinite)
                if nonfinite:  # before the save: diverged weights never become the newest checkpoint
                    raise NonFiniteLoss(self._nonfinite_message(step, checked))
                checked = step
            if self.checkpointer.due(step) or stopping:
                self.checkpointer.save()
            if stopping:
                log.warning("stopped at step %d after a signal; resume with trainer.resume=auto", step)
                break
        return self.finish()

    def _nonfinite_message(self, step: int, checked: int) -> str:
        root = self.run_dir / "checkpoints"
        newest = checkpoint.find_latest(root) if root.is_dir() else None
        where = f"step {TrainerState.from_file(newest).step}" if newest is not None else "none yet"
        return (
            f"the training loss was NaN or infinite on some rank between step {checked + 1} and step {step}: "
            f"stopping without saving (newest checkpoint: {where}; trainer.resume=auto resumes there). Lower "
            "trainer.lr, lengthen trainer.warmup_steps, set trainer.grad_clip, or train in bf16 rather than fp16"
        )

    def train_step(self, batches, measure: bool) -> None:
        """One optimizer step: trainer.grad_accum micro-batches through forward and backward, then the update."""
        engine, timer, device = self.engine, self.timer, self.d.device
        timer.measure_next(measure)
        for _ in range(self.t.grad_accum):
            with timer.phase("data_wait"):
                batch = next(batches).to(device, non_blocking=True)
            with timer.phase("forward"):
                _, loss = engine(
                    batch.inputs, batch.targets, positions=batch.positions, cu_seqlens=batch.cu_seqlens
                )  # inputs, targets, positions: (B, S); cu_seqlens: (documents + 1,)
            with timer.phase("backward"):
                engine.backward(loss)
            with timer.phase("optimizer"):
                if self.frozen is not None:
                    self.frozen.before_step()  # frozen weights get no gradient (at the accumulation boundary)
                engine.step()  # DeepSpeed applies the update on the last micro-batch of the accumulation
                if self.frozen is not None:
                    self.frozen.after_step()  # ... and keep their values exactly (weight decay would move them)
            self.metrics.record(loss)
        self.metrics.tick()

    def step_values(self, lr: float) -> dict[str, float]:
        """What a log line reports beside the loss (every rank computes it: the grad norm is global)."""
        grad_norm = self.engine.get_global_grad_norm()
        values = {
            "train/lr": lr,
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "train/tokens_seen": self.state.tokens_seen,
        }
        values.update(loader_stats(self.train_loader, self.d.device))
        values.update({f"time/{k}_s": v for k, v in self.timer.pop().items()})  # of this step alone
        return values

    def finish(self) -> dict:
        final = self.sampler.run(self.state.step, show=True)
        if self.forgetting is not None:
            self.forgetting.report()
        self.metrics.summary()
        self.metrics.close()
        self.stop.close()
        log.info("done: %d steps, run directory %s", self.state.step, self.run_dir)
        return {
            "loss": dict(self.metrics.losses),
            "val": dict(self.validator.history),
            "samples": final,
        }

    # -- setting up ----------------------------------------------------------------------------------------------
    def _settle_tokenizer_and_model(self, resume_from: Path | None):
        """The tokenizer (the run's own when resuming, the source's with trainer.init_from), the model config, and
        the checks of both against the checkpoint; then the data is prepared. Nothing in the run directory or the
        data cache is written before every check has passed."""
        from ftlm.data.prepare import prepare
        from ftlm.data.tokenizer import Tokenizer

        cfg, d, t = self.cfg, self.d, self.t
        fixed, src_cfg, model_cfg = None, None, None
        explicit = explicit_model_overrides()
        if t.init_from:
            src_cfg, self.source_tokenizer = source_config(t.init_from)
            src_cfg = continued_config(src_cfg, cfg.model, explicit, t.init_from)
        if resume_from is not None:
            fixed = run_tokenizer(resume_from)
            tokenizer = Tokenizer.load(fixed)
            if t.init_from:  # the shape is the checkpoint's (the source's, grown with the vocabulary)
                saved = TrainerState.from_file(resume_from).gpt_config()
                model_cfg = continued_config(saved, cfg.model, explicit, str(resume_from))
            else:
                model_cfg = model_config(cfg.model, tokenizer.vocab_size)
            checkpoint.check_compatible(
                resume_from,
                model_cfg,
                tokenizer.vocab_size,
                tokenizer_fingerprint(fixed),
                self.precision,
                self.zero_stage,
            )
            check_same_tokenizer_settings(resume_from, cfg)
        elif t.init_from and cfg.data.tokenizer.extend_from is None:
            fixed = self.source_tokenizer  # the source's tokenizer as it is (extend_from: its extension)

        prepared = on_rank_0(d, lambda: prepare(cfg.data, tokenizer_path=fixed))
        if not d.is_main:
            prepared = prepare(cfg.data, tokenizer_path=fixed)  # finds rank 0's finished preparation at once
        if model_cfg is None:
            tokenizer = Tokenizer.load(prepared.tokenizer_path)
            if src_cfg is not None:
                model_cfg = grown_config(src_cfg, self.source_tokenizer, Path(prepared.tokenizer_path))
            else:
                model_cfg = model_config(cfg.model, tokenizer.vocab_size)
        if t.seq_len > model_cfg.max_seq_len:
            raise ConfigError(
                f"trainer.seq_len={t.seq_len} is longer than the model's max_seq_len={model_cfg.max_seq_len}"
            )
        self.prepared = prepared
        self.tokenizer_path = Path(prepared.tokenizer_path)
        self.tokenizer_sha256 = tokenizer_fingerprint(self.tokenizer_path)
        return tokenizer, model_cfg

    def _write_run_files(self, resume_from: Path | None) -> None:
        """config.yaml and tokenizer.json (the checks have passed); train.log from here on."""
        on_rank_0(self.d, lambda: self._write_run_files_on_rank_0(resume_from))

    def _write_run_files_on_rank_0(self, resume_from: Path | None) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None and self.t.resume == "never":
            checkpoint.start_fresh(self.run_dir)  # earlier checkpoints are moved aside, never deleted
        write_atomic(self.run_dir / "config.yaml", OmegaConf.to_yaml(self.cfg, resolve=True))
        own = self.run_dir / "tokenizer.json"
        if not own.exists() or tokenizer_fingerprint(own) != self.tokenizer_sha256:
            tmp = own.with_name(own.name + ".tmp")
            shutil.copyfile(self.tokenizer_path, tmp)
            tmp.replace(own)
        attach_log_file(self.run_dir)

    def _log_setup(self, precision: str, stage: int) -> None:
        t, d = self.t, self.d
        global_seqs = t.micro_batch_size * t.grad_accum * d.world_size
        log.info(
            "world size %d (%d nodes x %d per node), device %s, precision %s, DeepSpeed ZeRO stage %d",
            d.world_size,
            d.world_size // d.local_world_size,
            d.local_world_size,
            d.device.type,
            precision,
            stage,
        )
        log.info(
            "global batch: %d sequences = %d micro-batch x %d accumulation x %d ranks = %s tokens per step",
            global_seqs,
            t.micro_batch_size,
            t.grad_accum,
            d.world_size,
            f"{global_seqs * t.seq_len:,}",
        )

    def _log_model(self) -> None:
        m = self.model_cfg
        log.info(
            "model %s: %s parameters (%s without embeddings), %d layers, d_model %d, %d heads (%d kv), vocab %d",
            m.name,
            f"{m.num_params():,}",
            f"{m.num_params(include_embedding=False):,}",
            m.n_layer,
            m.d_model,
            m.n_head,
            m.n_kv_heads,
            m.vocab_size,
        )


def run_tokenizer(ckpt: Path) -> Path:
    """The tokenizer.json of the run that wrote `ckpt` (<run>/checkpoints/step_X): fixed for the run's life."""
    path = ckpt.parent.parent / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(
            f"checkpoint {ckpt} has no tokenizer.json in its run directory ({path}); a run's tokenizer is fixed "
            "at its first step, so it cannot be resumed without it"
        )
    return path


def check_same_tokenizer_settings(ckpt: Path, cfg) -> None:
    """Refuse tokenizer settings that differ from the checkpoint's run: its tokenizer.json is reused as it is,
    so a different data.tokenizer.* would silently mean nothing (or, retrained, scramble the token ids)."""
    saved = TrainerState.from_file(ckpt).config or {}
    before = (saved.get("data") or {}).get("tokenizer")
    if before is None:
        return
    now = OmegaConf.to_container(cfg.data.tokenizer, resolve=True)

    def setting(value):  # {} and null say the same (sample_shares: equal shares; base.yaml wrote null before)
        return None if value == {} else value

    diff = [
        f"data.tokenizer.{k}: run {before.get(k)!r}, now {now.get(k)!r}"
        for k in sorted(set(before) | set(now))
        if k != "path" and setting(before.get(k)) != setting(now.get(k))
    ]
    if diff:
        raise ConfigError(
            f"this run's tokenizer is fixed (it continues from {ckpt}, whose run's tokenizer.json is reused), "
            f"but the tokenizer settings changed: {'; '.join(diff)}. Drop those overrides, or start a new run "
            "with its own trainer.run_name"
        )


def loader_stats(loader, device) -> dict[str, float]:
    """What the loader reports about its packing since the last call (train/pad_fraction, train/cut_doc_share),
    averaged over the ranks."""
    stats = getattr(loader, "stats", None)
    if stats is None:
        return {}
    values = stats()
    keys = sorted(values)
    if not keys:
        return {}
    mean = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(mean)
    mean /= dist.get_world_size()
    return {f"train/{k}": v for k, v in zip(keys, mean.tolist())}


# A run refused because of what it was given (config, data, source model, checkpoint, a run directory in use), or a
# checkpoint the disk had no room for (the message says how much, the previous checkpoint is intact): one line
# `ftlm-train: error: ...` and exit status 2, on every rank that refuses, before or after training starts.
REFUSALS = (
    ModelConfigError,
    HFImportError,
    CheckpointError,
    checkpoint.CheckpointSaveError,
    RunLockError,
    StoppedWithRank0,
    NonFiniteLoss,
    *DATA_REFUSALS,
)


@hydra_app(refusals=REFUSALS, prog="ftlm-train")
def main(cfg):
    in_own_dir(cfg)
    train(cfg)


def in_own_dir(cfg) -> None:
    """In a sweep (-m), each job trains in its own run directory, <sweep dir>/<job number>, unless the job names
    one (trainer.out_dir among its overrides): otherwise all jobs would share one, each resuming the one before.
    trainer.run_name names the sweep's folder (<runs_dir>/sweeps/<run_name>-<time>), not a job's."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    named = ("trainer.out_dir=", "+trainer.out_dir=", "++trainer.out_dir=")
    if any(o.startswith(named) for o in HydraConfig.get().overrides.task):
        return
    with open_dict(cfg):
        cfg.trainer.out_dir = HydraConfig.get().runtime.output_dir


if __name__ == "__main__":
    main()
