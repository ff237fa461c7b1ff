"""NF4 and QLoRA: bitsandbytes' NF4 and peft's LoRA over bitsandbytes' Linear4bit are the references."""

from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from lmforge.adapters.lora import LoRALinear
from lmforge.adapters.nf4 import NF4, dequantize_nf4, level_table, quantize_nf4
from lmforge.adapters.options import AdapterOptions
from lmforge.adapters.qlora import QLoRALinear, apply_qlora, qlora_modules, qlora_transform, quantized_bytes
from lmforge.config import load_config
from lmforge.models import build_model
from lmforge.models.config import ModelConfig
from lmforge.peakmem import can_measure, measure_training_peak
from lmforge.plan.lora import NF4_TENSOR_CONSTANTS, LoRA, nf4_bytes
from lmforge.plan.memory import training_memory
from lmforge.train.transforms import apply_transforms

bnb_functional = pytest.importorskip("bitsandbytes.functional")

SHAPES = [((384, 128), torch.float32), ((640, 384), torch.bfloat16), ((1000, 7), torch.float32),
          ((33,), torch.float32), ((300, 200), torch.float16)]


def weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    if w.numel() >= 256:
        w.view(-1)[:64] = 0  # an all-zero block
    return w


@pytest.mark.parametrize("shape,dtype", SHAPES)
def test_nf4_without_double_quant_is_bitsandbytes_nf4_exactly(shape, dtype):
    w = weight(shape, dtype)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    q = quantize_nf4(w, 64, double_quant=False)
    assert torch.equal(q.codes, packed.reshape(-1))  # same packing: first value in the high nibble
    assert torch.equal(q.absmax, state.absmax)
    ours, theirs = dequantize_nf4(q), bnb_functional.dequantize_4bit(packed, state)
    assert ours.dtype == theirs.dtype == dtype and torch.equal(ours, theirs)
    assert torch.equal(dequantize_nf4(q, chunk=192), theirs)  # decoded a few blocks at a time


def portable_quantize_blockwise(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' device-independent 8-bit blockwise kernel (its CPU library's is registered over it)."""
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return op.redispatch(keys, x, bnb_functional.create_dynamic_map(), blocksize)


@pytest.mark.parametrize("shape,dtype", SHAPES)
def test_nf4_with_double_quant_matches_bitsandbytes(shape, dtype):
    w = weight(shape, dtype, seed=1)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    q = quantize_nf4(w, 64, double_quant=True)
    assert torch.equal(q.codes, packed.reshape(-1))
    assert torch.equal(q.offset, state.offset) and q.absmax.dtype == torch.uint8
    # the 8-bit block maxima: bitsandbytes' portable kernel exactly ...
    _, fp32_absmax = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    codes8, _ = portable_quantize_blockwise(fp32_absmax.absmax - state.offset, 256)
    assert torch.equal(q.absmax, codes8)
    assert torch.equal(q.absmax_scale, state.state2.absmax)  # (one fp32 scale per 256 block maxima)
    # ... and its CPU library up to near-ties, which that library's approximate search can send
    # to the farther level: ours is never the farther one, and never more than one level off
    # (a group whose maxima all equal their mean has scale 0: any code decodes to the mean there)
    table = level_table("dynamic", w.device)
    scale = q.absmax_scale.repeat_interleave(256)[:q.absmax.numel()]
    live = scale > 0
    x = (fp32_absmax.absmax - state.offset)[live] / scale[live]
    ours, cpu = table[q.absmax[live].long()], table[state.absmax[live].long()]
    assert torch.all((x - ours).abs() <= (x - cpu).abs())
    assert torch.all((q.absmax[live].int() - state.absmax[live].int()).abs() <= 1)
    # dequantizing bitsandbytes' own state gives bitsandbytes' values exactly
    theirs = NF4(packed.reshape(-1), state.absmax, state.state2.absmax, state.offset, w.shape, dtype)
    expected = bnb_functional.dequantize_4bit(packed, state)
    assert torch.equal(dequantize_nf4(theirs), expected) and torch.equal(dequantize_nf4(theirs, chunk=128), expected)


def test_nf4_storage_is_the_planned_bytes_and_under_30_percent_of_bf16():
    for shape in [(384, 128), (512, 128), (640, 384), (1000, 7)]:
        n = shape[0] * shape[1]
        q = quantize_nf4(weight(shape, torch.float32))
        # the plan counts the level tables per tensor; they are module constants here (the mean stays)
        assert q.nbytes == nf4_bytes(n) - NF4_TENSOR_CONSTANTS + 4
        assert q.nbytes <= 0.30 * n * 2


def tiny_gpt(**kw) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=96, n_layer=2, n_head=2, n_embd=64, block_size=16, **kw))


def qlora(model: nn.Module, **kw) -> nn.Module:
    return apply_transforms(model, [qlora_transform(AdapterOptions(method="qlora", **kw))])


def test_qlora_model_keeps_the_layout_and_stores_nf4_only():
    model = tiny_gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model = qlora(model, lora_rank=4)  # apply_transforms checks every name and shape is kept
    mods = qlora_modules(model)
    assert len(mods) == 2 * 4  # qkv, out, up, down per block
    stored, numel = quantized_bytes(model)
    assert stored <= 0.30 * numel * 2 and numel == sum(m.nf4_shape[0] * m.nf4_shape[1] for _, m in mods)
    for _, m in mods:
        assert m.weight is None and "weight" not in dict(m.named_parameters())  # no float copy kept
        assert all(b.dtype == torch.uint8 for b in m.buffers())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}" for n, _ in mods for x in "AB"}
    state = model.state_dict()
    for name, _ in mods:  # the plain weight, dequantized, in its place; the buffers stay out
        w = state[f"{name}.weight"]
        assert w.dtype == before[f"{name}.weight"].dtype
        assert torch.equal(w, dequantize_nf4(quantize_nf4(before[f"{name}.weight"])))
    assert not any("nf4" in k for k in state)
    # the same codes on every rank: DDP does not re-broadcast them before each forward
    buffers = {n for n, _ in model.named_buffers() if ".nf4_" in n}
    assert buffers and buffers <= set(model._ddp_params_and_buffers_to_ignore)
    # model.to(bf16) casts the adapters, never the codes
    codes = [b.clone() for _, m in mods for b in m.buffers()]
    model.to(torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(codes, (b for _, m in mods for b in m.buffers())))


def test_load_state_dict_requantizes_new_weights_and_keeps_its_own():
    model = qlora(tiny_gpt(), lora_rank=4)
    name, m = qlora_modules(model)[0]
    own = copy.deepcopy(dict(m.named_buffers()))
    model.load_state_dict(model.state_dict())  # its own weights: the very same codes
    assert all(torch.equal(own[k], v) for k, v in m.named_buffers())
    fresh = torch.randn(m.nf4_shape)
    state = model.state_dict()
    state[f"{name}.weight"] = fresh
    model.load_state_dict(state)
    assert torch.equal(m.dequantized(torch.float32), dequantize_nf4(quantize_nf4(fresh)))
    with pytest.raises(RuntimeError, match="Missing key.*weight"):
        model.load_state_dict({k: v for k, v in state.items() if k != f"{name}.weight"})
    state[f"{name}.weight"] = torch.randn(3, 3)
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict(state)


def peft_over_bnb(linear: nn.Linear, rank: int, alpha: float, double_quant: bool) -> tuple[nn.Module, nn.Module]:
    """peft's LoRA over bitsandbytes' NF4 Linear4bit holding `linear`'s weights (the QLoRA stack)."""
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=True, compute_dtype=torch.float32,
                          quant_type="nf4", compress_statistics=double_quant)
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=double_quant, blocksize=64)
    q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    model = nn.Sequential(OrderedDict(proj=q.to("cpu")))  # .to quantizes
    model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"]))
    return model, model.base_model.model.proj


@pytest.mark.parametrize("double_quant", [False, True])
def test_qlora_forward_backward_equals_peft_over_bitsandbytes(double_quant):
    torch.manual_seed(0)
    linear = nn.Linear(128, 192)
    theirs, layer = peft_over_bnb(linear, rank=4, alpha=8.0, double_quant=double_quant)
    ours = QLoRALinear.from_linear(copy.deepcopy(linear), rank=4, alpha=8.0)
    ours.quantize_(64, double_quant)
    ours.bias.requires_grad_(False)
    with torch.no_grad():
        nn.init.normal_(ours.lora_B)
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(3, 5, 128)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    # without double quantization the stored weights are bitsandbytes' exactly; with it, the 8-bit
    # block maxima differ at near-ties (test above): by one 8-bit level on a few blocks
    tol = 1e-5 if not double_quant else 2e-3
    torch.testing.assert_close(ya, yb, atol=tol, rtol=tol)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(ours.lora_A.grad, layer.lora_A["default"].weight.grad, atol=tol * 10, rtol=tol)
    torch.testing.assert_close(ours.lora_B.grad, layer.lora_B["default"].weight.grad, atol=tol * 10, rtol=tol)


def test_backward_saves_no_dequantized_weight_and_merges_to_a_plain_linear():
    torch.manual_seed(0)
    linear = nn.Linear(256, 512)
    m = QLoRALinear.from_linear(linear, rank=4, alpha=8.0)
    m.quantize_(64)
    with torch.no_grad():
        nn.init.normal_(m.lora_B)
    saved = []
    x = torch.randn(2, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = m(x)
    assert saved and max(saved) < 256 * 512  # the (512, 256) weight is not kept for backward
    y.sum().backward()
    assert x.grad is not None and m.lora_A.grad is not None
    w = m.dequantized(torch.float32)
    expected = x @ w.t() + m.bias + (x @ m.lora_A.t() @ m.lora_B.t()) * m.scaling
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(x.grad, (torch.ones_like(y) @ (w + m.delta_weight())).detach())
    plain = m.to_linear()
    assert type(plain) is nn.Linear
    torch.testing.assert_close(plain(x), y)
    with pytest.raises(NotImplementedError, match="to_linear"):
        m.merge()


def test_autocast_computes_in_bf16_like_a_lora_linear():
    torch.manual_seed(0)
    linear = nn.Linear(64, 128)
    q = QLoRALinear.from_linear(copy.deepcopy(linear), rank=4, alpha=8.0)
    q.quantize_(64)
    ref = LoRALinear.from_linear(copy.deepcopy(linear), rank=4, alpha=8.0)
    with torch.no_grad():
        ref.weight.copy_(q.dequantized(torch.float32))
        ref.lora_A.copy_(q.lora_A)
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = q(x), ref(x)
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_qlora_trains_only_the_adapters():
    model = qlora(tiny_gpt(), lora_rank=4)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 96, (4, 16), generator=g)
    losses = []
    for _ in range(8):
        _, loss = model(idx, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())


def test_trainable_counts_count_the_nf4_weights_in_the_total():
    from lmforge.adapters import trainable_counts

    plain = tiny_gpt()
    n = sum(p.numel() for p in plain.parameters())
    model = qlora(plain, lora_rank=4)
    trainable, total = trainable_counts(model)
    adapters = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    assert trainable == adapters and total == n + adapters


@pytest.mark.slow  # compiling forward and backward takes half a minute or more on 2 busy cores
def test_qlora_under_torch_compile_gives_eager_loss_and_gradients():
    model = qlora(tiny_gpt(), lora_rank=4)
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    _, eager = model(idx, idx)
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    _, compiled = torch.compile(model)(idx, idx)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not can_measure(), reason="peak measurement reads glibc's mallinfo2")
def test_qlora_training_peak_is_what_lmforge_plan_predicts():
    """The plan's QLoRA model (NF4 base, bf16 rest, fp32 adapters, one dequantized weight at a
    time) holds for this implementation, measured as tests/test_plan.py measures bitsandbytes'."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "nano.yaml")
    c = ModelConfig.from_dict({**cfg.model.to_dict(), "vocab_size": cfg.model.vocab_size or 320})
    quantized = []

    def adapt(model):
        model.to(torch.bfloat16)
        apply_qlora(model, AdapterOptions(method="qlora", lora_rank=8))
        trained = [p for p in model.parameters() if p.requires_grad]
        for p in trained:
            p.data = p.data.float()  # fp32 adapters, as the plan counts them
        quantized.extend(m for _, m in qlora_modules(model))
        return trained, quantized_bytes(model)[0]

    predicted = training_memory(c, cfg.train.batch_size, attention="cpu", lora=LoRA.parse(8, quantized=True))
    measured = measure_training_peak(c, cfg.train.batch_size, "bf16", adapt=adapt)
    # exact, but for the two level tables the plan counts per tensor (module constants here; the
    # mean stays) and AdamW's 4-byte step counter per trained tensor, which the plan leaves out
    tables = len(quantized) * (NF4_TENSOR_CONSTANTS - 4)
    steps = 4 * 2 * len(quantized)
    assert predicted["weights"] + predicted["optimizer"] - tables + steps == measured["persistent"]
    assert abs(predicted["peak"] / measured["peak"] - 1) < 0.15, (predicted["peak"], measured)
