"""Tiny random Hugging Face models saved locally (save_pretrained, safetensors) with a tokenizer beside them."""

from __future__ import annotations

from pathlib import Path

import torch


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every weight random (norm weights near 1, biases too), so no term of a mapping hides behind a zero or a one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.2 * noise)


def save_hf(model, tokenizer_json: str, out: Path, **save) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, **save)
    (out / "tokenizer.json").write_text(tokenizer_json)
    return out


def llama(out: Path, tokenizer_json: str, seed: int = 0, vocab_size: int = 896, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    randomize(model, seed)
    return save_hf(model, tokenizer_json, out)


def neox(out: Path, tokenizer_json: str, seed: int = 0, vocab_size: int = 768, **overrides) -> Path:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        rotary_pct=0.5,  # Polyglot-Ko: rotary over half of each head
        rotary_emb_base=10000,
        use_parallel_residual=True,
        hidden_act="gelu",  # exact erf GELU
        layer_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**cfg)).eval()
    randomize(model, seed)
    return save_hf(model, tokenizer_json, out)


def rope_settings(config) -> dict:
    """rope_theta and the rotated fraction of each head, from a transformers config of 4.x (top-level rope_theta,
    rotary_emb_base, rotary_pct) or of 5.x (all in rope_parameters)."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = getattr(config, "rope_theta", getattr(config, "rotary_emb_base", None))
    pct = getattr(config, "rotary_pct", getattr(config, "partial_rotary_factor", 1.0))
    return {"rope_theta": params.get("rope_theta", theta), "rotary_pct": params.get("partial_rotary_factor", pct)}


def hf_logits(path, ids: torch.Tensor) -> tuple[torch.Tensor, object]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits, model
