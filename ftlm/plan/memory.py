"""Memory per GPU under DeepSpeed ZeRO-3 with bf16 mixed precision and Adam: model states and activations.
(fp32 training, `precision="fp32"`, is accounted at the end of this note.)

Model states (Rajbhandari et al. 2020, "ZeRO", section 3 and 5): per parameter, 2 bytes of bf16 weights,
2 bytes of bf16 gradients and 12 bytes of optimizer state (fp32 master weights, Adam's momentum and variance),
16 bytes in all, partitioned over every GPU of the job. On top of its partition each GPU holds one layer whole
while it runs: the gathered bf16 weights and their bf16 gradients before the reduce-scatter, 4 bytes per
parameter of the largest layer (the figure DeepSpeed's own estimator uses).
DeepSpeed's estimator counts 18 bytes per parameter instead of 16: it also keeps fp32 gradients for the whole
partition, where stage 3 converts them one optimizer sub-group at a time; so this module's GPU figure is the
estimator's minus 2 bytes per parameter per GPU, and equal to it with offload.
With the optimizer offloaded (ZeRO-Offload), the GPU keeps only its bf16 weight partition; the CPU of each
node holds the optimizer state and fp32 gradients (12 + 4 bytes per parameter) of its GPUs' partitions, and
2 bytes more when the weights are offloaded too.

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
equation 1 with no tensor or sequence parallelism), in bytes per transformer layer, for sequence length s,
micro-batch b, width h, a heads, 16-bit activations and 1-byte dropout masks:

    s * b * h * (34 + 5 * a * s / h)

The 5as/h term is the s x s attention scores, softmax output and its dropout mask. A fused (flash) attention
kernel keeps none of them, leaving 34 * s * b * h, the paper's figure with selective recomputation.
With full activation checkpointing each layer keeps only its 2 * s * b * h bytes of input, plus one layer's
full activations while it is recomputed in the backward pass. The head adds 4 * s * b * h (final norm and LM
head inputs) and 4 * s * b * vocab, the paper's figure for fp32 logits (section 4.3); with ftlm's fused
cross-entropy the same 4 bytes are the bf16 logits it keeps plus their bf16 gradient, which exists at the start
of the backward pass while every saved activation is still held.
With `model.doc_mask` and an implementation that is not a fused kernel (eager; sdpa's fallback), one
(b, 1, s, s) boolean mask, s * s * b bytes, is shared by every layer; fused kernels take the document starts only.
In fp32 (no mixed precision) there is no master copy: 4 bytes of weights, 4 of gradients and 8 of Adam state,
the same 16 bytes per parameter, but the live layer takes 8 bytes per parameter and every activation twice the
bytes, except the masks the formula counts at one byte.

The formula assumes plain multi-head attention and a 4h GELU MLP; for grouped-query attention it overcounts
keys and values slightly, and without dropout it overcounts the masks: an upper bound, which is what a plan wants.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftlm.model.gpt import GPTConfig

GIB = 2**30
BF16_WEIGHT_BYTES = 2
BF16_GRAD_BYTES = 2
OPTIMIZER_BYTES = 12  # fp32 master weights + Adam momentum + Adam variance
FP32_GRAD_BYTES = 4  # gradients as the CPU optimizer reads them (offload only)
LIVE_LAYER_BYTES = 4  # gathered bf16 weights + bf16 gradients of the layer being computed
ADAM_MOMENTS_BYTES = 8  # Adam momentum + variance (fp32 training: the weights are the master copy)

PRECISIONS = ("bf16", "fp16", "fp32")

OFFLOAD_CHOICES = ("none", "optimizer", "optimizer+params")


def largest_layer_params(cfg: GPTConfig) -> int:
    """Parameters of the biggest single module (DeepSpeed's "largest layer"): usually the token embedding."""
    d, b = cfg.d_model, int(cfg.bias)
    qkv_out = (cfg.n_head + 2 * cfg.n_kv_heads) * cfg.head_dim
    fc_in_out = cfg.d_ff * (2 if cfg.mlp == "swiglu" else 1)
    return max(
        cfg.vocab_size * d,
        d * qkv_out + b * qkv_out,
        d * d + b * d,
        d * fc_in_out + b * fc_in_out,
        cfg.d_ff * d + b * d,
    )


@dataclass(frozen=True)
class ModelStateMemory:
    gpu_bytes: int  # per GPU
    cpu_bytes_per_node: int  # optimizer state (and weights) kept in each node's CPU memory


def bytes_factor(precision: str) -> int:
    """How many times the bytes of a bf16/fp16 value one value of `precision` takes: 2 in fp32 training, else 1."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    return 2 if precision == "fp32" else 1


def zero3_model_states(
    total_params: int,
    largest_layer: int,
    num_gpus: int,
    gpus_per_node: int = 8,
    offload: str = "none",
    precision: str = "bf16",
) -> ModelStateMemory:
    """Bytes of weights, gradients and optimizer state per GPU (and per node's CPU) under ZeRO-3."""
    if offload not in OFFLOAD_CHOICES:
        raise ValueError(f"offload must be one of {', '.join(OFFLOAD_CHOICES)}, got '{offload}'")
    if num_gpus <= 0 or gpus_per_node <= 0:
        raise ValueError(f"num_gpus ({num_gpus}) and gpus_per_node ({gpus_per_node}) must be positive")
    scale = bytes_factor(precision)
    per_gpu = total_params / num_gpus  # this GPU's partition
    per_node = per_gpu * min(gpus_per_node, num_gpus)
    live = scale * LIVE_LAYER_BYTES * largest_layer
    # fp32: the weights are fp32 (no separate master copy), the optimizer holds Adam's two moments only
    weight = scale * BF16_WEIGHT_BYTES
    grad = scale * BF16_GRAD_BYTES
    optimizer = ADAM_MOMENTS_BYTES if precision == "fp32" else OPTIMIZER_BYTES
    if offload == "none":
        gpu = live + per_gpu * (weight + grad + optimizer)
        cpu = 0
    elif offload == "optimizer":
        gpu = live + per_gpu * weight
        cpu = per_node * (optimizer + FP32_GRAD_BYTES + (weight if precision == "fp32" else 0))
    else:
        gpu = live
        cpu = per_node * (optimizer + FP32_GRAD_BYTES + weight)
    return ModelStateMemory(int(gpu), int(cpu))


def activation_bytes_per_layer(
    cfg: GPTConfig, seq_len: int, micro_batch: int, flash: bool = True, precision: str = "bf16"
) -> int:
    """Korthikanti et al. 2022, eq. 1: s*b*h*(34 + 5*a*s/h); the 5as/h term only without a fused attention kernel.

    Of the 34 sbh, 2 sbh are one-byte dropout masks, and of the 5 as^2 b one as^2 b: in fp32 only the rest doubles.
    """
    s, b, h, a = seq_len, micro_batch, cfg.d_model, cfg.n_head
    scale = bytes_factor(precision)
    per_token = scale * 32 * h + 2 * h
    if not flash:
        per_token += scale * 4 * a * s + a * s
    return int(s * b * per_token)


def activation_bytes(
    cfg: GPTConfig,
    seq_len: int,
    micro_batch: int,
    checkpointing: bool = False,
    flash: bool = True,
    precision: str = "bf16",
) -> int:
    """Activation memory of one micro-batch on one GPU (ZeRO partitions model states, not activations)."""
    s, b, h = seq_len, micro_batch, cfg.d_model
    scale = bytes_factor(precision)
    layer = activation_bytes_per_layer(cfg, s, b, flash, precision)
    head = scale * (4 * s * b * h + 4 * s * b * cfg.vocab_size)
    if cfg.doc_mask and not flash:
        head += s * s * b  # the block-diagonal causal mask of packed documents, one byte per entry
    if checkpointing:
        return cfg.n_layer * scale * 2 * s * b * h + layer + head
    return cfg.n_layer * layer + head


def max_micro_batch(
    memory_bytes: float,
    model_state_bytes: float,
    cfg: GPTConfig,
    seq_len: int,
    checkpointing: bool,
    flash: bool = True,
    reserve_bytes: float = 0,
    precision: str = "bf16",
) -> int:
    """The largest micro-batch whose activations fit beside the model states (0 when not even one does)."""
    free = memory_bytes - reserve_bytes - model_state_bytes
    per_sequence = activation_bytes(cfg, seq_len, 1, checkpointing, flash, precision)
    return max(0, int(free // per_sequence))
