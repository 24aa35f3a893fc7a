"""conf/data composed from base.yaml and typed by ftlm.data.config.DataConfig: a wrong key or type fails at once."""

import pytest
from omegaconf import OmegaConf

from ftlm.data.checks import DataConfigError, as_dict
from ftlm.data.config import DataConfig, preset


@pytest.mark.parametrize("name", ["embedded", "custom"])
def test_presets_compose_over_base_and_match_preset(name):
    from ftlm.config import compose

    cfg = compose([f"data={name}"]).data
    assert OmegaConf.get_type(cfg) is DataConfig
    assert as_dict(cfg) == as_dict(preset(name))
    assert cfg.name == name and cfg.packing in ("concat", "best_fit")


def test_presets_hold_only_what_differs_from_base():
    from ftlm.config import CONF_DIR

    base_keys = set(OmegaConf.load(CONF_DIR / "data" / "base.yaml"))
    for name in ("embedded", "custom"):
        own = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "data" / f"{name}.yaml"))
        assert own.pop("defaults") == ["base", "_self_"]
        assert set(own) <= base_keys  # every key is declared (and commented) in base.yaml


@pytest.mark.parametrize(
    "change,message",
    [
        ({"val_fraction": "abc"}, "data.val_fraction"),
        ({"packng": "best_fit"}, "data.packng"),
        ({"tokenizer": {"vocab_sise": 3}}, "data.tokenizer.vocab_sise"),
        ({"packing": "random"}, "data.packing must be one of"),
        ({"packing_buffer": 0}, "data.packing_buffer"),
        ({"source_change": "ignore"}, "data.source_change"),
        ({"text_field": ""}, "data.text_field must name the field"),
        ({"clean": {"min_script_share": 2}}, r"data.clean.min_script_share is a share.*got 2"),
        ({"clean": {"min_chars": -5}}, r"data.clean.min_chars must be null or >= 0"),
        ({"clean": {"min_chars": 500, "max_chars": 100}}, "no document could be kept"),
        ({"clean": {"max_dup_ngram_frac": {0: 0.5}}}, "data.clean.max_dup_ngram_frac: n must be >= 1"),
    ],
)
def test_a_wrong_key_or_value_names_the_key(change, message):
    from ftlm.data.checks import check_data_config

    cfg = preset("embedded")
    cfg.update(change)
    with pytest.raises(DataConfigError, match=message):
        check_data_config(as_dict(cfg))


def test_a_preset_of_ones_own_streams_inherits_no_ko_en_entries(tmp_path):
    """A preset over base.yaml with streams of other names (what a user writes for their corpus) needs no ~deletions:
    base.yaml holds no per-stream entries; a stream without a language gets no language check."""
    import shutil

    from ftlm.config import CONF_DIR
    from ftlm.data.checks import check_data_config

    (tmp_path / "data").mkdir()
    shutil.copy(CONF_DIR / "data" / "base.yaml", tmp_path / "data" / "base.yaml")
    (tmp_path / "data" / "mine.yaml").write_text(
        "defaults: [base, _self_]\nname: mine\nsources: {web: [/data/web/], code: [/data/code/]}\n"
        "lang: {web: ko}\nmix: {web: 0.8, code: 0.2}\n"
    )
    cfg = as_dict(preset("mine", str(tmp_path)))
    assert cfg["lang"] == {"web": "ko"} and cfg["mix"] == {"web": 0.8, "code": 0.2}
    assert check_data_config(cfg) == ["web", "code"]


def test_entries_of_mappings_on_the_command_line():
    """data.sources / data.mix / data.tokenizer.sample_shares take new entries with ++ (the error says so), and the
    n-gram rules, keyed by integers, are set as a mapping or turned off with null."""
    from ftlm.config import ConfigError, compose
    from ftlm.data.clean import CleanConfig

    with pytest.raises(ConfigError, match=r"data.mix has no entry 'web'.*\+\+data.mix.web=VALUE.*~data.mix.NAME"):
        compose(["data=custom", "data.mix.web=1"])
    with pytest.raises(
        ConfigError, match=r"cannot reach the integer key 5.*data.clean.max_dup_ngram_frac=\{5: VALUE\}"
    ):
        compose(["data.clean.max_dup_ngram_frac.5=0.9"])

    cfg = as_dict(compose(["++data.tokenizer.sample_shares.ko=0.6", "++data.tokenizer.sample_shares.en=0.4"]).data)
    assert cfg["tokenizer"]["sample_shares"] == {"ko": 0.6, "en": 0.4}
    assert as_dict(compose([]).data)["tokenizer"]["sample_shares"] is None  # {} in base.yaml: equal shares

    cfg = as_dict(compose(["data.clean.max_dup_ngram_frac=null", "data.clean.max_top_ngram_frac={2: null}"]).data)
    clean = CleanConfig.from_cfg(cfg["clean"])
    assert clean.max_dup_ngram_frac == {} and clean.max_top_ngram_frac == {3: 0.18, 4: 0.16}
