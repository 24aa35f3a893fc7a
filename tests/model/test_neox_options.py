"""The options imported GPT-NeoX models need, against transformers' own functions and the formulas they name."""

import math

import pytest
import torch
import torch.nn.functional as F

from ftlm.model import GPT, GPTConfig
from ftlm.model.gpt import apply_rope, rope_angles


def tiny(**kw):
    base = dict(vocab_size=97, max_seq_len=64, n_layer=2, n_head=4, d_model=64, attn_impl="sdpa", norm_impl="torch")
    base.update(kw)
    return GPTConfig(**base)


@pytest.mark.parametrize("rotary_pct", [1.0, 0.5, 0.25])
def test_partial_rotary_matches_transformers_gpt_neox(rotary_pct):
    from transformers import GPTNeoXConfig
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding, apply_rotary_pos_emb

    cfg = tiny(rotary_pct=rotary_pct, rope_theta=500.0)
    hf = GPTNeoXConfig(
        hidden_size=cfg.d_model, num_attention_heads=cfg.n_head, rotary_pct=rotary_pct, rotary_emb_base=500.0
    )
    torch.manual_seed(0)
    q, k = torch.randn(2, cfg.n_head, 11, cfg.head_dim), torch.randn(2, cfg.n_head, 11, cfg.head_dim)
    positions = torch.stack([torch.arange(11), torch.cat([torch.arange(4), torch.arange(7)])])  # (2, 11)
    cos_hf, sin_hf = GPTNeoXRotaryEmbedding(hf)(q, positions)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)

    assert cfg.rotary_dim == int(cfg.head_dim * rotary_pct) == cos_hf.shape[-1]
    cos, sin = rope_angles(cfg, positions)  # (2, 11, R)
    torch.testing.assert_close(apply_rope(q, cos[:, None], sin[:, None]), q_hf, rtol=0, atol=1e-6)
    torch.testing.assert_close(apply_rope(k, cos[:, None], sin[:, None]), k_hf, rtol=0, atol=1e-6)
    if rotary_pct < 1:  # the dims past rotary_dim pass through untouched
        assert torch.equal(apply_rope(q, cos[:, None], sin[:, None])[..., cfg.rotary_dim :], q[..., cfg.rotary_dim :])


def test_parallel_residual_adds_both_branches_to_the_block_input():
    torch.manual_seed(0)
    for parallel in (False, True):
        model = GPT(tiny(parallel_residual=parallel, bias=True)).eval()
        block = model.blocks[0]
        x = torch.randn(2, 9, 64)
        cos, sin = torch.ones(9, 16), torch.zeros(9, 16)  # rotation by 0: attention sees the raw q, k
        attn = block.attn(block.norm1(x), cos, sin)
        if parallel:
            expected = x + attn + block.mlp(block.norm2(x))
        else:
            expected = x + attn + block.mlp(block.norm2(x + attn))
        torch.testing.assert_close(block(x, cos, sin), expected, rtol=1e-6, atol=1e-6)


def test_gelu_approx_none_is_the_exact_erf_gelu():
    torch.manual_seed(0)
    for approx in ("tanh", "none"):
        mlp = GPT(tiny(gelu_approx=approx)).blocks[0].mlp
        x = torch.randn(3, 5, 64)
        h = mlp.fc_in(x)
        if approx == "none":
            act = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        else:
            act = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
        torch.testing.assert_close(mlp(x), mlp.fc_out(act), rtol=1e-5, atol=1e-6)
    exact, tanh = GPT(tiny(gelu_approx="none")), GPT(tiny(gelu_approx="tanh"))
    tanh.load_state_dict(exact.state_dict())
    idx = torch.randint(0, 97, (1, 7))
    assert not torch.equal(exact.eval()(idx)[0], tanh.eval()(idx)[0])


def test_new_options_keep_the_model_causal_and_trainable():
    torch.manual_seed(0)
    model = GPT(tiny(parallel_residual=True, rotary_pct=0.25, gelu_approx="none", n_kv_heads=2))
    a = torch.randint(0, 97, (2, 15))
    b = a.clone()
    b[:, 9:] = torch.randint(0, 97, (2, 6))
    model.eval()
    torch.testing.assert_close(model(a)[0][:, :9], model(b)[0][:, :9], rtol=1e-5, atol=1e-5)
    model.train()
    loss = model(a, a.roll(-1, 1))[1]
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert F.cross_entropy(model.eval()(a)[0].flatten(0, 1), a.roll(-1, 1).flatten()).item() == pytest.approx(
        loss.item(), rel=1e-5
    )
