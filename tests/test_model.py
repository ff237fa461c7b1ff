"""Tests for the GPT model and its blocks: parity with HF GPT-2/Llama, KV cache, counts, init."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.errors import UserError
from lmforge.models import GPT, ModelConfig
from lmforge.models.blocks import scaled_init_std, sinusoidal_table

GPT2_STYLE = dict(pos_encoding="learned", norm="layernorm", mlp="gelu_tanh", bias=True,
                  tie_embeddings=True)
LLAMA_STYLE = dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                   tie_embeddings=False)


def tiny(**overrides) -> ModelConfig:
    kw = dict(vocab_size=50, n_layer=2, n_head=4, n_embd=32, block_size=32)
    kw.update(overrides)
    return ModelConfig(**kw)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _perturb_(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Move every parameter off its init (ones, zeros) so a mis-mapped norm or bias shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


# --------------------------------------------------------------------------------------------
# Independent references: HF transformers, with weights mapped by the HF converter.


def load_hf(model: GPT, model_type: str, hf_state: dict[str, torch.Tensor]) -> None:
    """Copy an HF state dict into our GPT through `lmforge.export.hf` (the converter's own mapping)."""
    from lmforge.export.hf import state_from_hf
    from lmforge.train.checkpoint import load_weights_into

    load_weights_into(model, state_from_hf(model.config, model_type, hf_state), "HF state dict")


def test_matches_hf_gpt2():
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64,
                                        vocab_size=100, resid_pdrop=0.0, embd_pdrop=0.0,
                                        attn_pdrop=0.0, attn_implementation="eager")
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    _perturb_(hf)
    ours = GPT(ModelConfig(vocab_size=100, n_layer=2, n_head=4, n_embd=64, block_size=64,
                           norm_eps=hf_config.layer_norm_epsilon, **GPT2_STYLE)).eval()
    load_hf(ours, "gpt2", hf.state_dict())
    idx = torch.randint(0, 100, (2, 64))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = ours(idx)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_matches_hf_llama_with_gqa():
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
        attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    _perturb_(hf)
    ours = GPT(ModelConfig(vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                           block_size=64, mlp_hidden=128, norm_eps=1e-6, rope_theta=10000.0,
                           **LLAMA_STYLE)).eval()
    load_hf(ours, "llama", hf.state_dict())
    idx = torch.randint(0, 100, (2, 64))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = ours(idx)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("style", [
    dict(pos_encoding="learned"),
    dict(pos_encoding="sinusoidal"),
    dict(pos_encoding="rope"),
    dict(LLAMA_STYLE, n_kv_head=2),
    dict(LLAMA_STYLE, n_kv_head=1, pos_encoding="sinusoidal"),
], ids=["learned", "sinusoidal", "rope", "llama-gqa", "mqa-sinusoidal"])
def test_kv_cache_matches_full_forward(style):
    model = GPT(tiny(**style)).eval()
    _perturb_(model)
    idx = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_kv_cache(batch_size=2)
        # A prefill, single tokens, then a multi-token chunk on top of a non-empty cache
        # (the bottom-right causal mask path), then single tokens again.
        chunks = [5, 1, 1, 1, 4, 1, 1, 3, 1, 1, 1]
        assert sum(chunks) == 20
        start = 0
        for n in chunks:
            logits, _ = model(idx[:, start:start + n], kv_cache=cache)
            torch.testing.assert_close(logits, full[:, start:start + n], atol=1e-5, rtol=0)
            start += n
            assert cache.length == start
    cache.reset()
    assert cache.length == 0


def test_kv_cache_overflow_and_long_input_raise():
    model = GPT(tiny(block_size=8)).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))
    cache = model.new_kv_cache(batch_size=1)
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="block_size"):
            model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)


# --------------------------------------------------------------------------------------------
# Counting and init


def test_num_params_and_flops_hand_computed():
    model = GPT(ModelConfig(vocab_size=10, n_layer=2, n_head=2, n_embd=16, block_size=8,
                            **GPT2_STYLE))
    d, h = 16, 64
    per_block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * h + h) + (h * d + d)
    non_embedding = 2 * per_block + 2 * d  # + final LayerNorm
    embeddings = 10 * d + 8 * d  # token (tied with the LM head) + learned positions
    assert model.num_params() == non_embedding + embeddings == 6880
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.num_params(exclude_embeddings=True) == non_embedding
    matmul_params = non_embedding + 10 * d  # the tied LM head is still a matmul
    assert model.flops_per_token() == 6 * matmul_params + 12 * 2 * d * 8
    assert model.flops_per_token(seq_len=4) == 6 * matmul_params + 12 * 2 * d * 4


def test_num_params_untied_counts_lm_head():
    model = GPT(tiny(**LLAMA_STYLE, n_kv_head=2))
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    lm_head = 50 * 32
    assert model.num_params(exclude_embeddings=True) == model.num_params() - 50 * 32
    assert model.flops_per_token(seq_len=0) == 6 * model.num_params(exclude_embeddings=True)
    assert model.lm_head.weight.numel() == lm_head


def test_tied_embeddings_share_storage():
    model = GPT(tiny())
    assert model.lm_head.weight is model.tok_embeddings.weight
    assert GPT(tiny(tie_embeddings=False)).lm_head.weight is not None


def test_init_scaled_residual_projections_and_initial_loss():
    config = ModelConfig(vocab_size=256, n_layer=4, n_head=4, n_embd=128, block_size=64)
    model = GPT(config)
    expected = scaled_init_std(config.init_std, config.n_layer)
    assert expected == pytest.approx(0.02 / math.sqrt(8))
    for block in model.blocks:
        for weight in (block.attn.out.weight, block.mlp.down.weight):
            assert weight.std().item() == pytest.approx(expected, rel=0.05)
        assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert torch.all(block.attn.qkv.bias == 0)
    # Random targets: with tied embeddings, targets == inputs would be easy even at init.
    idx, targets = torch.randint(0, 256, (2, 4, 64))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(256)) < 0.2


def test_loss_ignores_minus_100_and_is_fp32_under_autocast():
    model = GPT(tiny())
    idx = torch.randint(0, 50, (2, 8))
    targets = idx.clone()
    targets[:, :4] = -100
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 50),
                                                 targets[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, targets)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32


def test_sinusoidal_table_follows_the_paper():
    table = sinusoidal_table(10, 8)
    pos, i = 3, 1
    assert table[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 8)))
    assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 8)))


# --------------------------------------------------------------------------------------------
# Config errors


def test_n_embd_not_divisible_by_n_head_names_the_key():
    with pytest.raises(UserError, match=r"model\.n_head"):
        ModelConfig(vocab_size=10, n_embd=130, n_head=4)


def test_missing_vocab_size_is_a_user_error():
    with pytest.raises(UserError, match=r"model\.vocab_size is not set"):
        GPT(ModelConfig())


# --------------------------------------------------------------------------------------------
# Training sanity


@pytest.mark.parametrize("style", [GPT2_STYLE, dict(LLAMA_STYLE, n_kv_head=2)],
                         ids=["gpt2", "llama"])
def test_tiny_model_overfits_a_fixed_batch(style):
    model = GPT(tiny(n_embd=64, block_size=16, **style))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 50, (4, 17))
    x, y = idx[:, :-1], idx[:, 1:]
    for _ in range(200):
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


def test_dropout_is_active_only_in_training():
    model = GPT(tiny(dropout=0.5))
    idx = torch.randint(0, 50, (2, 8))
    model.train()
    a, _ = model(idx)
    b, _ = model(idx)
    assert not torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], model(idx)[0])


def test_meta_device_build_then_init_weights_is_complete():
    config = tiny(pos_encoding="rope", norm="rmsnorm")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    reference = GPT(config)
    torch.testing.assert_close(model.rope_cos, reference.rope_cos)
    assert torch.all(model.norm.weight == 1)
    idx = torch.randint(0, 50, (1, 8))
    assert torch.isfinite(model(idx, idx)[1])


# --------------------------------------------------------------------------------------------
# The CPU attention path and the CPU dropout mask (speed paths, checked against the reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_kv_head,causal", [(4, True), (2, True), (4, False)])
def test_cpu_attention_matches_sdpa(dtype, n_kv_head, causal, monkeypatch):
    """Forward and gradients of the hand-written CPU path against SDPA: equal in fp32; in bf16
    no further from the fp32 result than SDPA in bf16 is."""
    import copy

    from lmforge.models.blocks import Attention

    attn32 = Attention(64, 4, n_kv_head, causal=causal, bias=True)
    x = torch.randn(3, 24, 64)
    grad_out = torch.randn(3, 24, 64)

    def run(use_cpu_path: bool, dt: torch.dtype):
        monkeypatch.setattr(Attention, "_use_cpu_attention", lambda self, *a: use_cpu_path)
        attn = copy.deepcopy(attn32).to(dt)
        xi = x.to(dt).clone().requires_grad_()
        y = attn(xi)
        y.backward(grad_out.to(dt))
        return [t.float() for t in (y, xi.grad, attn.qkv.weight.grad, attn.out.weight.grad)]

    reference = run(False, torch.float32)
    fast, sdpa = run(True, dtype), run(False, dtype)
    for f, s, r in zip(fast, sdpa, reference):
        if dtype == torch.float32:
            torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-5)
        else:
            assert (f - r).abs().max() <= 2 * (s - r).abs().max() + 1e-3


def test_cpu_attention_selection():
    from lmforge.models.blocks import Attention

    attn = Attention(32, 4, causal=True, dropout=0.1)
    q = torch.zeros(1, 4, 16, 8)
    attn.train()
    assert attn._use_cpu_attention(q, None, None)  # dropout: SDPA would fall back to its math path
    attn.eval()
    assert not attn._use_cpu_attention(q, None, None)  # fp32 without dropout: SDPA is faster
    assert attn._use_cpu_attention(q.bfloat16(), None, None)
    assert not attn._use_cpu_attention(q.bfloat16(), torch.ones(16, 16, dtype=torch.bool), None)
    long_q = torch.zeros(1, 4, Attention.CPU_ATTENTION_MAX_LEN + 1, 8, dtype=torch.bfloat16)
    assert not attn._use_cpu_attention(long_q, None, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_drops_at_rate_p_and_keeps_the_expectation(dtype):
    from lmforge.models.blocks import dropout

    x = torch.ones(400, 1000, dtype=dtype, requires_grad=True)
    y = dropout(x, 0.2)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.8) < 0.004  # 400k draws: ~5 standard deviations
    assert torch.all(y[kept] == y[kept][0]) and abs(y[kept][0].item() - 1.25) < 1e-5
    assert abs(y.float().mean().item() - 1.0) < 0.01
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # d/dx is the same mask * scale
    torch.manual_seed(1)
    a = dropout(x.detach(), 0.5)
    torch.manual_seed(1)
    torch.testing.assert_close(a, dropout(x.detach(), 0.5))  # seeded like any torch RNG
    assert dropout(x, 0.2, training=False) is x


def test_cpu_attention_dropout_is_dropout_on_the_probabilities():
    from lmforge.models.blocks import Attention, cpu_keep_mask

    attn = Attention(32, 4, causal=True, dropout=0.3).train()
    q, k, v = (torch.randn(2, 4, 10, 8) for _ in range(3))
    torch.manual_seed(7)
    y = attn._cpu_attention(q, k, v)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(8)
    probs = scores.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    torch.manual_seed(7)
    keep, scale = cpu_keep_mask(probs, 0.3)
    torch.testing.assert_close(y, (probs * keep * scale) @ v)
    assert 0 < keep.float().mean() < 1
