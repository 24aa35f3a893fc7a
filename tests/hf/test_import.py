"""ftlm-import / load_pretrained: parity with transformers, import -> export round trips, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from hf_models import hf_logits, llama, neox, rope_settings
from safetensors.torch import load_file, save_file

from ftlm.checkpoint import build_model, load
from ftlm.eval.generate import generate
from ftlm.export import export
from ftlm.hf import HFImportError, import_model, load_pretrained
from ftlm.hf import importer as importer_mod
from ftlm.hf.importer import main as import_main

CASES = {
    # Llama 2/3 / Mistral style: grouped-query attention, rope_theta, untied head
    "llama_gqa_untied": (llama, "sp", {}),
    "llama_tied_bias": (
        llama,
        "sp",
        dict(tie_word_embeddings=True, num_key_value_heads=4, attention_bias=True, mlp_bias=True, rope_theta=1e4),
    ),
    "mistral": (llama, "sp", dict(architectures=["MistralForCausalLM"])),
    # Polyglot-Ko style: rotary over half the head, parallel residual, biases, untied, exact GELU
    "neox_polyglot": (neox, "bl", {}),
    "neox_sequential_tanh": (
        neox,
        "bl",
        dict(use_parallel_residual=False, hidden_act="gelu_new", rotary_pct=0.25, attention_bias=False),
    ),
}


def make(case, tmp_path, sp_tokenizer_json, bytelevel_tokenizer_json, seed=0):
    build, tok, overrides = CASES[case]
    overrides = dict(overrides)
    archs = overrides.pop("architectures", None)
    path = build(tmp_path / case, sp_tokenizer_json if tok == "sp" else bytelevel_tokenizer_json, seed, **overrides)
    if archs:  # same weights and keys, another architecture name (MistralForCausalLM has Llama's layout)
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(architectures=archs, model_type="mistral", sliding_window=None)
        (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_parity_fp32(case, tmp_path, sp_tokenizer_json, bytelevel_tokenizer_json):
    src = make(case, tmp_path, sp_tokenizer_json, bytelevel_tokenizer_json, seed=len(case))
    cfg, state, tokenizer_path = load_pretrained(src)
    assert tokenizer_path == src / "tokenizer.json"
    model = build_model(cfg, state)
    assert model.num_params() == cfg.num_params()
    ids = torch.randint(0, 700, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(ids)
    theirs, hf = hf_logits(src, ids)
    assert ours.abs().max() > 1.0  # not a comparison of near-zero numbers
    err = (ours - theirs).abs().max().item()
    print(f"{case}: max |ftlm - transformers| = {err:.2e} ({type(hf).__name__})")
    assert err <= 1e-4
    if "neox" in case:
        assert cfg.parallel_residual == hf.config.use_parallel_residual
        assert cfg.rotary_pct == rope_settings(hf.config)["rotary_pct"] and cfg.gelu_approx == (
            "none" if case == "neox_polyglot" else "tanh"
        )


@pytest.mark.parametrize("arch", ["llama", "mistral", "neox"])
def test_keys_a_config_leaves_out_mean_what_transformers_reads_there(
    arch, tmp_path, sp_tokenizer_json, bytelevel_tokenizer_json
):
    """A config.json written by hand or by a converter may omit keys; each then means transformers' default
    (an untied head for all three, a 4096-token window for Mistral), never ftlm's guess."""
    from transformers import AutoConfig

    build, tok = (neox, bytelevel_tokenizer_json) if arch == "neox" else (llama, sp_tokenizer_json)
    src = build(tmp_path / arch, tok, seed=3)  # an untied head
    cfg = json.loads((src / "config.json").read_text())
    del cfg["tie_word_embeddings"]
    if arch == "mistral":
        cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", max_position_embeddings=8192)
        cfg.pop("sliding_window", None)
    (src / "config.json").write_text(json.dumps(cfg))
    hf = AutoConfig.from_pretrained(src)
    ours, state, _ = load_pretrained(src)
    assert ours.tie_embeddings is hf.tie_word_embeddings is False
    if arch == "mistral":
        assert hf.sliding_window == 4096 and ours.max_seq_len == 4096  # clamped to where the two attentions agree
    model = build_model(ours, state)
    ids = torch.randint(0, 700, (1, 23), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, _ = model(ids)
    assert (logits - hf_logits(src, ids)[0]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", ["llama_gqa_untied", "llama_tied_bias", "neox_polyglot"])
def test_import_then_export_gives_the_same_tensors_and_generation(
    case, tmp_path, sp_tokenizer_json, bytelevel_tokenizer_json
):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = make(case, tmp_path, sp_tokenizer_json, bytelevel_tokenizer_json)
    imported = tmp_path / "imported"
    assert import_main([str(src), str(imported)]) == 0
    assert {p.name for p in imported.iterdir()} == {"model.safetensors", "ftlm_config.json", "tokenizer.json"}
    assert (imported / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()
    loaded = load(imported)  # what ftlm-generate and ftlm-eval do with the directory

    out = tmp_path / "export"
    export(imported, out, dtype="fp32")
    original, back = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert back.keys() == original.keys()
    for k in original:
        assert torch.equal(back[k], original[k]), k
    a, b = AutoConfig.from_pretrained(src), AutoConfig.from_pretrained(out)
    assert b.architectures == a.architectures
    keys = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "tie_word_embeddings", "hidden_act"]  # fmt: skip
    keys += (
        ["use_parallel_residual", "layer_norm_eps"]
        if "neox" in case
        else ["num_key_value_heads", "rms_norm_eps", "attention_bias", "mlp_bias"]
    )
    assert {k: getattr(b, k) for k in keys} == {k: getattr(a, k) for k in keys}
    assert rope_settings(b) == rope_settings(a)
    assert AutoTokenizer.from_pretrained(out).unk_token == (None if "neox" in case else "<unk>")

    # greedy generation: transformers on the source, ftlm on the import, transformers on the export
    prompt = [5, 17, 42, 99, 7]
    ours = list(generate(loaded.model, prompt, 12))
    hf_src = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    hf_out = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    theirs = hf_src.generate(torch.tensor([prompt]), **kw)[0, len(prompt) :].tolist()
    again = hf_out.generate(torch.tensor([prompt]), **kw)[0, len(prompt) :].tolist()
    assert ours == theirs == again


def test_sharded_safetensors_import_and_a_missing_shard(tmp_path, sp_tokenizer_json):
    from transformers import LlamaForCausalLM

    src = llama(tmp_path / "one", sp_tokenizer_json)
    sharded = tmp_path / "sharded"
    LlamaForCausalLM.from_pretrained(src).save_pretrained(sharded, max_shard_size="100KB")
    (sharded / "tokenizer.json").write_text(sp_tokenizer_json)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    _, a, _ = load_pretrained(src)
    _, b, _ = load_pretrained(sharded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    (sharded / shards[1]).unlink()
    with pytest.raises(HFImportError, match=f"shard file.*{shards[1]}"):
        load_pretrained(sharded)


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Every bad input must be refused before a weight is read."""

    def refuse(*a, **k):
        raise AssertionError("weights were read before the input was checked")

    monkeypatch.setattr(importer_mod, "read_hf_state_dict", refuse)


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_bad_inputs_are_named_before_weights_are_read(tmp_path, sp_tokenizer_json, no_weight_reads, capsys):
    src = llama(tmp_path / "m", sp_tokenizer_json)

    _edit_config(src, architectures=["GPT2LMHeadModel"])
    with pytest.raises(HFImportError, match="GPT2LMHeadModel is not supported.*LlamaForCausalLM.*GPTNeoXForCausalLM"):
        import_model(src, tmp_path / "out")
    assert import_main([str(src), str(tmp_path / "out")]) == 1
    assert "GPT2LMHeadModel" in capsys.readouterr().err and not (tmp_path / "out").exists()

    _edit_config(src, architectures=["LlamaForCausalLM"], rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(HFImportError, match="rope_scaling.*llama3.*not supported"):
        load_pretrained(src)
    _edit_config(src, rope_scaling={"rope_type": "default"})  # plain rotary under another name is fine
    importer_mod.inspect(src)

    _edit_config(src, vocab_size=800)  # the tokenizer has 859 tokens
    with pytest.raises(HFImportError, match="859 tokens but config.json has vocab_size=800"):
        load_pretrained(src)
    _edit_config(src, vocab_size=896)

    blocker = tmp_path / "notes.txt"  # an output path through a file: named, nothing read or written
    blocker.write_text("keep me")
    assert import_main([str(src), str(blocker / "out")]) == 1
    err = capsys.readouterr().err
    assert f"ftlm-import: error: the output directory {blocker / 'out'} cannot be made: {blocker} is a file" in err
    assert blocker.read_text() == "keep me"


def test_ftlm_files_never_land_on_a_hugging_face_model(tmp_path, sp_tokenizer_json, capsys):
    """ftlm-import (and ftlm-export --no-hf) write model.safetensors in ftlm's layout: into a directory holding a
    Hugging Face model (another one, or the export of a run) they would leave its config.json over foreign weights."""
    from transformers import AutoModelForCausalLM

    src = llama(tmp_path / "m", sp_tokenizer_json)
    victim = llama(tmp_path / "other", sp_tokenizer_json, seed=1)
    before = {p.name: p.read_bytes() for p in victim.iterdir()}
    assert import_main([str(src), str(victim)]) == 1
    assert f"the output directory {victim} holds a Hugging Face model ({victim / 'config.json'})" in (
        capsys.readouterr().err
    )
    imported = import_model(src, tmp_path / "imported")
    exported = tmp_path / "exported"
    export(imported, exported, dtype="fp32")
    with pytest.raises(ValueError, match="holds a Hugging Face model"):
        export(imported, exported, dtype="fp32", hf=False)
    assert {p.name: p.read_bytes() for p in victim.iterdir()} == before
    AutoModelForCausalLM.from_pretrained(exported)  # still whole
    export(imported, exported, dtype="fp32")  # exporting again over one's own export stays allowed


def _as_transformers_5(path, rename: dict[str, str]) -> None:
    """Rewrite config.json as transformers 5 saves it: the rotary settings only inside rope_parameters."""
    cfg = json.loads((path / "config.json").read_text())
    if "rope_parameters" in cfg:  # saved by transformers 5 already
        return
    cfg["rope_parameters"] = {"rope_type": "default"} | {new: cfg.pop(old) for old, new in rename.items()}
    (path / "config.json").write_text(json.dumps(cfg))


def test_a_transformers_5_config_keeps_its_rope_parameters(tmp_path, sp_tokenizer_json, bytelevel_tokenizer_json):
    """transformers 5 writes rope_theta (and NeoX's rotary fraction) only inside rope_parameters; read elsewhere,
    the defaults (10000, 0.25) built a model that differs from the checkpoint without a word."""
    src = llama(tmp_path / "llama", sp_tokenizer_json)  # rope_theta 50000
    v4, _, _ = load_pretrained(src)
    _as_transformers_5(src, {"rope_theta": "rope_theta"})
    v5, _, _ = load_pretrained(src)
    assert v5 == v4 and v5.rope_theta == 50000.0

    src = neox(tmp_path / "neox", bytelevel_tokenizer_json, rotary_emb_base=20000)  # and rotary_pct 0.5
    v4, _, _ = load_pretrained(src)
    _as_transformers_5(src, {"rotary_emb_base": "rope_theta", "rotary_pct": "partial_rotary_factor"})
    v5, _, _ = load_pretrained(src)
    assert v5 == v4 and (v5.rope_theta, v5.rotary_pct) == (20000.0, 0.5)

    _edit_config(src, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 20000})
    with pytest.raises(HFImportError, match="rope_parameters.*yarn.*not supported"):
        load_pretrained(src)
    per_layer = {"full_attention": {"rope_type": "default", "rope_theta": 1e6}, "sliding_attention": {}}
    _edit_config(src, rope_parameters=per_layer)
    with pytest.raises(HFImportError, match="rope_parameters.*not one set of rotary settings"):
        load_pretrained(src)


def test_missing_weights_and_pickles_are_refused(tmp_path, sp_tokenizer_json, no_weight_reads):
    src = llama(tmp_path / "m", sp_tokenizer_json)
    weights = load_file(src / "model.safetensors")
    gone = ["model.layers.1.self_attn.k_proj.weight", "lm_head.weight"]
    save_file({k: v for k, v in weights.items() if k not in gone}, str(src / "model.safetensors"))
    with pytest.raises(HFImportError, match="2 missing: lm_head.weight, model.layers.1.self_attn.k_proj.weight"):
        load_pretrained(src)

    partial = {k: v for k, v in weights.items()}
    partial["model.layers.0.mlp.up_proj.weight"] = partial["model.layers.0.mlp.up_proj.weight"][:8]
    save_file(partial, str(src / "model.safetensors"))
    with pytest.raises(HFImportError, match=r"wrong shape: model.layers.0.mlp.up_proj.weight: \(8, 64\)"):
        load_pretrained(src)

    (src / "model.safetensors").unlink()
    torch.save(weights, src / "pytorch_model.bin")
    with pytest.raises(HFImportError, match="pytorch_model.bin.*never unpickles"):
        load_pretrained(src)


def test_load_pretrained_reads_ftlm_directories_too(tmp_path, bytelevel_tokenizer_json):
    src = neox(tmp_path / "neox", bytelevel_tokenizer_json)
    cfg, state, _ = load_pretrained(src)
    imported = import_model(src, tmp_path / "ftlm")
    cfg2, state2, tok2 = load_pretrained(imported)
    assert cfg2 == cfg and tok2 == imported / "tokenizer.json"
    assert state2.keys() == state.keys() and all(torch.equal(state[k], state2[k]) for k in state)
    exported = tmp_path / "export"
    export(imported, exported, dtype="fp32")
    cfg3, state3, _ = load_pretrained(exported)  # an export: the ftlm files in export/ftlm win over the HF ones
    assert cfg3 == cfg and all(torch.equal(state[k], state3[k]) for k in state)
