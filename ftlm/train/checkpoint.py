"""The trainer's checkpointer: saving and loading the DeepSpeed engine, resuming on another number of ranks, pruning.

The format itself (tags, manifest with checksums, trainer state, safe loading) is `ftlm.checkpoint`, which the
readers (ftlm-generate, ftlm-eval, ftlm-export) share.

A save goes to `step_X.tmp/` and is renamed once every rank has finished writing, so a job killed mid-save
leaves the previous checkpoint untouched; the next save deletes such leftovers. A save that finds the disk too
full fails before writing anything, and one that fills it midway (on any rank) removes its partial folder and says
so on every rank.

No checkpoint is ever deleted implicitly: starting over (trainer.resume=never) in a run directory with
checkpoints, or going back to an older step, moves the checkpoints concerned aside into
`<run>/set_aside/<time>-<reason>/` (a name never reused), with the run's tokenizer and config beside them so
that folder is itself a run directory ftlm-generate and ftlm-export read. Only trainer.keep_last deletes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import random
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ftlm.checkpoint import format as fmt
from ftlm.checkpoint.atomic import free_bytes, is_disk_full, tree_size, write_atomic
from ftlm.checkpoint.format import (
    LATEST,
    MANIFEST,
    TAG_RE,
    TRAINER_STATE,
    UNIVERSAL,
    TrainerState,
    arch_values,
    find_latest,
    list_checkpoints,
    safe_load,
    tag_for,
    validate,
    weights_only_loading,
)
from ftlm.config import ConfigError

log = logging.getLogger(__name__)

SET_ASIDE = "set_aside"  # <run>/set_aside/<time>-<reason>/: checkpoints moved out of the way, never deleted
GB = 1e9
PRUNING = ".pruned.tmp"  # suffix of a checkpoint being deleted by trainer.keep_last


class CheckpointSaveError(RuntimeError):
    """A save that could not be completed; the previous checkpoint is untouched and the message says why."""


def _write_manifest(folder: Path, **extra) -> None:
    fmt.write_manifest(folder, **extra)


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _gather(obj) -> list:
    """obj from every rank (a list of one without a process group)."""
    rank, world = _dist()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# -- RNG -----------------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
    }
    np_state = np.random.get_state()
    state["numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    state["numpy_pos"], state["numpy_gauss"], state["numpy_cached"] = (
        int(np_state[2]),
        int(np_state[3]),
        float(np_state[4]),
    )
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(
        (
            "MT19937",
            state["numpy"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_gauss"],
            state["numpy_cached"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- finding a checkpoint ------------------------------------------------------------------------------------------
def check_shared(ckpt: Path) -> str | None:
    """validate() with checksums, the hashing shared out between the ranks (each reads the files it wrote);
    every rank gets the same answer. Without a process group, one process checks everything."""
    rank, world = _dist()
    problem = validate(ckpt, checksums=True, rank=rank, world_size=world)
    problems = [p for p in _gather(problem) if p is not None]
    return problems[0] if problems else None


def resolve_resume(resume, root: Path) -> Path | None:
    """trainer.resume: 'auto' (newest intact in the run, or none), 'never', or a checkpoint path.

    Every rank calls this (the checksum work is shared). With 'auto', a corrupted newest checkpoint is skipped
    with a warning naming its bad file and the next intact one is taken.
    """
    if resume in (None, "never", "none", False):
        return None
    if resume == "auto":
        found = find_latest(root, check=check_shared)
        if found is None and list_checkpoints(root):
            log.warning("training starts from step 0: no checkpoint in %s is intact", root)
        return found
    path = Path(str(resume)).expanduser()
    if not path.exists():
        raise ConfigError(
            f"trainer.resume: checkpoint {path} does not exist "
            "(give a step_XXXXXXXX folder, a run's checkpoints/ folder, auto, or never)"
        )
    if path.is_dir() and not (path / MANIFEST).exists() and (path / "checkpoints").is_dir():
        path = path / "checkpoints"  # a run directory
    if path.is_dir() and not (path / MANIFEST).exists() and list_checkpoints(path):
        found = find_latest(path, check=check_shared)  # a run's checkpoints/ folder: take its newest intact one
        if found is None:
            raise ConfigError(f"trainer.resume: no complete checkpoint under {path}")
        return found
    problem = check_shared(path)
    if problem:
        raise ConfigError(f"trainer.resume: checkpoint {path} is not usable: {problem}")
    return path


def check_compatible(
    ckpt: Path,
    model_cfg,
    tokenizer_vocab: int | None = None,
    tokenizer_sha256: str | None = None,
    precision: str | None = None,
    zero_stage: int | None = None,
) -> None:
    """Refuse a checkpoint written for another model or tokenizer, or by DeepSpeed in another precision or ZeRO
    stage (whose optimizer files it would not find), before any weights are touched, naming the keys."""
    state = TrainerState.from_file(ckpt)
    check_same_engine(ckpt, state, precision, zero_stage)
    saved, wanted = arch_values(state.model_config), arch_values(model_cfg)
    diff = [f"model.{k}: checkpoint {saved[k]!r}, config {wanted[k]!r}" for k in saved if saved[k] != wanted[k]]
    if diff:
        raise ConfigError(f"checkpoint {ckpt} was made by another model config: " + "; ".join(diff))
    saved_vocab = state.tokenizer_vocab
    if tokenizer_vocab is not None and saved_vocab is not None and saved_vocab != tokenizer_vocab:
        raise ConfigError(
            f"checkpoint {ckpt} was trained with a tokenizer of {saved_vocab} tokens, but this run's "
            f"tokenizer (data.tokenizer / the prepared data) has {tokenizer_vocab}: token ids would "
            "mean different text; resume with the data the checkpoint was trained on"
        )
    if tokenizer_vocab is not None and tokenizer_vocab > int(saved["vocab_size"]):
        raise ConfigError(
            f"checkpoint {ckpt} has model.vocab_size={saved['vocab_size']}, smaller than this run's "
            f"tokenizer ({tokenizer_vocab} tokens)"
        )
    if tokenizer_sha256 is not None and state.tokenizer_sha256 not in (None, tokenizer_sha256):
        log.warning(
            "this run's tokenizer.json differs from the one checkpoint %s was trained with (same vocabulary "
            "size); continuing, but token ids may now mean different text",
            ckpt,
        )


def check_same_engine(ckpt: Path, state: TrainerState, precision: str | None, zero_stage: int | None) -> None:
    trained = state.config or {}
    saved_precision = state.precision or (trained.get("trainer") or {}).get("precision")
    saved_stage = state.zero_stage if state.zero_stage is not None else (trained.get("deepspeed") or {}).get("stage")
    if precision is not None and saved_precision not in (None, "auto") and saved_precision != precision:
        raise ConfigError(
            f"checkpoint {ckpt} was trained in {saved_precision}, and this run would train in {precision} "
            f"(trainer.precision): DeepSpeed keeps the optimizer state per precision, so it resumes only in "
            f"{saved_precision}: set trainer.precision={saved_precision}"
        )
    if zero_stage is not None and saved_stage is not None and int(saved_stage) != zero_stage:
        raise ConfigError(
            f"checkpoint {ckpt} was written under ZeRO stage {saved_stage}, and this run uses stage {zero_stage} "
            f"(deepspeed.stage): DeepSpeed lays out the optimizer state per stage, so it resumes only under stage "
            f"{saved_stage}: set deepspeed.stage={saved_stage} (or the deepspeed= preset it was trained with)"
        )


# -- resuming on another number of ranks ---------------------------------------------------------------------------
def saved_world_size(ckpt: Path) -> int:
    return TrainerState.from_file(ckpt).world_size


def convert_to_universal(ckpt: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal: ZeRO shards of any world size -> one folder per parameter (fp32 + Adam moments)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(
        input_folder=str(ckpt),
        output_folder=str(out),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    chatter = io.StringIO()  # ds_to_universal prints its progress; keep it for the debug log
    with weights_only_loading(), contextlib.redirect_stdout(chatter):
        ds_to_universal(args)
    log.debug("ds_to_universal output:\n%s", chatter.getvalue())
    (out.parent / "latest_universal").unlink(missing_ok=True)  # DeepSpeed's pointer; loads here name the folder


def universal_copy(ckpt: Path, rank: int) -> Path:
    """`ckpt/universal`, converted by rank 0 the first time it is needed (atomically, like a save); all ranks wait.

    Other jobs may resume from the same checkpoint at the same time (runs forked from it): each converts into a
    folder of its own and the first to finish publishes it; a job that finds the copy published meanwhile uses it
    and never removes what another job may be writing or reading.
    """
    out = ckpt / UNIVERSAL
    error = None
    if rank == 0 and validate(out) is not None:
        tmp = ckpt / f"{UNIVERSAL}.tmp-{socket.gethostname()}-{os.getpid()}"
        try:
            if out.exists():  # published but not valid: a damaged copy, never one being written (those are tmp)
                shutil.rmtree(out, ignore_errors=True)
            log.info("converting %s to DeepSpeed's universal checkpoint format (once; kept in %s)", ckpt, out)
            convert_to_universal(ckpt, tmp)
            _write_manifest(tmp)
            try:
                os.replace(tmp, out)
            except OSError:
                if validate(out) is not None:  # not another job's finished copy: a real failure
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another job published first: use its copy
        except Exception as e:  # raised after the barrier, so the other ranks do not wait forever
            shutil.rmtree(tmp, ignore_errors=True)
            error = e
    _barrier()
    if error is not None:
        raise RuntimeError(
            f"could not convert checkpoint {ckpt} to DeepSpeed's universal format ({error}); the conversion is "
            f"written beside the checkpoint: resume on the {TrainerState.from_file(ckpt).world_size} rank(s) "
            "that wrote it, or from a writable copy of it"
        ) from error
    problem = validate(out)
    if problem:
        raise RuntimeError(f"universal copy {out} of checkpoint {ckpt} is not usable: {problem}")
    return out


def adapt_ds_config(ckpt: Path, ds_config: dict, world_size: int, rank: int) -> dict:
    """The DeepSpeed config needed to load `ckpt` with this many ranks (unchanged when the count matches).

    On another world size the checkpoint is first converted (rank 0, once) to DeepSpeed's universal format, which
    DeepSpeed re-partitions over the new ranks when `checkpoint.load_universal` is set before initialisation.
    """
    saved = saved_world_size(ckpt)
    if saved == world_size:
        return ds_config
    if rank == 0:
        log.warning(
            "checkpoint written by %d ranks, resuming on %d: re-partitioned through DeepSpeed's universal "
            "checkpoint format",
            saved,
            world_size,
        )
    universal_copy(ckpt, rank)
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


# -- never deleting: setting checkpoints aside ---------------------------------------------------------------------
def set_aside(root: Path, ckpts: list[Path], reason: str) -> Path | None:
    """Move `ckpts` (folders under `root`) into a new `<run>/set_aside/<UTC time>-<reason>/checkpoints/`.

    The folder name is never reused (a clash gets a counter), nothing is deleted, and the run's tokenizer.json
    and config.yaml are copied beside them, so the folder is a run directory of its own. Returns it (None when
    there was nothing to move). Rank 0 only, while no save runs.
    """
    ckpts = [c for c in ckpts if c.exists()]
    if not ckpts:
        return None
    run_dir = Path(root).parent
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = run_dir / SET_ASIDE
    base.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        dest = base / (f"{stamp}-{reason}" if n == 1 else f"{stamp}-{reason}-{n}")
        try:
            dest.mkdir()  # fails if it exists: never two sets in one folder
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover
        raise RuntimeError(f"cannot find a free name under {base}")
    (dest / "checkpoints").mkdir()
    for name in ("tokenizer.json", "config.yaml"):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, dest / name)
    for ckpt in ckpts:
        os.replace(ckpt, dest / "checkpoints" / ckpt.name)
    return dest


def start_fresh(run_dir: Path) -> Path | None:
    """trainer.resume=never in a run directory that has checkpoints: move them (and `latest`) aside, never delete.

    Call on rank 0 before the run's config.yaml and tokenizer.json are rewritten (so the set-aside folder keeps
    the ones its checkpoints were trained with), then barrier. Returns the folder they went to (None: none there).
    """
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    ckpts = [p for p in root.iterdir() if p.is_dir() and (TAG_RE.match(p.name) or p.name.startswith("superseded_"))]
    if not ckpts:
        return None
    dest = set_aside(root, ckpts, "resume-never")
    if (root / LATEST).exists():
        os.replace(root / LATEST, dest / "checkpoints" / LATEST)
    if (run_dir / "tensorboard").is_dir():  # their curves go with them: the new run's start at step 0 alone
        os.replace(run_dir / "tensorboard", dest / "tensorboard")
    log.warning(
        "trainer.resume=never: this run directory already had %d checkpoint(s) (%s); moved them to %s "
        "(a run directory of its own: ftlm-generate/ftlm-export read it, trainer.resume=%s continues it; "
        "delete it when no longer needed)",
        len(ckpts),
        ", ".join(sorted(c.name for c in ckpts)),
        dest,
        dest,
    )
    return dest


def remove_unfinished(root: Path) -> None:
    """Delete what killed saves left behind (`*.tmp`); only rank 0 calls this, while no save is running."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.endswith(".tmp") and p.name.startswith("step_") and p.is_dir():
            if p.name.endswith(PRUNING):  # a deletion trainer.keep_last asked for, interrupted
                shutil.rmtree(p, ignore_errors=True)
                continue
            log.warning("deleting %s, left by a save that did not finish", p)
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(f".{LATEST}.tmp") and p.is_file():  # an interrupted write of `latest`
            p.unlink(missing_ok=True)


def retire_newer(root: Path, step: int) -> Path | None:
    """Move checkpoints of steps after `step` aside (see set_aside), keeping them for inspection.

    A run saving step s after checkpoints of later steps was resumed from an older one (rolled back, say past a
    loss spike); left in place, those later checkpoints would be what trainer.resume=auto picks after a crash.
    """
    newer = [c for c in list_checkpoints(root) if int(TAG_RE.match(c.name).group(1)) > step]
    dest = set_aside(root, newer, f"after-{tag_for(step)}")
    if dest is not None:
        log.warning(
            "moved checkpoint(s) %s to %s: this run went back to step %d and continues from there "
            "(delete them when no longer needed)",
            ", ".join(c.name for c in newer),
            dest,
            step,
        )
    return dest


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest keep_last complete checkpoints (incomplete ones are left for inspection)."""
    if keep_last <= 0:
        return
    complete = [c for c in list_checkpoints(root) if validate(c) is None]
    for old in complete[keep_last:]:
        # Renamed first, so that a kill in the middle of the deletion leaves no half-deleted step_ folder.
        doomed = root / (old.name + PRUNING)
        shutil.rmtree(doomed, ignore_errors=True)  # an earlier deletion of the same name, interrupted
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)  # its universal/ copy, if any, goes with it
        log.info("deleted old checkpoint %s (trainer.keep_last=%d)", old, keep_last)


# -- save ----------------------------------------------------------------------------------------------------------
def _seal(tmp: Path, step: int, checksums: dict[str, str] | None = None) -> None:
    """Mark a fully written save as complete: the manifest is the last file of a checkpoint."""
    fmt.write_manifest(tmp, checksums=checksums, step=step)


def expected_size(root: Path, engine=None) -> int:
    """Bytes the next save will take, about: the newest complete checkpoint's size (without its universal copy),
    or, before the first save, 16 bytes per parameter (fp32 weights and two Adam moments, plus 16-bit weights)."""
    for ckpt in list_checkpoints(root):
        if validate(ckpt) is None:
            return tree_size(ckpt) - tree_size(ckpt / UNIVERSAL)
    if engine is None:
        return 0
    module = getattr(engine, "module", engine)
    n = sum(int(getattr(p, "ds_numel", 0) or p.numel()) for p in module.parameters())
    return 16 * n


def _gb(n: int) -> str:
    return f"{n / GB:.1f} GB" if n >= GB / 10 else f"{n / 1e6:.1f} MB"


def _disk_full_message(step: int, final: Path, need: int) -> str:
    return (
        f"no space left on device while saving step {step} to {final} (needs about {_gb(need)}; "
        f"{_gb(free_bytes(final.parent))} free now). The previous checkpoint is untouched and the partial save "
        "was removed: free some space (fewer checkpoints with trainer.keep_last, or another trainer.out_dir) and "
        "continue with trainer.resume=auto"
    )


class _KeptWriteErrors:
    """DeepSpeed's checkpoint engine, but a write that fails is remembered instead of raised (and later writes are
    skipped): DeepSpeed's save_checkpoint runs collectives between its writes (barriers, the tag check), so a rank
    raising out of it midway (its disk full, say) would leave the other ranks waiting in one of them forever. With
    this, every rank runs the same collectives to the end, and save() raises the kept error where all ranks compare
    outcomes."""

    def __init__(self, inner):
        self.inner, self.error = inner, None

    def _attempt(self, write, *args, **kwargs):
        if self.error is None:
            try:
                return write(*args, **kwargs)
            except Exception as e:
                self.error = e
                log.debug("checkpoint %s failed: %r", write.__name__, e)  # raised by save() once all ranks are through

    def save(self, state_dict, path):
        return self._attempt(self.inner.save, state_dict, path)

    def makedirs(self, path, exist_ok=False):
        return self._attempt(self.inner.makedirs, path, exist_ok=exist_ok)

    def __getattr__(self, name):  # everything else (load, create, commit, is_decoupled, ...) as it is
        return getattr(self.inner, name)


@contextlib.contextmanager
def _writes_kept(engine):
    """engine.checkpoint_engine wrapped in _KeptWriteErrors for the duration (an engine without one: nothing to
    keep, .error stays None)."""
    inner = getattr(engine, "checkpoint_engine", None)
    kept = _KeptWriteErrors(inner)
    if inner is None:
        yield kept
        return
    engine.checkpoint_engine = kept
    try:
        yield kept
    finally:
        engine.checkpoint_engine = inner


def _check_free_space(root: Path, step: int, need: int) -> str | None:
    free = free_bytes(root)
    if need and free < need * 1.05:
        return (
            f"not enough free space to save step {step} to {root / tag_for(step)}: needs about {_gb(need)}, "
            f"{_gb(free)} free on that file system; nothing was written and the previous checkpoint is "
            "untouched: free some space (fewer checkpoints with trainer.keep_last, or another trainer.out_dir) "
            "and continue with trainer.resume=auto"
        )
    return None


def save(
    engine, root: Path, step: int, trainer_state: TrainerState | dict, loader_state: dict, keep_last: int, rank: int
) -> Path:
    """Write a checkpoint for `step` from every rank; returns its final path.

    `loader_state` must come from every rank at the same point (the loader's state_dict is a collective).
    Raises CheckpointSaveError (on every rank) when the disk is too full, before writing or midway.
    """
    if isinstance(trainer_state, dict):
        trainer_state = TrainerState.from_dict(trainer_state)
    tag = tag_for(step)
    tmp_tag = tag + ".tmp"
    final, tmp = root / tag, root / tmp_tag
    problem = None
    need = 0
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_unfinished(root)
        need = expected_size(root, engine)
        problem = _check_free_space(root, step, need)
    problem, need = _gather((problem, need))[0]  # rank 0's verdict, on every rank
    if problem:
        raise CheckpointSaveError(problem)

    error, sums = None, {}
    try:
        with _writes_kept(engine) as kept:
            engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
        if kept.error is not None:
            raise kept.error
        torch.save({"rng": rng_state(), "loader": json.dumps(loader_state)}, tmp / f"rank{rank}_state.pt")
        if rank == 0:
            trainer_state.write(tmp / TRAINER_STATE)
    except Exception as e:  # DeepSpeed's collectives all ran (_writes_kept): every rank reaches the gather below
        error = e
    failures = [f for f in _gather(None if error is None else (is_disk_full(error), repr(error))) if f is not None]
    if not failures:  # every file is written: each rank hashes those it wrote (still in its page cache)
        try:
            sums = fmt.checksum_files(tmp, rank, _dist()[1])
        except Exception as e:
            error = e
        results = _gather((None if error is None else (is_disk_full(error), repr(error)), sums))
        failures = [r[0] for r in results if r[0] is not None]
    if failures:
        full = any(f[0] for f in failures) or free_bytes(root) < 64 << 20
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        if full:
            raise CheckpointSaveError(_disk_full_message(step, final, need)) from error
        raise CheckpointSaveError(
            f"saving step {step} to {final} failed: {failures[0][1]}; the previous checkpoint is untouched"
        ) from error

    if rank == 0:
        try:
            checksums = {k: v for _, part in results for k, v in part.items()}
            _seal(tmp, step, checksums)
            if final.exists():  # the same step saved again: keep the older copy, aside
                dest = set_aside(root, [final], f"replaced-{tag}")
                log.warning("moved the earlier checkpoint %s to %s before saving the same step again", final, dest)
            os.replace(tmp, final)
            write_atomic(root / LATEST, tag)
        except Exception as e:
            error = e
            if not final.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    failed = _gather(None if error is None else (is_disk_full(error), repr(error)))[0]  # rank 0's outcome
    if failed:
        if failed[0]:
            raise CheckpointSaveError(_disk_full_message(step, final, need)) from error
        raise CheckpointSaveError(f"sealing checkpoint {final} failed: {failed[1]}") from error
    if rank == 0:
        retire_newer(root, step)
        prune(root, keep_last)
        log.info("saved checkpoint %s", final)
    _barrier()
    return final


# -- load ----------------------------------------------------------------------------------------------------------
def _hyperparameters(optimizer) -> list[dict]:
    return [{k: v for k, v in g.items() if k not in ("params", "step")} for g in optimizer.param_groups]


def _keep_current_hyperparameters(optimizer, scheduler, fresh: list[dict]) -> None:
    """Loading put the checkpoint's hyperparameters into the optimizer; this run's config decides them.

    Two reasons. DeepSpeed's universal (re-partitioning) load copies the first param group's settings into every
    group, which would put weight decay on norms and embeddings. And a run resumed with a larger trainer.max_steps
    (or another trainer.lr) should follow its new schedule from its first step, not the saved rate. The step count
    stays the checkpoint's, so an unchanged config gives bit-identical rates.
    """
    for group, values in zip(optimizer.param_groups, fresh):
        group.update(values)
    if scheduler is None:
        return
    scheduler.base_lrs = [values["initial_lr"] for values in fresh]
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def load(engine, ckpt: Path, rank: int, world_size: int) -> tuple[TrainerState, dict | None]:
    """Restore model, optimizer, scheduler and this rank's RNG; returns (trainer_state, loader_state).

    With another world size, `adapt_ds_config` must have prepared the engine for the universal copy.
    """
    trainer_state = TrainerState.from_file(ckpt)
    saved_world = trainer_state.world_size
    elastic = saved_world != world_size
    if elastic and not engine.load_universal_checkpoint():
        raise RuntimeError(
            f"checkpoint {ckpt} was written by {saved_world} ranks and this run has {world_size}: "
            "build the engine with checkpoint.adapt_ds_config(...) first"
        )
    scheduler = engine.lr_scheduler
    fresh = _hyperparameters(engine.optimizer)
    load_dir, tag = (ckpt, UNIVERSAL) if elastic else (ckpt.parent, ckpt.name)
    with weights_only_loading():
        load_path, _ = engine.load_checkpoint(
            str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt}")
    _keep_current_hyperparameters(engine.optimizer, scheduler, fresh)

    # Every rank saved the same (gathered) loader state; the RNG streams are per rank.
    own_file = ckpt / f"rank{rank}_state.pt"
    own = safe_load(own_file if own_file.is_file() else ckpt / "rank0_state.pt")
    if own_file.is_file():
        set_rng_state(own["rng"])
    else:
        log.info(
            "rank %d has no saved RNG state in %s (written by %d ranks); it keeps its seeded one",
            rank,
            ckpt,
            saved_world,
        )
    return trainer_state, json.loads(own["loader"])
