"""Training-step throughput: tokens/s, MFU and peak memory of ftlm's trainer step against Hugging Face Llama.

    python benchmarks/train_step.py                      # on a GPU: gpt_125m, gpt_350m, gpt_1_3b at seq 2048
    python benchmarks/train_step.py --models gpt_1_3b --impls triton,sdpa --steps 20
    python benchmarks/train_step.py --doc-len 1024       # packed documents of ~1024 tokens, model.doc_mask
    python benchmarks/train_step.py --smoke              # tiny, a few steps, also on CPU: checks the script runs

Each row is the real trainer step (ftlm.train.engine: DeepSpeed config, ZeRO-3 model init, engine, AdamW) on
synthetic random tokens, bf16, one process: forward, backward, optimizer step for `--steps` steps after
`--warmup`. The Hugging Face rows build `transformers.LlamaForCausalLM` from a config (random weights, nothing
downloaded) with the same width, depth, heads and vocabulary, SwiGLU width 8/3 x d_model rounded up to 256
(the same matmul FLOPs as ftlm's 4 x d_model GELU MLP), under the same DeepSpeed config and optimizer.
The "ftlm llama-shape" rows run ftlm with Llama's SwiGLU and RMSNorm, the like-for-like comparison.
With `--doc-len N` every row of ftlm is a packed sequence of documents of random lengths (exponential, mean N
tokens, the same for every row) and the model masks attention at their boundaries (model.doc_mask, cu_seqlens);
the Hugging Face rows are left out then (they have no such input).
MFU = tokens/s x FLOPs per token (ftlm.plan: 6N + attention, PaLM convention) / the GPU's dense bf16 peak.

Every row runs in its own process, so one running out of memory cannot disturb the next: a row that runs out
of memory is retried with half the micro-batch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_MODELS = ("gpt_125m", "gpt_350m", "gpt_1_3b")
DEFAULT_IMPLS = ("triton", "sdpa", "eager", "flash_attn")
MAX_AUTO_MICRO_BATCH = 16


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401

        return True
    except ImportError:
        return False


# ---------------------------------------------------------------- one row, in a child process


def model_config(name: str, attn_impl: str, vocab: int, seq_len: int, llama_shape: bool, smoke: bool):
    """ftlm's GPTConfig for a preset, as the trainer composes it from conf/."""
    from omegaconf import OmegaConf

    from ftlm.config import compose
    from ftlm.model.gpt import GPTConfig

    overrides = [
        f"model={name}",
        f"model.attn_impl={attn_impl}",
        f"model.vocab_size={vocab}",
        f"model.max_seq_len={max(seq_len, 16)}",
    ]
    if llama_shape:
        overrides += ["model.mlp=swiglu", "model.norm=rmsnorm"]
    if smoke:
        overrides += ["model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.n_kv_heads=null"]
    cfg = compose(overrides + ["deepspeed=zero3"])
    return cfg, GPTConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))


def llama_model(gpt_cfg, ds_config, attn_implementation: str):
    """LlamaForCausalLM with ftlm's dimensions, built under ZeRO-3 partitioning like ftlm's model."""
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    d = gpt_cfg.d_model
    config = LlamaConfig(
        vocab_size=gpt_cfg.vocab_size,
        hidden_size=d,
        num_hidden_layers=gpt_cfg.n_layer,
        num_attention_heads=gpt_cfg.n_head,
        num_key_value_heads=gpt_cfg.n_kv_heads,
        intermediate_size=256 * -(-8 * d // (3 * 256)),
        max_position_embeddings=gpt_cfg.max_seq_len,
        tie_word_embeddings=gpt_cfg.tie_embeddings,
        rms_norm_eps=1e-5,
        use_cache=False,
        attn_implementation=attn_implementation,
    )
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = LlamaForCausalLM(config)
    return model, config


def packed_cu_seqlens(batch: int, seq_len: int, mean_len: int, seed: int = 0) -> list[int]:
    """Document starts over the flattened batch*seq_len tokens (every row start included), lengths ~ Exp(mean)."""
    rng = random.Random(seed)
    starts = []
    for row in range(batch):
        offset = 0
        while offset < seq_len:
            starts.append(row * seq_len + offset)
            offset += max(1, round(rng.expovariate(1 / mean_len)))
    return starts + [batch * seq_len]


def auto_micro_batch(model: str, impl: str, seq_len: int, vocab: int) -> int:
    """The largest power of two (at most 16) that ftlm.plan says fits one GPU, states and activations."""
    import torch

    from ftlm.plan.cli import load_model_config
    from ftlm.plan.memory import GIB, largest_layer_params, max_micro_batch, zero3_model_states

    cfg = load_model_config(model, [], vocab)
    memory = torch.cuda.get_device_properties(0).total_memory
    states = zero3_model_states(cfg.num_params(), largest_layer_params(cfg), 1, 1).gpu_bytes
    fits = max_micro_batch(
        memory,
        states,
        cfg,
        seq_len,
        checkpointing=False,
        flash=impl != "eager",
        reserve_bytes=max(2 * GIB, 0.1 * memory),
    )
    fits = min(fits, MAX_AUTO_MICRO_BATCH)
    return 1 << (fits.bit_length() - 1) if fits > 0 else 1  # 1 even when nothing fits: the row then says OOM


def run_row(args) -> dict:
    """Build the engine for one (model, implementation) and time its training steps."""
    import torch

    from ftlm.model.gpt import GPTConfig
    from ftlm.plan import flops_per_token, peak_flops_per_device
    from ftlm.train.engine import build_ds_config, build_engine, build_model, init_distributed

    is_hf = args.impl.startswith("hf-")
    llama_shape = args.impl.startswith("llama-")
    attn_impl = "sdpa" if is_hf else args.impl.removeprefix("llama-")
    cfg, gpt_cfg = model_config(args.model, attn_impl, args.vocab, args.seq_len, llama_shape, args.smoke)
    if not args.micro_batch:  # measured here, in the child, so the parent never holds a CUDA context
        args.micro_batch = auto_micro_batch(args.model, attn_impl, args.seq_len, args.vocab)
    t = cfg.trainer
    t.micro_batch_size, t.grad_accum, t.seq_len = args.micro_batch, 1, args.seq_len
    t.precision, t.device = args.precision, "auto"
    d = init_distributed("auto")
    ds_config = build_ds_config(t, cfg.deepspeed, d.world_size, args.precision)

    torch.manual_seed(0)
    if is_hf:
        model, hf_config = llama_model(gpt_cfg, ds_config, args.impl.removeprefix("hf-"))
        # FLOPs of the model actually run: Llama's shape is ftlm's with SwiGLU of its intermediate size.
        flops_cfg = GPTConfig(
            vocab_size=gpt_cfg.vocab_size,
            max_seq_len=gpt_cfg.max_seq_len,
            n_layer=gpt_cfg.n_layer,
            n_head=gpt_cfg.n_head,
            n_kv_heads=gpt_cfg.n_kv_heads,
            d_model=gpt_cfg.d_model,
            d_ff=hf_config.intermediate_size,
            mlp="swiglu",
            norm="rmsnorm",
            tie_embeddings=gpt_cfg.tie_embeddings,
        )
    else:
        model, flops_cfg = build_model(gpt_cfg, ds_config, d), gpt_cfg
    engine, _ = build_engine(model, t, cfg.deepspeed, ds_config, d)

    cu_seqlens = None
    if args.doc_len:
        starts = packed_cu_seqlens(args.micro_batch, args.seq_len, args.doc_len)
        cu_seqlens = torch.tensor(starts, dtype=torch.int32, device=d.device)

    def step():
        batch = torch.randint(0, gpt_cfg.vocab_size, (args.micro_batch, args.seq_len + 1), device=d.device)
        if is_hf:
            loss = engine(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss  # HF shifts labels itself
        else:
            _, loss = engine(batch[:, :-1], batch[:, 1:], cu_seqlens=cu_seqlens)
        engine.backward(loss)
        engine.step()
        return loss

    sync = torch.cuda.synchronize if d.device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    seconds = time.perf_counter() - start
    tokens_per_s = args.steps * args.micro_batch * args.seq_len / seconds
    peak = peak_flops_per_device(d.device, args.precision)
    return {
        "micro_batch": args.micro_batch,
        "tokens_per_s": tokens_per_s,
        "step_ms": 1000 * seconds / args.steps,
        "mfu": tokens_per_s * flops_per_token(flops_cfg, args.seq_len) / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(d.device) / 2**30 if d.device.type == "cuda" else None,
        "params": flops_cfg.num_params(),
        "loss": float(loss),
        "device": device_name(d.device),
    }


def device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def child_main(args) -> int:
    import torch

    try:
        result = run_row(args)
    except torch.cuda.OutOfMemoryError:
        result = {"error": "OOM", "micro_batch": args.micro_batch}
    except Exception as e:  # reported in the table; the other rows still run
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------- the table, in the parent process


def run_child(model: str, impl: str, micro_batch: int, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--_row",
        model,
        impl,
        "--micro-batch",
        str(micro_batch),
        "--seq-len",
        str(args.seq_len),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--vocab",
        str(args.vocab),
        "--precision",
        args.precision,
        "--doc-len",
        str(args.doc_len),
    ] + (["--smoke"] if args.smoke else [])
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {proc.returncode}: {tail[:160]}"}


def fmt(value, spec: str, width: int) -> str:
    return "-".rjust(width) if value is None else format(value, f">{width}{spec}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="presets from conf/model/, comma-separated")
    p.add_argument(
        "--impls",
        default=",".join(DEFAULT_IMPLS),
        help="ftlm attn_impl values; flash_attn is skipped when not installed",
    )
    p.add_argument("--no-hf", action="store_true", help="leave out the Hugging Face Llama rows")
    p.add_argument("--no-llama-shape", action="store_true", help="leave out ftlm with SwiGLU + RMSNorm")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=0, help="sequences per step (0: the largest ftlm.plan fits)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument(
        "--doc-len",
        type=int,
        default=0,
        help="pack documents of this mean length (tokens) into each sequence, masked (model.doc_mask); 0: one causal "
        "sequence per row",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="2 layers of width 64, seq 64, 3 steps, fp32 on CPU: checks that the benchmark runs",
    )
    p.add_argument("--_row", nargs=2, metavar=("MODEL", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.doc_len < 0:
        p.error(f"--doc-len must be 0 (off) or a positive number of tokens, got {args.doc_len}")
    if args._row:
        args.model, args.impl = args._row
        return child_main(args)

    import torch

    on_gpu = torch.cuda.is_available()
    if args.smoke:
        args.seq_len, args.steps, args.warmup = min(args.seq_len, 64), 3, 1
        args.micro_batch, args.vocab = args.micro_batch or 2, min(args.vocab, 512)
        args.models = args.models if args.models != ",".join(DEFAULT_MODELS) else "gpt_125m"
        if not on_gpu:
            args.precision = "fp32"
    elif not on_gpu:
        print(
            "benchmarks/train_step.py measures GPU training throughput and no CUDA GPU is visible here; "
            "nothing to measure. Use --smoke to check that the script runs on this CPU."
        )
        return 0

    impls = [i for i in args.impls.split(",") if i]
    if "flash_attn" in impls and not flash_attn_available():
        print("flash_attn is not installed: its rows are skipped (pip install 'ftlm[flash]' on a CUDA machine)")
        impls.remove("flash_attn")
    if not on_gpu and "triton" in impls and os.environ.get("TRITON_INTERPRET") != "1":
        print("triton: its rows are skipped: Triton kernels run on the CPU only under TRITON_INTERPRET=1")
        impls.remove("triton")
    rows = [(m, i) for m in args.models.split(",") if m for i in impls]
    for m in args.models.split(","):
        if m and not args.no_llama_shape:
            rows.append((m, "llama-" + ("triton" if on_gpu else "sdpa")))
        if m and not args.no_hf and not args.doc_len:
            rows.append((m, "hf-sdpa"))
            if flash_attn_available():
                rows.append((m, "hf-flash_attention_2"))

    header = (
        f"{'model':<10} {'implementation':<22} {'micro':>5} {'params':>8} {'tokens/s':>11} {'step ms':>9} "
        f"{'MFU':>6} {'peak GiB':>9}"
    )
    lines, device = [header, "-" * len(header)], None
    print(header, flush=True)
    for model, impl in rows:
        micro = args.micro_batch  # 0: the child picks the largest that ftlm.plan says fits
        while True:
            r = run_child(model, impl, micro, args)
            micro = r.get("micro_batch", micro)
            if r.get("error") != "OOM" or micro <= 1:
                break
            micro //= 2
        label = {"hf-sdpa": "HF Llama (sdpa)", "hf-flash_attention_2": "HF Llama (flash-attn 2)"}.get(
            impl, f"ftlm {impl.replace('llama-', 'llama-shape ')}"
        )
        if "error" in r:
            line = f"{model:<10} {label:<22} {micro:>5} {r['error']}"
        else:
            device = r["device"]
            line = (
                f"{model:<10} {label:<22} {micro:>5} {r['params'] / 1e6:>7.1f}M {r['tokens_per_s']:>11,.0f} "
                f"{r['step_ms']:>9.1f} {fmt(r['mfu'], '.1%', 6)} {fmt(r['peak_mem_gib'], '.2f', 9)}"
            )
        lines.append(line)
        print(line, flush=True)
    print(
        f"\ndevice: {device or '?'}; seq {args.seq_len}"
        + (f" packed with documents of mean {args.doc_len} tokens (doc_mask)" if args.doc_len else "")
        + f", {args.precision}, DeepSpeed ZeRO-3, 1 process, "
        f"{args.steps} timed steps after {args.warmup} warmup; {time.strftime('%Y-%m-%d')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
