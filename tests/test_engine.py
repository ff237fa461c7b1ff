"""Tests for the generation engine (`lmforge.infer.engine`): the step API, continuous batching and
per-row KV caches, against an independent reference: uncached decoding (a full forward over the
whole sequence at every step) sampled by `sample_next` (torch.multinomial) with the request's
own generator. Also the declared model capabilities (`lmforge.models.has_capability`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge.infer.engine import Engine, RowSampling, SamplingParams, sample_next, sample_rows
from lmforge.models import BERT, GPT, ModelConfig, build_model, has_capability

VOCAB = 97


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def perturbed(model: nn.Module) -> nn.Module:
    """Weights moved off the init (ones/zeros), so a mis-wired norm, bias or position shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


GPT_STYLES = {
    "learned": dict(pos_encoding="learned"),
    "sinusoidal": dict(pos_encoding="sinusoidal"),
    "llama": dict(pos_encoding="rope", n_kv_head=1, norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False),
    "moe": dict(pos_encoding="rope", moe={"num_experts": 4, "top_k": 2}),
}
ENCDEC_STYLES = {
    "t5": dict(pos_encoding="relative", norm="rmsnorm", norm_eps=1e-6, bias=False, mlp="relu", attn_scale=1.0,
               scale_decoder_outputs=True, rel_buckets=8, rel_max_distance=20),
    "paper": dict(pos_encoding="sinusoidal", norm="layernorm", norm_position="post", mlp="relu",
                  scale_embeddings=True),
}


def gpt(style: str, **kw) -> GPT:
    cfg = dict(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, block_size=32, **GPT_STYLES[style])
    cfg.update(kw)
    return perturbed(GPT(ModelConfig(**cfg)))


def encdec(style: str) -> nn.Module:
    return perturbed(build_model(ModelConfig(arch="encdec", vocab_size=VOCAB, n_layer=2, n_decoder_layer=2, n_head=2,
                                             n_embd=32, block_size=24, decoder_start_token_id=0,
                                             **ENCDEC_STYLES[style])))


def reference(model: nn.Module, prompt: list[int], params: SamplingParams) -> list[int]:
    """What a request should get: uncached decoding, sample_next with the request's own generator."""
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    seq2seq = has_capability(model, "encoder_decoder")
    out: list[int] = []
    with torch.no_grad():
        for _ in range(params.max_new_tokens):
            if seq2seq:
                decoder_ids = torch.tensor([[model.config.decoder_start_token_id, *out]])
                logits = model(torch.tensor([prompt]), decoder_input_ids=decoder_ids)[0]
            else:
                logits = model(torch.tensor([prompt + out]))[0]
            out.append(int(sample_next(logits[:, -1], params.temperature, params.top_k, params.top_p, generator)[0]))
            if out[-1] in params.stop_ids:
                break
    return out


def drain(engine: Engine, joins: dict[int, list] | None = None) -> tuple[dict[int, list[int]], dict[int, str]]:
    """Step until done; `joins[step]` = [(prompt, params), ...] are added before that step.
    The tokens and the finish reason of every request."""
    tokens: dict[int, list[int]] = {}
    reasons: dict[int, str] = {}
    joins = dict(joins or {})
    step = 0
    while engine.has_work or joins:
        for prompt, params in joins.pop(step, []):
            tokens[engine.add(prompt, params)] = []
        for event in engine.step():
            assert event.request_id not in reasons  # nothing after a request's last token
            tokens[event.request_id].append(event.token_id)
            if event.finished:
                reasons[event.request_id] = event.reason
        step += 1
    return tokens, reasons


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [1, 2], [40, 41, 42, 43], [90], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [60, 61, 62]]


def mixed_params(i: int, n: int = 8) -> SamplingParams:
    """Different sampling per request: greedy, temperature, top-k, top-p, and their mixes."""
    kinds = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.7, top_k=5),
             dict(temperature=1.3, top_p=0.8), dict(temperature=0.9, top_k=20, top_p=0.9),
             dict(temperature=1.0, top_k=3)]
    return SamplingParams(max_new_tokens=n - (i % 3), seed=100 + i, **kinds[i % len(kinds)])


# --------------------------------------------------------------------------------------------
# Sampling


def test_batched_sampling_equals_sample_next_row_by_row():
    """Each row of `sample_rows` is `sample_next` (torch.multinomial) on that row alone, with its own
    settings and generator, for every mix of greedy, temperature, top-k and top-p in one batch."""
    logits = torch.randn(6, 50) * 3
    params = [mixed_params(i) for i in range(6)]
    for trial in range(20):
        mine = [torch.Generator().manual_seed(trial * 10 + i) for i in range(6)]
        theirs = [torch.Generator().manual_seed(trial * 10 + i) for i in range(6)]
        picked = sample_rows(logits, RowSampling(params, 50, torch.device("cpu")), mine)
        expected = [int(sample_next(logits[i:i + 1], p.temperature, p.top_k, p.top_p, theirs[i])[0])
                    for i, p in enumerate(params)]
        assert picked.tolist() == expected
        # the generators advanced alike: the next draw agrees too (greedy rows drew nothing)
        assert [torch.rand(1, generator=g).item() for g in mine] == [torch.rand(1, generator=g).item() for g in theirs]


def test_sampling_params_are_checked():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    assert SamplingParams(stop_ids=[3, 4]).stop_ids == frozenset({3, 4})


# --------------------------------------------------------------------------------------------
# Decoder-only


@pytest.mark.parametrize("style", list(GPT_STYLES))
def test_requests_joining_mid_batch_get_what_they_get_alone(style):
    """Six requests with their own sampling, seeds and lengths through 3 rows: some wait for a free
    row, two are added while others run; each gets the reference's tokens."""
    model = gpt(style)
    requests = [(p, mixed_params(i)) for i, p in enumerate(PROMPTS)]
    engine = Engine(model, max_batch=3)
    tokens, reasons = drain(engine, {0: requests[:4], 3: requests[4:]})
    for rid, (prompt, params) in enumerate(requests):
        assert tokens[rid] == reference(model, prompt, params), rid
        assert reasons[rid] == "length"
    assert not engine.active and not engine.has_work


def test_stop_ids_end_a_request_and_its_row_is_reused():
    model = gpt("learned")
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0)
    alone = reference(model, PROMPTS[1], greedy)
    stop = alone[3]
    params = SamplingParams(max_new_tokens=10, temperature=0.0, stop_ids={stop})
    engine = Engine(model, max_batch=2)
    tokens, reasons = drain(engine, {0: [(p, params) for p in PROMPTS[:4]]})
    for rid, prompt in enumerate(PROMPTS[:4]):
        expected = reference(model, prompt, params)
        assert tokens[rid] == expected
        assert reasons[rid] == ("stop" if expected[-1] == stop else "length")
    assert reasons[1] == "stop" and len(tokens[1]) == alone.index(stop) + 1


def test_removing_a_request_does_not_change_the_others():
    model = gpt("llama")
    requests = [(p, mixed_params(i, n=12)) for i, p in enumerate(PROMPTS[:4])]
    engine = Engine(model, max_batch=4)
    ids = [engine.add(p, params) for p, params in requests]
    got = {rid: [] for rid in ids}
    for step in range(12):
        if step == 3:
            assert engine.remove(ids[1]) and not engine.is_active(ids[1])  # a middle row: the last one moves into it
            assert not engine.remove(ids[1])  # already gone
        for event in engine.step():
            got[event.request_id].append(event.token_id)
    assert got[ids[1]] == reference(model, *requests[1])[:3]
    for rid in (ids[0], ids[2], ids[3]):
        assert got[rid] == reference(model, *requests[rid])
    queued = engine.add([1, 2, 3])
    assert engine.active == [queued] and engine.remove(queued) and not engine.has_work


def test_same_seed_same_tokens_and_fresh_randomness_without_one():
    model = gpt("learned")
    engine = Engine(model, max_batch=4)
    seeded = SamplingParams(max_new_tokens=12, seed=5)
    other = SamplingParams(max_new_tokens=12, seed=6)
    tokens, _ = drain(engine, {0: [(PROMPTS[0], seeded), (PROMPTS[0], seeded), (PROMPTS[0], other)]})
    assert tokens[0] == tokens[1] != tokens[2]
    unseeded, _ = drain(engine, {0: [(PROMPTS[0], SamplingParams(12))] * 2})
    assert unseeded[3] != unseeded[4]


def test_a_full_context_ends_a_request_or_slides():
    model = gpt("llama", block_size=8)
    params = SamplingParams(max_new_tokens=20, temperature=0.0)
    tokens, reasons = drain(Engine(model), {0: [([1, 2, 3], params)]})
    # prompt 3 + 5 tokens fill the 8 positions; the 6th token is the last (nothing left to feed it to)
    assert len(tokens[0]) == 6 and reasons[0] == "length"
    assert tokens[0] == reference(model, [1, 2, 3], SamplingParams(max_new_tokens=6, temperature=0.0))
    slid, reasons = drain(Engine(model, slide=True), {0: [([1, 2, 3], params)]})
    assert len(slid[0]) == 20 and slid[0][:6] == tokens[0] and reasons[0] == "length"
    with pytest.raises(ValueError, match="does not fit the context"):
        Engine(model).add(list(range(9)))
    with pytest.raises(ValueError, match="empty"):
        Engine(model).add([])


def test_logprob_of_the_chosen_token():
    model = gpt("learned")
    params = SamplingParams(max_new_tokens=4, temperature=0.8, seed=1, logprobs=True)
    engine = Engine(model, max_batch=2)
    engine.add(PROMPTS[0], params)
    engine.add(PROMPTS[1], SamplingParams(max_new_tokens=4, seed=2))  # no logprobs asked
    seen = []
    while engine.has_work:
        for event in engine.step():
            if event.request_id == 0:
                seen.append((event.token_id, event.logprob))
            else:
                assert event.logprob is None
    tokens = PROMPTS[0] + [t for t, _ in seen]
    with torch.no_grad():
        full = model(torch.tensor([tokens]))[0][0].log_softmax(-1)
    for i, (token, logprob) in enumerate(seen):
        assert logprob == pytest.approx(full[len(PROMPTS[0]) - 1 + i, token].item(), abs=1e-4)


def test_step_runs_in_eval_mode_and_restores_training():
    model = gpt("learned", dropout=0.5).train()
    tokens, _ = drain(Engine(model), {0: [(PROMPTS[0], SamplingParams(max_new_tokens=5, temperature=0.0))]})
    assert model.training
    assert tokens[0] == reference(model.eval(), PROMPTS[0], SamplingParams(max_new_tokens=5, temperature=0.0))


# --------------------------------------------------------------------------------------------
# Encoder-decoder


@pytest.mark.parametrize("style", list(ENCDEC_STYLES))
def test_encoder_decoder_requests_joining_mid_batch(style):
    """Sources of different lengths (each row with its own cross-attention keys/values and source
    mask) join a running batch; each request gets what uncached decoding gives it alone."""
    model = encdec(style)
    sources = [torch.randint(3, VOCAB, (n,)).tolist() for n in (17, 3, 24, 9, 5)]
    requests = [(s, mixed_params(i, n=9)) for i, s in enumerate(sources)]
    engine = Engine(model, max_batch=3)
    tokens, _ = drain(engine, {0: requests[:2], 2: requests[2:]})
    for rid, (source, params) in enumerate(requests):
        assert tokens[rid] == reference(model, source, params), rid
    capped, reasons = drain(Engine(model), {0: [(sources[0], SamplingParams(max_new_tokens=100, temperature=0.0))]})
    assert len(capped[0]) == 23 and reasons[0] == "length"  # block_size - 1: the decoder's context


# --------------------------------------------------------------------------------------------
# Capabilities


def test_capabilities_are_declared_and_seen_through_wrappers():
    dense, moe = gpt("learned"), gpt("moe")
    bert = BERT(ModelConfig(arch="bert", vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=32, block_size=16,
                            norm_position="post", num_labels=3))
    t5 = encdec("t5")
    assert has_capability(dense, "generate") and not has_capability(dense, "moe_stats")
    assert has_capability(moe, "moe_stats") and not has_capability(moe, "encoder_decoder")
    assert has_capability(t5, "generate") and has_capability(t5, "encoder_decoder")
    assert has_capability(bert, "embed") and has_capability(bert, "classify") and not has_capability(bert, "generate")

    class DDPLike(nn.Module):  # DistributedDataParallel keeps the model as `.module`
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    assert has_capability(torch.compile(DDPLike(moe)), "moe_stats")  # compiled (_orig_mod), then DDP
    assert not has_capability(DDPLike(bert), "generate")
    with pytest.raises(ValueError, match="unknown model capability 'generates'"):
        has_capability(dense, "generates")
    with pytest.raises(ValueError, match="does not generate"):
        Engine(bert)


def test_top_logprobs_are_the_most_likely_tokens_of_the_full_forward():
    model = gpt("learned")
    engine = Engine(model, max_batch=2)
    engine.add(PROMPTS[0], SamplingParams(max_new_tokens=3, temperature=0, top_logprobs=3))
    engine.add(PROMPTS[1], SamplingParams(max_new_tokens=3, temperature=0))
    seen = []
    while engine.has_work:
        for event in engine.step():
            if event.request_id == 0:
                assert event.logprob is not None and len(event.top_logprobs) == 3
                seen.append(event)
            else:
                assert event.top_logprobs is None and event.logprob is None
    tokens = PROMPTS[0] + [e.token_id for e in seen]
    with torch.no_grad():
        full = model(torch.tensor([tokens]))[0][0].log_softmax(-1)
    for i, event in enumerate(seen):
        values, ids = full[len(PROMPTS[0]) - 1 + i].topk(3)
        assert [t for t, _ in event.top_logprobs] == ids.tolist()
        assert [v for _, v in event.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
        assert event.top_logprobs[0][0] == event.token_id  # greedy picks the best


def test_before_forward_sees_the_tags_of_each_model_calls_rows():
    calls = []
    engine = Engine(gpt("learned"), max_batch=2, before_forward=calls.append)
    engine.add(PROMPTS[0], SamplingParams(max_new_tokens=3, temperature=0), tag="a")
    engine.add(PROMPTS[1], SamplingParams(max_new_tokens=1, temperature=0), tag="b")
    engine.add(PROMPTS[0], SamplingParams(max_new_tokens=1, temperature=0), tag="c")
    engine.step()
    assert calls == [["a", "b"]]  # one prefill of both rows
    engine.step()  # "b" left after its one token: "a" decodes, "c" is prefilled in a second call
    assert calls[1:] == [["a"], ["c"]]


@pytest.mark.parametrize("scale", [0.1, 3.0, 12.0])  # flat (falls back to the full sort) to peaked (top-k suffices)
def test_nucleus_keeps_what_a_full_sort_keeps(scale):
    from lmforge.infer.engine import nucleus

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4096, generator=g) * scale
    for top_p in (0.5, 0.9, torch.tensor([[0.3], [0.6], [0.9], [0.95], [float("inf")], [0.99]])):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # the reference: sort everything
        sorted_probs = sorted_logits.softmax(dim=-1)
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop_sorted[:, 0] = False
        expected = drop_sorted.scatter(-1, order, drop_sorted)
        got = nucleus(logits, top_p) == float("-inf")
        assert torch.equal(got, expected)


def test_unseeded_requests_share_one_generator_and_still_differ():
    engine = Engine(gpt("learned"), max_batch=4)
    params = SamplingParams(max_new_tokens=8, temperature=1.5)
    out, _ = drain(engine, {0: [(PROMPTS[0], params)] * 4})
    assert len(out) == 4 and len({tuple(t) for t in out.values()}) > 1  # fresh randomness per row, not one copied
    engine.add(PROMPTS[0], params)
    assert engine.waiting[0].generator is None  # drawn from engine.shared_generator
