"""The generation engine: requests that decode together and join or leave at any step.

    engine = Engine(model, max_batch=8)
    rid = engine.add(prompt_ids, SamplingParams(max_new_tokens=64, temperature=0.8, seed=1))
    while engine.has_work:
        for event in engine.step():     # one new token for every running request
            ...event.request_id, event.token_id, event.finished, event.reason ("stop" / "length")
    engine.remove(rid)                  # cancel: its slot is free for the next step

`add` queues a request (prompt ids, `SamplingParams`: max_new_tokens, temperature, top_k,
top_p, a seed for the request's own `torch.Generator`, stop ids). `step` admits queued requests
while there are free slots (`max_batch`), prefills their prompts (right-padded, in one forward)
and runs one decode forward over every request already running; each running request gets one
token. A decoder-only model (GPT: learned, sinusoidal or rotary positions; dense or MoE) reads
the prompt itself; an encoder-decoder (`has_capability(model, "encoder_decoder")`) encodes the
prompt once when the request joins, keeps its encoder output's cross-attention keys/values in
the cache, and decodes from the start token. Every piece of the old `generate`, batched
generation, `generate_texts`, chat and eval now runs here (`infer.generate` wraps it).

The cache: ONE `KVCache` of `max_batch` preallocated rows in which each row has its own length
(`models/blocks.py`). The running requests always occupy rows 0..n-1: a request that ends or is
removed is replaced by the last row (`KVCache.move_row` copies that row's cached prefix once),
so a decode step is one forward over `cache.view(0, n)`, a slice of the buffers, with no
per-step re-padding or stacking of caches; new requests are prefilled into the rows after them
(`cache.view(n, n + k)`). When all rows have the same length (one request, or prompts of one
length) the forward is exactly the single-sequence one; otherwise each row gets its own
positions and a mask hiding what lies past its end, built once per forward from the lengths.
Per-request caches stacked each step were the alternative: simpler bookkeeping, but a copy of
every cache every token. A paged cache (vLLM) saves memory for long contexts of very
different lengths; rows of `block_size` are fine at lmforge's scale and need no custom kernels.

Sampling is batched (`sample_rows`): temperature, top-k and top-p for all rows at once (per-row
values allowed), then one draw per sampling row from its own generator. The draw is the one
`torch.multinomial(probs, 1)` makes (the argmax of probs / Exp(1) noise, PyTorch's own
algorithm), so a seed gives the same tokens as `sample_next` on that row alone, whatever else
shares the batch: batching changes nothing but the round-off of batched matmuls (which can
flip a near-tie). `Event.logprob` is the chosen token's log-probability under the model
(before temperature and truncation), computed only for requests that ask (`logprobs=True`).
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lmforge.models import eval_mode, has_capability


@dataclass(frozen=True)
class SamplingParams:
    """How one request is continued. temperature 0 is greedy; top_k / top_p None (or 0 / 1.0) keep
    every token; seed None draws fresh randomness; a token in stop_ids ends the request (it is
    still reported, as its last token); logprobs asks for `Event.logprob`; top_logprobs > 0 asks for
    `Event.top_logprobs` too (the n most likely tokens, implies logprobs)."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_ids: frozenset[int] = field(default_factory=frozenset)
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_ids", frozenset(int(i) for i in self.stop_ids))
        if self.top_logprobs:
            object.__setattr__(self, "logprobs", True)
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Event:
    """One new token of one request; `finished` with `reason` "stop" (a stop id) or "length"
    (max_new_tokens, or the context is full) on its last one. `logprob` (if asked): the token's
    log-probability under the model; `top_logprobs` (if asked): ((token id, logprob), ...) of the
    most likely tokens, best first."""

    request_id: int
    token_id: int
    finished: bool = False
    reason: str | None = None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def new_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A generator on `device` seeded with `seed` (fresh randomness when None)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def forward_context(device: torch.device, autocast_dtype: torch.dtype | None) -> contextlib.ExitStack:
    """inference_mode, and autocast to `autocast_dtype` if given, for one forward pass."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    if autocast_dtype:
        stack.enter_context(torch.autocast(device.type, dtype=autocast_dtype))
    return stack


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Pick one token per row of logits (B, V); returns (B,) token ids.

    temperature == 0 is greedy (argmax). Otherwise logits are divided by the temperature,
    top-k keeps the k most likely tokens, then top-p (nucleus) keeps the smallest set of the
    remaining tokens whose probability sums to at least p, and one token is drawn.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = logits.float()  # sample in fp32: bf16 probabilities are too coarse
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = truncated_probs(logits / temperature, top_k, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def truncated_probs(logits: Tensor, top_k: int | tuple[Tensor, int] | None, top_p: float | Tensor | None) -> Tensor:
    """softmax(logits) after top-k, then top-p, truncation. One k / p for all rows, or per row: k as
    ((B, 1) tensor, its largest value), 0 keeping every token; p as a (B, 1) tensor, inf keeping all."""
    if isinstance(top_k, tuple) or (top_k is not None and 0 < top_k < logits.shape[-1]):
        if isinstance(top_k, tuple):
            k, k_max = top_k
            kth_best = torch.topk(logits, k_max, dim=-1).values.gather(-1, (k - 1).clamp(min=0))
            kth_best = kth_best.masked_fill(k == 0, float("-inf"))
        else:
            kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if isinstance(top_p, Tensor) or (top_p is not None and top_p < 1.0):
        logits = nucleus(logits, top_p)
    return logits.softmax(dim=-1)


NUCLEUS_CANDIDATES = 256


def nucleus(logits: Tensor, top_p: float | Tensor) -> Tensor:
    """logits with every token outside the top-p nucleus at -inf: a token is dropped when the
    tokens ranked above it already reach p (the top one always stays), so the kept set is the
    smallest with cumulative probability >= p. The ranking looks at the NUCLEUS_CANDIDATES best
    tokens first (a top-k instead of sorting the whole vocabulary: the sort was a fifth of a
    16-row decode step); when they do not reach p in some row, it sorts everything."""
    probs = logits.softmax(dim=-1)
    k = min(NUCLEUS_CANDIDATES, logits.shape[-1])
    ranked, order = torch.topk(probs, k, dim=-1)
    if k < logits.shape[-1] and not bool((ranked.sum(dim=-1, keepdim=True) >= top_p).all()):
        ranked, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = ranked.cumsum(dim=-1) - ranked
    keep = mass_before < top_p
    keep[:, 0] = True
    kept = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, keep)
    return logits.masked_fill(~kept, float("-inf"))


class RowSampling:
    """The sampling settings of a batch's rows as tensors, made once per batch composition."""

    def __init__(self, params: Sequence[SamplingParams], vocab_size: int, device: torch.device) -> None:
        def one_or_rows(values: list, missing: float, dtype: torch.dtype):
            """None when no row uses it, the value when all rows share it, else a (B, 1) tensor."""
            if all(v is None for v in values):
                return None
            if len(set(values)) == 1:
                return values[0]
            return torch.tensor([missing if v is None else v for v in values], dtype=dtype, device=device)[:, None]

        self.greedy = [p.temperature == 0 for p in params]
        self.sampling_rows = [i for i, greedy in enumerate(self.greedy) if not greedy]
        sampling = [params[i] for i in self.sampling_rows]
        self.temperature = one_or_rows([p.temperature for p in sampling], 1.0, torch.float32)
        ks = [p.top_k if p.top_k and 0 < p.top_k < vocab_size else None for p in sampling]
        self.top_k = one_or_rows(ks, 0, torch.long)
        if isinstance(self.top_k, Tensor):
            self.top_k = (self.top_k, max(k for k in ks if k is not None))
        self.top_p = one_or_rows([p.top_p if p.top_p is not None and p.top_p < 1.0 else None for p in sampling],
                                 float("inf"), torch.float32)
        self.logprobs = [p.logprobs for p in params]
        self.all_rows = len(self.sampling_rows) == len(params)
        self.rows_index = torch.tensor(self.sampling_rows, device=device)


def sample_rows(logits: Tensor, rows: RowSampling, generators: Sequence[torch.Generator | None],
                shared: torch.Generator | None = None) -> Tensor:
    """One token per row of logits (B, V), each row as `sample_next` samples it with its own
    settings and generator (`RowSampling`); greedy rows draw nothing from theirs. Sampling rows
    without a generator of their own (unseeded requests) draw together from `shared`, in one call."""
    logits = logits.float()
    picked = logits.argmax(dim=-1)
    if not rows.sampling_rows:
        return picked
    x = logits if rows.all_rows else logits.index_select(0, rows.rows_index)
    probs = truncated_probs(x / rows.temperature, rows.top_k, rows.top_p)
    # torch.multinomial(probs, 1, generator) is argmax(probs / q), q ~ Exp(1) drawn from the
    # generator: one draw per row from the row's own generator, then one batched argmax
    noise = torch.empty_like(probs)
    own = [(row, generators[i]) for row, i in enumerate(rows.sampling_rows) if generators[i] is not None]
    if len(own) < len(rows.sampling_rows):
        noise.exponential_(generator=shared)  # every row at once; rows with a generator redraw below
    for row, generator in own:
        noise[row].exponential_(generator=generator)
    drawn = probs.div_(noise).argmax(dim=-1)
    return drawn if rows.all_rows else picked.index_copy_(0, rows.rows_index, drawn)


# ---- a faster output layer for CPU decoding --------------------------------------------------

class TransposedLinear(nn.Module):
    """An `nn.Linear`'s output computed as x @ W^T from a contiguous (in, out) copy of W^T.

    On CPU a GEMV/GEMM against the (out, in) layout that `F.linear` reads runs at a third of the
    memory bandwidth the (in, out) layout gets (MKL, AVX2: 50304 x 384 fp32, one token: ~6 ms vs
    ~2.3 ms; eight tokens ~15 vs ~10 ms). The output layer over a 50k vocabulary is the largest
    matrix of a small model, read once per decode step, so the engine computes it this way
    (`transposed_output_layer`). Same values up to float round-off (another summation order)."""

    def __init__(self, linear: nn.Linear, weight_t: Tensor) -> None:
        super().__init__()
        self.linear = linear
        self.weight_t = weight_t

    def forward(self, x: Tensor) -> Tensor:
        y = torch.matmul(x, self.weight_t)
        return y if self.linear.bias is None else y + self.linear.bias


TRANSPOSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Linear -> (weight's identity, W^T copy)


def transposed_weight(linear: nn.Linear) -> Tensor:
    """A contiguous copy of linear.weight^T, kept while the Linear lives and remade when its weight
    changes (another tensor, or an in-place update: the tensor's version counter)."""
    w = linear.weight
    key = (w.data_ptr(), w._version, tuple(w.shape), w.dtype, w.device)
    hit = TRANSPOSED.get(linear)
    if hit is None or hit[0] != key:
        hit = (key, w.detach().t().contiguous())
        TRANSPOSED[linear] = hit
    return hit[1]


def use_transposed_head(model: nn.Module, autocast_dtype: torch.dtype | None) -> bool:
    """Whether `transposed_output_layer` applies: a plain fp32 `lm_head` Linear on CPU, no autocast
    (bf16 GEMVs are faster in the (out, in) layout here), nothing wrapping it (a LoRA adapter), its
    weight not stored (in, out) already (`inference_layout`)."""
    head = getattr(model, "lm_head", None)
    return (type(head) is nn.Linear and autocast_dtype is None and head.weight.device.type == "cpu"
            and head.weight.dtype == torch.float32 and not head.weight.t().is_contiguous())


@torch.no_grad()
def inference_layout(model: nn.Module) -> nn.Module:
    """Store every plain fp32 CPU `nn.Linear` weight of an inference-only model in the (in, out) layout
    (the parameter becomes the transpose of a contiguous (in, out) tensor: the same values, shape and
    Parameter object, tied weights stay tied); returns the model.

    `F.linear` then multiplies against a contiguous W^T, the layout MKL streams fastest on CPU (see
    `TransposedLinear`): every Linear of a decode step, not only the output layer, and with no copy
    (the engine's transposed output layer is skipped for such a model). For models that only
    generate (`lmforge generate`/`chat`/`serve` load their own): training code, checkpoint writers
    (safetensors wants contiguous tensors) and exporters expect the default layout."""
    for module in model.modules():
        w = module.weight if type(module) is nn.Linear else None
        if w is not None and w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous() \
                and w.dim() == 2 and w.shape[0] > 1 and w.shape[1] > 1:
            w.data = w.data.t().contiguous().t()
    return model


@contextlib.contextmanager
def transposed_output_layer(model: nn.Module):
    """`model.lm_head` swapped for a `TransposedLinear` of itself while the block runs (restored
    after; the copy of W^T is kept for the next step, see `transposed_weight`)."""
    head = model.lm_head
    model.lm_head = TransposedLinear(head, transposed_weight(head))
    try:
        yield
    finally:
        model.lm_head = head


class LastPositionHead(nn.Module):
    """An output layer applied at one position per row only: `head(x[b, positions[b]])`, returned
    expanded over the T positions (B, T, vocab) — a prefill needs each row's next-token logits, not
    T of them (over a 50k vocabulary that was 64x the output layer's work for a 64-token prompt)."""

    def __init__(self, head: nn.Module, positions: Tensor) -> None:
        super().__init__()
        self.head = head
        self.positions = positions

    def forward(self, x: Tensor) -> Tensor:
        rows = torch.arange(x.shape[0], device=x.device)
        y = self.head(x[rows, self.positions][:, None])
        return y.expand(x.shape[0], x.shape[1], y.shape[-1])


@contextlib.contextmanager
def last_position_output(model: nn.Module, positions: Tensor):
    """`model.lm_head` wrapped in a `LastPositionHead` while the block runs (restored after)."""
    head = model.lm_head
    model.lm_head = LastPositionHead(head, positions)
    try:
        yield
    finally:
        model.lm_head = head


@dataclass(eq=False)
class Request:
    """One request's state while it is queued or running."""

    id: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    max_new_tokens: int
    tokens: list[int] = field(default_factory=list)  # generated so far; the last one not yet fed
    tag: object = None  # the caller's, handed to the engine's `before_forward` (e.g. which adapter)


class Engine:
    """Continuous-batching generation over one model: `add`, `step`, `remove` (see the module doc).

    `max_batch` requests run at once (more wait in a queue, in the order added). `slide=True` lets
    a decoder-only request go on past the context: when its row is full, the cache row is rebuilt
    from its last block_size//2 tokens (positions restart from 0; `generate`'s documented
    behaviour); otherwise a full context ends the request with reason "length". An encoder-
    decoder writes at most block_size - 1 tokens. `autocast_dtype` runs forwards under autocast.
    The model runs in eval mode during each step (the mode it had is restored after it).
    `before_forward(tags)`, if given, is called before every model call with the tags (`add`'s
    `tag`) of the rows that call computes, in row order: how rows of one batch select different
    LoRA adapters (`lmforge.adapters.multi`). `fast_head` (default on) computes a plain fp32
    output layer on CPU from a transposed copy of its weight (`TransposedLinear`: ~2.5x faster
    there, at the memory of one more copy of that matrix); False computes it as the model does.
    """

    def __init__(self, model: nn.Module, max_batch: int = 16, *, autocast_dtype: torch.dtype | None = None,
                 slide: bool = False, before_forward: Callable[[list[object]], None] | None = None,
                 fast_head: bool = True) -> None:
        if not has_capability(model, "generate"):
            raise ValueError(f"a {type(model).__name__} does not generate text (no 'generate' capability)")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.max_batch, self.slide = model, max_batch, slide
        self.before_forward = before_forward
        self.autocast_dtype = autocast_dtype
        self.fast_head = fast_head
        self.encoder_decoder = has_capability(model, "encoder_decoder")
        self.block_size = model.config.block_size
        self.device = model_device(model)
        self.shared_generator = new_generator(self.device, None)  # unseeded requests' randomness
        self.cache = model.new_kv_cache(batch_size=max_batch)
        self.running: list[Request] = []  # running[i] owns cache row i
        self.waiting: deque[Request] = deque()
        self._ids = itertools.count()
        self._rows: RowSampling | None = None  # for the current `running` order

    # ---- requests -----------------------------------------------------------------------

    def add(self, prompt_ids: Sequence[int] | Tensor, params: SamplingParams | None = None, *,
            tag: object = None) -> int:
        """Queue a request; its id. It joins the batch at the next step with a free row. `tag` is
        the caller's (see `before_forward`).

        ValueError for an empty prompt or one longer than the context (block_size tokens; an
        encoder-decoder's encoder reads at most block_size)."""
        params = params or SamplingParams()
        prompt = [int(t) for t in (prompt_ids.flatten().tolist() if isinstance(prompt_ids, Tensor) else prompt_ids)]
        if not prompt:
            raise ValueError("prompt_ids is empty; give at least one token (e.g. a BOS id)")
        if len(prompt) > self.block_size:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context of {self.block_size} tokens")
        max_new = params.max_new_tokens
        if self.encoder_decoder:  # the decoder's context (with its start token) ends the output, as EOS would
            max_new = min(max_new, self.block_size - 1)
        # an unseeded request draws from the engine's shared generator (one draw for all such rows)
        generator = new_generator(self.device, params.seed) if params.temperature > 0 and params.seed is not None \
            else None
        request = Request(next(self._ids), prompt, params, generator, max_new, tag=tag)
        self.waiting.append(request)
        return request.id

    def remove(self, request_id: int) -> bool:
        """Cancel a queued or running request now (its row is free for the next step); False if it
        is not active (unknown, or already finished)."""
        for request in self.waiting:
            if request.id == request_id:
                self.waiting.remove(request)
                return True
        row = next((i for i, r in enumerate(self.running) if r.id == request_id), None)
        if row is None:
            return False
        with torch.inference_mode():  # the cache holds inference tensors
            self._free(row)
        return True

    @property
    def has_work(self) -> bool:
        """Whether any request is running or queued (`step` has something to do)."""
        return bool(self.running or self.waiting)

    @property
    def active(self) -> list[int]:
        """The ids of the running, then the queued, requests."""
        return [r.id for r in self.running] + [r.id for r in self.waiting]

    def is_active(self, request_id: int) -> bool:
        return any(r.id == request_id for r in itertools.chain(self.running, self.waiting))

    # ---- stepping -----------------------------------------------------------------------

    def step(self) -> list[Event]:
        """One token for every running request (queued ones join first while rows are free);
        finished requests leave the batch. Returns the events in row order."""
        if not self.has_work:
            return []
        with contextlib.ExitStack() as stack:
            if self.model.training:
                stack.enter_context(eval_mode(self.model))
            stack.enter_context(forward_context(self.device, self.autocast_dtype))
            if self.fast_head and use_transposed_head(self.model, self.autocast_dtype):
                stack.enter_context(transposed_output_layer(self.model))
            decoding = self._arrange()
            logits = self._forward(decoding)
            if self._rows is None:
                vocab = logits.shape[-1]
                self._rows = RowSampling([r.params for r in self.running], vocab, self.device)
            tokens = sample_rows(logits, self._rows, [r.generator for r in self.running], self.shared_generator)
            return self._emit(tokens.tolist(), *self._logprobs(logits, tokens))

    def _logprobs(self, logits: Tensor, tokens: Tensor) -> tuple[list[float] | None, list | None]:
        """The chosen tokens' log-probabilities, and the top ones' for rows that ask (else None)."""
        if not any(self._rows.logprobs):
            return None, None
        logprobs = logits.float().log_softmax(dim=-1)
        chosen = logprobs.gather(-1, tokens[:, None])[:, 0].tolist()
        n = max(r.params.top_logprobs for r in self.running)
        if not n:
            return chosen, None
        best = torch.topk(logprobs, min(n, logprobs.shape[-1]), dim=-1)
        top = [tuple(zip(ids[:r.params.top_logprobs], values[:r.params.top_logprobs]))
               for r, ids, values in zip(self.running, best.indices.tolist(), best.values.tolist())]
        return chosen, top

    def _arrange(self) -> int:
        """Order the rows for this step: rows that decode first, then rows to prefill (a sliding
        request whose row is full, queued requests that join); how many decode."""
        decoding = len(self.running)
        for row in reversed(range(decoding)):
            if self.cache.lengths[row] >= self.cache.max_len:  # only with slide: full rows end otherwise
                last = decoding - 1
                if row != last:
                    self.cache.move_row(last, row)  # the full row's cache is rebuilt anyway
                    self.running[row], self.running[last] = self.running[last], self.running[row]
                decoding -= 1
                self._rows = None
        while self.waiting and len(self.running) < self.max_batch:
            self.running.append(self.waiting.popleft())
            self._rows = None
        return decoding

    def _forward(self, decoding: int) -> Tensor:
        """Next-token logits (rows, vocab): a decode forward over rows 0..decoding-1, a prefill over
        the rest."""
        parts = []
        if decoding:
            self._announce(self.running[:decoding])
            ids = torch.tensor([[r.tokens[-1]] for r in self.running[:decoding]], device=self.device)
            view = self.cache.view(0, decoding)
            if self.encoder_decoder:
                parts.append(self.model.decode(ids, None, kv_cache=view)[:, -1])
            else:
                parts.append(self.model(ids, kv_cache=view)[0][:, -1])
        if decoding < len(self.running):
            self._announce(self.running[decoding:])
            parts.append(self._prefill(decoding))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _announce(self, rows: list[Request]) -> None:
        if self.before_forward is not None:
            self.before_forward([r.tag for r in rows])

    def _prefill(self, start: int) -> Tensor:
        """Fill rows start.. (right-padded to the longest input, one forward); their next-token logits."""
        keep = max(self.block_size // 2, 1)
        inputs = [r.prompt if not r.tokens else (r.prompt + r.tokens)[-keep:] for r in self.running[start:]]
        lengths = [len(x) for x in inputs]
        width = max(lengths)
        idx = torch.zeros((len(inputs), width), dtype=torch.long)
        for row, x in enumerate(inputs):
            idx[row, :len(x)] = torch.as_tensor(x, dtype=torch.long)
        idx = idx.to(self.device)
        view = self.cache.view(start, len(self.running))
        view.reset()
        if self.encoder_decoder:
            return self._prefill_encoder_decoder(idx, lengths, view)[:, -1]
        last = torch.tensor(lengths, device=self.device) - 1
        only_last = isinstance(getattr(self.model, "lm_head", None), nn.Module)
        with last_position_output(self.model, last) if only_last else contextlib.nullcontext():
            logits = self.model(idx, kv_cache=view)[0]
        if min(lengths) == width:
            return logits[:, -1]
        view.set_lengths(lengths)  # forget the padding
        return logits[torch.arange(len(inputs), device=self.device), last]

    def _prefill_encoder_decoder(self, idx: Tensor, lengths: list[int], view) -> Tensor:
        """Encode the sources (under a padding mask when they differ in length), store each row's
        cross-attention keys/values, and decode the start token: (rows, 1, vocab) logits."""
        mask = None
        if min(lengths) < idx.shape[1]:
            mask = (torch.arange(idx.shape[1], device=self.device)
                    < torch.tensor(lengths, device=self.device)[:, None]).long()
        encoder_output = self.model.encode(idx, attention_mask=mask)
        start = torch.full((idx.shape[0], 1), self.model.decoder_start_id, dtype=torch.long, device=self.device)
        logits = self.model.decode(start, encoder_output, attention_mask=mask, kv_cache=view)
        view.set_source_lengths(lengths)
        return logits

    def _emit(self, tokens: list[int], logprobs: list[float] | None, top: list | None = None) -> list[Event]:
        """Record each running request's new token; events, and finished requests leave."""
        events, done = [], []
        for row, (request, token) in enumerate(zip(self.running, tokens)):
            request.tokens.append(token)
            reason = None
            if token in request.params.stop_ids:
                reason = "stop"
            elif len(request.tokens) >= request.max_new_tokens:
                reason = "length"
            elif not self.slide and self.cache.lengths[row] >= self.cache.max_len:
                reason = "length"  # no room to feed this token back
            logprob = logprobs[row] if logprobs is not None and request.params.logprobs else None
            best = top[row] if top is not None and request.params.top_logprobs else None
            events.append(Event(request.id, token, reason is not None, reason, logprob, best))
            if reason is not None:
                done.append(row)
        for row in reversed(done):  # highest first: the row moved into a freed one is never done
            self._free(row)
        return events

    def _free(self, row: int) -> None:
        """Drop the request in `row`; the last row moves into it (rows stay contiguous)."""
        last = len(self.running) - 1
        if row != last:
            self.cache.move_row(last, row)
            self.running[row] = self.running[last]
        self.running.pop()
        self._rows = None
