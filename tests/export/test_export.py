"""ftlm-export: consolidation of ZeRO-3 shards, the ftlm files, and Hugging Face parity for both architectures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ftlm.checkpoint import load, locate, read_state_dict
from ftlm.data.tokenizer import EOT, Tokenizer
from ftlm.export import HFExportError, export, hf_invertible, main, write_ftlm
from ftlm.model import GPT, GPTConfig

TEXT = "대한민국은 민주공화국이다. The function returns 42."


def random_gpt(seed: int, **overrides) -> GPT:
    """A small GPT whose every weight (norms and biases too) is random, so no term of the mapping hides."""
    cfg = GPTConfig(
        vocab_size=512,
        max_seq_len=64,
        n_layer=2,
        n_head=4,
        d_model=64,
        attn_impl="sdpa",
        norm_impl="torch",
        **overrides,
    )
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1.0 + 0.2 * torch.randn_like(p)
                if "norm" in name and name.endswith("weight")
                else 0.2 * torch.randn_like(p)
            )
    return model


def hf_logits(hf_dir, ids):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits, type(hf).__name__


ARCHS = {
    "llama_gqa_tied": (
        dict(norm="rmsnorm", mlp="swiglu", n_kv_heads=2, tie_embeddings=True, bias=False),
        "LlamaForCausalLM",
    ),
    "llama_untied_bias": (
        dict(
            norm="rmsnorm",
            mlp="swiglu",
            n_kv_heads=4,
            tie_embeddings=False,
            bias=True,
            rope_theta=500000.0,
            norm_eps=1e-6,
        ),
        "LlamaForCausalLM",
    ),
    "neox_gqa_tied": (
        dict(norm="layernorm", mlp="gelu", n_kv_heads=2, tie_embeddings=True, bias=False),
        "GPTNeoXForCausalLM",
    ),
    "neox_untied_bias": (
        dict(norm="layernorm", mlp="gelu", n_kv_heads=4, tie_embeddings=False, bias=True, rope_theta=20000.0),
        "GPTNeoXForCausalLM",
    ),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_hf_parity(arch, tiny_run_dir, tmp_path):
    overrides, expected_class = ARCHS[arch]
    model = random_gpt(len(arch), **overrides)
    src = tmp_path / "ftlm"
    write_ftlm(src, model.cfg, model.state_dict(), tiny_run_dir / "tokenizer.json", torch.float32)
    export(src, tmp_path / "out", dtype="fp32")
    ids = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(0))
    theirs, cls = hf_logits(tmp_path / "out", ids)
    with torch.no_grad():
        ours, _ = model(ids)
    assert cls == expected_class
    assert ours.abs().max() > 1.0  # the comparison is not between near-zero numbers
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    # One copy of the weights where the Hugging Face ones give back ftlm's exactly; ftlm's readers get them back
    own_copy = (tmp_path / "out" / "ftlm" / "model.safetensors").is_file()
    assert own_copy == (not hf_invertible(model.cfg))
    back = load(tmp_path / "out").model.state_dict()
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_export_run_dir_end_to_end(tiny_run_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    out = tmp_path / "export"
    assert main([str(tiny_run_dir), str(out), "--dtype", "fp32"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "ftlm"} <= names
    assert {p.name for p in (out / "ftlm").iterdir()} == {"model.safetensors", "ftlm_config.json", "tokenizer.json"}

    # Consolidation gives back exactly the weights DeepSpeed gathered in the training process.
    reference = load_file(tiny_run_dir / "reference_weights.safetensors")
    exported = load_file(out / "ftlm" / "model.safetensors")
    assert exported.keys() == reference.keys()
    for k in reference:
        assert torch.equal(exported[k], reference[k]), k
    meta = json.loads((out / "ftlm" / "ftlm_config.json").read_text())
    assert meta["step"] == 2 and meta["model"]["n_kv_heads"] == 2 and meta["model"]["vocab_size"] == 512

    tok = AutoTokenizer.from_pretrained(out)  # the output directory itself is the Hugging Face model
    assert isinstance(tok, PreTrainedTokenizerFast)
    ours = Tokenizer.load(tiny_run_dir / "tokenizer.json")
    assert tok.eos_token_id == ours.eot_id and tok.pad_token_id == ours.pad_id
    assert tok(TEXT)["input_ids"] == ours.encode(TEXT)
    assert tok.decode(ours.encode(TEXT)) == TEXT
    # "<|endoftext|>" written inside a text is text for both, never the end-of-text id
    spoof = f"a{EOT}b"
    assert tok(spoof)["input_ids"] == ours.encode(spoof) and ours.eot_id not in ours.encode(spoof)

    ids = torch.tensor([[ours.eot_id] + ours.encode(TEXT)])
    theirs, cls = hf_logits(out, ids)
    assert cls == "GPTNeoXForCausalLM"  # the tiny preset is layernorm + gelu
    with torch.no_grad():
        mine, _ = load(tiny_run_dir).model(ids)
    torch.testing.assert_close(theirs, mine, atol=1e-4, rtol=1e-4)

    # the usual transformers idiom works: no token_type_ids reach generate()
    inputs = tok(TEXT, return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask"}
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    generated = hf.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]

    # ftlm's readers take the new layout: the output directory names the ftlm files in ftlm/
    assert load(out).source.path == out / "ftlm"


def test_the_earlier_layout_stays_readable(tiny_run_dir, tmp_path):
    """Exports written before the layout change (ftlm files in OUT, Hugging Face model in OUT/hf) still load, and an
    export does not write a Hugging Face model over one."""
    old = tmp_path / "old"
    model = random_gpt(3, norm="rmsnorm", mlp="swiglu")
    write_ftlm(old, model.cfg, model.state_dict(), tiny_run_dir / "tokenizer.json", torch.float32)
    export(old, tmp_path / "new", dtype="fp32")
    (tmp_path / "new").rename(old / "hf")
    loaded = load(old)
    assert loaded.source.path == old
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.model.state_dict().items())
    with pytest.raises(ValueError, match="earlier layout"):
        export(tiny_run_dir, old, dtype="fp32")


def test_exporting_over_an_export_leaves_no_stale_weights(tiny_run_dir, tmp_path):
    """A GPT-NeoX export without biases keeps ftlm's own copy (ftlm/model.safetensors); a Llama exported over it
    needs none: the old copy goes, and ftlm's tools read the weights ftlm_config.json names, the new model's."""
    out = tmp_path / "out"
    tokenizer = tiny_run_dir / "tokenizer.json"
    neox, llama = random_gpt(4, norm="layernorm", mlp="gelu"), random_gpt(5, norm="rmsnorm", mlp="swiglu")
    for name, model in (("neox", neox), ("llama", llama)):
        write_ftlm(tmp_path / name, model.cfg, model.state_dict(), tokenizer, torch.float32)
    export(tmp_path / "neox", out, dtype="fp32")
    assert (out / "ftlm" / "model.safetensors").is_file()  # not invertible from the NeoX weights
    export(tmp_path / "llama", out, dtype="fp32")
    assert not (out / "ftlm" / "model.safetensors").exists()
    loaded = load(out)
    assert all(torch.equal(v, llama.state_dict()[k]) for k, v in loaded.model.state_dict().items())


def test_bf16_export_reloads(tiny_run_dir, tmp_path):
    out = tmp_path / "bf16"
    export(tiny_run_dir, out, dtype="bf16", hf=False)
    assert not (out / "config.json").exists() and not (out / "ftlm").exists()  # --no-hf: ftlm's files in out
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    reference = load_file(tiny_run_dir / "reference_weights.safetensors")
    model = load(out).model  # an export directory loads like a checkpoint
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k].to(torch.bfloat16).float()), k


def test_mixed_architecture_is_refused_before_writing(tiny_run_dir, tmp_path, capsys):
    model = random_gpt(0, norm="rmsnorm", mlp="gelu")
    src = tmp_path / "src"
    write_ftlm(src, model.cfg, model.state_dict(), tiny_run_dir / "tokenizer.json", torch.float32)
    with pytest.raises(HFExportError, match="only rmsnorm\\+swiglu .* and layernorm\\+gelu"):
        export(src, tmp_path / "a", dtype="fp32")
    assert not (tmp_path / "a").exists()

    assert main([str(src), str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert "model.norm=rmsnorm with model.mlp=gelu" in err and "--no-hf" in err
    assert main([str(src), str(tmp_path / "c"), "--no-hf"]) == 0
    assert (tmp_path / "c" / "model.safetensors").is_file()


def test_an_output_path_through_a_file_is_refused_in_one_line(tiny_run_dir, tmp_path, capsys):
    note = tmp_path / "notes.txt"
    note.write_text("keep me")
    for out in (note, note / "export"):
        assert main([str(tiny_run_dir), str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"ftlm-export: error: the output directory {out} cannot be made: {note} is a file")
        assert "Traceback" not in err
    assert note.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # refused before anything was written


@pytest.fixture(scope="module")
def zero2_llama_run(tmp_path_factory) -> Path:
    """Like tiny_run_dir, but rmsnorm+swiglu trained under ZeRO-2 (whose optimizer files hold other records)."""
    run = tmp_path_factory.mktemp("zero2") / "run"
    script = Path(__file__).resolve().parents[1] / "eval" / "tiny_run.py"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(script.parents[2]))
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            str(run),
            "deepspeed=zero2",
            "model.norm=rmsnorm",
            "model.mlp=swiglu",
            "model.tie_embeddings=false",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_zero2_llama_checkpoint_end_to_end(zero2_llama_run, tmp_path):
    assert not list((zero2_llama_run / "checkpoints" / "step_00000002").glob("zero_pp_rank_*model_states.pt"))
    export(zero2_llama_run, tmp_path / "out", dtype="fp32")
    reference = load_file(zero2_llama_run / "reference_weights.safetensors")
    assert not (tmp_path / "out" / "ftlm" / "model.safetensors").exists()  # Llama: the Hugging Face copy serves both
    exported = read_state_dict(locate(tmp_path / "out"))
    assert exported.keys() == reference.keys() and "lm_head.weight" in exported
    assert all(torch.equal(exported[k], reference[k]) for k in reference)
    ours = load(tmp_path / "out")
    ids = torch.tensor([ours.tokenizer.encode(TEXT)])
    theirs, cls = hf_logits(tmp_path / "out", ids)
    with torch.no_grad():
        mine, _ = ours.model(ids)
    assert cls == "LlamaForCausalLM"
    torch.testing.assert_close(theirs, mine, atol=1e-4, rtol=1e-4)
