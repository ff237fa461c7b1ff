"""The one collator: `Tokenizer.__call__` / `pad` / `pad_ids` against transformers' tokenizers.

A converted HF tokenizer (BERT's [CLS]/[SEP], GPT-2's byte-level BPE with no special tokens)
must give what `transformers` gives for the same tokenizer: single texts, pairs, truncation at
every length, padding on both sides. lmforge's own tokenizers wrap texts as the mlm objective
trains: `<|bos|> A <|eos|> B <|eos|>`, segment 1 from B on.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, processors

from lmforge.tokenizer import Tokenizer, pad_ids

transformers = pytest.importorskip("transformers")

WORDS = "the cat sat on a mat dog ran far away to be or not that is question ##s ##ing".split()
TEXTS = ["the cat sat on a mat", "a dog", "the cat", "a dog ran far away to", "the cat sat", "a dog ran", "", "cats"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """(transformers' BertTokenizerFast from a local vocabulary, ours loaded from its tokenizer.json)."""
    out = tmp_path_factory.mktemp("bert")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    hf = transformers.BertTokenizerFast(vocab=vocab)
    hf.save_pretrained(out)
    return hf, Tokenizer.load(out)


def assert_same(ours: dict, theirs, keys=("input_ids", "attention_mask", "token_type_ids")) -> None:
    for key in keys:
        a, b = ours[key], theirs[key]
        if isinstance(b, torch.Tensor):
            assert torch.equal(a, b), (key, a, b)
        else:
            assert a == b, (key, a, b)


def test_bert_single_texts_and_pairs_match_transformers_at_every_truncation(bert):
    hf, tok = bert
    assert tok("the cat", "a dog ran")["input_ids"] == [2, 5, 6, 3, 9, 11, 12, 3]  # [CLS] A [SEP] B [SEP]
    assert_same(tok("the cat", "a dog ran"), hf("the cat", "a dog ran"))
    for max_length in range(3, 12):
        for a in TEXTS:
            assert_same(tok(a, truncation=True, max_length=max_length), hf(a, truncation=True, max_length=max_length))
        # (lists: transformers takes a single empty str text_pair for "no pair")
        for a, b in itertools.product(TEXTS, TEXTS):
            assert_same(tok([a], [b], truncation=True, max_length=max_length),
                        hf([a], [b], truncation=True, max_length=max_length))
    assert_same(tok(TEXTS, add_special_tokens=False), hf(TEXTS, add_special_tokens=False))


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("options", [{"padding": True}, {"padding": "longest", "truncation": True, "max_length": 5},
                                     {"padding": "max_length", "max_length": 16}])
def test_bert_padded_batches_match_transformers(bert, side, options):
    hf, tok = bert
    for pair in (None, TEXTS[::-1]):
        ours = tok(TEXTS, pair, padding_side=side, return_tensors="pt", **options)
        theirs = hf(TEXTS, pair, padding_side=side, return_tensors="pt", **options)
        assert_same(ours, theirs)
        assert ours["input_ids"].dtype == torch.long


def test_pad_matches_transformers_pad(bert):
    hf, tok = bert
    rows = [[5, 6, 7], [8], np.array([9, 10]), torch.tensor([11, 12, 13, 14])]
    as_lists = [list(map(int, r)) for r in rows]
    for side in ("right", "left"):
        ours = tok.pad(rows, padding_side=side, return_tensors="pt")
        assert_same(ours, hf.pad({"input_ids": as_lists}, padding_side=side, return_tensors="pt"),
                    keys=("input_ids", "attention_mask"))
    wide = tok.pad(rows, padding="max_length", max_length=6)
    assert wide["input_ids"][1] == [8, 0, 0, 0, 0, 0] and wide["attention_mask"][1] == [1, 0, 0, 0, 0, 0]
    labels = pad_ids(as_lists, -100, return_tensors="np")["input_ids"]
    assert labels.tolist()[1] == [8, -100, -100, -100] and labels.dtype == np.int64
    assert tok.pad(rows, padding=False)["input_ids"] == as_lists  # nothing to pad: rows as given
    assert pad_ids([], 0) == {"input_ids": [], "attention_mask": []}


def test_gpt2_style_tokenizer_adds_nothing_as_in_transformers(tmp_path):
    """A byte-level BPE with no special-token post-processor (GPT-2's): no [CLS]/[SEP] anywhere."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"],
                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TEXTS * 4, trainer)
    backend.save(str(tmp_path / "tokenizer.json"))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), pad_token="<pad>")
    tok = Tokenizer.load(tmp_path)
    assert tok.special_template is None and tok.num_special_tokens_to_add(pair=True) == 0
    assert tok("the cat")["input_ids"] == tok.encode("the cat")
    assert_same(tok(TEXTS, padding=True, return_tensors="pt"), hf(TEXTS, padding=True, return_tensors="pt"),
                keys=("input_ids", "attention_mask"))
    for max_length in range(1, 8):
        assert_same(tok(TEXTS, TEXTS[::-1], truncation=True, max_length=max_length),
                    hf(TEXTS, TEXTS[::-1], truncation=True, max_length=max_length),
                    keys=("input_ids", "attention_mask"))
