"""lmforge: an end-to-end large-language-model training stack (data → tokenizer → pretrain → eval → serve)."""

__version__ = "0.1.0"
