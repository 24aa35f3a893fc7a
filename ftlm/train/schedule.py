"""Learning-rate schedule: linear warmup, then cosine decay to a floor, then flat at the floor."""

import math


def lr_multiplier(step: int, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """Factor applied to the peak learning rate at optimizer step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, t):
    """LambdaLR over `lr_multiplier` from a TrainerConfig (warmup_steps, decay_steps, max_steps, min_lr_ratio)."""
    import torch

    decay = t.decay_steps if t.decay_steps is not None else max(1, t.max_steps - t.warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, t.warmup_steps, decay, t.min_lr_ratio)
    )
