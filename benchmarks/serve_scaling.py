"""Where serving's batching gain goes: the engine alone, and a server under a light client.

    python benchmarks/serve_scaling.py engine --ckpt runs/demo/model            # rows 1 and 16, no HTTP
    python benchmarks/serve_scaling.py client --url http://127.0.0.1:8000 --clients 1,16

`engine`: `Engine.step` on the checkpoint with B rows kept full (a request of 32 tokens with a prompt
of 19-79 tokens, replaced as soon as it ends, seeded top-p sampling) for `--seconds`; tokens/s per B
and the ratio to B = 1 (what batching can give before HTTP, threads and the client take their share).
`client`: C streaming clients (asyncio + httpx) against a running `lmforge serve`, each sending
`--requests` chat requests of 32 tokens (`ignore_eos`), counting content chunks without per-chunk
bookkeeping (the light client of docs/BENCHMARKS.md "Serving"; `benchmarks/serve_load.py` is the full
load generator); then the server's mean batch size over the run from its `/metrics`.
"""

from __future__ import annotations

import argparse
import asyncio
import time


def engine_rate(ckpt: str, rows: int, seconds: float) -> float:
    from lmforge.infer.engine import Engine, SamplingParams
    from lmforge.train.checkpoint import load_pretrained

    model, _ = load_pretrained(ckpt)
    engine, added = Engine(model, max_batch=rows), 0

    def add() -> None:
        nonlocal added
        prompt = list(range(1, 20 + (added * 7) % 60))
        engine.add(prompt, SamplingParams(max_new_tokens=32, temperature=0.8, top_p=0.95, seed=added))
        added += 1

    for _ in range(rows):
        add()
    for _ in range(3):  # warm-up
        engine.step()
    start, tokens = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        events = engine.step()
        tokens += len(events)
        for _ in range(sum(e.finished for e in events)):
            add()
    return tokens / (time.perf_counter() - start)


async def one_client(client, url: str, i: int, requests: int) -> int:
    chunks = 0
    for r in range(requests):
        body = {"messages": [{"role": "user", "content": "Tell me of Romeo and the fair Juliet, " * (1 + (i + r) % 4)}],
                "max_tokens": 32, "temperature": 0.8, "seed": i * 100 + r, "stream": True, "ignore_eos": True}
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                chunks += line.startswith("data: {") and '"content"' in line
    return chunks


def batch_totals(url: str) -> tuple[float, float]:
    """(steps, rows) so far from the server's batch_size histogram."""
    import httpx

    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        for key in ("batch_size_count", "batch_size_sum"):
            if line.split("{")[0].endswith(":" + key):
                values[key] = float(line.split()[-1])
    return values.get("batch_size_count", 0.0), values.get("batch_size_sum", 0.0)


async def client_rate(url: str, clients: int, requests: int) -> float:
    import httpx

    async with httpx.AsyncClient(timeout=120) as client:
        await one_client(client, url, 0, 1)  # warm-up
        start = time.perf_counter()
        counts = await asyncio.gather(*[one_client(client, url, i, requests) for i in range(clients)])
        return sum(counts) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("engine", "client"))
    parser.add_argument("--ckpt", default="runs/demo/model")
    parser.add_argument("--rows", default="1,16", help="engine: batch rows to time")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", default="1,16")
    parser.add_argument("--requests", type=int, default=8, help="client: requests per client")
    args = parser.parse_args(argv)
    counts = [int(x) for x in (args.rows if args.mode == "engine" else args.clients).split(",")]
    base = None
    for n in counts:
        if args.mode == "engine":
            rate, note = engine_rate(args.ckpt, n, args.seconds), ""
        else:
            steps0, rows0 = batch_totals(args.url)
            rate = asyncio.run(client_rate(args.url, n, args.requests))
            steps1, rows1 = batch_totals(args.url)
            note = f"  mean batch {(rows1 - rows0) / max(steps1 - steps0, 1):.1f} rows"
        base = base or rate
        print(f"{args.mode} {n:3d}: {rate:7.0f} tokens/s  ({rate / base:.2f}x of {counts[0]}){note}")


if __name__ == "__main__":
    main()
