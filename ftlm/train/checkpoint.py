"""Checkpoints that are either complete or ignored.

Layout under `<run dir>/checkpoints/`:
    step_00000500/          DeepSpeed's model and optimizer shards (every rank writes its own),
                            rank<r>_state.pt (RNG states, data loader position), trainer_state.json,
                            manifest.json (every file and its size; written last, so its presence means complete)
    latest                  the newest complete tag (DeepSpeed's own tools read it too)

A save goes to `step_X.tmp/` and is renamed once every rank has finished writing, so a job killed mid-save
leaves the previous checkpoint untouched. A checkpoint whose manifest is missing, or whose files are missing
or have another size (a truncated copy), is skipped with a warning naming it.
"""
from __future__ import annotations

import json
import logging
import os
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


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "python_gauss": random.getstate()[2]}
    np_state = np.random.get_state()
    state["numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    state["numpy_pos"], state["numpy_gauss"], state["numpy_cached"] = int(np_state[2]), int(np_state[3]), float(np_state[4])
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"], state["numpy_cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def validate(ckpt: Path) -> str | None:
    """None when `ckpt` is complete; otherwise what is wrong with it, in words."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest.json ({e})"
    for rel, size in files.items():
        f = ckpt / rel
        if not f.is_file():
            return f"missing file {rel}"
        if f.stat().st_size != size:
            return f"file {rel} has {f.stat().st_size} bytes, expected {size} (truncated?)"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoint directories under root, newest first (complete or not: see validate)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under root, warning about each broken one passed over."""
    for ckpt in list_checkpoints(root):
        problem = validate(ckpt)
        if problem is None:
            return ckpt
        log.warning("skipping checkpoint %s: %s", ckpt, problem)
    return None


def resolve_resume(resume: str, root: Path) -> Path | None:
    """trainer.resume: 'auto' (newest complete in the run, or none), 'never', or a checkpoint path."""
    if resume in (None, "never", "none", False):
        return None
    if resume == "auto":
        return find_latest(root)
    path = Path(str(resume)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"trainer.resume: checkpoint {path} does not exist")
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
WEIGHT_KEYS = ("vocab_size", "n_layer", "n_head", "n_kv_heads", "d_model", "d_ff", "norm", "mlp", "tie_embeddings",
               "bias", "rope_theta")


def check_compatible(ckpt: Path, model_cfg) -> None:
    """Refuse a checkpoint written for another model before any weights are touched, naming the keys."""
    saved = json.loads((ckpt / "trainer_state.json").read_text()).get("model_config")
    if saved is None:
        return
    wanted = model_cfg.__dict__
    diff = [f"model.{k}: checkpoint {saved.get(k)!r}, config {wanted.get(k)!r}" for k in WEIGHT_KEYS
            if saved.get(k) != wanted.get(k)]
    if diff:
        raise ValueError(f"checkpoint {ckpt} was made by another model config: " + "; ".join(diff))


def adapt_ds_config(ckpt: Path, ds_config: dict, world_size: int, rank: int) -> dict:
    """The DeepSpeed config needed to load `ckpt` with this many ranks (unchanged when the count matches)."""
    return ds_config


def save(engine, root: Path, step: int, trainer_state: dict, loader_state: dict, keep_last: int,
         rank: int) -> Path:
    """Write a checkpoint for `step` from every rank; returns its final path."""
    tag = tag_for(step)
    tmp_tag = tag + ".tmp"
    final, tmp = root / tag, root / tmp_tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a save that was killed
    _barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
    torch.save({"rng": rng_state(), "loader": json.dumps(loader_state)}, tmp / f"rank{rank}_state.pt")
    if rank == 0:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    _barrier()
    if rank == 0:
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        _write_atomic(tmp / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))
        if final.exists():  # the same step saved again (a resumed run that ends where it started)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / "latest", tag)
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
        shutil.rmtree(old, ignore_errors=True)
        log.info("deleted old checkpoint %s (trainer.keep_last=%d)", old, keep_last)


def load(engine, ckpt: Path, rank: int, world_size: int) -> tuple[dict, dict | None]:
    """Restore model, optimizer, scheduler and this rank's RNG; returns (trainer_state, loader_state)."""
    trainer_state = json.loads((ckpt / "trainer_state.json").read_text())
    saved_world = trainer_state.get("world_size", world_size)
    if saved_world != world_size:
        raise NotImplementedError(
            f"checkpoint {ckpt} was written by {saved_world} ranks and this run has {world_size}; "
            "resuming on a different number of ranks is not supported yet")
    load_path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt}")
    own = torch.load(ckpt / f"rank{rank}_state.pt", weights_only=True)
    set_rng_state(own["rng"])
    return trainer_state, json.loads(own["loader"])
