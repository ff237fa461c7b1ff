"""Freeze, prefix and prompt tuning; saving, loading, merging, disabling adapters (lmforge.adapters)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lmforge.adapters import (
    ADAPTER_CONFIG,
    AdapterOptions,
    adapter_state,
    adapter_transform,
    adapters_disabled,
    apply_saved_adapter,
    load_adapter,
    merge_adapters,
    save_adapter,
    trainable_counts,
    write_adapter_config,
)
from lmforge.adapters.prefix import PrefixAttention
from lmforge.errors import UserError
from lmforge.infer.generate import generate_batch
from lmforge.models import ModelConfig, build_model
from lmforge.train.transforms import apply_transforms

LLAMA = dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=1, tie_embeddings=False)
GPT2 = dict()


def tiny(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(vocab_size=53, n_layer=2, n_head=2, n_embd=32, block_size=40, **kw)).eval()


def adapted(method: str, seed: int = 0, **kw) -> nn.Module:
    opts = AdapterOptions(method=method, prefix_len=5, prompt_len=5, lora_rank=4, freeze_layers=1)
    return apply_transforms(tiny(seed, **kw), [adapter_transform(opts)])


def ids(*shape: int, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, 53, shape, generator=torch.Generator().manual_seed(seed))


# ---- freeze -------------------------------------------------------------------------------------


def test_freeze_trains_only_later_blocks_and_the_norm():
    model = adapted("freeze", **LLAMA).train()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith(("tok_embeddings", "blocks.0."))}
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids(2, 12)
    model(x, x)[1].backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and not changed & frozen
    with pytest.raises(UserError, match="freeze_layers=3 but blocks has only 2"):
        apply_transforms(tiny(), [adapter_transform(AdapterOptions(method="freeze", freeze_layers=3))])


# ---- prefix and prompt: against independent references ------------------------------------------


def test_prefix_equals_the_same_keys_values_in_a_kv_cache():
    """A prefix is what a KV cache holding those keys/values gives the plain model (positions
    made irrelevant by zero learned position embeddings)."""
    base = tiny(**GPT2)
    with torch.no_grad():
        base.pos_embeddings.weight.zero_()
    model = apply_transforms(copy.deepcopy(base), [adapter_transform(AdapterOptions(method="prefix", prefix_len=5))])
    x = ids(2, 9)
    cache = base.new_kv_cache(2)
    for layer, block in enumerate(model.blocks):
        k, v = block.attn.prefix_keys, block.attn.prefix_values
        cache.update(layer, k[None].expand(2, -1, -1, -1), v[None].expand(2, -1, -1, -1))
    cache.advance(5)
    expected = base(x, kv_cache=cache)[0]
    torch.testing.assert_close(model(x)[0], expected, rtol=1e-5, atol=1e-5)
    with adapters_disabled(model):
        torch.testing.assert_close(model(x)[0], base(x)[0])


def test_prompt_equals_prepending_the_embeddings_with_rope():
    """Prompt tuning as the paper defines it: the soft prompt's embeddings prepended to the input
    (RoPE is relative, so the prompt's per-layer keys/values at positions -P..-1 are exact)."""
    model = adapted("prompt", **LLAMA)
    x = ids(2, 9)
    P = model.soft_prompt.embeddings.shape[0]
    with torch.no_grad(), adapters_disabled(model):
        h = torch.cat([model.soft_prompt.embeddings[None].expand(2, -1, -1), model.tok_embeddings(x)], dim=1)
        rope = (model.rope_cos[:P + 9], model.rope_sin[:P + 9])
        for layer, block in enumerate(model.blocks):
            h = block(h, rope=rope, layer=layer)
        expected = model.lm_head(model.norm(h))[:, P:]
    torch.testing.assert_close(model(x)[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("layout", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_packed_rows_see_the_prefix_and_nothing_of_each_other(method, layout):
    model = adapted(method, **layout)
    a, b = ids(7, seed=1), ids(4, seed=2)
    packed = torch.cat([a, b])[None]
    positions = torch.tensor([list(range(7)) + list(range(4))])
    docs = torch.tensor([[0] * 7 + [1] * 4])
    logits = model(packed, position_ids=positions, doc_ids=docs)[0]
    torch.testing.assert_close(logits[0, :7], model(a[None])[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[0, 7:], model(b[None])[0][0], rtol=1e-5, atol=1e-5)
    with adapters_disabled(model):
        assert (model(a[None])[0] - logits[:, :7]).abs().max() > 1e-3  # the adapter changes the output


def greedy_without_cache(model: nn.Module, prompt: list[int], n: int) -> list[int]:
    out = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out]))[0][0, -1].argmax()))
    return out[len(prompt):]


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("layout", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_generation_with_kv_cache_and_rows_of_different_lengths(method, layout):
    model = adapted(method, init_std=0.2, **layout)  # larger weights: replies that depend on the adapter
    prompts = [ids(3, seed=3).tolist(), ids(8, seed=4).tolist(), ids(5, seed=6).tolist()]
    got = generate_batch(model, prompts, 6, temperature=0.0)
    assert got == [greedy_without_cache(model, p, 6) for p in prompts]
    with adapters_disabled(model):
        base = generate_batch(model, prompts, 6, temperature=0.0)
    assert base != got


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_only_the_adapter_trains(method):
    model = adapted(method, **LLAMA).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if method == "prefix":
        assert trainable == {f"blocks.{i}.attn.prefix_{kv}" for i in range(2) for kv in ("keys", "values")}
    else:
        assert trainable == {"soft_prompt.embeddings"}
    assert trainable_counts(model)[0] == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    x, target = ids(4, 16), torch.full((4, 16), 7)  # learnable by a prefix: always say 7
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model(x, target)[1]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05


def test_prefix_on_bert_and_encdec_and_prompt_refused_there():
    for kw in (dict(arch="bert", norm_position="post"),
               dict(arch="encdec", pos_encoding="relative", decoder_start_token_id=0)):
        model = adapted("prefix", **kw)
        x = ids(2, 8)
        out = model(x, labels=x)
        with adapters_disabled(model):
            base = model(x, labels=x)
        assert (out[0] - base[0]).abs().max() > 1e-4
        out[1].backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        with pytest.raises(UserError, match="prompt: works on GPT-family"):
            adapted("prompt", **kw)


def test_prompt_compiles():
    model = adapted("prompt", **LLAMA).train()
    x = ids(2, 12)
    expected = model(x, x)[0]
    compiled = torch.compile(model, backend="aot_eager")  # graph capture, no C++ build
    logits, loss = compiled(x, x)
    torch.testing.assert_close(logits, expected)
    loss.backward()
    assert model.soft_prompt.embeddings.grad is not None


# ---- save, load, merge ------------------------------------------------------------------------


def train_a_bit(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(9)) * 0.2)
    return model


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt", "freeze"])
def test_save_and_load_onto_a_fresh_base(tmp_path, method):
    options = AdapterOptions(method=method, prefix_len=5, prompt_len=5, lora_rank=4, freeze_layers=1)
    model = train_a_bit(apply_transforms(tiny(**LLAMA), [adapter_transform(options)]))
    x = ids(2, 10)
    expected = model(x)[0]
    save_adapter(tmp_path / "adapter", model, options, base="runs/base")
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["method"] == method and config["base"] == "runs/base"
    assert sorted(config["tensors"]) == sorted(adapter_state(model))
    fresh = load_adapter(tiny(**LLAMA), tmp_path / "adapter")
    torch.testing.assert_close(fresh(x)[0], expected)
    assert trainable_counts(fresh) == trainable_counts(model)
    with pytest.raises(UserError, match=r"saved for base runs/base \(fingerprint \w+\), not for this model"):
        load_adapter(tiny(seed=1, **LLAMA), tmp_path / "adapter")


def test_adapter_state_is_small_and_keeps_trainable_heads(tmp_path):
    options = AdapterOptions(method="lora", lora_rank=2)
    model = apply_transforms(tiny(**LLAMA), [adapter_transform(options, trainable=["lm_head"])])
    state = adapter_state(model)
    assert "lm_head.weight" in state and model.lm_head.weight.requires_grad
    assert all(k == "lm_head.weight" or k.endswith((".lora_A", ".lora_B")) for k in state)
    assert not model.blocks[0].attn.qkv.weight.requires_grad


def test_apply_saved_adapter_from_a_checkpoint_dir(tmp_path):
    """A fine-tuning checkpoint: model.safetensors (base layout, loaded by the caller),
    transform_state.safetensors (the adapter tensors), adapter_config.json."""
    options = AdapterOptions(method="lora", lora_rank=4)
    model = train_a_bit(apply_transforms(tiny(**LLAMA), [adapter_transform(options)]))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({k: v.contiguous() for k, v in adapter_state(model).items()}, str(ckpt / "transform_state.safetensors"))
    write_adapter_config(ckpt, model, options, base=tmp_path / "base")
    x = ids(2, 10)
    fresh = apply_saved_adapter(tiny(**LLAMA), ckpt)
    torch.testing.assert_close(fresh(x)[0], model(x)[0])
    (ckpt / "transform_state.safetensors").unlink()
    with pytest.raises(UserError, match=r"adapter tensor 'blocks.0.attn.out.lora_A' is missing"):
        apply_saved_adapter(tiny(**LLAMA), ckpt)


def test_merge():
    lora = train_a_bit(adapted("lora", **LLAMA))
    x = ids(2, 10)
    expected = lora(x)[0]
    plain = merge_adapters(lora)
    assert all(type(m) is nn.Linear for n, m in plain.named_modules() if isinstance(m, nn.Linear))
    torch.testing.assert_close(plain(x)[0], expected, rtol=1e-5, atol=1e-5)
    for method in ("prefix", "prompt"):
        model = adapted(method, **LLAMA)
        assert any(isinstance(m, PrefixAttention) for m in model.modules())
        with pytest.raises(UserError, match="cannot be merged"):
            merge_adapters(model)


def test_bad_options_and_targets():
    with pytest.raises(UserError, match="adapter.lora_rank"):
        AdapterOptions(method="lora", lora_rank=0).check("")
    with pytest.raises(UserError, match="adapter.method"):
        AdapterOptions(method="ia3").check("")
    with pytest.raises(UserError, match="prefix_len=99 is longer than the model's context"):
        adapted_opts = AdapterOptions(method="prefix", prefix_len=99)
        apply_transforms(tiny(), [adapter_transform(adapted_opts)])
    assert adapter_transform(AdapterOptions()) is None  # full fine-tuning: nothing to apply
