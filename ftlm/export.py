"""ftlm-export: a trained model as a Hugging Face model directory, with ftlm's own files beside it.

    ftlm-export <run dir | checkpoint | export dir> <out dir> [--dtype bf16|fp32] [--no-hf] [--config FILE]

writes
    <out>/config.json, model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json
                                a Hugging Face model: `AutoModelForCausalLM.from_pretrained(<out>)` and
                                `AutoTokenizer.from_pretrained(<out>)` load it without custom code
    <out>/ftlm/                 ftlm's files (ftlm-generate, ftlm-eval, ftlm-export and trainer.init_from read <out>):
        ftlm_config.json        GPTConfig's fields under "model", the step, the tokenizer's size and checksum
        tokenizer.json          the run's tokenizer, unchanged
        model.safetensors       only where the Hugging Face weights cannot give back ftlm's exactly (GPT-NeoX with
                                repeated key/value heads): every weight under ftlm's names; otherwise ftlm's readers
                                convert <out>/model.safetensors back, and an export holds one copy of the weights
With --no-hf the three ftlm files are written to <out> itself (the format ftlm-import writes). Exports in the
earlier layout (ftlm files in <out>, the Hugging Face model in <out>/hf) stay readable.

The Hugging Face architecture follows the config: rmsnorm + swiglu is `LlamaForCausalLM`, layernorm + gelu is
`GPTNeoXForCausalLM` (Polyglot-Ko's architecture, with its partial rotary, parallel residual and exact GELU when the
config has them). Both use the same "rotate half" rotary layout as ftlm, so no weight is permuted (ftlm.hf.convert).
GPT-NeoX has no grouped-query attention, so grouped key/value heads are repeated for it, which computes exactly the
same function with a larger K/V projection. Other combinations have no Hugging Face twin: pass --no-hf.

The exported tokenizer returns input_ids and attention_mask only (so `model.generate(**tokenizer(text,
return_tensors="pt"))` works) and treats the literal text "<|endoftext|>" as text, as ftlm does in training
(split_special_tokens=True): the end-of-text id comes only from `tokenizer.eos_token_id`, never from the data.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from ftlm.checkpoint import (
    CONFIG,
    SOURCE_HELP,
    TOKENIZER,
    WEIGHTS,
    CheckpointError,
    check_config,
    load_tokenizer,
    locate,
    read_expected_config,
    read_state_dict,
)
from ftlm.hf.convert import HF_CONFIG, HF_DTYPE_NAMES, HFExportError, hf_config, hf_family, to_hf_state_dict  # noqa: F401
from ftlm.model import GPTConfig

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
FTLM_SUBDIR = "ftlm"  # <out>/ftlm/ holds ftlm's own files when <out> itself is the Hugging Face model
HF_WEIGHTS = "hugging_face"  # ftlm_config.json "weights": the Hugging Face model's, in the folder above


def _save_safetensors(state: dict[str, torch.Tensor], path: Path, dtype: torch.dtype, metadata: dict) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def write_ftlm(
    out: Path,
    cfg: GPTConfig,
    state: dict,
    tokenizer_path: Path,
    dtype: torch.dtype,
    step: int | None = None,
    source: str = "",
    with_weights: bool = True,
) -> None:
    """ftlm's files in `out`; with_weights=False leaves the weights to the Hugging Face model in out's parent, which
    ftlm's readers then convert back (ftlm.checkpoint.reader), so an export holds one copy of them."""
    from ftlm.checkpoint import tokenizer_fingerprint
    from ftlm.data.tokenizer import Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    if with_weights:
        _save_safetensors(state, out / WEIGHTS, dtype, {"format": "pt", "ftlm_config": json.dumps(asdict(cfg))})
    meta = {
        "weights": "ftlm" if with_weights else HF_WEIGHTS,
        "model": asdict(cfg),
        "step": step,
        "source": source,
        "dtype": HF_DTYPE_NAMES[dtype],
        "tokenizer_vocab": Tokenizer.load(tokenizer_path).vocab_size,
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer_path),
    }
    (out / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    if not with_weights and (out / WEIGHTS).is_file():  # an earlier export's own copy, of other weights maybe
        (out / WEIGHTS).unlink()
    if tokenizer_path.resolve() != (out / TOKENIZER).resolve():
        shutil.copyfile(tokenizer_path, out / TOKENIZER)


def write_hf(hf_dir: Path, cfg: GPTConfig, state: dict, tokenizer, tokenizer_path: Path, dtype: torch.dtype) -> str:
    """The Hugging Face model directory; returns the architecture's class name."""
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    family = hf_family(cfg)
    if family == "neox" and cfg.n_kv_heads != cfg.n_head:
        log.info(
            "GPT-NeoX has no grouped-query attention: repeating each of the %d key/value heads %d times",
            cfg.n_kv_heads,
            cfg.n_head // cfg.n_kv_heads,
        )
    weights = to_hf_state_dict(cfg, state)
    hf_dir.mkdir(parents=True, exist_ok=True)
    bos = tokenizer.prefix_id
    config = hf_config(cfg, bos, tokenizer.eot_id, tokenizer.pad_id, dtype)
    config.save_pretrained(hf_dir)
    GenerationConfig(bos_token_id=bos, eos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.pad_id).save_pretrained(
        hf_dir
    )
    _save_safetensors(weights, hf_dir / WEIGHTS, dtype, {"format": "pt"})
    backend = tokenizer.backend
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_path),
        bos_token=backend.id_to_token(bos),
        eos_token=backend.id_to_token(tokenizer.eot_id),
        pad_token=backend.id_to_token(tokenizer.pad_id),
        unk_token=getattr(backend.model, "unk_token", None),  # Llama's <unk>; byte-level BPE has none
        model_max_length=cfg.max_seq_len,
        clean_up_tokenization_spaces=False,
        # Llama / GPT-NeoX take no token_type_ids: generate(**tokenizer(...)) would reject them.
        model_input_names=["input_ids", "attention_mask"],
        # "<|endoftext|>" inside a text is text, as in ftlm's training data, not the end-of-text id.
        split_special_tokens=True,
    )
    hf_tok.save_pretrained(hf_dir)
    return config.architectures[0]


def export(
    src: str | Path,
    out: str | Path,
    dtype: str = "bf16",
    hf: bool = True,
    expected_config: GPTConfig | dict | str | Path | None = None,
) -> Path:
    """Write the Hugging Face model to <out> and ftlm's files to <out>/ftlm (with hf=False: ftlm's files to <out>).

    Returns the directory holding the ftlm files. Every check (the config has a Hugging Face twin, the output does not
    overwrite what is being read or an export in the earlier layout) runs before anything is written.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: not one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    out = Path(str(out)).expanduser()
    check_output_dir(out, ftlm_files=not hf)
    source = locate(src)
    if expected_config is not None:
        if isinstance(expected_config, (str, Path)):
            expected_config = read_expected_config(expected_config)
        check_config(source.config, expected_config, source.path)
    if hf:
        hf_family(source.config)  # HFExportError before anything is read or written
    ftlm_dir = out / FTLM_SUBDIR if hf else out
    resolved = {p.resolve() for p in (out, ftlm_dir)}
    if source.kind == "export" and source.path.resolve() in resolved:
        raise ValueError(f"the output directory {out} is the export being read; choose another")
    if hf and (out / CONFIG).is_file():
        raise ValueError(
            f"{out} holds an ftlm export in the earlier layout ({CONFIG} beside {WEIGHTS}); writing the Hugging Face "
            "model there would mix the two: choose a new output directory"
        )
    tokenizer = load_tokenizer(source)
    state = read_state_dict(source)
    own_copy = not hf or not hf_invertible(source.config)
    if hf:  # first: ftlm's config, written last, may point at these weights
        arch = write_hf(out, source.config, state, tokenizer, source.tokenizer_path, torch_dtype)
        log.info("wrote the Hugging Face %s model %s (from_pretrained loads it as is)", arch, out)
    write_ftlm(
        ftlm_dir, source.config, state, source.tokenizer_path, torch_dtype, source.step, str(source.path), own_copy
    )
    log.info(
        "wrote %s and %s%s (%s, %s parameters)",
        ftlm_dir / CONFIG,
        ftlm_dir / TOKENIZER,
        f" and {ftlm_dir / WEIGHTS}" if own_copy else f"; ftlm reads the weights from {out / WEIGHTS}",
        dtype,
        f"{sum(v.numel() for v in state.values()):,}",
    )
    return ftlm_dir


def check_output_dir(out: Path, ftlm_files: bool = False) -> None:
    """Refuse, before any weight is read, an output directory that cannot be made (it or a folder above is a file)
    or, for ftlm's own files (ftlm-import, ftlm-export --no-hf), one holding a Hugging Face model: its
    model.safetensors would be replaced by ftlm's, leaving a config.json that no longer loads."""
    blocked = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise ValueError(f"the output directory {out} cannot be made: {blocked} is a file; choose another")
    if ftlm_files and (out / HF_CONFIG).is_file():
        raise ValueError(
            f"the output directory {out} holds a Hugging Face model ({out / HF_CONFIG}); writing ftlm's "
            f"{WEIGHTS} there would break it: choose a new output directory"
        )


def hf_invertible(cfg: GPTConfig) -> bool:
    """Whether the Hugging Face weights give back ftlm's exactly: always for Llama; for GPT-NeoX unless grouped
    key/value heads were repeated for it or biases it lacks were added (then ftlm/ keeps a copy of its own)."""
    return hf_family(cfg) == "llama" or (cfg.n_kv_heads == cfg.n_head and cfg.bias)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ftlm-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help=SOURCE_HELP)
    parser.add_argument(
        "out", help="output directory (created if missing): the Hugging Face model, ftlm's files in ftlm/"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weight precision (default bf16)")
    parser.add_argument(
        "--no-hf", dest="hf", action="store_false", help="write only ftlm's files, to <out> itself (no Hugging Face)"
    )
    parser.add_argument(
        "--config",
        help="a model config (conf/model/*.yaml or a run's config.yaml) the checkpoint "
        "must match; mismatched keys are named",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        export(args.source, args.out, args.dtype, args.hf, args.config)
    except (OSError, CheckpointError, ValueError) as e:  # HFExportError is a ValueError; OSError: no such file,
        print(f"ftlm-export: error: {e}", file=sys.stderr)  # permission denied, disk full (the path is named)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
