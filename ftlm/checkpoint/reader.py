"""Reading a trained model back from disk, for ftlm-generate, ftlm-eval and ftlm-export.

Three kinds of path are accepted:
    run directory       <run>/checkpoints/step_*/ plus <run>/tokenizer.json: the newest complete checkpoint
    checkpoint          <run>/checkpoints/step_XXXXXXXX/ (ZeRO shards, trainer_state.json, manifest.json),
                        or <run>/checkpoints/ itself (its newest complete checkpoint)
    export directory    model.safetensors + ftlm_config.json + tokenizer.json, as written by ftlm-export

ZeRO shards are consolidated on the CPU without a process group by DeepSpeed's zero_to_fp32, whose torch.load
calls run under torch's restricted (weights-only) unpickler; everything else is JSON or safetensors.
Every check that can fail (path, config, tokenizer) runs before any weights are read.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import format as ckpt_files
from .format import ARCH_KEYS, RUNTIME_KEYS, TRAINER_STATE, CheckpointError, TrainerState, arch_values

if TYPE_CHECKING:
    from ftlm.model import GPT, GPTConfig

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "ftlm_config.json"
TOKENIZER = "tokenizer.json"
SOURCE_HELP = "a run directory, a checkpoint (checkpoints/step_XXXXXXXX) or an ftlm-export directory"


@dataclass
class Source:
    """Where a model's files are, found from the path a user gave."""

    kind: str  # "checkpoint" | "export"
    path: Path  # the checkpoint directory or the export directory
    tokenizer_path: Path
    config: GPTConfig
    step: int | None = None
    tokenizer_vocab: int | None = None  # recorded at training time, when the trainer recorded it
    tokenizer_sha256: str | None = None


@dataclass
class Loaded:
    model: GPT
    tokenizer: object  # ftlm.data.tokenizer.Tokenizer
    source: Source


def locate(path: str | Path) -> Source:
    """Resolve a run directory, checkpoint or export directory to its files; reads JSON only."""
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist (expected {SOURCE_HELP})")
    if p.is_dir() and (p / WEIGHTS).is_file() and (p / CONFIG).is_file():
        return _export_source(p)
    if p.is_dir() and (p / "ftlm" / CONFIG).is_file() and ((p / "ftlm" / WEIGHTS).is_file() or (p / WEIGHTS).is_file()):
        return _export_source(p / "ftlm")  # ftlm-export's layout: the Hugging Face model in p, ftlm's files in p/ftlm
    if p.is_dir() and (p / "checkpoints").is_dir():
        return _checkpoint_source(_newest(p / "checkpoints"), p / TOKENIZER)
    if p.is_dir() and (
        (p / ckpt_files.MANIFEST).exists() or (p / TRAINER_STATE).exists() or ckpt_files.TAG_RE.match(p.name)
    ):
        own = p / TOKENIZER
        return _checkpoint_source(p, own if own.is_file() else p.parent.parent / TOKENIZER)
    if p.is_dir() and ckpt_files.list_checkpoints(p):
        return _checkpoint_source(_newest(p), p.parent / TOKENIZER)
    if p.is_dir() and (p / "config.json").is_file() and (p / WEIGHTS).is_file():
        raise CheckpointError(
            f"{p} is a Hugging Face model directory: convert it once with `ftlm-import {p} OUT` (or start training "
            "from it with trainer.init_from), or load it with transformers (AutoModelForCausalLM.from_pretrained)"
        )
    if p.is_dir() and (p / WEIGHTS).is_file():
        raise CheckpointError(f"{p} has {WEIGHTS} but no {CONFIG}: was it written by ftlm-export?")
    raise CheckpointError(
        f"{p} is not a run directory (no checkpoints/), a checkpoint (no manifest.json) "
        f"or an ftlm-export directory (no {WEIGHTS})"
    )


def _newest(root: Path) -> Path:
    found = ckpt_files.find_latest(root, checksums=True)  # warns about each broken one it passes over
    if found is None:
        raise CheckpointError(f"no complete checkpoint under {root}")
    return found


def _checkpoint_source(ckpt: Path, tokenizer_path: Path) -> Source:
    problem = ckpt_files.validate(ckpt, checksums=True)
    if problem:
        raise CheckpointError(f"checkpoint {ckpt} is not usable: {problem}")
    state = TrainerState.from_file(ckpt / TRAINER_STATE)
    return Source(
        "checkpoint",
        ckpt,
        tokenizer_path,
        _config_from(state.model_config, ckpt / TRAINER_STATE),
        state.step,
        state.tokenizer_vocab,
        state.tokenizer_sha256,
    )


def _export_source(d: Path) -> Source:
    try:
        meta = json.loads((d / CONFIG).read_text())
    except ValueError as e:
        raise CheckpointError(f"{d / CONFIG}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise CheckpointError(f'{d / CONFIG}: no "model" section with the model config')
    return Source(
        "export",
        d,
        d / TOKENIZER,
        _config_from(meta["model"], d / CONFIG),
        meta.get("step"),
        meta.get("tokenizer_vocab"),
        meta.get("tokenizer_sha256"),
    )


def _config_from(values: dict, where: Path) -> GPTConfig:
    from ftlm.model import GPTConfig

    # The kernels a run trained with (flash_attn, triton) may not exist where the model is used: pick afresh.
    values = {**values, "attn_impl": "auto", "norm_impl": "auto"}
    try:
        return GPTConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: the stored model config is not valid: {e}") from None


def read_expected_config(path: str | Path) -> dict:
    """The model section of a YAML/JSON file: a conf/model/*.yaml preset, or a whole config with `model:`."""
    from omegaconf import DictConfig, OmegaConf

    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"--config: {p} does not exist")
    try:
        node = _load_composed(p, OmegaConf, DictConfig)
        if isinstance(node, DictConfig) and isinstance(node.get("model"), DictConfig):
            node = node.model  # a whole config, such as a run's config.yaml
        values = OmegaConf.to_container(node, resolve=True)
    except Exception as e:  # YAML and interpolation errors come in many types
        raise CheckpointError(f"--config: cannot read {p}: {e}") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"--config: {p} does not hold a model config")
    return values


def _load_composed(p: Path, OmegaConf, DictConfig, seen: tuple = ()):
    """A YAML file with its `defaults:` list applied the way Hydra composes a config group: each named sibling
    file (`base` -> base.yaml beside it) merged in order, `_self_` where the file itself goes; `schema` (the
    typed node registered in Hydra's ConfigStore) adds no values and is skipped."""
    if p in seen:
        raise ValueError(f"{p}: defaults list includes itself")
    node = OmegaConf.load(p)
    if not isinstance(node, DictConfig) or "defaults" not in node:
        return node
    defaults = list(node.pop("defaults") or [])
    if "_self_" not in defaults:
        defaults.append("_self_")
    merged = OmegaConf.create({})
    for entry in defaults:
        if entry == "_self_":
            merged = OmegaConf.merge(merged, node)
        elif isinstance(entry, str) and entry != "schema":
            merged = OmegaConf.merge(
                merged, _load_composed(p.with_name(f"{entry}.yaml"), OmegaConf, DictConfig, (*seen, p))
            )
    return merged


def check_config(found: GPTConfig, expected: GPTConfig | dict, where: Path) -> None:
    """Raise naming every architecture key on which `expected` (what the user passed) and the checkpoint differ."""
    from ftlm.model import GPTConfig

    exp = asdict(expected) if isinstance(expected, GPTConfig) else dict(expected)
    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(exp) - known)
    if unknown:
        raise CheckpointError(f"unknown model key(s) in the given config: {', '.join('model.' + k for k in unknown)}")
    if exp.get("vocab_size") is None:
        exp["vocab_size"] = found.vocab_size  # null means "follow the tokenizer", as in conf/model
    merged = {**asdict(found), **{k: v for k, v in exp.items() if k in ARCH_KEYS}}
    for key in ("n_kv_heads", "d_ff"):  # given as null: the default for the given shape, as in conf/model
        if key in exp and exp[key] is None:
            merged[key] = None
    try:
        resolved = GPTConfig(**merged)
    except ValueError as e:
        raise CheckpointError(f"the given model config is not valid: {e}") from None
    have, given = arch_values(found), arch_values(resolved)
    diffs = [
        f"model.{k}: checkpoint has {have[k]!r}, given config has {given[k]!r}" for k in have if have[k] != given[k]
    ]
    if diffs:
        raise CheckpointError(f"{where} was made by another model config:\n  " + "\n  ".join(diffs))


def load_tokenizer(source: Source):
    from ftlm.data.tokenizer import Tokenizer

    if not source.tokenizer_path.is_file():
        raise FileNotFoundError(
            f"tokenizer {source.tokenizer_path} does not exist (a run directory keeps it beside "
            "checkpoints/, an export directory beside model.safetensors)"
        )
    tokenizer = Tokenizer.load(source.tokenizer_path)
    if source.tokenizer_vocab is not None and tokenizer.vocab_size != source.tokenizer_vocab:
        raise CheckpointError(
            f"tokenizer {source.tokenizer_path} has {tokenizer.vocab_size} tokens but {source.path} "
            f"was trained with a {source.tokenizer_vocab}-token tokenizer: token ids would mean "
            "other text"
        )
    if (
        source.tokenizer_sha256 is not None
        and ckpt_files.tokenizer_fingerprint(source.tokenizer_path) != source.tokenizer_sha256
    ):
        log.warning(
            "tokenizer %s is not the file %s was trained with (same vocabulary size); token ids may mean other text",
            source.tokenizer_path,
            source.path,
        )
    if tokenizer.vocab_size > source.config.vocab_size:
        raise CheckpointError(
            f"tokenizer {source.tokenizer_path} has {tokenizer.vocab_size} tokens but the model in "
            f"{source.path} has model.vocab_size={source.config.vocab_size}: "
            "they do not belong together"
        )
    return tokenizer


def consolidate(ckpt: Path) -> dict[str, torch.Tensor]:
    """One full fp32 state dict on the CPU from a checkpoint's ZeRO shards (any number of ranks)."""
    get_fp32_state_dict_from_zero_checkpoint = _zero_to_fp32()
    from deepspeed.utils.tensor_fragment import fragment_address  # a plain record in ZeRO-1/2 optimizer files

    log.info("gathering the ZeRO shards of %s into one state dict", ckpt)
    chatter = io.StringIO()  # zero_to_fp32 prints its progress; keep it for debug logs only
    try:
        with (
            ckpt_files.weights_only_loading(),
            torch.serialization.safe_globals([fragment_address]),
            contextlib.redirect_stdout(chatter),
        ):
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"cannot consolidate the ZeRO shards in {ckpt}: {e}") from e
    finally:
        log.debug("zero_to_fp32: %s", chatter.getvalue())
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def _zero_to_fp32():
    """DeepSpeed's offline consolidation, imported so that none of DeepSpeed's messages reach stdout, where
    ftlm-generate prints the generated text and ftlm-eval its table."""
    if "deepspeed" not in sys.modules:  # name the accelerator, or DeepSpeed announces its guess on stdout
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from deepspeed.utils import logger as ds_logger
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    for handler in ds_logger.handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
    return get_fp32_state_dict_from_zero_checkpoint


def read_state_dict(source: Source) -> dict[str, torch.Tensor]:
    """The weights under ftlm's parameter names: fp32 from a checkpoint, the stored dtype from an export."""
    if source.kind == "checkpoint":
        state = consolidate(source.path)
    elif _weights_named(source) == "hugging_face":  # whatever file an earlier export left beside it
        state = _from_hugging_face_weights(source)
    elif (source.path / WEIGHTS).is_file():
        from safetensors.torch import load_file

        state = load_file(str(source.path / WEIGHTS), device="cpu")
    else:
        state = _from_hugging_face_weights(source)
    check_state_dict(state, source.config, source.path)
    return state


def _weights_named(source: Source) -> str | None:
    """ftlm_config.json's "weights": "ftlm" (its own model.safetensors) or "hugging_face" (the export's, above)."""
    try:
        return json.loads((source.path / CONFIG).read_text()).get("weights")
    except (OSError, ValueError, AttributeError):
        return None  # unreadable: locate() has named it already, or the own file is read as before


def _from_hugging_face_weights(source: Source) -> dict[str, torch.Tensor]:
    """An ftlm-export's ftlm/ without weights of its own: the Hugging Face model's in the folder above, converted back
    to ftlm's names (exactly: ftlm-export leaves its own copy out only then)."""
    from safetensors.torch import load_file

    from ftlm.hf.convert import architecture_of, from_hf_state_dict

    meta = json.loads((source.path / CONFIG).read_text())
    hf_dir = source.path.parent
    if meta.get("weights") != "hugging_face" or not (hf_dir / WEIGHTS).is_file():
        raise CheckpointError(f"{source.path} has no {WEIGHTS}, and {hf_dir} holds no Hugging Face weights for it")
    try:
        hf_config = json.loads((hf_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{hf_dir / 'config.json'}: unreadable ({e})") from None
    arch = architecture_of(hf_config, str(hf_dir / "config.json"))
    return from_hf_state_dict(source.config, arch, load_file(str(hf_dir / WEIGHTS), device="cpu"))


def check_state_dict(state: dict, cfg: GPTConfig, where: Path) -> None:
    """Every parameter the config needs is there with its shape, and nothing else is."""
    from ftlm.model import GPT

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: {tuple(state[k].shape)} instead of {expected[k]}"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append("missing " + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        problems.append("unexpected " + ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else ""))
    if wrong:
        problems.append("shape " + "; ".join(wrong[:5]))
    if problems:
        raise CheckpointError(f"the weights in {where} do not fit its model config: " + " | ".join(problems))


def build_model(cfg: GPTConfig, state: dict[str, torch.Tensor], device="cpu", dtype=torch.float32) -> GPT:
    """A GPT holding `state`, without spending time on a random initialisation first."""
    from ftlm.model import GPT

    with torch.device("meta"):
        model = GPT(cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True, strict=True)
    return model.to(device=device).eval()


def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    expected_config: GPTConfig | dict | str | Path | None = None,
    **runtime,
) -> Loaded:
    """Model and tokenizer from a run directory, checkpoint or export directory.

    expected_config: a config (or a YAML/JSON file) the checkpoint must have been trained with; each
    architecture key that differs is named. runtime: attn_impl, norm_impl or max_seq_len to use instead of the
    stored ones.
    """
    from ftlm.model import GPTConfig

    source = locate(path)
    if expected_config is not None:
        if isinstance(expected_config, (str, Path)):
            expected_config = read_expected_config(expected_config)
        check_config(source.config, expected_config, source.path)
    bad = sorted(set(runtime) - set(RUNTIME_KEYS))
    if bad:
        raise TypeError(f"load() got unexpected keyword(s) {bad}; only {RUNTIME_KEYS} may be changed at load time")
    if runtime:
        source.config = GPTConfig(**{**asdict(source.config), **runtime})
    tokenizer = load_tokenizer(source)
    state = read_state_dict(source)
    model = build_model(source.config, state, device, dtype)
    log.info(
        "loaded %s %s (%s parameters%s) with a %d-token tokenizer",
        source.kind,
        source.path,
        f"{model.num_params():,}",
        f", step {source.step}" if source.step is not None else "",
        tokenizer.vocab_size,
    )
    return Loaded(model, tokenizer, source)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"--dtype {name}: not one of auto, {', '.join(dtypes)}")
    return dtypes[name]
