"""Calibration data for GPTQ and AWQ: a few hundred token windows from the data a model was trained on.

`calibration_batches(ckpt_dir, calib, samples, seq_len)` returns `samples` token-id tensors of shape
(1, seq_len), drawn at seeded random offsets from
- `calib` = a token directory (`lmforge tokenize`'s layout, `meta.json`): its train split;
- `calib` = a text file or a directory of text files (what `lmforge tokenize` reads: .txt, .md,
  .jsonl, .csv, .parquet): its documents, each followed by EOS, encoded with the checkpoint's
  own tokenizer (reading stops once there are enough tokens for the windows to rarely overlap);
- `calib` = None: the train split of the token dir the checkpoint was trained on, found in the run's
  `config.yaml` (`data.tokens`) or `summary.json` (`inputs.tokens`) in the checkpoint dir, the run
  dir above `checkpoints/`, or the checkpoint dir's parent.

A stream shorter than `seq_len` gives shorter windows (all of it); one with no text is a `UserError`.

The activations those windows produce, block by block, for the layer-by-layer methods:
`block_lists(model)` finds the model's stacks of repeated blocks (the outermost `nn.ModuleList`s
that hold Linears: GPT's and BERT's `blocks`, an encoder-decoder's `encoder_blocks` and
`decoder_blocks`; an MoE's `experts` list is inside a block, so part of it), and
`capture_block_inputs(model, calib)` runs the model once per window and records each stack's first
block input and every block's keyword arguments (RoPE tables, masks, the encoder output a decoder
block attends to), so a method can run block i alone (`run_block`) on inputs propagated through
blocks 0..i-1 as it has changed them. (A decoder block's `context` stays the full-precision
encoder's output.) A model without such a stack is one "block": the whole model, its inputs the
token windows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.errors import UserError

DEFAULT_SEED = 0
_OVERSAMPLE = 8  # text calibration reads up to samples * seq_len * this many tokens


def calibration_batches(ckpt_dir: str | Path, calib: str | Path | None, samples: int, seq_len: int, *,
                        seed: int = DEFAULT_SEED) -> list[Tensor]:
    """`samples` windows (1, T <= seq_len) of token ids for calibrating the checkpoint in `ckpt_dir`."""
    from lmforge.train.checkpoint import read_model_config, resolve_checkpoint

    if samples < 1 or seq_len < 2:
        raise UserError(f"--calib-samples must be >= 1 and the calibration length >= 2, got {samples} and {seq_len}")
    ckpt = resolve_checkpoint(ckpt_dir)
    config = read_model_config(ckpt)
    seq_len = min(seq_len, int(config.get("block_size") or seq_len))
    vocab = int(config.get("vocab_size") or 0) or None
    source = Path(calib) if calib is not None else trained_token_dir(ckpt)
    if (source / "meta.json").is_file():
        stream = _token_dir_stream(source)
    else:
        stream = _text_stream(source, ckpt, samples * seq_len * _OVERSAMPLE)
    if vocab is not None and len(stream) and int(stream.max()) >= vocab:
        raise UserError(f"{source}: token id {int(stream.max())} is outside the model's vocabulary ({vocab}); "
                        "calibrate with data tokenized by the checkpoint's own tokenizer")
    return sample_windows(stream, samples, seq_len, seed=seed)


def sample_windows(stream: np.ndarray, samples: int, seq_len: int, *, seed: int = DEFAULT_SEED) -> list[Tensor]:
    """`samples` windows of `seq_len` tokens at seeded random starts in `stream` (all of it if shorter)."""
    if len(stream) < 2:
        raise UserError("the calibration data has fewer than 2 tokens; pass --calib with more text")
    length = min(seq_len, len(stream))
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(stream) - length + 1, size=samples)
    return [torch.from_numpy(np.asarray(stream[s:s + length], dtype=np.int64)).unsqueeze(0) for s in starts]


def trained_token_dir(ckpt: Path) -> Path:
    """The token dir the checkpoint's run trained on (`lmforge.compress.heldout.token_dir_of`), or a `UserError`."""
    from lmforge.compress.heldout import token_dir_of

    found = token_dir_of(ckpt)
    if found is None:
        raise UserError(f"{ckpt}: cannot find the token dir it was trained on (no config.yaml data.tokens or "
                        "summary.json inputs.tokens naming an existing token dir); pass --calib DIR")
    return found


def _token_dir_stream(directory: Path) -> np.ndarray:
    """The train split of a token dir as one array (the shards concatenated)."""
    from lmforge.tokenizer.shards import load_split

    shards = load_split(directory, "train")
    return shards[0] if len(shards) == 1 else np.concatenate(shards)


def _text_stream(source: Path, ckpt: Path, enough: int) -> np.ndarray:
    """Documents under `source` encoded with the checkpoint's tokenizer, each followed by EOS."""
    from lmforge.data.readers import iter_documents
    from lmforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(ckpt / "tokenizer.json")
    ids: list[int] = []
    for doc in iter_documents(source):  # UserError for a missing path or a dir with no text
        ids.extend(tokenizer.encode(doc.text, add_eos=True))
        if len(ids) >= enough:
            break
    return np.asarray(ids, dtype=np.int64)


# ---- activations, block by block ---------------------------------------------------------------


@dataclass
class BlockStack:
    """One stack of repeated blocks and the calibration inputs of its first block.

    `inputs[s]` is window s's hidden state entering the stack (args[0] of its first block) and
    `kwargs[i][s]` the keyword arguments block i got for window s; `args[i][s]` any further
    positional arguments. `whole_model` marks the fallback "stack" (the model itself)."""

    name: str
    blocks: list[nn.Module]
    inputs: list[Tensor] = field(default_factory=list)
    args: list[list[tuple]] = field(default_factory=list)
    kwargs: list[list[dict[str, Any]]] = field(default_factory=list)
    whole_model: bool = False


def block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The outermost ModuleLists of `model` whose elements hold Linears, in definition order."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or any(name.startswith(f"{n}.") for n, _ in found):
            continue
        if any(isinstance(m, nn.Linear) for child in module for m in child.modules()):
            found.append((name, module))
    return found


def model_forward(model: nn.Module, ids: Tensor) -> Any:
    """One plain forward of `model` on token ids (an encoder-decoder decodes the same ids)."""
    from lmforge.models import has_capability

    if has_capability(model, "encoder_decoder"):
        return model(ids, ids)
    return model(ids)


@contextlib.contextmanager
def calibration_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode, its MoE layers without their CPU row padding (padding rows repeat a real
    token with gate 0: harmless to the output, but they would weigh in an expert's statistics)."""
    from lmforge.models import eval_mode
    from lmforge.models.moe import moe_layers

    layers = moe_layers(model)
    padded = [layer.pad_groups for layer in layers]
    try:
        with eval_mode(model):
            for layer in layers:
                layer.pad_groups = False
            yield model
    finally:
        for layer, pad in zip(layers, padded):
            layer.pad_groups = pad


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calib: list[Tensor]) -> list[BlockStack]:
    """Each block stack with its calibration inputs (see `BlockStack`), in the order the forward reaches them."""
    lists = block_lists(model)
    if not lists:
        return [whole_model_stack(model, calib)]
    stacks = {name: BlockStack(name, list(blocks)) for name, blocks in lists}
    for stack in stacks.values():
        stack.args = [[] for _ in stack.blocks]
        stack.kwargs = [[] for _ in stack.blocks]
    order: list[str] = []
    handles = []
    for name, blocks in lists:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(_recorder(stacks[name], i, order), with_kwargs=True))
    try:
        for ids in calib:
            model_forward(model, ids.to(_device_of(model)))
    finally:
        for handle in handles:
            handle.remove()
    return [stacks[name] for name in dict.fromkeys(order)]


def whole_model_stack(model: nn.Module, calib: list[Tensor]) -> BlockStack:
    """The model itself as a one-block stack whose inputs are the token windows."""
    return BlockStack("", [model], list(calib), [[()] * len(calib)], [[{}] * len(calib)], whole_model=True)


def _recorder(stack: BlockStack, i: int, order: list[str]):
    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if i == 0:
            stack.inputs.append(args[0].detach())
            order.append(stack.name)
        stack.args[i].append(tuple(args[1:]))
        stack.kwargs[i].append(dict(kwargs))
    return hook


def _device_of(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device


def run_block(stack: BlockStack, i: int, inputs: list[Tensor]) -> Iterator[Any]:
    """Block i of `stack` on each input, with the arguments it had in the forward: one output per
    input. Consecutive windows of the same shape whose other arguments are equal (RoPE tables of the
    same positions, no mask) run as one batch of up to `BATCH_TOKENS` tokens."""
    block = stack.blocks[i]
    with torch.no_grad():
        for start, stop in _batches(stack, i, inputs):
            x = inputs[start] if stop - start == 1 else torch.cat(inputs[start:stop])
            if stack.whole_model:
                out = model_forward(block, x)
            else:
                out = block(x, *stack.args[i][start], **stack.kwargs[i][start])
            if stop - start == 1:
                yield out
            elif isinstance(out, Tensor):
                yield from out.split([len(t) for t in inputs[start:stop]])
            else:  # a whole model's (logits, loss): nobody reads it per window
                yield from [out] * (stop - start)


BATCH_TOKENS = 8192


def _batches(stack: BlockStack, i: int, inputs: list[Tensor]) -> Iterator[tuple[int, int]]:
    """[start, stop) runs of windows that may run as one batch (see `run_block`)."""
    start = 0
    while start < len(inputs):
        stop = start + 1
        tokens = inputs[start].shape[:-1].numel() if not stack.whole_model else inputs[start].numel()
        while (stop < len(inputs) and (stop - start + 1) * tokens <= BATCH_TOKENS
               and inputs[stop].shape == inputs[start].shape
               and _same(stack.args[i][stop], stack.args[i][start])
               and _same(stack.kwargs[i][stop], stack.kwargs[i][start])):
            stop += 1
        yield start, stop
        start = stop


def _same(a: Any, b: Any) -> bool:
    """Equal arguments: tensors of equal shape and values, containers element by element."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape
                and (a is b or bool(torch.equal(a, b))))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b
