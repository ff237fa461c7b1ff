"""`lmforge serve --rag DIR` in-process (FastAPI's TestClient, tiny random GPT and BERT, an index built
here): POST /v1/rag/query answers what `lmforge.rag.answer_question` answers (greedy), retrieval-only
queries give `RagIndex.search`'s hits, and bad requests are the server's OpenAI-shaped errors."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from serve_helpers import make_bert_ckpt, make_gpt_ckpt

from lmforge.errors import UserError
from lmforge.rag import RagIndex, answer_question, build_index
from lmforge.serve.app import create_app
from lmforge.serve.protocol import ServeOptions
from lmforge.serve.server import check_options
from lmforge.train.checkpoint import load_pretrained

DOCS = {"hamlet.txt": "The king is dead. Long live the king. Hamlet saw the ghost on the wall.\n\n"
                      "Ophelia sang by the river. The queen wept for her.",
        "macbeth.txt": "Macbeth met three witches on the heath. They hailed him king. Lady Macbeth washed her hands."}
QUESTION = "who met the witches?"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_rag")
    gpt, bert = make_gpt_ckpt(root, block_size=256), make_bert_ckpt(root)
    docs = root / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text)
    build_index([docs], bert, root / "index", size=16, overlap=4)
    return {"gpt": gpt, "bert": bert, "index": root / "index"}


def app_client(ckpt, **options):
    model, tokenizer = load_pretrained(ckpt)
    return TestClient(create_app(ServeOptions(ckpt=str(ckpt), **options), model=model, tokenizer=tokenizer))


@pytest.fixture(scope="module")
def client(setup):
    with app_client(setup["gpt"], rag=str(setup["index"])) as c:
        yield c


def post(client, body):
    return client.post("/v1/rag/query", content=json.dumps(body), headers={"Content-Type": "application/json"})


def test_answer_is_answer_questions(client, setup):
    r = post(client, {"question": QUESTION, "k": 3, "mode": "hybrid", "max_tokens": 12})
    assert r.status_code == 200, r.text
    expected = answer_question(RagIndex.open(setup["index"]), QUESTION, setup["gpt"], k=3, mode="hybrid",
                               max_new_tokens=12)
    assert r.json() == json.loads(json.dumps(expected))
    assert r.json()["citations"] and r.json()["hits"][0]["source"].endswith("macbeth.txt")


@pytest.mark.parametrize("mode", ["dense", "bm25", "hybrid"])
def test_retrieval_only_gives_the_index_hits(client, setup, mode):
    r = post(client, {"question": QUESTION, "k": 4, "mode": mode, "answer": False})
    assert r.status_code == 200, r.text
    hits = RagIndex.open(setup["index"]).search(QUESTION, 4, mode=mode)
    assert r.json() == {"question": QUESTION, "mode": mode, "hits": json.loads(json.dumps([h.to_dict() for h in hits]))}


@pytest.mark.parametrize(("body", "param", "words"), [
    ({}, "question", "must be a non-empty string"),
    ({"question": "  "}, "question", "must be a non-empty string"),
    ({"question": 7}, "question", "must be a non-empty string"),
    ({"question": "q", "k": 0}, "k", "between 1 and 100"),
    ({"question": "q", "k": "3"}, "k", "must be an integer"),
    ({"question": "q", "mode": "sparse"}, "mode", "must be one of dense, bm25, hybrid"),
    ({"question": "q", "answer": "yes"}, "answer", "must be true or false"),
    ({"question": "q", "max_tokens": 256}, "max_tokens", "below the model's context of 256"),
    ({"question": "q" * 300}, "question", "the question is"),
])
def test_bad_requests_are_400s(client, body, param, words):
    r = post(client, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"


def test_without_rag_the_route_is_404(setup):
    with app_client(setup["gpt"]) as c:
        r = post(c, {"question": QUESTION})
    assert r.status_code == 404 and r.json()["error"]["code"] == "rag_not_enabled"
    assert "--rag DIR" in r.json()["error"]["message"]


def test_an_encoder_server_retrieves_but_does_not_answer(setup):
    with app_client(setup["bert"], rag=str(setup["index"])) as c:
        retrieved = post(c, {"question": QUESTION, "answer": False})
        answered = post(c, {"question": QUESTION})
    assert retrieved.status_code == 200 and len(retrieved.json()["hits"]) == 5
    assert answered.status_code == 400 and answered.json()["error"]["param"] == "answer"


def test_a_missing_index_fails_before_serving(setup, tmp_path):
    with pytest.raises(UserError, match="--rag .*: not a RAG index"):
        check_options(ServeOptions(ckpt=str(setup["gpt"]), rag=str(tmp_path)))


def prompt_tokens_served(client) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    return sum(s.value for s in families["lmforge:prompt_tokens"].samples if s.name.endswith("_total"))


def test_the_answer_is_generated_by_the_scheduler(client):
    before = prompt_tokens_served(client)
    r = post(client, {"question": "who wept?", "k": 2, "max_tokens": 5, "temperature": 0.7, "seed": 3})
    assert r.status_code == 200, r.text
    assert prompt_tokens_served(client) - before == r.json()["prompt_tokens"]  # it went through the engine
    assert r.json() == post(client, {"question": "who wept?", "k": 2, "max_tokens": 5, "temperature": 0.7,
                                     "seed": 3}).json()  # seeded: the same answer again


def test_the_route_needs_the_servers_key(setup):
    with app_client(setup["gpt"], rag=str(setup["index"]), api_key="sesame") as c:
        refused = post(c, {"question": QUESTION, "answer": False})
        allowed = c.post("/v1/rag/query", content=json.dumps({"question": QUESTION, "answer": False}),
                         headers={"Content-Type": "application/json", "Authorization": "Bearer sesame"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert allowed.status_code == 200 and allowed.json()["hits"]
