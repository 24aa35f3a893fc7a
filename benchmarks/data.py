"""Data pipeline throughput: cleaning + dedup and tokenization per worker, scaling 1..N workers, and the loader.

    python benchmarks/data.py                     # ~8 MB synthetic ko/en corpus, 1..cpu_count workers
    python benchmarks/data.py --mb 64 --workers 1,2,4,8,16
    python benchmarks/data.py --smoke             # tiny: checks the script runs

The corpus is synthetic but realistic: documents are random runs of paragraphs drawn from the embedded Korean and
English texts, so they pass the filters and are not duplicates of each other. Each worker count runs the real
stages of `ftlm.data.prepare` (read -> normalise -> quality filters -> MinHash in workers, exact + LSH dedup in the
main process; then tokenization in workers -> MDS shards) with a 32k-token tokenizer trained once beforehand.
The loader row is `build_train_loader` packing 2048-token rows from those shards in the main process; the target
is 10x what gpt_1_3b consumes on one H100 (about 30,000 tokens/s), i.e. 300,000 tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per worker, so per-worker figures mean that

LOADER_TARGET = 300_000


def synthetic_corpus(out: Path, megabytes: float, seed: int = 0) -> dict[str, Path]:
    from ftlm.data import corpus

    rng = random.Random(seed)
    pools = {
        "ko": [p for d in corpus.korean_documents() for p in d["text"].split("\n") if len(p) > 40],
        "en": [p for d in corpus.english_documents() for p in d["text"].split("\n\n") if len(p) > 80],
    }
    share = {"ko": 0.5, "en": 0.5}
    paths = {}
    for stream, paragraphs in pools.items():
        path = out / f"{stream}.jsonl"
        budget = megabytes * share[stream] * 1e6
        written = 0
        with open(path, "w", encoding="utf-8") as f:
            while written < budget:
                text = "\n".join(rng.sample(paragraphs, rng.randint(4, 10)))
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
        paths[stream] = path
    return paths


def config(out_dir: Path, sources: dict[str, Path], workers: int, vocab: int) -> dict:
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "data" / "custom.yaml"), resolve=False)
    cfg.update(
        out_dir=str(out_dir),
        cache_dir=str(out_dir / "cache"),
        num_workers=workers,
        sources={s: [str(p)] for s, p in sources.items()},
    )
    cfg["clean"]["min_words"] = 10
    cfg["tokenizer"].update(vocab_size=vocab, sample_chars=2_000_000)
    return cfg


def run_stages(cfg: dict, tokenizer_path: str) -> dict:
    from ftlm.data.checks import check_data_config
    from ftlm.data.prepare import CleanConfig, DedupConfig, Workers, _clean_chunk, clean_stream, shard_stream
    from ftlm.data.sources import resolve_files
    from ftlm.data.tokenizer import Tokenizer

    streams = check_data_config(cfg)
    out = Path(cfg["out_dir"])
    shutil.rmtree(out / "shards", ignore_errors=True)
    (out / "clean").mkdir(parents=True, exist_ok=True)
    n = cfg["num_workers"]
    started = time.perf_counter()
    workers = Workers(n, CleanConfig.from_cfg(cfg["clean"]).__dict__, DedupConfig.from_cfg(cfg["dedup"]).__dict__)
    list(workers.map(_clean_chunk, [(None, ["warm-up"])] * (4 * n)))  # wait until every worker has started
    warm = time.perf_counter() - started  # process start-up (imports), reported apart
    tokenizer = Tokenizer.load(tokenizer_path)
    result = {"workers": n, "startup_s": warm, "docs": 0, "bytes": 0, "clean_s": 0.0, "tokenize_s": 0.0, "tokens": 0}
    try:
        for stream in streams:
            clean_path = str(out / "clean" / f"{stream}.jsonl")
            t = time.perf_counter()
            stats = clean_stream(stream, resolve_files(stream, cfg["sources"][stream]), cfg, workers, clean_path)
            result["clean_s"] += time.perf_counter() - t
            t = time.perf_counter()
            sharded = shard_stream(
                stream, clean_path, cfg, workers, tokenizer, tokenizer_path, str(out), stats["docs_out"]
            )
            result["tokenize_s"] += time.perf_counter() - t
            result["docs"] += stats["docs_in"]
            result["bytes"] += stats["bytes_in"]
            result["tokens"] += sharded["tokens_train"] + sharded["tokens_val"]
    finally:
        workers.close()
    return result


def loader_throughput(cfg: dict, seq_len: int, micro_batch: int, batches: int) -> float:
    from ftlm.data.stream import build_train_loader

    loader = build_train_loader(cfg, seq_len, micro_batch, 0, 1, seed=0)
    next(loader)
    started = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * micro_batch * (seq_len + 1) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=8.0, help="synthetic corpus size in megabytes (both streams)")
    parser.add_argument("--workers", default=None, help="comma-separated worker counts (default 1..cpu_count)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.mb, args.vocab = 0.5, 2000
    counts = [int(w) for w in args.workers.split(",")] if args.workers else list(range(1, (os.cpu_count() or 1) + 1))

    import logging

    logging.basicConfig(level=logging.WARNING)
    from ftlm.data.prepare import prepare

    work = Path(tempfile.mkdtemp(prefix="ftlm-bench-data-"))
    try:
        (work / "raw").mkdir()
        sources = synthetic_corpus(work / "raw", args.mb)
        base = config(work / "prepared", sources, counts[0], args.vocab)
        t = time.perf_counter()
        prepared = prepare(base)  # full pipeline once: the tokenizer and the shards the loader reads
        full_s = time.perf_counter() - t
        rows = [run_stages(config(work / f"w{n}", sources, n, args.vocab), prepared.tokenizer_path) for n in counts]
        loader_tps = loader_throughput(base, 2048, 8, 4 if args.smoke else 100)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mb = rows[0]["bytes"] / 1e6
    print(
        f"\ndata pipeline on {os.cpu_count()} CPU core(s): {rows[0]['docs']:,} documents, {mb:.1f} MB, "
        f"{rows[0]['tokens']:,} tokens (vocab {args.vocab}); full prepare with {counts[0]} worker(s): {full_s:.1f}s"
    )
    header = (
        f"{'workers':>7} {'clean+dedup docs/s':>19} {'MB/s':>7} {'MB/s/worker':>11} {'tokenize docs/s':>16} "
        f"{'MB/s':>7} {'MB/s/worker':>11} {'speed-up':>8} {'start-up s':>10}"
    )
    print(header)
    print("-" * len(header))
    base_total = rows[0]["clean_s"] + rows[0]["tokenize_s"]
    for r in rows:
        c_mbs, t_mbs = r["bytes"] / 1e6 / r["clean_s"], r["bytes"] / 1e6 / r["tokenize_s"]
        print(
            f"{r['workers']:>7} {r['docs'] / r['clean_s']:>19,.0f} {c_mbs:>7.2f} {c_mbs / r['workers']:>11.2f} "
            f"{r['docs'] / r['tokenize_s']:>16,.0f} {t_mbs:>7.2f} {t_mbs / r['workers']:>11.2f} "
            f"{base_total / (r['clean_s'] + r['tokenize_s']):>8.2f} {r['startup_s']:>10.2f}"
        )
    verdict = "OK" if loader_tps >= LOADER_TARGET else "BELOW TARGET"
    print(
        f"\nstreaming loader (seq 2048, micro-batch 8, one rank, main process): {loader_tps:,.0f} tokens/s "
        f"vs target {LOADER_TARGET:,} ({loader_tps / LOADER_TARGET:.1f}x) {verdict}"
    )


if __name__ == "__main__":
    main()
