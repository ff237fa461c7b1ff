"""Tests for sampling and KV-cached generation (token ids and text)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from lmforge.infer import generate, generate_text, sample_next
from lmforge.models import GPT, KVCache, ModelConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_gpt(**overrides) -> GPT:
    kw = dict(vocab_size=257, n_layer=2, n_head=2, n_embd=32, block_size=16)
    kw.update(overrides)
    return GPT(ModelConfig(**kw))


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, eos = 256; decoding partial characters gives U+FFFD."""

    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class ScriptedModel(nn.Module):
    """A stand-in model whose n-th forward pass makes script[n] certain (for exact text tests)."""

    capabilities = frozenset({"generate"})

    def __init__(self, script: list[int], vocab_size: int = 257, block_size: int = 64) -> None:
        super().__init__()
        self.config = SimpleNamespace(block_size=block_size, vocab_size=vocab_size)
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the model a device
        self.script, self.calls = script, 0

    def new_kv_cache(self, batch_size: int) -> KVCache:
        return KVCache(1, batch_size, 1, 1, self.config.block_size)

    def forward(self, idx: Tensor, kv_cache: KVCache) -> tuple[Tensor, None]:
        logits = torch.full((*idx.shape, self.config.vocab_size), -1e9)
        logits[:, -1, self.script[min(self.calls, len(self.script) - 1)]] = 0.0
        self.calls += 1
        kv_cache.advance(idx.shape[1])
        return logits, None


# --------------------------------------------------------------------------------------------
# sample_next


def test_greedy_and_top_k_1_are_argmax():
    logits = torch.randn(8, 100)
    expected = logits.argmax(-1)
    assert torch.equal(sample_next(logits, temperature=0.0), expected)
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(sample_next(logits, temperature=1.0, top_k=1, generator=gen), expected)


def test_same_seed_same_sample_different_seed_differs():
    logits = torch.zeros(32, 1000)  # uniform: two seeds agree on all 32 rows with prob 1e-96

    def draw(seed: int) -> Tensor:
        return sample_next(logits, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


@pytest.mark.parametrize("top_p, kept", [(0.4, {2}), (0.6, {2, 0}), (0.85, {2, 0, 3}),
                                         (0.95, {2, 0, 3, 1}), (1.0, {2, 0, 3, 1})])
def test_top_p_keeps_smallest_set_reaching_p(top_p, kept):
    probs = torch.tensor([0.25, 0.10, 0.50, 0.15])  # sorted: 2 (.5), 0 (.25), 3 (.15), 1 (.1)
    logits = probs.log().expand(4000, 4)
    samples = sample_next(logits, top_p=top_p, generator=torch.Generator().manual_seed(0))
    assert set(samples.tolist()) == kept
    # The kept tokens keep their relative odds (renormalized).
    if kept == {2, 0}:
        share = (samples == 2).float().mean().item()
        assert share == pytest.approx(0.5 / 0.75, abs=0.03)


def test_top_k_then_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).expand(2000, 5)
    samples = sample_next(logits, top_k=3, generator=torch.Generator().manual_seed(0))
    assert set(samples.tolist()) == {0, 1, 2}
    samples = sample_next(logits, top_k=3, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert set(samples.tolist()) == {0}


# --------------------------------------------------------------------------------------------
# generate (token ids)


def _greedy_without_cache(model: GPT, prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([tokens]))
            tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("pos_encoding", ["learned", "rope", "sinusoidal"])
def test_greedy_generate_matches_uncached_decoding(pos_encoding):
    model = tiny_gpt(pos_encoding=pos_encoding, n_kv_head=1)
    prompt = [1, 2, 3, 4]
    out = list(generate(model, prompt, max_new_tokens=10, temperature=0.0))
    assert out == _greedy_without_cache(model.eval(), prompt, 10)


def test_generate_is_deterministic_given_seed():
    model = tiny_gpt()
    a = list(generate(model, [5, 6], 12, temperature=1.0, seed=3))
    b = list(generate(model, [5, 6], 12, temperature=1.0, seed=3))
    c = list(generate(model, torch.tensor([5, 6]), 12, temperature=1.0, seed=4))
    assert a == b and len(a) == 12
    assert a != c


def test_generate_stops_at_stop_id():
    model = tiny_gpt()
    out = list(generate(model, [1, 2], 10, temperature=0.0))
    stop = out[3]
    first = out.index(stop)
    assert list(generate(model, [1, 2], 10, temperature=0.0, stop_ids={stop})) == out[:first + 1]


@pytest.mark.parametrize("pos_encoding", ["learned", "rope", "sinusoidal"])
def test_generate_past_block_size(pos_encoding):
    model = tiny_gpt(pos_encoding=pos_encoding, block_size=8)
    out = list(generate(model, [1, 2, 3], 40, temperature=1.0, seed=0))
    assert len(out) == 40 and all(0 <= t < 257 for t in out)
    # Greedy: same tokens as uncached decoding over the documented window (once the context
    # is full, restart it from the last block_size//2 tokens).
    tokens, start = [1, 2, 3], 0
    with torch.no_grad():
        for _ in range(40):
            if len(tokens) - 1 - start >= 8:
                start = len(tokens) - 4
            logits, _ = model.eval()(torch.tensor([tokens[start:]]))
            tokens.append(int(logits[0, -1].argmax()))
    assert list(generate(model, [1, 2, 3], 40, temperature=0.0)) == tokens[3:]


def test_long_prompt_is_truncated_from_the_left_with_a_warning():
    model = tiny_gpt(block_size=8)
    prompt = list(range(20))
    with pytest.warns(UserWarning, match=r"prompt has 20 tokens.*context \(8\); keeping the last 7"):
        out = list(generate(model, prompt, 1, temperature=0.0))
    assert out == _greedy_without_cache(model.eval(), prompt[-7:], 1)


def test_generate_restores_mode_and_leaks_no_inference_mode():
    model = tiny_gpt().train()
    tokens = generate(model, [1], 3, temperature=0.0)
    next(tokens)
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    assert not model.training
    list(tokens)
    assert model.training


def test_generate_under_bf16_autocast():
    model = tiny_gpt(pos_encoding="rope", n_kv_head=1, block_size=8)
    out = list(generate(model, [1, 2, 3], 12, seed=0, autocast_dtype=torch.bfloat16))
    assert len(out) == 12


# --------------------------------------------------------------------------------------------
# generate_text


def _script(text: str, tail: list[int] | None = None) -> list[int]:
    return list(text.encode("utf-8")) + (tail if tail is not None else [ByteTokenizer.eos_id])


def test_generate_text_streams_complete_utf8_characters():
    text = "héllo wörld €𝄞!"
    pieces: list[str] = []
    out = generate_text(ScriptedModel(_script(text)), ByteTokenizer(), "x", max_new_tokens=100,
                        stream=pieces.append)
    assert out == text
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_generate_text_stops_at_eos_and_max_tokens():
    out = generate_text(ScriptedModel(_script("hi") + list(b"more")), ByteTokenizer(), "x")
    assert out == "hi"
    out = generate_text(ScriptedModel(_script("abcdef")), ByteTokenizer(), "x", max_new_tokens=3)
    assert out == "abc"


@pytest.mark.parametrize("stop", [["STOP"], ["zzz", "STOP"], ["S", "STOP"]])
def test_generate_text_stop_strings(stop):
    text = "aS b STOP c"
    pieces: list[str] = []
    model = ScriptedModel(_script(text)).train()
    out = generate_text(model, ByteTokenizer(), "x", stop=stop, stream=pieces.append)
    assert model.training  # restored even though generation ended early
    expected = text[:text.index("S")] if "S" in stop else "aS b "
    assert out == expected
    assert "".join(pieces) == expected


def test_generate_text_with_a_real_model():
    model = tiny_gpt(block_size=32)
    out = generate_text(model, ByteTokenizer(), "hello", max_new_tokens=20, seed=1)
    again = generate_text(model, ByteTokenizer(), "hello", max_new_tokens=20, seed=1)
    assert isinstance(out, str) and out == again


# --------------------------------------------------------------------------------------------
# batched generation (prompts of different lengths in one batch: a KV cache row per prompt)

BATCH_PROMPTS = [[7, 8, 9, 10, 11, 12, 13], [1, 2], [40, 41, 42, 43], [99]]


@pytest.mark.parametrize("arch", [dict(pos_encoding="learned"), dict(pos_encoding="sinusoidal"),
                                  dict(pos_encoding="rope", n_kv_head=1, norm="rmsnorm", mlp="swiglu"),
                                  dict(pos_encoding="rope", moe={"num_experts": 4, "top_k": 2})])
def test_rows_of_different_lengths_each_get_their_own_logits(arch):
    """A right-padded prefill (the padding then forgotten: `set_lengths`) and two decode steps over
    rows of different lengths: every row's logits equal that row run alone, without a cache."""
    model = tiny_gpt(block_size=24, **arch).eval()
    width = max(len(p) for p in BATCH_PROMPTS)
    idx = torch.full((len(BATCH_PROMPTS), width), 5, dtype=torch.long)  # any padding id
    for row, p in enumerate(BATCH_PROMPTS):
        idx[row, :len(p)] = torch.tensor(p)
    with torch.no_grad():
        cache = model.new_kv_cache(len(BATCH_PROMPTS))
        batched = [model(idx, kv_cache=cache)[0]]
        cache.set_lengths([len(p) for p in BATCH_PROMPTS])
        assert cache.past is None and cache.lengths == [7, 2, 4, 1]
        for step in ([3], [4]):
            batched.append(model(torch.tensor([step] * len(BATCH_PROMPTS)), kv_cache=cache)[0])
        assert cache.lengths == [9, 4, 6, 3]
        for row, p in enumerate(BATCH_PROMPTS):
            alone, _ = model(torch.tensor([p + [3, 4]]))
            torch.testing.assert_close(batched[0][row, :len(p)], alone[0, :len(p)], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batched[1][row, 0], alone[0, len(p)], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batched[2][row, 0], alone[0, len(p) + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_batch_equals_generate_per_prompt(temperature):
    from lmforge.infer.generate import generate_batch

    model = tiny_gpt(block_size=24, pos_encoding="rope")
    seeds = [11, 12, 13, 14]
    alone = [list(generate(model, p, 9, temperature=temperature, top_k=50, seed=s))
             for p, s in zip(BATCH_PROMPTS, seeds)]
    batched = generate_batch(model, BATCH_PROMPTS, 9, temperature=temperature, top_k=50, seeds=seeds)
    assert batched == alone
    assert model.training  # mode restored


def test_generate_batch_rows_end_at_their_stop_and_leave_the_batch():
    from lmforge.infer.generate import generate_batch

    model = tiny_gpt(block_size=24)
    alone = [list(generate(model, p, 10, temperature=0.0)) for p in BATCH_PROMPTS]
    stop = alone[1][2]  # the third token of row 1 ends that row (and any row that produces it)
    expected = [a[:a.index(stop) + 1] if stop in a else a for a in alone]
    assert generate_batch(model, BATCH_PROMPTS, 10, temperature=0.0, stop_ids={stop}) == expected
    calls = []
    out = generate_batch(model, BATCH_PROMPTS, 10, temperature=0.0,
                         finished=lambda i, ids: calls.append(i) or (i == 0 and len(ids) == 3))
    assert out[0] == alone[0][:3] and out[1:] == alone[1:]
    # row 0 was asked after each of its 3 tokens, then left the batch; the others until the last step
    assert calls.count(0) == 3 and calls.count(1) == 9


def test_generate_batch_refuses_what_does_not_fit():
    from lmforge.infer.generate import generate_batch

    with pytest.raises(ValueError, match="does not fit"):
        generate_batch(tiny_gpt(block_size=16), [[1] * 10], 7)
    with pytest.raises(ValueError, match="empty"):
        generate_batch(tiny_gpt(), [[1], []], 2)


def test_generate_texts_equals_generate_text_with_stop_strings():
    from lmforge.infer.generate import generate_texts

    model = tiny_gpt(block_size=40, pos_encoding="rope")
    tok = ByteTokenizer()
    prompts = ["hello", "a", "the cat sat", "xyz!", "Q", "longer prompt here"]
    ids = [tok.encode(p) for p in prompts]
    plain = [generate_text(model, tok, p, max_new_tokens=16, temperature=0.0) for p in ids]
    # stop at a character that the replies contain somewhere in their middle
    chars = [c for text in plain for c in text[2:-2] if c != "\ufffd"]
    stop = [max(set(chars), key=chars.count)]
    expected = [generate_text(model, tok, p, max_new_tokens=16, temperature=0.7, seed=i, stop=stop)
                for i, p in enumerate(ids)]
    got = generate_texts(model, tok, ids, max_new_tokens=16, temperature=0.7, seeds=list(range(len(ids))),
                         stop=stop, batch_size=4)
    assert got == expected
    greedy_stopped = [generate_text(model, tok, p, max_new_tokens=16, temperature=0.0, stop=stop) for p in ids]
    assert any(len(g) < len(p) for g, p in zip(greedy_stopped, plain))  # the stop string really cut some
    batched = generate_texts(model, tok, ids, max_new_tokens=16, temperature=0.0, stop=stop, batch_size=3)
    assert batched == greedy_stopped
