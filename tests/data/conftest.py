import copy
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]


def data_config(out_dir, preset: str = "embedded", **overrides) -> dict:
    """conf/data/<preset>.yaml (over base.yaml) as a plain dict, with out_dir and any top-level key replaced;
    the sub-configs clean, dedup and tokenizer are updated key by key instead."""
    from ftlm.data.config import preset as load_preset

    cfg = load_preset(preset)
    cfg["out_dir"] = str(out_dir)
    cfg["cache_dir"] = str(Path(out_dir) / "cache")
    for key, value in overrides.items():
        if key in ("clean", "dedup", "tokenizer") and isinstance(value, dict):
            cfg[key] = {**cfg[key], **copy.deepcopy(value)}
        else:
            cfg[key] = copy.deepcopy(value)
    return cfg


@pytest.fixture(scope="session")
def make_data_config():
    return data_config


@pytest.fixture(scope="session")
def embedded_prepared(tmp_path_factory):
    """The embedded corpus prepared once per session (about 5 s)."""
    from ftlm.data.prepare import prepare

    out = tmp_path_factory.mktemp("embedded")
    cfg = data_config(out)
    return cfg, prepare(OmegaConf.create(cfg))
