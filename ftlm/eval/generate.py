"""Text generation with a KV cache: each new token costs one forward pass over that token only."""
from __future__ import annotations

import torch

from ftlm.model import KVCache


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: int | None = None, use_cache: bool = True, generator=None):
    """Yield new token ids one at a time. temperature 0 is greedy decoding."""
    cfg = model.cfg
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    max_new_tokens = min(max_new_tokens, cfg.max_seq_len - ids.shape[1])
    dtype = next(model.parameters()).dtype
    cache = KVCache(cfg, 1, ids.shape[1] + max_new_tokens, device, dtype) if use_cache else None
    step_input = ids
    for _ in range(max_new_tokens):
        logits, _ = model(step_input if use_cache else ids, cache=cache)
        next_id = sample(logits[:, -1, :].float(), temperature, top_k, top_p, generator)
        yield int(next_id)
        if eos_id is not None and int(next_id) == eos_id:
            return
        step_input = next_id.view(1, 1)
        ids = torch.cat([ids, step_input], dim=1)


def sample(logits, temperature: float, top_k: int, top_p: float, generator=None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop tokens once the mass before them already exceeds top_p (the first token always stays)
        drop = probs.cumsum(dim=-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
