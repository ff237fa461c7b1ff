"""Training memory per device for `lmforge plan`: weights, gradients, AdamW state and
activations, by part, and the peak of a training step (`training_memory`). LoRA and QLoRA
setups (`lmforge.plan.lora`) are modelled here too.

Memory, full training (AdamW, fp32 master weights): 4 bytes of weights, 4 of gradients and 8 of
AdamW state (exp_avg, exp_avg_sq) per parameter, sharded G ways under FSDP; bf16 autocast adds
a bf16 copy of each matmul weight per step. Activations are derived from what autograd saves in
OUR blocks (`models/blocks.py`, `models/moe.py`), tensor by tensor, not from a generic formula,
and checked block by block against the tensors autograd saves (saved-tensor hooks) and as a
whole against the peak of a real training step measured on CPU
(`lmforge.peakmem.measure_training_peak`; tests/test_plan.py). Per layer and token, a pre-norm
block saves: each norm's input (the residual stream, fp32 under autocast, since the master
weights are fp32) and output (what the next Linear reads; under autocast each Linear saves its
own bf16 copy, so a gated MLP's gate and up keep two; LayerNorm: + mean/rstd; RMSNorm:
+ x·rstd and rstd, since `F.rms_norm` is composite); the fused qkv output (SDPA keeps the whole
buffer alive through its v view); RoPE's rotated q and k; SDPA's output and logsumexp (on the
CPU attention path instead: the scaled q, copies of k and v, and the (T, T) probabilities, with
dropout also their uint8 keep-mask and the dropped probabilities); the MLP's hidden tensors
(gelu: pre- and post-activation; relu: one; swiglu/geglu: gate, act(gate), up and their
product); with dropout, a 1-byte keep-mask per residual dropout. An MoE block
saves, instead of the MLP's: the router's fp32 input, logits and probabilities, and per routed
copy of a token (top_k) the gathered input, the expert's hidden tensors and its output. A
post-norm block (BERT, the original Transformer) saves the same amounts in other places: its
input (read by qkv) and each norm's input, stats and output. Outside the blocks: the final norm
and the fp32 log-softmax of the loss (the training loop keeps only the loss, so the logits are
gone), and, for a moment at the start of backward, two fp32 logit-sized gradients. The peak is
found by walking backward (`training_memory`): at the head, or at the top or bottom block of a
stack, where gradients pile up while activations are freed (MoE blocks, whose weights outweigh
their activations, peak there), or at the end. Activation checkpointing keeps only each block's
input and recomputes one block at a time.

BERT and encoder-decoders are modelled the same way, from their own structure (`stacks`,
`block_activation_bytes`, `_ends`) and the shapes their objective feeds them
(`objective_lengths`). BERT (mlm): bidirectional post-norm blocks over block_size positions (no
padding mask: mlm rows are full); the embedding LayerNorm and dropout; the MLM transform (dense,
activation, LayerNorm) and the tied output projection at every position, as `BERT.forward`
computes them, so the fp32 log-softmax is (tokens x vocab) like GPT's; the pooler and NSP head
per example, whose backward also writes a full (B, T, d) gradient of the hidden states. An
encoder-decoder (span): an encoder stack over the corrupted input and a decoder stack over
span corruption's targets, about a quarter as long (`SpanCorruption`'s own arithmetic: 128 ->
128 encoder and 29 decoder positions), whose blocks also save a cross-attention: its norm, q
over the decoder positions, k and v over the encoder's, (T, S) probabilities on the CPU paths;
its kv projection's input is the encoder output, one saved tensor for all decoder layers in
fp32 but a bf16 cast per layer under autocast; the decoder's head (T positions) and, while the
decoder runs backward, the encoder output's fp32 gradient. T5's relative position bias makes
every self-attention take SDPA's math path on CPU (a bias that needs a gradient), which
computes in fp32 even under bf16 autocast and saves copies of q, k, v and the probabilities;
CUDA's fused kernels (`attention="fused"`) save q, k, v, the output and logsumexp as for GPT.

Assumptions: the plan describes a CUDA run (SDPA attention, autocast's CUDA op lists); the CPU
checks force SDPA where a CPU run would not take it. LoRA's frozen model is checked with
LayerNorm/RMSNorm computed in bf16 as the CPU does; CUDA autocast runs LayerNorm in fp32,
which keeps one more fp32 copy of each norm's input (not modelled). Validated on CPU (fp32 and
bf16, tests/test_plan.py, benchmarks/plan_memory.py): GPT, llama, MoE presets, LoRA/QLoRA on
GPT presets, bert-mini (mlm + nsp, and contrastive: both dropout views of each row through the
encoder, no MLM head), t5-small and transformer-base (span). Not validated: LoRA
and QLoRA on BERT/encoder-decoders (their rows say so), padded batches (seq2seq, BERT with an
attention mask: modelled as full block_size rows), and, for lack of a GPU here, every CUDA-only term (FSDP;
SDPA's efficient kernel with T5's bias, which also keeps the (1, heads, T, S) bias per layer:
not modelled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmforge.errors import UserError
from lmforge.models.config import ModelConfig
from lmforge.plan.lora import LORA_TARGETS, LoRA, frozen_base_bytes, lora_params
from lmforge.plan.params import block_linears, built_model, count_params, is_gated

ADAMW_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32, per parameter
PRECISIONS = ("fp32", "bf16")
# MoE dispatch pads each expert's rows to one of 8 sizes per power of two (`models.moe.bucket_rows`):
# n in [2^b, 2^(b+1)) rounds up to a multiple of 2^(b-3), on average 2^(b-4) rows more, ~1/24 of n
MOE_PADDING = 1 + 1 / 24


@dataclass(frozen=True)
class Precision:
    """Byte sizes of one training setup.

    fp32; bf16: autocast over fp32 master weights (the residual stream and norm inputs stay
    fp32); bf16-frozen: a bf16 base model under bf16 autocast (LoRA/QLoRA), everything bf16.
    """

    name: str
    act: int  # matmul outputs (Linear, SDPA) under autocast
    stream: int  # the residual stream between blocks (what the embeddings and norms see)
    cast_weights: int  # autocast's per-step bf16 copies of matmul weights (0: none)

    @classmethod
    def of(cls, name: str) -> Precision:
        table = {"fp32": (4, 4, 0), "bf16": (2, 4, 2), "bf16-frozen": (2, 2, 0)}
        if name not in table:
            raise UserError(f"precision {name!r} is not one of {', '.join(PRECISIONS)}")
        return cls(name, *table[name])


def _norm_act_bytes(c: ModelConfig, p: Precision, output_saved: bool = True, input_bytes: int | None = None) -> int:
    """Bytes per token one norm saves, its input included, and its output if a Linear keeps it.

    The input is in the residual stream's dtype unless `input_bytes` says otherwise (BERT's MLM
    head norms a bf16 matmul output under autocast).
    """
    d = c.n_embd
    stream = p.stream if input_bytes is None else input_bytes
    out = d * p.act if output_saved else 0  # the next Linear saves its (autocast-cast) input
    if c.norm == "layernorm":
        return d * stream + 2 * 4 + out  # input, fp32 mean and rstd
    if stream == 4:
        return d * 4 + d * 4 + 4 + out  # rms_norm is composite: input, x*rstd (for the weight grad), rstd
    return d * 4 + 4 + out  # a bf16 input is upcast: the fp32 copy and rstd (frozen weight: no x*rstd)


@dataclass(frozen=True)
class Stack:
    """A stack of identical blocks as one training step runs them (`stacks`)."""

    name: str  # "" (GPT's only stack), "encoder" (BERT, encoder-decoder) or "decoder"
    layers: int
    length: int  # positions per example: the self-attention's queries and keys
    causal: bool
    context: int = 0  # the cross-attention's keys per example (the encoder output); 0: none
    bias: bool = False  # a position bias added to the self-attention scores (T5's relative bias)


def stacks(c: ModelConfig, seq_len: int, decoder_len: int | None = None) -> list[Stack]:
    """The model's block stacks in forward order: GPT's causal stack, BERT's bidirectional one, an
    encoder-decoder's encoder (seq_len source positions) and decoder (decoder_len target positions,
    default seq_len), whose blocks cross-attend to the encoder output."""
    bias = c.pos_encoding == "relative"
    if c.arch == "encdec":
        target = seq_len if decoder_len is None else decoder_len
        return [Stack("encoder", c.n_layer, seq_len, causal=False, bias=bias),
                Stack("decoder", c.decoder_layers, target, causal=True, context=seq_len, bias=bias)]
    if c.arch == "bert":
        return [Stack("encoder", c.n_layer, seq_len, causal=False, bias=bias)]
    return [Stack("", c.n_layer, seq_len, causal=True, bias=bias)]


def objective_lengths(cfg: Any, block_size: int) -> tuple[int, int | None]:
    """Positions per example that `cfg.objective` feeds the model: (encoder or only stack, decoder),
    as the objective itself says (`Objective.lengths`: span corruption's decoder writes about a
    quarter of the encoder's positions; seq2seq pads each batch to its longest pair)."""
    from lmforge.train.objectives import objective_class

    return objective_class(cfg.objective).lengths(cfg, block_size)


def attention_kernel(c: ModelConfig, precision: str, seq_len: int, device_type: str = "cuda") -> str:
    """Which attention behaviour a training run takes: `fused` (SDPA's fused kernels in every
    attention: every CUDA run, and CPU runs in fp32 without dropout or a position bias) or `cpu`
    (what the CPU picks per attention, `_attention_impl`)."""
    from lmforge.models.blocks import Attention

    if device_type == "cpu" and (c.dropout > 0 or c.pos_encoding == "relative" or (
            precision != "fp32" and seq_len <= Attention.CPU_ATTENTION_MAX_LEN)):
        return "cpu"
    return "fused"


def _attention_impl(c: ModelConfig, attention: str, low_precision: bool, keys: int, bias: bool) -> str:
    """The implementation one attention sublayer runs. attention="fused": SDPA's flash/efficient
    kernels (CUDA). attention="cpu": as `Attention._use_cpu_attention` and SDPA's CPU dispatch
    decide: a position bias (which needs a gradient) -> SDPA's `math` path; dropout, or bf16 up
    to `CPU_ATTENTION_MAX_LEN` keys -> the hand-written `cpu` path; else SDPA's flash kernel."""
    from lmforge.models.blocks import Attention

    if attention == "fused":
        return "fused"
    if attention != "cpu":
        raise ValueError(f"unknown attention kernel {attention!r}")
    if bias:
        return "math"
    if c.dropout > 0 or (low_precision and keys <= Attention.CPU_ATTENTION_MAX_LEN):
        return "cpu"
    return "fused"


def _attention_bytes(c: ModelConfig, p: Precision, impl: str, queries: int, keys: int, *, cross: bool,
                     out_trained: bool) -> int:
    """Bytes per example one attention sublayer saves (queries x keys; see the module docstring).

    fused: the projections' outputs (qkv; cross: q and kv), which SDPA keeps whole through its
    views, its output (the out-projection reads it as is) and logsumexp; RoPE's rotated q and k.
    cpu / math: the scaled q, contiguous copies of k^T and v (repeated to every head under GQA),
    the (T, S) probabilities, with dropout also their keep-mask (uint8; the math path: a noise
    tensor in its dtype) and the dropped probabilities, and the (B, T, heads * head_dim) copy of
    the output the out-projection reads.
    SDPA's math path computes in fp32 on CPU (it upcasts bf16), the hand-written one in the
    autocast dtype.
    """
    T, S, H = queries, keys, c.n_head
    q, kv = c.n_head * c.head_dim, c.kv_heads * c.head_dim
    if impl == "fused":
        projections = (T * q + S * 2 * kv) if cross else T * (q + 2 * kv)
        rotated = T * (q + kv) if c.pos_encoding == "rope" and not cross else 0
        return (projections + T * q + rotated) * p.act + H * T * 4
    width = 4 if impl == "math" else p.act
    scores = H * T * S
    saved = (T * q + 2 * S * q + scores) * width
    if c.dropout > 0:  # the keep-mask: `cpu_keep_mask`'s uint8; the math path's `at::dropout` noise tensor
        saved += scores * ((1 if impl == "cpu" else width) + width)
    return saved + (T * q * p.act if out_trained else 0)


def block_activation_bytes(c: ModelConfig, stack: Stack, precision: str, attention: str = "fused",
                           lora: LoRA | None = None) -> dict[str, int]:
    """Bytes per example that one block of `stack` saves for backward, by part (see the module
    docstring). attention: "fused" (CUDA) or "cpu" (`_attention_impl`). With `lora`, the base is
    frozen bf16: a Linear saves its input only if it has an adapter."""
    p = Precision.of("bf16-frozen" if lora else precision)
    trained = set(lora.targets) if lora else set(LORA_TARGETS)
    T, S = stack.length, stack.context
    d, h = c.n_embd, c.ffn_hidden
    E, k = c.moe.num_experts, min(c.moe.top_k, c.moe.num_experts)
    experts_read = "up" in trained or "gate" in trained  # the first MLP Linear(s) save their input
    if E:  # the router reads the norm's output in fp32 (saved when the router is trained); the
        # experts read a bf16 copy, gathered per routed token (counted below)
        norms = _norm_act_bytes(c, p, "qkv" in trained) + _norm_act_bytes(c, p, False) + (0 if lora else d * 4)
    else:
        norms = _norm_act_bytes(c, p, "qkv" in trained) + _norm_act_bytes(c, p, experts_read)
        if is_gated(c) and lora is None and p.act != p.stream:  # gate and up each save their own
            norms += d * p.act  # autocast copy of the norm's output
    low = p.act == 2
    impl = _attention_impl(c, attention, low, T, stack.bias)
    parts = {"attention": _attention_bytes(c, p, impl, T, T, cross=False, out_trained="out" in trained)}
    if S:  # cross-attention: its norm (whose output the q projection reads; q and kv get no adapters)
        norms += _norm_act_bytes(c, p, lora is None)
        cross = _attention_impl(c, attention, low, S, bias=False)
        parts["cross_attention"] = _attention_bytes(c, p, cross, T, S, cross=True, out_trained="out" in trained)
        if lora is None and p.act != p.stream:  # each layer's kv projection casts the encoder output
            parts["cross_attention"] += S * d * p.act  # (in fp32 all layers save the same tensor: `_ends`)
    parts["residual_norms"] = norms * T
    # MLP hidden tensors: the activation's saved input(s), + the down-projection's input when
    # down is trained (relu: the same tensor as relu's saved output)
    hidden = 3 if is_gated(c) else 1  # gated: gate, act(gate), up; else the activation's input (relu: output)
    hidden += int("down" in trained and c.mlp != "relu")
    mlp = hidden * h * p.act
    if E:  # per token: fp32 router logits and probabilities, the k gates; per routed copy (k):
        # the gathered input, the expert's hidden tensors and its output (saved by the gating),
        # each expert's rows padded by ~1/24 on average (`moe.bucket_rows`: up to 1/8)
        mlp = E * 8 + k * 4 + k * MOE_PADDING * (mlp + (d * p.act if experts_read else 0) + d * p.act)
    parts["mlp"] = mlp * T
    # 1-byte keep-masks of the residual dropouts (attention, cross-attention and MLP outputs)
    parts["dropout"] = (3 if S else 2) * d * T if c.dropout > 0 else 0
    if lora:  # A's r-wide output, which B saves, per targeted Linear (and routed expert)
        outs = 2 if S and "out" in lora.targets else 1  # a decoder block has two out-projections
        parts["lora"] = T * sum(lora.rank * p.act * active * (outs if name == "out" else 1)
                                for name, _, _, _, active in lora.targeted(c))
    return parts


def _ends(c: ModelConfig, p: Precision, micro_batch: int, model_stacks: list[Stack], lora: LoRA | None,
          embeddings: bool = False) -> dict[str, float]:
    """Bytes saved outside the blocks: `inputs` (until the end of backward: token ids, BERT's
    embedding norm, the encoder's final norm and output, T5's position buckets), `head` (until
    the head's backward: the final norm or BERT's MLM transform, the fp32 log-softmax, targets)
    and `transient`, the gradients alive for a moment at the start of backward. embeddings: a
    BERT's sentence vectors (an objective whose `output` is "embeddings", e.g. `Contrastive`):
    micro_batch counts every view's rows; no segment ids,
    no MLM head: the mean-pooled, normalized vectors, and the hidden states' fp32 gradient."""
    B, d, V, trained = micro_batch, c.n_embd, c.vocab_size, lora is None
    first, last = model_stacks[0], model_stacks[-1]
    S, T = first.length, last.length  # encoder (or only stack) and decoder positions
    drop = d if c.dropout > 0 else 0  # an embedding dropout's keep-mask (1 byte)
    loss = T * (V * 4 + 8)  # fp32 log-softmax and the targets, over every output position
    transient = T * V * 4 * 2  # d log-softmax and d logits (fp32 loss)
    if c.arch == "gpt":
        inputs = T * 8
        head = T * _norm_act_bytes(c, p, output_saved=trained) + loss
    elif c.arch == "bert" and embeddings:  # ids; the embedding norm; pooled vectors, their norms, logits
        inputs = S * (8 + _norm_act_bytes(c, p, output_saved=False) + drop)
        head = 3 * d * 4 + 2 * B
        transient = S * d * 4  # the mean's backward spreads the vectors' gradient over every position
    elif c.arch == "bert":  # ids, segment ids; the embedding norm (the first block saves its output)
        inputs = S * (16 + _norm_act_bytes(c, p, output_saved=False) + drop)
        # the MLM transform at every position: dense (input), activation (input), norm (input: a
        # matmul output; its output: the output projection's input)
        head = S * ((d * p.act if trained else 0) + d * p.act
                    + _norm_act_bytes(c, p, trained, input_bytes=p.act)) + loss
        if c.nsp_head:  # per example: the pooler's input and tanh output, NSP's log-softmax and label
            head += 2 * d * p.act + 2 * 4 + 8
            transient += S * d * 4  # the gradient of h[:, 0] as a full fp32 (B, S, d) tensor
    else:  # encoder-decoder: encoder and decoder ids, embedding dropouts
        inputs = (S + T) * (8 + drop)
        if c.norm_position == "pre":  # the encoder's final norm (its output: the cross-attention input)
            inputs += S * _norm_act_bytes(c, p, output_saved=False)
        if trained and p.act == p.stream:  # every layer's kv projection saves the same encoder output
            inputs += S * d * p.act
        final = _norm_act_bytes(c, p, trained) if c.norm_position == "pre" else (d * p.act if trained else 0)
        head = T * final + loss
    steps = {"inputs": inputs * B, "head": head * B, "transient": transient * B}
    if c.pos_encoding == "relative":  # each stack's (queries, keys) int64 bucket ids, once per step
        steps["inputs"] += 8 * sum(s.length * s.length for s in model_stacks)
    return steps


def activation_memory(c: ModelConfig, micro_batch: int, seq_len: int, precision: str,
                      checkpointing: bool = False, attention: str = "fused",
                      lora: LoRA | None = None, decoder_len: int | None = None,
                      embeddings: bool = False) -> dict[str, Any]:
    """Activation bytes of one micro-batch, by part: `layers` (all blocks), `inputs` and `head`
    are what is saved at the start of backward; `blocks` lists per block (forward order) its stack,
    what it saves (`saved`: with checkpointing, while it is being recomputed) and what is kept
    until its backward (`kept`: the block's input with checkpointing, else `saved`)."""
    p = Precision.of("bf16-frozen" if lora else precision)
    B = micro_batch
    model_stacks = stacks(c, seq_len, decoder_len)
    blocks = []
    for stack in model_stacks:
        # RoPE under bf16: each layer casts the fp32 cos/sin tables (kept by its backward)
        rope_tables = 4 * stack.length * c.head_dim * 2 if (c.pos_encoding == "rope" and p.act == 2) else 0
        saved = sum(block_activation_bytes(c, stack, precision, attention, lora).values()) * B + rope_tables
        kept = stack.length * c.n_embd * p.stream * B if checkpointing else saved
        blocks += [{"stack": stack, "saved": saved, "kept": kept}] * stack.layers
    ends = _ends(c, p, B, model_stacks, lora, embeddings)
    return {"layers": sum(b["kept"] for b in blocks), "inputs": ends["inputs"], "head": ends["head"],
            "backward_transient": ends["transient"], "blocks": blocks}


def _stack_block_params(c: ModelConfig) -> dict[str, int]:
    """Parameters of one block of each stack (by `Stack.name`)."""
    if c.arch == "gpt":
        return {"": count_params(c)["per_block"]}
    model = built_model(c)
    lists = {"encoder": model.encoder_blocks, "decoder": model.decoder_blocks} if c.arch == "encdec" \
        else {"encoder": model.blocks}
    return {name: sum(p.numel() for p in blocks[0].parameters()) for name, blocks in lists.items()}


def _encoder_params(c: ModelConfig) -> int:
    """A BERT's parameters that its sentence vectors use: the embeddings, their norm, the blocks."""
    model = built_model(c)
    used = (model.tok_embeddings, model.pos_embeddings, model.type_embeddings, model.emb_norm, model.blocks)
    return sum(p.numel() for m in used for p in m.parameters())


def training_memory(c: ModelConfig, micro_batch: int, seq_len: int | None = None, precision: str = "bf16",
                    checkpointing: bool = False, gpus: int = 1, attention: str = "fused",
                    lora: LoRA | None = None, decoder_len: int | None = None,
                    objective: Any = None) -> dict[str, Any]:
    """Peak training memory per device in bytes, by part, for AdamW.

    seq_len: positions per example (an encoder-decoder's source), default block_size;
    decoder_len: an encoder-decoder's target positions, default seq_len (`objective_lengths`).
    objective (a name or an `Objective` class; default: the model's structure alone): its memory
    factors. `views` passes of each example go through the model (contrastive: both dropout
    views, 2 x micro_batch rows), and an objective whose `output` is "embeddings" never runs the
    MLM head, pooler or NSP head, which then get no gradients and no AdamW state.
    Full training keeps fp32 master weights; with `lora` the base is frozen (bf16, or NF4 for
    QLoRA) and only the adapters are trained (fp32), under bf16 autocast (`precision` is
    ignored). With gpus > 1, FSDP2 (as `train.distributed.parallelize` applies it: one unit per
    block, parameters gathered in the compute dtype) shards weights, gradients and optimizer state
    G ways, all-gathers the parameters of the block in use (plus the one prefetched) and of the
    root module (embeddings, head), and holds one block's unsharded gradients before reducing
    them. The FSDP terms are not measured here (no GPUs): they follow FSDP2's documented design.

    The peak is found by walking backward as it runs, as the training loop runs it (it keeps
    only the loss, so the logits are gone; gradients are freed after each step): at the head
    (all activations, autocast's weight copies, the logits' gradients, the head's weight
    gradient), then block by block from the top (the decoder's, then the encoder's), each
    freeing its activations and weight copies and adding its gradients (in bf16 first, then
    accumulated into fp32; in a decoder, also the encoder output's gradient; while it runs, its
    MLP's hidden-layer gradient, which decides the peak when no vocabulary-sized logits
    gradient does: the contrastive objective, larger models), to the end (every
    gradient; a tied embedding's lookup gradient is added out of place into the head's at the
    very end: two more vocab x d tensors). Memory is linear in the blocks done within a stack,
    so each stack's top and bottom blocks bound it. MoE blocks, whose weights outweigh their
    activations at small batches, peak at the bottom; dense ones at the head.
    """
    seq_len = seq_len or c.block_size
    views, embeddings = 1, False
    if objective is not None:
        from lmforge.train.objectives import objective_class

        obj = objective_class(objective) if isinstance(objective, str) else objective
        obj.check(c)  # the models training refuses (e.g. contrastive: not a BERT, no dropout)
        views, embeddings = obj.views, obj.output == "embeddings"
    rows = views * micro_batch
    acts = activation_memory(c, rows, seq_len, precision, checkpointing, attention, lora, decoder_len, embeddings)
    shard = max(gpus, 1)
    if lora is None:
        state = _full_training_state(c, seq_len, precision, gpus, embeddings)
    else:
        state = _lora_training_state(c, lora, gpus)
        acts["dequantized_transient"] = state["dequantized_transient"]
    trainable = state["trainable"]
    grads = trainable * 4 / shard
    optimizer = trainable * ADAMW_STATE_BYTES / shard
    # FSDP: all-gathered (unsharded) parameters of two blocks (the one in use, the one prefetched)
    # and of the root module (embeddings, final norm, head), which stays gathered
    gathered = 2 * state["block_bytes"] + state["root_bytes"] if gpus > 1 else 0.0
    transient = acts.get("dequantized_transient", 0)
    phases = _backward_phases(c, acts, state, rows, micro_batch, seq_len, decoder_len, precision,
                              checkpointing, gpus, lora)
    phases["end of backward"] = grads + state["tied_sum"]
    phase = max(phases, key=phases.get)
    peak = state["weights"] + optimizer + gathered + transient + phases[phase]
    return {"weights": state["weights"], "gradients": grads, "optimizer": optimizer, "fsdp_gathered": gathered,
            "autocast_weight_copies": state["casts"] + transient,
            **{f"activations_{k}": acts[k] for k in ("layers", "inputs", "head", "backward_transient")},
            "trainable_params": trainable, "peak": peak, "peak_phase": phase}


def _full_training_state(c: ModelConfig, seq_len: int, precision: str, gpus: int,
                         embeddings: bool) -> dict[str, Any]:
    """Full training (fp32 master weights): what is trained, the weights and their autocast copies,
    what FSDP gathers, and the head's first gradients."""
    n = count_params(c)
    shard = max(gpus, 1)
    stack_params = _stack_block_params(c)
    p = Precision.of(precision)
    # FSDP gathers the parameters in the compute dtype (`train.distributed.parallelize`:
    # bf16 with bf16 autocast), so there are no autocast copies; one process casts each
    # weight for its matmul and keeps the copy until backward has used it
    gathered_bytes = 4 - p.cast_weights if gpus > 1 else 4
    root = max(0, n["total"] - sum(stack_params[s.name] * s.layers for s in stacks(c, seq_len)))
    cast_bytes = 0 if gpus > 1 else p.cast_weights
    block_casts = {name: x * cast_bytes for name, x in stack_params.items()}
    # a weight's gradient comes out of its bf16 matmul in bf16, then is accumulated in fp32
    largest = max(i * o for _, i, o, _, _ in block_linears(c))
    state = {"trainable": n["total"], "per_block": stack_params, "weights": n["total"] * 4 / shard,
             "block_bytes": n["per_block"] * gathered_bytes, "root_bytes": root * gathered_bytes,
             "casts": n["matmul"] * cast_bytes, "block_casts": block_casts,
             "bf16_grads": largest * p.cast_weights,
             "head_grad": c.vocab_size * c.n_embd * 4 / shard,  # the first gradient backward writes
             "tied_sum": 2 * c.vocab_size * c.n_embd * 4 / shard if c.tie_embeddings else 0}
    if embeddings:  # only the embeddings and blocks are used: no head, its weight copy or gradient
        state.update(trainable=_encoder_params(c), head_grad=0, tied_sum=0,
                     casts=sum(block_casts[s.name] * s.layers for s in stacks(c, seq_len)))
    return state


def _lora_training_state(c: ModelConfig, lora: LoRA, gpus: int) -> dict[str, Any]:
    """LoRA/QLoRA: a frozen base (bf16, or NF4) and fp32 adapters, the only trained parameters."""
    base = frozen_base_bytes(c, lora)
    lp = lora_params(c, lora)
    trainable = lp["total"]
    stack_names = _stack_block_params(c)
    # autocast's bf16 copies of the fp32 adapters (+ QLoRA's dequantized weight at hand)
    return {"trainable": trainable, "per_block": {name: lp["per_layer"] for name in stack_names},
            "weights": (base["total"] + trainable * 4) / max(gpus, 1), "block_bytes": base["per_block"],
            "root_bytes": base["root"], "casts": trainable * 2,
            "block_casts": {name: lp["per_layer"] * 2 for name in stack_names},
            "bf16_grads": 0, "head_grad": 0, "tied_sum": 0,  # (adapters: negligible)
            "dequantized_transient": base["dequantized_transient"]}


def _backward_phases(c: ModelConfig, acts: dict[str, Any], state: dict[str, Any], rows: int, micro_batch: int,
                     seq_len: int, decoder_len: int | None, precision: str, checkpointing: bool, gpus: int,
                     lora: LoRA | None) -> dict[str, float]:
    """Memory in use (beyond weights and optimizer state) at the head and at the top and bottom
    block of each stack, walking backward as it runs."""
    shard = max(gpus, 1)
    casts, head_grad = state["casts"], state["head_grad"]
    encoder_output_grad = 0.0  # an encoder-decoder's (B, S, d) fp32 gradient, filled by the decoder
    if c.arch == "encdec":
        encoder_output_grad = micro_batch * seq_len * c.n_embd * 4
    phases = {"head": acts["layers"] + acts["inputs"] + acts["head"] + acts["backward_transient"] + casts
              + head_grad}
    backward = acts["blocks"][::-1]  # blocks in the order backward runs them
    # while a block runs backward: the gradient of its MLP's hidden layer, (T, ffn_hidden) per
    # example in the matmul dtype (per routed copy in an MoE block)
    routed = min(c.moe.top_k, c.moe.num_experts) * MOE_PADDING if c.moe.num_experts else 1
    act_bytes = Precision.of("bf16-frozen" if lora else precision).act
    hidden_grad = {s.name: rows * s.length * c.ffn_hidden * act_bytes * routed for s in stacks(c, seq_len, decoder_len)}
    done_grads = done_casts = 0.0
    for i, block in enumerate(backward):
        stack = block["stack"]
        trained_here = state["per_block"][stack.name]
        # FSDP: a block's unsharded gradients (fp32, the reduce dtype) until they are reduce-scattered
        block_grads = trained_here * 4 / shard + state["bf16_grads"] + (trained_here * 4 if gpus > 1 else 0)
        remaining = sum(b["kept"] for b in backward[i:]) + (block["saved"] if checkpointing else 0)
        memory = (remaining + acts["inputs"] + casts - done_casts + head_grad + done_grads + block_grads
                  + (encoder_output_grad if stack.name == "decoder" else 0) + hidden_grad[stack.name])
        top = i == 0 or backward[i - 1]["stack"] != stack
        bottom = i == len(backward) - 1 or backward[i + 1]["stack"] != stack
        for end, is_end in (("top", top), ("bottom", bottom)):
            if is_end:
                phases[f"{end} {stack.name} block".replace("  ", " ")] = memory
        done_grads += trained_here * 4 / shard
        done_casts += state["block_casts"][stack.name]
    return phases
