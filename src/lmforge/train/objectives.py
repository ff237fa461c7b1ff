"""Training objectives: how a batch is cut from the token stream and what loss the model minimizes.

    objective: clm          next-token prediction (GPT)
    objective: mlm          masked LM, optionally + next-sentence prediction (BERT)
    objective: span         T5 span corruption: spans -> sentinels, the decoder writes them out
    objective: seq2seq      source -> target pairs from a JSONL file (`data.pairs`)
    objective: contrastive  SimCSE: two dropout views of a text are positives, the rest of the
                            batch are negatives (sentence embeddings from an encoder)

Every objective reads the same token directories (`lmforge tokenize`) through `TokenBatches`
and keeps the loop's contract that a batch is a pure function of (seed, step): the windows and
every random choice (which tokens are masked, where the spans fall, which sentence pairs are
swapped) come from one numpy generator seeded by `(seed, step)` over the *global* batch, and
each process takes its rows. Resume stays exact and N processes see what one process sees.

The models are called by the conventions in each objective's `loss` (all return
`(logits, loss)`); the objective never reaches into a model's internals, so DDP/FSDP wrappers,
whose hooks run only through `forward`, keep working.

Special tokens: our tokenizers' `<|bos|>` serves as BERT's [CLS] and `<|eos|>` as [SEP].
Tokens an objective needs that the tokenizer lacks (`<|mask|>`, the span sentinels
`<|extra_id_N|>`) are appended to the run's copy of the tokenizer (`with_tokens`), after every
existing id, so the token shards stay valid and the checkpoint's tokenizer.json knows them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.data.readers import iter_jsonl_objects
from lmforge.errors import UserError
from lmforge.train.batches import TokenBatches

Batch = dict[str, Tensor]
EVAL_STREAM = 1 << 40  # generator stream of the fixed eval batches, far from any training step

MASK = "<|mask|>"
MASK_FALLBACKS = ("[MASK]", "<mask>")
NUM_SENTINELS = 100  # as T5


def sentinel(i: int) -> str:
    return f"<|extra_id_{i}|>"


class Objective:
    """Base: batches of `TokenBatches` windows, with the per-objective transform and loss."""

    name = "clm"
    arch = "gpt"  # the model family the objective trains
    extra_tokens: tuple[str, ...] = ()  # tokens the tokenizer must have (added if missing)
    uses_all_parameters = True  # False: some parameters get no gradient (DDP must look for them)
    views = 1  # passes of each example through the model (`lmforge plan` counts them)

    @classmethod
    def check(cls, model_config: Any) -> None:
        """Refuse a model this objective cannot train (training and `lmforge plan` both ask)."""
        if model_config.arch != cls.arch:
            raise UserError(f"objective {cls.name} trains model.arch={cls.arch}, "
                            f"but model.arch is {model_config.arch}; change one of them")

    @classmethod
    def configure_model(cls, cfg: Any, model_config: Any) -> None:
        """Adjust the model config the objective needs (e.g. MLM's NSP head); the run's config too."""

    def __init__(self, cfg: Any, tokenizer: Any, model_config: Any) -> None:
        self.cfg, self.tokenizer, self.model_config = cfg, tokenizer, model_config

    # ---- data -------------------------------------------------------------------------

    def window_length(self, block_size: int) -> int:
        """How many raw tokens one example consumes (clm: block_size inputs + 1 shifted target)."""
        return block_size + 1

    def source(self, tokens_dir: Any, split: str) -> TokenBatches:
        return TokenBatches(tokens_dir, split, self.window_length(self.model_config.block_size) - 1)

    def example_lengths(self) -> tuple[int, int | None]:
        """(input tokens, decoder tokens or None) of one example, for FLOPs and MFU: an
        encoder-decoder's decoder may read fewer tokens than its encoder."""
        return self.model_config.block_size, None

    def flops_per_token(self, model: nn.Module) -> float:
        """Training FLOPs per token as a step counts tokens (block_size per example), for MFU:
        the model's FLOPs for one example (`example_lengths`) spread over block_size tokens."""
        source_len, decoder_len = self.example_lengths()
        lengths = (source_len,) if decoder_len is None else (source_len, decoder_len)
        return model.flops_per_token(*lengths) * source_len / self.model_config.block_size

    def make_batch(self, windows: np.ndarray, rng: np.random.Generator, source: TokenBatches) -> Batch:
        return {"input_ids": torch.from_numpy(windows[:, :-1]), "targets": torch.from_numpy(windows[:, 1:])}

    def global_batch(self, source: TokenBatches, seed: int, step: int, rows: int) -> Batch:
        rng = np.random.default_rng([seed, step])
        return self.make_batch(source.windows(rng, rows), rng, source)

    def batch_for(self, source: TokenBatches, seed: int, step: int, batch_size: int, grad_accum: int,
                  rank: int, world_size: int) -> list[Batch]:
        """This process's micro-batches of optimizer step `step` (its rows of the global batch)."""
        batch = self.global_batch(source, seed, step, batch_size * grad_accum * world_size)
        per_rank = batch_size * grad_accum
        lo = rank * per_rank
        return [{k: v[lo + i:lo + i + batch_size] for k, v in batch.items()}
                for i in range(0, per_rank, batch_size)]

    def eval_batches(self, source: TokenBatches, seed: int, eval_steps: int, batch_size: int, rank: int,
                     world_size: int) -> Iterator[Batch]:
        """Fixed batches (the same at every eval, so losses are comparable across steps)."""
        for i in range(eval_steps):
            yield from self.batch_for(source, seed, EVAL_STREAM + i, batch_size, 1, rank, world_size)

    # ---- loss ---------------------------------------------------------------------------

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return model(batch["input_ids"], batch["targets"])[1]

    def eval_loss(self, model: nn.Module, batch: Batch, index: int) -> Tensor:
        return self.loss(model, batch)


class CausalLM(Objective):
    """Next-token prediction: inputs are a window, targets the same window shifted by one."""


class MaskedLM(Objective):
    """BERT's masked LM (+ optional next-sentence prediction), Devlin et al. 2019.

    Each example is `[CLS] A [SEP]` (or `[CLS] A [SEP] B [SEP]` with NSP) cut from the stream.
    `mlm.mask_prob` (0.15) of the ordinary tokens are chosen independently; of those 80% become
    [MASK], 10% a random ordinary token, 10% stay; labels hold the original id at chosen
    positions and -100 elsewhere. With NSP, A and B are split at a random point of one window
    (B follows A, label 0) or, for half of the examples, B is the same-length tail of another
    random window (label 1).
    """

    name, arch, extra_tokens = "mlm", "bert", (MASK,)

    @classmethod
    def configure_model(cls, cfg: Any, model_config: Any) -> None:
        if cfg.mlm.nsp:  # next-sentence prediction trains the NSP head; the run's config.yaml says so too
            model_config.nsp_head = cfg.model.nsp_head = True

    def __init__(self, cfg: Any, tokenizer: Any, model_config: Any) -> None:
        super().__init__(cfg, tokenizer, model_config)
        self.opts = cfg.mlm
        self.cls_id, self.sep_id = tokenizer.bos_id, tokenizer.eos_id
        self.mask_id = find_token(tokenizer, MASK, MASK_FALLBACKS)
        special = special_ids(tokenizer)
        self.special = np.array(sorted(special), dtype=np.int64)
        self.ordinary = np.array([i for i in range(tokenizer.vocab_size) if i not in special], dtype=np.int64)

    def window_length(self, block_size: int) -> int:
        length = block_size - (3 if self.opts.nsp else 2)
        if length < 4:
            raise UserError(f"model.block_size={block_size} is too short for mlm; use at least {4 + 3}")
        return length

    def make_batch(self, windows: np.ndarray, rng: np.random.Generator, source: TokenBatches) -> Batch:
        rows, n = windows.shape
        token_type = np.zeros((rows, self.model_config.block_size), dtype=np.int64)
        if not self.opts.nsp:
            ids = np.concatenate([np.full((rows, 1), self.cls_id), windows, np.full((rows, 1), self.sep_id)], axis=1)
            nsp = None
        else:
            cut = rng.integers(n // 4, n - n // 4, size=rows, endpoint=True)
            nsp = (rng.random(rows) < 0.5).astype(np.int64)  # 1 = B is random (HF convention)
            others = source.windows(rng, rows)[:, :n]
            ids = np.empty((rows, n + 3), dtype=np.int64)
            for r in range(rows):
                a = windows[r, :cut[r]]
                b = others[r, cut[r]:] if nsp[r] else windows[r, cut[r]:]
                ids[r] = np.concatenate([[self.cls_id], a, [self.sep_id], b, [self.sep_id]])
                token_type[r, len(a) + 2:] = 1
        ids, labels = self.mask_tokens(ids, rng)
        batch = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                 "token_type_ids": torch.from_numpy(token_type[:, :ids.shape[1]])}
        if nsp is not None:
            batch["next_sentence_label"] = torch.from_numpy(nsp)
        return batch

    def mask_tokens(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """BERT's 80/10/10 corruption of `mask_prob` of the non-special tokens."""
        chosen = (rng.random(ids.shape) < self.opts.mask_prob) & ~np.isin(ids, self.special)
        labels = np.where(chosen, ids, -100)
        action = rng.random(ids.shape)
        random_ids = self.ordinary[rng.integers(0, len(self.ordinary), size=ids.shape)]
        out = np.where(chosen & (action < 0.8), self.mask_id, ids)
        out = np.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, out)
        return out, labels

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return model(batch["input_ids"], batch["labels"], token_type_ids=batch["token_type_ids"],
                     next_sentence_label=batch.get("next_sentence_label"))[1]


def span_counts(opts: Any, length: int) -> tuple[int, int]:
    """(noise tokens, noise spans) of a window of `length` tokens under the `span` options."""
    noise = min(max(round(length * opts.noise_density), 1), length - 1)
    spans = max(round(noise / opts.mean_span_length), 1)
    return noise, spans


def span_lengths(opts: Any, block_size: int) -> tuple[int, int, int]:
    """(raw window, encoder input, decoder target) lengths of span corruption: the longest raw
    window whose corrupted input (kept tokens + one sentinel per span + EOS) and target (sentinels
    + noise + EOS) both fit `block_size`. `lmforge plan` sizes span runs with it too."""
    for length in range(2 * block_size, 1, -1):
        noise, spans = span_counts(opts, length)
        if length - noise + spans + 1 <= block_size and noise + spans + 1 <= block_size:
            if spans > NUM_SENTINELS:
                raise UserError(f"span: {spans} noise spans per example need more than {NUM_SENTINELS} "
                                "sentinels; lower model.block_size or raise span.mean_span_length")
            return length, length - noise + spans + 1, noise + spans + 1
    raise UserError(f"model.block_size={block_size} is too short for span corruption")


class SpanCorruption(Objective):
    """T5's span corruption (Raffel et al. 2020, `random_spans_noise_mask`).

    Of a window of R tokens, round(R * noise_density) are noise, in round(noise /
    mean_span_length) spans at random places; the encoder reads the window with each span
    replaced by one sentinel (`<|extra_id_0|>`, `<|extra_id_1|>`, ...) and an [EOS]; the decoder
    writes each sentinel followed by the tokens it replaced, then [EOS]. R is the longest
    window whose corrupted input fits `model.block_size` (so R > block_size, as in T5: 70
    tokens -> 64 inputs at the defaults); all examples have the same shape.
    """

    name, arch = "span", "encdec"
    extra_tokens = tuple(sentinel(i) for i in range(NUM_SENTINELS))

    def __init__(self, cfg: Any, tokenizer: Any, model_config: Any) -> None:
        super().__init__(cfg, tokenizer, model_config)
        self.opts = cfg.span
        self.eos_id = tokenizer.eos_id
        self.pad_id = tokenizer.pad_id
        self.sentinels = np.array([find_token(tokenizer, sentinel(i), (f"<extra_id_{i}>",))
                                   for i in range(NUM_SENTINELS)], dtype=np.int64)
        self.raw_length, self.input_length, self.target_length = span_lengths(self.opts, model_config.block_size)

    def window_length(self, block_size: int) -> int:
        return self.raw_length

    def example_lengths(self) -> tuple[int, int | None]:
        return self.input_length, self.target_length  # every example has exactly these lengths

    def noise_mask(self, length: int, rng: np.random.Generator) -> np.ndarray:
        """Bool (length,): which tokens are noise; spans alternate non-noise, noise, ..."""
        noise, spans = span_counts(self.opts, length)

        def segment(items: int, parts: int) -> np.ndarray:  # random composition of items into parts >= 1
            first = np.zeros(items, dtype=bool)
            first[1 + rng.permutation(items - 1)[:parts - 1]] = True
            return np.bincount(np.cumsum(first), minlength=parts)

        lengths = np.stack([segment(length - noise, spans), segment(noise, spans)], axis=1).reshape(-1)
        return np.repeat(np.tile([False, True], spans), lengths)

    def make_batch(self, windows: np.ndarray, rng: np.random.Generator, source: TokenBatches) -> Batch:
        inputs, labels = [], []
        for row in windows:
            noise = self.noise_mask(len(row), rng)
            starts = noise & ~np.concatenate([[False], noise[:-1]])  # first token of each span
            k = int(starts.sum())
            # encoder: the window with span i replaced by sentinel i
            inp = np.where(starts, self.sentinels[np.cumsum(starts) - 1], row)[~noise | starts]
            # decoder: sentinel i, then the tokens of span i, for every span
            out = np.insert(row[noise], np.flatnonzero(starts[noise]), self.sentinels[:k])
            inputs.append(np.concatenate([inp, [self.eos_id]]))
            labels.append(np.concatenate([out, [self.eos_id]]))
        return {"input_ids": torch.from_numpy(np.stack(inputs)), "labels": torch.from_numpy(np.stack(labels))}

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return model(batch["input_ids"], batch["labels"])[1]


class Contrastive(Objective):
    """SimCSE (Gao et al. 2021), unsupervised: a text and itself under another dropout mask are
    a positive pair, every other text in the batch is a negative.

    loss = cross_entropy(cos(z1_i, z2_j) / temperature, target j = i), with z the encoder's
    mean-pooled sentence vectors (`model(..., return_embeddings=True)`). Dropout is the only
    augmentation, so `model.dropout` must be > 0. The val loss uses the same two dropout views
    under a fixed seed per eval batch, so it is comparable across evals.
    """

    name, arch = "contrastive", "bert"
    uses_all_parameters = False  # the MLM head (and heads) take no part in the sentence vectors
    views = 2  # both dropout views of each example through the encoder

    @classmethod
    def check(cls, model_config: Any) -> None:
        super().check(model_config)
        if model_config.dropout <= 0:
            raise UserError("objective contrastive: model.dropout must be > 0 (dropout makes the two views "
                            "of each text differ); try model.dropout=0.1")

    def __init__(self, cfg: Any, tokenizer: Any, model_config: Any) -> None:
        super().__init__(cfg, tokenizer, model_config)
        self.temperature = cfg.contrastive.temperature
        self.cls_id, self.sep_id = tokenizer.bos_id, tokenizer.eos_id

    def window_length(self, block_size: int) -> int:
        return block_size - 2

    def flops_per_token(self, model: nn.Module) -> float:
        """Both views through the encoder; the MLM head never runs."""
        return self.views * model.flops_per_token(self.model_config.block_size, mlm_head=False)

    def make_batch(self, windows: np.ndarray, rng: np.random.Generator, source: TokenBatches) -> Batch:
        rows = len(windows)
        ids = np.concatenate([np.full((rows, 1), self.cls_id), windows, np.full((rows, 1), self.sep_id)], axis=1)
        return {"input_ids": torch.from_numpy(ids)}

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        ids = batch["input_ids"]
        # one forward over both views (2B rows): dropout draws independent masks for each copy
        z = model(torch.cat([ids, ids]), None, return_embeddings=True)[0].float()
        z = F.normalize(z, dim=-1)
        z1, z2 = z[: len(ids)], z[len(ids):]
        logits = z1 @ z2.T / self.temperature
        return F.cross_entropy(logits, torch.arange(len(ids), device=logits.device))

    def eval_loss(self, model: nn.Module, batch: Batch, index: int) -> Tensor:
        was_training = model.training
        model.train()  # the views differ only through dropout
        devices = [batch["input_ids"].device] if batch["input_ids"].is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(EVAL_STREAM + index)
            loss = self.loss(model, batch)
        model.train(was_training)
        return loss


class PairSource:
    """Source/target pairs from a JSONL file (`data.pairs`), tokenized once, split by content hash.

    Each line is `{"source": "...", "target": "..."}`. A pair goes to val when the first byte of
    sha256(source) is below `val_fraction` * 256 of the range (about 5% by default), so the split
    does not depend on the order of the lines. Sources longer than model.block_size - 1 tokens
    and targets longer than block_size - 1 are cut (counted and reported once).
    """

    def __init__(self, path: str | Path, tokenizer: Any, split: str, block_size: int,
                 val_fraction: float = 0.05) -> None:
        import hashlib

        path = Path(path)
        if not path.is_file():
            raise UserError(f"data.pairs: {path} does not exist; point it at a JSONL file of "
                            '{"source": ..., "target": ...} lines')
        sources, targets = [], []
        for line_no, record in iter_jsonl_objects(path):
            if not all(isinstance(record.get(k), str) and record[k].strip() for k in ("source", "target")):
                raise UserError(f'{path}:{line_no}: needs non-empty string fields "source" and "target"')
            in_val = hashlib.sha256(record["source"].encode()).digest()[0] < val_fraction * 256
            if in_val == (split == "val"):
                sources.append(record["source"])
                targets.append(record["target"])
        if not sources:
            raise UserError(f"{path}: no {split} pairs (val takes ~{val_fraction:.0%} by content hash); add pairs")
        cut = block_size - 1
        enc_s = tokenizer.encode_batch(sources)
        enc_t = tokenizer.encode_batch(targets)
        self.truncated = sum(len(a) > cut for a in enc_s) + sum(len(b) > cut for b in enc_t)
        self.sources = [a[:cut] + [tokenizer.eos_id] for a in enc_s]
        self.targets = [b[:cut] + [tokenizer.eos_id] for b in enc_t]
        self.num_tokens = sum(map(len, self.sources)) + sum(map(len, self.targets))
        self.split = split


class Seq2Seq(Objective):
    """Plain sequence-to-sequence on paired data (translation, summarization...): the encoder
    reads the source, the decoder is trained to write the target (teacher forcing).

    Rows are padded to the longest source/target of the batch with the pad id; the encoder
    gets an attention_mask, padded target positions are -100 (ignored by the loss).
    """

    name, arch = "seq2seq", "encdec"

    def __init__(self, cfg: Any, tokenizer: Any, model_config: Any) -> None:
        super().__init__(cfg, tokenizer, model_config)
        if not cfg.data.pairs:
            raise UserError("objective seq2seq reads data.pairs (a JSONL file of source/target pairs); set it")
        self.pad_id = tokenizer.pad_id

    def source(self, tokens_dir: Any, split: str) -> PairSource:
        return PairSource(self.cfg.data.pairs, self.tokenizer, split, self.model_config.block_size)

    def global_batch(self, source: PairSource, seed: int, step: int, rows: int) -> Batch:
        rng = np.random.default_rng([seed, step])
        picks = rng.integers(0, len(source.sources), size=rows)
        src = [source.sources[i] for i in picks]
        tgt = [source.targets[i] for i in picks]
        s_len, t_len = max(map(len, src)), max(map(len, tgt))
        ids = np.full((rows, s_len), self.pad_id, dtype=np.int64)
        mask = np.zeros((rows, s_len), dtype=np.int64)
        labels = np.full((rows, t_len), -100, dtype=np.int64)
        for r, (a, b) in enumerate(zip(src, tgt)):
            ids[r, :len(a)], mask[r, :len(a)], labels[r, :len(b)] = a, 1, b
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                "labels": torch.from_numpy(labels)}

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return model(batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"])[1]


OBJECTIVES: dict[str, type[Objective]] = {
    "clm": CausalLM, "mlm": MaskedLM, "span": SpanCorruption, "contrastive": Contrastive, "seq2seq": Seq2Seq,
}


def objective_for(cfg: Any, tokenizer: Any, model_config: Any) -> Objective:
    """The objective `cfg.objective` names, checked against the model (`Objective.check`)."""
    cls = OBJECTIVES[cfg.objective]
    cls.check(model_config)
    return cls(cfg, tokenizer, model_config)


# ---- tokens ---------------------------------------------------------------------------------


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special (control) tokens."""
    decoder = tokenizer.backend.get_added_tokens_decoder()
    return {i for i, tok in decoder.items() if tok.special}


def find_token(tokenizer: Any, name: str, fallbacks: tuple[str, ...] = ()) -> int:
    for candidate in (name, *fallbacks):
        token_id = tokenizer.token_to_id(candidate)
        if token_id is not None:
            return token_id
    raise UserError(f"{tokenizer.source} has no {name} token; train through `lmforge pretrain`, which adds it")


def with_tokens(tokenizer: Any, names: tuple[str, ...], fallbacks: dict[str, tuple[str, ...]] | None = None) -> bool:
    """Append the special tokens in `names` the tokenizer lacks (after every existing id).

    A token counts as present under a fallback name too ([MASK] for <|mask|>, T5's
    <extra_id_N> for <|extra_id_N|>). Returns whether anything was added.
    """
    from tokenizers import AddedToken

    fallbacks = fallbacks or {}
    missing = [n for n in names
               if all(tokenizer.token_to_id(c) is None for c in (n, *fallbacks.get(n, ())))]
    if missing:
        tokenizer.backend.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in missing])
    return bool(missing)


def token_fallbacks() -> dict[str, tuple[str, ...]]:
    return {MASK: MASK_FALLBACKS, **{sentinel(i): (f"<extra_id_{i}>",) for i in range(NUM_SENTINELS)}}


def padded_vocab(n: int) -> int:
    return 64 * math.ceil(n / 64)  # a multiple of 64 keeps matmuls aligned
