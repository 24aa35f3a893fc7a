"""ftlm.plan against published figures, the model's own counts, DeepSpeed's estimator, and measured activations."""

import json

import pytest
import torch

from ftlm.model.gpt import GPT, GPTConfig
from ftlm.plan import flops_per_token, hardware, main, peak_flops_per_device
from ftlm.plan.cli import load_model_config
from ftlm.plan.flops import attention_flops_per_token, matmul_params
from ftlm.plan.memory import (
    activation_bytes,
    activation_bytes_per_layer,
    largest_layer_params,
    max_micro_batch,
    zero3_model_states,
)

# GPT-3 175B (Brown et al. 2020, table 2.1): 96 layers, d_model 12288, 96 heads of 128, context 2048, vocab 50257.
GPT3 = dict(n_layer=96, d_model=12288, n_head=96, vocab_size=50257, max_seq_len=2048, bias=True)


def test_gpt3_175b_parameters_within_1_percent():
    cfg = GPTConfig(**GPT3)
    # ftlm uses rotary positions, so GPT-3's 2048 x 12288 learned position table (25M) is the only difference.
    assert abs(cfg.num_params() - 175e9) / 175e9 < 0.01


def test_gpt3_175b_flops_per_token_against_published():
    cfg = GPTConfig(**GPT3)
    s, n_layer, h, v = 2048, 96, 12288, 50257
    # Brown et al. table D.1: 3.14e23 training FLOPs for 300B tokens, counted as 6N (attention left out).
    published_6n = 3.14e23 / 300e9
    assert abs(6 * matmul_params(cfg) - published_6n) / published_6n < 0.01
    assert 6 * matmul_params(cfg) == pytest.approx(1.05e12, rel=0.01)
    assert attention_flops_per_token(cfg, s) == 12 * n_layer * h * s  # PaLM appendix B, no causal halving
    # Megatron-LM (Narayanan et al. 2021, eq. 3) without its recomputation pass: 72 l h^2 (1 + s/6h) + 6 h V.
    megatron = 72 * n_layer * h**2 * (1 + s / (6 * h)) + 6 * h * v
    assert flops_per_token(cfg, s) == pytest.approx(megatron, rel=1e-12)
    assert flops_per_token(cfg, s) == pytest.approx(1.076e12, rel=1e-3)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        dict(mlp="gelu", d_ff=100, parallel_residual=True, rotary_pct=0.5, gelu_approx="none", tie_embeddings=True),
    ],
)
def test_flops_per_token_equals_torch_flop_counter(extra):
    # Every matmul of one forward+backward, counted by PyTorch, on an odd-sized model that exercises GQA,
    # swiglu, an untied head and biases (then the GPT-NeoX options, and packed documents). Eager attention
    # computes the full s x s products (no causal or document skipping), which is the convention.
    from torch.utils.flop_counter import FlopCounterMode

    odd = dict(
        vocab_size=331,
        max_seq_len=40,
        n_layer=3,
        n_head=6,
        n_kv_heads=2,
        d_model=48,
        d_ff=136,
        mlp="swiglu",
        tie_embeddings=False,
        bias=True,
        attn_impl="eager",
        norm_impl="torch",
    )
    cfg = GPTConfig(**{**odd, **extra})
    model = GPT(cfg)
    batch, seq = 3, 37
    idx = torch.randint(0, cfg.vocab_size, (batch, seq))
    cu_seqlens = torch.tensor([0, 5, 37, 74, 90, 111], dtype=torch.int32) if extra else None
    with FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx, cu_seqlens=cu_seqlens)
        loss.backward()
    assert counter.get_total_flops() == flops_per_token(cfg, seq) * batch * seq


@pytest.fixture(scope="module")
def gpt_125m():
    cfg = load_model_config("gpt_125m", [], vocab=32000)
    return cfg, GPT(cfg)


def test_125m_preset_counts_match_the_model(gpt_125m):
    from deepspeed.runtime.zero.stage3 import model_to_params

    cfg, model = gpt_125m
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_params(cfg) == linear + cfg.vocab_size * cfg.d_model  # the tied embedding is the LM head
    # With GPT-3's vocabulary and its learned position table added back, the preset is GPT-3 Small's 125M.
    gpt3_small = load_model_config("gpt_125m", [], vocab=50257).num_params() + 2048 * 768
    assert abs(gpt3_small - 125e6) / 125e6 < 0.01
    assert model_to_params(model) == (cfg.num_params(), largest_layer_params(cfg))


def test_largest_layer_matches_deepspeed_on_odd_configs():
    from deepspeed.runtime.zero.stage3 import model_to_params

    for kw in (
        dict(vocab_size=64, d_model=96, n_head=4, d_ff=1000, mlp="swiglu", bias=True),
        dict(vocab_size=5000, d_model=64, n_head=4, n_kv_heads=1, tie_embeddings=False),
        dict(vocab_size=64, d_model=128, n_head=8, n_kv_heads=8),
    ):
        cfg = GPTConfig(n_layer=2, max_seq_len=16, **kw)
        assert model_to_params(GPT(cfg)) == (cfg.num_params(), largest_layer_params(cfg)), kw


@pytest.mark.parametrize(
    "total, largest, gpus_per_node, nodes",
    [
        (174_600_000_000, 617_558_016, 8, 128),  # GPT-3 175B on 1024 GPUs
        (1_273_595_904, 65_536_000, 8, 1),  # gpt_1_3b on one 8-GPU node
        (125_000_000, 24_576_000, 1, 1),  # gpt_125m on one GPU
    ],
)
def test_model_states_against_deepspeed_estimator(total, largest, gpus_per_node, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as ds_estimate

    n = gpus_per_node * nodes

    def ds(offload_optimizer, offload_params):
        cpu, gpu, _ = ds_estimate(
            total,
            largest,
            gpus_per_node,
            nodes,
            cpu_offload=offload_optimizer,
            cpu_offload_params=offload_params,
            zero_init=True,
            additional_buffer_factor=1.0,
        )
        return cpu, gpu

    # Without offload the estimator counts 18 bytes per parameter where ftlm counts the ZeRO paper's 16
    # (see ftlm/plan/memory.py): ftlm + 2 bytes/param/GPU equals it, so the two differ by at most 2/18 = 11.2%.
    ours = zero3_model_states(total, largest, n, gpus_per_node, "none")
    cpu, gpu = ds(False, False)
    assert ours.gpu_bytes + 2 * total / n == pytest.approx(gpu, abs=2)
    assert 16 / 18 - 1e-9 <= ours.gpu_bytes / gpu <= 1
    # With offload the two agree exactly, GPU and each node's CPU.
    for offload, flags in (("optimizer", (True, False)), ("optimizer+params", (True, True))):
        ours = zero3_model_states(total, largest, n, gpus_per_node, offload)
        cpu, gpu = ds(*flags)
        assert ours.gpu_bytes == pytest.approx(gpu, abs=2)
        assert ours.cpu_bytes_per_node == pytest.approx(cpu, rel=1e-9)


def test_model_states_against_deepspeed_all_live(gpt_125m, capsys):
    # DeepSpeed's printed table for the real model: the "none" row with zero_init=1 is the last but one line.
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_live

    cfg, model = gpt_125m
    estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=2, num_nodes=1)
    rows = [line for line in capsys.readouterr().out.splitlines() if "offload_optimizer=none" in line]
    ds_gpu_gb = float(rows[0].split("|")[1].strip().rstrip("GB"))  # GiB, 2 decimals
    ours = zero3_model_states(cfg.num_params(), largest_layer_params(cfg), 2, 2, "none").gpu_bytes / 2**30
    assert 16 / 18 - 0.01 <= ours / ds_gpu_gb <= 1.01


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_activation_formula_against_saved_tensors(precision):
    # Bytes autograd keeps for backward (parameters excluded), measured with saved-tensor hooks, against the
    # transformer-layer part of the Korthikanti et al. formula: within 15% both ways. Logits-sized tensors are
    # left out of both sides (what the cross-entropy keeps depends on whether ftlm._C is built; the formula
    # budgets 4 bytes per logit, 8 in fp32). With checkpointing the forward keeps layer inputs only; the recomputed
    # layer that the formula adds lives in the backward pass. fp32 keeps twice the bytes of bf16.
    s, b, vocab = 128, 2, 2048
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    for impl, flash in (("eager", False), ("sdpa", True)):
        for ckpt in (False, True):
            cfg = GPTConfig(
                vocab_size=vocab, max_seq_len=s, n_layer=3, n_head=4, d_model=128, attn_impl=impl, norm_impl="torch"
            )
            model = GPT(cfg).to(dtype)
            model.activation_checkpointing = ckpt
            params = {p.data_ptr() for p in model.parameters()}
            storages = {}

            def pack(t, params=params, storages=storages):
                if t.data_ptr() not in params and t.numel() != s * b * vocab:
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            idx = torch.randint(0, vocab, (b, s))
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(idx, idx)
            measured = sum(storages.values())
            scale = 2 if precision == "fp32" else 1
            estimate = activation_bytes(cfg, s, b, ckpt, flash, precision) - scale * 4 * s * b * vocab
            if ckpt:
                estimate -= activation_bytes_per_layer(cfg, s, b, flash, precision)
            if precision == "fp32" and impl == "eager" and not ckpt:
                # no dropout: fp32 scores are kept once (4 as^2 b), where the formula budgets dropout's too (9)
                assert 0.7 * estimate < measured <= estimate, (impl, ckpt, measured, estimate)
            else:
                assert measured == pytest.approx(estimate, rel=0.15), (impl, ckpt, measured, estimate)


def test_fp32_model_states_keep_no_master_copy():
    total, largest, gpus = 1_000_000_000, 50_000_000, 8
    mixed = zero3_model_states(total, largest, gpus, 8, "none", "bf16")
    fp32 = zero3_model_states(total, largest, gpus, 8, "none", "fp32")
    # 4 + 4 + 8 bytes per parameter against 2 + 2 + 12: the same partition; the gathered layer is twice the size
    assert fp32.gpu_bytes - mixed.gpu_bytes == 4 * largest
    offloaded = zero3_model_states(total, largest, gpus, 8, "optimizer", "fp32")
    assert offloaded.gpu_bytes == 8 * largest + 4 * total // gpus
    assert offloaded.cpu_bytes_per_node == 16 * total  # Adam moments + fp32 weights + gradients, 8 GPUs a node
    with pytest.raises(ValueError, match="precision"):
        zero3_model_states(total, largest, gpus, precision="fp8")


def test_max_micro_batch():
    cfg = GPTConfig(vocab_size=32000, n_layer=24, d_model=2048, n_head=16)
    per_seq = activation_bytes(cfg, 2048, 1)
    assert activation_bytes(cfg, 2048, 5) == 5 * per_seq
    assert max_micro_batch(10e9 + 1e9 + 3.5 * per_seq, 10e9, cfg, 2048, False, reserve_bytes=1e9) == 3
    assert max_micro_batch(10e9, 10e9, cfg, 2048, True) == 0
    assert activation_bytes(cfg, 2048, 1, checkpointing=True) < per_seq / 4


def test_peak_flops_table_and_override(monkeypatch, caplog):
    monkeypatch.delenv(hardware.PEAK_ENV, raising=False)
    assert peak_flops_per_device(torch.device("cpu"), "bf16") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    names = {
        "NVIDIA H100 80GB HBM3": 989e12,
        "NVIDIA H100 PCIe": 756e12,
        "NVIDIA H200": 989e12,
        "NVIDIA A100-SXM4-80GB": 312e12,
        "NVIDIA A10G": 70e12,
        "NVIDIA L4": 121e12,
        "NVIDIA L40S": 362e12,
        "NVIDIA GeForce RTX 4090": 165e12,
        "AMD Instinct MI300X": 1307e12,
    }
    for name, peak in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert peak_flops_per_device(torch.device("cuda"), "bf16") == peak, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    assert peak_flops_per_device(torch.device("cuda"), "fp16") == 125e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Imaginary GPU 9000")
    with caplog.at_level("WARNING", logger="ftlm.plan.hardware"):
        assert peak_flops_per_device(torch.device("cuda"), "bf16") is None
        assert peak_flops_per_device(torch.device("cuda"), "bf16") is None
    assert len([r for r in caplog.records if "Imaginary GPU 9000" in r.getMessage()]) == 1
    monkeypatch.setenv(hardware.PEAK_ENV, "123.5")
    assert peak_flops_per_device(torch.device("cuda"), "bf16") == 123.5e12
    assert peak_flops_per_device(torch.device("cpu"), "bf16") == 123.5e12


def test_cli_prints_the_plan(capsys):
    assert (
        main(
            [
                "--model",
                "gpt_1_3b",
                "--tokens",
                "26e9",
                "--gpu",
                "h100",
                "--num-gpus",
                "64",
                "--mfu",
                "0.45",
                "--seq-len",
                "2048",
                "--vocab",
                "32000",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    cfg = GPTConfig(vocab_size=32000, max_seq_len=2048, n_layer=24, n_head=16, d_model=2048, name="gpt_1_3b")
    days = flops_per_token(cfg, 2048) * 26e9 / (64 * 989e12 * 0.45) / 86400
    assert f"{cfg.num_params():,}" in out
    assert f"{days:.2f} days ({days * 24:.1f} hours) on 64 x h100" in out
    assert "Chinchilla-optimal   25.5B tokens" in out
    for offload in ("none", "optimizer", "optimizer+params"):
        assert f"  {offload} " in out
    assert "with activation checkpointing" in out


def test_cli_stats_json_and_overrides(tmp_path, capsys):
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"streams": {"ko": {"tokens": 3_000_000_000}, "en": {"tokens": 1_000_000_000}}}))
    assert (
        main(["--model", "gpt_125m", "--stats", str(stats), "model.n_layer=6", "--gpu", "a100", "--num-gpus", "8"]) == 0
    )
    out = capsys.readouterr().out
    assert "6 layers" in out
    assert "4B tokens (from " in out and "Chinchilla-optimal size for it: 200M parameters" in out
    # ftlm-prepare's layout: per stream tokens_train (the budget) beside tokens (train + validation).
    stats.write_text(
        json.dumps(
            {
                "name": "embedded",
                "streams": {
                    "ko": {"tokens_train": 13454, "tokens_val": 362, "tokens": 13816},
                    "en": {"tokens_train": 40000, "tokens_val": 1000, "tokens": 41000},
                },
            }
        )
    )
    assert main(["--stats", str(stats)]) == 0
    assert "53.5K tokens (from " in capsys.readouterr().out
    stats.write_text(json.dumps({"total_tokens": 7_000_000}))
    assert main(["--stats", str(stats)]) == 0
    assert "7M tokens (from " in capsys.readouterr().out
    stats.write_text(json.dumps({"streams": [{"name": "ko"}]}))
    assert main(["--stats", str(stats)]) == 2
    assert "found no token count" in capsys.readouterr().err
    assert main(["model=gpt_350m", "model.d_model=1280", "model.n_head=20", "--vocab", "50257"]) == 0
    out = capsys.readouterr().out
    assert "model gpt_350m: 24 layers, d_model 1280, 20 heads" in out and "vocab 50257" in out
    assert main(["model.no_such_key=3"]) == 2
    assert "unknown key model.no_such_key" in capsys.readouterr().err


def test_cli_unknown_gpu_is_one_line_error(capsys):
    assert main(["--gpu", "tpu-v9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown GPU 'tpu-v9'" in err
    assert "h100" in err and "--peak-tflops" in err
    # The way out it names works.
    assert main(["--gpu", "tpu-v9", "--peak-tflops", "400", "--gpu-memory-gib", "32"]) == 0
    assert "400 TFLOP/s" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,said",
    [
        (["--tokens", "inf"], "--tokens must be a positive number, got inf"),
        (["--tokens", "nan"], "--tokens must be a positive number, got nan"),
        (["--tokens", "0.5"], "--tokens must be at least 1"),
        (["--peak-tflops", "nan"], "--peak-tflops must be a positive number"),
        (["--gpu-memory-gib", "0"], "--gpu-memory-gib must be a positive number, got 0.0"),
        (["--reserve-gib", "-100"], "--reserve-gib must be a number >= 0"),
        (["--mfu", "nan"], "--mfu must be in (0, 1]"),
    ],
)
def test_cli_numbers_that_cannot_be_planned_are_one_line_errors(argv, said, capsys):
    assert main(["--model", "tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and said in err


def test_cli_overrides_go_before_between_or_after_the_flags(capsys):
    assert main(["model.n_layer=16", "--gpu", "a100", "model.d_model=1024", "model.n_head=16"]) == 0
    assert "16 layers, d_model 1024, 16 heads" in capsys.readouterr().out
