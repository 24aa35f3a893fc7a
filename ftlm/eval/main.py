"""ftlm-eval: loss and bits per byte of a trained model on any text files, per file and overall; or benchmarks.

    ftlm-eval <run dir | checkpoint | export dir> ko_news.txt en_wiki.jsonl [--seq-len 1024] [--batch-size 8]
    ftlm-eval <run dir | checkpoint | export dir> --tasks kobest_copa,haerae_history [--num-fewshot 5] [--limit N]
              [--include-path DIR] [--json results.json]

Files: a .jsonl file holds one JSON object per line with the text under "text" (--text-key); any other file is one
document of plain UTF-8 text. A file that is not UTF-8 (EUC-KR, UTF-16, binary) is refused, naming what it looks
like and how to convert it; nothing is scored from replacement characters. Documents are joined as in training,
each after an end-of-text token, and cut into windows of seq_len predictions; every text token is predicted exactly
once, and the end-of-text tokens are context only, so bits per byte measure the text's own bytes. Bits per byte
divide by UTF-8 bytes, not tokens, so models with different tokenizers compare on the same files. A model trained
with model.doc_mask sees each document on its own, as in training (positions restart, no attention across).
The exit status is 1 when a file could not be scored (the others are still reported).

--tasks runs lm-evaluation-harness tasks on the model itself (see ftlm/eval/harness.py; needs `ftlm[eval]`).
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

from ftlm.checkpoint import SOURCE_HELP, CheckpointError, load, resolve_device, resolve_dtype
from ftlm.eval.loss import IGNORE_INDEX, evaluate

log = logging.getLogger(__name__)


class UnreadableFile(ValueError):
    """A file that is not UTF-8 text; the message says what it looks like and how to convert it."""


def _converted(path: Path) -> str:
    return f"{path.stem}.utf8{path.suffix}"


def _looks_utf16(data: bytes) -> bool:
    """Whether the bytes decode as UTF-16 to mostly ordinary text (ASCII, Hangul, CJK, whitespace)."""

    def ordinary(c: str) -> bool:
        return c.isspace() or " " <= c <= "~" or "\uac00" <= c <= "\ud7a3" or "\u4e00" <= c <= "\u9fff"

    for codec in ("utf-16-le", "utf-16-be"):
        try:
            text = data.decode(codec)
        except UnicodeDecodeError:
            continue
        if text and sum(map(ordinary, text)) >= 0.9 * len(text):
            return True
    return False


def decode_text(path: Path, data: bytes) -> str:
    """UTF-8 (a byte-order mark is dropped), or UnreadableFile naming the encoding the bytes look like."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UnreadableFile(
            f"{path}: UTF-16 text (it starts with a byte-order mark), not UTF-8; convert it with "
            f"`iconv -f UTF-16 -t UTF-8 {path} > {_converted(path)}`"
        )
    if b"\x00" in data:
        kind = "UTF-16 text without a byte-order mark" if _looks_utf16(data) else "binary data"
        raise UnreadableFile(f"{path}: {kind} (it has NUL bytes), not UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        where = f"line {line}, byte {e.start}"
        try:
            data.decode("cp949")
            hint = f"it reads as EUC-KR/CP949: convert it with `iconv -f CP949 -t UTF-8 {path} > {_converted(path)}`"
        except UnicodeDecodeError:
            hint = "it is not EUC-KR/CP949 either (binary data?)"
        raise UnreadableFile(f"{path}: not UTF-8 (byte 0x{data[e.start]:02x} at {where}); {hint}") from None


def read_documents(path: Path, text_key: str = "text") -> list[str]:
    """The documents of one file; malformed .jsonl lines (not JSON, no string text, not UTF-8) are counted, named in
    a warning, and skipped. Raises UnreadableFile for a file that is not UTF-8 text."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    data = path.read_bytes()
    if path.suffix != ".jsonl":
        return [decode_text(path, data)]
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data:
        decode_text(path, data)  # raises, saying what the file is
    docs, bad, not_utf8, first_bad = [], 0, 0, None
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            text = json.loads(line)[text_key]
            if not isinstance(text, str):
                raise TypeError(f"'{text_key}' is not a string")
        except (ValueError, KeyError, TypeError) as e:  # UnicodeDecodeError is a ValueError
            bad += 1
            not_utf8 += isinstance(e, UnicodeDecodeError)
            reason = "not UTF-8" if isinstance(e, UnicodeDecodeError) else f"{type(e).__name__}: {e}"
            first_bad = first_bad or f"{path}:{lineno}: {reason}"
            continue
        docs.append(text)
    if not docs and not_utf8:
        decode_text(path, data)  # nothing readable: refuse the file, saying what it looks like
    if bad:
        log.warning(
            "%s: skipped %d malformed line(s) without a string '%s' (%d not UTF-8; first: %s)",
            path,
            bad,
            text_key,
            not_utf8,
            first_bad,
        )
    return docs


def token_stream(docs: list[str], tokenizer) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(ids, targets, starts): every document preceded by end-of-text, the end-of-text targets IGNORE_INDEX, and the
    index of each document's first token. As in training, a document starts at its first token and the end-of-text
    before it closes the document before (or stands alone at the start)."""
    ids: list[int] = []
    starts: list[int] = []
    bos = tokenizer.document_start  # a Llama-style document starts with BOS, as in training
    for doc_ids in tokenizer.encode_batch(docs):
        ids.append(tokenizer.eot_id)
        starts.append(len(ids))
        ids.extend(bos + doc_ids)
    ids_t = torch.tensor(ids, dtype=torch.long)
    targets = ids_t.clone()
    targets[ids_t == tokenizer.eot_id] = IGNORE_INDEX
    if bos:
        targets[ids_t == tokenizer.bos_id] = IGNORE_INDEX  # no text: predicting it says nothing of bits per byte
    return ids_t, targets, starts


def windows(
    ids: torch.Tensor, targets: torch.Tensor, seq_len: int, batch_size: int, starts: list[int] | None = None
) -> Iterator:
    """`Batch`es of (B, seq_len). Window i predicts positions i*seq_len+1 .. (i+1)*seq_len, so every position after
    the first is predicted exactly once; the last window is shorter rather than dropped. starts: document starts in
    ids, which become the windows' positions and cu_seqlens (a window also starts a document of its own)."""
    from ftlm.data.batch import Batch

    n = ids.numel()
    begins = list(range(0, max(n - 1, 0), seq_len))
    doc_starts = sorted(starts or [])

    def batch(group: list[int], length: int) -> Batch:
        rows = torch.stack([ids[s : s + length + 1] for s in group])  # (B, length + 1)
        inside = [[d - s for d in doc_starts if s < d < s + length] for s in group]
        b = Batch.from_rows(rows, inside)
        return Batch(b.inputs, torch.stack([targets[s + 1 : s + length + 1] for s in group]), b.positions, b.cu_seqlens)

    full = [s for s in begins if s + seq_len < n]
    for i in range(0, len(full), batch_size):
        yield batch(full[i : i + batch_size], seq_len)
    for s in begins[len(full) :]:
        yield batch([s], n - 1 - s)


def evaluate_files(
    model,
    tokenizer,
    files: list[Path],
    seq_len: int,
    batch_size: int,
    device,
    text_key: str = "text",
    refused: dict[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    """{file: {loss, bpb, tokens, bytes}} plus "overall" (weighted by tokens and by bytes).

    A file that is not UTF-8 text raises UnreadableFile, or, with `refused` given, is recorded there (file ->
    reason) and skipped."""
    from tqdm import tqdm

    token_bytes = tokenizer.token_byte_lengths()
    results: dict[str, dict[str, float]] = {}
    for path in files:
        try:
            docs = read_documents(path, text_key)
        except UnreadableFile as e:
            if refused is None:
                raise
            refused[str(path)] = str(e)
            continue
        ids, targets, starts = token_stream(docs, tokenizer)
        counted = targets[1:][targets[1:] != IGNORE_INDEX]
        n_tokens, n_bytes = counted.numel(), int(token_bytes[counted].sum())
        if n_tokens == 0:
            log.warning("%s: no text to evaluate", path)
            continue
        full, rest = divmod(ids.numel() - 1, seq_len)
        n_batches = math.ceil(full / batch_size) + (rest > 0)  # as many as windows() yields
        batches = tqdm(
            windows(ids, targets, seq_len, batch_size, starts),
            desc=path.name,
            unit="batch",
            total=n_batches,
            leave=False,
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


def _limit(text: str) -> int | float:
    """--limit: a number of examples per task, or a fraction of each task below 1 (as lm-eval takes it)."""
    value = float(text)
    if value <= 0 or (value >= 1 and value != int(value)):
        raise argparse.ArgumentTypeError(f"{text}: give a positive number of examples, or a fraction below 1")
    return int(value) if value >= 1 else value


def run_benchmarks(args) -> int:
    """--tasks: every check (lm-eval installed, task names, include path, tokenizer, cached data) before the model
    is loaded; then lm-eval's table on stdout and its results dict in --json."""
    try:
        from ftlm.eval import harness
    except ImportError as e:
        print(f"ftlm-eval: error: {e}", file=sys.stderr)
        return 1
    from ftlm.checkpoint import locate, write_atomic

    try:
        names = harness.check_tasks(args.tasks, args.include_path)
        source = locate(args.source)
        if not source.tokenizer_path.is_file():
            raise FileNotFoundError(
                f"{args.source} has no tokenizer: {source.tokenizer_path} does not exist (a run directory keeps it "
                "beside checkpoints/, an ftlm model directory beside model.safetensors)"
            )
        device = resolve_device(args.device)
        manager = harness.load_tasks(names, args.include_path)
        loaded = load(args.source, device=device, dtype=resolve_dtype(args.dtype, device), expected_config=args.config)
        lm = harness.FtlmLM(model=loaded.model, tokenizer=loaded.tokenizer, batch_size=args.batch_size, device=device)
        results = harness.evaluate(lm, names, manager, args.limit, args.num_fewshot)
    except (harness.HarnessError, FileNotFoundError, CheckpointError, ValueError) as e:
        print(f"ftlm-eval: error: {e}", file=sys.stderr)
        return 1
    from lm_eval.utils import handle_non_serializable, make_table

    results["config"]["model_args"] = str(args.source)
    print(f"ftlm ({args.source}), limit: {args.limit}, num_fewshot: {args.num_fewshot}, batch_size: {args.batch_size}")
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    if args.json:
        text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
        write_atomic(args.json, text + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ftlm-eval",
        description="Loss and bits per byte on text files, or lm-evaluation-harness benchmarks (--tasks).",
        epilog="Exit status 1 when anything could not be evaluated (a file that is not UTF-8 text, a bad task).",
    )
    parser.add_argument("source", help=SOURCE_HELP)
    parser.add_argument("files", nargs="*", type=Path, help=".txt (one document) or .jsonl (one per line) files")
    parser.add_argument(
        "--seq-len", type=int, default=None, help="tokens predicted per window (default: the model's max_seq_len)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="windows or requests per forward pass (default 8)")
    parser.add_argument("--text-key", default="text", help="the field holding the text in .jsonl lines (default text)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16")
    parser.add_argument("--config", help="a model config the checkpoint must match (mismatched keys are named)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    bench = parser.add_argument_group("benchmarks (lm-evaluation-harness; pip install 'ftlm[eval]')")
    bench.add_argument("--tasks", help="comma-separated lm-eval task or group names, * patterns allowed (kmmlu*)")
    bench.add_argument("--num-fewshot", type=int, default=None, help="examples in each prompt (default: the task's)")
    bench.add_argument("--limit", type=_limit, default=None, help="examples per task (N, or a fraction below 1)")
    bench.add_argument("--include-path", type=Path, help="a folder of your own task YAML files (e.g. local data)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.batch_size <= 0 or (args.seq_len is not None and args.seq_len <= 0):
        parser.error("--seq-len and --batch-size must be positive")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        parser.error("--num-fewshot must not be negative")
    if args.tasks is not None:
        if args.files:
            parser.error("give text files or --tasks, not both")
        if args.seq_len is not None or args.text_key != "text":
            parser.error("--seq-len and --text-key are for text files; lm-eval tasks use the model's whole context")
        return run_benchmarks(args)
    if not args.files:
        parser.error("give the text files to score, or --tasks")

    refused: dict[str, str] = {}
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
            loaded.model, loaded.tokenizer, args.files, seq_len, args.batch_size, device, args.text_key, refused
        )
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        print(f"ftlm-eval: error: {e}", file=sys.stderr)
        return 1
    if results:
        print(format_table(results))
    if args.json:
        from ftlm.checkpoint import write_json_atomic

        write_json_atomic(args.json, {**results, **({"refused": refused} if refused else {})})
    reasons = "".join(f"\n  {reason}" for reason in refused.values())
    if not results:
        refusals = f" ({len(refused)} file(s) refused){reasons}" if refused else ""
        print(f"ftlm-eval: error: nothing was scored{refusals}", file=sys.stderr)
        return 1
    if refused:
        print(f"ftlm-eval: error: {len(refused)} file(s) not scored:{reasons}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
