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

import importlib as _importlib
import os as _os
import sys as _sys
import types as _types


class _OnFirstUse(_types.ModuleType):
    """Stands in for one of mosaicml-streaming's example-dataset subpackages until one of its names is used, then
    imports the real one (which replaces it). Dunder probes (inspect and friends look at every module's __file__)
    never trigger that; its __path__ is the real folder, so its submodules import as usual."""

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        if _sys.modules.get(self.__name__) is self:
            del _sys.modules[self.__name__]
        real = _importlib.import_module(self.__name__)  # also rebinds streaming.<name> to it
        return getattr(real, attr)


def _defer_streaming_examples() -> None:
    """`import streaming` runs its package __init__, which imports its example datasets (C4 through transformers'
    AutoTokenizer, vision, multimodal): about 3 s in every process that reads or writes shards, for code ftlm never
    calls. Those three subpackages are imported on first use instead. Done only while streaming is not imported yet."""
    if "streaming" in _sys.modules:
        return
    from importlib.util import find_spec

    spec = find_spec("streaming")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        return
    root = list(spec.submodule_search_locations)[0]
    for short in ("text", "vision", "multimodal"):
        stub = _OnFirstUse(f"streaming.{short}")
        stub.__path__ = [_os.path.join(root, short)]
        _sys.modules.setdefault(stub.__name__, stub)


_defer_streaming_examples()
