"""`lmforge convert to-gguf`: the written file read back with the `gguf` package, tensor by tensor.

References: lmforge's own weights (after undoing the documented q/k permutation), numpy's float16
rounding, the q8_0 format's error bound (gguf.quants.dequantize), the checkpoint's tokenizer.json,
an adjacent-pair RoPE written here from llama.cpp's definition (the permuted q/k give the same
attention scores as lmforge's rotate-half RoPE) and, where llama-cpp-python is installed (slow),
llama.cpp's greedy tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import perturbed_checkpoint

from lmforge.cli import main
from lmforge.export.gguf import encode_tensor, rope_permute, rope_unpermute, to_gguf
from lmforge.models.blocks import apply_rope, rope_tables

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

VOCAB = 384  # > the tokenizer's 320: the GGUF vocab is padded with unused tokens
TINY = dict(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=64, block_size=64)
LLAMA = dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, n_kv_head=2,
             rope_theta=500000.0, norm_eps=1e-6)
GPT2 = dict(mlp="gelu_tanh")


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory) -> Path:
    from lmforge.tokenizer.train import train_tokenizer

    root = tmp_path_factory.mktemp("bpe")
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text("the king shall speak of love and death upon this night, 42 times!\n" * 30)
    train_tokenizer(root / "corpus", root / "tok", kind="bpe", vocab_size=320)
    return root / "tok" / "tokenizer.json"


def tiny_checkpoint(path: Path, tokenizer_file: Path | None, **style) -> tuple[torch.nn.Module, Path]:
    return perturbed_checkpoint(path, {**TINY, **style}, tokenizer_file)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, bpe_tokenizer):
    """{(layout, type): (model, gguf file)} for both layouts and all three types (through the CLI)."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for layout, style in (("llama", LLAMA), ("gpt2", GPT2)):
        model, ckpt = tiny_checkpoint(root / layout, bpe_tokenizer, **style)
        for qtype in ("f32", "f16", "q8_0"):
            file = root / f"{layout}.{qtype}.gguf"
            assert main(["convert", "to-gguf", str(ckpt), str(file), "--type", qtype]) == 0
            out[layout, qtype] = model, file
    return out


def expected_tensors(model, layout: str) -> dict[str, np.ndarray]:
    """GGUF name -> lmforge's tensor, written out by hand (q/k as lmforge holds them, unpermuted)."""
    s, c = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}, model.config
    top = {"token_embd.weight": s["tok_embeddings.weight"], "output_norm.weight": s["norm.weight"]}
    if layout == "gpt2":
        top.update({"position_embd.weight": s["pos_embeddings.weight"], "output_norm.bias": s["norm.bias"]})
    else:
        top["output.weight"] = s["lm_head.weight"]
    for i in range(c.n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        kinds = ("weight", "bias") if layout == "gpt2" else ("weight",)
        for ours, theirs in (("attn_norm", "attn_norm"), ("attn.out", "attn_output"), ("mlp_norm", "ffn_norm"),
                             ("mlp.up", "ffn_up"), ("mlp.down", "ffn_down")):
            top.update({f"{g}{theirs}.{k}": s[f"{b}{ours}.{k}"] for k in kinds})
        if layout == "gpt2":
            top.update({f"{g}attn_qkv.{k}": s[f"{b}attn.qkv.{k}"] for k in kinds})
        else:
            qkv, q_rows, kv_rows = s[f"{b}attn.qkv.weight"], c.n_head * c.head_dim, c.kv_heads * c.head_dim
            top.update({f"{g}attn_q.weight": qkv[:q_rows], f"{g}attn_k.weight": qkv[q_rows:q_rows + kv_rows],
                        f"{g}attn_v.weight": qkv[q_rows + kv_rows:], f"{g}ffn_gate.weight": s[f"{b}mlp.gate.weight"]})
    return top


def read_back(reader, model, layout: str) -> dict[str, tuple[np.ndarray, object]]:
    """GGUF name -> (values as float32 in torch layout, q/k unpermuted; ggml type) of every tensor in the file."""
    c, got = model.config, {}
    for t in reader.tensors:
        values = dequantize(t.data, t.tensor_type) if t.tensor_type == Q.Q8_0 else np.asarray(t.data)
        values = np.asarray(values, dtype=np.float32).reshape(tuple(reversed([int(d) for d in t.shape])))
        if layout == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = c.n_head if "attn_q" in t.name else c.kv_heads
            values = rope_unpermute(torch.from_numpy(values.copy()), heads).numpy()
        got[t.name] = values, t.tensor_type
    return got


@pytest.mark.parametrize("layout", ["llama", "gpt2"])
@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0"])
def test_tensors_read_back_with_names_shapes_types_and_values(exported, layout, qtype):
    model, file = exported[layout, qtype]
    want = expected_tensors(model, layout)
    got = read_back(gguf.GGUFReader(file), model, layout)
    assert sorted(got) == sorted(want)
    for name, ours in want.items():
        values, kind = got[name]
        assert values.shape == ours.shape, name
        f32 = ours.ndim == 1 or qtype == "f32" or name == "position_embd.weight"
        expected_type = Q.F32 if f32 else {"f16": Q.F16, "q8_0": Q.Q8_0}[qtype]
        assert kind == expected_type, name
        if kind == Q.F32:
            assert np.array_equal(values, ours), name
        elif kind == Q.F16:
            assert np.array_equal(values, ours.astype(np.float16).astype(np.float32)), name
            assert np.all(np.abs(values - ours) <= np.abs(ours) * 2.0 ** -11 + 2.0 ** -24), name
        else:  # q8_0: blocks of 32 along a row, one f16 scale amax/127, |error| <= half a step (+ the scale's rounding)
            blocks = ours.reshape(-1, 32)
            amax = np.abs(blocks).max(axis=1, keepdims=True)
            err = np.abs(values.reshape(-1, 32) - blocks)
            assert np.all(err <= amax / 127 * 0.5 + amax * 2.0 ** -10 + 1e-7), name
            assert err.max() > 0  # really quantized


@pytest.mark.parametrize("layout", ["llama", "gpt2"])
def test_names_and_values_match_gguf_py_map_of_the_hf_tensors_to_hf_writes(exported, layout):
    """gguf-py's TensorNameMap (llama.cpp's own HF -> GGUF names) applied to what `convert to-hf` writes
    gives the file's names; values equal the HF tensors (GPT-2's Conv1D transposed back, Llama's q/k
    permuted as llama.cpp's converter permutes HF Llama's)."""
    from lmforge.export.hf import state_to_hf

    model, file = exported[layout, "f32"]
    c = model.config
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "gpt2": gguf.MODEL_ARCH.GPT2}[layout]
    names = gguf.get_tensor_name_map(arch, c.n_layer)
    ours = {k: v for k, v in model.state_dict().items() if not (c.tie_embeddings and k == "lm_head.weight")}
    hf = state_to_hf(c, ours)
    file_tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(file).tensors}
    assert sorted(names.get_name(n, try_suffixes=(".weight", ".bias")) for n in hf) == sorted(file_tensors)
    known = {gguf.TENSOR_NAMES[t].format(bid=i) for t in gguf.MODEL_TENSORS[arch] for i in range(c.n_layer)}
    assert {n.rpartition(".")[0] for n in file_tensors} <= known  # tensors llama.cpp's arch has
    for hf_name, tensor in hf.items():
        w = tensor.float()
        if hf_name.endswith(".weight") and any(p in hf_name for p in ("c_attn", "c_proj", "c_fc")):
            w = w.T
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = c.n_head if "q_proj" in hf_name else c.kv_heads
            w = w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
        got = file_tensors[names.get_name(hf_name, try_suffixes=(".weight", ".bias"))]
        assert np.array_equal(got, w.contiguous().numpy()), hf_name


def test_wide_heads_write_key_and_value_length(tmp_path, bpe_tokenizer):
    _, ckpt = tiny_checkpoint(tmp_path / "wide", bpe_tokenizer, **LLAMA, attn_head_dim=32)
    to_gguf(ckpt, tmp_path / "wide.gguf", qtype="f32")
    reader = gguf.GGUFReader(tmp_path / "wide.gguf")
    assert field(reader, "llama.attention.key_length") == field(reader, "llama.attention.value_length") == 32
    assert field(reader, "llama.rope.dimension_count") == 32
    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    assert shapes["blk.0.attn_q.weight"] == [64, 128] and shapes["blk.0.attn_k.weight"] == [64, 64]


def test_qkv_permutation_gives_lmforge_attention_scores_under_llama_cpp_rope():
    """ggml's RoPE (mode 0, as llama.cpp's `llama` graph uses) rotates adjacent pairs (2i, 2i+1) by
    pos * base^(-2i/d); on the permuted q/k rows it must give the scores lmforge's RoPE gives."""
    torch.manual_seed(1)
    n_head, head_dim, n_embd, seq, base = 2, 8, 16, 5, 10000.0
    wq, x = torch.randn(n_head * head_dim, n_embd), torch.randn(seq, n_embd)
    cos, sin = rope_tables(seq, head_dim, base)
    q_ours = apply_rope((x @ wq.T).view(seq, n_head, head_dim).transpose(0, 1), cos, sin)
    scores_ours = q_ours @ q_ours.transpose(-1, -2)

    q = (x @ rope_permute(wq, n_head).T).view(seq, n_head, head_dim).transpose(0, 1).double()
    theta = torch.arange(seq, dtype=torch.float64)[:, None] * base ** (-torch.arange(0, head_dim, 2) / head_dim)
    even, odd = q[..., 0::2], q[..., 1::2]
    rotated = torch.stack([even * theta.cos() - odd * theta.sin(), even * theta.sin() + odd * theta.cos()], -1)
    rotated = rotated.flatten(-2)
    assert torch.allclose(rotated @ rotated.transpose(-1, -2), scores_ours.double(), atol=1e-4)
    assert not torch.allclose(q @ q.transpose(-1, -2), scores_ours.double(), atol=1e-2)  # rope does matter
    assert torch.equal(rope_unpermute(rope_permute(wq, n_head), n_head), wq)


def field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("layout", ["llama", "gpt2"])
def test_metadata_and_tokenizer_round_trip(exported, bpe_tokenizer, layout):
    model, file = exported[layout, "q8_0"]
    c, reader = model.config, gguf.GGUFReader(file)
    assert field(reader, "general.architecture") == layout
    assert field(reader, "general.file_type") == 7  # MOSTLY_Q8_0
    expect = {"context_length": 64, "embedding_length": 64, "block_count": 2, "feed_forward_length": c.ffn_hidden,
              "attention.head_count": 4}
    if layout == "llama":
        expect.update({"attention.head_count_kv": 2, "rope.dimension_count": 16, "vocab_size": VOCAB})
        assert field(reader, "llama.rope.freq_base") == 500000.0
        assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
        assert "llama.attention.key_length" not in reader.fields
    else:
        assert field(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    for key, value in expect.items():
        assert field(reader, f"{layout}.{key}") == value, key

    spec = json.loads(bpe_tokenizer.read_text())
    by_id = {i: t for t, i in spec["model"]["vocab"].items()} | {a["id"]: a["content"] for a in spec["added_tokens"]}
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == VOCAB
    assert tokens[:len(by_id)] == [by_id[i] for i in range(len(by_id))]
    assert tokens[-1] == f"[PAD{VOCAB - 1}]" and types[-1] == gguf.TokenType.UNUSED
    control = [i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL]
    assert control == sorted(a["id"] for a in spec["added_tokens"] if a["special"])
    assert field(reader, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m)
                                                       for m in spec["model"]["merges"]]
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert tokens[field(reader, "tokenizer.ggml.bos_token_id")] == "<|bos|>"
    assert tokens[field(reader, "tokenizer.ggml.eos_token_id")] == "<|eos|>"
    assert field(reader, "tokenizer.ggml.add_bos_token") is False


def test_q8_0_keeps_rows_not_a_multiple_of_32_in_f16():
    data, raw, kind = encode_tensor(np.ones((4, 40), dtype=np.float32), "q8_0")
    assert (kind, raw, data.dtype) == ("f16", None, np.float16)
    assert encode_tensor(np.ones(64, dtype=np.float32), "q8_0")[2] == "f32"


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, bpe_tokenizer, tokenizer_file, capsys):
    cases = {
        "bert": dict(arch="bert", norm_position="post"),
        "moe": dict(GPT2, moe={"num_experts": 2, "top_k": 1}),  # MoE with learned positions: no Mixtral layout
        "relu": dict(mlp="relu"),
    }
    for name, style in cases.items():
        tiny_checkpoint(tmp_path / name, bpe_tokenizer, **style)
    _, char = tiny_checkpoint(tmp_path / "char", tokenizer_file, **GPT2)
    quantized = tmp_path / "quantized"
    shutil.copytree(char, quantized)
    shutil.copyfile(bpe_tokenizer, quantized / "tokenizer.json")
    (quantized / "quant_config.json").write_text(json.dumps({"method": "int8", "modules": []}))
    prefix = tmp_path / "prefix"
    shutil.copytree(char, prefix)
    spec = json.loads(bpe_tokenizer.read_text())
    spec["pre_tokenizer"]["add_prefix_space"] = True
    (prefix / "tokenizer.json").write_text(json.dumps(spec))
    for name, needle in (("bert", "arch='bert'"), ("moe", "Mixture-of-Experts"), ("relu", "mlp='relu'"),
                         ("char", "byte-level BPE"), ("prefix", "add_prefix_space"),
                         ("quantized", "quantized checkpoint")):
        out = tmp_path / f"{name}.gguf"
        assert main(["convert", "to-gguf", str(tmp_path / name), str(out)]) == 2, name
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, (name, err)
        assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".gguf" or ".tmp" in p.name) == [], name

    _, ok = tiny_checkpoint(tmp_path / "ok", bpe_tokenizer, **GPT2)
    out = tmp_path / "exists.gguf"
    out.write_bytes(b"keep")
    assert main(["convert", "to-gguf", str(ok), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep"
    summary = to_gguf(ok, out, qtype="f32", overwrite=True)
    assert summary["metrics"]["architecture"] == "gpt2" and gguf.GGUFReader(out).tensors


def gguf_forward(file: Path, tokens: list[int]) -> np.ndarray:
    """Logits of a GGUF file computed in numpy the way llama.cpp's `llama` / `gpt2` graphs do, from the
    file's tensors and metadata alone: RoPE on adjacent pairs (ggml mode 0), kv head h // (n_head /
    n_head_kv), the output matrix or else token_embd, tanh-GELU."""
    reader = gguf.GGUFReader(file)
    arch = field(reader, "general.architecture")
    w = {t.name: np.asarray(t.data, dtype=np.float64) for t in reader.tensors}

    def meta(key, default=None):
        return field(reader, f"{arch}.{key}") if f"{arch}.{key}" in reader.fields else default

    n_head = meta("attention.head_count")
    n_kv, n = meta("attention.head_count_kv", n_head), len(tokens)
    x = w["token_embd.weight"][tokens] + (w["position_embd.weight"][:n] if arch == "gpt2" else 0)

    def norm(h, name):
        if arch == "llama":
            eps = meta("attention.layer_norm_rms_epsilon")
            return h / np.sqrt((h * h).mean(-1, keepdims=True) + eps) * w[name + ".weight"]
        h, eps = h - h.mean(-1, keepdims=True), meta("attention.layer_norm_epsilon")
        return h / np.sqrt((h * h).mean(-1, keepdims=True) + eps) * w[name + ".weight"] + w[name + ".bias"]

    def lin(h, name):
        return h @ w[name + ".weight"].T + w.get(name + ".bias", 0)

    def rope(t):  # (n, heads, d): pairs (2i, 2i+1) rotated by pos * base^(-2i/d)
        d = t.shape[-1]
        theta = np.arange(n)[:, None, None] * meta("rope.freq_base") ** (-np.arange(0, d, 2) / d)
        a, b = t[..., 0::2], t[..., 1::2]
        cos, sin = np.cos(theta), np.sin(theta)
        return np.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(t.shape)

    def expert(h, g, chosen):  # each token through its chosen expert's SwiGLU
        gate = np.einsum("nfd,nd->nf", w[g + "ffn_gate_exps.weight"][chosen], h)
        up = np.einsum("nfd,nd->nf", w[g + "ffn_up_exps.weight"][chosen], h)
        return np.einsum("ndf,nf->nd", w[g + "ffn_down_exps.weight"][chosen], gate / (1 + np.exp(-gate)) * up)

    for i in range(meta("block_count")):
        h, g = norm(x, f"blk.{i}.attn_norm"), f"blk.{i}."
        if arch == "gpt2":
            q, k, v = np.split(lin(h, g + "attn_qkv"), 3, axis=-1)
        else:
            q, k, v = lin(h, g + "attn_q"), lin(h, g + "attn_k"), lin(h, g + "attn_v")
        q, k, v = (t.reshape(n, -1, t.shape[-1] // heads) for t, heads in ((q, n_head), (k, n_kv), (v, n_kv)))
        if arch == "llama":
            q, k = rope(q), rope(k)
        k, v = np.repeat(k, n_head // n_kv, axis=1), np.repeat(v, n_head // n_kv, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1]) + np.triu(np.full((n, n), -np.inf), 1)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        x = x + lin(np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v).reshape(n, -1), g + "attn_output")
        h = norm(x, g + "ffn_norm")
        if g + "ffn_gate_inp.weight" in w:  # MoE: softmax over all experts, top k renormalized
            probs = np.exp(lin(h, g + "ffn_gate_inp"))
            probs /= probs.sum(-1, keepdims=True)
            top = np.argsort(-probs, axis=-1)[:, :meta("expert_used_count")]
            kept = np.take_along_axis(probs, top, -1)
            kept /= kept.sum(-1, keepdims=True)
            x = x + sum(kept[:, [j]] * expert(h, g, top[:, j]) for j in range(top.shape[1]))
            continue
        if arch == "llama":
            up = lin(h, g + "ffn_gate") / (1 + np.exp(-lin(h, g + "ffn_gate"))) * lin(h, g + "ffn_up")
        else:
            u = lin(h, g + "ffn_up")
            up = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
        x = x + lin(up, g + "ffn_down")
    return norm(x, "output_norm") @ w.get("output.weight", w["token_embd.weight"]).T


@pytest.mark.parametrize("layout", ["llama", "gpt2"])
def test_a_numpy_llama_cpp_graph_on_the_file_gives_lmforge_logits(exported, layout):
    model, file = exported[layout, "f32"]
    tokens = [5, 9, 14, 3, 27, 8, 40, 61, 2]
    with torch.no_grad():
        want = model(torch.tensor([tokens]))[0][0].double().numpy()
    got = gguf_forward(file, tokens)
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
def test_mixture_of_experts_as_llama_cpp_mixtral(tmp_path, bpe_tokenizer, qtype):
    model, ckpt = tiny_checkpoint(tmp_path / "moe", bpe_tokenizer, **LLAMA, moe={"num_experts": 4, "top_k": 2})
    to_gguf(ckpt, tmp_path / "moe.gguf", qtype=qtype)
    reader = gguf.GGUFReader(tmp_path / "moe.gguf")
    assert (field(reader, "llama.expert_count"), field(reader, "llama.expert_used_count")) == (4, 2)
    c, s = model.config, model.state_dict()
    got = {t.name: t for t in reader.tensors}
    assert not any(".mlp." in n or "ffn_gate.weight" in n for n in got)
    for i in range(c.n_layer):
        assert np.array_equal(got[f"blk.{i}.ffn_gate_inp.weight"].data, s[f"blocks.{i}.mlp.router.weight"].numpy())
        for ours, theirs in (("gate", "ffn_gate_exps"), ("up", "ffn_up_exps"), ("down", "ffn_down_exps")):
            t = got[f"blk.{i}.{theirs}.weight"]
            want = torch.stack([s[f"blocks.{i}.mlp.experts.{e}.{ours}.weight"] for e in range(4)]).numpy()
            assert [int(d) for d in t.shape] == list(reversed(want.shape))
            values = dequantize(t.data, t.tensor_type) if qtype == "q8_0" else np.asarray(t.data)
            assert t.tensor_type == (Q.Q8_0 if qtype == "q8_0" else Q.F32)
            bound = np.abs(want).max() / 127 if qtype == "q8_0" else 0
            assert np.abs(values.reshape(want.shape) - want).max() <= bound
    if qtype == "f32":
        tokens = [5, 9, 14, 3, 27, 8, 40, 61, 2]
        with torch.no_grad():
            want = model(torch.tensor([tokens]))[0][0].double().numpy()
        assert np.abs(gguf_forward(tmp_path / "moe.gguf", tokens) - want).max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["llama", "gpt2"])
def test_llama_cpp_greedy_tokens_equal_lmforge(exported, layout):
    """llama.cpp runs the f32 file and picks lmforge's greedy tokens (optional dependency: llama-cpp-python)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from lmforge.infer.generate import generate

    model, file = exported[layout, "f32"]
    prompt = [5, 9, 14, 3, 27, 8, 40]
    want = list(generate(model, prompt, 12, temperature=0))
    llm = llama_cpp.Llama(model_path=str(file), n_ctx=64, n_threads=2, verbose=False)
    got = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        got.append(token)
        if len(got) == len(want):
            break
    assert got == want
