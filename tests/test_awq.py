"""AWQ (lmforge.compress.awq): the scales fold exactly (the scaled model computes the same function),
and with a few loud input channels the chosen scales lower the error below round-to-nearest's.
(Perplexity against RTN on a trained tiny GPT: tests/test_gptq.py, slow.)"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from lmforge.compress.awq import awq_model, awq_scales, awq_search, fake_quantize, scale_groups
from lmforge.compress.modules import Int4Linear
from lmforge.compress.quantize import quant_targets, quantize_model
from lmforge.models import GPT, ModelConfig, MoEConfig, build_model

LLAMA = dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)
CONFIGS = {
    "gpt2": dict(),  # LayerNorm with bias, GELU: no scale for mlp.down
    "llama": LLAMA,
    "gqa": {**LLAMA, "n_kv_head": 2},  # no scale for attn.out
    "relu": dict(mlp="relu"),
    "moe": {**LLAMA, "moe": MoEConfig(num_experts=3, top_k=2)},
    "bert": dict(arch="bert", mlp_hidden=96, norm_position="post"),  # post-norm: attn.out and mlp.down only
    "encdec": dict(arch="encdec", n_decoder_layer=2, pos_encoding="sinusoidal", mlp="relu", decoder_start_token_id=0),
}


def tiny(name: str, seed: int = 0, loud: bool = True) -> nn.Module:
    """A tiny model of kind `name`; `loud`: its norms make 4 channels ~10x louder (as trained LLMs have)."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**{"vocab_size": 40, "n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 32,
                                       **CONFIGS[name]})).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname and pname.endswith("weight"):
                p.uniform_(0.5, 1.5)
                if loud:
                    p[:4] *= 10
            elif "norm" in pname and pname.endswith("bias"):
                p.uniform_(-0.2, 0.2)
    return model


def ids(n: int, seed: int, length: int = 32) -> list[Tensor]:
    return [torch.randint(1, 40, (1, length), generator=torch.Generator().manual_seed(seed + s)) for s in range(n)]


def forward(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        if isinstance(model, GPT) or getattr(model.config, "arch", "") == "bert":
            return model(x)[0]
        return model(x, x)[0]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_scaling_keeps_the_function(name):
    model = tiny(name)
    test = torch.randint(1, 40, (3, 32), generator=torch.Generator().manual_seed(123))
    before = forward(model, test)
    chosen = awq_search(model, ids(4, 0), group_size=32, progress=False)
    assert chosen and any(a > 0 for a in chosen.values())  # something was scaled
    assert torch.allclose(forward(model, test), before, atol=1e-5, rtol=1e-5), name
    kinds = {key.split(".")[-1] for key in chosen}
    expected = {
        "gpt2": {"attn_in", "attn_out", "mlp_in"},
        "llama": {"attn_in", "attn_out", "mlp_in", "mlp_down"},
        "gqa": {"attn_in", "mlp_in", "mlp_down"},
        "relu": {"attn_in", "attn_out", "mlp_in", "mlp_down"},
        "moe": {"attn_in", "attn_out", "mlp_in", "0_down", "1_down", "2_down"},
        "bert": {"attn_out"},  # GELU: nothing to fold mlp.down's scale into
        "encdec": {"attn_in", "attn_out", "mlp_in", "mlp_down", "cross_attn_in", "cross_attn_out"},
    }[name]
    assert kinds == expected, kinds


def test_a_folded_scale_is_exact_by_hand():
    # one group by hand: norm weight / s, qkv columns * s
    model = tiny("gpt2")
    block = model.blocks[0]
    group = scale_groups(block, "b.")[0]
    assert group.name == "b.attn_in" and group.prev is block.attn_norm and group.linears == [block.attn.qkv]
    x = torch.randn(5, 64)
    before = block.attn.qkv(block.attn_norm(x))
    s = awq_scales(torch.rand(64) + 0.1, 0.5)
    assert torch.allclose(s.max() * s.min(), torch.tensor(1.0))
    w, nw, nb = block.attn.qkv.weight.clone(), block.attn_norm.weight.clone(), block.attn_norm.bias.clone()
    from lmforge.compress.awq import apply_scale

    apply_scale(group, s)
    assert torch.allclose(block.attn.qkv.weight, w * s) and torch.allclose(block.attn_norm.weight, nw / s)
    assert torch.allclose(block.attn_norm.bias, nb / s)
    assert torch.allclose(block.attn.qkv(block.attn_norm(x)), before, atol=1e-5)


def layer_error(model: nn.Module, quantized: nn.Module, calib: list[Tensor], pick) -> float:
    """||X Wᵀ - X Ŵᵀ||² of one Linear over the inputs the full-precision model gives it."""
    inputs = []
    handle = pick(model).register_forward_hook(lambda m, a, o: inputs.append(a[0]))
    for x in calib:
        forward(model, x)
    handle.remove()
    x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs])
    ref = pick(model)(x)
    # the quantized Linear reads the activations divided by s (folded upstream): feed it the same way
    scaled = []
    handle = pick(quantized).register_forward_hook(lambda m, a, o: scaled.append(a[0]))
    for c in calib:
        forward(quantized, c)
    handle.remove()
    xs = torch.cat([i.reshape(-1, i.shape[-1]) for i in scaled])
    with torch.no_grad():
        return float(((pick(quantized)(xs) - ref) ** 2).sum())


def no_kernel(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, Int4Linear):
            m.kernel = False
    return model


@pytest.mark.parametrize("symmetric", [False, True])
def test_loud_channels_awq_error_below_rtn(symmetric):
    # qkv and gate/up read the norms' outputs, 4 of whose channels are ~10x louder than the rest.
    # Compared: Linears whose outputs no later scale divides (qkv's value rows and up's rows carry
    # the 1/s of attn.out's and down's scales, so their outputs alone are not the original function)
    model = tiny("llama", seed=1)
    calib, held_out = ids(8, 0), ids(8, 100)
    awq = no_kernel(awq_model(copy.deepcopy(model), calib, group_size=32, symmetric=symmetric, progress=False))
    rtn = no_kernel(quantize_model(copy.deepcopy(model), "int4", group_size=32, symmetric=symmetric))
    for pick in (lambda m: m.blocks[0].mlp.gate, lambda m: m.blocks[1].mlp.gate):
        assert layer_error(model, awq, held_out, pick) < 0.7 * layer_error(model, rtn, held_out, pick)
    for pick in (lambda m: m.blocks[0].attn.out, lambda m: m.blocks[1].mlp.down):
        assert layer_error(model, awq, held_out, pick) < layer_error(model, rtn, held_out, pick)
    test = torch.cat(held_out)
    ref = forward(model, test)
    err_awq, err_rtn = (float(((forward(m, test) - ref) ** 2).mean()) for m in (awq, rtn))
    assert err_awq < 0.7 * err_rtn, (err_awq, err_rtn)
    assert [n for n, m in awq.named_modules() if isinstance(m, Int4Linear)] == [n for n, _ in quant_targets(model)]


def test_alpha_zero_is_round_to_nearest_and_the_search_never_loses_on_calibration():
    # s(0) = 1; a grid of 2 points is {0, 1}: RTN or full scaling
    w = torch.randn(16, 64)
    assert torch.equal(awq_scales(torch.rand(64) + 0.5, 0.0), torch.ones(64))
    assert torch.equal(fake_quantize(w, 4, 32, False), fake_quantize(w * awq_scales(torch.rand(64), 0.0), 4, 32, False))
    model = tiny("llama", seed=2)
    calib = ids(6, 0)
    chosen = awq_search(copy.deepcopy(model), calib, group_size=32, grid=2, progress=False)
    assert set(chosen.values()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="at least 2"):
        awq_search(copy.deepcopy(model), calib, grid=1, progress=False)
