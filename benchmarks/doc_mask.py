"""Ablation: does attending within documents only (model.doc_mask) help? Tiny model, CPU, equal tokens.

Trains the same model on the same batches twice, with model.doc_mask=true and =false (each `trainer=demo` unless
overridden), then validates both final checkpoints on the held-out split twice: with document masking (each held-out
document seen on its own, as the masked model trained) and without (documents see their packed neighbours).

    python benchmarks/doc_mask.py                          # 300 steps each (a few minutes on 2 CPU cores)
    python benchmarks/doc_mask.py trainer.max_steps=50     # any ftlm-train override applies to both runs
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ftlm.checkpoint import load
from ftlm.config import compose
from ftlm.data.prepare import prepare
from ftlm.data.stream import build_val_loaders
from ftlm.eval.loss import evaluate


def train(run_dir: Path, doc_mask: bool, overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "ftlm.train.main", "model=tiny", "data=embedded", "trainer=demo"]
    cmd += [f"model.doc_mask={str(doc_mask).lower()}", f"trainer.out_dir={run_dir}", "trainer.resume=never", *overrides]
    subprocess.run(cmd, check=True)


def validate(run_dir: Path, cfg, masked: bool) -> dict[str, float]:
    loaded = load(run_dir, device="cpu", attn_impl="sdpa", norm_impl="torch")
    loaded.model.cfg.doc_mask = masked  # the same weights, validated with or without document boundaries
    seq_len = int(cfg.trainer.seq_len)
    loaders = build_val_loaders(cfg.data, seq_len, 8, 0, 1, 10_000, prepared=prepare(cfg.data))
    return evaluate(loaded.model, loaders, torch.device("cpu"), loaded.tokenizer.token_byte_lengths())


def main() -> None:
    overrides = sys.argv[1:]
    cfg = compose(["model=tiny", "data=embedded", "trainer=demo", *overrides])
    root = Path(tempfile.mkdtemp(prefix="ftlm-doc-mask-"))
    rows = []
    for doc_mask in (True, False):
        run_dir = root / f"doc_mask_{doc_mask}"
        train(run_dir, doc_mask, overrides)
        for masked in (True, False):
            val = validate(run_dir, cfg, masked)
            rows.append((doc_mask, masked, val))
    streams = sorted(k.split("/")[1] for k in rows[0][2] if k.endswith("/bpb"))
    print(f"\ntiny model, {cfg.trainer.max_steps} steps of {cfg.trainer.micro_batch_size}x{cfg.trainer.seq_len} tokens")
    print("| trained with doc_mask | validated masked | val loss | " + " | ".join(f"{s} bpb" for s in streams) + " |")
    print("|---|---|---|" + "---|" * len(streams))
    for doc_mask, masked, val in rows:
        bpb = " | ".join(f"{val[f'val/{s}/bpb']:.4f}" for s in streams)
        print(f"| {doc_mask} | {masked} | {val['val/loss']:.4f} | {bpb} |")
    print(f"(runs in {root})")


if __name__ == "__main__":
    main()
