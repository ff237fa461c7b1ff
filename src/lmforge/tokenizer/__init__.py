"""Tokenizers: train (bpe/char/wordpiece/unigram), load/encode/decode, batch (the collator), the chat
format, and encode corpora into token shards."""

from lmforge.tokenizer.chat import encode_chat
from lmforge.tokenizer.shards import load_split, read_meta, tokenize_corpus
from lmforge.tokenizer.tok import BOS, CHAT_TOKENS, EOS, PAD, SPECIAL_TOKENS, Tokenizer, pad_ids
from lmforge.tokenizer.train import train_tokenizer

__all__ = [
    "BOS", "CHAT_TOKENS", "EOS", "PAD", "SPECIAL_TOKENS", "Tokenizer",
    "encode_chat", "load_split", "pad_ids", "read_meta", "tokenize_corpus", "train_tokenizer",
]
