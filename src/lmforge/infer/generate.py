"""Autoregressive generation: sampling (greedy / temperature / top-k / top-p) with a KV cache.

`generate` yields token ids one at a time (prefill the prompt once, then one forward per new
token); `generate_text` wraps it with a tokenizer, incremental UTF-8-safe decoding, stop
strings and streaming. Works with any model that has `config.block_size`,
`new_kv_cache(batch_size)` and `forward(idx, kv_cache=...) -> (logits, loss)` (the GPT does).

Encoder-decoder models (`model.is_encoder_decoder`, e.g. T5) take the prompt as the encoder's
input instead: it is encoded once, and the decoder starts from `decoder_start_token_id`, one
token per step, through a cache of its own keys/values and of the cross-attention keys/values
of the (fixed) encoder output. The sampling is the same `sample_next`.
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.models import eval_mode


class TokenizerLike(Protocol):
    """What `generate_text` needs from a tokenizer (`lmforge.tokenizer.Tokenizer` has it)."""

    eos_id: int | None

    def encode(self, text: str, add_eos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...


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
    logits = logits / temperature
    if top_k is not None and top_k > 0 and top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach p; the top one always
        # stays, so the kept set is the smallest with cumulative probability >= p.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


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
    device = _model_device(model)
    tokens = [int(t) for t in (prompt_ids.flatten().tolist() if isinstance(prompt_ids, Tensor)
                               else prompt_ids)]
    if not tokens:
        raise ValueError("prompt_ids is empty; give at least one token (e.g. a BOS id)")
    if is_encoder_decoder(model):
        if len(tokens) > block_size:  # the encoder reads the whole prompt; there is no sliding
            warnings.warn(f"prompt has {len(tokens)} tokens, longer than the encoder's context "
                          f"({block_size}); keeping the last {block_size}", stacklevel=2)
            tokens = tokens[-block_size:]
        # the decoder's context (block_size, with the start token) ends the output, as EOS would
        max_new_tokens = min(max_new_tokens, block_size - 1)
    elif len(tokens) > block_size - 1:
        warnings.warn(f"prompt has {len(tokens)} tokens, longer than the context ({block_size}); "
                      f"keeping the last {block_size - 1}", stacklevel=2)
        tokens = tokens[-(block_size - 1):]
    stop_ids = stop_ids or set()
    if max_new_tokens <= 0:
        return
    generator = _generator(device, seed)
    keep_on_slide = max(block_size // 2, 1)

    # Grad mode and autocast are entered per forward, never across a `yield`: a generator's
    # context would otherwise leak into the caller's code between tokens.
    forward_context = functools.partial(_forward_context, device, autocast_dtype)

    def pick(logits: Tensor) -> int:
        return int(sample_next(logits[:, -1], temperature, top_k, top_p, generator)[0])

    def run(ids: list[int], kv_cache: Any) -> int:
        with forward_context():
            idx = torch.tensor([ids], dtype=torch.long, device=device)
            logits, _ = model(idx, kv_cache=kv_cache)
            return pick(logits)

    with eval_mode(model):
        if is_encoder_decoder(model):
            yield from _generate_encoder_decoder(model, tokens, max_new_tokens, stop_ids, pick, forward_context)
            return
        kv_cache = model.new_kv_cache(batch_size=1)
        next_id = run(tokens, kv_cache)
        for i in range(max_new_tokens):
            yield next_id
            tokens.append(next_id)
            if next_id in stop_ids or i == max_new_tokens - 1:
                return
            if kv_cache.length >= block_size:  # context full: rebuild from the recent tokens
                kv_cache.reset()
                next_id = run(tokens[-keep_on_slide:], kv_cache)
            else:
                next_id = run([next_id], kv_cache)


def _forward_context(device: torch.device, autocast_dtype: torch.dtype | None) -> contextlib.ExitStack:
    """inference_mode, and autocast to `autocast_dtype` if given, for one forward pass."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    if autocast_dtype:
        stack.enter_context(torch.autocast(device.type, dtype=autocast_dtype))
    return stack


def _generator(device: torch.device, seed: int | None) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def generate_batch(model: nn.Module, prompts: Sequence[list[int]], max_new_tokens: int,
                   temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   seeds: Sequence[int | None] | None = None, stop_ids: set[int] | None = None,
                   finished: Callable[[int, list[int]], bool] | None = None, *,
                   autocast_dtype: torch.dtype | None = None) -> list[list[int]]:
    """Continue several prompts in one batch; the new ids of each.

    Row i gets what `generate(model, prompts[i], ..., seed=seeds[i])` yields (up to the
    round-off of batched matmuls, which can flip a near-tie), and each row samples with its
    own generator. A decoder-only model reads the prompts left-padded to the longest: the
    cache's `left_pad` gives each row the positions it would have alone and masks its padding.
    An encoder-decoder encodes the prompts right-padded under a padding mask (used by the
    encoder and by every decoder step's cross-attention), and all rows decode from the start
    token together. A row ends with a token in `stop_ids` (kept as its last id, as `generate`
    yields it), after `max_new_tokens`, or when `finished(i, new_ids)` returns True (e.g. a stop
    string in the decoded text); finished rows leave the batch, so a long reply does not make
    short ones cost more. Every prompt must fit the context (plus `max_new_tokens` for a
    decoder-only model): there is no sliding window here.
    """
    n = len(prompts)
    if not n or max_new_tokens <= 0:
        return [[] for _ in prompts]
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError("a prompt is empty; give at least one token (e.g. a BOS id)")
    width, block_size = max(lengths), model.config.block_size
    seq2seq = is_encoder_decoder(model)
    if seq2seq:
        max_new_tokens = min(max_new_tokens, block_size - 1)  # the decoder's context, with its start token
    if width + (0 if seq2seq else max_new_tokens) > block_size:
        raise ValueError(f"the longest prompt ({width} tokens){'' if seq2seq else f' plus max_new_tokens={max_new_tokens}'}"
                         f" does not fit the context of {block_size} tokens")
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts; give one seed per prompt (or None)")
    device = _model_device(model)
    generators = [_generator(device, seed) for seed in (seeds if seeds is not None else [None] * n)]
    idx = torch.zeros((n, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):  # an encoder-decoder's sources right-padded, a decoder's left
        where = slice(0, len(prompt)) if seq2seq else slice(width - len(prompt), width)
        idx[row, where] = torch.as_tensor(prompt, dtype=torch.long)
    length = torch.tensor(lengths, device=device)
    stop_ids = stop_ids or set()
    new_ids: list[list[int]] = [[] for _ in prompts]
    active = list(range(n))  # the prompt index of each batch row
    with eval_mode(model):
        if seq2seq:
            mask = (torch.arange(width, device=device)[None] < length[:, None]).long()  # 1 = real source token
            with _forward_context(device, autocast_dtype):
                encoder_output = model.encode(idx.to(device), attention_mask=mask)
            kv_cache = model.new_kv_cache(batch_size=n)
            inputs = torch.full((n, 1), model.decoder_start_id, dtype=torch.long, device=device)

            def forward(ids: Tensor) -> Tensor:  # cross keys/values are cached after the first step
                return model.decode(ids, encoder_output if kv_cache.length == 0 else None,
                                    attention_mask=mask, kv_cache=kv_cache)
        else:
            kv_cache = model.new_kv_cache(batch_size=n, left_pad=width - length)
            inputs = idx.to(device)

            def forward(ids: Tensor) -> Tensor:
                return model(ids, kv_cache=kv_cache)[0]

        for step in range(max_new_tokens):
            with _forward_context(device, autocast_dtype):
                last = forward(inputs)[:, -1]
            if temperature == 0:
                picked = sample_next(last, 0.0).tolist()
            else:  # one draw per row from the row's own generator, as `generate` draws
                picked = [int(sample_next(last[row:row + 1], temperature, top_k, top_p, generators[i])[0])
                          for row, i in enumerate(active)]
            keep = []
            for row, i in enumerate(active):
                new_ids[i].append(picked[row])
                if not (picked[row] in stop_ids or step == max_new_tokens - 1
                        or (finished is not None and finished(i, new_ids[i]))):
                    keep.append(row)
            if not keep:
                break
            if len(keep) < len(active):
                rows = torch.tensor(keep, device=device)
                kv_cache.select(rows)
                if seq2seq:
                    mask = mask.index_select(0, rows)
                active = [active[row] for row in keep]
            inputs = torch.tensor([[picked[row]] for row in keep], dtype=torch.long, device=device)
    return new_ids


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest of the stop strings starts in text (None if none occurs)."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def generate_texts(model: nn.Module, tokenizer: TokenizerLike, prompts: Sequence[list[int]],
                   max_new_tokens: int = 256, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, seeds: Sequence[int | None] | None = None,
                   stop: Sequence[str] | None = None, batch_size: int = 16,
                   on_batch: Callable[[int], None] | None = None, *,
                   autocast_dtype: torch.dtype | None = None) -> list[str]:
    """`generate_text` for many prompts (token ids), `batch_size` at a time (`generate_batch`).

    The same text per prompt as `generate_text(model, tokenizer, prompts[i], ..., seed=seeds[i])`
    (eos and stop strings end a reply the same way), for prompts that fit: where `generate_text`
    would cut a too-long prompt with a warning, this raises ValueError (cut them first). Prompts
    are batched longest first, so a batch holds prompts of similar length and little padding.
    `on_batch(n)` is called after each batch of n prompts (progress bars). The prompts are token
    ids as the model reads them (an encoder-decoder's from `encode_source`); a decoder-only
    model's must leave room for max_new_tokens in the context.
    """
    stops = [s for s in (stop or []) if s]
    eos_id = getattr(tokenizer, "eos_id", None)
    stop_ids = {eos_id} if eos_id is not None else set()
    seeds = list(seeds) if seeds is not None else [None] * len(prompts)

    def visible(ids: list[int]) -> list[int]:
        return ids[:-1] if ids and ids[-1] in stop_ids else ids

    def text_of(ids: list[int]) -> str:
        text = tokenizer.decode(visible(ids))
        cut = first_stop(text, stops)
        return text if cut is None else text[:cut]

    def finished(_: int, ids: list[int]) -> bool:
        return bool(stops) and first_stop(tokenizer.decode(visible(ids)), stops) is not None

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        replies = generate_batch(model, [prompts[i] for i in chunk], max_new_tokens, temperature, top_k, top_p,
                                 [seeds[i] for i in chunk], stop_ids, finished, autocast_dtype=autocast_dtype)
        for i, ids in zip(chunk, replies):
            texts[i] = text_of(ids)
        if on_batch is not None:
            on_batch(len(chunk))
    return texts


def can_generate(model: nn.Module) -> bool:
    """Whether `model` writes text (a GPT or an encoder-decoder; not an encoder such as BERT)."""
    return hasattr(model, "new_kv_cache")


def require_generative(model: nn.Module, source: object) -> None:
    """Raise a one-line UserError if `model` (loaded from `source`) cannot write text (BERT)."""
    if not can_generate(model):
        raise UserError(f"{source} is a {type(model).__name__} checkpoint (an encoder: it reads text but does not "
                        f"write it); generate and chat need a GPT or encoder-decoder checkpoint. Use this one with "
                        f"`lmforge embed`, or `lmforge eval` on a classification task")


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether generation feeds the prompt to an encoder (and decodes from a start token)."""
    return bool(getattr(model, "is_encoder_decoder", False))


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


def _generate_encoder_decoder(model: nn.Module, tokens: list[int], max_new_tokens: int, stop_ids: set[int],
                              pick: Callable[[Tensor], int],
                              forward_context: Callable[[], contextlib.ExitStack]) -> Iterator[int]:
    """`generate` for an encoder-decoder: encode once, then decode one token per step.

    The decoder's cache holds its self-attention keys/values and, from the first step on, each
    layer's cross-attention keys/values of the encoder output, so a step costs one token's
    decoder pass whatever the prompt length.
    """
    device = _model_device(model)
    with forward_context():
        encoder_output = model.encode(torch.tensor([tokens], dtype=torch.long, device=device))
    kv_cache = model.new_kv_cache(batch_size=1)
    next_input = model.decoder_start_id
    for _ in range(max_new_tokens):
        with forward_context():
            idx = torch.tensor([[next_input]], dtype=torch.long, device=device)
            next_id = pick(model.decode(idx, encoder_output, kv_cache=kv_cache))
        yield next_id
        if next_id in stop_ids:
            return
        next_input = next_id


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of text might be the start of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


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
    piece of text as soon as it is final: a token that ends inside a multi-byte UTF-8
    character (decoding to U+FFFD) waits for the rest of the character, and text that could
    be the beginning of a stop string waits until it is known not to be one.
    """
    stops = [s for s in (stop or []) if s]
    eos_id = getattr(tokenizer, "eos_id", None)
    stop_ids = set(stop_ids or ()) | ({eos_id} if eos_id is not None else set())
    new_ids: list[int] = []
    emitted = 0  # characters of the final text already passed to `stream`
    text = ""

    def emit(upto: int) -> None:
        nonlocal emitted
        if stream is not None and upto > emitted:
            stream(text[emitted:upto])
        emitted = max(emitted, upto)

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
            new_ids.append(token_id)
            # Decoding the whole continuation each step (not token by token) lets byte-level
            # tokens that split a UTF-8 character join up again.
            text = tokenizer.decode(new_ids)
            cut = first_stop(text, stops)
            if cut is not None:
                text = text[:cut]
                break
            if text.endswith("\ufffd"):
                continue
            emit(len(text) - _held_back(text, stops))
    emit(len(text))
    return text
