"""Loads ftlm._text (csrc/text/text_ops.cpp), the C++ versions of the data preparation's per-character work: the
quality rules (`clean.QualityFilter`), MinHash signatures (`minhash.signatures`), the exact keys' canonical text
(`dedup`), and the tokenize stage's table of units and byte-level BPE (`encode.FastEncoder`).

The numpy versions beside them stay the reference and the fallback: same decisions and bit-identical signatures
(tests/data/test_native.py), so a preparation does not depend on whether the extension was built, only its speed does.
Without it, one warning names the build command. `FTLM_NATIVE_TEXT=0` turns it off (to compare, or to rule it out).
"""

from __future__ import annotations

import logging
import os

import numpy as np

log = logging.getLogger(__name__)
_UNSET = object()
_module = _UNSET


def text_ops(wanted: bool | None = None):
    """The ftlm._text module, or None for the numpy path. wanted=None: use it when built (and not switched off);
    True: it must be there; False: never."""
    global _module
    if wanted is False:
        return None
    if _module is _UNSET:
        if os.environ.get("FTLM_NATIVE_TEXT", "1") == "0":
            _module = None
        else:
            try:
                from ftlm import _text

                _module = _text
            except ImportError as e:
                _module = None
                log.warning(
                    "ftlm._text is not built (%s): data preparation uses its numpy / Python paths, same results, "
                    "about 4x slower. Build it with `pip install --no-build-isolation -e .`.",
                    e,
                )
    if wanted and _module is None:
        raise RuntimeError(
            "ftlm._text is needed here but missing or off (FTLM_NATIVE_TEXT=0); build it with "
            "`pip install --no-build-isolation -e .`"
        )
    return _module


def code_points(texts) -> tuple[np.ndarray, np.ndarray]:
    """(C,) uint32 code points of the texts one after another, and (D+1,) int64 offsets: text d is [off[d], off[d+1])
    (one code point per str index: lone surrogates are kept, as str keeps them)."""
    codes = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)), out=offsets[1:])
    return codes, offsets
