"""Continued pretraining of existing models: Hugging Face <-> ftlm conversion, ftlm-import, vocabulary growth,
staged freezing.

    convert.py   config and state-dict mapping both ways (LlamaForCausalLM, MistralForCausalLM, GPTNeoXForCausalLM)
    importer.py  ftlm-import, and load_pretrained(path) for trainer.init_from
    vocab.py     resize_vocab: rows for new tokens (model.new_token_init), padded to a multiple of 64
    freeze.py    trainer.train_only = embeddings | new_rows: frozen weights kept bit-identical, also under ZeRO-3
"""

from .convert import (
    SUPPORTED_ARCHITECTURES,
    HFConversionError,
    HFExportError,
    config_from_hf,
    from_hf_state_dict,
    hf_config,
    hf_family,
    to_hf_state_dict,
)
from .freeze import TRAIN_ONLY, FrozenWeights, freeze_mask
from .importer import HFImportError, import_model, inspect, is_hf_dir, load_pretrained
from .vocab import INITS, VOCAB_MULTIPLE, resize_vocab, subtoken_ids

__all__ = [
    "INITS",
    "SUPPORTED_ARCHITECTURES",
    "TRAIN_ONLY",
    "VOCAB_MULTIPLE",
    "FrozenWeights",
    "HFConversionError",
    "HFExportError",
    "HFImportError",
    "config_from_hf",
    "freeze_mask",
    "from_hf_state_dict",
    "hf_config",
    "hf_family",
    "import_model",
    "inspect",
    "is_hf_dir",
    "load_pretrained",
    "resize_vocab",
    "subtoken_ids",
    "to_hf_state_dict",
]
