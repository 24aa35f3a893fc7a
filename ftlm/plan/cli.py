"""`ftlm-plan`: parameters, token budget, training FLOPs and days, and ZeRO-3 memory per GPU for a model.

ftlm-plan --model gpt_1_3b --tokens 26e9 --gpu h100 --num-gpus 64 --mfu 0.45
ftlm-plan --model gpt_125m --stats runs/data/stats.json model.n_layer=16 --gpu a100 --num-gpus 8
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ftlm.plan.flops import attention_flops_per_token, flops_per_token, matmul_params
from ftlm.plan.hardware import GPUS_BY_KEY, UnknownGPU, gpu_by_key
from ftlm.plan.memory import (
    GIB,
    LIVE_LAYER_BYTES,
    OFFLOAD_CHOICES,
    PRECISIONS,
    activation_bytes,
    bytes_factor,
    largest_layer_params,
    max_micro_batch,
    zero3_model_states,
)

CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022: compute-optimal training uses about 20 tokens per parameter
SECONDS_PER_DAY = 86400


class PlanError(ValueError):
    """Bad input to ftlm-plan; printed as one line."""


def load_model_config(name: str, overrides: list[str], vocab: int | None):
    """conf/model/<name>.yaml (composed over conf/model/base.yaml) with `model.key=value` overrides, as a GPTConfig."""
    from dataclasses import fields

    from omegaconf import OmegaConf

    from ftlm.config import CONF_DIR, compose
    from ftlm.config import ConfigError as ComposeError
    from ftlm.model.gpt import ConfigError, GPTConfig

    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.is_file() or name == "base":
        known = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml") if p.stem != "base")
        raise PlanError(f"no model preset '{name}' in {CONF_DIR / 'model'}; known: {', '.join(known)}")
    keys = [f.name for f in fields(GPTConfig)]
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.startswith("model."):
            raise PlanError(f"'{item}': ftlm-plan reads only model.<key>=<value> overrides (and --flags)")
        if key[len("model.") :] not in keys:
            raise PlanError(f"'{item}': unknown key {key}; keys of conf/model/{name}.yaml: {', '.join(keys)}")
    try:  # only the model group: the plan needs no data, trainer or deepspeed settings
        cfg = compose([f"+model={name}", *overrides], config_name=None).model
    except ComposeError as e:
        raise PlanError(f"conf/model/{name}.yaml with overrides: {e}") from None
    data = OmegaConf.to_container(cfg, resolve=True)
    if vocab is not None:
        data["vocab_size"] = vocab
    elif data.get("vocab_size") is None:
        data["vocab_size"] = 32000
    try:
        return GPTConfig.from_dict(data)
    except (ConfigError, TypeError) as e:
        raise PlanError(f"conf/model/{name}.yaml with overrides: {e}") from None


def tokens_from_stats(path: Path) -> int:
    """Training tokens in a data pipeline stats.json.

    Read, in this order: a top-level number `total_tokens` or `tokens`, or `total.tokens`; otherwise the sum
    over `streams` (a mapping name -> stats, or a list of stats) of each stream's training tokens: its
    `tokens_train` (what ftlm-prepare writes), else its `train.tokens`, else its `tokens` (train + validation).
    """
    try:
        stats = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlanError(
            f"--stats {path}: no such file (the data pipeline writes stats.json next to its shards)"
        ) from None
    except json.JSONDecodeError as e:
        raise PlanError(f"--stats {path}: not valid JSON (line {e.lineno}: {e.msg})") from None

    def number(x):
        return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None

    if not isinstance(stats, dict):
        raise PlanError(f"--stats {path}: expected a JSON object")
    for key in ("total_tokens", "tokens"):
        if number(stats.get(key)) is not None:
            return int(stats[key])
    if isinstance(stats.get("total"), dict) and number(stats["total"].get("tokens")) is not None:
        return int(stats["total"]["tokens"])
    streams = stats.get("streams")
    if isinstance(streams, dict):
        streams = list(streams.values())
    total, found = 0, False
    for stream in streams if isinstance(streams, list) else []:
        if not isinstance(stream, dict):
            continue
        tokens = number(stream.get("tokens_train"))
        if tokens is None and isinstance(stream.get("train"), dict):
            tokens = number(stream["train"].get("tokens"))
        if tokens is None:
            tokens = number(stream.get("tokens"))
        if tokens is not None:
            total, found = total + tokens, True
    if not found:
        raise PlanError(
            f"--stats {path}: found no token count (looked for total_tokens, tokens, total.tokens, "
            "streams.<name>.tokens_train, streams.<name>.train.tokens, streams.<name>.tokens)"
        )
    return int(total)


def human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def duration(seconds: float) -> str:
    days = seconds / SECONDS_PER_DAY
    if days >= 1:
        return f"{days:.1f} days ({seconds / 3600:,.0f} hours)"
    if seconds >= 3600:
        return f"{days:.2f} days ({seconds / 3600:.1f} hours)"
    return f"{seconds / 60:.1f} minutes"


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="ftlm-plan",
        description="Plan a training run: parameters, Chinchilla-optimal tokens, training FLOPs and days, "
        "and ZeRO-3 memory per GPU with the micro-batch that fits.",
        epilog="Trailing model.<key>=<value> arguments override the preset, e.g. model.n_layer=32. "
        f"Known GPUs: {', '.join(GPUS_BY_KEY)}.",
    )
    p.add_argument("--model", default="gpt_125m", help="preset in conf/model/ (default gpt_125m)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=float, help="training tokens, e.g. 26e9 (default: Chinchilla-optimal)")
    budget.add_argument("--stats", type=Path, help="stats.json from the data pipeline: its token count is the budget")
    p.add_argument("--gpu", default="h100", help="GPU type (default h100)")
    p.add_argument("--num-gpus", type=int, default=8, help="GPUs in the job (default 8)")
    p.add_argument(
        "--gpus-per-node", type=int, default=8, help="GPUs per node, for CPU memory with offload (default 8)"
    )
    p.add_argument("--mfu", type=float, default=0.45, help="model FLOPs utilization to assume (default 0.45)")
    p.add_argument("--seq-len", type=int, help="training sequence length (default: model.max_seq_len)")
    p.add_argument("--vocab", type=int, help="vocabulary size (default: the preset's, else 32000)")
    p.add_argument(
        "--precision",
        default="bf16",
        choices=PRECISIONS,
        help="training precision: the peak FLOP/s and the bytes of weights, gradients and activations (default bf16)",
    )
    p.add_argument("--peak-tflops", type=float, help="dense peak TFLOP/s per GPU, for a GPU not in the table")
    p.add_argument("--gpu-memory-gib", type=float, help="memory per GPU in GiB (default: the table's)")
    p.add_argument(
        "--reserve-gib",
        type=float,
        help="memory kept free for the CUDA context, NCCL, DeepSpeed buffers and fragmentation "
        "(default: 10%% of the GPU's memory, at least 2 GiB)",
    )
    p.add_argument(
        "--eager-attention",
        action="store_true",
        help="activations of attn_impl=eager (keeps the s x s scores) instead of a fused kernel",
    )
    p.add_argument("overrides", nargs="*", help="model.<key>=<value> (and model=<preset>, like --model)")
    return p.parse_intermixed_args(argv)  # model.<key>=<value> before, between or after the flags


def _check_numbers(args) -> None:
    """Every number given: finite, and positive where a count or a size (nan and inf passed the range checks)."""
    for name, value in (("--num-gpus", args.num_gpus), ("--gpus-per-node", args.gpus_per_node)):
        if value <= 0:
            raise PlanError(f"{name} must be positive, got {value}")
    positive = {"--tokens": args.tokens, "--peak-tflops": args.peak_tflops, "--gpu-memory-gib": args.gpu_memory_gib}
    for name, value in positive.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise PlanError(f"{name} must be a positive number, got {value}")
    if args.tokens is not None and args.tokens < 1:
        raise PlanError(f"--tokens must be at least 1, got {args.tokens}")
    if args.reserve_gib is not None and not (math.isfinite(args.reserve_gib) and args.reserve_gib >= 0):
        raise PlanError(f"--reserve-gib must be a number >= 0, got {args.reserve_gib}")


def plan(args) -> str:
    _check_numbers(args)
    if not 0 < args.mfu <= 1:
        raise PlanError(f"--mfu must be in (0, 1], got {args.mfu}")
    if args.seq_len is not None and args.seq_len <= 0:
        raise PlanError(f"--seq-len must be positive, got {args.seq_len}")
    if args.peak_tflops is not None:
        if args.peak_tflops <= 0:
            raise PlanError(f"--peak-tflops must be positive, got {args.peak_tflops}")
        peak, gpu_name = args.peak_tflops * 1e12, args.gpu
        memory_gib = args.gpu_memory_gib
        if memory_gib is None:
            try:
                memory_gib = gpu_by_key(args.gpu).memory_gib
            except UnknownGPU:
                raise PlanError(
                    f"--peak-tflops given for '{args.gpu}': pass its memory with --gpu-memory-gib too"
                ) from None
    else:
        try:
            gpu = gpu_by_key(args.gpu)
        except UnknownGPU as e:
            raise PlanError(str(e)) from None
        peak = gpu.peaks.get(args.precision)
        if peak is None:
            raise PlanError(
                f"{gpu.key} has no {args.precision} tensor cores in ftlm's table "
                f"(it has {', '.join(gpu.peaks)}); use --precision or pass --peak-tflops"
            )
        gpu_name, memory_gib = gpu.key, args.gpu_memory_gib if args.gpu_memory_gib is not None else gpu.memory_gib

    presets = [o.split("=", 1)[1] for o in args.overrides if o.startswith("model=")]  # Hydra's spelling of --model
    overrides = [o for o in args.overrides if not o.startswith("model=")]
    cfg = load_model_config(presets[-1] if presets else args.model, overrides, args.vocab)
    seq_len = args.seq_len or cfg.max_seq_len
    if seq_len > cfg.max_seq_len:
        raise PlanError(f"--seq-len {seq_len} is longer than model.max_seq_len={cfg.max_seq_len}")

    params = cfg.num_params()
    optimal_tokens = CHINCHILLA_TOKENS_PER_PARAM * params
    if args.stats is not None:
        tokens, source = tokens_from_stats(args.stats), f"from {args.stats}"
    elif args.tokens is not None:
        if args.tokens <= 0:
            raise PlanError(f"--tokens must be positive, got {args.tokens}")
        tokens, source = int(args.tokens), "from --tokens"
    else:
        tokens, source = int(optimal_tokens), "Chinchilla-optimal, no --tokens or --stats given"

    fpt = flops_per_token(cfg, seq_len)
    total = fpt * tokens
    seconds = total / (args.num_gpus * peak * args.mfu)
    memory = memory_gib * GIB
    reserve = (args.reserve_gib if args.reserve_gib is not None else max(2.0, 0.1 * memory_gib)) * GIB
    flash = not args.eager_attention
    largest = largest_layer_params(cfg)
    live_bytes = LIVE_LAYER_BYTES * bytes_factor(args.precision)
    states_text = (
        "fp32 weights+grads+Adam moments" if args.precision == "fp32" else f"{args.precision} weights+grads, fp32 Adam"
    )

    out = [
        f"model {cfg.name}: {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads "
        f"({cfg.n_kv_heads} kv), d_ff {cfg.d_ff}, vocab {cfg.vocab_size}, {cfg.mlp}, seq_len {seq_len}",
        f"parameters           {params:,} ({human(params)}); {cfg.num_params(include_embedding=False):,} "
        f"without embeddings; matmul weights incl. LM head {matmul_params(cfg):,}",
        f"Chinchilla-optimal   {human(optimal_tokens)} tokens for this model (20 per parameter)",
        f"token budget         {human(tokens)} tokens ({source}); {tokens / params:.3g} per parameter; "
        f"Chinchilla-optimal size for it: {human(tokens / CHINCHILLA_TOKENS_PER_PARAM)} parameters",
        f"FLOPs per token      {fpt:.4g} (6 x matmul weights {6 * matmul_params(cfg):.4g} + attention "
        f"{attention_flops_per_token(cfg, seq_len):.4g}; PaLM convention, no causal discount)",
        f"training FLOPs       {total:.4g}",
        f"time                 {duration(seconds)} on {args.num_gpus} x {gpu_name} "
        f"({peak / 1e12:.0f} TFLOP/s {args.precision} peak) at {args.mfu:.0%} MFU "
        f"({seconds / 3600 * args.num_gpus:,.0f} GPU-hours)",
        "",
        f"ZeRO-3 memory per GPU ({memory_gib:g} GiB, {reserve / GIB:.1f} GiB kept free; "
        f"{'eager' if not flash else 'fused'} attention; {states_text}: 16 bytes/param / "
        f"{args.num_gpus} GPUs + {live_bytes} bytes x largest layer {human(largest)})",
        f"  activations per sequence of {seq_len}: "
        f"{activation_bytes(cfg, seq_len, 1, False, flash, args.precision) / GIB:.2f} GiB without checkpointing, "
        f"{activation_bytes(cfg, seq_len, 1, True, flash, args.precision) / GIB:.2f} GiB with activation checkpointing",
        f"  {'offload':<18} {'GPU states':>11} {'CPU per node':>13} {'micro-batch':>12} {'with ckpt':>10}",
    ]
    for offload in OFFLOAD_CHOICES:  # the last, optimizer+params, keeps the least on the GPU
        states = zero3_model_states(params, largest, args.num_gpus, args.gpus_per_node, offload, args.precision)
        fits = [
            max_micro_batch(memory, states.gpu_bytes, cfg, seq_len, ckpt, flash, reserve, args.precision)
            for ckpt in (False, True)
        ]
        out.append(
            f"  {offload:<18} {states.gpu_bytes / GIB:>7.2f} GiB {states.cpu_bytes_per_node / GIB:>9.1f} GiB "
            f"{fits[0]:>12} {fits[1]:>10}"
        )
    if fits[1] == 0:  # not even with everything offloaded and activation checkpointing
        out.append("  not even one sequence fits: use more GPUs, a shorter --seq-len, or a bigger GPU")
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        print(plan(args))
    except PlanError as e:
        print(f"ftlm-plan: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
