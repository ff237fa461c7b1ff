"""Autoregressive generation: token ids or text, one prompt or many, over `infer.engine.Engine`.

`generate` yields token ids one at a time; `generate_batch` continues many prompts together;
`generate_text` / `generate_texts` wrap them with a tokenizer, incremental UTF-8-safe decoding,
stop strings and streaming. All of them are thin wrappers over the engine (continuous batching
with a per-row KV cache, batched sampling with a generator per request), which works with any
model that declares the "generate" capability (`lmforge.models.has_capability`) and has
`config.block_size`, `new_kv_cache(batch_size)` and `forward(idx, kv_cache=...) -> (logits, loss)`
(the GPT does).

Encoder-decoder models (capability "encoder_decoder", e.g. T5) take the prompt as the encoder's
input instead: it is encoded once, and the decoder starts from `decoder_start_token_id`, one
token per step, through a cache of its own keys/values and of the cross-attention keys/values
of the (fixed) encoder output. The sampling is the same.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.infer.detok import TextStream, first_stop
from lmforge.infer.engine import Engine, SamplingParams, sample_next
from lmforge.models import eval_mode, has_capability

__all__ = ["TokenizerLike", "can_generate", "encode_source", "first_stop", "generate", "generate_batch",
           "generate_text", "generate_texts", "is_encoder_decoder", "require_generative", "sample_next"]


class TokenizerLike(Protocol):
    """What `generate_text` needs from a tokenizer (`lmforge.tokenizer.Tokenizer` has it)."""

    eos_id: int | None

    def encode(self, text: str, add_eos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...


def generate(model: nn.Module, prompt_ids: list[int] | Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, stop_ids: set[int] | None = None, *,
             autocast_dtype: torch.dtype | None = None) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids continuing `prompt_ids` (one sequence).

    The prompt is prefilled once into a KV cache, then each step feeds one token. Sampling
    uses a `torch.Generator` seeded with `seed` (fresh randomness when None), so a seed gives
    the same tokens every time on the same device. A token in `stop_ids` is yielded and then
    generation ends. A prompt longer than the context keeps its last block_size-1 tokens (with
    a warning). When the sequence fills the context, the cache is rebuilt from the most
    recent block_size//2 tokens and generation goes on: positions restart from 0, which
    is correct for learned, sinusoidal and rotary positions alike; each rebuild costs one
    prefill of block_size//2 tokens, i.e. one extra token's work per generated token at most
    (amortized), at the price of a context that shrinks to half after each rebuild.
    `autocast_dtype` (e.g. torch.bfloat16) runs the forward passes under autocast.
    An encoder-decoder reads the prompt with its encoder (at most block_size tokens, the last
    kept) and writes at most block_size - 1 tokens (see the module docstring).
    The model runs in eval mode under `torch.inference_mode()` (restored when done).
    """
    block_size = model.config.block_size
    tokens = [int(t) for t in (prompt_ids.flatten().tolist() if isinstance(prompt_ids, Tensor)
                               else prompt_ids)]
    if not tokens:
        raise ValueError("prompt_ids is empty; give at least one token (e.g. a BOS id)")
    if is_encoder_decoder(model):
        if len(tokens) > block_size:  # the encoder reads the whole prompt; there is no sliding
            warnings.warn(f"prompt has {len(tokens)} tokens, longer than the encoder's context "
                          f"({block_size}); keeping the last {block_size}", stacklevel=2)
            tokens = tokens[-block_size:]
    elif len(tokens) > block_size - 1:
        warnings.warn(f"prompt has {len(tokens)} tokens, longer than the context ({block_size}); "
                      f"keeping the last {block_size - 1}", stacklevel=2)
        tokens = tokens[-(block_size - 1):]
    if max_new_tokens <= 0:
        return
    params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed, frozenset(stop_ids or ()))
    # The engine enters grad mode and autocast per step, never across a `yield`: a generator's
    # context would otherwise leak into the caller's code between tokens.
    with eval_mode(model):
        engine = Engine(model, max_batch=1, autocast_dtype=autocast_dtype, slide=True)
        engine.add(tokens, params)
        while engine.has_work:
            for event in engine.step():
                yield event.token_id


def generate_batch(model: nn.Module, prompts: Sequence[list[int]], max_new_tokens: int,
                   temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   seeds: Sequence[int | None] | None = None, stop_ids: set[int] | None = None,
                   finished: Callable[[int, list[int]], bool] | None = None, *,
                   autocast_dtype: torch.dtype | None = None) -> list[list[int]]:
    """Continue several prompts in one batch; the new ids of each.

    Row i gets what `generate(model, prompts[i], ..., seed=seeds[i])` yields (up to the
    round-off of batched matmuls, which can flip a near-tie), and each row samples with its
    own generator. The rows run through one `Engine`: a decoder-only model's prompts are
    prefilled together (right-padded; each row of the cache keeps its own length, so each row
    has the positions it would have alone), an encoder-decoder's sources are encoded together
    under a padding mask and every row decodes from the start token. A row ends with a token in
    `stop_ids` (kept as its last id, as `generate` yields it), after `max_new_tokens`, or when
    `finished(i, new_ids)` returns True (e.g. a stop string in the decoded text); finished rows
    leave the batch, so a long reply does not make short ones cost more. Every prompt must fit
    the context (plus `max_new_tokens` for a decoder-only model): there is no sliding window here.
    """
    max_new_tokens, seeds = _check_batch(model, prompts, max_new_tokens, seeds)
    if not prompts or max_new_tokens <= 0:
        return [[] for _ in prompts]
    params = [SamplingParams(max_new_tokens, temperature, top_k, top_p, seed, frozenset(stop_ids or ()))
              for seed in seeds]
    engine = Engine(model, max_batch=len(prompts), autocast_dtype=autocast_dtype)
    return _run(engine, prompts, params, finished)


def _check_batch(model: nn.Module, prompts: Sequence[list[int]], max_new_tokens: int,
                 seeds: Sequence[int | None] | None) -> tuple[int, list[int | None]]:
    """ValueError unless every prompt fits the context (with max_new_tokens for a decoder-only model)
    and there is one seed per prompt; the max_new_tokens an encoder-decoder can write, and the seeds."""
    n = len(prompts)
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts; give one seed per prompt (or None)")
    seeds = list(seeds) if seeds is not None else [None] * n
    if not n or max_new_tokens <= 0:
        return max_new_tokens, seeds
    if min(len(p) for p in prompts) == 0:
        raise ValueError("a prompt is empty; give at least one token (e.g. a BOS id)")
    width, block_size = max(len(p) for p in prompts), model.config.block_size
    seq2seq = is_encoder_decoder(model)
    if seq2seq:
        max_new_tokens = min(max_new_tokens, block_size - 1)  # the decoder's context, with its start token
    if width + (0 if seq2seq else max_new_tokens) > block_size:
        plus = "" if seq2seq else f" plus max_new_tokens={max_new_tokens}"
        raise ValueError(f"the longest prompt ({width} tokens){plus} does not fit the context of {block_size} tokens")
    return max_new_tokens, seeds


def _run(engine: Engine, prompts: Sequence[list[int]], params: Sequence[SamplingParams],
         finished: Callable[[int, list[int]], bool] | None = None,
         on_done: Callable[[int], None] | None = None) -> list[list[int]]:
    """Run prompt i with params[i] through the engine (a queued prompt joins as a row leaves); the
    new ids of each. `finished(i, ids)` True ends prompt i early; `on_done(i)` hears of each end."""
    index = {engine.add(prompt, p): i for i, (prompt, p) in enumerate(zip(prompts, params))}
    new_ids: list[list[int]] = [[] for _ in prompts]
    with eval_mode(engine.model):
        while engine.has_work:
            for event in engine.step():
                i = index[event.request_id]
                new_ids[i].append(event.token_id)
                if event.finished or (finished is not None and finished(i, new_ids[i])):
                    if not event.finished:
                        engine.remove(event.request_id)
                    if on_done is not None:
                        on_done(i)
    return new_ids


def generate_texts(model: nn.Module, tokenizer: TokenizerLike, prompts: Sequence[list[int]],
                   max_new_tokens: int = 256, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, seeds: Sequence[int | None] | None = None,
                   stop: Sequence[str] | None = None, batch_size: int = 16,
                   on_batch: Callable[[int], None] | None = None, *,
                   autocast_dtype: torch.dtype | None = None) -> list[str]:
    """`generate_text` for many prompts (token ids), `batch_size` at a time (continuous batching:
    a prompt joins the running batch as soon as another one's reply ends).

    The same text per prompt as `generate_text(model, tokenizer, prompts[i], ..., seed=seeds[i])`
    (eos and stop strings end a reply the same way), for prompts that fit: where `generate_text`
    would cut a too-long prompt with a warning, this raises ValueError (cut them first). Prompts
    start longest first, so the prompts prefilled together have similar lengths and little
    padding. `on_batch(n)` is called as n more prompts are done (progress bars; n is 1 now that
    prompts finish one by one). The prompts are token ids as the model reads them (an
    encoder-decoder's from `encode_source`); a decoder-only model's must leave room for
    max_new_tokens in the context.
    """
    stops = [s for s in (stop or []) if s]
    eos_id = getattr(tokenizer, "eos_id", None)
    stop_ids = frozenset({eos_id} if eos_id is not None else ())
    max_new_tokens, seeds = _check_batch(model, prompts, max_new_tokens, seeds)
    if not prompts or max_new_tokens <= 0:
        if on_batch is not None and prompts:
            on_batch(len(prompts))
        return [""] * len(prompts)

    streams = [TextStream(tokenizer, stops) for _ in prompts]  # in the order the prompts start
    fed = [0] * len(prompts)

    def feed(i: int, ids: list[int]) -> TextStream:
        """Push row i's ids not yet pushed (a stop id ends the reply, it is no text)."""
        for token_id in ids[fed[i]:]:
            if token_id not in stop_ids:
                streams[i].push(token_id)
        fed[i] = len(ids)
        return streams[i]

    def finished(i: int, ids: list[int]) -> bool:
        return feed(i, ids).stopped

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    params = [SamplingParams(max_new_tokens, temperature, top_k, top_p, seeds[i], stop_ids) for i in order]
    engine = Engine(model, max_batch=max(1, min(batch_size, len(prompts))), autocast_dtype=autocast_dtype)
    replies = _run(engine, [prompts[i] for i in order], params, finished if stops else None,
                   on_done=(lambda _: on_batch(1)) if on_batch is not None else None)
    texts = [""] * len(prompts)
    for row, (i, ids) in enumerate(zip(order, replies)):
        feed(row, ids).finish()
        texts[i] = streams[row].text
    return texts


def can_generate(model: nn.Module) -> bool:
    """Whether `model` writes text (a GPT or an encoder-decoder; not an encoder such as BERT):
    its declared "generate" capability (`lmforge.models.has_capability`)."""
    return has_capability(model, "generate")


def require_generative(model: nn.Module, source: object) -> None:
    """Raise a one-line UserError if `model` (loaded from `source`) cannot write text (BERT)."""
    if not can_generate(model):
        raise UserError(f"{source} is a {type(model).__name__} checkpoint (an encoder: it reads text but does not "
                        f"write it); generate and chat need a GPT or encoder-decoder checkpoint. Use this one with "
                        f"`lmforge embed`, or `lmforge eval` on a classification task")


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether generation feeds the prompt to an encoder (and decodes from a start token): the
    declared "encoder_decoder" capability."""
    return has_capability(model, "encoder_decoder")


SENTINEL = re.compile(r"<\|extra_id_(\d+)\|>|<extra_id_(\d+)>")


def encode_source(tokenizer: TokenizerLike, text: str) -> list[int]:
    """An encoder-decoder's input ids for `text`: EOS-terminated, as the span and seq2seq
    objectives (and T5) train it, with sentinel markers (`<|extra_id_N|>`, T5's `<extra_id_N>`)
    as the tokenizer's sentinel ids: that is how a span-corruption model is asked to fill a gap.
    They are the one exception to special-token strings in user text staying text; a marker
    the tokenizer does not have, and every control token (`<|eos|>`, chat roles), stays text.
    """
    ids: list[int] = []
    last = 0
    for match in SENTINEL.finditer(text):
        n = match.group(1) or match.group(2)
        sentinel_id = next((i for i in (tokenizer.token_to_id(f"<|extra_id_{n}|>"),
                                         tokenizer.token_to_id(f"<extra_id_{n}>")) if i is not None), None)
        if sentinel_id is None:
            continue
        ids += tokenizer.encode(text[last:match.start()]) + [sentinel_id]
        last = match.end()
    return ids + tokenizer.encode(text[last:], add_eos=True)


def generate_text(model: nn.Module, tokenizer: TokenizerLike, prompt: str | list[int],
                  max_new_tokens: int = 256, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, seed: int | None = None,
                  stop: list[str] | None = None, stream: Callable[[str], None] | None = None,
                  *, stop_ids: set[int] | None = None,
                  autocast_dtype: torch.dtype | None = None) -> str:
    """Generate a continuation of `prompt` (text, or token ids) and return it as text.

    Stops at the tokenizer's eos token or any of `stop_ids` (not included in the text; ids let
    a chat stop at a control token that text never produces) or at the first occurrence
    of any `stop` string (the text ends just before it). `stream` is called with each new
    piece of text as soon as it is final (`lmforge.infer.detok.TextStream`): a token that ends
    inside a multi-byte UTF-8 character waits for the rest of the character, bytes that can never
    form one (a small model's broken sequence, an incomplete character at the end) are dropped,
    so no U+FFFD is ever printed, and text that could be the beginning of a stop string waits
    until it is known not to be one. The pieces streamed join up to the text returned.
    """
    eos_id = getattr(tokenizer, "eos_id", None)
    stop_ids = set(stop_ids or ()) | ({eos_id} if eos_id is not None else set())
    detok = TextStream(tokenizer, stop or ())

    def emit(piece: str) -> None:
        if stream is not None and piece:
            stream(piece)

    if not isinstance(prompt, str):
        prompt_ids = list(prompt)
    elif is_encoder_decoder(model):
        prompt_ids = encode_source(tokenizer, prompt)
    else:
        prompt_ids = tokenizer.encode(prompt)
    tokens = generate(model, prompt_ids, max_new_tokens, temperature, top_k,
                      top_p, seed, stop_ids, autocast_dtype=autocast_dtype)
    # closing(): leaving early (stop string) must still run generate's cleanup now, which
    # puts the model back into training mode, rather than whenever the generator is collected.
    with contextlib.closing(tokens):
        for token_id in tokens:
            if token_id in stop_ids:
                break
            emit(detok.push(token_id))
            if detok.stopped:
                break
    emit(detok.finish())
    return detok.text
