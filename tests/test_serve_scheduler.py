"""The serving scheduler (`lmforge.serve.scheduler`): continuous batching on one engine thread for
asyncio callers. Each request gets exactly the tokens it gets alone (`infer.generate.generate` with
its seed), a short request never waits for a long one, cancel frees a row at the next step, the
queue is bounded, drain finishes what runs and refuses new work, and a failing step fails only its
own requests."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from lmforge.infer.engine import SamplingParams
from lmforge.infer.generate import generate
from lmforge.models import GPT, ModelConfig
from lmforge.serve.scheduler import Delta, Draining, GenerationRequest, QueueFull, Scheduler

EOS = 256


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, eos 256 (decode: partial characters give U+FFFD)."""

    eos_id = EOS

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class Tags:
    """A stand-in AdapterSet: records each forward's tags, can sleep (slow steps), fails on "boom"."""

    names = ["a", "b", "boom"]

    def __init__(self, delay: float = 0.0) -> None:
        self.delay, self.calls = delay, []

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def set_rows(self, tags: list) -> None:
        self.calls.append(list(tags))
        if "boom" in tags:
            raise RuntimeError("boom")
        if self.delay:
            time.sleep(self.delay)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    gpt = GPT(ModelConfig(vocab_size=257, n_layer=2, n_head=2, n_embd=32, block_size=64, pos_encoding="rope"))
    with torch.no_grad():
        for p in gpt.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return gpt.eval()


def alone(model, request: GenerationRequest) -> list[int]:
    """The tokens the request gets by itself (its stop id dropped: it is no Delta token)."""
    p = request.params
    ids = list(generate(model, request.prompt_ids, p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.seed,
                        set(p.stop_ids)))
    return ids[:-1] if ids and ids[-1] in p.stop_ids else ids


async def collect(handle) -> list[Delta]:
    return [delta async for delta in handle]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def started(model, **kw) -> Scheduler:
    scheduler = Scheduler(model, ByteTokenizer(), **kw)
    scheduler.start()
    return scheduler


def test_batched_requests_get_the_tokens_they_get_alone(model):
    prompts = [[1, 2, 3], [40] * 9, [7], [100, 101, 102, 103, 104], [33, 34], [5] * 20, [9, 8, 7, 6], [250]]
    requests = []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_new_tokens=[6, 12, 3, 9, 15, 5, 8, 10][i], temperature=[0.0, 0.8, 1.0, 1.3][i % 4],
                                top_k=[None, 20][i % 2], top_p=[None, 0.9, None][i % 3], seed=100 + i,
                                stop_ids=frozenset({EOS, 65}) if i == 3 else frozenset())
        requests.append(GenerationRequest(prompt, params, request_id=f"r{i}"))

    async def main():
        scheduler = await started(model, max_batch=3)  # more requests than rows: some queue, join later
        handles = [scheduler.submit(r) for r in requests]
        outputs = await asyncio.gather(*(collect(h) for h in handles))
        scheduler.close()
        return handles, outputs

    handles, outputs = run(main())
    for request, handle, deltas in zip(requests, handles, outputs):
        ids = [t for d in deltas for t in d.token_ids]
        assert ids == alone(model, request), request.request_id
        assert handle.request_id == request.request_id and handle.prompt_tokens == len(request.prompt_ids)
        assert deltas[-1].finish_reason in ("stop", "length") and all(d.finish_reason is None for d in deltas[:-1])
        text = "".join(d.text for d in deltas)
        assert "\ufffd" not in text and text == ByteTokenizer().decode(ids).replace("\ufffd", "")
        assert handle.completion_tokens == len(ids) + (deltas[-1].finish_reason == "stop")
        assert handle.queued_at <= handle.first_token_at <= handle.finished_at


def test_a_short_request_does_not_wait_for_a_long_one(model):
    tags = Tags(delay=0.002)
    long = GenerationRequest([1, 2, 3], SamplingParams(max_new_tokens=60, temperature=0.0))
    short = GenerationRequest([4, 5], SamplingParams(max_new_tokens=3, temperature=0.0), adapter="b")

    async def main():
        scheduler = await started(model, max_batch=4, adapters=tags)
        long_handle = scheduler.submit(long)
        iterator = aiter(long_handle)
        await anext(iterator)  # the long one is running
        short_handle = scheduler.submit(short)
        short_deltas = await collect(short_handle)
        long_deltas = await collect(iterator)
        scheduler.close()
        return long_handle, short_handle, short_deltas, long_deltas

    long_handle, short_handle, short_deltas, long_deltas = run(main())
    assert short_handle.finished_at < long_handle.finished_at
    assert [t for d in short_deltas for t in d.token_ids] == alone(model, short)
    assert long_handle.completion_tokens == 60
    assert [None, "b"] in tags.calls  # the short one joined the long one's batch with its own adapter tag


def test_cancel_frees_the_row_at_the_next_step(model):
    tags = Tags(delay=0.005)
    first = GenerationRequest([1, 2, 3], SamplingParams(max_new_tokens=60, temperature=0.0))
    second = GenerationRequest([4, 5, 6], SamplingParams(max_new_tokens=4, temperature=0.7, seed=3))

    async def main():
        scheduler = await started(model, max_batch=1, adapters=tags)  # one row: the second one waits
        a, b = scheduler.submit(first), scheduler.submit(second)
        iterator = aiter(a)
        await anext(iterator)
        assert scheduler.running == 1 and scheduler.waiting == 1 and b.first_token_at is None
        seen = a.completion_tokens
        a.cancel()
        rest = await collect(iterator)
        b_deltas = await collect(b)
        scheduler.close()
        return a, b, seen, rest, b_deltas

    a, b, seen, rest, b_deltas = run(main())
    assert rest[-1].finish_reason == "cancelled" and a.finish_reason == "cancelled"
    assert a.completion_tokens <= seen + 2  # freed at the next step, not after its 60 tokens
    assert b.first_token_at >= a.finished_at - 1e-3
    assert [t for d in b_deltas for t in d.token_ids] == alone(model, second)


def test_a_full_queue_refuses_with_retry_after(model):
    request = GenerationRequest([1, 2], SamplingParams(max_new_tokens=30, temperature=0.0))

    async def main():
        scheduler = await started(model, max_batch=1, max_queue=2, adapters=Tags(delay=0.005))
        handles = [scheduler.submit(request), scheduler.submit(request)]
        with pytest.raises(QueueFull) as refused:
            for _ in range(2):  # at most one of them can be running: by the 4th, 2 wait
                handles.append(scheduler.submit(request))
        assert refused.value.retry_after >= 1.0
        outputs = await asyncio.gather(*(collect(h) for h in handles))
        scheduler.submit(request).cancel()  # room again once they are done
        scheduler.close()
        return outputs

    outputs = run(main())
    assert all(len(o) == 30 and o[-1].finish_reason == "length" for o in outputs)


def test_drain_finishes_running_requests_and_refuses_new_ones(model):
    request = GenerationRequest([1, 2], SamplingParams(max_new_tokens=20, temperature=0.0))

    async def main():
        scheduler = await started(model, max_batch=1, adapters=Tags(delay=0.002))
        assert scheduler.ready
        handles = [scheduler.submit(request), scheduler.submit(request)]
        drained = asyncio.create_task(scheduler.drain(timeout=60))
        await asyncio.sleep(0)
        assert not scheduler.ready
        with pytest.raises(Draining):
            scheduler.submit(request)
        outputs = await asyncio.gather(*(collect(h) for h in handles))
        await drained
        assert scheduler.running == scheduler.waiting == 0
        scheduler.close()
        return outputs

    outputs = run(main())
    assert [o[-1].finish_reason for o in outputs] == ["length", "length"]
    assert all(sum(len(d.token_ids) for d in o) == 20 for o in outputs)


def test_a_failing_step_fails_its_requests_and_the_next_ones_work(model):
    ok = GenerationRequest([1, 2, 3], SamplingParams(max_new_tokens=5, temperature=0.9, seed=7), adapter="a")
    boom = GenerationRequest([4, 5], SamplingParams(max_new_tokens=5), adapter="boom")

    async def main():
        scheduler = await started(model, max_batch=1, adapters=Tags())
        failing, queued = scheduler.submit(boom), scheduler.submit(ok)  # one row: ok waits behind boom
        failed, after = await collect(failing), await collect(queued)
        again = await collect(scheduler.submit(ok))
        with pytest.raises(ValueError, match="no adapter named 'zzz'"):
            scheduler.submit(GenerationRequest([1], SamplingParams(), adapter="zzz"))
        with pytest.raises(ValueError, match="context"):
            scheduler.submit(GenerationRequest([1] * 65, SamplingParams()))
        assert scheduler.ready
        scheduler.close()
        return failed, after, again

    failed, after, again = run(main())
    assert [d.finish_reason for d in failed] == ["error"] and failed[0].token_ids == []
    expected = alone(model, ok)
    assert [t for d in after for t in d.token_ids] == expected == [t for d in again for t in d.token_ids]


def test_logprobs_and_stop_strings(model):
    greedy = GenerationRequest([10, 11, 12], SamplingParams(max_new_tokens=12, temperature=0.0, top_logprobs=3))
    sampled = SamplingParams(max_new_tokens=40, temperature=1.0, seed=5)

    async def main(request):
        scheduler = await started(model)
        handle = scheduler.submit(request)
        deltas = await collect(handle)
        scheduler.close()
        return deltas, handle

    deltas, _ = run(main(greedy))
    ids = [t for d in deltas for t in d.token_ids]
    logprobs = [lp for d in deltas for lp in d.logprobs]
    assert len(logprobs) == len(ids) == 12
    for token_id, lp in zip(ids, logprobs):
        assert lp.bytes == [token_id] and len(lp.top) == 3 and lp.logprob <= 0
        assert lp.top[0][2] == [token_id] and lp.top[0][1] == pytest.approx(lp.logprob)  # greedy: the best one
        assert [t[1] for t in lp.top] == sorted((t[1] for t in lp.top), reverse=True)
    # a stop string from the middle of a sampled reply: the reply ends just before it, with "stop"
    deltas, _ = run(main(GenerationRequest([10, 11, 12], sampled)))
    text = "".join(d.text for d in deltas)
    assert len(text) >= 8 and deltas[-1].logprobs is None
    stop = text[len(text) // 2:len(text) // 2 + 2]
    deltas, handle = run(main(GenerationRequest([10, 11, 12], sampled, stops=["never", stop])))
    assert "".join(d.text for d in deltas) == text[:text.index(stop)]
    assert deltas[-1].finish_reason == "stop" and handle.completion_tokens < 40
