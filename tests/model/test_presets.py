"""conf/model: presets composed over base.yaml, typed by GPTConfig (the model/schema node)."""

import dataclasses

import pytest
import yaml
from omegaconf import OmegaConf

from ftlm.config import CONF_DIR, ConfigError, compose
from ftlm.model import GPTConfig

# Every preset's values before conf/model was composed (each file then repeated gpt_125m but these keys).
COMMON = dict(
    n_kv_heads=None,
    d_ff=None,
    max_seq_len=2048,
    vocab_size=None,
    norm="layernorm",
    norm_eps=1e-05,
    mlp="gelu",
    rope_theta=10000.0,
    tie_embeddings=True,
    bias=False,
    dropout=0.0,
    init_std=0.02,
    attn_impl="auto",
    norm_impl="auto",
)
BEFORE = {
    "gpt_125m": dict(n_layer=12, d_model=768, n_head=12),
    "gpt_350m": dict(n_layer=24, d_model=1024, n_head=16),
    "gpt_760m": dict(n_layer=24, d_model=1536, n_head=16),
    "gpt_1_3b": dict(n_layer=24, d_model=2048, n_head=16),
    "gpt_2_7b": dict(n_layer=32, d_model=2560, n_head=32),
    "gpt_6_7b": dict(n_layer=32, d_model=4096, n_head=32),
    "gpt_13b": dict(n_layer=40, d_model=5120, n_head=40),
    "tiny": dict(n_layer=4, d_model=256, n_head=4, n_kv_heads=2, max_seq_len=256),
}
# Keys added since: the values that keep every preset's function as it was (doc_mask only acts on cu_seqlens).
ADDED = dict(parallel_residual=False, rotary_pct=1.0, gelu_approx="tanh", doc_mask=True, new_token_init="subtoken_mean")


@pytest.mark.parametrize("preset", sorted(BEFORE))
def test_composed_presets_keep_their_values(preset):
    cfg = compose([f"model={preset}"]).model
    assert OmegaConf.get_type(cfg) is GPTConfig
    expected = {**COMMON, "name": preset, **BEFORE[preset], **ADDED}
    assert OmegaConf.to_container(cfg) == expected
    assert set(expected) == {f.name for f in dataclasses.fields(GPTConfig)}


def test_every_preset_is_listed_and_overrides_only_its_shape():
    presets = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml") if p.stem != "base")
    assert presets == sorted(BEFORE)
    base = yaml.safe_load((CONF_DIR / "model" / "base.yaml").read_text())
    assert base["defaults"] == ["schema", "_self_"]
    for preset in presets:
        data = yaml.safe_load((CONF_DIR / "model" / f"{preset}.yaml").read_text())
        assert data.pop("defaults") == ["base", "_self_"]
        assert set(data) <= {"name", "n_layer", "d_model", "n_head", "n_kv_heads", "max_seq_len"}, preset


def test_every_gpt_config_key_is_in_base_yaml_with_a_comment_and_its_code_default():
    lines = (CONF_DIR / "model" / "base.yaml").read_text().splitlines()
    base = yaml.safe_load("\n".join(lines))
    for f in dataclasses.fields(GPTConfig):
        line = next((x for x in lines if x.startswith(f"{f.name}:")), None)
        assert line is not None and "#" in line, f"model.{f.name} is not documented in conf/model/base.yaml"
        assert base[f.name] == f.default, f"model.{f.name}: base.yaml says {base[f.name]}, the code {f.default}"


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.n_layer=two", "model.n_layer"),
        ("model.rotary_pct=half", "model.rotary_pct"),
        ("model.parallel_residual=maybe", "model.parallel_residual"),
        ("model.n_layers=3", "model.n_layers"),
        ("+model.rotary=0.5", "model.rotary"),
    ],
)
def test_wrong_type_or_unknown_key_fails_at_compose_time_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose(["model=tiny", override])


def test_optional_ints_accept_null_and_numbers():
    cfg = compose(["model=gpt_125m", "model.n_kv_heads=4", "model.vocab_size=50304"]).model
    assert (cfg.n_kv_heads, cfg.vocab_size, cfg.d_ff) == (4, 50304, None)
    assert GPTConfig.from_dict(OmegaConf.to_container(cfg)).d_ff == 4 * 768
