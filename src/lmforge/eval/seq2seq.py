"""Evaluation of encoder-decoder checkpoints (T5, the original Transformer), and which kinds a model takes.

A seq2seq model does not continue its input: the encoder reads a source and the decoder writes
a target from its start token. So, as lm-evaluation-harness does for seq2seq models, the task's
context or prompt goes to the ENCODER and the continuation or reply is scored or written by the
DECODER:

- the encoder input is `encode_source(tokenizer, context)` (EOS-terminated, sentinel markers as
  sentinel ids: how the `span`/`seq2seq` objectives and `lmforge generate` feed it), cut from the
  left to block_size as `generate` cuts it;
- the continuation is the decoder's target text, tokenized on its own: the seq2seq objective's
  targets start at the decoder's start token with no leading space, so leading whitespace of the
  continuation is dropped (`" yes"` -> `"yes"`, like T5's SentencePiece does) and EOS is
  appended, as every target of those objectives ends: the score is that of the whole reply;
- log p(continuation | context) = sum over t of log p(target_t | encoder output, start + targets[:t]),
  i.e. the teacher-forced decoder of training (decoder input = start token + targets[:-1]);
- replies come from `scoring.generate_replies` -> `infer.generate.generate_texts` (batched: the
  sources right-padded under the encoder's padding mask, every row decoding from the start token
  with cached cross keys/values): no second decoding loop here.

Perplexity of a text is a decoder-only measure (it needs a model that predicts a text from its
own prefix) and is refused for encoder-decoders; encoder-only models (BERT) only score labels
with a classification head. `require_lm` says so in one line, naming the kinds that work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmforge.errors import UserError
from lmforge.eval.scoring import LogLikelihood, model_device, score_positions
from lmforge.eval.scoring import encode_pair as causal_encode_pair
from lmforge.infer.generate import can_generate, encode_source, is_encoder_decoder
from lmforge.models import eval_mode, has_capability
from lmforge.tokenizer import pad_ids

SEQ2SEQ_KINDS = "generation, qa, binary, classification (label scoring) or multiple_choice"


def require_lm(model: torch.nn.Module, what: str, allow_seq2seq: bool = True) -> None:
    """Raise a one-line UserError unless `model` can do `what` (a decoder-only LM always can;
    an encoder-decoder when `allow_seq2seq`); the message names the kinds the model does take."""
    if can_generate(model) and (allow_seq2seq or not is_encoder_decoder(model)):
        return
    name = type(model).__name__
    if is_encoder_decoder(model):
        raise UserError(f"{what} needs a decoder-only language model (e.g. a GPT checkpoint): the perplexity "
                        f"of a text is a decoder-only measure; this checkpoint is an encoder-decoder ({name}), "
                        f"evaluate it with {SEQ2SEQ_KINDS} tasks")
    head = has_capability(model, "classify")
    works = ("only classification tasks work with it (through its classification head)" if head else
             "it has no classification head (model.num_labels), which is the only way eval uses an encoder; "
             "fine-tune one for classification tasks")
    needs = "a decoder-only language model (e.g. a GPT checkpoint)"
    needs += " or an encoder-decoder (T5)" if allow_seq2seq else ""
    raise UserError(f"{what} needs {needs}; this checkpoint is an encoder ({name}): {works}")


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(encoder ids, decoder target ids) for scoring `continuation` as the whole reply to `context`.

    The target ends with eos, as the span and seq2seq objectives (and T5, and lm-evaluation-
    harness for seq2seq models) end every target: the score is that of the complete reply, so
    a choice that is the beginning of another ("Paris" / "Paris, France") is not favoured.
    """
    target = continuation.lstrip() or continuation  # a whitespace-only continuation stays as it is
    return encode_source(tokenizer, context), tokenizer.encode(target, add_eos=True)


def pair_encoder(model: torch.nn.Module) -> Callable[[object, str, str], tuple[list[int], list[int]]]:
    """The request builder for `model`: this module's for an encoder-decoder, scoring's otherwise."""
    return encode_pair if is_encoder_decoder(model) else causal_encode_pair


def loglikelihoods(model: torch.nn.Module, requests: Sequence[tuple[list[int], list[int]]],
                   batch_size: int = 16, desc: str = "scoring", progress: bool = True) -> list[LogLikelihood]:
    """Score each (encoder ids, target ids) request with an encoder-decoder; results in request order.

    Batched longest-first: encoder rows are right-padded under an attention mask (masked in the
    encoder's self-attention and in cross-attention), decoder rows are right-padded with no mask
    (causal: a padded position never influences an earlier one). The encoder keeps its last
    block_size ids; the decoder scores at most the first block_size target ids (`tokens` says
    how many).
    """
    block_size = model.config.block_size
    start_id = model.decoder_start_id
    device = model_device(model)
    rows = []
    for i, (source, target) in enumerate(requests):
        if not target:
            raise ValueError(f"request {i} has an empty continuation")
        if not source:
            raise ValueError(f"request {i} has an empty encoder input (it needs at least the eos)")
        rows.append((i, source[-block_size:], target[:block_size]))
    rows.sort(key=lambda r: -(len(r[1]) + len(r[2])))
    out: list[LogLikelihood | None] = [None] * len(requests)
    with eval_mode(model):
        bar = tqdm(total=len(rows), desc=desc, unit="req", disable=not progress, leave=False)
        for begin in range(0, len(rows), batch_size):
            chunk = rows[begin:begin + batch_size]
            sources = pad_ids([source for _, source, _ in chunk], 0, return_tensors="pt")  # any id under the mask
            # the decoder reads the start token, then targets[:-1]
            decoder_ids = pad_ids([[start_id, *target[:-1]] for _, _, target in chunk], start_id,
                                  return_tensors="pt")["input_ids"]
            with torch.inference_mode():
                mask = sources["attention_mask"].to(device)
                encoder_output = model.encode(sources["input_ids"].to(device), attention_mask=mask)
                logits = model.decode(decoder_ids.to(device), encoder_output, attention_mask=mask)
                logprobs = F.log_softmax(logits.float(), dim=-1)
            for r, (i, _, target) in enumerate(chunk):
                out[i] = score_positions(logprobs[r, :len(target)], target)
            bar.update(len(chunk))
        bar.close()
    return out  # type: ignore[return-value]
