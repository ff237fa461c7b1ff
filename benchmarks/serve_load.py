"""Serving under load: `lmforge serve` (continuous batching) against a transformers-generate server.

    python benchmarks/serve_load.py                                  # demo model: 1/4/16/64 clients + the HF peer at 16
    python benchmarks/serve_load.py --ckpt runs/demo/model --clients 1,4,16,64 --requests 8 --json serve.json
    python benchmarks/serve_load.py --soak 600                       # 16 clients for 10 minutes: memory stays flat
    python benchmarks/serve_load.py --clients 1,2 --requests 2 --max-tokens 8 --peer-clients 2   # a smoke run

The script starts the servers itself on 127.0.0.1, one at a time (never both at once: they
would share the CPU): `lmforge serve --ckpt CKPT --max-batch 16 --max-queue 16` (`--serve-arg`
adds flags), then `benchmarks/hf_server.py` (the peer: one `model.generate` per request, a
thread each, on the same checkpoint converted by `lmforge convert to-hf`). Each server gets two
warm-up requests, then one run per client count: C concurrent streaming clients (asyncio +
httpx) each send `--requests` chat requests one after another (POST /v1/chat/completions,
`stream: true`, usage in the last chunk). A run ends when every request has finished or after
`--run-timeout` seconds (what is unfinished then is lost).

The prompts: single user messages cut from real text to a token count drawn uniformly from
`--prompt-tokens LO,HI` (seeded; default from the demo's chat SFT data, else its data/val
split, else `--texts FILE`). Both servers get the same prompts in the same order, the same
`max_tokens`, temperature and top_p, and `ignore_eos: true`, so every request writes exactly
`max_tokens` tokens and both servers do equal work (tokens per request are reported: a server
that ignored the field would show fewer).

Per request: TTFT (from sending the attempt that was answered to its first content chunk:
the server's queueing and prefill), inter-token latencies (gaps between content chunks),
completion tokens (`usage`, else the chunks), the status. A 429 is retried after its
`Retry-After` (counted); a request is lost when it never completes (an error, `--max-retries`
429s, or the run's time ran out). Reported per run: aggregate generated tokens/s (completion
tokens of all requests / the run's wall time), p50/p99 TTFT and ITL, ok, errors, 429s, lost,
the server's RSS after the run, and load% (the load generator's own CPU time / the run's wall
time: it shares the machine with the server); then the ratios the issue sets goals for: tokens/s at 16
clients / at 1 (>= 4x), lmforge / the peer at 16 clients (>= 2x), p99 TTFT at 16 (< 1 s), and
0 errors and 0 lost at 64 (excess gets 429 and is retried).

`--soak SECONDS`: `--soak-clients` (16) clients send requests without pause for that long; the
server's RSS (/proc/PID/status VmRSS) is sampled every `--sample-every` seconds; reported:
start, end, max and the least-squares slope in MB per minute over the samples after the first
10% of the run (warm-up allocations excluded), besides the run's figures. `--json OUT` writes
everything. Ctrl-C stops the clients and the servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_CKPT = REPO / "runs" / "demo" / "model"
DEFAULT_TEXTS = (REPO / "runs" / "demo" / "posttrain" / "data" / "sft.jsonl", REPO / "runs" / "demo" / "data" / "val")
GOALS = {"scaling_16_vs_1": 4.0, "lmforge_vs_peer_16": 2.0, "p99_ttft_16_s": 1.0}


# ---- prompts ------------------------------------------------------------------------------------


def read_texts(path: Path) -> list[str]:
    """Texts of a parquet file or dir ("text"), a .jsonl file (user messages, or "text"), or a text file."""
    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if files and files[0].suffix == ".parquet":
        import pyarrow.parquet as pq

        return [t for f in files for t in pq.read_table(f, columns=["text"]).column("text").to_pylist() if t]
    if path.suffix == ".jsonl":
        texts = []
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line) if line.strip() else {}
            users = [m["content"] for m in row.get("messages", []) if m.get("role") == "user"]
            texts += users or ([row["text"]] if row.get("text") else [])
        return [t for t in texts if t.strip()]
    return [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]


def default_texts() -> Path:
    for path in DEFAULT_TEXTS:
        if path.exists():
            return path
    return REPO / "README.md"


def make_prompts(texts: list[str], template, count: int, lo: int, hi: int, budget: int, seed: int) -> list[dict]:
    """`count` prompts: {"content", "prompt_tokens"} cut from `texts` to lo..hi tokens (seeded),
    each fitting `budget` tokens as a chat prompt (the template's role tokens included)."""
    rng = random.Random(seed)
    tokenizer = template.tokenizer
    prompts = []
    while len(prompts) < count:
        ids = tokenizer.encode(rng.choice(texts))
        want = rng.randint(lo, hi)
        start = rng.randrange(max(len(ids) - want, 0) + 1)
        content = tokenizer.decode(ids[start:start + want]).strip()
        while content:
            n = len(template.encode([{"role": "user", "content": content}], add_generation_prompt=True))
            if n <= budget:
                prompts.append({"content": content, "prompt_tokens": n})
                break
            content = content[: int(len(content) * 0.9)]
    return prompts


# ---- one request --------------------------------------------------------------------------------


@dataclass
class Record:
    """One request as the client saw it (times: time.perf_counter())."""

    client: int
    index: int
    prompt_tokens: int
    sent: float = 0.0  # the first attempt
    attempt: float = 0.0  # the attempt that was answered
    first: float | None = None  # its first content chunk
    done: float | None = None  # [DONE] received
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0  # completion tokens (usage, else content chunks)
    server_prompt_tokens: int | None = None  # usage.prompt_tokens: the server's count of the same prompt
    retries: int = 0  # 429s
    status: int | None = None
    error: str | None = None
    cause: str | None = None  # why it failed: "error" (a status other than 429, a broken stream), "429", "time"

    def fail(self, error: str, cause: str = "error") -> None:
        self.error, self.cause = error, cause

    @property
    def ok(self) -> bool:
        return self.done is not None and self.error is None

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.attempt

    @property
    def itl(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]


def retry_after(headers) -> float:
    try:
        return max(float(headers.get("retry-after", 1.0)), 0.0)
    except ValueError:
        return 1.0


async def attempt(client, url: str, body: dict, rec: Record) -> float | None:
    """One POST of a streamed chat request into `rec`; the Retry-After seconds on a 429, else None."""
    rec.attempt, rec.chunk_times, rec.first = time.perf_counter(), [], None
    async with client.stream("POST", url, json=body) as response:
        rec.status = response.status_code
        if response.status_code == 429:
            await response.aread()
            return retry_after(response.headers)
        if response.status_code != 200:
            rec.fail(f"HTTP {response.status_code}: {(await response.aread())[:200].decode(errors='replace')}")
            return None
        chunks = 0
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                rec.done = time.perf_counter()
                break
            chunks += read_chunk(json.loads(data), rec)
            if rec.error:
                return None
        rec.tokens = rec.tokens or chunks
        if rec.done is None:
            rec.fail("the stream ended without [DONE]")
    return None


def read_chunk(chunk: dict, rec: Record) -> int:
    """Take one SSE chunk into `rec`; 1 if it carried content."""
    if "error" in chunk:
        rec.fail(f"error event: {str(chunk['error'])[:200]}")
        return 0
    if chunk.get("usage"):
        rec.tokens = int(chunk["usage"].get("completion_tokens") or 0)
        rec.server_prompt_tokens = chunk["usage"].get("prompt_tokens")
    choices = chunk.get("choices") or []
    if choices and (choices[0].get("delta") or {}).get("content"):
        now = time.perf_counter()
        rec.first = rec.first or now
        rec.chunk_times.append(now)
        return 1
    return 0


async def run_request(client, url: str, body: dict, rec: Record, deadline: float, max_retries: int) -> Record:
    """Send one request until it completes: 429s are retried after Retry-After (while time is left)."""
    rec.sent = time.perf_counter()
    while True:
        try:
            wait = await attempt(client, url, body, rec)
        except Exception as e:  # noqa: BLE001 - a connection/protocol failure is this request's error
            rec.fail(f"{type(e).__name__}: {e}"[:200])
            return rec
        if wait is None:
            return rec
        rec.retries += 1
        if rec.retries > max_retries or time.perf_counter() + wait > deadline:
            rec.fail(f"gave up after {rec.retries} 429s", "429")
            return rec
        await asyncio.sleep(wait)


# ---- a run: C clients ---------------------------------------------------------------------------


def request_body(prompt: dict, opts: dict) -> dict:
    return {"model": opts.get("model") or "default", "messages": [{"role": "user", "content": prompt["content"]}],
            "max_tokens": opts["max_tokens"], "temperature": opts["temperature"], "top_p": opts["top_p"],
            "stream": True, "stream_options": {"include_usage": True}, **opts.get("extra", {})}


async def client_loop(client, url, prompts, i, opts, deadline, records, progress, stop_at=None) -> None:
    """Client i: its requests one after another (`opts["requests"]`, or until `stop_at` when set)."""
    j = 0
    while (j < opts["requests"]) if stop_at is None else (time.perf_counter() < stop_at):
        prompt = prompts[(i * 7919 + j) % len(prompts)]  # every client its own walk through the prompts
        rec = Record(client=i, index=j, prompt_tokens=prompt["prompt_tokens"])
        records.append(rec)
        if time.perf_counter() >= deadline:
            rec.fail("the run's time ran out before it was sent", "time")
        else:
            await run_request(client, url, request_body(prompt, opts), rec, deadline, opts["max_retries"])
        progress(rec)
        j += 1


async def run_clients(base_url: str, prompts: list[dict], clients: int, opts: dict, *, seconds: float | None = None,
                      progress=lambda rec: None) -> tuple[list[Record], float]:
    """`clients` concurrent streaming clients against `base_url`; every request's Record and the wall time.
    With `seconds`, the clients send requests until then (a soak); else `opts["requests"]` each."""
    import httpx

    records: list[Record] = []
    headers = {"Authorization": f"Bearer {opts['api_key']}"} if opts.get("api_key") else {}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    timeout = httpx.Timeout(opts["request_timeout"], connect=30.0)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=timeout) as client:
        # the run's time starts once the HTTP client exists (making it, e.g. its TLS context, can take a
        # second on a loaded machine: time that must not be taken from the requests)
        t0 = time.perf_counter()
        stop_at = t0 + seconds if seconds is not None else None
        deadline = t0 + opts["run_timeout"] + (seconds or 0)
        tasks = [asyncio.create_task(client_loop(client, "/v1/chat/completions", prompts, i, opts, deadline, records,
                                                 progress, stop_at)) for i in range(clients)]
        _, pending = await asyncio.wait(tasks, timeout=max(deadline - time.perf_counter(), 0))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for rec in records:
        if rec.done is None and rec.error is None:
            rec.fail("unfinished when the run's time ran out", "time")
    return records, time.perf_counter() - t0


# ---- figures ------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    rank = (len(xs) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def summarize(records: list[Record], wall: float) -> dict:
    """The run's figures: tokens/s, TTFT and ITL percentiles (s), counts."""
    ok = [r for r in records if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [gap for r in ok for gap in r.itl]
    tokens = sum(r.tokens for r in ok)
    return {"requests": len(records), "ok": len(ok), "errors": sum(1 for r in records if r.cause == "error"),
            "retries_429": sum(r.retries for r in records), "lost": len(records) - len(ok),
            "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "tokens_per_request": tokens / len(ok) if ok else 0.0,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
            "prompt_tokens_differ": sum(1 for r in ok if r.server_prompt_tokens not in (None, r.prompt_tokens)),
            "first_errors": sorted({r.error for r in records if r.error})[:3]}


def slope_per_minute(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MB) samples, in MB per minute."""
    if len(samples) < 2:
        return None
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mm = sum(m for _, m in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    return 60.0 * sum((t - mt) * (m - mm) for t, m in samples) / var if var > 0 else None


def ratios(results: dict) -> dict:
    """The goals' figures from `results[server][clients]` summaries (None where a run is missing)."""
    ours, peer = ({c: s for c, s in results.get(name, {}).items() if isinstance(c, int)} for name in ("lmforge", "hf"))

    def tps(runs, c):
        return runs.get(c, {}).get("tokens_per_s")

    def div(a, b):
        return a / b if a is not None and b else None

    top = max(ours) if ours else None
    return {"scaling_16_vs_1": div(tps(ours, 16), tps(ours, 1)),
            "lmforge_vs_peer_16": div(tps(ours, 16), tps(peer, 16)),
            "p99_ttft_16_s": ours.get(16, {}).get("ttft_p99_s"),
            "most_clients": top, "errors_at_most": ours[top]["errors"] if top else None,
            "lost_at_most": ours[top]["lost"] if top else None}


# ---- the servers --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    """The process's resident set size in MB (Linux /proc; psutil elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except Exception:  # noqa: BLE001 - no figure rather than a failed benchmark
        return None


class ServerFailed(Exception):
    """A server did not start or did not answer /v1/models (the message says why, with its log's tail)."""


class Server:
    """A server process on 127.0.0.1 (its own session, so Ctrl-C reaches only us; we stop it)."""

    def __init__(self, name: str, command: list[str], port: int, log_dir: Path) -> None:
        self.name, self.command, self.port = name, command, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float) -> Server:
        import httpx

        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                         start_new_session=True)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise ServerFailed(f"{self.name} server exited with {self.proc.returncode} while starting; "
                                 f"its log {self.log}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise ServerFailed(f"{self.name} server not ready after {timeout:.0f} s; its log {self.log}:\n{self.tail()}")

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def rss_mb(self) -> float | None:
        return rss_mb(self.proc.pid) if self.proc else None

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM (lmforge serve drains), then SIGKILL after `grace` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        except KeyboardInterrupt:  # a second Ctrl-C: do not wait for the drain
            self.proc.kill()
            self.proc.wait()
            raise


def lmforge_server(args, log_dir: Path) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "lmforge", "serve", "--ckpt", str(args.ckpt), "--host", "127.0.0.1",
               "--port", str(port), "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue)]
    return Server("lmforge", command + [a for arg in args.serve_arg for a in arg.split()], port, log_dir)


def hf_server(args, hf_dir: Path, log_dir: Path) -> Server:
    port = free_port()
    command = [sys.executable, str(HERE / "hf_server.py"), "--hf", str(hf_dir), "--port", str(port)]
    return Server("hf", command + [a for arg in args.peer_arg for a in arg.split()], port, log_dir)


def converted(ckpt: Path, hf_dir: Path | None, work: Path) -> Path:
    """The checkpoint as an HF dir (`lmforge convert to-hf`): `hf_dir` if it already holds one."""
    if hf_dir is not None and (hf_dir / "config.json").is_file():
        return hf_dir
    out = hf_dir or work / "hf"
    subprocess.run([sys.executable, "-m", "lmforge", "convert", "to-hf", str(ckpt), str(out), "--overwrite"],
                   check=True, cwd=REPO)
    return out


# ---- driving it ---------------------------------------------------------------------------------


def load_prompts(args) -> tuple[list[dict], int]:
    """The prompts (drawn from --texts) and the model's context."""
    from lmforge.tokenizer import Tokenizer
    from lmforge.tokenizer.chat import chat_template
    from lmforge.train.checkpoint import read_model_config, resolve_checkpoint

    ckpt = resolve_checkpoint(args.ckpt)
    context = int(read_model_config(ckpt)["block_size"])
    budget = context - args.max_tokens
    lo, hi = (int(x) for x in args.prompt_tokens.split(",")) if args.prompt_tokens else (8, min(256, budget - 8))
    if budget < lo + 3:
        raise SystemExit(f"--max-tokens {args.max_tokens} leaves {budget} of the context's {context} tokens "
                         f"for prompts of {lo}+ tokens; lower --max-tokens or --prompt-tokens")
    source = args.texts or default_texts()
    if not Path(source).exists():
        raise SystemExit(f"--texts {source}: no such file or directory")
    texts = read_texts(source)
    if not texts:
        raise SystemExit(f"--texts {source}: no text in it; give a parquet dir, a .jsonl or a text file")
    template = chat_template(Tokenizer.load(ckpt / "tokenizer.json"))
    return make_prompts(texts, template, args.num_prompts, lo, hi, budget, args.seed), context


def progress_bar(total: int | None, desc: str):
    """(tqdm bar, callback per finished request)."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="req", leave=False, file=sys.stderr)
    counts = {"429": 0, "failed": 0}

    def update(rec: Record) -> None:
        counts["429"] += rec.retries
        counts["failed"] += not rec.ok
        bar.update(1)
        bar.set_postfix(counts, refresh=False)

    return bar, update


def run_level(server: Server, prompts: list[dict], clients: int, opts: dict) -> dict:
    bar, update = progress_bar(clients * opts["requests"], f"{server.name} {clients} clients")
    cpu = time.process_time()
    try:
        records, wall = asyncio.run(run_clients(server.url, prompts, clients, opts, progress=update))
    finally:
        bar.close()
    out = summarize(records, wall)
    out["rss_mb"], out["client_cpu_s"] = server.rss_mb(), time.process_time() - cpu
    print_row(server.name, clients, out)
    if out["prompt_tokens_differ"]:
        print(f"    note: {out['prompt_tokens_differ']} replies report another prompt_tokens than lmforge's chat "
              "template gives: the server built other prompt ids")
    if opts["extra"].get("ignore_eos") and out["ok"] and out["tokens_per_request"] < opts["max_tokens"]:
        print(f"    note: replies average {out['tokens_per_request']:.1f} of max_tokens {opts['max_tokens']} tokens: "
              "the server does not honour ignore_eos, so the servers' tokens/s are not for equal work")
    return out


async def soak_async(server: Server, prompts: list[dict], clients: int, seconds: float, every: float,
                     opts: dict, update) -> tuple[list[Record], float, list[tuple[float, float]]]:
    samples: list[tuple[float, float]] = []
    t0 = time.perf_counter()
    run = asyncio.create_task(run_clients(server.url, prompts, clients, opts, seconds=seconds, progress=update))
    while not run.done():
        mb = server.rss_mb()
        if mb is not None:
            samples.append((time.perf_counter() - t0, mb))
        await asyncio.wait([run], timeout=every)
    records, wall = run.result()
    return records, wall, samples


def run_soak(server: Server, prompts: list[dict], args, opts: dict) -> dict:
    bar, update = progress_bar(None, f"{server.name} soak {args.soak:.0f} s, {args.soak_clients} clients")
    cpu = time.process_time()
    try:
        records, wall, samples = asyncio.run(soak_async(server, prompts, args.soak_clients, args.soak,
                                                        args.sample_every, opts, update))
    finally:
        bar.close()
    out = summarize(records, wall)
    out["client_cpu_s"] = time.process_time() - cpu
    mbs = [m for _, m in samples]
    settled = [(t, m) for t, m in samples if t >= 0.1 * args.soak]
    half = [m for t, m in samples if t >= 0.5 * args.soak]
    out["rss_mb"] = mbs[-1] if mbs else None
    out["memory"] = {"samples": samples, "start_mb": mbs[0] if mbs else None, "end_mb": out["rss_mb"],
                     "max_mb": max(mbs) if mbs else None, "slope_mb_per_min": slope_per_minute(settled),
                     "second_half_growth_mb": half[-1] - half[0] if half else None}
    print_row(server.name, args.soak_clients, out)
    m = out["memory"]
    if mbs:
        slope = "n/a" if m["slope_mb_per_min"] is None else f"{m['slope_mb_per_min']:+.2f} MB/min"
        print(f"  RSS over {wall:.0f} s ({len(samples)} samples): start {m['start_mb']:.0f} MB, end "
              f"{m['end_mb']:.0f} MB, max {m['max_mb']:.0f} MB; slope after the first 10%: {slope}; growth over "
              f"the second half: {fmt(m['second_half_growth_mb'], 1, '+.1f')} MB")
    return out


def fmt(x: float | None, scale: float = 1.0, spec: str = ".0f") -> str:
    return "-" if x is None else format(x * scale, spec)


def print_header() -> None:
    print(f"  {'server':<8} {'clients':>7} {'tok/s':>8} {'TTFT p50':>9} {'p99 ms':>8} {'ITL p50':>8} {'p99 ms':>8} "
          f"{'ok':>5} {'errors':>6} {'429s':>5} {'lost':>5} {'tok/req':>7} {'RSS MB':>7} {'load%':>6}")


def print_row(name: str, clients: int, s: dict) -> None:
    print(f"  {name:<8} {clients:>7} {s['tokens_per_s']:>8.1f} {fmt(s['ttft_p50_s'], 1e3):>9} "
          f"{fmt(s['ttft_p99_s'], 1e3):>8} {fmt(s['itl_p50_s'], 1e3, '.1f'):>8} {fmt(s['itl_p99_s'], 1e3, '.1f'):>8} "
          f"{s['ok']:>5} {s['errors']:>6} {s['retries_429']:>5} {s['lost']:>5} {s['tokens_per_request']:>7.1f} "
          f"{fmt(s.get('rss_mb')):>7} {fmt(s.get('client_cpu_s', 0) / s['wall_s'], 100):>6}", flush=True)
    for error in s["first_errors"]:
        print(f"    e.g. {error}")


def print_ratios(q: dict) -> None:
    def line(label, value, goal, better, unit="x"):
        if value is None:
            return print(f"  {label}: not measured")
        met = value >= goal if better == ">=" else value < goal
        print(f"  {label}: {value:.2f}{unit} (goal {better} {goal:g}{unit}: {'met' if met else 'NOT met'})")

    line("tokens/s at 16 clients / at 1 client", q["scaling_16_vs_1"], GOALS["scaling_16_vs_1"], ">=")
    line("lmforge / transformers peer at 16 clients", q["lmforge_vs_peer_16"], GOALS["lmforge_vs_peer_16"], ">=")
    line("p99 TTFT at 16 clients", q["p99_ttft_16_s"], GOALS["p99_ttft_16_s"], "<", " s")
    if q["most_clients"] is not None:
        print(f"  at {q['most_clients']} clients: {q['errors_at_most']} errors, {q['lost_at_most']} lost (goal 0, 0)")


def served_model(server: Server, api_key: str | None) -> str:
    """The first model id of the server's /v1/models (what requests must name)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(server.url + "/v1/models", headers=headers, timeout=30.0)
    if response.status_code != 200:
        raise ServerFailed(f"{server.name}: GET /v1/models answered {response.status_code}: {response.text[:200]}")
    return response.json()["data"][0]["id"]


def serve_and_measure(server: Server, prompts: list[dict], levels: list[int], opts: dict, args) -> dict:
    """Start `server`, warm it up, one run per client count; always stopped afterwards."""
    try:
        server.start(args.start_timeout)
        opts = {**opts, "model": served_model(server, opts.get("api_key"))}
        asyncio.run(run_clients(server.url, prompts, 1, {**opts, "requests": args.warmup}))
        if args.soak:
            return {"soak": run_soak(server, prompts, args, opts)}
        return {c: run_level(server, prompts, c, opts) for c in levels}
    finally:
        server.stop()


def options(args) -> dict:
    extra = {} if args.no_ignore_eos else {"ignore_eos": True}
    return {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p, "extra": extra,
            "requests": args.requests, "run_timeout": args.run_timeout, "request_timeout": args.request_timeout,
            "max_retries": args.max_retries, "api_key": os.environ.get("LMFORGE_API_KEY")}


def measure(args, prompts: list[dict], work: Path) -> dict:
    """Every server's runs (or the soak), one server at a time."""
    opts = options(args)
    servers = [s for s in args.servers.split(",") if s]
    results: dict = {}
    print_header()
    for name in servers:
        levels = args.clients if name == "lmforge" else args.peer_clients
        if args.soak and name != "lmforge" or not levels:
            continue
        if name == "lmforge":
            server = lmforge_server(args, work)
        else:
            server = hf_server(args, converted(Path(args.ckpt), args.hf_dir, work), work)
        try:
            results[name] = serve_and_measure(server, prompts, levels, opts, args)
        except ServerFailed as e:
            print(f"  {name}: {e}", flush=True)
            results[name] = {"failed": str(e)}
    return results


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--ckpt", default=str(DEFAULT_CKPT), help="checkpoint or run dir (default: runs/demo/model)")
    p.add_argument("--hf-dir", type=Path, help="the checkpoint converted to HF (reused if it holds one, else "
                   "written there; default: a temp dir)")
    p.add_argument("--servers", default="lmforge,hf", help="which to run: lmforge, hf (the transformers peer)")
    p.add_argument("--clients", type=ints, default=[1, 4, 16, 64], help="concurrent clients per run (lmforge)")
    p.add_argument("--peer-clients", type=ints, default=[16], help="client counts for the HF peer")
    p.add_argument("--requests", type=int, default=8, help="chat requests per client per run")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens each request generates")
    p.add_argument("--prompt-tokens", help="LO,HI prompt tokens (default 8 up to the context left, at most 256)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos: replies may end early")
    p.add_argument("--texts", type=Path, help="prompt text: parquet dir/file, .jsonl (user messages / text), .txt")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch", type=int, default=16, help="lmforge serve --max-batch")
    p.add_argument("--max-queue", type=int, default=16, help="lmforge serve --max-queue (64 clients: 429s)")
    p.add_argument("--serve-arg", action="append", default=[], help="more lmforge serve flags, e.g. '--dtype bfloat16'")
    p.add_argument("--peer-arg", action="append", default=[], help="more hf_server.py flags, e.g. '--max-concurrent 4'")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests after each server starts")
    p.add_argument("--run-timeout", type=float, default=600.0, help="seconds a run may take (then: lost)")
    p.add_argument("--request-timeout", type=float, default=300.0, help="httpx read timeout per request")
    p.add_argument("--max-retries", type=int, default=1000, help="429 retries before a request is lost")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds a server may take to become ready")
    p.add_argument("--soak", type=float, default=0.0, metavar="SECONDS", help="soak lmforge serve instead of runs")
    p.add_argument("--soak-clients", type=int, default=16)
    p.add_argument("--sample-every", type=float, default=5.0, help="soak: seconds between RSS samples")
    p.add_argument("--json", type=Path, metavar="OUT", help="write every figure to OUT")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompts, context = load_prompts(args)
    n = [p["prompt_tokens"] for p in prompts]
    print(f"{args.ckpt}: context {context}; {len(prompts)} prompts of {min(n)}-{max(n)} tokens (mean "
          f"{sum(n) / len(n):.0f}, chat format) from {args.texts or default_texts()}; {args.max_tokens} tokens per "
          f"request{'' if args.no_ignore_eos else ' (ignore_eos)'}, temperature {args.temperature}, top_p {args.top_p}")
    out = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "context": context, "prompt_tokens": {"min": min(n), "max": max(n), "mean": sum(n) / len(n)},
           "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    with tempfile.TemporaryDirectory(prefix="serve_load_") as work:
        try:
            out["results"] = measure(args, prompts, Path(work))
        except KeyboardInterrupt:
            print("interrupted: the servers are stopped", file=sys.stderr)
            return 130
    if not args.soak:
        out["ratios"] = ratios(out["results"])
        print_ratios(out["ratios"])
    if args.json:
        from lmforge.fsutil import atomic_write_json

        atomic_write_json(args.json, out)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
