"""`lmforge eval` on encoder-decoder checkpoints (eval/seq2seq.py): the context goes to the encoder,
the decoder scores or writes the continuation.

References: log-likelihoods computed directly, one unpadded request at a time (encode the
context alone, run the decoder on start + continuation, sum log_softmax at the targets);
replies from `generate_text` on each prompt alone. Kinds a model cannot do are one-line errors.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from eval_helpers import write_task

from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.eval import evaluate, scoring, seq2seq
from lmforge.infer.generate import encode_source, generate, generate_text
from lmforge.models import ModelConfig, build_model
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import load_pretrained, save_checkpoint, tied_aliases

VOCAB = 320  # >= the char test tokenizer (276 tokens)
BLOCK = 48
VARIANTS = {  # T5 (relative bias, RMSNorm, scaled output) and the original Transformer (sinusoidal, post-norm)
    "t5": dict(pos_encoding="relative", norm="rmsnorm", bias=False, mlp="relu", attn_scale=1.0,
               scale_decoder_outputs=True, rel_buckets=8, rel_max_distance=20),
    "paper": dict(pos_encoding="sinusoidal", norm="layernorm", norm_position="post", bias=True, mlp="relu",
                  scale_embeddings=True),
}


def tiny_encdec(variant: str, pad_id: int):
    torch.manual_seed(0)
    config = ModelConfig(arch="encdec", vocab_size=VOCAB, n_layer=2, n_decoder_layer=2, n_head=2, n_embd=32,
                         block_size=BLOCK, decoder_start_token_id=pad_id, **VARIANTS[variant])
    model = build_model(config).eval()
    with torch.no_grad():  # off the init (ones/zeros) so that a mis-wired mask or norm shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def tok(tokenizer_file):
    return Tokenizer.load(tokenizer_file)


@pytest.fixture(scope="module")
def t5_ckpt(tmp_path_factory, tokenizer_file, tok):
    model = tiny_encdec("t5", tok.pad_id)
    path = save_checkpoint(tmp_path_factory.mktemp("t5eval") / "ckpt", model.state_dict(), model.config.to_dict(),
                           tokenizer_file, None, drop=tied_aliases(model))
    return path, load_pretrained(path)[0]


def direct_logprob(model, source: list[int], target: list[int]) -> tuple[float, bool]:
    """log p(target | source) and whether it is the greedy reply: one request, no padding, float64."""
    with torch.no_grad():
        memory = model.encode(torch.tensor([source[-BLOCK:]]))
        logits = model.decode(torch.tensor([[model.decoder_start_id, *target[:-1]]]), memory)
    logprobs = F.log_softmax(logits[0].double(), dim=-1)
    return (sum(float(logprobs[t, target[t]]) for t in range(len(target))),
            all(int(logprobs[t].argmax()) == target[t] for t in range(len(target))))


CONTEXTS = ["the king", "", "shall speak of love and death upon this night " * 2,  # the last: longer than BLOCK
            "of <|extra_id_0|> night"]  # a sentinel marker (text here: this tokenizer has no sentinels)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batched_loglikelihoods_equal_one_request_at_a_time(variant, tok):
    model = tiny_encdec(variant, tok.pad_id).double()  # float64: the comparison checks masks, not rounding
    continuations = [" love", "death upon this night", "k", "the king shall speak of love and death upon " * 2]
    requests = [seq2seq.encode_pair(tok, c, k) for c in CONTEXTS for k in continuations]
    # a continuation the model itself writes (greedy) for the first context: is_greedy must say so
    greedy = list(generate(model, encode_source(tok, CONTEXTS[0]), 6, temperature=0.0, stop_ids=set()))
    requests.append((encode_source(tok, CONTEXTS[0]), greedy))
    assert len({len(s) for s, _ in requests}) > 2 and len({len(t) for _, t in requests}) > 2  # padding happens
    assert any(len(s) > BLOCK for s, _ in requests) and any(len(t) > BLOCK for _, t in requests)  # and cuts
    # through scoring.loglikelihoods: the decoder-only entry point hands encoder-decoders over
    batched = scoring.loglikelihoods(model, requests, batch_size=5, progress=False)
    for (source, target), got in zip(requests, batched):
        assert source[-1] == tok.eos_id and target[0] != tok.eos_id  # EOS-terminated source, bare target
        expected, is_greedy = direct_logprob(model, source, target[:BLOCK])
        assert got.logprob == pytest.approx(expected, abs=1e-5)
        assert (got.tokens, got.is_greedy) == (min(len(target), BLOCK), is_greedy)
    assert batched[-1].is_greedy and not all(r.is_greedy for r in batched)


def test_encode_pair_sends_the_context_to_the_encoder(tok):
    source, target = seq2seq.encode_pair(tok, "Question: is it so?\nAnswer:", " yes")
    assert source == tok.encode("Question: is it so?\nAnswer:", add_eos=True)
    assert target == tok.encode("yes") + [tok.eos_id]  # the whole reply: no leading space, eos-terminated
    assert seq2seq.encode_pair(tok, "x", "\n")[1] == tok.encode("\n") + [tok.eos_id]  # whitespace-only stays


MC_ITEMS = [
    {"context": "the king shall", "choices": [" speak of love", " die", " night upon this"], "gold": 0},
    {"context": "", "choices": ["the king", "death"], "gold": 1},
    {"context": "shall speak of love and death upon this night " * 2, "choices": ["love", "the night"], "gold": 0},
]
GEN_ITEMS = [
    {"prompt": "the king shall speak", "reference": "of love and death"},
    {"prompt": "upon this night", "references": ["the king", "of love"]},
    {"prompt": "death", "reference": "upon this night"},
]


def test_cli_multiple_choice_and_generation_on_an_encdec_checkpoint(t5_ckpt, tok, tmp_path, capsys):
    ckpt, model = t5_ckpt
    mc = write_task(tmp_path / "mc.jsonl", MC_ITEMS, {"kind": "multiple_choice", "split": "test"})
    gen = write_task(tmp_path / "gen.jsonl", GEN_ITEMS,
                     {"kind": "generation", "split": "test", "max_new_tokens": 8, "stop": ["ng"]})
    code = main(["eval", "--ckpt", str(ckpt), "--task", str(mc), "--task", str(gen), "--out", str(tmp_path / "out"),
                 "--batch-size", "3"])
    assert code == 0, capsys.readouterr().err
    index = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "acc" in index["tasks"]["mc"]["metrics"] and "bleu" in index["tasks"]["gen"]["metrics"]

    result = json.loads((tmp_path / "out" / "mc" / "results.json").read_text())
    correct = 0
    for item, pred in zip(MC_ITEMS, result["predictions"]):
        lls = [direct_logprob(model, encode_source(tok, item["context"]), tok.encode(c.lstrip()) + [tok.eos_id])[0]
               for c in item["choices"]]
        assert pred["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
        assert pred["pred"] == max(range(len(lls)), key=lambda j: lls[j])
        correct += pred["pred"] == item["gold"]
    assert result["metrics"]["acc"] == pytest.approx(correct / len(MC_ITEMS))

    result = json.loads((tmp_path / "out" / "gen" / "results.json").read_text())
    replies = [generate_text(model, tok, item["prompt"], max_new_tokens=8, temperature=0.0, stop=["ng"])
               for item in GEN_ITEMS]
    assert [p["prediction"] for p in result["predictions"]] == replies
    assert any(replies)  # a test of empty strings would prove little


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_batched_replies_equal_generate_text_with_a_seed_per_item(t5_ckpt, tok, batch_size):
    """Sources of different lengths share a batch (right-padded under the encoder mask): each
    reply is the one `generate_text` gives its prompt alone, with seed 7 + i."""
    _, model = t5_ckpt
    prompts = ["the king", "death upon this night " * 3, "love", "good my lord, the night is come"]
    cut: list[int] = []  # the second prompt is longer than the encoder's context
    got = scoring.generate_replies(model, tok, prompts, 6, ["x"], seed=7, temperature=0.9, progress=False,
                                   on_truncate=cut.append, batch_size=batch_size)
    assert cut == [1]
    expected = [generate_text(model, tok, encode_source(tok, p)[-BLOCK:], max_new_tokens=6, temperature=0.9,
                              seed=7 + i, stop=["x"]) for i, p in enumerate(prompts)]
    assert got == expected
    greedy = scoring.generate_replies(model, tok, prompts, 6, [], seed=0, progress=False, batch_size=batch_size)
    assert greedy == [generate_text(model, tok, encode_source(tok, p)[-BLOCK:], max_new_tokens=6, temperature=0.0)
                      for p in prompts]
    assert expected[0] == generate_text(model, tok, prompts[0], max_new_tokens=6, temperature=0.9, seed=7, stop=["x"])


def test_binary_and_classification_score_labels_with_the_decoder(t5_ckpt, tok, tmp_path):
    ckpt, model = t5_ckpt
    items = [{"question": "shall the king speak", "answer": "yes"}, {"question": "is it night", "answer": "no"}]
    binary = write_task(tmp_path / "b.jsonl", items, {"kind": "binary", "split": "test"})
    evaluate(ckpt, [binary], tmp_path / "ll", progress=False)
    result = json.loads((tmp_path / "ll" / "results.json").read_text())
    for item, pred in zip(items, result["predictions"]):
        source = encode_source(tok, f"Question: {item['question']}\nAnswer:")
        yes = direct_logprob(model, source, tok.encode("yes") + [tok.eos_id])[0]
        no = direct_logprob(model, source, tok.encode("no") + [tok.eos_id])[0]
        assert pred["logprob_yes"] == pytest.approx(yes, abs=1e-4)
        assert pred["logprob_no"] == pytest.approx(no, abs=1e-4)
    evaluate(ckpt, [binary], tmp_path / "gen", answer_mode="generate", progress=False)
    result = json.loads((tmp_path / "gen" / "results.json").read_text())
    assert [p["reply"] for p in result["predictions"]] == [
        generate_text(model, tok, f"Question: {item['question']}\nAnswer:", max_new_tokens=8, temperature=0.0,
                      stop=["\n"]) for item in items]

    labels = ["love", "death"]
    texts = [{"text": "the king shall speak", "label": "love"}, {"text": "upon this night", "label": "death"}]
    cls = write_task(tmp_path / "c.jsonl", texts, {"kind": "classification", "labels": labels})
    evaluate(ckpt, [cls], tmp_path / "cls", progress=False)
    result = json.loads((tmp_path / "cls" / "results.json").read_text())
    for item, pred in zip(texts, result["predictions"]):
        source = encode_source(tok, f"{item['text']}\nLabel:")
        expected = {lab: direct_logprob(model, source, tok.encode(lab) + [tok.eos_id])[0] for lab in labels}
        assert pred["scores"] == pytest.approx(expected, abs=1e-4)


def test_perplexity_on_an_encdec_checkpoint_is_one_line_exit_2(t5_ckpt, tmp_path, capsys):
    ckpt, _ = t5_ckpt
    task = write_task(tmp_path / "p.jsonl", [{"text": "the king shall speak"}], {"kind": "perplexity"})
    code = main(["eval", "--ckpt", str(ckpt), "--task", str(task), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "perplexity needs a decoder-only language model" in lines[0]
    assert "is an encoder-decoder (EncoderDecoder)" in lines[0]
    assert "generation, qa, binary, classification (label scoring) or multiple_choice" in lines[0]
    assert not (tmp_path / "out").exists()


def test_encoder_only_errors_name_the_kinds_that_work():
    base = dict(arch="bert", vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=32, block_size=24, norm_position="post")
    with_head, bare = build_model(ModelConfig(**base, num_labels=2)), build_model(ModelConfig(**base))
    with pytest.raises(UserError, match=r"^a multiple_choice task needs a decoder-only language model \(e.g. a GPT "
                                        r"checkpoint\) or an encoder-decoder \(T5\); "
                                        r"this checkpoint is an encoder \(BERT\): "
                                        r"only classification tasks work with it"):
        seq2seq.require_lm(with_head, "a multiple_choice task")
    with pytest.raises(UserError, match=r"perplexity needs a decoder-only language model \(e.g. a GPT checkpoint\); "
                                        r"this checkpoint is an encoder \(BERT\): it has no classification head"):
        seq2seq.require_lm(bare, "perplexity", allow_seq2seq=False)
    gpt = build_model(ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=32, block_size=24))
    seq2seq.require_lm(gpt, "perplexity", allow_seq2seq=False)  # a decoder does every kind
