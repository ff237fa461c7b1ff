"""Tests for the encoder-decoder family (models/encdec.py): T5 and the original Transformer.

Independent references: `transformers`' T5ForConditionalGeneration (random weights from a
T5Config, no download) for the T5 variant, its `_relative_position_bucket` for the bucket
function, and `torch.nn.Transformer` (PyTorch's own post-norm encoder-decoder) for the original
Transformer variant. Invariants: cached decoding equals the full decoder forward, and encoder
padding does not change what real tokens produce.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.cli import main
from lmforge.config import load_config
from lmforge.errors import UserError
from lmforge.export.hf import from_hf, to_hf
from lmforge.infer.generate import encode_source, generate, generate_text
from lmforge.models import EncoderDecoder, ModelConfig, build_model
from lmforge.models.blocks import Attention, relative_position_bucket
from lmforge.train.checkpoint import load_pretrained, save_checkpoint

VOCAB = 320  # >= the test tokenizer (byte-level char: 276 tokens)
ROOT = Path(__file__).resolve().parents[1]

T5_SWITCHES = dict(pos_encoding="relative", norm="rmsnorm", norm_eps=1e-6, bias=False, mlp="relu",
                   attn_scale=1.0, scale_decoder_outputs=True, rel_buckets=8, rel_max_distance=20)
PAPER_SWITCHES = dict(pos_encoding="sinusoidal", norm="layernorm", norm_position="post", bias=True,
                      mlp="relu", scale_embeddings=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def encdec(switches: dict, **kw) -> EncoderDecoder:
    cfg = dict(arch="encdec", vocab_size=VOCAB, n_layer=2, n_decoder_layer=3, n_head=4, n_embd=64,
               block_size=48, decoder_start_token_id=0, **switches)
    cfg.update(kw)
    model = build_model(ModelConfig(**cfg)).eval()
    with torch.no_grad():  # off the init (ones/zeros) so a mis-wired norm or bias shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


VARIANTS = {"t5": T5_SWITCHES, "paper": PAPER_SWITCHES}


# --------------------------------------------------------------------------------------------
# T5 relative position bias


def test_relative_bucket_equals_hf():
    from transformers.models.t5.modeling_t5 import T5Attention

    grid = torch.arange(-300, 301)[None, :] - torch.arange(0, 40)[:, None]  # key - query positions
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20), (6, 7), (64, 300)):
            ours = relative_position_bucket(grid, bidirectional, buckets, distance)
            theirs = T5Attention._relative_position_bucket(grid, bidirectional, buckets, distance)
            assert torch.equal(ours, theirs), (bidirectional, buckets, distance)
            assert 0 <= ours.min() and ours.max() < buckets


# --------------------------------------------------------------------------------------------
# HF T5 <-> lmforge

transformers = pytest.importorskip("transformers")


def hf_t5(**kw):
    cfg = dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=3, num_heads=4,
               dropout_rate=0.0, relative_attention_num_buckets=8, relative_attention_max_distance=20,
               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    cfg.update(kw)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


T5_MODELS = {
    "v1.0-relu-tied-scaled": lambda: hf_t5(),
    "v1.1-gated-gelu": lambda: hf_t5(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "heads-x-dkv-ne-dmodel": lambda: hf_t5(num_heads=6, d_kv=8),  # T5 v1.1-small's shape: 6 x 64 != 512
    "gated-silu-32-buckets": lambda: hf_t5(feed_forward_proj="gated-silu", relative_attention_num_buckets=32,
                                           relative_attention_max_distance=128, num_decoder_layers=2),
}


def batch(s_len: int = 30, t_len: int = 25):
    """Source ids with one padded row, labels with ignored (-100) tail positions."""
    ids = torch.randint(2, VOCAB, (2, s_len))
    mask = torch.ones(2, s_len, dtype=torch.long)
    mask[1, 19:] = 0
    ids[1, 19:] = 0
    labels = torch.randint(2, VOCAB, (2, t_len))
    labels[1, 20:] = -100
    return ids, mask, labels


def hf_forward(model, ids, mask, labels):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    return out.logits, out.loss


@pytest.mark.parametrize("name", list(T5_MODELS))
def test_t5_from_hf_logits_match_and_round_trip_is_exact(name, tmp_path, tokenizer_file):
    hf = T5_MODELS[name]()
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    summary = from_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert summary["metrics"]["model_type"] == "t5" and summary["metrics"]["tokenizer"] is True
    ours, _ = load_pretrained(tmp_path / "ckpt")
    assert isinstance(ours, EncoderDecoder)

    ids, mask, labels = batch()
    theirs_logits, theirs_loss = hf_forward(hf, ids, mask, labels)
    with torch.no_grad():
        logits, loss = ours(ids, labels, attention_mask=mask)
    assert (logits - theirs_logits).abs().max() <= 1e-4
    assert abs(loss.item() - theirs_loss.item()) <= 1e-5

    to_hf(tmp_path / "ckpt", tmp_path / "back")
    original = load_file(str(tmp_path / "hf" / "model.safetensors"))
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(back) == sorted(original)
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    # (labels without -100: HF puts its pad_token_id there, which to-hf takes from our tokenizer)
    full_labels = labels.clamp(min=2)
    assert torch.equal(hf_forward(reloaded, ids, mask, full_labels)[0], hf_forward(hf, ids, mask, full_labels)[0])
    generation = json.loads((tmp_path / "back" / "generation_config.json").read_text())
    assert generation["decoder_start_token_id"] == 0


def test_t5_untied_lm_head_file(tmp_path):
    """T5 v1.1 checkpoints hold an lm_head distinct from `shared`: it converts untied, both ways."""
    hf = hf_t5(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    hf.save_pretrained(tmp_path / "hf")
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    state["lm_head.weight"] = torch.randn(VOCAB, 64)
    save_file(state, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert hf.lm_head.weight is not hf.shared.weight

    from_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["tie_embeddings"] is False
    ours = build_model(ModelConfig.from_dict(json.loads((tmp_path / "ckpt" / "config.json").read_text())))
    ours.load_state_dict(load_file(str(tmp_path / "ckpt" / "model.safetensors")))
    ids, mask, labels = batch()
    with torch.no_grad():
        diff = ours.eval()(ids, labels, attention_mask=mask)[0] - hf_forward(hf, ids, mask, labels)[0]
        assert diff.abs().max() <= 1e-4
    to_hf(tmp_path / "ckpt", tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(back) == sorted(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_our_t5_converts_to_hf_with_the_same_logits(tmp_path, tokenizer_file):
    model = encdec(T5_SWITCHES, mlp="geglu", pad_token_id=2)  # the test tokenizer's <|pad|>
    save_checkpoint(tmp_path / "ckpt", model.state_dict(), model.config.to_dict(), tokenizer_file, None,
                    drop={"lm_head.weight"})
    summary = to_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert summary["metrics"]["model_type"] == "t5"
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval()
    ids, mask, labels = batch()
    with torch.no_grad():
        ours = model(ids, labels, attention_mask=mask)[0]
    assert (ours - hf_forward(hf, ids, mask, labels)[0]).abs().max() <= 1e-4


def test_t5_conversion_errors(tmp_path):
    original = encdec(PAPER_SWITCHES)
    save_checkpoint(tmp_path / "paper", original.state_dict(), original.config.to_dict(), None, None,
                    drop={"lm_head.weight"})
    with pytest.raises(UserError, match="model.pos_encoding='sinusoidal'.*T5 layout needs relative"):
        to_hf(tmp_path / "paper", tmp_path / "out")
    hf_t5().save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "feed_forward_proj": "gated-tanh"}))
    with pytest.raises(UserError, match="feed_forward_proj='gated-tanh' is not supported; allowed: 'relu'"):
        from_hf(tmp_path / "hf", tmp_path / "ckpt")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    with pytest.raises(UserError, match="missing tensor 'encoder.block.2.layer.0.SelfAttention.q.weight'"):
        from_hf(tmp_path / "hf", tmp_path / "ckpt")


# --------------------------------------------------------------------------------------------
# The original Transformer against torch.nn.Transformer


def paper_reference(model: EncoderDecoder) -> nn.Transformer:
    """torch.nn.Transformer (post-norm, ReLU) holding our weights; without its final norms,
    which the paper's model (and ours) does not have."""
    c = model.config
    ref = nn.Transformer(c.n_embd, c.n_head, c.n_layer, c.decoder_layers, c.ffn_hidden, dropout=0.0,
                         activation="relu", batch_first=True, norm_first=False, layer_norm_eps=c.norm_eps)
    ref.encoder.norm = ref.decoder.norm = None
    with torch.no_grad():
        for ours, theirs in zip(model.encoder_blocks, ref.encoder.layers):
            pairs = [(ours.attn.qkv, "self_attn.in_proj_"), (ours.attn.out, "self_attn.out_proj."),
                     (ours.attn_norm, "norm1."), (ours.mlp.up, "linear1."), (ours.mlp.down, "linear2."),
                     (ours.mlp_norm, "norm2.")]
            _copy(theirs, pairs)
        for ours, theirs in zip(model.decoder_blocks, ref.decoder.layers):
            cross_in = torch.cat([ours.cross_attn.q.weight, ours.cross_attn.kv.weight])
            cross_bias = torch.cat([ours.cross_attn.q.bias, ours.cross_attn.kv.bias])
            theirs.multihead_attn.in_proj_weight.copy_(cross_in)
            theirs.multihead_attn.in_proj_bias.copy_(cross_bias)
            pairs = [(ours.attn.qkv, "self_attn.in_proj_"), (ours.attn.out, "self_attn.out_proj."),
                     (ours.attn_norm, "norm1."), (ours.cross_attn.out, "multihead_attn.out_proj."),
                     (ours.cross_norm, "norm2."), (ours.mlp.up, "linear1."), (ours.mlp.down, "linear2."),
                     (ours.mlp_norm, "norm3.")]
            _copy(theirs, pairs)
    return ref.eval()


def _copy(layer: nn.Module, pairs) -> None:
    params = dict(layer.named_parameters())
    for ours, prefix in pairs:
        params[prefix + "weight"].copy_(ours.weight)
        params[prefix + "bias"].copy_(ours.bias)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # nn.Transformer's padding fast path
def test_original_transformer_matches_torch_nn_transformer():
    model = encdec(PAPER_SWITCHES)
    c = model.config
    assert model.encoder_norm is None and model.decoder_norm is None  # post-norm: no final norms
    assert not model.encoder_blocks[0].pre_norm and isinstance(model.encoder_blocks[0].attn_norm, nn.LayerNorm)
    ref = paper_reference(model)
    ids, mask, labels = batch()
    dec_in = model.shift_right(labels)
    # the paper's positions, computed here from the formula: PE(pos, 2i) = sin(pos / 10000^(2i/d)), ...
    pos = torch.arange(c.block_size)[:, None].float()
    i = torch.arange(c.n_embd)[None, :]
    angle = pos / 10000 ** ((i - i % 2).float() / c.n_embd)
    pe = torch.where(i % 2 == 0, torch.sin(angle), torch.cos(angle))
    emb = model.tok_embeddings.weight
    src = emb[ids] * math.sqrt(c.n_embd) + pe[: ids.shape[1]]
    tgt = emb[dec_in] * math.sqrt(c.n_embd) + pe[: dec_in.shape[1]]
    with torch.no_grad():
        hidden = ref(src, tgt, tgt_mask=nn.Transformer.generate_square_subsequent_mask(dec_in.shape[1]),
                     src_key_padding_mask=mask == 0, memory_key_padding_mask=mask == 0)
        expected = hidden @ emb.T  # the tied pre-softmax projection
        logits, loss = model(ids, labels, attention_mask=mask)
    assert (logits - expected).abs().max() <= 1e-4
    assert torch.isclose(loss, nn.functional.cross_entropy(expected.flatten(0, 1), labels.flatten()), atol=1e-5)


# --------------------------------------------------------------------------------------------
# Invariants: cached decoding, padding


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decoding_equals_full_decoder_forward(variant):
    model = encdec(VARIANTS[variant])
    ids, mask, labels = batch()
    dec_in = model.shift_right(labels)
    with torch.no_grad():
        memory = model.encode(ids, mask)
        full = model.decode(dec_in, memory, attention_mask=mask)
        for chunks in ([1] * dec_in.shape[1], [4, 1, 1, 7, 12]):  # token by token; prefill then mixed
            cache = model.new_kv_cache(batch_size=2)
            steps, start = [], 0
            for n in chunks:
                # after the first step the cross keys/values come from the cache: no encoder output
                steps.append(model.decode(dec_in[:, start:start + n], memory if start == 0 else None,
                                          attention_mask=mask, kv_cache=cache))
                start += n
            assert cache.length == dec_in.shape[1] and all(kv is not None for kv in cache.cross)
            assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5, chunks
        cache.reset()
        assert cache.length == 0 and all(kv is None for kv in cache.cross)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batched_generation_equals_one_prompt_at_a_time(variant, temperature):
    """Sources of different lengths in one batch (right-padded, masked): every row writes what
    `generate` writes for its source alone; a row that ends leaves the batch."""
    from lmforge.infer import generate, generate_batch

    model = encdec(VARIANTS[variant])
    sources = [torch.randint(2, VOCAB, (n,)).tolist() for n in (17, 3, 30, 9)]
    alone = [list(generate(model, src, 12, temperature=temperature, seed=40 + i)) for i, src in enumerate(sources)]
    stop = alone[1][4]  # ends row 1 early (and any other row that writes it)
    alone = [a[:a.index(stop) + 1] if stop in a else a for a in alone]
    batched = generate_batch(model, sources, 12, temperature=temperature, seeds=[40, 41, 42, 43], stop_ids={stop})
    assert batched == alone


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_encoder_padding_does_not_change_real_tokens(variant):
    model = encdec(VARIANTS[variant])
    real = torch.randint(2, VOCAB, (1, 17))
    dec_in = torch.randint(2, VOCAB, (1, 9))
    with torch.no_grad():
        alone = model.encode(real)
        alone_logits = model.decode(dec_in, alone)
        for pad_len in (1, 13):
            junk = torch.randint(2, VOCAB, (1, pad_len))  # anything may sit under the mask
            padded = torch.cat([real, junk], dim=1)
            mask = torch.cat([torch.ones(1, 17), torch.zeros(1, pad_len)], dim=1).long()
            memory = model.encode(padded, mask)
            assert (memory[:, :17] - alone).abs().max() <= 1e-5
            assert (model.decode(dec_in, memory, attention_mask=mask) - alone_logits).abs().max() <= 1e-5
            # without the mask the junk does change the outputs (the test can fail)
            assert (model.decode(dec_in, model.encode(padded)) - alone_logits).abs().max() > 1e-3


def test_attention_bias_and_scale_against_a_hand_computation():
    """position_bias is added to the (unscaled, scale=1) scores with the causal and padding masks;
    the CPU fast path is never taken with a bias or a mask, in bf16 either."""
    attn = Attention(32, 4, causal=True, bias=False, scale=1.0).eval()
    x = torch.randn(2, 6, 32)
    bias = torch.randn(1, 4, 6, 6)
    keep = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    keep[1, ..., 4:] = False
    q, k, v = attn.qkv(x).view(2, 6, 3, 4, 8).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) + bias
    scores = scores.masked_fill(~keep | ~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    expected = attn.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, 32))
    with torch.no_grad():
        got = attn(x, attn_mask=keep, position_bias=bias)
    assert (got - expected).abs().max() <= 1e-5
    for dtype in (torch.float32, torch.bfloat16):
        qd = q.to(dtype)
        assert not attn._use_cpu_attention(qd, None, None, bias)
        assert not attn._use_cpu_attention(qd, keep, None)
    assert attn._use_cpu_attention(q.bfloat16(), None, None)  # no bias, no mask: the fast path


def test_cross_attention_cpu_fast_path_matches_sdpa(monkeypatch):
    """bf16 cross-attention without a mask takes the hand-written CPU path (T queries, S keys,
    never causal); it must agree with SDPA's, here through the whole decoder."""
    attn = Attention(64, 4, causal=False, cross=True, bias=True, scale=0.3)
    x, context = torch.randn(2, 5, 64), torch.randn(2, 9, 64)
    q = attn._heads(attn.q(x), 4)
    assert attn._use_cpu_attention(q.bfloat16(), None, None, None, 9)
    assert not attn._use_cpu_attention(q.bfloat16(), None, None, None, 600)  # long keys: SDPA
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast = attn(x, context=context).float()
        monkeypatch.setattr(Attention, "_use_cpu_attention", lambda self, *a: False)
        slow = attn(x, context=context).float()
    assert (fast - slow).abs().max() <= 2e-2 * slow.abs().max()


# --------------------------------------------------------------------------------------------
# Generation


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_equals_argmax_of_full_forwards(variant):
    model = encdec(VARIANTS[variant])
    prompt = torch.randint(2, VOCAB, (11,)).tolist()
    out = list(generate(model, prompt, max_new_tokens=12, temperature=0.0))
    assert len(out) == 12
    # reference: no cache at all, the whole decoder sequence re-run for each token
    dec = [model.config.decoder_start_token_id]
    with torch.no_grad():
        for _ in range(12):
            logits, _ = model(torch.tensor([prompt]), decoder_input_ids=torch.tensor([dec]))
            dec.append(int(logits[0, -1].argmax()))
    assert out == dec[1:]
    sampled = [list(generate(model, prompt, 8, temperature=0.9, top_k=20, top_p=0.9, seed=3)) for _ in range(2)]
    assert sampled[0] == sampled[1]
    # the decoder's context bounds the output: block_size - 1 tokens after the start token
    out = list(generate(model, prompt, 500, temperature=1.0, seed=0, stop_ids=set()))
    assert len(out) == model.config.block_size - 1


def test_lmforge_generate_on_an_encdec_checkpoint(tmp_path, tokenizer_file, capsys):
    from lmforge.tokenizer import Tokenizer

    model = encdec(T5_SWITCHES)
    save_checkpoint(tmp_path / "ckpt", model.state_dict(), model.config.to_dict(), tokenizer_file, None,
                    drop={"lm_head.weight"})
    tok = Tokenizer.load(tokenizer_file)
    expected = generate_text(model, tok, "the king", max_new_tokens=10, temperature=0.0)
    # the encoder reads the prompt with EOS appended, as the span/seq2seq objectives train it
    ids = list(generate(model, tok.encode("the king", add_eos=True), 10, temperature=0.0))
    assert expected == tok.decode([i for i in ids[:next((n for n, i in enumerate(ids) if i == tok.eos_id), 10)]])
    assert main(["generate", "--ckpt", str(tmp_path / "ckpt"), "--prompt", "the king", "--greedy",
                 "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out == expected + "\n"  # the output alone: a seq2seq does not continue its prompt


def test_encoder_input_ends_with_eos_and_reads_sentinel_markers(tokenizer_file):
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.objectives import sentinel, token_fallbacks, with_tokens

    tok = Tokenizer.load(tokenizer_file)
    with_tokens(tok, tuple(sentinel(i) for i in range(3)), token_fallbacks())
    s0, s1 = tok.token_to_id("<|extra_id_0|>"), tok.token_to_id("<|extra_id_1|>")
    ids = encode_source(tok, "the <|extra_id_0|> of<extra_id_1> <|extra_id_7|><|eos|>")
    assert ids == [*tok.encode("the "), s0, *tok.encode(" of"), s1,
                   *tok.encode(" <|extra_id_7|><|eos|>"), tok.eos_id]  # unknown sentinel, control token: text
    assert tok.encode("<|extra_id_0|>") != [s0]  # plain encoding keeps special strings as text


# --------------------------------------------------------------------------------------------
# Config, presets, sizes


def test_config_validation():
    with pytest.raises(UserError, match="model.pos_encoding: relative .* arch encdec only"):
        ModelConfig(pos_encoding="relative")
    with pytest.raises(UserError, match="model.pos_encoding: 'rope': arch encdec takes sinusoidal"):
        ModelConfig(arch="encdec", pos_encoding="rope")
    with pytest.raises(UserError, match="model.rel_max_distance: must be an integer > rel_buckets/2"):
        ModelConfig(arch="encdec", pos_encoding="relative", rel_buckets=32, rel_max_distance=16)
    with pytest.raises(UserError, match="model.n_decoder_layer"):
        ModelConfig(arch="encdec", pos_encoding="relative", n_decoder_layer=0)
    with pytest.raises(UserError, match="model.attn_scale"):
        ModelConfig(attn_scale=-1.0)
    model = build_model(ModelConfig(arch="encdec", pos_encoding="relative", vocab_size=VOCAB))
    with pytest.raises(UserError, match="model.decoder_start_token_id is not set"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("preset", ["t5-small", "transformer-base"])
def test_presets_build_the_named_architecture(preset):
    cfg = load_config(ROOT / "configs" / f"{preset}.yaml", ["model.vocab_size=4224"])
    assert cfg.objective == "span" and cfg.model.arch == "encdec"
    model = build_model(cfg.model)
    block = model.decoder_blocks[0]
    assert block.cross_attn is not None and model.encoder_blocks[0].cross_attn is None
    assert model.lm_head.weight is model.tok_embeddings.weight
    if preset == "t5-small":
        assert model.relative and block.pre_norm and block.attn.scale == 1.0 and block.attn.qkv.bias is None
        assert model.decoder_rel_bias.weight.shape == (32, cfg.model.n_head)
    else:
        assert not model.relative and not block.pre_norm and model.encoder_norm is None
        assert block.mlp.kind == "relu" and block.attn.qkv.bias is not None
    assert model.num_params() == sum(p.numel() for p in model.parameters())


def test_flops_per_token_by_hand():
    model = encdec(T5_SWITCHES, n_decoder_layer=2)
    c, d, S, T = model.config, 64, 40, 10
    enc_block = 4 * d * d + 2 * d * c.ffn_hidden + 2 * d  # qkv + out, up + down, two RMSNorm weights
    dec_block = 8 * d * d + 2 * d * c.ffn_hidden + 3 * d
    cross_kv = 2 * d * d
    matmul = 6 * ((2 * enc_block + d + 2 * cross_kv) * S + (2 * dec_block - 2 * cross_kv + d + VOCAB * d) * T)
    attention = 12 * d * (2 * S * S + 2 * (T * T + T * S))
    assert model.flops_per_token(S, T) == pytest.approx((matmul + attention) / S, rel=1e-12)
    assert model.num_params(exclude_embeddings=True) == 2 * enc_block + 2 * dec_block + 2 * d


# --------------------------------------------------------------------------------------------
# The presets train (slow)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["t5-small", "transformer-base"])
def test_encdec_preset_learns_shakespeare_by_span_corruption(preset, shakespeare_dir, tmp_path):
    """configs/<preset>.yaml (objective span) on character-level Shakespeare (CPU): val loss falls,
    and the checkpoint generates through `lmforge generate`."""
    from lmforge.tokenizer.shards import tokenize_corpus
    from lmforge.tokenizer.train import train_tokenizer
    from lmforge.train.loop import pretrain

    train_tokenizer(shakespeare_dir, tmp_path / "tok", kind="char")
    tokenize_corpus(tmp_path / "tok", shakespeare_dir, tmp_path / "tokens", val_fraction=0.05)
    cfg = load_config(ROOT / "configs" / f"{preset}.yaml",
                      [f"data.tokens={tmp_path / 'tokens'}", "train.max_steps=150", "train.eval_every=50",
                       "train.warmup_steps=30", "train.eval_steps=4"])
    summary = pretrain(cfg, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [50, 100, 150]
    assert summary["metrics"]["final_val_loss"] == evals[-1]["val_loss"]
    vocab = json.loads((tmp_path / "run" / "checkpoints" / "best" / "config.json").read_text())["vocab_size"]
    # from about ln(vocab) at init (uniform over the padded vocabulary) ...
    assert evals[0]["val_loss"] < math.log(vocab)
    assert evals[0]["val_loss"] > evals[1]["val_loss"] > evals[2]["val_loss"]
    assert evals[-1]["val_loss"] < 0.7 * math.log(vocab)
    assert main(["generate", "--ckpt", str(tmp_path / "run"), "--prompt", "ROMEO: <|extra_id_0|> lord.",
                 "--greedy", "--max-new-tokens", "20"]) == 0
