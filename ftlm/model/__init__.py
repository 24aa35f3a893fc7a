from ftlm.model.gpt import GPT, ConfigError, GPTConfig, KVCache

__all__ = ["GPT", "GPTConfig", "ConfigError", "KVCache"]
