"""What the runners ask of a model: log-likelihoods of continuations, rolling perplexity, replies.

Every text the model reads here starts with `<|eos|>`, the token that precedes each document
in the training shards, so a task's text is scored as the start of a document, the same way
the model saw documents in training.

Log-likelihoods follow lm-evaluation-harness: the continuation's tokens are those of
`encode(context + continuation)` after the tokens of `encode(context)` (so a BPE merge across
the boundary is tokenized as in running text), the input is cut from the left to the
context length, and the score is the sum of the continuation tokens' log-probabilities.
Requests are batched longest-first with right padding (`lmforge.tokenizer.pad_ids`, the
collator): in a causal model a padded position never influences an earlier one, so no
attention mask is needed.

Encoder-decoder models (T5) are scored and prompted by `seq2seq.py` instead (the context goes
to the encoder, the decoder writes the continuation); `loglikelihoods` and `generate_replies`
hand them over.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmforge.errors import UserError
from lmforge.infer.generate import encode_source, generate_texts, is_encoder_decoder
from lmforge.models import eval_mode, has_capability
from lmforge.tokenizer import pad_ids


@dataclass
class LogLikelihood:
    """Summed log-probability of a continuation, its token count, and whether greedy decoding gives it."""

    logprob: float
    tokens: int
    is_greedy: bool


def model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with a leading eos, continuation ids), tokenized as lm-evaluation-harness does."""
    # trailing spaces of the context belong to the continuation (" yes", not "Answer: " + "yes")
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    context_ids = tokenizer.encode(stripped)
    whole = tokenizer.encode(stripped + continuation)
    if whole[:len(context_ids)] == context_ids and len(whole) > len(context_ids):
        continuation_ids = whole[len(context_ids):]
    else:  # the boundary merged into one token: encode the two parts separately
        continuation_ids = tokenizer.encode(continuation)
    return [tokenizer.eos_id, *context_ids], continuation_ids


def loglikelihoods(model: torch.nn.Module, requests: Sequence[tuple[list[int], list[int]]],
                   batch_size: int = 16, desc: str = "scoring", progress: bool = True) -> list[LogLikelihood]:
    """Score each (context ids, continuation ids) request; returns results in request order."""
    if is_encoder_decoder(model):  # (encoder ids, target ids): see eval/seq2seq.py
        from lmforge.eval import seq2seq
        return seq2seq.loglikelihoods(model, requests, batch_size=batch_size, desc=desc, progress=progress)
    block_size = model.config.block_size
    device = model_device(model)
    for i, (context, continuation) in enumerate(requests):
        if not continuation:
            raise ValueError(f"request {i} has an empty continuation")
        if not context:
            raise ValueError(f"request {i} has an empty context (it needs at least the leading eos)")
    # each row: the last block_size+1 tokens of context+continuation; the input drops the last one
    rows = [(i, (ctx + cont)[-(block_size + 1):], len(cont)) for i, (ctx, cont) in enumerate(requests)]
    rows.sort(key=lambda r: -len(r[1]))
    out: list[LogLikelihood | None] = [None] * len(requests)
    with eval_mode(model):
        bar = tqdm(total=len(rows), desc=desc, unit="req", disable=not progress, leave=False)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            idx = pad_ids([tokens[:-1] for _, tokens, _ in chunk], 0, return_tensors="pt")["input_ids"]
            with torch.inference_mode():
                logits, _ = model(idx.to(device))
                logprobs = F.log_softmax(logits.float(), dim=-1)
            for r, (i, tokens, n_cont) in enumerate(chunk):
                n_cont = min(n_cont, len(tokens) - 1)  # a continuation longer than the context is cut
                end = len(tokens) - 1
                out[i] = score_positions(logprobs[r, end - n_cont:end], tokens[-n_cont:])
            bar.update(len(chunk))
        bar.close()
    return out  # type: ignore[return-value]


def score_positions(logprobs: torch.Tensor, targets: Sequence[int]) -> LogLikelihood:
    """The summed log-probability of `targets` under (len(targets), vocab) log-probabilities,
    and whether each target is the argmax of its position (greedy decoding would write them)."""
    wanted = torch.tensor(list(targets), device=logprobs.device)
    token_lp = logprobs.gather(-1, wanted[:, None]).squeeze(-1)
    greedy = bool((logprobs.argmax(-1) == wanted).all())
    return LogLikelihood(float(token_lp.double().sum()), len(wanted), greedy)


@dataclass
class NLL:
    """Summed negative log-likelihood (nats) over `tokens` predicted tokens."""

    nats: float
    tokens: int


def rolling_nll(model: torch.nn.Module, sequences: Sequence[list[int] | np.ndarray], batch_size: int = 16,
                stride: int | None = None, desc: str = "perplexity", progress: bool = True) -> list[NLL]:
    """NLL of every token after the first of each sequence, in windows of the model's context.

    A sequence longer than the context is cut into windows of block_size+1 tokens that start
    `stride` tokens apart (default block_size: disjoint windows, so the average context per
    token is about block_size/2, as in the training loop's val loss); each token is scored
    once, in the first window that predicts it.
    """
    block_size = model.config.block_size
    stride = stride or block_size
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be in 1..block_size ({block_size}), got {stride}")
    windows: list[tuple[int, list[int], int]] = []  # (sequence, tokens, number of scored targets at the end)
    for s, ids in enumerate(sequences):
        scored_upto = 0  # targets ids[1..scored_upto] are done
        begin = 0
        while scored_upto < len(ids) - 1:
            end = min(begin + block_size + 1, len(ids))
            windows.append((s, ids[begin:end], end - 1 - scored_upto))
            scored_upto = end - 1
            begin += stride
    windows.sort(key=lambda w: -len(w[1]))
    totals = [NLL(0.0, 0) for _ in sequences]
    device = model_device(model)
    with eval_mode(model):
        bar = tqdm(total=len(windows), desc=desc, unit="window", disable=not progress, leave=False)
        for start in range(0, len(windows), batch_size):
            chunk = windows[start:start + batch_size]
            idx = pad_ids([tokens[:-1] for _, tokens, _ in chunk], 0, return_tensors="pt")["input_ids"]
            # the targets of a window's last n_scored inputs; -100 (ignored) before them and on padding
            targets = pad_ids([[-100] * (len(tokens) - 1 - n) + list(tokens[-n:]) for _, tokens, n in chunk], -100,
                              return_tensors="pt")["input_ids"]
            with torch.inference_mode():
                logits, _ = model(idx.to(device))
                nll = F.cross_entropy(logits.float().transpose(1, 2), targets.to(device),
                                      ignore_index=-100, reduction="none").double().sum(-1)
            for r, (s, _, n_scored) in enumerate(chunk):
                totals[s].nats += float(nll[r])
                totals[s].tokens += n_scored
            bar.update(len(chunk))
        bar.close()
    return totals


def generate_replies(model: torch.nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                     stop: Sequence[str] | None, seed: int, temperature: float = 0.0,
                     desc: str = "generating", progress: bool = True, batch_size: int = 16,
                     on_truncate: Callable[[int], None] | None = None) -> list[str]:
    """One reply per prompt (greedy by default), `batch_size` prompts at a time.

    A decoder-only model reads `<|eos|>` + the prompt's tokens, cut from the left to
    `block_size - max_new_tokens` so the reply fits the context without the generator sliding
    its window. An encoder-decoder's encoder reads the prompt as `encode_source` makes it (as
    the span/seq2seq objectives and `lmforge generate` feed it), cut from the left to
    block_size; its reply is at most block_size - 1 tokens. `on_truncate(i)` is told about
    each cut. Batches come from `infer.generate.generate_texts`: each reply is the same as
    generating its prompt alone, with the per-item seed `seed + i`.
    """
    block_size = model.config.block_size
    if is_encoder_decoder(model):
        room = block_size
        encode = lambda prompt: encode_source(tokenizer, prompt)  # noqa: E731
    else:
        room = block_size - max_new_tokens
        if room < 2:
            raise UserError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                            f"context of {block_size} tokens; lower max_new_tokens")
        encode = lambda prompt: [tokenizer.eos_id, *tokenizer.encode(prompt)]  # noqa: E731
    ids = []
    for i, prompt in enumerate(prompts):
        item = encode(prompt)
        if len(item) > room:
            item = item[-room:]
            if on_truncate is not None:
                on_truncate(i)
        ids.append(item)
    # batched, prompts of similar length together; the seed is per item (seed + i), so an
    # item's reply does not depend on which items share its batch or ran before it
    with tqdm(total=len(prompts), desc=desc, unit="item", disable=not progress, leave=False) as bar:
        return generate_texts(model, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                              seeds=[seed + i for i in range(len(prompts))], stop=list(stop or []),
                              batch_size=batch_size, on_batch=bar.update)


def score_labels(model: torch.nn.Module, tokenizer, prompts: Sequence[str], labels: Sequence[str],
                 batch_size: int = 16, progress: bool = True, texts: Sequence[str] | None = None) -> list[list[float]]:
    """A score per (item, label): higher means the model prefers that label.

    This is the one place that knows how a model scores labels:
    - a causal language model scores label L by the log-likelihood of " L" after the prompt;
    - an encoder-decoder by the log-likelihood of "L" written by the decoder for the prompt (seq2seq.py);
    - a model with a sequence-classification head (`classify`, e.g. BERT with
      model.num_labels) scores the raw `texts` (no prompt): its head's logits, output i
      being the i-th label of the task's label set.
    """
    if has_capability(model, "classify"):
        return _head_logits(model, tokenizer, list(texts if texts is not None else prompts), len(labels),
                            batch_size, progress)
    from lmforge.eval import seq2seq  # an encoder-decoder reads the prompt with its encoder

    seq2seq.require_lm(model, "scoring labels")
    pair = seq2seq.pair_encoder(model)
    requests = [pair(tokenizer, prompt, " " + label) for prompt in prompts for label in labels]
    results = loglikelihoods(model, requests, batch_size=batch_size, desc="scoring labels", progress=progress)
    k = len(labels)
    return [[r.logprob for r in results[i * k:(i + 1) * k]] for i in range(len(prompts))]


def _head_logits(model: torch.nn.Module, tokenizer, texts: list[str], n_labels: int, batch_size: int,
                 progress: bool) -> list[list[float]]:
    """Classification-head logits of `[CLS] text [SEP]` (the tokenizer's `__call__`, cut to the context),
    batched longest-first with the tokenizer's padding and mask."""
    if model.config.num_labels != n_labels:
        raise UserError(f"the checkpoint's classification head has {model.config.num_labels} outputs but the task "
                        f"has {n_labels} labels; declare the head's labels, in its output order, in the header")
    rows = tokenizer(texts, truncation=True, max_length=model.config.block_size)["input_ids"]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out: list[list[float]] = [[] for _ in rows]
    device = model_device(model)
    with eval_mode(model):
        for start in tqdm(range(0, len(order), batch_size), desc="classifying", unit="batch",
                          disable=not progress, leave=False):
            batch = order[start:start + batch_size]
            padded = tokenizer.pad([rows[i] for i in batch], return_tensors="pt")
            with torch.inference_mode():
                logits, _ = model.classify(padded["input_ids"].to(device),
                                           attention_mask=padded["attention_mask"].to(device))
            for r, i in enumerate(batch):
                out[i] = logits[r].float().tolist()
    return out


def perplexity_metrics(total_nats: float, total_tokens: int, total_bytes: int) -> dict[str, float]:
    """loss (nats/token), perplexity and bits per UTF-8 byte."""
    loss = total_nats / max(total_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_byte": total_nats / (math.log(2) * max(total_bytes, 1)),
            "tokens": total_tokens, "bytes": total_bytes}
