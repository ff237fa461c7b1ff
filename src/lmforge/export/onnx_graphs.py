"""Which ONNX graphs a model becomes, with their input/output names, example inputs and dynamic axes.

- GPT family (`gpt`): one graph `model.onnx`, the decoder with a KV cache
  (input_ids, attention_mask, past_key_values.{i}.key/value) -> (logits, present.{i}.key/value);
- BERT (`bert`): `model.onnx`, (input_ids, attention_mask, token_type_ids) -> (last_hidden_state,
  embeddings);
- encoder-decoder (`encdec`): `encoder.onnx` (input_ids, attention_mask) -> encoder_hidden_states,
  and `decoder.onnx` (decoder_input_ids, encoder_hidden_states, encoder_attention_mask, past
  self-attention keys/values) -> (logits, present keys/values).

Names follow Hugging Face Optimum's ONNX exports, so ONNX Runtime code written for those reads
these. Example inputs use sizes >= 2 everywhere (torch.export specializes sizes 0 and 1), and
the past is non-empty while exporting; the graphs take a past of length 0 at run time.

A Mixture-of-Experts layer routes tokens with data-dependent group sizes, which torch.export
cannot trace; `dense_moe_for_export` swaps each one for `DenseMoE`, which computes every expert
on every token and weights the outputs with the same top-k gates (zero for the experts not
chosen): the same function, E/top_k times the expert FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lmforge.export.onnx_wrappers import DecoderWithPast, EncoderOnly, Seq2SeqDecoderWithPast, Seq2SeqEncoder

SUPPORTED_ARCHS = ("gpt", "bert", "encdec")


@dataclass
class GraphSpec:
    """One graph to export: the wrapper module, example inputs and the names/dynamic axes."""

    file: str
    module: nn.Module
    args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: tuple
    role: str  # "decoder" (with past), "encoder" (BERT), "seq2seq-encoder", "seq2seq-decoder"
    extra: dict = field(default_factory=dict)


class DenseMoE(nn.Module):
    """An `MoE` layer (eval mode, no capacity limit) computed densely for export (module docstring)."""

    def __init__(self, moe: nn.Module) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: Tensor) -> Tensor:
        moe = self.moe
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        top_logits, top_expert = moe.router_logits(x).topk(moe.top_k, dim=-1)
        gates = top_logits.float().softmax(dim=-1)
        weights = torch.zeros(x.shape[0], moe.num_experts, dtype=gates.dtype, device=x.device)
        weights = weights.scatter(1, top_expert, gates).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(moe.experts):
            out = out + expert(x) * weights[:, e:e + 1]
        return out.view(shape)


def dense_moe_for_export(model: nn.Module) -> int:
    """Swap every MoE layer of `model` for `DenseMoE` in place; the number swapped."""
    from lmforge.models.moe import MoE

    swapped = 0
    for block in getattr(model, "blocks", []):
        if isinstance(block.mlp, MoE):
            block.mlp = DenseMoE(block.mlp)
            swapped += 1
    return swapped


def past_names(n_layer: int, prefix: str) -> list[str]:
    """past_key_values.0.key, past_key_values.0.value, ... (prefix "past_key_values" or "present")."""
    return [f"{prefix}.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def _past_example(config, n_layer: int, batch: int, length: int) -> tuple[Tensor, ...]:
    shape = (batch, config.kv_heads, length, config.head_dim)
    return tuple(torch.zeros(shape) for _ in range(2 * n_layer))


def _past_axes(n_layer: int) -> tuple:
    return tuple({0: "batch", 2: "past_sequence"} for _ in range(2 * n_layer))


def gpt_specs(model: nn.Module) -> list[GraphSpec]:
    c = model.config
    B, T, P = 2, 3, 2
    args = (torch.ones(B, T, dtype=torch.long), torch.ones(B, P + T, dtype=torch.long),
            *_past_example(c, c.n_layer, B, P))
    axes = ({0: "batch", 1: "sequence"}, {0: "batch", 1: "total_sequence"}, _past_axes(c.n_layer))
    return [GraphSpec("model.onnx", DecoderWithPast(model), args,
                      ["input_ids", "attention_mask", *past_names(c.n_layer, "past_key_values")],
                      ["logits", *past_names(c.n_layer, "present")], axes, "decoder")]


def bert_specs(model: nn.Module) -> list[GraphSpec]:
    ids = torch.ones(2, 3, dtype=torch.long)
    axes = tuple({0: "batch", 1: "sequence"} for _ in range(3))
    return [GraphSpec("model.onnx", EncoderOnly(model), (ids, torch.ones_like(ids), torch.zeros_like(ids)),
                      ["input_ids", "attention_mask", "token_type_ids"], ["last_hidden_state", "embeddings"],
                      axes, "encoder")]


def encdec_specs(model: nn.Module) -> list[GraphSpec]:
    c = model.config
    L, B, S, T, P = c.decoder_layers, 2, 4, 3, 2
    src = torch.ones(B, S, dtype=torch.long)
    encoder = GraphSpec("encoder.onnx", Seq2SeqEncoder(model), (src, torch.ones_like(src)),
                        ["input_ids", "attention_mask"], ["encoder_hidden_states"],
                        ({0: "batch", 1: "encoder_sequence"}, {0: "batch", 1: "encoder_sequence"}), "seq2seq-encoder")
    hidden = torch.zeros(B, S, c.n_embd)
    decoder = GraphSpec(
        "decoder.onnx", Seq2SeqDecoderWithPast(model),
        (torch.ones(B, T, dtype=torch.long), hidden, torch.ones_like(src), *_past_example(c, L, B, P)),
        ["decoder_input_ids", "encoder_hidden_states", "encoder_attention_mask",
         *past_names(L, "past_key_values")],
        ["logits", *past_names(L, "present")],
        ({0: "batch", 1: "sequence"}, {0: "batch", 1: "encoder_sequence"}, {0: "batch", 1: "encoder_sequence"},
         _past_axes(L)), "seq2seq-decoder", {"decoder_start_token_id": c.decoder_start_token_id})
    return [encoder, decoder]


def graph_specs(model: nn.Module) -> list[GraphSpec]:
    """The graphs `model` (eval mode, its MoE layers already dense) is exported as."""
    return {"gpt": gpt_specs, "bert": bert_specs, "encdec": encdec_specs}[model.config.arch](model)


def check_inputs(spec: GraphSpec) -> list[tuple]:
    """Input sets of other sizes than the traced example (a prefill from an empty past, a one-token
    decode, a left-padded row), to compare ONNX Runtime with PyTorch after export."""
    c = spec.module.model.config
    g = torch.Generator().manual_seed(0)

    def ids(*shape: int) -> Tensor:
        return torch.randint(0, c.vocab_size, shape, generator=g)

    def past(n_layer: int, batch: int, length: int) -> tuple[Tensor, ...]:
        return tuple(torch.randn(batch, c.kv_heads, length, c.head_dim, generator=g) for _ in range(2 * n_layer))

    padded = torch.ones(3, 5, dtype=torch.long)
    padded[1, :2] = 0  # left padding in a decoder, right padding is the same mask for an encoder
    if spec.role == "decoder":
        return [(ids(3, 5), padded, *past(c.n_layer, 3, 0)),
                (ids(1, 1), torch.ones(1, 6, dtype=torch.long), *past(c.n_layer, 1, 5))]
    if spec.role in ("encoder", "seq2seq-encoder"):
        extra = (torch.zeros(3, 5, dtype=torch.long),) if spec.role == "encoder" else ()
        return [(ids(3, 5), padded.flip(1), *extra)]
    hidden = torch.randn(3, 5, c.n_embd, generator=g)
    return [(ids(3, 4), hidden, padded.flip(1), *past(c.decoder_layers, 3, 0)),
            (ids(3, 1), hidden, padded.flip(1), *past(c.decoder_layers, 3, 3))]
