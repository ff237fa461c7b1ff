"""Eval runners on a tiny random GPT: log-likelihoods equal direct sums of token log-probs, and end to end."""

from __future__ import annotations

import json
import math

import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from eval_helpers import direct_logprob, make_checkpoint, write_task

from lmforge.errors import UserError
from lmforge.eval import evaluate, scoring
from lmforge.eval import metrics as M
from lmforge.eval.runners import DEFAULT_TEMPLATES


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("evalckpt"))


MC_ITEMS = [
    {"context": "KING:\nthe king my lord shall", "choices": [" speak of love", " rise", " tell me what thou art"],
     "gold": 0},
    {"context": "", "choices": ["ROMEO:\n", "JULIET:\n"], "gold": 1},
    {"context": "i pray thee tell me ", "choices": ["what thou art", "good sir", "death upon this night"], "gold": 2},
    # a long context: the request is cut from the left to the model's context
    {"context": "the king my lord shall speak of love and death upon this night " * 8, "choices": ["good", "sir"],
     "gold": 0},
]


def test_loglikelihood_equals_direct_sum_of_token_logprobs(ckpt):
    _, model, tok = ckpt
    requests = [scoring.encode_pair(tok, item["context"], c) for item in MC_ITEMS for c in item["choices"]]
    batched = scoring.loglikelihoods(model, requests, batch_size=3, progress=False)
    block = model.config.block_size
    for (context, continuation), got in zip(requests, batched):
        ids = context + continuation
        assert context[0] == tok.eos_id  # every text starts as a document does in training
        # the reference: one unpadded forward over the last block_size + 1 tokens
        expected = direct_logprob(model, ids[-(block + 1):], len(continuation))
        assert got.logprob == pytest.approx(expected, abs=1e-4)
        assert got.tokens == len(continuation)
    assert any(len(c) + len(k) > block + 1 for c, k in requests)  # the truncation path was exercised


def test_encode_pair_tokenizes_like_running_text(ckpt):
    _, _, tok = ckpt
    context, continuation = scoring.encode_pair(tok, "Question: is it so?\nAnswer: ", "yes")
    # the context's trailing space moves to the continuation: " yes" is one word, as in running text
    assert tok.decode(continuation) == " yes"
    assert context[1:] + continuation == tok.encode("Question: is it so?\nAnswer: yes")


def test_multiple_choice_acc_and_acc_norm_from_direct_logprobs(ckpt, tmp_path):
    ckpt_dir, model, tok = ckpt
    task = write_task(tmp_path / "mc.jsonl", MC_ITEMS[:3], {"kind": "multiple_choice", "split": "test"})
    out = evaluate(ckpt_dir, [task], tmp_path / "out", progress=False)
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    correct = correct_norm = 0
    for item, pred in zip(MC_ITEMS, result["predictions"]):
        lls = []
        for choice in item["choices"]:
            context, cont = scoring.encode_pair(tok, item["context"], choice)
            lls.append(direct_logprob(model, context + cont, len(cont)))
        assert pred["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
        best = max(range(len(lls)), key=lambda j: lls[j])
        best_norm = max(range(len(lls)), key=lambda j: lls[j] / len(item["choices"][j].encode()))
        assert (pred["pred"], pred["pred_norm"]) == (best, best_norm)
        correct += best == item["gold"]
        correct_norm += best_norm == item["gold"]
    m = result["metrics"]
    assert (m["acc"], m["acc_norm"]) == pytest.approx((correct / 3, correct_norm / 3))
    assert m["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert result["split"] == "test" and out["tasks"][0]["split"] == "test"
    assert (tmp_path / "out" / "report.md").read_text().count("split read: **test**") == 1


def test_rolling_nll_equals_direct_cross_entropy(ckpt):
    _, model, tok = ckpt
    block = model.config.block_size
    short = [tok.eos_id, *tok.encode("the king my lord shall speak")]
    long = [tok.eos_id, *tok.encode("good sir i pray thee tell me what thou art for now the sun doth rise " * 6)]
    assert len(short) <= block + 1 < len(long)
    got = scoring.rolling_nll(model, [short, long], batch_size=2, progress=False)
    # short: one forward
    with torch.no_grad():
        logits, _ = model(torch.tensor([short[:-1]]))
    expected = F.cross_entropy(logits[0].double(), torch.tensor(short[1:]), reduction="sum").item()
    assert got[0].tokens == len(short) - 1 and got[0].nats == pytest.approx(expected, abs=1e-3)
    # long, stride = block: disjoint windows [0, block], [block, 2 block], ... each token scored once
    total = 0.0
    for begin in range(0, len(long) - 1, block):
        window = long[begin:begin + block + 1]
        with torch.no_grad():
            logits, _ = model(torch.tensor([window[:-1]]))
        total += F.cross_entropy(logits[0].double(), torch.tensor(window[1:]), reduction="sum").item()
    assert got[1].tokens == len(long) - 1 and got[1].nats == pytest.approx(total, abs=1e-3)
    # a smaller stride gives every token more context: still each token once
    strided = scoring.rolling_nll(model, [long], stride=block // 2, progress=False)
    assert strided[0].tokens == len(long) - 1


def test_perplexity_task_reports_loss_perplexity_and_bits_per_byte(ckpt, tmp_path):
    ckpt_dir, model, tok = ckpt
    texts = ["the king my lord shall speak of love", "good sir, i pray thee tell me what thou art — ünïcode"]
    task = write_task(tmp_path / "ppl.jsonl", [{"text": t} for t in texts], {"kind": "perplexity", "split": "val"})
    evaluate(ckpt_dir, [task], tmp_path / "out", progress=False)
    m = json.loads((tmp_path / "out" / "results.json").read_text())["metrics"]
    nats = tokens = 0
    for t in texts:
        ids = [tok.eos_id, *tok.encode(t)]
        nats -= direct_logprob(model, ids, len(ids) - 1)
        tokens += len(ids) - 1
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert m["tokens"] == tokens and m["bytes"] == n_bytes
    assert m["loss"] == pytest.approx(nats / tokens, abs=1e-4)
    assert m["perplexity"] == pytest.approx(math.exp(nats / tokens), rel=1e-4)
    assert m["bits_per_byte"] == pytest.approx(nats / (math.log(2) * n_bytes), abs=1e-4)


def test_binary_loglikelihood_mode_compares_yes_and_no(ckpt, tmp_path):
    ckpt_dir, model, tok = ckpt
    items = [{"question": f"Is {w} a word?", "answer": a} for w, a in
             [("king", "yes"), ("lord", "no"), ("night", "yes"), ("sun", "no"), ("love", "yes"), ("xyzzy", "no")]]
    task = write_task(tmp_path / "b.jsonl", items, {"kind": "binary", "split": "test"})
    evaluate(ckpt_dir, [task], tmp_path / "out", progress=False)
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    predicted = []
    for item, pred in zip(items, result["predictions"]):
        prompt = DEFAULT_TEMPLATES["binary"].format(question=item["question"])
        scores = {}
        for answer in ("yes", "no"):
            context, cont = scoring.encode_pair(tok, prompt, " " + answer)
            scores[answer] = direct_logprob(model, context + cont, len(cont))
        assert (pred["logprob_yes"], pred["logprob_no"]) == pytest.approx((scores["yes"], scores["no"]), abs=1e-4)
        predicted.append("yes" if scores["yes"] > scores["no"] else "no")
    assert [p["predicted"] for p in result["predictions"]] == predicted
    expected = M.binary_metrics([i["answer"] for i in items], predicted)
    for key in ("tp", "fp", "tn", "fn", "accuracy", "precision", "recall", "f1", "specificity"):
        assert result["metrics"][key] == pytest.approx(expected[key])
    assert result["metrics"]["unparsed"] == 0
    assert (tmp_path / "out" / "confusion_matrix.png").stat().st_size > 1000


def test_binary_generate_mode_counts_unparsed_replies_separately(ckpt, tmp_path, monkeypatch):
    ckpt_dir, _, _ = ckpt
    replies = ["Yes.", "no", "maybe", "", "yes, but no", "No!"]
    gold = ["yes", "yes", "no", "yes", "no", "no"]
    monkeypatch.setattr(scoring, "generate_replies", lambda *a, **k: list(replies))
    task = write_task(tmp_path / "b.jsonl", [{"question": f"q{i}?", "answer": g} for i, g in enumerate(gold)],
                      {"kind": "binary"})
    evaluate(ckpt_dir, [task], tmp_path / "out", answer_mode="generate", split="test", progress=False)
    m = json.loads((tmp_path / "out" / "results.json").read_text())["metrics"]
    # parsed: yes/yes (TP), no/yes (FN), no/no (TN); unparsed: maybe, "", "yes, but no"
    assert (m["tp"], m["fn"], m["tn"], m["fp"], m["unparsed"]) == (1, 1, 1, 0, 3)
    assert m["accuracy"] == pytest.approx(2 / 6)  # an unparsed reply is never counted as "no"
    assert m["recall"] == pytest.approx(1 / 3) and m["specificity"] == pytest.approx(1 / 3)
    assert m["answer_mode"] == "generate"


def test_binary_generate_mode_really_generates(ckpt, tmp_path):
    ckpt_dir, _, _ = ckpt
    task = write_task(tmp_path / "b.jsonl",
                      [{"question": "Is it?", "answer": "yes"}, {"question": "Or not?", "answer": "no"}],
                      {"kind": "binary", "split": "test"})
    evaluate(ckpt_dir, [task], tmp_path / "out", answer_mode="generate", progress=False)
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    for p in result["predictions"]:  # a random model does not say yes/no: each reply is read strictly
        assert p["predicted"] == M.parse_yes_no(p["reply"])


def test_classification_scores_each_label_by_loglikelihood(ckpt, tmp_path):
    ckpt_dir, model, tok = ckpt
    labels = ["king", "lord", "night"]
    items = [{"text": t, "label": lab} for t, lab in
             [("the king shall speak", "king"), ("my lord", "lord"), ("upon this night", "night"),
              ("good sir", "lord")]]
    task = write_task(tmp_path / "c.jsonl", items, {"kind": "classification", "labels": labels, "split": "test"})
    evaluate(ckpt_dir, [task], tmp_path / "out", progress=False)
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    predicted = []
    for item, pred in zip(items, result["predictions"]):
        prompt = DEFAULT_TEMPLATES["classification"].format(text=item["text"])
        scores = []
        for label in labels:
            context, cont = scoring.encode_pair(tok, prompt, " " + label)
            scores.append(direct_logprob(model, context + cont, len(cont)))
        assert [pred["scores"][lab] for lab in labels] == pytest.approx(scores, abs=1e-4)
        predicted.append(labels[max(range(3), key=lambda k: scores[k])])
    assert [p["predicted"] for p in result["predictions"]] == predicted
    expected = M.classification_metrics([i["label"] for i in items], predicted, labels)
    assert result["metrics"]["confusion_matrix"] == expected["confusion_matrix"]
    assert result["metrics"]["f1_macro"] == pytest.approx(expected["f1_macro"])
    assert (tmp_path / "out" / "confusion_matrix.png").is_file()


def test_generation_metrics_recomputed_from_the_written_predictions(ckpt, tmp_path):
    ckpt_dir, _, _ = ckpt
    items = [{"prompt": "KING:\nthe king my lord", "reference": "shall speak of love"},
             {"prompt": "ROMEO:\n", "references": ["good sir i pray thee", "tell me what thou art"]},
             {"prompt": "JULIET:\nfor now the sun", "reference": "doth rise upon this night"}]
    task = write_task(tmp_path / "g.jsonl", items, {"kind": "generation", "split": "test", "max_new_tokens": 8,
                                                    "stop": ["\n"]})
    evaluate(ckpt_dir, [task], tmp_path / "out", progress=False)
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    replies = [p["prediction"] for p in result["predictions"]]
    assert all("\n" not in r for r in replies)  # the stop string ends each reply
    refs = [p["references"] for p in result["predictions"]]
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(2)]
    m = result["metrics"]
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(replies, streams).score, abs=1e-9)
    assert m["chrf"] == pytest.approx(sacrebleu.corpus_chrf(replies, streams).score, abs=1e-9)
    rouge, _ = M.rouge_scores(replies, refs)
    assert m["rougeL"] == pytest.approx(rouge["rougeL"])


def test_eval_is_deterministic_with_a_seed_and_limit_takes_the_first_items(ckpt, tmp_path):
    ckpt_dir, _, _ = ckpt
    items = [{"prompt": p, "reference": "the king"} for p in ["KING:\n", "LEAR:\n", "ROMEO:\n", "JULIET:\n"]]
    task = write_task(tmp_path / "g.jsonl", items, {"kind": "generation", "max_new_tokens": 6})
    runs = []
    for name in ("a", "b"):
        evaluate(ckpt_dir, [task], tmp_path / name, limit=3, seed=5, split="test", progress=False)
        runs.append(json.loads((tmp_path / name / "results.json").read_text()))
    assert [p["prediction"] for p in runs[0]["predictions"]] == [p["prediction"] for p in runs[1]["predictions"]]
    assert runs[0]["metrics"] == runs[1]["metrics"]
    assert [p["line"] for p in runs[0]["predictions"]] == [2, 3, 4]  # after the header line
    assert runs[0]["items_in_file"] == 4 and runs[0]["metrics"]["n"] == 3


def test_qa_exact_match_and_f1_of_generated_answers(ckpt, tmp_path, monkeypatch):
    ckpt_dir, _, _ = ckpt
    seen = {}

    def fake_replies(model, tokenizer, prompts, max_new_tokens, stop, **kwargs):
        seen["prompts"], seen["stop"] = list(prompts), stop
        return [" Denver Broncos\n", "the Panthers", "no idea"]

    monkeypatch.setattr(scoring, "generate_replies", fake_replies)
    items = [{"question": "Who won?", "answers": ["Denver Broncos", "Broncos"], "context": "The Broncos won."},
             {"question": "Who lost?", "answer": "Carolina Panthers"},
             {"question": "Where?", "answer": "Santa Clara"}]
    task = write_task(tmp_path / "qa.jsonl", items, {"kind": "qa", "split": "test"})
    evaluate(ckpt_dir, [task], tmp_path / "out", progress=False)
    m = json.loads((tmp_path / "out" / "results.json").read_text())["metrics"]
    assert m["exact_match"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)  # "Panthers" vs "Carolina Panthers": P 1, R 1/2
    assert seen["prompts"][0] == "The Broncos won.\n\nQuestion: Who won?\nAnswer:"
    assert seen["prompts"][1] == "Question: Who lost?\nAnswer:" and seen["stop"] == ["\n"]


def test_token_directory_perplexity_names_its_split(ckpt, tmp_path):
    from train_helpers import write_corpus

    from lmforge.tokenizer.shards import tokenize_corpus

    ckpt_dir, model, tok = ckpt
    corpus = write_corpus(tmp_path / "corpus", docs=6, seed=3)
    tokenize_corpus(ckpt_dir / "tokenizer.json", corpus, tmp_path / "tokens", val_fraction=0.3)
    out = evaluate(ckpt_dir, [tmp_path / "tokens"], tmp_path / "out", limit=2, progress=False)
    result = out["tasks"][0]
    assert result["split"] == "val" and result["kind"] == "perplexity"
    assert result["metrics"]["tokens"] == 2 * model.config.block_size  # --limit 2 = two context windows
    # the whole split: every token once; bytes are those of the split's text
    from lmforge.tokenizer.shards import load_split

    stream = [int(t) for shard in load_split(tmp_path / "tokens", "val") for t in shard]
    whole = evaluate(ckpt_dir, [tmp_path / "tokens"], tmp_path / "out1", progress=False)["tasks"][0]["metrics"]
    assert whole["tokens"] == len(stream)
    assert whole["bytes"] == len(tok.decode([t for t in stream if t != tok.eos_id]).encode("utf-8"))
    nats = 0.0
    ids = [tok.eos_id, *stream]
    for begin in range(0, len(ids) - 1, model.config.block_size):
        window = ids[begin:begin + model.config.block_size + 1]
        nats -= direct_logprob(model, window, len(window) - 1)
    assert whole["loss"] == pytest.approx(nats / len(stream), abs=1e-4)
    with pytest.warns(UserWarning, match="evaluating on the training split"):
        out = evaluate(ckpt_dir, [tmp_path / "tokens"], tmp_path / "out2", split="train", limit=1, progress=False)
    assert out["tasks"][0]["split"] == "train" and "memorization" in out["tasks"][0]["split_note"]


def test_several_tasks_write_one_directory_each_and_an_overview(ckpt, tmp_path):
    ckpt_dir, _, _ = ckpt
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks / "one.jsonl", MC_ITEMS[:2], {"kind": "multiple_choice", "split": "test"})
    write_task(tasks / "two.jsonl", [{"text": "the king my lord"}], {"kind": "perplexity"})
    evaluate(ckpt_dir, [tasks], tmp_path / "out", progress=False)
    index = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(index["tasks"]) == {"one", "two"}
    assert index["tasks"]["two"]["split"] == "unstated"
    overview = (tmp_path / "out" / "report.md").read_text()
    assert "[one](one/report.md)" in overview and "| unstated |" in overview
    assert (tmp_path / "out" / "one" / "results.json").is_file()
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["stage"] == "eval"


def test_classification_with_a_bert_head_uses_its_logits(tmp_path):
    from lmforge.models import ModelConfig, build_model
    from lmforge.train.checkpoint import save_checkpoint, tied_aliases

    _, _, tok = make_checkpoint(tmp_path / "lm")
    torch.manual_seed(1)
    config = ModelConfig(arch="bert", vocab_size=320, n_layer=2, n_head=2, n_embd=32, block_size=24, num_labels=3,
                         norm_position="post")
    bert = build_model(config).eval()
    ckpt = save_checkpoint(tmp_path / "bert", bert.state_dict(), config.to_dict(),
                           tmp_path / "lm" / "tok" / "tokenizer.json", None, drop=tied_aliases(bert))
    labels = ["comedy", "tragedy", "history"]
    texts = ["the king my lord shall speak", "death upon this night", "good sir", "i pray thee tell me " * 5]
    items = [{"text": t, "label": lab} for t, lab in zip(texts, ["comedy", "tragedy", "history", "comedy"])]
    task = write_task(tmp_path / "c.jsonl", items, {"kind": "classification", "labels": labels, "split": "test"})
    evaluate(ckpt, [task], tmp_path / "out", batch_size=3, progress=False)
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    for text, pred in zip(texts, result["predictions"]):
        # the reference: the head on one unpadded [CLS] text [SEP] row (the last text is cut to the context)
        ids = [tok.bos_id, *tok.encode(text)[:22], tok.eos_id]
        with torch.no_grad():
            logits, _ = bert.classify(torch.tensor([ids]))
        assert [pred["scores"][lab] for lab in labels] == pytest.approx(logits[0].tolist(), abs=1e-4)
        assert pred["predicted"] == labels[int(logits[0].argmax())]
    # the head's outputs are positions: the label set must be declared, and match the head's size
    undeclared = write_task(tmp_path / "u.jsonl", items)
    with pytest.raises(UserError, match="declare them in the header"):
        evaluate(ckpt, [undeclared], tmp_path / "out2", kind="classification", progress=False)
    two = write_task(tmp_path / "t.jsonl", items[:2], {"kind": "classification", "labels": labels[:2]})
    with pytest.raises(UserError, match="head has 3 outputs but the task has 2 labels"):
        evaluate(ckpt, [two], tmp_path / "out3", progress=False)
    # kinds that read log-likelihoods or generate need a decoder: a one-line error, not wrong numbers
    ppl = write_task(tmp_path / "p.jsonl", [{"text": "the king"}], {"kind": "perplexity"})
    with pytest.raises(UserError, match="perplexity needs a decoder-only language model .* is an encoder \\(BERT\\)"):
        evaluate(ckpt, [ppl], tmp_path / "out4", progress=False)
