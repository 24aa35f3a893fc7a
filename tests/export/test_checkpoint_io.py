"""Loading a model from a run directory, a checkpoint or an export, and the errors raised before any weights load."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

import ftlm.checkpoint.reader as cio
from ftlm.export import write_ftlm
from ftlm.model import GPT, GPTConfig


def test_run_dir_checkpoint_and_checkpoints_root_load_the_same(tiny_run_dir):
    reference = load_file(tiny_run_dir / "reference_weights.safetensors")
    ckpt = tiny_run_dir / "checkpoints" / "step_00000002"
    for path in (tiny_run_dir, ckpt, tiny_run_dir / "checkpoints"):
        loaded = cio.load(path)
        assert loaded.source.path == ckpt and loaded.source.step == 2
        assert loaded.source.tokenizer_path == tiny_run_dir / "tokenizer.json"
        assert not loaded.model.training
        for k, v in loaded.model.state_dict().items():
            assert torch.equal(v, reference[k]), k


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope does not exist"):
        cio.load(tmp_path / "nope")


def test_not_a_model_directory(tmp_path):
    with pytest.raises(cio.CheckpointError, match="is not a run directory"):
        cio.load(tmp_path)


@pytest.fixture
def weights_untouchable(monkeypatch):
    """Reading weights fails loudly: an error raised with this active was raised before any weights were read."""

    def boom(*args, **kwargs):
        raise AssertionError("weights were read before the error was found")

    monkeypatch.setattr(cio, "consolidate", boom)
    monkeypatch.setattr(cio, "read_state_dict", boom)


def test_config_mismatch_names_keys(tiny_run_dir, weights_untouchable):
    with pytest.raises(cio.CheckpointError) as e:
        cio.load(tiny_run_dir, expected_config={"n_layer": 4, "d_model": 256, "norm": "layernorm", "vocab_size": None})
    msg = str(e.value)
    assert "another model config" in msg and "step_00000002" in msg
    assert "model.n_layer: checkpoint has 2, given config has 4" in msg
    assert "model.d_model: checkpoint has 64, given config has 256" in msg
    assert "model.norm" not in msg and "model.vocab_size" not in msg  # equal or null keys are not named


def test_config_mismatch_from_preset_file(tiny_run_dir, weights_untouchable):
    from ftlm.config import CONF_DIR

    with pytest.raises(cio.CheckpointError, match="model.n_layer: checkpoint has 2, given config has 12"):
        cio.load(tiny_run_dir, expected_config=CONF_DIR / "model" / "gpt_125m.yaml")


def test_matching_config_loads(tiny_run_dir):
    cfg = GPTConfig.from_dict(cio.locate(tiny_run_dir).config.__dict__ | {"attn_impl": "eager"})
    assert cio.load(tiny_run_dir, expected_config=cfg).model.cfg.n_layer == 2
    assert cio.load(tiny_run_dir, expected_config=tiny_run_dir / "config.yaml").model.cfg.n_kv_heads == 2


def test_cli_config_mismatch(tiny_run_dir, tmp_path, capsys, weights_untouchable):
    from ftlm.export import main

    (tmp_path / "m.yaml").write_text("n_layer: 3\nmlp: swiglu\n")
    assert main([str(tiny_run_dir), str(tmp_path / "out"), "--config", str(tmp_path / "m.yaml")]) == 1
    err = capsys.readouterr().err
    assert "model.n_layer: checkpoint has 2, given config has 3" in err and "model.mlp: checkpoint has 'gelu'" in err
    assert not (tmp_path / "out").exists()


def test_kernels_chosen_at_load_time(tiny_run_dir, tmp_path):
    """A model trained with flash_attn or triton loads where those are missing: attn_impl is a runtime choice."""
    import json

    cfg = GPTConfig(vocab_size=512, max_seq_len=32, n_layer=1, n_head=2, d_model=32)
    write_ftlm(tmp_path / "e", cfg, GPT(cfg).state_dict(), tiny_run_dir / "tokenizer.json", torch.float32)
    meta = json.loads((tmp_path / "e" / "ftlm_config.json").read_text())
    meta["model"].update(attn_impl="flash_attn", norm_impl="triton")
    (tmp_path / "e" / "ftlm_config.json").write_text(json.dumps(meta))
    model = cio.load(tmp_path / "e").model
    assert (model.cfg.attn_impl, model.cfg.norm_impl) == ("auto", "auto")
    assert cio.load(tmp_path / "e", attn_impl="eager").model.cfg.attn_impl == "eager"


def test_tokenizer_larger_than_model(tiny_run_dir, tmp_path, weights_untouchable):
    cfg = GPTConfig(vocab_size=320, max_seq_len=32, n_layer=1, n_head=2, d_model=32)  # the tokenizer has 400
    export = tmp_path / "small"
    write_ftlm(export, cfg, GPT(cfg).state_dict(), tiny_run_dir / "tokenizer.json", torch.float32)
    with pytest.raises(cio.CheckpointError, match="has 400 tokens but the model .* model.vocab_size=320"):
        cio.load(export)


def test_weights_that_disagree_with_their_config(tiny_run_dir, tmp_path):
    cfg = GPTConfig(vocab_size=512, max_seq_len=32, n_layer=1, n_head=2, d_model=32)
    state = GPT(cfg).state_dict()
    state["blocks.0.mlp.fc_in.weight"] = state["blocks.0.mlp.fc_in.weight"][:7]
    del state["norm.weight"]
    write_ftlm(tmp_path / "bad", cfg, state, tiny_run_dir / "tokenizer.json", torch.float32)
    with pytest.raises(cio.CheckpointError, match=r"missing norm.weight .*blocks.0.mlp.fc_in.weight: \(7, 32\)"):
        cio.load(tmp_path / "bad")


def test_torn_checkpoint_is_refused(tiny_run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)
    shard = next((run / "checkpoints" / "step_00000002").glob("*model_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(cio.CheckpointError, match="step_00000002 is not usable: file .*model_states.pt has 100 bytes"):
        cio.load(run / "checkpoints" / "step_00000002")
    with pytest.raises(cio.CheckpointError, match="no complete checkpoint under"):
        cio.load(run)


def test_hugging_face_directory_is_pointed_out(tiny_run_dir, tmp_path):
    from ftlm.export import export

    export(tiny_run_dir, tmp_path / "out", dtype="fp32")
    shutil.rmtree(tmp_path / "out" / "ftlm")  # the Hugging Face files alone, without ftlm's beside them
    with pytest.raises(cio.CheckpointError, match="Hugging Face model directory.*ftlm-import"):
        cio.load(tmp_path / "out")


def test_tokenizer_other_than_the_one_trained_with(tiny_run_dir, tmp_path, weights_untouchable):
    from ftlm.data.tokenizer import train_tokenizer

    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)
    train_tokenizer(["completely different text, 다른 글"] * 8, 300, min_frequency=1, show_progress=False).save(
        str(run / "tokenizer.json")
    )
    with pytest.raises(cio.CheckpointError, match=r"has \d+ tokens but .* was trained with a 400-token tokenizer"):
        cio.load(run)


class _Evil:
    """Unpickling this runs a shell command: what a replaced checkpoint file could do to a careless reader."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _plant(path, marker):
    """Replace a checkpoint file with a malicious pickle and update the manifest's size and checksum for it, as
    whoever could write the folder could: only the restricted unpickler stands between it and the reader."""
    import json

    from ftlm.checkpoint.format import MANIFEST, file_checksum

    torch.save({"state": _Evil(marker)}, path)
    manifest = path.parent / MANIFEST
    m = json.loads(manifest.read_text())
    m["files"][path.name] = path.stat().st_size
    m["checksums"][path.name] = file_checksum(path)
    manifest.write_text(json.dumps(m))


@pytest.mark.parametrize("victim", ["optim_states", "model_states"])
def test_malicious_pickle_never_runs_in_load_export_generate_or_eval(tiny_run_dir, tmp_path, capsys, victim):
    from ftlm.eval.generate import main as generate_main
    from ftlm.eval.main import main as eval_main
    from ftlm.export import main as export_main

    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)
    ckpt = run / "checkpoints" / "step_00000002"
    marker = tmp_path / "pwned"
    for f in ckpt.glob(f"*{victim}.pt"):
        _plant(f, marker)
    with pytest.raises(cio.CheckpointError) as e:
        cio.load(run)
    msg = str(e.value)
    assert f"refusing to load {ckpt}/" in msg and "posix.system" in msg
    assert "weights_only" not in msg and "trusted source" not in msg  # torch's advice is never passed on

    text = tmp_path / "t.txt"
    text.write_text("서울은 한국의 수도이다. Seoul is the capital of Korea.\n")
    capsys.readouterr()
    assert export_main([str(run), str(tmp_path / "out")]) == 1
    assert generate_main([str(run), "--prompt", "서울", "--max-new-tokens", "2", "--device", "cpu"]) != 0
    assert eval_main([str(run), str(text), "--device", "cpu"]) != 0
    err = capsys.readouterr().err
    assert err.count("refusing to load") >= 3 and "weights_only" not in err
    assert not marker.exists()
