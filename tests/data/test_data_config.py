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
    assert OmegaConf.to_container(cfg, resolve=True) == as_dict(preset(name))
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
    ],
)
def test_a_wrong_key_or_value_names_the_key(change, message):
    from ftlm.data.checks import check_data_config

    cfg = preset("embedded")
    cfg.update(change)
    with pytest.raises(DataConfigError, match=message):
        check_data_config(as_dict(cfg))
