"""Training FLOPs of the GPT in `ftlm.model.gpt`, counted from its config.

Convention (PaLM, Chowdhery et al. 2022, appendix B; the same count as Megatron-LM, Narayanan et al. 2021,
without its activation-recomputation pass):

    flops_per_token = 6 * N_matmul  +  12 * n_layer * d_model * seq_len

* `N_matmul` counts the weights every token is multiplied by: the attention and MLP projections of every
  block, plus the LM head (vocab_size x d_model). The LM head is counted even when it is tied to the token
  embedding: the lookup is free, the output projection is not. Norm weights and biases are left out
  (a few parameters, no matmul). A weight costs 2 FLOPs per token forward (multiply + add) and 4 backward
  (gradient with respect to the input and to the weight): 6 in all.
* The attention term is the score and value matmuls, QK^T and AV: 2 * 2 * seq_len * d_model FLOPs per token
  per layer forward, times 3 for forward + backward. It uses n_head * head_dim = d_model whether or not the
  keys and values are grouped (GQA shares K and V, not the work).
* Causal masking does NOT halve the attention term, as in PaLM, so MFU figures compare with published ones;
  a causal flash-attention kernel skips about half of that work, which this count does not credit. Nor does
  it credit document masking (`model.doc_mask` with packed sequences), which skips more.
* `parallel_residual`, `rotary_pct` and `gelu_approx` change no matmul: the count is the same for each.
* Activation recomputation is not counted: MFU measures the model's FLOPs, not the hardware's (that would be HFU).
"""

from __future__ import annotations

from ftlm.model.gpt import GPTConfig


def matmul_params_per_layer(cfg: GPTConfig) -> int:
    """Weights of one block's matmuls: the fused QKV and output projections, and the MLP."""
    d = cfg.d_model
    attn = d * (cfg.n_head + 2 * cfg.n_kv_heads) * cfg.head_dim + d * d
    mlp = d * cfg.d_ff * (3 if cfg.mlp == "swiglu" else 2)
    return attn + mlp


def matmul_params(cfg: GPTConfig) -> int:
    """N_matmul: every block's matmul weights plus the LM head."""
    return cfg.n_layer * matmul_params_per_layer(cfg) + cfg.vocab_size * cfg.d_model


def attention_flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """12 * n_layer * d_model * seq_len: QK^T and AV, forward and backward, without a causal discount."""
    return 12.0 * cfg.n_layer * cfg.d_model * seq_len


def flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 * N_matmul + 12 * n_layer * d_model * seq_len."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    return 6.0 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)


def training_flops(cfg: GPTConfig, seq_len: int, tokens: float) -> float:
    """Total training FLOPs for `tokens` tokens of sequences of `seq_len`."""
    return flops_per_token(cfg, seq_len) * tokens
