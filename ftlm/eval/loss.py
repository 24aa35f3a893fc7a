"""Validation loss and bits per byte, per stream, averaged over every rank's batches."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ftlm.data.batch import IGNORE_INDEX, Batch  # IGNORE_INDEX: a target that is context only (or padding)


def uses_doc_mask(model) -> bool:
    """Whether the model (or the GPT inside a DeepSpeed engine) attends within documents only (model.doc_mask)."""
    cfg = getattr(getattr(model, "module", model), "cfg", None)
    return bool(getattr(cfg, "doc_mask", False))


def forward_logits(model, batch: Batch, doc_mask: bool) -> torch.Tensor:
    """(B, S, V) logits for a batch, with the document boundaries when the model masks at them, as in training."""
    if doc_mask:
        logits, _ = model(batch.inputs, positions=batch.positions, cu_seqlens=batch.cu_seqlens)
    else:
        logits, _ = model(batch.inputs)
    return logits


@torch.no_grad()
def evaluate(model, loaders: dict, device: torch.device, token_bytes: torch.Tensor) -> dict[str, float]:
    """For each stream: mean loss per token (nats) and bits per UTF-8 byte of the predicted text.

    Bits per byte divides the summed loss by the bytes the target tokens stand for, so models with
    different tokenizers compare on the same text. token_bytes[i] is the byte length of token i.
    A loader yields `ftlm.data.batch.Batch`es (what the trainer's val loaders and ftlm-eval's windows give; a model
    with model.doc_mask gets their positions and cu_seqlens, so it sees documents as in training), or, from older
    code, LongTensors (B, T+1) (inputs [:, :-1], targets [:, 1:]) or pairs (inputs, targets) of (B, T), each row one
    document. Targets equal to -100 are context only and count neither loss, tokens nor bytes.
    """
    was_training = model.training
    model.eval()
    doc_mask = uses_doc_mask(model)
    token_bytes = token_bytes.to(device)
    out = {}
    for name, loader in loaders.items():
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # nats, tokens, bytes
        for batch in loader:
            if isinstance(batch, Batch):
                batch = batch.to(device)
                logits, y = forward_logits(model, batch, doc_mask), batch.targets
            else:  # a plain tensor or pair: the model sees each row whole
                if isinstance(batch, (tuple, list)):
                    x, y = (t.to(device) for t in batch)
                else:
                    rows = batch.to(device)
                    x, y = rows[:, :-1], rows[:, 1:]
                logits, _ = model(x)
            nll = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            counted = y[y != IGNORE_INDEX]
            sums += torch.stack(
                [
                    nll.double(),
                    torch.tensor(counted.numel(), dtype=torch.float64, device=device),
                    token_bytes[counted].sum().double(),
                ]
            )
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        nats, tokens, nbytes = sums.tolist()
        if tokens == 0:
            continue
        out[f"val/{name}/loss"] = nats / tokens
        out[f"val/{name}/bpb"] = nats / math.log(2) / max(nbytes, 1.0)
    losses = [v for k, v in out.items() if k.endswith("/loss")]
    if losses:
        out["val/loss"] = sum(losses) / len(losses)
    model.train(was_training)
    return out
