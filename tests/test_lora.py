"""LoRA (lmforge.adapters.lora) against peft's LoRA on identical weights, on every architecture."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lmforge.adapters import (
    AdapterOptions,
    LoRALinear,
    adapter_transform,
    adapters_disabled,
    apply_lora,
    lora_target_names,
    merge_adapters,
    trainable_counts,
)
from lmforge.errors import UserError
from lmforge.models import ModelConfig, build_model
from lmforge.train.transforms import apply_transforms

peft = pytest.importorskip("peft")

GPT2 = dict(arch="gpt")
LLAMA = dict(arch="gpt", pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=1,
             tie_embeddings=False)
MOE = dict(LLAMA, moe={"num_experts": 3, "top_k": 2})
BERT = dict(arch="bert", norm_position="post", num_labels=2)
ENCDEC = dict(arch="encdec", pos_encoding="relative", norm="rmsnorm", bias=False, decoder_start_token_id=0)


def tiny(**kw) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=61, n_layer=2, n_head=2, n_embd=32, block_size=24, **kw)).eval()


def randomize_lora(model: nn.Module, seed: int = 1) -> None:
    """B starts at zero (the update is off): give A and B random values so the update matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.3)
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)


def peft_copy(model: nn.Module, targets: list[str], rank: int, alpha: float) -> nn.Module:
    """`model`'s twin with peft's LoRA injected and A/B copied from lmforge's LoRALinears."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets)
    twin = inject_adapter_in_model(config, copy.deepcopy(model))
    return twin


def copy_into_peft(ours: nn.Module, twin: nn.Module) -> int:
    n = 0
    theirs = dict(twin.named_modules())
    with torch.no_grad():
        for name, m in ours.named_modules():
            if isinstance(m, LoRALinear):
                p = theirs[name]
                p.lora_A["default"].weight.copy_(m.lora_A)
                p.lora_B["default"].weight.copy_(m.lora_B)
                n += 1
    return n


@pytest.mark.parametrize("layout", [GPT2, LLAMA, MOE], ids=["gpt2", "llama", "moe"])
def test_forward_and_gradients_equal_peft(layout):
    base = tiny(**layout)
    targets = ["qkv", "out", "gate", "up", "down"] if layout is not GPT2 else ["qkv", "out", "up", "down"]
    theirs = peft_copy(base, targets, rank=4, alpha=8.0)
    ours = copy.deepcopy(base)
    names = apply_lora(ours, targets, rank=4, alpha=8.0)
    randomize_lora(ours)
    assert copy_into_peft(ours, theirs) == len(names) > 0
    # peft adapts the same Linears (the MoE router is not matched by these names either)
    assert sorted(names) == sorted(n.rsplit(".lora_A", 1)[0] for n, _ in theirs.named_modules()
                                   if n.endswith(".lora_A"))
    idx = torch.randint(0, 61, (3, 16), generator=torch.Generator().manual_seed(2))
    logits, loss = ours(idx, idx)
    ref_logits, ref_loss = theirs(idx, idx)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert (logits - base(idx)[0]).abs().max() > 1e-2  # the update is not nothing
    loss.backward()
    ref_loss.backward()
    theirs_modules = dict(theirs.named_modules())
    for name in names:
        m, p = ours.get_submodule(name), theirs_modules[name]
        torch.testing.assert_close(m.lora_A.grad, p.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(m.lora_B.grad, p.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)
        assert m.weight.grad is None and not m.weight.requires_grad  # the base is frozen


@pytest.mark.parametrize("layout", [GPT2, LLAMA, MOE, BERT, ENCDEC], ids=["gpt2", "llama", "moe", "bert", "encdec"])
def test_default_targets_merge_and_disable_on_every_architecture(layout):
    model = tiny(**layout)
    state_before = {k: v.shape for k, v in model.state_dict().items()}
    idx = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(3))

    def run(m):
        return m(idx, labels=idx)[0] if layout in (BERT, ENCDEC) else m(idx)[0]

    base_out = run(model).detach()
    options = AdapterOptions(method="lora", lora_rank=4)
    model = apply_transforms(model, [adapter_transform(options)])  # keeps every base tensor name and shape
    assert {k: v.shape for k, v in model.state_dict().items() if "lora_" not in k} == state_before
    torch.testing.assert_close(run(model), base_out)  # B = 0: starts as the base
    randomize_lora(model)
    adapted = run(model).detach()
    assert (adapted - base_out).abs().max() > 1e-3
    with adapters_disabled(model):
        torch.testing.assert_close(run(model), base_out)
    trainable, total = trainable_counts(model)
    assert trainable == sum(m.lora_A.numel() + m.lora_B.numel() for m in model.modules() if isinstance(m, LoRALinear))
    assert 0 < trainable < total
    merged = merge_adapters(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(state_before)
    torch.testing.assert_close(run(merged), adapted, rtol=1e-4, atol=2e-4)  # merged == unmerged (fp32 round-off)


def test_default_targets_cover_attention_and_mlp_linears_but_not_router_or_head():
    names = lora_target_names(tiny(**MOE), AdapterOptions().lora_targets)
    assert "blocks.0.attn.qkv" in names and "blocks.1.mlp.experts.2.down" in names
    assert not any("router" in n or n == "lm_head" for n in names)
    encdec = lora_target_names(tiny(**ENCDEC), AdapterOptions().lora_targets)
    assert "decoder_blocks.0.cross_attn.kv" in encdec and "encoder_blocks.1.mlp.up" in encdec


def test_patterns_are_globs_over_names_or_their_tails():
    model = tiny(**LLAMA)
    assert lora_target_names(model, ["blocks.1.attn.*"]) == ["blocks.1.attn.qkv", "blocks.1.attn.out"]
    assert lora_target_names(model, ["attn.qkv"]) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]


def test_a_pattern_that_matches_nothing_names_it_and_lists_modules():
    with pytest.raises(UserError, match=r"pattern 'c_attn' matches no Linear.*blocks\.0\.attn\.qkv"):
        apply_lora(tiny(**GPT2), ["qkv", "c_attn"], rank=2, alpha=2.0)
    with pytest.raises(UserError, match="router"):
        apply_lora(tiny(**MOE), ["router"], rank=2, alpha=2.0)
    with pytest.raises(UserError, match="tied"):  # GPT-2 layout ties lm_head to the embeddings
        apply_lora(tiny(**GPT2), ["lm_head"], rank=2, alpha=2.0)


def test_dropout_scaling_and_training_step():
    model = tiny(**LLAMA)
    apply_lora(model, ["qkv"], rank=2, alpha=6.0, dropout=0.5)
    m = model.blocks[0].attn.qkv
    assert m.scaling == 3.0 and isinstance(m.lora_dropout, nn.Dropout)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    frozen = model.blocks[0].attn.qkv.weight.clone()
    idx = torch.randint(0, 61, (2, 12))
    for _ in range(3):
        opt.zero_grad()
        model(idx, idx)[1].backward()
        opt.step()
    assert torch.equal(frozen, model.blocks[0].attn.qkv.weight)
    assert model.blocks[0].attn.qkv.lora_B.abs().sum() > 0


def test_compiles():
    model = tiny(**LLAMA)
    apply_lora(model, ["qkv", "out"], rank=2, alpha=4.0)
    randomize_lora(model)
    idx = torch.randint(0, 61, (2, 12))
    expected = model(idx)[0]
    compiled = torch.compile(model, backend="aot_eager")  # graph capture of the swapped modules, no C++ build
    torch.testing.assert_close(compiled(idx)[0], expected)
    compiled(idx, idx)[1].backward()
    assert model.blocks[0].attn.qkv.lora_A.grad is not None
