"""Hugging Face <-> ftlm: configs and state dicts, both directions, for LlamaForCausalLM and GPTNeoXForCausalLM.

ftlm keeps one fused attention projection whose rows are [all q heads | all k heads | all v heads] and, for SwiGLU,
one input projection whose rows are [gate | up]. Hugging Face Llama keeps q/k/v and gate/up apart; GPT-NeoX
interleaves per head ([q_0 k_0 v_0 | q_1 k_1 v_1 | ...]). Both use the "rotate half" rotary layout, as ftlm does, so
no weight is ever permuted: every conversion here is a split, a concatenation or a reshape, and converting there and
back gives the same tensors bit for bit.

Config mapping (Hugging Face key -> GPTConfig key):
    Llama / Mistral  hidden_size -> d_model, intermediate_size -> d_ff, num_key_value_heads -> n_kv_heads,
                     rms_norm_eps -> norm_eps, rope_theta, attention_bias = mlp_bias -> bias, tie_word_embeddings
    GPT-NeoX         rotary_pct -> rotary_pct, rotary_emb_base -> rope_theta, layer_norm_eps -> norm_eps,
                     use_parallel_residual -> parallel_residual, hidden_act gelu -> gelu_approx="none" (exact erf)
                     and gelu_new / gelu_pytorch_tanh / gelu_fast -> "tanh"; GPT-NeoX always has LayerNorm and MLP
                     biases, so an imported NeoX model has bias=True (absent attention biases become zeros, which
                     compute the same function).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict

import torch

from ftlm.model import GPTConfig

log = logging.getLogger(__name__)

HF_CONFIG = "config.json"  # a Hugging Face model directory's config file
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "GPTNeoXForCausalLM")
HF_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}
# Buffers some older checkpoints saved beside the weights; they are recomputed, never read.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.bias", ".attention.masked_bias")


class HFConversionError(ValueError):
    """A Hugging Face model ftlm cannot represent exactly (or an ftlm model Hugging Face cannot); says which key."""


class HFExportError(HFConversionError):
    """The model has no Hugging Face architecture with the same function."""


# -- which family ----------------------------------------------------------------------------------------------------
def hf_family(cfg: GPTConfig) -> str:
    """'llama' or 'neox': the Hugging Face architecture that computes the same function as `cfg`."""
    if cfg.norm == "rmsnorm" and cfg.mlp == "swiglu":
        if cfg.parallel_residual or cfg.rotary_pct != 1.0:
            raise HFExportError(
                f"model.parallel_residual={cfg.parallel_residual} / model.rotary_pct={cfg.rotary_pct}: "
                "LlamaForCausalLM has a sequential residual and rotates the whole head; pass --no-hf to write the "
                "ftlm files only"
            )
        return "llama"
    if cfg.norm == "layernorm" and cfg.mlp == "gelu":
        return "neox"
    raise HFExportError(
        f"model.norm={cfg.norm} with model.mlp={cfg.mlp} has no Hugging Face architecture: only "
        "rmsnorm+swiglu (LlamaForCausalLM) and layernorm+gelu (GPTNeoXForCausalLM) export to "
        "Hugging Face; pass --no-hf to write the ftlm files only"
    )


# -- ftlm -> Hugging Face ----------------------------------------------------------------------------------------------
def _split_qkv(t: torch.Tensor, cfg: GPTConfig):
    """Our fused projection's rows are [all q heads | all k heads | all v heads]."""
    hd = cfg.head_dim
    return t.split([cfg.n_head * hd, cfg.n_kv_heads * hd, cfg.n_kv_heads * hd], dim=0)


def _llama_table(cfg: GPTConfig) -> list[tuple[str, tuple[str, ...], list[int] | None]]:
    """ftlm name -> Llama's name(s), and the row sizes when one fused ftlm tensor is several of Llama's (split along
    dim 0): the one mapping both directions use."""
    hd = cfg.head_dim
    rows = [("embed.weight", ("model.embed_tokens.weight",), None), ("norm.weight", ("model.norm.weight",), None)]
    if not cfg.tie_embeddings:
        rows.append(("lm_head.weight", ("lm_head.weight",), None))
    qkv = [cfg.n_head * hd, cfg.n_kv_heads * hd, cfg.n_kv_heads * hd]  # [all q heads | all k heads | all v heads]
    for i in range(cfg.n_layer):
        ours, a, m = f"blocks.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        rows.append((ours + "norm1.weight", (f"model.layers.{i}.input_layernorm.weight",), None))
        rows.append((ours + "norm2.weight", (f"model.layers.{i}.post_attention_layernorm.weight",), None))
        for kind in ("weight", "bias") if cfg.bias else ("weight",):
            rows += [
                (f"{ours}attn.qkv.{kind}", (f"{a}q_proj.{kind}", f"{a}k_proj.{kind}", f"{a}v_proj.{kind}"), qkv),
                (f"{ours}attn.proj.{kind}", (f"{a}o_proj.{kind}",), None),
                (f"{ours}mlp.fc_in.{kind}", (f"{m}gate_proj.{kind}", f"{m}up_proj.{kind}"), [cfg.d_ff, cfg.d_ff]),
                (f"{ours}mlp.fc_out.{kind}", (f"{m}down_proj.{kind}",), None),  # fc_in: silu(gate) * up
            ]
    return rows


def llama_state_dict(cfg: GPTConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for ours, names, rows in _llama_table(cfg):
        parts = (sd[ours],) if rows is None else sd[ours].split(rows, dim=0)
        out.update(zip(names, parts))
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


def to_hf_state_dict(cfg: GPTConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return llama_state_dict(cfg, sd) if hf_family(cfg) == "llama" else neox_state_dict(cfg, sd)


def hf_config(cfg: GPTConfig, bos_id: int, eos_id: int, pad_id: int | None, dtype: torch.dtype):
    """The transformers config object of the architecture that computes what `cfg` computes."""
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
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
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
        hidden_act="gelu" if cfg.gelu_approx == "none" else "gelu_pytorch_tanh",
        rotary_pct=cfg.rotary_pct,
        rotary_emb_base=cfg.rope_theta,
        layer_norm_eps=cfg.norm_eps,
        use_parallel_residual=cfg.parallel_residual,
        attention_bias=cfg.bias,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        architectures=["GPTNeoXForCausalLM"],
    )


# -- Hugging Face -> ftlm ----------------------------------------------------------------------------------------------
def architecture_of(hf: dict, where: str) -> str:
    archs = hf.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    known = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
    if not known:
        named = ", ".join(archs) if archs else f"none (model_type {hf.get('model_type')!r})"
        raise HFConversionError(
            f"{where}: architecture {named} is not supported; ftlm imports {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return known[0]


def _rope_parameters(hf: dict, where: str) -> dict:
    """The rotary settings as transformers 5 writes them, `rope_parameters` {rope_type, rope_theta,
    partial_rotary_factor, ...}; {} for a 4.x config, whose top-level rope_theta / rotary_emb_base / rotary_pct /
    rope_scaling say the same. Read from here first: a 5.x config has no top-level rope_theta, and its default
    (10000) would silently build another model."""
    params = hf.get("rope_parameters")
    if params is None:
        return {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise HFConversionError(
            f"{where}: rope_parameters {params!r} is not one set of rotary settings (per layer type?); ftlm applies "
            "the same unscaled rotary embedding in every layer"
        )
    return params


def _check_rope_scaling(hf: dict, where: str) -> None:
    for key, scaling in (("rope_scaling", hf.get("rope_scaling")), ("rope_parameters", hf.get("rope_parameters"))):
        if scaling is None:
            continue
        kind = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else scaling
        if kind != "default":
            raise HFConversionError(
                f"{where}: {key} {scaling!r} (type {kind!r}) is not supported: ftlm implements unscaled rotary "
                f"embeddings only ({key} null or rope_type 'default')"
            )


def config_from_hf(hf: dict, where: str = "config.json", **runtime) -> GPTConfig:
    """The GPTConfig computing what the Hugging Face config computes; HFConversionError naming the key otherwise.

    runtime: GPTConfig fields that do not change the weights (attn_impl, norm_impl, dropout, ...).
    """
    arch = architecture_of(hf, where)
    _check_rope_scaling(hf, where)
    rope = _rope_parameters(hf, where)

    def need(key: str, default=None):
        value = hf.get(key, default)
        if value is None:
            raise HFConversionError(f"{where}: {key} is missing")
        return value

    d_model, n_head = int(need("hidden_size")), int(need("num_attention_heads"))
    common = dict(
        name=str(hf.get("_name_or_path") or hf.get("model_type") or arch).rsplit("/", 1)[-1] or arch,
        vocab_size=int(need("vocab_size")),
        max_seq_len=int(need("max_position_embeddings")),
        n_layer=int(need("num_hidden_layers")),
        n_head=n_head,
        d_model=d_model,
        d_ff=int(need("intermediate_size")),
        init_std=float(hf.get("initializer_range", 0.02)),
        # A key left out means transformers' default, False for all three (a config written by hand or by a
        # converter may omit it; reading it as tied would drop the checkpoint's own lm_head).
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    if arch in ("LlamaForCausalLM", "MistralForCausalLM"):
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise HFConversionError(f"{where}: hidden_act {act!r} is not supported for {arch} (only silu: SwiGLU)")
        head_dim = hf.get("head_dim") or d_model // n_head
        if head_dim * n_head != d_model:
            raise HFConversionError(
                f"{where}: head_dim={head_dim} with num_attention_heads={n_head} does not give hidden_size={d_model}; "
                "ftlm needs head_dim = hidden_size / num_attention_heads"
            )
        attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
        if attn_bias != mlp_bias:
            raise HFConversionError(
                f"{where}: attention_bias={attn_bias} with mlp_bias={mlp_bias}: ftlm has one bias switch for both"
            )
        if int(hf.get("pretraining_tp", 1) or 1) != 1:
            log.info("%s: pretraining_tp=%s only changes how Hugging Face splits matmuls; ignored", where,
                     hf["pretraining_tp"])  # fmt: skip
        # MistralConfig's default window is 4096: a Mistral config without the key still slides (Llama's never).
        window = hf.get("sliding_window", 4096 if arch == "MistralForCausalLM" else None)
        if not hf.get("use_sliding_window", True):
            window = None
        if window is not None and int(window) < common["max_seq_len"]:
            # Within the window, sliding-window attention is plain causal attention.
            log.warning(
                "%s: sliding_window=%s < max_position_embeddings=%s: using max_seq_len=%s, where the two agree",
                where, window, common["max_seq_len"], window,
            )  # fmt: skip
            common["max_seq_len"] = int(window)
        cfg = dict(
            common,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_head),
            norm="rmsnorm",
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            mlp="swiglu",
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            bias=attn_bias,
        )
    else:
        act = hf.get("hidden_act", "gelu")
        approx = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}.get(act)
        if approx is None:
            raise HFConversionError(
                f"{where}: hidden_act {act!r} is not supported for GPTNeoXForCausalLM (gelu, gelu_new, "
                "gelu_pytorch_tanh, gelu_fast)"
            )
        rotary_pct = float(
            rope.get("partial_rotary_factor", hf.get("rotary_pct", hf.get("partial_rotary_factor", 0.25)))
        )
        cfg = dict(
            common,
            n_kv_heads=n_head,
            norm="layernorm",
            norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
            mlp="gelu",
            gelu_approx=approx,
            rope_theta=float(rope.get("rope_theta", hf.get("rotary_emb_base", hf.get("rope_theta", 10000.0)))),
            rotary_pct=rotary_pct,
            parallel_residual=bool(hf.get("use_parallel_residual", True)),
            bias=True,
        )
    try:
        return GPTConfig(**cfg, **runtime)
    except ValueError as e:
        raise HFConversionError(f"{where}: {e}") from None


def hf_expected_shapes(cfg: GPTConfig, arch: str, attention_bias: bool = True) -> dict[str, tuple[int, ...]]:
    """Every weight name a Hugging Face checkpoint of this shape holds, with its shape (no tensor is allocated)."""
    d, ff, hd, V = cfg.d_model, cfg.d_ff, cfg.head_dim, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {}
    if arch == "GPTNeoXForCausalLM":
        shapes["gpt_neox.embed_in.weight"] = (V, d)
        shapes["gpt_neox.final_layer_norm.weight"] = shapes["gpt_neox.final_layer_norm.bias"] = (d,)
        if not cfg.tie_embeddings:
            shapes["embed_out.weight"] = (V, d)
        for i in range(cfg.n_layer):
            p = f"gpt_neox.layers.{i}."
            for n in ("input_layernorm", "post_attention_layernorm"):
                shapes[f"{p}{n}.weight"] = shapes[f"{p}{n}.bias"] = (d,)
            shapes[p + "attention.query_key_value.weight"] = (3 * d, d)
            shapes[p + "attention.dense.weight"] = (d, d)
            if attention_bias:
                shapes[p + "attention.query_key_value.bias"] = (3 * d,)
                shapes[p + "attention.dense.bias"] = (d,)
            shapes[p + "mlp.dense_h_to_4h.weight"], shapes[p + "mlp.dense_h_to_4h.bias"] = (ff, d), (ff,)
            shapes[p + "mlp.dense_4h_to_h.weight"], shapes[p + "mlp.dense_4h_to_h.bias"] = (d, ff), (d,)
        return shapes
    kv = cfg.n_kv_heads * hd
    shapes["model.embed_tokens.weight"], shapes["model.norm.weight"] = (V, d), (d,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (V, d)
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (d,)
        for name, out_f, in_f in (
            ("self_attn.q_proj", d, d),
            ("self_attn.k_proj", kv, d),
            ("self_attn.v_proj", kv, d),
            ("self_attn.o_proj", d, d),
            ("mlp.gate_proj", ff, d),
            ("mlp.up_proj", ff, d),
            ("mlp.down_proj", d, ff),
        ):
            shapes[f"{p}{name}.weight"] = (out_f, in_f)
            if cfg.bias:
                shapes[f"{p}{name}.bias"] = (out_f,)
    return shapes


def from_hf_state_dict(cfg: GPTConfig, arch: str, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ftlm's state dict (ftlm names) from a Hugging Face one; the inverse of to_hf_state_dict."""
    if arch == "GPTNeoXForCausalLM":
        return _from_neox(cfg, hf)
    return {
        ours: hf[names[0]] if rows is None else torch.cat([hf[n] for n in names], dim=0)
        for ours, names, rows in _llama_table(cfg)
    }


def _unneox_qkv(t: torch.Tensor, cfg: GPTConfig) -> torch.Tensor:
    """[q_0 k_0 v_0 | q_1 k_1 v_1 | ...] -> [all q | all k | all v] (n_kv_heads = n_head for GPT-NeoX)."""
    rest = t.shape[1:]
    per_head = t.reshape(cfg.n_head, 3, cfg.head_dim, *rest)  # (head, q/k/v, hd, ...)
    return per_head.transpose(0, 1).reshape(3 * cfg.d_model, *rest)


def _from_neox(cfg: GPTConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    dtype = hf["gpt_neox.embed_in.weight"].dtype
    out = {
        "embed.weight": hf["gpt_neox.embed_in.weight"],
        "norm.weight": hf["gpt_neox.final_layer_norm.weight"],
        "norm.bias": hf["gpt_neox.final_layer_norm.bias"],
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = hf["embed_out.weight"]
    for i in range(cfg.n_layer):
        ours, p = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        for n, name in ((1, "input_layernorm"), (2, "post_attention_layernorm")):
            out[f"{ours}norm{n}.weight"], out[f"{ours}norm{n}.bias"] = hf[f"{p}{name}.weight"], hf[f"{p}{name}.bias"]
        out[ours + "attn.qkv.weight"] = _unneox_qkv(hf[p + "attention.query_key_value.weight"], cfg)
        out[ours + "attn.proj.weight"] = hf[p + "attention.dense.weight"]
        qkv_bias = hf.get(p + "attention.query_key_value.bias")  # attention_bias=False: zeros do the same
        out[ours + "attn.qkv.bias"] = (
            _unneox_qkv(qkv_bias, cfg) if qkv_bias is not None else torch.zeros(3 * cfg.d_model, dtype=dtype)
        )
        dense_bias = hf.get(p + "attention.dense.bias")
        out[ours + "attn.proj.bias"] = dense_bias if dense_bias is not None else torch.zeros(cfg.d_model, dtype=dtype)
        out[ours + "mlp.fc_in.weight"], out[ours + "mlp.fc_in.bias"] = (
            hf[p + "mlp.dense_h_to_4h.weight"],
            hf[p + "mlp.dense_h_to_4h.bias"],
        )
        out[ours + "mlp.fc_out.weight"], out[ours + "mlp.fc_out.bias"] = (
            hf[p + "mlp.dense_4h_to_h.weight"],
            hf[p + "mlp.dense_4h_to_h.bias"],
        )
    return out


def describe(cfg: GPTConfig) -> str:
    keys = ("n_layer", "n_head", "n_kv_heads", "d_model", "d_ff", "vocab_size", "norm", "mlp", "rope_theta")
    values = asdict(cfg)
    extra = ("rotary_pct", "parallel_residual", "gelu_approx") if cfg.norm == "layernorm" else ()
    return ", ".join(f"{k}={values[k]}" for k in keys + extra if k in values)


def pad_to_multiple(n: int, multiple: int = 64) -> int:
    return multiple * math.ceil(n / multiple)
