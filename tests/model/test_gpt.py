import pytest
import torch

from ftlm.config import compose
from ftlm.model import GPT, ConfigError, GPTConfig
from ftlm.train.main import model_config


def tiny(**kw):
    base = dict(vocab_size=97, max_seq_len=64, n_layer=2, n_head=4, d_model=64, attn_impl="sdpa", norm_impl="torch")
    base.update(kw)
    return GPTConfig(**base)


@pytest.mark.parametrize(
    "norm,mlp,bias,tie,kv",
    [
        ("layernorm", "gelu", False, True, None),
        ("rmsnorm", "swiglu", False, False, 2),
        ("layernorm", "swiglu", True, True, 1),
        ("rmsnorm", "gelu", True, False, 4),
    ],
)
def test_shapes_and_param_count_match_closed_form(norm, mlp, bias, tie, kv):
    cfg = tiny(norm=norm, mlp=mlp, bias=bias, tie_embeddings=tie, n_kv_heads=kv)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 17))
    logits, loss = model(idx, idx)
    assert logits is None  # training: backward overwrites the logits, so forward does not hand them back
    assert loss.ndim == 0 and torch.isfinite(loss)
    logits, eval_loss = model.eval()(idx, idx)
    assert logits.shape == (3, 17, cfg.vocab_size)
    torch.testing.assert_close(eval_loss, loss)
    assert model.num_params() == cfg.num_params()


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("rotary_pct", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("gelu_approx", ["tanh", "none"])
@pytest.mark.parametrize(
    "norm,mlp,bias,tie,kv", [("layernorm", "gelu", True, False, 2), ("rmsnorm", "swiglu", False, True, 4)]
)
def test_param_count_closed_form_for_every_new_option(parallel, rotary_pct, gelu_approx, norm, mlp, bias, tie, kv):
    cfg = tiny(
        parallel_residual=parallel,
        rotary_pct=rotary_pct,
        gelu_approx=gelu_approx,
        norm=norm,
        mlp=mlp,
        bias=bias,
        tie_embeddings=tie,
        n_kv_heads=kv,
    )
    model = GPT(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    embed = cfg.vocab_size * cfg.d_model  # the token embedding; an untied head stays in the count
    assert cfg.num_params(include_embedding=False) == sum(p.numel() for p in model.parameters()) - embed


@pytest.mark.parametrize(
    "preset,expected_millions",
    [
        ("gpt_125m", 85),
        ("gpt_350m", 302),
        ("gpt_760m", 680),
        ("gpt_1_3b", 1208),
        ("gpt_2_7b", 2517),
        ("gpt_6_7b", 6442),
        ("gpt_13b", 12583),
    ],
)
def test_presets_have_gpt3_sizes(preset, expected_millions):
    """Non-embedding parameters of each preset are GPT-3's 12 * n_layer * d_model^2 (no biases, rotary)."""
    cfg = model_config(compose([f"model={preset}"]).model, tokenizer_vocab=32000)
    assert (
        cfg.num_params(include_embedding=False)
        == 12 * cfg.n_layer * cfg.d_model**2 + (2 * cfg.n_layer + 1) * cfg.d_model
    )
    assert round(cfg.num_params(include_embedding=False) / 1e6) == pytest.approx(expected_millions, abs=1)
    with_embedding = cfg.num_params() / 1e6
    assert with_embedding > expected_millions


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("kv", [4, 2, 1])
def test_causal_future_tokens_do_not_change_the_past(impl, kv):
    torch.manual_seed(0)
    model = GPT(tiny(attn_impl=impl, n_kv_heads=kv)).eval()
    a = torch.randint(0, 97, (2, 23))
    b = a.clone()
    b[:, 15:] = torch.randint(0, 97, (2, 8))
    la, _ = model(a)
    lb, _ = model(b)
    torch.testing.assert_close(la[:, :15], lb[:, :15], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(la[:, 15:], lb[:, 15:])


def test_attention_implementations_agree():
    torch.manual_seed(0)
    models = {impl: GPT(tiny(n_kv_heads=2, attn_impl=impl)).eval() for impl in ("sdpa", "eager")}
    models["eager"].load_state_dict(models["sdpa"].state_dict())
    idx = torch.randint(0, 97, (2, 31))
    outs = {impl: model(idx)[0] for impl, model in models.items()}
    torch.testing.assert_close(outs["sdpa"], outs["eager"], rtol=1e-4, atol=1e-5)


def test_gqa_equals_multihead_attention_with_repeated_kv_heads():
    """A GQA model equals a plain multi-head model whose k/v projections repeat each kv head."""
    torch.manual_seed(0)
    gqa = GPT(tiny(n_kv_heads=2)).eval()
    mha = GPT(tiny(n_kv_heads=4)).eval()
    state = gqa.state_dict()
    hd, nh, nkv = 16, 4, 2
    for i in range(2):
        w = state[f"blocks.{i}.attn.qkv.weight"]
        q, k, v = w.split([nh * hd, nkv * hd, nkv * hd])
        rep = lambda t: t.view(nkv, hd, -1).repeat_interleave(nh // nkv, dim=0).reshape(nh * hd, -1)
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(state)
    idx = torch.randint(0, 97, (2, 19))
    torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], rtol=1e-5, atol=1e-5)


def test_residual_projections_get_scaled_init():
    torch.manual_seed(0)
    cfg = tiny(n_layer=8, d_model=256, n_head=4)
    model = GPT(cfg)
    std_qkv = model.blocks[0].attn.qkv.weight.std().item()
    std_proj = model.blocks[0].attn.proj.weight.std().item()
    assert std_qkv == pytest.approx(0.02, rel=0.05)
    assert std_proj == pytest.approx(0.02 / (2 * 8) ** 0.5, rel=0.05)


@pytest.mark.parametrize(
    "kw,key",
    [
        (dict(d_model=65), "model.d_model"),
        (dict(n_kv_heads=3), "model.n_kv_heads"),
        (dict(attn_impl="magic"), "model.attn_impl"),
        (dict(norm="batchnorm"), "model.norm"),
        (dict(mlp="relu"), "model.mlp"),
        (dict(n_layer=0), "model.n_layer"),
        (dict(rotary_pct=0.0), "model.rotary_pct"),
        (dict(rotary_pct=1.5), "model.rotary_pct"),
        (dict(rotary_pct=0.1), "model.rotary_pct"),  # 1.6 of 16 dims: fewer than 2
        (dict(rotary_pct=0.2), "model.rotary_pct"),  # int(16 * 0.2) = 3 dims: odd
        (dict(gelu_approx="erf"), "model.gelu_approx"),
        (dict(new_token_init="zeros"), "model.new_token_init"),
        (dict(parallel_residual="yes"), "model.parallel_residual"),
        (dict(doc_mask=1), "model.doc_mask"),
        (dict(vocab_size=None), "model.vocab_size"),
    ],
)
def test_bad_config_names_the_key(kw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny(**kw)


def test_unknown_model_key_is_named():
    with pytest.raises(ConfigError, match=r"model\.n_layers"):
        GPTConfig.from_dict({"n_layers": 3})


def test_flash_attn_missing_gives_install_hint():
    pytest.importorskip("torch")
    try:
        import flash_attn  # noqa: F401

        pytest.skip("flash_attn is installed here")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match="pip install"):
        tiny(attn_impl="flash_attn")


def test_sequence_longer_than_max_seq_len_is_refused():
    model = GPT(tiny(max_seq_len=16))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_vocab_smaller_than_tokenizer_is_refused():
    cfg = compose(["model=tiny", "model.vocab_size=100"]).model
    with pytest.raises(ValueError, match="model.vocab_size"):
        model_config(cfg, tokenizer_vocab=4000)
    assert model_config(compose(["model=tiny"]).model, tokenizer_vocab=4001).vocab_size == 4032


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = GPT(tiny(n_kv_heads=2, dropout=0.0))
    idx = torch.randint(0, 97, (2, 21))
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        model(idx, idx)[1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(plain, recomputed, rtol=1e-5, atol=1e-6)
