"""Data pipeline throughput: clean + dedup and tokenization per worker, scaling 1..N workers on both executors
(local processes and Ray), a projection for 1 TB on a cluster, and the loader.

    python benchmarks/data.py                     # ~8 MB synthetic ko/en corpus, 1..cpu_count workers, local + ray
    python benchmarks/data.py --mb 64 --workers 1,2,4,8,16 --executors local
    python benchmarks/data.py --smoke             # tiny: checks the script runs

The corpus is synthetic but realistic: documents are random runs of paragraphs drawn from the embedded Korean and
English texts, so they pass the filters and are not duplicates of each other; it is written as `--files` files per
stream, because a clean task is one input file. Each row runs the real stages of `ftlm.data.pipeline.run` on the
executor (clean -> pairs -> clusters -> tokenize -> merge) with a 32k-token tokenizer trained once beforehand, after
the workers have started and imported everything (start-up is reported apart). "clean+dedup" is the clean, pairs and
clusters stages; "tokenize" is the tokenize stage and the merge of the shard indexes.

The loader row is `build_train_loader` packing 2048-token rows from the shards in the main process; the target is
10x what gpt_1_3b consumes on one H100 (about 30,000 tokens/s), i.e. 300,000 tokens/s.
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
ENCODE_TARGET = 10  # MB/s of input per tokenize worker (issue 15)
CORES_PER_NODE = 64  # for the cluster projection: a typical CPU node
PROJECT_TB, PROJECT_NODES = 1.0, 16


def synthetic_corpus(out: Path, megabytes: float, files: int, seed: int = 0) -> dict[str, list[Path]]:
    from ftlm.data import corpus

    rng = random.Random(seed)
    pools = {
        "ko": [p for d in corpus.korean_documents() for p in d["text"].split("\n") if len(p) > 40],
        "en": [p for d in corpus.english_documents() for p in d["text"].split("\n\n") if len(p) > 80],
    }
    paths: dict[str, list[Path]] = {}
    for stream, paragraphs in pools.items():
        budget = megabytes * 0.5 * 1e6 / files
        paths[stream] = []
        for k in range(files):
            path = out / stream / f"part{k:03d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            with open(path, "w", encoding="utf-8") as f:
                while written < budget:
                    text = "\n".join(rng.sample(paragraphs, rng.randint(4, 10)))
                    line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                    f.write(line)
                    written += len(line.encode("utf-8"))
            paths[stream].append(path)
    return paths


def config(
    sources: dict[str, list[Path]],
    workers: int,
    vocab: int,
    tokenizer: str | None = None,
    task_bytes: int | None = None,
) -> dict:
    from ftlm.data.config import preset

    cfg = preset("custom")
    cfg.update(num_workers=workers, sources={s: [str(p) for p in ps] for s, ps in sources.items()})
    if task_bytes is not None:
        cfg["task_bytes"] = task_bytes
    cfg["clean"]["min_words"] = 10
    cfg["tokenizer"].update(vocab_size=vocab, sample_chars=2_000_000, path=tokenizer)
    return cfg


def run_stages(cfg: dict, executor_name: str, workers: int, work: Path) -> dict:
    from ftlm.data import pipeline
    from ftlm.data.executor import make_executor

    started = time.perf_counter()
    executor = make_executor(executor_name, workers)
    warm = [(i, cfg["tokenizer"]["path"]) for i in range(4 * workers)]
    list(executor.map(pipeline.warm_up, warm))  # every worker started, imported, its encoder built
    startup = time.perf_counter() - started
    try:
        t = time.perf_counter()
        result = pipeline.run(cfg, list(cfg["sources"]), str(work), pipeline.given_tokenizer(cfg), executor=executor)
        total = time.perf_counter() - t
    finally:
        executor.close()
    streams = result["streams"].values()
    timings = result["timings"]
    return {
        "executor": executor_name,
        "workers": executor.workers,
        "startup_s": startup,
        "total_s": total,
        "docs": sum(s["docs_in"] for s in streams),
        "bytes": sum(s["bytes_in"] for s in streams),
        "tokens": sum(s["tokens"] for s in streams),
        "clean_s": timings["clean_dedup_s"],
        "tokenize_s": timings["tokenize_shard_s"],
        "execution": result["execution"],
        # CPU seconds the tasks themselves used: per-worker rates that other load on the machine does not skew
        "clean_cpu_s": sum(result["execution"][k]["cpu_s"] for k in ("clean", "pairs", "clusters")),
        "tokenize_cpu_s": result["execution"]["tokenize"]["cpu_s"],
    }


def zipf_texts(megabytes: float, seed: int = 0, vocabulary: int = 300_000) -> list[str]:
    """Korean-like text with a realistic share of new words: words drawn by Zipf's law (exponent 1.05) from a large
    vocabulary of random Hangul stems (1-4 syllables, a particle on most), so that a word table keeps missing, as it
    does on real web text (the embedded corpus repeats a few paragraphs, which flatters the table)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 5, size=vocabulary)
    syllables = rng.integers(0xAC00, 0xD7A4, size=int(lengths.sum()))
    stems, at = [], 0
    for n in lengths.tolist():
        stems.append("".join(map(chr, syllables[at : at + n].tolist())))
        at += n
    particles = ["", "은", "는", "이", "가", "을", "를", "의", "에", "에서", "으로", "와", "도", "만", "까지"]
    texts, size = [], 0
    while size < megabytes * 1e6:
        ranks = rng.zipf(1.05, size=int(rng.integers(200, 600)))
        ranks = ranks[ranks <= vocabulary] - 1
        words = [stems[r] + particles[r % len(particles)] for r in ranks.tolist()]
        for i in range(11, len(words), 12):
            words[i] += "." if i % 36 else ".\n"
        text = " ".join(words)
        texts.append(text)
        size += len(text.encode("utf-8"))
    return texts


def encoder_rows(tokenizer_path: str, corpora: dict[str, list[str]]) -> list[dict]:
    """The tokenize stage's encoder (ftlm/data/encode.py, a table of units) vs the tokenizers library's batch encode,
    one core each, the table starting empty; the ids are checked equal."""
    import numpy as np

    from ftlm.data import pipeline
    from ftlm.data.encode import FastEncoder

    tokenizer = pipeline._tokenizer(tokenizer_path)  # as a tokenize worker has it (no redundant NFC)
    rows = []
    for name, texts in corpora.items():
        chunks = [texts[i : i + pipeline.CHUNK_DOCS] for i in range(0, len(texts), pipeline.CHUNK_DOCS)]
        t = time.process_time()
        theirs = [e.ids for c in chunks for e in tokenizer.backend.encode_batch(c, add_special_tokens=False)]
        library_s = time.process_time() - t
        encoder = FastEncoder(tokenizer)
        t = time.process_time()
        ours = [ids for c in chunks for ids in encoder.encode_batch(c)]
        fast_s = time.process_time() - t
        assert all(np.array_equal(a, b) for a, b in zip(ours, theirs)), f"{name}: ids differ from the library's"
        mb = sum(len(x.encode("utf-8")) for x in texts) / 1e6
        stats = encoder.stats
        rows.append(
            {
                "corpus": name,
                "mb": mb,
                "library": mb / library_s,
                "fast": mb / fast_s,
                "miss": stats["unit_misses"] / max(stats["units"], 1),
                "fallback": stats["fallback_texts"] / max(stats["texts"], 1),
            }
        )
    return rows


def loader_throughput(cfg: dict, seq_len: int, micro_batch: int, batches: int) -> float:
    from ftlm.data.stream import build_train_loader

    loader = build_train_loader(cfg, seq_len, micro_batch, 0, 1, seed=0)
    next(loader)
    started = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * micro_batch * (seq_len + 1) / (time.perf_counter() - started)


def projection(rows: list[dict]) -> str:
    """1 TB on a 16-node cluster from the measured per-worker rates and the measured scaling efficiency."""
    one = [r for r in rows if r["workers"] == 1]
    if not one:
        return "projection: needs a 1-worker row"
    one = one[0]
    clean_mb = one["bytes"] / 1e6 / one["clean_s"]  # MB/s of one worker
    token_mb = one["bytes"] / 1e6 / one["tokenize_s"]
    most = max(rows, key=lambda r: r["workers"])
    eff = (one["clean_s"] + one["tokenize_s"]) / (most["clean_s"] + most["tokenize_s"]) / most["workers"]
    cores = PROJECT_NODES * CORES_PER_NODE
    per_core = 1 / (1 / clean_mb + 1 / token_mb)  # both passes, MB of input per second per core
    seconds = PROJECT_TB * 1e6 / (per_core * cores * min(eff, 1.0))
    return (
        f"projection: {PROJECT_TB:g} TB on {PROJECT_NODES} nodes x {CORES_PER_NODE} cores = {cores} workers at "
        f"{clean_mb:.1f} MB/s (clean+dedup) and {token_mb:.1f} MB/s (tokenize) per worker, scaling efficiency "
        f"{eff:.2f} (measured at {most['workers']} workers, {most['executor']}): {seconds / 3600:.2f} h "
        f"(+ the tokenizer training, in one process, on data.tokenizer.sample_chars characters)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=8.0, help="synthetic corpus size in megabytes (both streams)")
    parser.add_argument("--files", type=int, default=8, help="files per stream (a clean task is one file)")
    parser.add_argument("--workers", default=None, help="comma-separated worker counts (default 1..cpu_count)")
    parser.add_argument("--executors", default="local,ray", help="comma-separated: local, ray")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument(
        "--task-bytes", type=int, default=None, help="data.task_bytes: a bigger file is cleaned by several tasks"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.mb, args.vocab, args.files = 0.5, 2000, 2
    counts = [int(w) for w in args.workers.split(",")] if args.workers else list(range(1, (os.cpu_count() or 1) + 1))
    executors = [e for e in args.executors.split(",") if e]
    if "ray" in executors:
        try:
            import ray  # noqa: F401
        except ImportError:
            print("ray is not installed: skipping the ray rows (pip install 'ftlm[ray]')")
            executors.remove("ray")

    import logging

    logging.basicConfig(level=logging.WARNING)
    from ftlm.data.prepare import prepare

    work = Path(tempfile.mkdtemp(prefix="ftlm-bench-data-"))
    try:
        sources = synthetic_corpus(work / "raw", args.mb, args.files)
        base = config(sources, counts[0], args.vocab)
        base["out_dir"] = str(work / "prepared")
        t = time.perf_counter()
        prepared = prepare(base)  # full pipeline once: the tokenizer and the shards the loader reads
        full_s = time.perf_counter() - t
        rows = []
        for name in executors:
            for n in counts:
                cfg = config(sources, n, args.vocab, prepared.tokenizer_path, args.task_bytes)
                rows.append(run_stages(cfg, name, n, work / f"{name}{n}"))
                shutil.rmtree(work / f"{name}{n}", ignore_errors=True)
        synthetic = [json.loads(line)["text"] for ps in sources.values() for p in ps for line in open(p)]
        encoders = encoder_rows(prepared.tokenizer_path, {"synthetic": synthetic, "zipf": zipf_texts(args.mb / 2)})
        loader_cfg = dict(base, out_dir=str(work / "prepared"), cache_dir=str(work / "cache"))
        loader_tps = loader_throughput(loader_cfg, 2048, 8, 4 if args.smoke else 100)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mb = rows[0]["bytes"] / 1e6
    print(
        f"\ndata pipeline on {os.cpu_count()} CPU core(s): {rows[0]['docs']:,} documents, {mb:.1f} MB in "
        f"{2 * args.files} files, {rows[0]['tokens']:,} tokens (vocab {args.vocab}); full prepare with "
        f"{counts[0]} worker(s): {full_s:.1f}s"
    )
    header = (
        f"{'executor':>8} {'workers':>7} {'clean+dedup MB/s':>16} {'MB/s/worker':>11} {'tokenize MB/s':>13} "
        f"{'MB/s/worker':>11} {'speed-up':>8} {'efficiency':>10} {'start-up s':>10} {'clean MB/cpu-s':>14} "
        f"{'tokenize MB/cpu-s':>17}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        base_row = next(b for b in rows if b["executor"] == r["executor"])
        c_mbs, t_mbs = r["bytes"] / 1e6 / r["clean_s"], r["bytes"] / 1e6 / r["tokenize_s"]
        speedup = (base_row["clean_s"] + base_row["tokenize_s"]) / (r["clean_s"] + r["tokenize_s"])
        print(
            f"{r['executor']:>8} {r['workers']:>7} {c_mbs:>16.2f} {c_mbs / r['workers']:>11.2f} {t_mbs:>13.2f} "
            f"{t_mbs / r['workers']:>11.2f} {speedup:>8.2f} {speedup / (r['workers'] / base_row['workers']):>10.2f} "
            f"{r['startup_s']:>10.2f} {r['bytes'] / 1e6 / r['clean_cpu_s']:>14.2f} "
            f"{r['bytes'] / 1e6 / r['tokenize_cpu_s']:>17.2f}"
        )
    for name in executors:
        print(projection([r for r in rows if r["executor"] == name]))
    print(f"\ntokenize encoder, one core, MB/cpu-s (target {ENCODE_TARGET} MB/s per worker), ids checked equal")
    header = f"{'corpus':>10} {'MB':>6} {'library':>8} {'ftlm':>8} {'speed-up':>8} {'unit misses':>11} "
    header += f"{'library texts':>13}"
    print(header)
    print("-" * len(header))
    for r in encoders:
        print(
            f"{r['corpus']:>10} {r['mb']:>6.1f} {r['library']:>8.2f} {r['fast']:>8.2f} "
            f"{r['fast'] / r['library']:>8.2f} {r['miss']:>11.3f} {r['fallback']:>13.3f}"
        )
    verdict = "OK" if loader_tps >= LOADER_TARGET else "BELOW TARGET"
    print(
        f"\nstreaming loader (seq 2048, micro-batch 8, one rank, main process): {loader_tps:,.0f} tokens/s "
        f"vs target {LOADER_TARGET:,} ({loader_tps / LOADER_TARGET:.1f}x) {verdict}"
    )


if __name__ == "__main__":
    main()
