"""ftlm-export: a trained model as one safetensors file, and as a Hugging Face model directory.

    ftlm-export <run dir | checkpoint | export dir> <out dir> [--dtype bf16|fp32] [--no-hf] [--config FILE]

writes
    <out>/model.safetensors     every weight under ftlm's own names, in one file (ftlm-generate and ftlm-eval
    <out>/ftlm_config.json      read this directory; the config is GPTConfig's fields under "model")
    <out>/tokenizer.json        the run's tokenizer, unchanged
    <out>/hf/                   unless --no-hf: a directory that `AutoModelForCausalLM.from_pretrained` and
                                `AutoTokenizer.from_pretrained` load without custom code

The Hugging Face architecture follows the config: rmsnorm + swiglu is `LlamaForCausalLM`, layernorm + gelu is
`GPTNeoXForCausalLM` (Polyglot-Ko's architecture; sequential residual, rotary over the whole head, tanh GELU).
Both use the same "rotate half" rotary layout as ftlm, so no weight is permuted. GPT-NeoX has no grouped-query
attention, so grouped key/value heads are repeated for it, which computes exactly the same function with a
larger K/V projection. Other combinations have no Hugging Face twin: their ftlm files are still written.
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

from ftlm.checkpoint_io import (
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
from ftlm.model import GPTConfig

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
HF_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}


class HFExportError(ValueError):
    """The model has no Hugging Face architecture with the same function."""


def hf_family(cfg: GPTConfig) -> str:
    if cfg.norm == "rmsnorm" and cfg.mlp == "swiglu":
        return "llama"
    if cfg.norm == "layernorm" and cfg.mlp == "gelu":
        return "neox"
    raise HFExportError(
        f"model.norm={cfg.norm} with model.mlp={cfg.mlp} has no Hugging Face architecture: only "
        "rmsnorm+swiglu (LlamaForCausalLM) and layernorm+gelu (GPTNeoXForCausalLM) export to "
        "Hugging Face; pass --no-hf to write the ftlm files only"
    )


def _split_qkv(t: torch.Tensor, cfg: GPTConfig):
    """Our fused projection's rows are [all q heads | all k heads | all v heads]."""
    hd = cfg.head_dim
    return t.split([cfg.n_head * hd, cfg.n_kv_heads * hd, cfg.n_kv_heads * hd], dim=0)


def llama_state_dict(cfg: GPTConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        out[hf + "input_layernorm.weight"] = sd[ours + "norm1.weight"]
        out[hf + "post_attention_layernorm.weight"] = sd[ours + "norm2.weight"]
        kinds = ("weight", "bias") if cfg.bias else ("weight",)
        for kind in kinds:
            q, k, v = _split_qkv(sd[f"{ours}attn.qkv.{kind}"], cfg)
            out[f"{hf}self_attn.q_proj.{kind}"], out[f"{hf}self_attn.k_proj.{kind}"] = q, k
            out[f"{hf}self_attn.v_proj.{kind}"] = v
            out[f"{hf}self_attn.o_proj.{kind}"] = sd[f"{ours}attn.proj.{kind}"]
            gate, up = sd[f"{ours}mlp.fc_in.{kind}"].chunk(2, dim=0)  # silu(gate) * up
            out[f"{hf}mlp.gate_proj.{kind}"], out[f"{hf}mlp.up_proj.{kind}"] = gate, up
            out[f"{hf}mlp.down_proj.{kind}"] = sd[f"{ours}mlp.fc_out.{kind}"]
    return out


def _neox_qkv(t: torch.Tensor, cfg: GPTConfig) -> torch.Tensor:
    """GPT-NeoX interleaves per head: rows [q_0 k_0 v_0 | q_1 k_1 v_1 | ...]. Query head h reads key/value
    head h // (n_head / n_kv_heads), as in ftlm's grouped-query attention, so shared heads are repeated."""
    hd, rep = cfg.head_dim, cfg.n_head // cfg.n_kv_heads
    q, k, v = _split_qkv(t, cfg)
    rest = t.shape[1:]
    q = q.reshape(cfg.n_head, hd, *rest)
    k = k.reshape(cfg.n_kv_heads, hd, *rest).repeat_interleave(rep, dim=0)
    v = v.reshape(cfg.n_kv_heads, hd, *rest).repeat_interleave(rep, dim=0)
    return torch.cat([q, k, v], dim=1).reshape(3 * cfg.n_head * hd, *rest)


def neox_state_dict(cfg: GPTConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT-NeoX always has LayerNorm and MLP biases: they are zero where ftlm has none."""

    def bias(name: str, n: int) -> torch.Tensor:
        return sd[name] if name in sd else torch.zeros(n, dtype=sd["embed.weight"].dtype)

    d = cfg.d_model
    out = {
        "gpt_neox.embed_in.weight": sd["embed.weight"],
        "gpt_neox.final_layer_norm.weight": sd["norm.weight"],
        "gpt_neox.final_layer_norm.bias": bias("norm.bias", d),
    }
    if not cfg.tie_embeddings:
        out["embed_out.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        ours, hf = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        for n in (1, 2):
            name = "input_layernorm" if n == 1 else "post_attention_layernorm"
            out[f"{hf}{name}.weight"] = sd[f"{ours}norm{n}.weight"]
            out[f"{hf}{name}.bias"] = bias(f"{ours}norm{n}.bias", d)
        out[hf + "attention.query_key_value.weight"] = _neox_qkv(sd[ours + "attn.qkv.weight"], cfg)
        out[hf + "attention.dense.weight"] = sd[ours + "attn.proj.weight"]
        if cfg.bias:  # attention_bias=False otherwise: those biases do not exist at all
            out[hf + "attention.query_key_value.bias"] = _neox_qkv(sd[ours + "attn.qkv.bias"], cfg)
            out[hf + "attention.dense.bias"] = sd[ours + "attn.proj.bias"]
        out[hf + "mlp.dense_h_to_4h.weight"] = sd[ours + "mlp.fc_in.weight"]
        out[hf + "mlp.dense_h_to_4h.bias"] = bias(ours + "mlp.fc_in.bias", cfg.d_ff)
        out[hf + "mlp.dense_4h_to_h.weight"] = sd[ours + "mlp.fc_out.weight"]
        out[hf + "mlp.dense_4h_to_h.bias"] = bias(ours + "mlp.fc_out.bias", d)
    return out


def hf_config(cfg: GPTConfig, tokenizer, dtype: torch.dtype):
    from transformers import GPTNeoXConfig, LlamaConfig

    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        intermediate_size=cfg.d_ff,
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=tokenizer.eot_id,
        eos_token_id=tokenizer.eot_id,
        pad_token_id=tokenizer.pad_id,
        dtype=HF_DTYPE_NAMES[dtype],
    )
    if hf_family(cfg) == "llama":
        return LlamaConfig(
            **common,
            num_key_value_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            hidden_act="silu",
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta,
            attention_bias=cfg.bias,
            mlp_bias=cfg.bias,
            attention_dropout=0.0,
            architectures=["LlamaForCausalLM"],
        )
    return GPTNeoXConfig(
        **common,
        hidden_act="gelu_pytorch_tanh",
        rotary_pct=1.0,
        rotary_emb_base=cfg.rope_theta,
        layer_norm_eps=cfg.norm_eps,
        use_parallel_residual=False,
        attention_bias=cfg.bias,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        architectures=["GPTNeoXForCausalLM"],
    )


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
) -> None:
    from ftlm.data.tokenizer import Tokenizer
    from ftlm.train.checkpoint import tokenizer_fingerprint

    out.mkdir(parents=True, exist_ok=True)
    _save_safetensors(state, out / WEIGHTS, dtype, {"format": "pt", "ftlm_config": json.dumps(asdict(cfg))})
    meta = {
        "model": asdict(cfg),
        "step": step,
        "source": source,
        "dtype": HF_DTYPE_NAMES[dtype],
        "tokenizer_vocab": Tokenizer.load(tokenizer_path).vocab_size,
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer_path),
    }
    (out / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
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
    weights = llama_state_dict(cfg, state) if family == "llama" else neox_state_dict(cfg, state)
    hf_dir.mkdir(parents=True, exist_ok=True)
    config = hf_config(cfg, tokenizer, dtype)
    config.save_pretrained(hf_dir)
    GenerationConfig(
        bos_token_id=tokenizer.eot_id, eos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.pad_id
    ).save_pretrained(hf_dir)
    _save_safetensors(weights, hf_dir / WEIGHTS, dtype, {"format": "pt"})
    backend = tokenizer.backend
    eot, pad = backend.id_to_token(tokenizer.eot_id), backend.id_to_token(tokenizer.pad_id)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_path),
        bos_token=eot,
        eos_token=eot,
        pad_token=pad,
        model_max_length=cfg.max_seq_len,
        clean_up_tokenization_spaces=False,
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
    """Write the ftlm files (and, with hf, the Hugging Face directory <out>/hf); returns out.

    Raises HFExportError after writing the ftlm files when the config has no Hugging Face twin.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: not one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    out = Path(str(out)).expanduser()
    source = locate(src)
    if expected_config is not None:
        if isinstance(expected_config, (str, Path)):
            expected_config = read_expected_config(expected_config)
        check_config(source.config, expected_config, source.path)
    tokenizer = load_tokenizer(source)
    state = read_state_dict(source)
    if source.kind == "export" and out.resolve() == source.path.resolve():
        raise ValueError(f"the output directory {out} is the export being read; choose another")
    write_ftlm(out, source.config, state, source.tokenizer_path, torch_dtype, source.step, str(source.path))
    log.info(
        "wrote %s (%s, %s parameters), %s and %s",
        out / WEIGHTS,
        dtype,
        f"{sum(v.numel() for v in state.values()):,}",
        out / CONFIG,
        out / TOKENIZER,
    )
    if hf:
        arch = write_hf(out / "hf", source.config, state, tokenizer, source.tokenizer_path, torch_dtype)
        log.info("wrote the Hugging Face %s directory %s", arch, out / "hf")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ftlm-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help=SOURCE_HELP)
    parser.add_argument("out", help="output directory (created if missing)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weight precision (default bf16)")
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="skip the Hugging Face directory <out>/hf")
    parser.add_argument(
        "--config",
        help="a model config (conf/model/*.yaml or a run's config.yaml) the checkpoint "
        "must match; mismatched keys are named",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        export(args.source, args.out, args.dtype, args.hf, args.config)
    except HFExportError as e:
        wrote = Path(args.out) / WEIGHTS
        print(
            f"ftlm-export: error: {e}" + (f" (the ftlm files are written: {wrote})" if wrote.exists() else ""),
            file=sys.stderr,
        )
        return 1
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        print(f"ftlm-export: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
