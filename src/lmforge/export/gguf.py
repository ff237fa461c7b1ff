"""`lmforge convert to-gguf CKPT OUT.gguf`: a checkpoint as one GGUF file that llama.cpp (and Ollama) run.

    to_gguf("ckpt", "model.gguf")                  # f16 matrices, f32 norms and biases
    to_gguf("ckpt", "model.q8_0.gguf", qtype="q8_0")

Layouts: the two decoder layouts `convert to-hf` writes as GPT-2 and Llama (`hf_layout_for` decides,
with the same checks): GPT-2 (learned positions, LayerNorm, GELU, biases; general.architecture
`gpt2`) and Llama (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases; `llama`; a checkpoint
converted from Mistral goes out as `llama` too, the same graph), and its Mixture-of-Experts form
(what to-hf writes as Mixtral; `llama` with expert_count / expert_used_count, the router as
blk.N.ffn_gate_inp and the experts stacked into blk.N.ffn_{gate,up,down}_exps (E, out, in):
llama.cpp takes a softmax over all router logits and renormalizes the top k, the same gates as
lmforge's softmax over the selected logits). Refused with one line: BERT and the encoder-decoder
(no llama.cpp graph of theirs is written here), MoE with learned positions (no Mixtral layout),
a GPT-2 layout with mlp=relu (llama.cpp's gpt2 graph applies GELU), a quantized checkpoint, a
fine-tuning checkpoint with an adapter (merge it first), a checkpoint without lmforge's byte-level
BPE tokenizer.json, and an existing OUT without `overwrite`.

Tensors (GGUF names, as llama.cpp's convert_hf_to_gguf.py writes them): token_embd, position_embd
(GPT-2), output_norm, output (only when the embeddings are untied: llama.cpp reuses token_embd
otherwise), and per block blk.N.{attn_norm, attn_qkv (GPT-2) | attn_q/attn_k/attn_v (Llama),
attn_output, ffn_norm, ffn_up, ffn_down, ffn_gate (Llama)}; weights keep torch's (out, in) layout.

RoPE: lmforge rotates the two halves of each head (`rotate_half`, like HF Llama); llama.cpp's
`llama` graph rotates adjacent pairs (2i, 2i+1). As llama.cpp's converter does for HF Llama,
the rows of q (n_head heads) and k (n_kv_head heads) are permuted per head so that row i of the
first half and row i of the second half become rows 2i and 2i+1 (`rope_permute`; `rope_unpermute`
undoes it). The dot products are unchanged, since q and k are permuted alike.

Types: f32, f16 or q8_0 (gguf.quants: blocks of 32 with one f16 scale) for 2-D tensors; 1-D
tensors (norms, biases), the MoE router and GPT-2's position table stay f32, as llama.cpp's
converter keeps them; a q8_0 matrix whose rows
are not a multiple of 32 wide falls back to f16 (and the summary lists it).

Tokenizer: tokenizer.ggml.model "gpt2" (byte-level BPE) with the tokens by id (padded with unused
"[PADi]" tokens to the model's vocab_size), their types (special tokens: control), the merges, the
bos/eos/pad ids, add_bos_token false (lmforge does not prepend BOS) and tokenizer.ggml.pre "gpt-2":
lmforge's BPE pre-tokenizes with GPT-2's regex (ByteLevel use_regex), which llama.cpp knows by that
name (its own converter refuses unknown tokenizers rather than guess).

Output: OUT is one file, written under a temp name beside it and renamed: a failed export leaves
nothing. No summary.json is written (OUT is a file, not a dir); `to_gguf` returns the summary
(the CLI prints it) and the GGUF's general.* keys record the source.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.errors import UserError

QTYPES = ("f32", "f16", "q8_0")
KEEP_F32 = ("ffn_gate_inp.weight", "position_embd.weight")  # written f32 whatever the type (llama.cpp's converter)
_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7}  # gguf.LlamaFileType ALL_F32, MOSTLY_F16, MOSTLY_Q8_0
# our block tensor (minus ".weight"/".bias") -> its GGUF name in blk.N
_BLOCK_NAMES = {"attn_norm": "attn_norm", "attn.qkv": "attn_qkv", "attn.out": "attn_output",
                "mlp_norm": "ffn_norm", "mlp.up": "ffn_up", "mlp.down": "ffn_down", "mlp.gate": "ffn_gate"}
_TOP_NAMES = {"tok_embeddings": "token_embd", "pos_embeddings": "position_embd", "norm": "output_norm",
              "lm_head": "output"}


def rope_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q or k from halves-rotation (lmforge, HF) to llama.cpp's adjacent-pair rotation, per head."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `rope_permute`."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_arch(config: Any, ckpt: Path) -> str:
    """"llama" or "gpt2" for a checkpoint's ModelConfig, or a one-line UserError naming what is not supported."""
    from lmforge.export.hf.registry import hf_layout_for

    where = f"{ckpt / 'config.json'}: model"
    if config.arch != "gpt":
        raise UserError(f"{where}.arch={config.arch!r} cannot be exported to GGUF; supported: decoder-only models "
                        "(arch gpt) in the GPT-2 or Llama layout")
    try:
        layout = hf_layout_for(config).model_type
    except UserError as e:
        raise UserError(f"{where}: no GGUF layout ({e})") from None
    if layout == "mixtral" and config.mlp != "swiglu":  # (hf_layout_for checks it too)
        raise UserError(f"{where}.mlp={config.mlp!r}: llama.cpp's Mixtral experts are SwiGLU")
    if layout == "gpt2" and config.mlp not in ("gelu", "gelu_tanh"):
        raise UserError(f"{where}.mlp={config.mlp!r} cannot be exported to GGUF: llama.cpp's gpt2 graph applies GELU "
                        "(allowed: gelu_tanh, gelu)")
    return "gpt2" if layout == "gpt2" else "llama"


def gguf_tensors(config: Any, state: dict[str, torch.Tensor], arch: str) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array (torch's (out, in) layout) for our state dict; q/k rope-permuted (Llama)."""
    from lmforge.export.hf.registry import hf_layout_for

    out: dict[str, np.ndarray] = {}
    for rule in hf_layout_for(config).rules(config):
        if rule.ours not in state:
            raise UserError(f"checkpoint: tensor {rule.ours!r} is missing; the checkpoint is incomplete")
        base, _, kind = rule.ours.rpartition(".")
        w = state[rule.ours].detach().float()
        if not base.startswith("blocks."):
            out[f"{_TOP_NAMES[base]}.{kind}"] = w.numpy()
            continue
        _, i, part = base.split(".", 2)
        if part.startswith("mlp.experts."):
            continue  # stacked below
        if part == "mlp.router":
            out[f"blk.{i}.ffn_gate_inp.{kind}"] = w.numpy()
        elif arch == "llama" and part == "attn.qkv":
            q_rows, kv_rows = config.n_head * config.head_dim, config.kv_heads * config.head_dim
            q, k, v = w.split([q_rows, kv_rows, kv_rows], dim=0)
            out[f"blk.{i}.attn_q.{kind}"] = rope_permute(q, config.n_head).numpy()
            out[f"blk.{i}.attn_k.{kind}"] = rope_permute(k, config.kv_heads).numpy()
            out[f"blk.{i}.attn_v.{kind}"] = v.contiguous().numpy()
        else:
            out[f"blk.{i}.{_BLOCK_NAMES[part]}.{kind}"] = w.numpy()
    if config.moe.num_experts:
        out.update(stacked_experts(config, state))
    return out


def stacked_experts(config: Any, state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Mixtral's GGUF layout: each block's expert matrices stacked, blk.N.ffn_{gate,up,down}_exps (E, out, in)."""
    out = {}
    for i in range(config.n_layer):
        for ours, theirs in (("gate", "ffn_gate_exps"), ("up", "ffn_up_exps"), ("down", "ffn_down_exps")):
            names = [f"blocks.{i}.mlp.experts.{e}.{ours}.weight" for e in range(config.moe.num_experts)]
            out[f"blk.{i}.{theirs}.weight"] = torch.stack([state[n].detach().float() for n in names]).numpy()
    return out


def encode_tensor(array: np.ndarray, qtype: str) -> tuple[np.ndarray, Any, str]:
    """(data, raw_dtype for GGUFWriter.add_tensor or None, the type written) for one float32 tensor."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if array.ndim < 2 or qtype == "f32":
        return np.ascontiguousarray(array, dtype=np.float32), None, "f32"
    if qtype == "q8_0" and array.shape[-1] % 32 == 0:
        return quantize(np.ascontiguousarray(array), GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0, "q8_0"
    return np.ascontiguousarray(array, dtype=np.float16), None, "f16"


def tokenizer_fields(tokenizer_file: Path, vocab_size: int) -> dict[str, Any]:
    """tokens, token_types, merges, bos/eos/pad ids of lmforge's byte-level BPE tokenizer.json, padded to vocab_size."""
    from gguf import TokenType

    from lmforge.tokenizer import Tokenizer
    from lmforge.tokenizer.tok import BOS, EOS, PAD

    if not tokenizer_file.is_file():
        raise UserError(f"{tokenizer_file} is missing; GGUF carries the tokenizer: export a checkpoint with one")
    spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        raise UserError(f"{tokenizer_file}: a {model.get('type')} tokenizer with a {pre.get('type')} pre-tokenizer; "
                        "GGUF export needs lmforge's byte-level BPE (lmforge tokenizer train --kind bpe)")
    if pre.get("add_prefix_space") or spec.get("normalizer"):
        raise UserError(f"{tokenizer_file}: add_prefix_space or a normalizer, which llama.cpp's gpt-2 pre-tokenizer "
                        "does not apply; GGUF export needs lmforge's byte-level BPE (tokenizer train --kind bpe)")
    by_id = {i: t for t, i in model["vocab"].items()}
    special = set()
    for added in spec.get("added_tokens") or []:
        by_id[added["id"]] = added["content"]
        if added.get("special"):
            special.add(added["id"])
    if by_id and max(by_id) >= vocab_size:
        raise UserError(f"{tokenizer_file} has token id {max(by_id)} but the model's vocab_size is {vocab_size}; "
                        "use the tokenizer the model was trained with")
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(TokenType.UNUSED if i not in by_id else TokenType.CONTROL if i in special else TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    tok = Tokenizer.load(tokenizer_file)
    ids = {name: tok.special_id_or_none(token) for name, token in (("bos", BOS), ("eos", EOS), ("pad", PAD))}
    return {"tokens": tokens, "token_types": [int(t) for t in types], "merges": merges, **ids}


def _write_metadata(writer: Any, config: Any, arch: str, tok: dict[str, Any], qtype: str, name: str) -> None:
    writer.add_name(name)
    writer.add_file_type(_FILE_TYPE[qtype])
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.ffn_hidden)
    writer.add_head_count(config.n_head)
    if arch == "llama":
        writer.add_head_count_kv(config.kv_heads)
        writer.add_rope_freq_base(float(config.rope_theta))
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_layer_norm_rms_eps(float(config.norm_eps))
        writer.add_vocab_size(config.vocab_size)
        if config.moe.num_experts:
            writer.add_expert_count(config.moe.num_experts)
            writer.add_expert_used_count(config.moe.top_k)
        if config.head_dim * config.n_head != config.n_embd:
            writer.add_key_length(config.head_dim)
            writer.add_value_length(config.head_dim)
    else:
        writer.add_layer_norm_eps(float(config.norm_eps))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["token_types"])
    writer.add_token_merges(tok["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("pad", writer.add_pad_token_id)):
        if tok[key] is not None:
            add(tok[key])
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


def _check_source(ckpt: Path, out: Path, overwrite: bool) -> None:
    from lmforge.compress.quantize import check_not_quantized

    check_not_quantized(ckpt, "convert to-gguf")
    if (ckpt / "adapter_config.json").is_file():
        raise UserError(f"{ckpt} holds an adapter (adapter_config.json); merge it first (lmforge merge) and export "
                        "the merged checkpoint")
    if out.is_dir():
        raise UserError(f"{out} is a directory; OUT is the .gguf file to write")
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")


def to_gguf(ckpt: str | Path, out: str | Path, *, qtype: str = "f16", overwrite: bool = False) -> dict[str, Any]:
    """Write the checkpoint (or a run dir's best one) as the GGUF file `out`; returns the summary."""
    import gguf
    from tqdm import tqdm

    from lmforge.models.config import ModelConfig
    from lmforge.train.checkpoint import read_model_config, read_weights, resolve_checkpoint

    t0 = time.perf_counter()
    if qtype not in QTYPES:
        raise UserError(f"--type {qtype!r} is not supported; allowed: {', '.join(QTYPES)}")
    ckpt, out = resolve_checkpoint(ckpt), Path(out)
    _check_source(ckpt, out, overwrite)
    config = ModelConfig.from_dict(read_model_config(ckpt))
    config.check_unpruned("convert to-gguf")
    arch = gguf_arch(config, ckpt)
    tok = tokenizer_fields(ckpt / "tokenizer.json", config.vocab_size)
    tensors = gguf_tensors(config, read_weights(ckpt), arch)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    written: dict[str, str] = {}
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        _write_metadata(writer, config, arch, tok, qtype, ckpt.resolve().name)
        for name, array in tqdm(tensors.items(), desc="gguf tensors", unit="tensor", leave=False):
            data, raw_dtype, written[name] = encode_tensor(array, "f32" if name.endswith(KEEP_F32) else qtype)
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    fallback = sorted(n for n, t in written.items() if qtype == "q8_0" and t == "f16")
    return {"stage": "convert to-gguf", "inputs": {"checkpoint": str(ckpt)}, "output": str(out),
            "metrics": {"architecture": arch, "type": qtype, "tensors": len(written), "bytes": out.stat().st_size,
                        "vocab": len(tok["tokens"]), "merges": len(tok["merges"]), "f16_fallback": fallback},
            "wall_time_s": round(time.perf_counter() - t0, 3)}
