"""Serving metrics (`lmforge.serve.metrics.ServeMetrics`) as the scheduler reports them, read back
through prometheus_client's own exposition parser: every count equals what the requests did
(hand-computed token counts), under lmforge's prefix and vLLM's."""

from __future__ import annotations

import asyncio

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from lmforge.infer.engine import SamplingParams
from lmforge.models import GPT, ModelConfig
from lmforge.serve.metrics import ServeMetrics
from lmforge.serve.scheduler import GenerationRequest, QueueFull, Scheduler


class ByteTokenizer:
    eos_id = 256

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class Slow:
    """An AdapterSet stand-in whose every forward sleeps a little (so requests overlap)."""

    names: list[str] = []

    def __contains__(self, name: str) -> bool:
        return False

    def set_rows(self, tags: list) -> None:
        import time

        time.sleep(0.003)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=257, n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()


def samples(metrics: ServeMetrics) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels without model_name): value} from the text exposition."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            assert s.labels["model_name"] == "tiny"
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            out[(s.name, labels)] = s.value
    return out


def run_requests(model, metrics: ServeMetrics) -> list:
    # prompts of 3, 5, 2 tokens; 4, 7, 6 new tokens (no stop ids: each runs to max_new_tokens)
    requests = [GenerationRequest([1, 2, 3], SamplingParams(max_new_tokens=4, temperature=0.0)),
                GenerationRequest([4, 5, 6, 7, 8], SamplingParams(max_new_tokens=7, temperature=0.8, seed=1)),
                GenerationRequest([9, 10], SamplingParams(max_new_tokens=6, temperature=0.0))]
    long = GenerationRequest([11], SamplingParams(max_new_tokens=60, temperature=0.0))

    async def main():
        scheduler = Scheduler(model, ByteTokenizer(), max_batch=2, max_queue=3, metrics=metrics, adapters=Slow())
        scheduler.start()
        handles = [scheduler.submit(r) for r in requests]
        with pytest.raises(QueueFull):  # at most 2 of them run: 5 live means 3 waiting, the 6th is refused
            for _ in range(3):
                handles.append(scheduler.submit(requests[0]))
        for h in handles:
            async for _ in h:
                pass
        cancelled = scheduler.submit(long)
        async for _ in cancelled:
            if cancelled.completion_tokens >= 3:
                cancelled.cancel()
        scheduler.close()
        return handles, cancelled

    return asyncio.run(asyncio.wait_for(main(), 120))


@pytest.mark.parametrize("prefix", ["lmforge", "vllm"])
def test_counts_equal_what_the_requests_did(model, prefix):
    metrics = ServeMetrics("tiny", prefix=prefix)
    handles, cancelled = run_requests(model, metrics)
    got = samples(metrics)

    def value(name: str, **labels) -> float:
        return got[(f"{prefix}:{name}", tuple(sorted(labels.items())))]

    finished = handles + [cancelled]
    extra = len(handles) - 3  # more copies of the first request that were accepted before one was refused
    assert value("num_requests_rejected_total") == 1
    assert value("prompt_tokens_total") == 3 + 5 + 2 + 3 * extra + 1
    tokens = 4 + 7 + 6 + 4 * extra + cancelled.completion_tokens
    assert value("generation_tokens_total") == tokens == sum(h.completion_tokens for h in finished)
    assert value("request_success_total", finished_reason="length") == 3 + extra
    assert value("request_success_total", finished_reason="abort") == 1
    assert 3 <= cancelled.completion_tokens < 60
    n = len(finished)
    assert value("time_to_first_token_seconds_count") == n
    assert value("request_queue_time_seconds_count") == n
    assert value("e2e_request_latency_seconds_count") == n
    assert value("inter_token_latency_seconds_count") == tokens - n
    # every step's batch size is the number of tokens it made; at most 2 rows
    assert value("batch_size_sum") == tokens
    assert value("batch_size_bucket", le="2.0") == value("batch_size_count") >= tokens / 2
    assert value("batch_size_bucket", le="1.0") < value("batch_size_count")  # requests did share steps
    assert value("num_requests_running") == value("num_requests_waiting") == 0
    # the latencies are the handles' own
    ttft = sum(h.first_token_at - h.queued_at for h in finished)
    assert value("time_to_first_token_seconds_sum") == pytest.approx(ttft, rel=0.05, abs=0.01)
    e2e = sum(h.finished_at - h.queued_at for h in finished)
    assert value("e2e_request_latency_seconds_sum") == pytest.approx(e2e, rel=0.05, abs=0.01)
    assert value("time_to_first_token_seconds_bucket", le="+Inf") == n


def test_two_servers_in_one_process_keep_their_own_counts():
    a, b = ServeMetrics("tiny"), ServeMetrics("tiny")
    a.on_token(ttft=0.2)
    a.on_rejected()
    assert samples(a)[("lmforge:generation_tokens_total", ())] == 1
    assert samples(b)[("lmforge:generation_tokens_total", ())] == 0
    assert samples(a)[("lmforge:time_to_first_token_seconds_bucket", (("le", "0.25"),))] == 1
    assert samples(a)[("lmforge:time_to_first_token_seconds_bucket", (("le", "0.1"),))] == 0
