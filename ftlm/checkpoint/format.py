"""The on-disk checkpoint format, shared by the trainer (which writes it) and every reader (generate, eval, export).

Layout under `<run dir>/checkpoints/`:
    step_00000500/          DeepSpeed's model and optimizer shards (every rank writes its own),
                            rank<r>_state.pt (RNG states, data loader position), trainer_state.json,
                            manifest.json (every file with its size and checksum; written last, so its presence
                            means complete)
        universal/          made on demand when resuming on another number of ranks (its own manifest.json)
    latest                  the newest complete tag (DeepSpeed's own tools read it too)

A checkpoint whose manifest is missing, or whose files are missing, have another size (a truncated copy) or
another checksum (a corrupted one) is not complete: `validate` says why in words.

Nothing here unpickles arbitrary objects: our own files are loaded with `weights_only=True`, and DeepSpeed's
(which calls `torch.load(..., weights_only=False)` itself) are read inside `weights_only_loading()`, which forces
torch's restricted unpickler and allows only the few DeepSpeed classes its optimizer files contain.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ftlm.config import ConfigError

from .atomic import fsync_tree, write_atomic

log = logging.getLogger("ftlm.checkpoint")

TAG_RE = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
UNIVERSAL = "universal"  # sub-folder of a checkpoint holding its universal-format copy
LATEST = "latest"

# Keys that fix the weights' shapes or the function the model computes. The rest (name, attn_impl, norm_impl,
# dropout, init_std, max_seq_len, doc_mask, new_token_init) may differ between training, resuming and use.
ARCH_KEYS = (
    "vocab_size",
    "n_layer",
    "n_head",
    "n_kv_heads",
    "d_model",
    "d_ff",
    "norm",
    "norm_eps",
    "mlp",
    "rope_theta",
    "tie_embeddings",
    "bias",
    "parallel_residual",
    "rotary_pct",
    "gelu_approx",
)
RUNTIME_KEYS = ("attn_impl", "norm_impl", "max_seq_len")


class CheckpointError(ValueError):
    """A checkpoint or export that cannot be used as asked; the message says which file and why."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(ckpt: Path) -> int | None:
    m = TAG_RE.match(Path(ckpt).name)
    return int(m.group(1)) if m else None


def tokenizer_fingerprint(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def arch_values(cfg) -> dict:
    """The ARCH_KEYS of a GPTConfig or of a stored model config dict; keys an older checkpoint lacks take their
    GPTConfig default (they did not exist, so the model computed what the default computes)."""
    from ftlm.model import GPTConfig

    values = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    return {k: values.get(k, defaults[k]) for k in ARCH_KEYS if k in defaults}


# -- trainer state -------------------------------------------------------------------------------------------------
@dataclass
class TrainerState:
    """trainer_state.json: where a run stood when a checkpoint was written (built and parsed only here)."""

    step: int
    tokens_seen: int
    world_size: int
    model_config: dict  # asdict(GPTConfig)
    tokenizer_vocab: int | None = None  # older checkpoints lack the tokenizer's size and fingerprint
    tokenizer_sha256: str | None = None
    config: dict | None = None  # the whole resolved run config
    precision: str | None = None  # bf16 | fp16 | fp32, as trained (trainer.precision=auto resolved); older: None
    zero_stage: int | None = None  # DeepSpeed's ZeRO stage; its optimizer files differ per stage and precision
    extra: dict = field(default_factory=dict)  # keys written by newer versions, kept as they are

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def write(self, path: Path) -> None:
        write_atomic(path, self.to_json())

    @classmethod
    def from_dict(cls, d: dict, where: str | Path = "trainer state") -> TrainerState:
        if not isinstance(d, dict):
            raise CheckpointError(f"{where}: not a JSON object")
        missing = [k for k in ("step", "model_config") if k not in d]
        if missing:
            raise CheckpointError(f"{where}: missing {', '.join(missing)}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        try:
            return cls(
                step=int(d["step"]),
                tokens_seen=int(d.get("tokens_seen", 0)),
                world_size=int(d.get("world_size", 1)),
                model_config=dict(d["model_config"]),
                tokenizer_vocab=None if d.get("tokenizer_vocab") is None else int(d["tokenizer_vocab"]),
                tokenizer_sha256=d.get("tokenizer_sha256"),
                config=d.get("config"),
                precision=d.get("precision"),
                zero_stage=None if d.get("zero_stage") is None else int(d["zero_stage"]),
                extra={k: v for k, v in d.items() if k not in known},
            )
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: {e}") from None

    @classmethod
    def from_file(cls, path: Path) -> TrainerState:
        """From trainer_state.json, or from a checkpoint folder holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / TRAINER_STATE
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path} does not exist (not a complete checkpoint)") from None
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
        return cls.from_dict(d, path)

    def __getitem__(self, key: str):
        """state["step"] reads like the plain dict trainer_state.json used to be parsed into."""
        return self.to_dict()[key]

    def gpt_config(self):
        """The model config as a GPTConfig (keys an older checkpoint lacks take their defaults)."""
        from ftlm.model import GPTConfig

        return GPTConfig.from_dict(self.model_config)


# -- checksums -----------------------------------------------------------------------------------------------------
_RANK_RE = (re.compile(r"(?:^|_)pp_rank_(\d+)_"), re.compile(r"^rank(\d+)_state\.pt$"))
_CHUNK = 16 << 20


def _hasher():
    """xxh3-64 (several GB/s; xxhash comes with mosaicml-streaming), blake2b where it is missing."""
    try:
        import xxhash

        return "xxh3_64", xxhash.xxh3_64
    except ImportError:  # pragma: no cover - streaming requires xxhash
        return "blake2b", lambda: hashlib.blake2b(digest_size=16)


HASH_NAME = _hasher()[0]


def file_checksum(path: Path, algorithm: str | None = None) -> str:
    name, make = _hasher()
    if algorithm not in (None, name):
        if algorithm == "blake2b":
            make = lambda: hashlib.blake2b(digest_size=16)  # noqa: E731
        else:
            raise CheckpointError(f"{path}: checksum algorithm {algorithm!r} is not available here")
    h = make()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def owner_rank(rel: str, world_size: int) -> int:
    """The rank that wrote (and so checksums and verifies) a checkpoint file: the rank in its name, else rank 0."""
    name = Path(rel).name
    for pattern in _RANK_RE:
        m = pattern.search(name)
        if m:
            return int(m.group(1)) % max(1, world_size)
    return 0


def _files(folder: Path) -> list[str]:
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(f".{MANIFEST}.tmp")
    )


def checksum_files(folder: Path, rank: int = 0, world_size: int = 1) -> dict[str, str]:
    """Checksums of the files under `folder` that `rank` owns (all of them for one rank)."""
    return {rel: file_checksum(folder / rel) for rel in _files(folder) if owner_rank(rel, world_size) == rank}


def write_manifest(folder: Path, checksums: dict[str, str] | None = None, **extra) -> None:
    """Seal `folder`: flush its files, then write manifest.json (last) with every file's size and checksum.

    `checksums`: those already computed (by the ranks that wrote the files); the rest are computed here.
    """
    rels = _files(folder)
    sums = dict(checksums or {})
    for rel in rels:
        if rel not in sums:
            sums[rel] = file_checksum(folder / rel)
    fsync_tree(folder)
    files = {rel: (folder / rel).stat().st_size for rel in rels}
    manifest = {**extra, "files": files, "hash": HASH_NAME, "checksums": {rel: sums[rel] for rel in rels}}
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1))


def read_manifest(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / MANIFEST).read_text())


# -- validation ----------------------------------------------------------------------------------------------------
def validate(ckpt: Path, checksums: bool = False, rank: int = 0, world_size: int = 1) -> str | None:
    """None when `ckpt` is complete; otherwise what is wrong with it, in words.

    Sizes are always checked; with `checksums`, the contents too (of the files `rank` owns, when several ranks
    share the work). Checkpoints written before checksums existed pass on their sizes.
    """
    ckpt = Path(ckpt)
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        meta = json.loads(manifest.read_text())
        files = meta["files"]
        sums = meta.get("checksums") or {}
        files.items()
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable manifest.json ({e})"
    for rel, size in files.items():
        f = ckpt / rel
        if not f.is_file():
            return f"missing file {rel}"
        if f.stat().st_size != size:
            return f"file {rel} has {f.stat().st_size} bytes, expected {size} (truncated?)"
    if checksums:
        for rel in files:
            if rel in sums and owner_rank(rel, world_size) == rank:
                try:
                    got = file_checksum(ckpt / rel, meta.get("hash"))
                except CheckpointError as e:
                    log.warning("%s", e)
                    return None
                if got != sums[rel]:
                    return f"file {rel} does not match its checksum in manifest.json (corrupted)"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under root, newest first (complete or not: see validate).

    Only `step_XXXXXXXX` folders count: unfinished saves (`.tmp`) and moved-aside ones never do.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def find_latest(root: Path, checksums: bool = False, check=None) -> Path | None:
    """The newest complete checkpoint under root, warning about each broken one passed over.

    check: a function ckpt -> problem or None used instead of `validate` (the trainer's shares the checksum
    work between its ranks).
    """
    candidates = list_checkpoints(root)
    check = check or (lambda c: validate(c, checksums=checksums))
    for ckpt in candidates:
        problem = check(ckpt)
        if problem is None:
            return ckpt
        log.warning("skipping checkpoint %s: %s", ckpt, problem)
    if candidates:
        log.warning("none of the %d checkpoints in %s is complete", len(candidates), root)
    return None


# -- safe loading --------------------------------------------------------------------------------------------------
def _deepspeed_safe_globals() -> list:
    """The non-tensor classes DeepSpeed pickles into its checkpoints (plain state holders, no custom unpickling)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address  # ZeRO-1/2 partition offsets (a dataclass)
    except ImportError:  # pragma: no cover - a reader of exports only
        return []
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _refusal_reason(e: BaseException) -> str:
    """torch's reason for refusing a file, without its advice to retry with weights_only=False (never do that
    with a checkpoint: it would run whatever code the file carries)."""
    keep = []
    for line in str(e).splitlines():
        line = line.strip()
        if "WeightsUnpickler error:" in line:
            line = line.split("WeightsUnpickler error:", 1)[1].strip()
        if not line or "weights_only" in line or line.startswith(("Weights only load failed", "Check the doc")):
            continue
        keep.append(line)
    return "; ".join(keep) or type(e).__name__


def refusal(path, e: BaseException) -> CheckpointError:
    return CheckpointError(
        f"refusing to load {path}: it holds Python objects beyond tensors and DeepSpeed's known state classes "
        f"({_refusal_reason(e)}). ftlm reads checkpoints with torch's restricted unpickler only, so nothing in "
        "the file ran; the file is corrupted or was replaced: restore it, or resume from another checkpoint"
    )


def _is_refusal(e: BaseException) -> bool:
    return isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in str(e)


@contextlib.contextmanager
def weights_only_loading(deepspeed_classes: bool = True):
    """Every torch.load inside (DeepSpeed's included, which pass weights_only=False) uses the restricted unpickler.

    TORCH_FORCE_WEIGHTS_ONLY_LOAD is torch's own switch for this; it is read at each torch.load call. torch.load
    is wrapped as well, so that a refused file is named (torch's message names none). deepspeed_classes: also
    allow the few DeepSpeed classes its optimizer files hold (imports DeepSpeed).
    """
    old_env = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    real_load = torch.load

    def load(f, *args, **kwargs):
        try:
            return real_load(f, *args, **kwargs)
        except CheckpointError:
            raise
        except Exception as e:
            if _is_refusal(e):
                raise refusal(f, e) from None
            e.add_note(f"while reading {f}")
            raise

    torch.load = load
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals() if deepspeed_classes else []):
            yield
    except CheckpointError:
        raise
    except Exception as e:  # a refusal raised through a path that bypassed the wrapper
        if _is_refusal(e):
            raise refusal("a checkpoint file", e) from None
        raise
    finally:
        torch.load = real_load
        if old_env is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old_env


def safe_load(path: Path, **kwargs) -> Any:
    """torch.load(path) with the restricted unpickler; a refused file raises CheckpointError naming it."""
    with weights_only_loading(deepspeed_classes=False):
        return torch.load(path, weights_only=True, **kwargs)


# -- devices -------------------------------------------------------------------------------------------------------
def resolve_device(name: str, option: str = "--device") -> torch.device:
    """auto (a CUDA GPU when one is visible, else the CPU), cpu, cuda or cuda:N; `option` names the setting in
    errors (--device for the command-line tools, trainer.device for training)."""
    name = str(name).strip()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ConfigError(f"{option}={name}: not one of auto, cpu, cuda, cuda:N")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{option}={name}: no CUDA GPU is visible; use {option}=auto or {option}=cpu")
        if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
            raise ConfigError(f"{option}={name}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return torch.device(name)
