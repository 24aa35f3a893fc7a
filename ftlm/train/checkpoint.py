"""Checkpoints that are either complete or ignored, and resumption from them (also on another number of ranks).

Layout under `<run dir>/checkpoints/`:
    step_00000500/          DeepSpeed's model and optimizer shards (every rank writes its own),
                            rank<r>_state.pt (RNG states, data loader position), trainer_state.json,
                            manifest.json (every file and its size; written last, so its presence means complete)
        universal/          made on demand when resuming on another number of ranks: the same state in
                            DeepSpeed's universal format (one folder per parameter), with its own manifest.json
    latest                  the newest complete tag (DeepSpeed's own tools read it too)

A save goes to `step_X.tmp/` and is renamed once every rank has finished writing, so a job killed mid-save
leaves the previous checkpoint untouched; the next save deletes such leftovers. A checkpoint whose manifest is
missing, or whose files are missing or have another size (a truncated copy), is skipped with a warning naming it.

Nothing here unpickles arbitrary objects: our own files are loaded with `weights_only=True`, and DeepSpeed's
(which calls `torch.load(..., weights_only=False)` itself) are read inside `weights_only_loading()`, which forces
torch's restricted unpickler and allows only the few DeepSpeed classes its optimizer files contain.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
UNIVERSAL = "universal"  # sub-folder of a checkpoint holding its universal-format copy


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(folder: Path) -> None:
    """Flush every file (and the folder entries) to disk, so a manifest never describes data still in page cache."""
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(folder: Path, **extra) -> None:
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    _fsync_tree(folder)
    _write_atomic(folder / MANIFEST, json.dumps({**extra, "files": files}, indent=1))


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def tokenizer_fingerprint(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- safe loading --------------------------------------------------------------------------------------------------
def _deepspeed_safe_globals() -> list:
    """The non-tensor classes DeepSpeed pickles into its checkpoints (plain state holders, no custom unpickling)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address  # ZeRO-1/2 partition offsets (a dataclass)

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextlib.contextmanager
def weights_only_loading():
    """Every torch.load inside (DeepSpeed's included, which pass weights_only=False) uses the restricted unpickler.

    TORCH_FORCE_WEIGHTS_ONLY_LOAD is torch's own switch for this; it is read at each torch.load call.
    """
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    except Exception as e:  # the message of a refused global is long; say what happened first
        if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in str(e):
            raise RuntimeError(
                f"refusing to load a checkpoint file that holds Python objects beyond tensors and "
                f"DeepSpeed's known state classes (loaded with weights_only=True):\n{e}"
            ) from e
        raise
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


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
def validate(ckpt: Path) -> str | None:
    """None when `ckpt` is complete; otherwise what is wrong with it, in words."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest.json ({e})"
    for rel, size in files.items():
        f = ckpt / rel
        if not f.is_file():
            return f"missing file {rel}"
        if f.stat().st_size != size:
            return f"file {rel} has {f.stat().st_size} bytes, expected {size} (truncated?)"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under root, newest first (complete or not: see validate).

    Only `step_XXXXXXXX` folders count: unfinished saves (`.tmp`) never do.
    """
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under root, warning about each broken one passed over."""
    candidates = list_checkpoints(root)
    for ckpt in candidates:
        problem = validate(ckpt)
        if problem is None:
            return ckpt
        log.warning("skipping checkpoint %s: %s", ckpt, problem)
    if candidates:
        log.warning("none of the %d checkpoints in %s is complete: training starts from step 0", len(candidates), root)
    return None


def resolve_resume(resume, root: Path) -> Path | None:
    """trainer.resume: 'auto' (newest complete in the run, or none), 'never', or a checkpoint path."""
    if resume in (None, "never", "none", False):
        return None
    if resume == "auto":
        return find_latest(root)
    path = Path(str(resume)).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"trainer.resume: checkpoint {path} does not exist "
            "(give a step_XXXXXXXX folder, a run's checkpoints/ folder, auto, or never)"
        )
    if path.is_dir() and not (path / MANIFEST).exists() and (path / "checkpoints").is_dir():
        path = path / "checkpoints"  # a run directory
    if path.is_dir() and not (path / MANIFEST).exists() and list_checkpoints(path):
        found = find_latest(path)  # a run's checkpoints/ folder: take its newest complete one
        if found is None:
            raise FileNotFoundError(f"trainer.resume: no complete checkpoint under {path}")
        return found
    problem = validate(path)
    if problem:
        raise ValueError(f"trainer.resume: checkpoint {path} is not usable: {problem}")
    return path


# Keys that change the shape or meaning of the weights; the others (kernels, dropout) may differ on resume.
WEIGHT_KEYS = (
    "vocab_size",
    "n_layer",
    "n_head",
    "n_kv_heads",
    "d_model",
    "d_ff",
    "norm",
    "mlp",
    "tie_embeddings",
    "bias",
    "rope_theta",
)


def check_compatible(
    ckpt: Path, model_cfg, tokenizer_vocab: int | None = None, tokenizer_sha256: str | None = None
) -> None:
    """Refuse a checkpoint written for another model or tokenizer before any weights are touched, naming the keys."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    saved = state.get("model_config")
    if saved is not None:
        wanted = model_cfg.__dict__
        diff = [
            f"model.{k}: checkpoint {saved.get(k)!r}, config {wanted.get(k)!r}"
            for k in WEIGHT_KEYS
            if saved.get(k) != wanted.get(k)
        ]
        if diff:
            raise ValueError(f"checkpoint {ckpt} was made by another model config: " + "; ".join(diff))
    saved_vocab = state.get("tokenizer_vocab")
    if tokenizer_vocab is not None and saved_vocab is not None and saved_vocab != tokenizer_vocab:
        raise ValueError(
            f"checkpoint {ckpt} was trained with a tokenizer of {saved_vocab} tokens, but this run's "
            f"tokenizer (data.tokenizer / the prepared data) has {tokenizer_vocab}: token ids would "
            "mean different text; resume with the data the checkpoint was trained on"
        )
    if tokenizer_vocab is not None and saved is not None and tokenizer_vocab > int(saved["vocab_size"]):
        raise ValueError(
            f"checkpoint {ckpt} has model.vocab_size={saved['vocab_size']}, smaller than this run's "
            f"tokenizer ({tokenizer_vocab} tokens)"
        )
    saved_sha = state.get("tokenizer_sha256")
    if tokenizer_sha256 is not None and saved_sha is not None and saved_sha != tokenizer_sha256:
        log.warning(
            "this run's tokenizer.json differs from the one checkpoint %s was trained with (same vocabulary "
            "size); continuing, but token ids may now mean different text",
            ckpt,
        )


# -- resuming on another number of ranks ---------------------------------------------------------------------------
def saved_world_size(ckpt: Path) -> int:
    return int(json.loads((ckpt / "trainer_state.json").read_text())["world_size"])


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
    """`ckpt/universal`, converted by rank 0 the first time it is needed (atomically, like a save); all ranks wait."""
    out = ckpt / UNIVERSAL
    error = None
    if rank == 0 and validate(out) is not None:
        tmp = ckpt / (UNIVERSAL + ".tmp")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            log.info("converting %s to DeepSpeed's universal checkpoint format (once; kept in %s)", ckpt, out)
            convert_to_universal(ckpt, tmp)
            _write_manifest(tmp)
            os.replace(tmp, out)
        except Exception as e:  # raised after the barrier, so the other ranks do not wait forever
            error = e
    _barrier()
    if error is not None:
        raise RuntimeError(f"could not convert checkpoint {ckpt} to DeepSpeed's universal format: {error}") from error
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


# -- save ----------------------------------------------------------------------------------------------------------
def _seal(tmp: Path, step: int) -> None:
    """Mark a fully written save as complete: the manifest is the last file of a checkpoint."""
    _write_manifest(tmp, step=step)


def remove_unfinished(root: Path) -> None:
    """Delete what killed saves left behind (`*.tmp`); only rank 0 calls this, while no save is running."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.endswith(".tmp") and p.name.startswith("step_") and p.is_dir():
            log.warning("deleting %s, left by a save that did not finish", p)
            shutil.rmtree(p, ignore_errors=True)


def retire_newer(root: Path, step: int) -> None:
    """Move checkpoints of steps after `step` out of the way (to `superseded_step_X`), keeping them for inspection.

    A run saving step s after checkpoints of later steps was resumed from an older one (rolled back, say past a
    loss spike); left in place, those later checkpoints would be what trainer.resume=auto picks after a crash.
    """
    for ckpt in list_checkpoints(root):
        if int(TAG_RE.match(ckpt.name).group(1)) > step:
            dest = root / f"superseded_{ckpt.name}"
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(ckpt, dest)
            log.warning(
                "moved checkpoint %s to %s: this run went back to an earlier step and continues from "
                "there (delete it when no longer needed)",
                ckpt,
                dest.name,
            )


def save(engine, root: Path, step: int, trainer_state: dict, loader_state: dict, keep_last: int, rank: int) -> Path:
    """Write a checkpoint for `step` from every rank; returns its final path.

    `loader_state` must come from every rank at the same point (the loader's state_dict is a collective).
    """
    tag = tag_for(step)
    tmp_tag = tag + ".tmp"
    final, tmp = root / tag, root / tmp_tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_unfinished(root)
    _barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
    torch.save({"rng": rng_state(), "loader": json.dumps(loader_state)}, tmp / f"rank{rank}_state.pt")
    if rank == 0:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    _barrier()
    if rank == 0:
        _seal(tmp, step)
        if final.exists():  # the same step saved again (after the newer copy was found broken)
            old = root / (tag + ".replaced.tmp")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _write_atomic(root / "latest", tag)
        retire_newer(root, step)
        prune(root, keep_last)
        log.info("saved checkpoint %s", final)
    _barrier()
    return final


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest keep_last complete checkpoints (incomplete ones are left for inspection)."""
    if keep_last <= 0:
        return
    complete = [c for c in list_checkpoints(root) if validate(c) is None]
    for old in complete[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)  # its universal/ copy, if any, goes with it
        log.info("deleted old checkpoint %s (trainer.keep_last=%d)", old, keep_last)


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


def load(engine, ckpt: Path, rank: int, world_size: int) -> tuple[dict, dict | None]:
    """Restore model, optimizer, scheduler and this rank's RNG; returns (trainer_state, loader_state).

    With another world size, `adapt_ds_config` must have prepared the engine for the universal copy.
    """
    trainer_state = json.loads((ckpt / "trainer_state.json").read_text())
    saved_world = int(trainer_state.get("world_size", world_size))
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
    own = torch.load(own_file if own_file.is_file() else ckpt / "rank0_state.pt", weights_only=True)
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
