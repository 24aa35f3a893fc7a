"""The data path: raw text files -> clean, deduplicated, tokenized MDS shards -> packed, mixed training batches.

    sources.py    reading .jsonl/.txt/.parquet (+ .gz/.zst) into documents; bad input counted with file:line
    corpus.py     the embedded default corpus (konlpy's Korean law texts, CPython's pydoc topics)
    clean.py      Unicode normalisation and Gopher-style quality filters
    dedup.py      exact and MinHash-LSH near-duplicate removal
    tokenizer.py  byte-level BPE: train, reuse, extend; the `Tokenizer` the trainer uses
    pipeline.py   the preparation's stages (read -> clean -> dedup, tokenizer, tokenize -> shards)
    layout.py     where preparations live on disk (one folder per fingerprint), verification, reader locks
    shards.py     the MDS shard writer and per-split counts
    prepare.py    `ftlm-prepare`: checks, fingerprint, atomic publishing, reuse, --gc / --rebuild, the report
    packing.py    documents into rows: concat or best-fit-decreasing
    batch.py      `Batch`: inputs, targets, positions, cu_seqlens (what every loader yields)
    stream.py     `build_train_loader` / `build_val_loaders`: streaming, mixing, packing, exact resumption
    config.py     `DataConfig`, the typed schema of conf/data
    checks.py     validation of the `data.*` config before any work

Submodules are imported on use, so `import ftlm.data` stays cheap (no torch, no streaming).
"""
