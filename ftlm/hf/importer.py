"""ftlm-import: a Hugging Face model directory as an ftlm model directory, and load_pretrained for the trainer.

    ftlm-import <hf model dir> <out dir> [--dtype auto|bf16|fp32]

writes the directory format ftlm-export writes with --no-hf (model.safetensors under ftlm's names,
ftlm_config.json, tokenizer.json), which ftlm-generate, ftlm-eval, ftlm-export and trainer.init_from read.

Only safetensors are read (model.safetensors, or the shards a model.safetensors.index.json names): a
pytorch_model.bin is a pickle and is refused. Every check (architecture, rope_scaling, the weight names and
shapes in the safetensors headers, the shard files, the tokenizer's size) runs before any weight is read.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ftlm.checkpoint import CONFIG, TOKENIZER, WEIGHTS, CheckpointError, load_tokenizer, locate, read_state_dict
from ftlm.model import GPTConfig

from .convert import (
    HF_CONFIG,
    IGNORED_SUFFIXES,
    HFConversionError,
    architecture_of,
    config_from_hf,
    describe,
    from_hf_state_dict,
    hf_expected_shapes,
)

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


# A Hugging Face directory that cannot be imported; the message names the file and the key.
HFImportError = HFConversionError


@dataclass
class HFSource:
    """A checked Hugging Face model directory: its config, and where each weight is (nothing read yet)."""

    path: Path
    arch: str
    config: GPTConfig
    hf_config: dict
    tokenizer_path: Path
    files: dict[str, Path] = field(default_factory=dict)  # HF weight name -> safetensors file
    dtype: torch.dtype = torch.float32


def is_hf_dir(path: str | Path) -> bool:
    """A Hugging Face model directory that is not also an ftlm export (whose ftlm files, in ftlm/, are read instead)."""
    p = Path(str(path)).expanduser()
    return (
        p.is_dir() and (p / HF_CONFIG).is_file() and not (p / CONFIG).is_file() and not (p / "ftlm" / CONFIG).is_file()
    )


def _weight_files(d: Path) -> dict[str, Path]:
    """HF weight name -> file, from model.safetensors or the sharded index; never a pickle."""
    index = d / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise HFImportError(f"{index}: not a safetensors index (no weight_map): {e}") from None
        files = {name: d / fname for name, fname in weight_map.items()}
        missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if missing:
            raise HFImportError(f"{index} names shard file(s) that do not exist: {', '.join(missing)}")
        return files
    if (d / WEIGHTS).is_file():
        from safetensors import safe_open

        with safe_open(str(d / WEIGHTS), "pt") as f:
            return {name: d / WEIGHTS for name in f.keys()}
    pickles = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pt"))
    if pickles:
        raise HFImportError(
            f"{d} holds only pickled weights ({', '.join(pickles[:3])}); ftlm never unpickles. Convert them once "
            "with transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
        )
    raise HFImportError(f"{d} has no {WEIGHTS} and no {INDEX}")


def _headers(files: dict[str, Path]) -> tuple[dict[str, tuple[int, ...]], set[torch.dtype]]:
    """Shapes and dtypes from the safetensors headers: no tensor is read."""
    from safetensors import safe_open

    shapes, dtypes = {}, set()
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    for path, wanted in by_file.items():
        with safe_open(str(path), "pt") as f:
            present = set(f.keys())
            lost = sorted(set(wanted) - present)
            if lost:
                raise HFImportError(f"{path}: the index places {', '.join(lost[:5])} here but the file lacks them")
            for name in wanted:
                s = f.get_slice(name)
                shapes[name] = tuple(s.get_shape())
                if s.get_dtype() in names:
                    dtypes.add(names[s.get_dtype()])
    return shapes, dtypes


def inspect(path: str | Path, **runtime) -> HFSource:
    """Check a Hugging Face directory completely without reading a weight; HFImportError naming what is wrong."""
    d = Path(str(path)).expanduser()
    if not (d / HF_CONFIG).is_file():
        raise FileNotFoundError(f"{d / HF_CONFIG} does not exist (expected a Hugging Face model directory)")
    try:
        hf = json.loads((d / HF_CONFIG).read_text())
    except ValueError as e:
        raise HFImportError(f"{d / HF_CONFIG}: not valid JSON ({e})") from None
    where = str(d / HF_CONFIG)
    arch = architecture_of(hf, where)
    cfg = config_from_hf(hf, where, **runtime)
    tok_path = d / TOKENIZER
    if not tok_path.is_file():
        raise HFImportError(
            f"{d} has no {TOKENIZER} (a fast tokenizer); write one with transformers: "
            "AutoTokenizer.from_pretrained(dir).save_pretrained(dir)"
        )
    from ftlm.data.tokenizer import EOT_NAMES, Tokenizer

    tokenizer = Tokenizer.load(tok_path)
    n_tok = tokenizer.vocab_size
    if n_tok > cfg.vocab_size:
        from tokenizers import Tokenizer as RawTokenizer

        n_file = RawTokenizer.from_file(str(tok_path)).get_vocab_size(with_added_tokens=True)
        added = ""
        if n_file < n_tok:  # Tokenizer gave it <|endoftext|> (and <|pad|>): it names no end-of-text token ftlm knows
            added = (
                f" ({n_file} in the file, plus the end-of-text and padding tokens ftlm adds to a tokenizer that has "
                f"none of {', '.join(EOT_NAMES)})"
            )
        raise HFImportError(
            f"{tok_path} has {n_tok} tokens{added} but {HF_CONFIG} has vocab_size={cfg.vocab_size}: token ids past "
            f"{cfg.vocab_size - 1} would have no embedding"
        )
    files = _weight_files(d)
    shapes, dtypes = _headers(files)
    expected = hf_expected_shapes(cfg, arch, attention_bias=bool(hf.get("attention_bias", True)))
    if arch == "GPTNeoXForCausalLM":  # attention biases may be absent (attention_bias=False): zeros then
        expected = {k: v for k, v in expected.items() if k in shapes or "attention." not in k or "bias" not in k}
    found = {k: v for k, v in shapes.items() if not k.endswith(IGNORED_SUFFIXES)}
    if cfg.tie_embeddings:  # some savers keep the tied head anyway; it must be the embedding
        found.pop("lm_head.weight", None)
        found.pop("embed_out.weight", None)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k}: {found[k]} instead of {expected[k]}" for k in expected if k in found and found[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected: " + ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else "")
        )
    if wrong:
        problems.append("wrong shape: " + "; ".join(wrong[:5]))
    if problems:
        raise HFImportError(f"{d}: the weights do not match {HF_CONFIG} ({arch}): " + " | ".join(problems))

    dtype = next(iter(dtypes)) if len(dtypes) == 1 else torch.float32
    return HFSource(d, arch, cfg, hf, tok_path, {k: files[k] for k in expected}, dtype)


def read_hf_state_dict(src: HFSource) -> dict[str, torch.Tensor]:
    """The weights under ftlm's names, in their stored dtype, on the CPU."""
    from safetensors import safe_open

    hf: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, path in src.files.items():
        by_file.setdefault(path, []).append(name)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    shards = list(by_file.items())
    bar = tqdm(shards, desc="reading shards", unit="file", disable=len(shards) < 2) if tqdm else shards
    for path, names in bar:
        with safe_open(str(path), "pt", device="cpu") as f:
            for name in names:
                hf[name] = f.get_tensor(name)
    state = from_hf_state_dict(src.config, src.arch, hf)
    return {k: v.contiguous() for k, v in state.items()}


def load_hf(path: str | Path, **runtime) -> tuple[GPTConfig, dict[str, torch.Tensor], Path]:
    src = inspect(path, **runtime)
    return src.config, read_hf_state_dict(src), src.tokenizer_path


def load_pretrained(path: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor], Path]:
    """(config, state dict under ftlm's names on the CPU, tokenizer.json path) from a Hugging Face model directory,
    an ftlm model directory (ftlm-import / ftlm-export), a run directory or a checkpoint.

    Everything is checked before any weight is read. Weights keep their stored dtype (an HF bf16 model stays bf16;
    a ZeRO checkpoint gives fp32).
    """
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"trainer.init_from: {p} does not exist")
    if is_hf_dir(p):
        return load_hf(p)
    source = locate(p)
    load_tokenizer(source)  # the tokenizer's size against the config, before the weights
    return source.config, read_state_dict(source), source.tokenizer_path


def import_model(src: str | Path, out: str | Path, dtype: str = "auto") -> Path:
    """Write the ftlm model directory `out` for the Hugging Face directory `src`; returns out."""
    from ftlm.export import check_output_dir, write_ftlm

    out = Path(str(out)).expanduser()
    check_output_dir(out, ftlm_files=True)
    hf = inspect(src)
    if out.resolve() == hf.path.resolve():
        raise ValueError(f"the output directory {out} is the model being read; choose another")
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: not one of auto, {', '.join(DTYPES)}")
    torch_dtype = hf.dtype if dtype == "auto" else DTYPES[dtype]
    log.info("importing %s from %s: %s", hf.arch, hf.path, describe(hf.config))
    state = read_hf_state_dict(hf)
    write_ftlm(out, hf.config, state, hf.tokenizer_path, torch_dtype, None, f"{hf.path} ({hf.arch})")
    log.info("wrote %s (%s parameters), %s and %s", out / WEIGHTS, f"{hf.config.num_params():,}", out / CONFIG,
             out / TOKENIZER)  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ftlm-import", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a Hugging Face model directory (config.json, safetensors, tokenizer.json)")
    parser.add_argument("out", help="output directory (created if missing)")
    parser.add_argument(
        "--dtype", choices=["auto", *sorted(DTYPES)], default="auto", help="weight precision (default: as stored)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        import_model(args.source, args.out, args.dtype)
    except (OSError, CheckpointError, ValueError) as e:  # OSError: no such file, permission denied, disk full
        print(f"ftlm-import: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
