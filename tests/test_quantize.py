"""`lmforge quantize` and its formats: error bounds, packing, kernels vs references, checkpoints, bad input."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn
from train_helpers import trained_run

from lmforge.compress import formats
from lmforge.compress.modules import Int4Linear, Int8DynamicLinear, Int8Linear
from lmforge.compress.quantize import quant_targets, quantize_model
from lmforge.errors import UserError
from lmforge.models import build_model
from lmforge.models.config import ModelConfig


def torchao():
    """torchao (an independent reference), imported quietly (it warns about CUDA extensions it cannot load)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torchao.quantization as ao
        from torchao.quantization import quant_primitives
    return ao, quant_primitives


# ---- formats --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 33), (16, 256)])
def test_int8_rows_error_within_half_a_step(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 3
    w[0] = 0.0  # an all-zero row
    q, scales = formats.quantize_rows_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    err = (w - formats.dequantize_rows_int8(q, scales)).abs().amax(dim=1)
    assert bool((err <= scales / 2 * (1 + 1e-6)).all())
    assert float(err[0]) == 0.0


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_groups_error_within_half_a_step(group_size, symmetric):
    torch.manual_seed(1)
    w = torch.randn(24, 256) + (0.0 if symmetric else 0.7)  # off-centre groups for the zero point
    w[3, :group_size] = 0.0
    codes, scales, zeros = formats.quantize_groups(w, 4, group_size, symmetric)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and scales.dtype == torch.float16
    assert scales.shape == zeros.shape == (24, 256 // group_size)
    if symmetric:
        assert bool((zeros == 8).all())
    err = (w - formats.dequantize_groups(codes, scales, zeros)).abs().reshape(24, -1, group_size).amax(dim=-1)
    assert bool((err <= scales.float() / 2 * (1 + 1e-6)).all())
    assert float(err[3, 0]) == 0.0  # zero is exactly representable


def test_int4_codes_match_torchao_affine_quantization():
    """The same scales and zero points through torchao's quantize_affine give the same codes; its own
    choice of symmetric int4 scales (2 absmax / 15) agrees with ours up to the fp16 rounding."""
    ao, qp = torchao()
    torch.manual_seed(2)
    w = torch.randn(16, 128)
    for symmetric in (True, False):
        codes, scales, zeros = formats.quantize_groups(w, 4, 32, symmetric)
        theirs = qp.quantize_affine(w, (1, 32), scales.float(), zeros.int(), torch.uint8, 0, 15)
        assert torch.equal(theirs, codes)
        back = qp.dequantize_affine(codes, (1, 32), scales.float(), zeros.int(), torch.uint8, 0, 15)
        assert torch.allclose(back, formats.dequantize_groups(codes, scales, zeros), atol=1e-6)
    ref_scale, _ = qp.choose_qparams_affine(w, qp.MappingType.SYMMETRIC, (1, 32), torch.int8, -8, 7)
    _, scales, _ = formats.quantize_groups(w, 4, 32, True)
    assert torch.allclose(scales.float(), ref_scale.reshape(16, 4), rtol=1e-3)


def test_int8_rows_match_torchao_int8_weight_only():
    ao, _ = torchao()
    torch.manual_seed(3)
    linear = nn.Linear(64, 24)
    q, scales = formats.quantize_rows_int8(linear.weight)
    model = nn.Sequential(linear)
    ao.quantize_(model, ao.Int8WeightOnlyConfig())
    theirs = model[0].weight  # scale absmax/127.5 over -128..127: codes differ by at most one step
    assert torch.allclose(theirs.scale.flatten(), scales, rtol=1e-2)
    assert int((theirs.qdata.int() - q.int()).abs().max()) <= 1


def test_pack_int4_round_trips_exactly():
    torch.manual_seed(4)
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    codes[0, :16] = torch.arange(16)
    packed = formats.pack_int4(codes)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert int(packed[0, 0]) == 0x10 and int(packed[0, 1]) == 0x32  # even column low nibble
    assert torch.equal(formats.unpack_int4(packed), codes)
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(2, 128)
    assert torch.equal(formats.pack_int4(formats.unpack_int4(every_byte)), every_byte)
    with pytest.raises(ValueError):
        formats.pack_int4(torch.full((2, 4), 16))


# ---- modules and kernels --------------------------------------------------------------------------


def test_int4_linear_from_codes_and_kernel_match_the_dequantized_weight():
    torch.manual_seed(5)
    linear = nn.Linear(128, 48)
    codes, scales, zeros = formats.quantize_groups(linear.weight, 4, 32, False)
    m = Int4Linear.from_codes(codes, scales, zeros, 32, linear.bias, symmetric=False)
    assert torch.equal(m.codes(), codes)
    w = m.dequantized_weight()
    assert torch.equal(w, formats.dequantize_groups(codes, scales, zeros))
    x = torch.randn(3, 5, 128)
    ref = x @ w.t() + linear.bias.detach()
    y = m(x)  # the CPU int4 kernel (bf16)
    assert m.kernel and ("int4pack", x.device) in m.kernel_cache  # it was the kernel
    assert y.shape == (3, 5, 48) and y.dtype == torch.float32
    assert torch.allclose(y, ref, atol=0.05, rtol=0.02) and not torch.equal(y, ref)
    m.kernel = False
    assert torch.allclose(m(x), ref, atol=1e-5)
    odd = Int4Linear.from_linear(nn.Linear(128, 8), 32, True)  # 8 rows: the kernel refuses, dequantizing works
    assert torch.allclose(odd(x), x @ odd.dequantized_weight().t() + odd.bias, atol=1e-5) and not odd.kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_matches_the_dequantized_weight(dtype):
    torch.manual_seed(6)
    linear = nn.Linear(64, 40)
    m = Int8Linear.from_linear(linear)
    x = torch.randn(4, 64)
    ref = x @ m.dequantized_weight().t() + linear.bias.detach()
    y = m(x.to(dtype))  # aten._weight_int8pack_mm in bf16 (an fp32 input is rounded to bf16 for it)
    assert y.dtype == dtype and ("int8pack", torch.bfloat16) in m.kernel_cache
    assert torch.allclose(y.float(), ref, atol=3e-2, rtol=3e-2)
    m.kernel = False  # the dequantizing path: exact in fp32
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(m(x.to(dtype)).float(), ref, atol=tol, rtol=tol)
    assert (m.dequantized_weight() - linear.weight).abs().max() <= m.scales.max() / 2 + 1e-7


def test_int8_dynamic_matches_torchao_w8a8():
    """Per-token int8 activations x per-channel int8 weights: ours (fbgemm, and the float path) against
    torchao's Int8DynamicActivationInt8WeightConfig on the same layer."""
    ao, _ = torchao()
    torch.manual_seed(7)
    linear = nn.Linear(128, 64)
    x = torch.randn(6, 128) * torch.logspace(-2, 1, 6)[:, None]  # tokens of very different scales
    exact = linear(x).detach()
    mine = Int8DynamicLinear.from_linear(linear)
    y_kernel = mine(x)
    mine.kernel = False
    y_float = mine(x)
    model = nn.Sequential(nn.Linear(128, 64))
    model.load_state_dict({"0.weight": linear.weight.detach(), "0.bias": linear.bias.detach()})
    ao.quantize_(model, ao.Int8DynamicActivationInt8WeightConfig())
    theirs = model(x).detach()
    scale = exact.abs().amax(dim=1, keepdim=True)  # per token: the error follows each token's own scale
    for y in (y_kernel, y_float, theirs):
        assert float(((y - exact).abs() / scale).max()) < 0.05
    assert float(((y_float - theirs).abs() / scale).max()) < 0.02
    assert float(((y_kernel - y_float).abs() / scale).max()) < 0.05  # fbgemm: 7-bit activation codes
    mine.kernel = True
    one = mine(x[5:])  # a single token takes fbgemm without the per-token rescaling (the same thing)
    assert float(((one - exact[5:]).abs() / scale[5:]).max()) < 0.05


# ---- models ---------------------------------------------------------------------------------------


def tiny(**kw) -> nn.Module:
    torch.manual_seed(8)
    base = {"vocab_size": 96, "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32}
    return build_model(ModelConfig.from_dict({**base, **kw})).eval()


def logits(model, x):
    with torch.no_grad():
        return model(x)[0].float()


@pytest.mark.parametrize("method,tol", [("int8", 0.02), ("int8-dynamic", 0.05), ("int4", 0.3), ("bf16", 0.02),
                                        ("fp16", 0.01)])
def test_quantized_gpt_logits_close_to_fp32(method, tol):
    model = tiny()
    x = torch.randint(0, 96, (2, 16))
    ref = logits(model, x)
    quantize_model(model, method, group_size=32)
    err = float((logits(model, x) - ref).abs().max() / ref.abs().max())
    assert err < tol, (method, err)
    if method in ("bf16", "fp16"):
        assert {p.dtype for p in model.parameters()} == {getattr(torch, {"bf16": "bfloat16"}.get(method, "float16"))}
    else:  # every Linear but the (tied) output layer swapped
        assert quant_targets(model) == [] and type(model.lm_head) is nn.Linear


def test_which_linears_moe_bert_encdec():
    moe = quantize_model(tiny(moe={"num_experts": 2, "top_k": 1}), "int4", group_size=32)
    names = {n for n, m in moe.named_modules() if isinstance(m, Int4Linear)}
    assert "blocks.0.mlp.experts.1.down" in names and "blocks.1.attn.qkv" in names
    assert type(moe.blocks[0].mlp.router) is nn.Linear and type(moe.lm_head) is nn.Linear
    x = torch.randint(0, 96, (1, 8))
    assert torch.isfinite(logits(moe, x)).all()
    bert = quantize_model(tiny(arch="bert", norm_position="post", num_labels=3), "int8")
    assert isinstance(bert.mlm_dense, Int8Linear) and type(bert.classifier) is nn.Linear
    encdec = quantize_model(tiny(arch="encdec", pos_encoding="relative", decoder_start_token_id=0, n_decoder_layer=1),
                            "int8-dynamic")
    assert any(isinstance(m, Int8DynamicLinear) for m in encdec.modules())
    with pytest.raises(UserError, match="quantized already"):
        quantize_model(encdec, "int8")


def test_group_size_must_divide_the_width():
    model = tiny(n_embd=48, n_head=2)
    with pytest.raises(UserError, match="--group-size 32 does not divide blocks.0.attn.qkv's 48"):
        quantize_model(model, "int4", group_size=32)
    assert not any(isinstance(m, Int4Linear) for m in model.modules())  # checked before any swap
    with pytest.raises(UserError, match="not a quantization method"):
        quantize_model(model, "int3")


# ---- the command ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny GPT trained a few steps on a char token dir (its run records the token dir)."""
    return trained_run(tmp_path_factory.mktemp("quant"), "model.n_embd=64", "train.max_steps=30",
                       "train.eval_every=30")


def quantize(run, out, method, *args):
    from lmforge.cli import main

    return main(["quantize", "--ckpt", str(run), "--method", method, "--out", str(out), "--eval-tokens", "512",
                 *args])


def test_quantize_command_int4_round_trips_and_generates(run, tmp_path, capsys):
    from lmforge.infer.generate import generate_batch
    from lmforge.train.checkpoint import load_pretrained, read_weights

    out = tmp_path / "int4"
    assert quantize(run, out, "int4", "--group-size", "32", "--asymmetric") == 0
    assert "quantized" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "quant_config.json",
                                               "tokenizer.json", "summary.json"}
    config = json.loads((out / "quant_config.json").read_text())
    assert config["method"] == "int4" and config["bits"] == 4 and config["group_size"] == 32
    assert config["symmetric"] is False and "blocks.0.attn.qkv" in config["modules"]
    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    assert summary["stage"] == "quantize" and m["bytes"] == (out / "model.safetensors").stat().st_size
    assert m["ppl_before"] > 1 and m["ppl_after"] > 1 and "val" in m["heldout"]
    assert m["calib_seconds"] == 0.0 and m["bytes"] < m["bytes_before"]

    # what the command built in memory is what load_pretrained rebuilds from disk
    source, _ = load_pretrained(run)
    quantize_model(source, "int4", group_size=32, symmetric=False)
    model, tokenizer = load_pretrained(out)
    on_disk = read_weights(out)
    assert on_disk["blocks.0.attn.qkv.qweight"].dtype == torch.uint8
    for key, value in source.state_dict().items():
        if key in on_disk:
            assert torch.equal(on_disk[key], value), key
    assert torch.equal(model.blocks[1].mlp.down.codes(), source.blocks[1].mlp.down.codes())
    x = torch.tensor([tokenizer.encode("the king shall")])
    assert torch.equal(logits(model, x), logits(source, x))
    ids = generate_batch(model, [x[0].tolist()], 8, temperature=0.0)
    assert len(ids[0]) == 8


@pytest.mark.parametrize("method", ["bf16", "int8"])
def test_quantize_command_sizes_and_eval_file(run, tmp_path, method):
    from lmforge.eval import evaluate

    text = tmp_path / "heldout.txt"
    text.write_text("KING:\nthe king my lord shall speak of love.\n" * 20)
    out = tmp_path / method
    assert quantize(run, out, method, "--eval", str(text)) == 0
    m = json.loads((out / "summary.json").read_text())["metrics"]
    assert str(text) in m["heldout"]
    if method == "bf16":  # every tensor halves: the file is about half (the header is small)
        assert 0.49 < m["bytes"] / m["bytes_before"] < 0.52
        assert abs(m["ppl_after"] - m["ppl_before"]) / m["ppl_before"] < 0.01
    else:  # int8 Linears, fp32 embeddings and norms
        assert m["bytes"] < 0.6 * m["bytes_before"]
        assert abs(m["ppl_after"] - m["ppl_before"]) / m["ppl_before"] < 0.02
    result = evaluate(out, [run.parent / "tokens"], tmp_path / "eval", limit=4, progress=False)
    assert result["tasks"][0]["metrics"]["perplexity"] > 1


def test_quantize_command_bad_input(run, tmp_path, capsys):
    out = tmp_path / "q"
    assert quantize(run, out, "int4", "--group-size", "48") == 2
    assert quantize(run, out, "int5") == 2
    assert quantize(tmp_path / "missing", out, "int8") == 2
    err = capsys.readouterr().err
    assert "--group-size 48" in err and "int5" in err and "missing" in err
    assert not out.exists()
    assert quantize(run, out, "int8") == 0
    capsys.readouterr()
    assert quantize(out, tmp_path / "again", "int4") == 2
    assert quantize(run, out, "int4") == 2  # out exists
    err = capsys.readouterr().err
    assert "quantized already" in err and "--overwrite" in err
    assert not (tmp_path / "again").exists()
    assert json.loads((out / "quant_config.json").read_text())["method"] == "int8"  # left as it was


@pytest.mark.parametrize("arch,method", [("bert", "int8"), ("encdec", "int4")])
def test_quantize_command_other_architectures(tmp_path, tokenizer_file, arch, method):
    """BERT and encoder-decoder checkpoints quantize and load back (no perplexity: not decoder-only)."""
    from lmforge.train.checkpoint import load_pretrained, save_checkpoint, tied_aliases

    extra = {"bert": {"norm_position": "post"},
             "encdec": {"pos_encoding": "relative", "decoder_start_token_id": 0, "n_decoder_layer": 1}}[arch]
    model = tiny(arch=arch, vocab_size=320, **extra)
    ckpt = save_checkpoint(tmp_path / "ckpt", model.state_dict(), model.config.to_dict(), tokenizer_file, None,
                           drop=tied_aliases(model))
    assert quantize(ckpt, tmp_path / "q", method, "--group-size", "32") == 0
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert summary["metrics"]["ppl_before"] is None and "decoder-only" in summary["metrics"]["heldout"]
    loaded, _ = load_pretrained(tmp_path / "q")
    quantize_model(model, method, group_size=32)
    x = torch.randint(1, 20, (1, 12))
    kw = {"decoder_input_ids": x[:, :5]} if arch == "encdec" else {}
    with torch.no_grad():
        assert torch.equal(loaded(x, **kw)[0], model(x, **kw)[0])


@pytest.mark.parametrize("cls", [Int4Linear, Int8DynamicLinear])
def test_loading_new_tensors_drops_the_cached_kernel_weights(cls):
    torch.manual_seed(9)
    a, b = (cls.from_linear(nn.Linear(64, 32), 32, True) if cls is Int4Linear else cls.from_linear(nn.Linear(64, 32))
            for _ in range(2))
    x = torch.randn(4, 64)
    a(x)  # builds a's kernel weights
    a.load_state_dict(b.state_dict())
    assert torch.equal(a(x), b(x))


def test_check_not_quantized(tmp_path):
    from lmforge.compress.quantize import check_not_quantized

    check_not_quantized(tmp_path, "convert to-hf")  # a plain dir passes
    (tmp_path / "quant_config.json").write_text(json.dumps({"method": "int4", "modules": []}))
    with pytest.raises(UserError, match=r"quantized checkpoint \(int4.*convert to-hf needs full-precision"):
        check_not_quantized(tmp_path, "convert to-hf")


def test_stages_that_need_full_precision_refuse_a_quantized_checkpoint(run, tmp_path, capsys):
    """convert to-hf, --init-from and finetune --base name the quantized dir and exit 2 (not a tensor mismatch)."""
    from lmforge.cli import main
    from lmforge.posttrain.run import resolve_base
    from lmforge.train.init_from import init_checkpoint

    out = tmp_path / "q"
    assert quantize(run, out, "int8") == 0
    capsys.readouterr()
    assert main(["convert", "to-hf", str(out), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "quantized checkpoint (int8" in err and "convert to-hf" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists()
    with pytest.raises(UserError, match="--init-from"):
        init_checkpoint(out)
    with pytest.raises(UserError, match="--base"):
        resolve_base(out)
    assert init_checkpoint(run) is not None and resolve_base(run).is_dir()  # the float run is fine


def test_gptq_options_reach_the_command(run, tmp_path, capsys):
    out = tmp_path / "g"
    args = ["--group-size", "32", "--calib-samples", "4", "--act-order", "--damp", "0.05"]
    assert quantize(run, out, "gptq", *args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["act_order"] is True and summary["config"]["damp"] == 0.05
    assert quantize(run, tmp_path / "bad", "gptq", "--damp", "-1") == 2
    assert "--damp -1" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_quantize_command_quantize_head_writes_an_8bit_output_layer(run, tmp_path):
    """--quantize-head: the tied output layer becomes an 8-bit copy that load_pretrained rebuilds; logits stay
    within int8 round-off of the weight-only model's, and the file grows by about the copy."""
    from lmforge.compress.modules import Int8Linear
    from lmforge.train.checkpoint import load_pretrained

    plain, head = tmp_path / "int8", tmp_path / "int8-head"
    assert quantize(run, plain, "int8") == 0 and quantize(run, head, "int8", "--quantize-head") == 0
    assert json.loads((head / "quant_config.json").read_text())["lm_head"] == "int8"
    assert "lm_head" not in json.loads((plain / "quant_config.json").read_text())
    assert json.loads((head / "summary.json").read_text())["config"]["quantize_head"] is True
    a, tokenizer = load_pretrained(plain)
    b, _ = load_pretrained(head)
    assert isinstance(b.lm_head, Int8Linear) and not isinstance(a.lm_head, Int8Linear)
    vocab, width = a.lm_head.weight.shape
    grown = (head / "model.safetensors").stat().st_size - (plain / "model.safetensors").stat().st_size
    assert vocab * width <= grown <= vocab * width + 16 * vocab + 4096  # int8 codes + per-row scales (+ header)
    x = torch.tensor([tokenizer.encode("the king shall")])
    assert (logits(a, x) - logits(b, x)).abs().max() < 0.1
