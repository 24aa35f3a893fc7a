"""The data path: raw text files -> clean, deduplicated, tokenized MDS shards -> packed, mixed training batches.

    sources.py    reading .jsonl/.txt/.parquet (+ .gz/.zst) into documents; bad input counted with file:line
    corpus.py     the embedded default corpus (konlpy's Korean law texts, CPython's pydoc topics)
    clean.py      Unicode normalisation and Gopher-style quality filters
    dedup.py      exact and MinHash-LSH near-duplicate removal
    tokenizer.py  byte-level BPE: train, reuse, extend; the `Tokenizer` the trainer uses
    shards.py     on-disk layout and the MDS shard writer
    prepare.py    `ftlm-prepare`: the whole preparation, its report and stats.json
    stream.py     `build_train_loader` / `build_val_loaders`: streaming, mixing, packing, exact resumption
    checks.py     validation of the `data.*` config before any work

Submodules are imported on use, so `import ftlm.data` stays cheap (no torch, no streaming).
"""
