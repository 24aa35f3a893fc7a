"""ftlm-eval: loss and bits per byte of a trained model on any text files, per file and overall.

    ftlm-eval <run dir | checkpoint | export dir> ko_news.txt en_wiki.jsonl [--seq-len 1024] [--batch-size 8]

A .jsonl file holds one JSON object per line with the text under "text" (--text-key); any other file is one
document of plain UTF-8 text. Documents are joined as in training, each after an end-of-text token, and cut
into windows of seq_len predictions; every text token is predicted exactly once, and the end-of-text tokens
are context only, so bits per byte measure the text's own bytes. Bits per byte divide by UTF-8 bytes, not
tokens, so models with different tokenizers compare on the same files.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from ftlm.checkpoint_io import SOURCE_HELP, CheckpointError, load, resolve_device, resolve_dtype
from ftlm.eval.loss import IGNORE_INDEX, evaluate

log = logging.getLogger(__name__)


def read_documents(path: Path, text_key: str = "text") -> list[str]:
    """The documents of one file; malformed .jsonl lines are counted, named in a warning, and skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix != ".jsonl":
        return [path.read_text(encoding="utf-8", errors="replace")]
    docs, bad, first_bad = [], 0, None
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_key]
                if not isinstance(text, str):
                    raise TypeError(f"'{text_key}' is not a string")
            except (ValueError, KeyError, TypeError) as e:
                bad += 1
                first_bad = first_bad or f"{path}:{lineno}: {type(e).__name__}: {e}"
                continue
            docs.append(text)
    if bad:
        log.warning(
            "%s: skipped %d malformed line(s) without a string '%s' (first: %s)", path, bad, text_key, first_bad
        )
    return docs


def token_stream(docs: list[str], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, targets): every document preceded by end-of-text; the end-of-text targets are IGNORE_INDEX."""
    ids: list[int] = []
    for doc_ids in tokenizer.encode_batch(docs):
        ids.append(tokenizer.eot_id)
        ids.extend(doc_ids)
    ids_t = torch.tensor(ids, dtype=torch.long)
    targets = ids_t.clone()
    targets[ids_t == tokenizer.eot_id] = IGNORE_INDEX
    return ids_t, targets


def windows(
    ids: torch.Tensor, targets: torch.Tensor, seq_len: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) batches of (B, seq_len). Window i predicts positions i*seq_len+1 .. (i+1)*seq_len, so
    every position after the first is predicted exactly once; the last window is shorter rather than dropped."""
    n = ids.numel()
    starts = list(range(0, max(n - 1, 0), seq_len))
    full = [s for s in starts if s + seq_len < n]
    for i in range(0, len(full), batch_size):
        group = full[i : i + batch_size]
        yield (
            torch.stack([ids[s : s + seq_len] for s in group]),
            torch.stack([targets[s + 1 : s + seq_len + 1] for s in group]),
        )
    for s in starts[len(full) :]:
        yield ids[s : n - 1].unsqueeze(0), targets[s + 1 : n].unsqueeze(0)


def evaluate_files(
    model, tokenizer, files: list[Path], seq_len: int, batch_size: int, device, text_key: str = "text"
) -> dict[str, dict[str, float]]:
    """{file: {loss, bpb, tokens, bytes}} plus "overall" (weighted by tokens and by bytes)."""
    from tqdm import tqdm

    token_bytes = tokenizer.token_byte_lengths()
    results: dict[str, dict[str, float]] = {}
    for path in files:
        ids, targets = token_stream(read_documents(path, text_key), tokenizer)
        counted = targets[1:][targets[1:] != IGNORE_INDEX]
        n_tokens, n_bytes = counted.numel(), int(token_bytes[counted].sum())
        if n_tokens == 0:
            log.warning("%s: no text to evaluate", path)
            continue
        full, rest = divmod(ids.numel() - 1, seq_len)
        n_batches = math.ceil(full / batch_size) + (rest > 0)  # as many as windows() yields
        batches = tqdm(
            windows(ids, targets, seq_len, batch_size), desc=path.name, unit="batch", total=n_batches, leave=False
        )
        name = str(path)
        val = evaluate(model, {name: batches}, device, token_bytes)
        results[name] = {
            "loss": val[f"val/{name}/loss"],
            "bpb": val[f"val/{name}/bpb"],
            "tokens": n_tokens,
            "bytes": n_bytes,
        }
    if results:
        tokens = sum(r["tokens"] for r in results.values())
        nbytes = sum(r["bytes"] for r in results.values())
        results["overall"] = {
            "loss": sum(r["loss"] * r["tokens"] for r in results.values()) / tokens,
            "bpb": sum(r["bpb"] * r["bytes"] for r in results.values()) / max(nbytes, 1),
            "tokens": tokens,
            "bytes": nbytes,
        }
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    width = max([len("file")] + [len(k) for k in results])
    lines = [f"{'file':<{width}}  {'tokens':>10}  {'bytes':>11}  {'loss':>7}  {'ppl':>9}  {'bits/byte':>9}"]
    for name, r in results.items():
        ppl = math.exp(r["loss"]) if r["loss"] < 700 else float("inf")
        lines.append(
            f"{name:<{width}}  {r['tokens']:>10,}  {r['bytes']:>11,}  {r['loss']:>7.4f}  {ppl:>9.2f}  {r['bpb']:>9.4f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ftlm-eval", description="Loss and bits per byte on text files.")
    parser.add_argument("source", help=SOURCE_HELP)
    parser.add_argument("files", nargs="+", type=Path, help=".txt (one document) or .jsonl (one per line) files")
    parser.add_argument(
        "--seq-len", type=int, default=None, help="tokens predicted per window (default: the model's max_seq_len)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    parser.add_argument("--text-key", default="text", help="the field holding the text in .jsonl lines (default text)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16")
    parser.add_argument("--config", help="a model config the checkpoint must match (mismatched keys are named)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.batch_size <= 0 or (args.seq_len is not None and args.seq_len <= 0):
        parser.error("--seq-len and --batch-size must be positive")

    try:
        missing = [str(f) for f in args.files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"no such file: {', '.join(missing)}")
        device = resolve_device(args.device)
        loaded = load(args.source, device=device, dtype=resolve_dtype(args.dtype, device), expected_config=args.config)
        seq_len = args.seq_len or loaded.model.cfg.max_seq_len
        if seq_len > loaded.model.cfg.max_seq_len:
            raise ValueError(f"--seq-len {seq_len} is longer than model.max_seq_len={loaded.model.cfg.max_seq_len}")
        results = evaluate_files(
            loaded.model, loaded.tokenizer, args.files, seq_len, args.batch_size, device, args.text_key
        )
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        print(f"ftlm-eval: error: {e}", file=sys.stderr)
        return 1
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
