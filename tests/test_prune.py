"""Tests for `lmforge prune` (lmforge.compress.prune, importance, structural, masks, recover).

References: head and neuron importance against central finite differences of the loss with a head's
(unit's) columns of the output (down) projection scaled — the gate, written without the hooks; a
structurally pruned model against the same model with those heads/units zeroed, and against
transformers' GPT-2 after its own `prune_heads` on the same weights; parameter counts against hand
arithmetic; 2:4 and magnitude masks counted; masks checked after the recovery fine-tune.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from train_helpers import perturbed_checkpoint, trained_run

from lmforge.compress.importance import importance, normalized
from lmforge.compress.masks import keep_zeros, magnitude_mask, mask_model, two_four_mask
from lmforge.compress.structural import prune_heads, prune_neurons, select_lowest
from lmforge.errors import UserError
from lmforge.models import ModelConfig, build_model

GPT2_STYLE = dict(pos_encoding="learned", norm="layernorm", mlp="gelu_tanh", bias=True, tie_embeddings=True)
LLAMA_STYLE = dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)


def tiny(style=GPT2_STYLE, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    config = ModelConfig(**{**dict(vocab_size=48, n_layer=2, n_head=4, n_embd=32, block_size=16), **style, **kw})
    model = build_model(config).to(dtype).eval()
    with torch.no_grad():  # off the init, so every head and unit matters differently
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def windows(n=3, length=12, vocab=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, length), generator=g) for _ in range(n)]


def loss64(model, ids):
    logits, _ = model(ids[:, :-1])
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


def scaled_columns_grad(model, ids, linear, cols, eps=1e-5):
    """dL/dξ by central differences, ξ scaling `linear`'s input columns `cols` (the gate, without hooks)."""
    w = linear.weight
    out = []
    for sign in (1, -1):
        with torch.no_grad():
            w[:, cols] *= 1 + sign * eps
        out.append(loss64(model, ids))
        with torch.no_grad():
            w[:, cols] /= 1 + sign * eps
    return (out[0] - out[1]) / (2 * eps)


@pytest.mark.parametrize("style", [GPT2_STYLE, dict(LLAMA_STYLE, n_kv_head=2)])
def test_head_importance_equals_finite_differences(style):
    model = tiny(style, torch.float64)
    calib = windows()
    got = importance(model, calib, "heads", batch_size=1, progress=False)
    d = 32 // 4
    for layer, block in enumerate(model.blocks):
        want = [sum(abs(scaled_columns_grad(model, ids, block.attn.out, list(range(h * d, (h + 1) * d))))
                    for ids in calib) / len(calib) for h in range(4)]
        torch.testing.assert_close(got[layer].double(), torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=1e-9)
    # per-layer L2 normalization (Michel et al.)
    for s in normalized(got):
        assert abs(float(s.norm()) - 1) < 1e-6


def test_neuron_importance_equals_finite_differences():
    model = tiny(LLAMA_STYLE, torch.float64, mlp_hidden=12)
    calib = windows(2)
    got = importance(model, calib, "neurons", batch_size=2, progress=False)  # one batch of both windows
    batch = torch.cat(calib)
    for layer, block in enumerate(model.blocks):
        want = [abs(scaled_columns_grad(model, batch, block.mlp.down, [j])) for j in range(12)]
        torch.testing.assert_close(got[layer].double(), torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=1e-9)


def test_select_lowest_is_global_and_keeps_a_head_per_layer():
    scores = [torch.tensor([0.1, 0.2, 0.95, 0.9]), torch.tensor([0.15, 0.8, 0.7, 0.6])]
    assert select_lowest(scores, 3) == {0: [0, 1], 1: [0]}
    # groups of 2 (GQA): group sums 0.3, 1.85 | 0.95, 1.3
    assert select_lowest(scores, 2, group=2) == {0: [0, 1], 1: [0, 1]}
    lopsided = [torch.tensor([0.01, 0.02]), torch.tensor([0.9, 0.8])]
    assert select_lowest(lopsided, 2) == {0: [0], 1: [1]}  # layer 0's last head stays
    with pytest.raises(UserError, match="at most 2 can go"):
        select_lowest(lopsided, 3)


def zero_columns(model, kind, remove):
    """The unpruned model with the removed heads' (units') input columns of out (down) set to zero."""
    d = model.config.head_dim
    with torch.no_grad():
        for layer, units in remove.items():
            block = model.blocks[layer]
            linear, width = (block.attn.out, d) if kind == "heads" else (block.mlp.down, 1)
            for u in units:
                linear.weight[:, u * width:(u + 1) * width] = 0
    return model


@pytest.mark.parametrize("style,kw,remove", [
    (GPT2_STYLE, {}, {0: [1, 2], 1: [3]}),
    (LLAMA_STYLE, {"n_kv_head": 2}, {1: [2, 3]}),  # one whole kv group
])
def test_pruned_heads_equal_zeroed_heads_and_count_exactly(style, kw, remove):
    import copy

    model = tiny(style, **kw)
    reference = zero_columns(copy.deepcopy(model), "heads", remove)
    before = sum(p.numel() for p in model.parameters())
    prune_heads(model, remove)
    x = torch.randint(0, 48, (2, 10))
    torch.testing.assert_close(model(x)[0], reference(x)[0], rtol=1e-5, atol=1e-5)
    d, hd, removed = 32, 8, sum(len(v) for v in remove.values())
    if style is GPT2_STYLE:  # per head: q, k, v rows (+ biases) and out columns
        assert before - sum(p.numel() for p in model.parameters()) == removed * (4 * hd * d + 3 * hd)
    else:  # per kv group of 2 query heads: 2 q rows + 1 k + 1 v rows, 2 out columns, no biases
        assert before - sum(p.numel() for p in model.parameters()) == (removed // 2) * (6 * hd * d)
    assert model.config.layer_heads == [4 - len(remove.get(i, [])) for i in range(2)]
    # the KV cache has per-layer heads: cached decoding equals the full forward
    cache = model.new_kv_cache(2)
    steps = torch.cat([model(x[:, :6], kv_cache=cache)[0], model(x[:, 6:], kv_cache=cache)[0]], dim=1)
    torch.testing.assert_close(steps, model(x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", [GPT2_STYLE, LLAMA_STYLE])
def test_pruned_neurons_equal_zeroed_neurons_and_count_exactly(style):
    import copy

    model = tiny(style, mlp_hidden=16)
    remove = {0: [0, 5, 7], 1: [15]}
    reference = zero_columns(copy.deepcopy(model), "neurons", remove)
    before = sum(p.numel() for p in model.parameters())
    prune_neurons(model, remove)
    x = torch.randint(0, 48, (2, 10))
    torch.testing.assert_close(model(x)[0], reference(x)[0], rtol=1e-5, atol=1e-5)
    per_unit = 2 * 32 + 1 if style is GPT2_STYLE else 3 * 32  # up row (+ bias), down column; swiglu: + gate row
    assert before - sum(p.numel() for p in model.parameters()) == 4 * per_unit
    assert model.config.layer_mlp_hidden == [13, 15]
    from lmforge.plan.params import count_params

    assert count_params(model.config)["total"] == sum(p.numel() for p in model.parameters())


def test_bad_removals_are_one_line_errors():
    model = tiny(LLAMA_STYLE, n_kv_head=2)
    with pytest.raises(UserError, match="layer 0 has 4 heads; removing all"):
        prune_heads(model, {0: [0, 1, 2, 3]})
    with pytest.raises(UserError, match="whole kv groups"):
        prune_heads(model, {0: [1, 2]})
    with pytest.raises(UserError, match="cannot remove heads 4"):
        prune_heads(model, {1: [4]})
    with pytest.raises(UserError, match="layer_heads"):
        ModelConfig(n_layer=2, n_head=4, n_kv_head=2, layer_heads=[3, 4])
    with pytest.raises(UserError, match="implemented for arch gpt"):
        ModelConfig(arch="bert", n_layer=2, n_head=4, layer_mlp_hidden=[8, 8])
    # what the exporters that cannot express per-layer widths call (one line naming the key)
    prune_heads(model, {0: [0, 1]})
    with pytest.raises(UserError, match="model.layer_heads: .* convert to-gguf cannot express per-layer widths"):
        model.config.check_unpruned("convert to-gguf")
    ModelConfig(n_layer=2, n_head=4).check_unpruned("convert to-gguf")  # unpruned: nothing to say


def test_pruned_gpt2_equals_transformers_gpt2_with_those_heads_and_units_cut(tmp_path, tokenizer_file):
    """transformers' own GPT-2 forward is the independent reference. (transformers 5 dropped
    `prune_heads` and `head_mask`, so the removed heads and MLP units are cut out of HF's model by
    zeroing their input rows of its Conv1D output projections, in HF's own weight layout.)"""
    transformers = pytest.importorskip("transformers")
    from lmforge.export.hf import to_hf
    from lmforge.train.checkpoint import load_pretrained

    config = dict(vocab_size=320, n_layer=2, n_head=4, n_embd=32, block_size=16, **GPT2_STYLE)
    perturbed_checkpoint(tmp_path / "ckpt", config, tokenizer_file)
    to_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    heads, units = {0: [0, 3], 1: [2]}, {0: [5, 6, 100], 1: [127]}
    with torch.no_grad():
        for layer, hs in heads.items():
            for h in hs:  # Conv1D weights are (in, out): a head's 8 inputs of c_proj are rows
                hf.transformer.h[layer].attn.c_proj.weight[h * 8:(h + 1) * 8] = 0
        for layer, us in units.items():
            hf.transformer.h[layer].mlp.c_proj.weight[us] = 0
    ours, _ = load_pretrained(tmp_path / "ckpt")
    prune_neurons(prune_heads(ours, heads), units)
    x = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(x).logits, rtol=1e-4, atol=1e-4)


def test_two_four_and_magnitude_masks():
    w = torch.randn(6, 16)
    keep = two_four_mask(w)
    assert (keep.view(6, 4, 4).sum(-1) == 2).all()
    kept = (w.abs().view(6, 4, 4) * keep.view(6, 4, 4)).sum(-1)  # the two largest |w| of each group
    torch.testing.assert_close(kept, w.abs().view(6, 4, 4).topk(2, -1).values.sum(-1))
    with pytest.raises(UserError, match="not a multiple of 4"):
        two_four_mask(torch.randn(2, 6))
    keep = magnitude_mask(w, 0.3)
    assert int((~keep).sum()) == round(0.3 * 96)
    assert w.abs()[~keep].max() <= w.abs()[keep].min()
    model = tiny(LLAMA_STYLE)
    masks = mask_model(model, "2:4")
    assert set(masks) == {f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.out", "mlp.gate",
                                                                         "mlp.up", "mlp.down")}
    for name, keep in masks.items():
        w = model.get_submodule(name).weight
        assert ((w == 0) == ~keep).all() and (w.view(w.shape[0], -1, 4) == 0).sum(-1).eq(2).all()


def test_keep_zeros_keeps_masked_weights_zero_under_adamw():
    model = tiny(LLAMA_STYLE)
    mask_model(model, "magnitude", 0.5)
    zeros = {n: p == 0 for n, p in model.named_parameters()}
    model = keep_zeros(model).train()
    assert set(model.state_dict()) == set(tiny(LLAMA_STYLE).state_dict())  # a transform keeps the layout
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        x = torch.randint(0, 48, (2, 10))
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if "blocks" in n and n.endswith("weight") and p.dim() == 2:
            assert (p[zeros[n]] == 0).all() and (p[~zeros[n]] != 0).all(), n


# ---- the command ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny GPT (4 heads, so some can go) trained a few steps on a char token dir."""
    return trained_run(tmp_path_factory.mktemp("prune"), "model.n_head=4", "train.max_steps=6", "train.eval_every=6")


def prune(run, out, method, *args):
    from lmforge.cli import main

    return main(["prune", "--ckpt", str(run), "--method", method, "--out", str(out), "--eval-tokens", "256",
                 "--calib-samples", "4", *args])


def test_prune_heads_command_loads_and_generates(run, tmp_path, capsys):
    from lmforge.infer.generate import generate_batch
    from lmforge.train.checkpoint import load_pretrained

    out = tmp_path / "heads"
    assert prune(run, out, "heads", "--sparsity", "0.25") == 0
    assert "pruned 25.0% of the attention heads" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    assert summary["stage"] == "prune" and m["sparsity"] == 0.25 and sum(m["layer_heads"]) == 6
    assert m["params_before"] - m["params"] == 2 * (4 * 8 * 32 + 3 * 8)  # 2 heads of width 8, with biases
    assert m["bytes"] == (out / "model.safetensors").stat().st_size and m["ppl_after"] > 1
    model, tokenizer = load_pretrained(out)
    assert model.config.layer_heads == m["layer_heads"] and sum(p.numel() for p in model.parameters()) == m["params"]
    ids = generate_batch(model, [tokenizer.encode("the king")], 6, temperature=0.0)
    assert len(ids[0]) == 6


def test_masks_survive_the_recovery_fine_tune(run, tmp_path):
    from lmforge.compress.prune import prune_checkpoint
    from lmforge.train.checkpoint import read_weights, resolve_checkpoint

    out = tmp_path / "mag"
    summary = prune_checkpoint(run, "2:4", out, recover_steps=3, eval_tokens=256, progress=False)
    m = summary["metrics"]
    assert m["sparsity"] == 0.5 and m["recover_steps"] == 3 and m["ppl_recovered"] > 1
    source, pruned = read_weights(resolve_checkpoint(run)), read_weights(out)
    for name in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.down.weight"):
        keep = two_four_mask(source[name])
        assert (pruned[name][~keep] == 0).all()  # the masked weights are still zero
        assert not torch.equal(pruned[name][keep], source[name][keep])  # and the others were trained
    assert not list(tmp_path.glob(".mag.recover*"))  # the recovery's work dir is gone


def test_prune_command_bad_input(run, tmp_path, capsys):
    from lmforge.compress.run import quantize_checkpoint

    out = tmp_path / "p"
    assert prune(run, out, "heads", "--sparsity", "1.0") == 2
    assert prune(run, out, "2:4", "--sparsity", "0.5") == 2
    assert prune(run, out, "rows", "--sparsity", "0.5") == 2
    assert prune(run, out, "neurons") == 2
    assert prune(run, out, "heads", "--sparsity", "0.9") == 2  # 7 of 8 heads: a layer would have none
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("error:") for line in err), err
    assert "[0, 1)" in err[0] and "2:4" in err[1] and "rows" in err[2] and "--sparsity F" in err[3]
    assert "at most 6 can go" in err[4]
    quantize_checkpoint(run, "fp16", tmp_path / "fp16", eval_tokens=64, progress=False)
    assert prune(tmp_path / "fp16", out, "magnitude", "--sparsity", "0.5") == 2
    assert "quantized checkpoint" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".p*"))


@pytest.fixture(scope="module")
def pruned_for_export(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "neurons"
    assert prune(run, out, "neurons", "--sparsity", "0.25") == 0
    return out


@pytest.mark.parametrize("verb,suffix", [("to-hf", ""), ("to-gguf", ".gguf"), ("to-onnx", "")])
def test_exporters_refuse_a_structurally_pruned_checkpoint_in_one_line(pruned_for_export, tmp_path, capsys, verb,
                                                                       suffix):
    from lmforge.cli import main

    out = tmp_path / f"out{suffix}"
    assert main(["convert", verb, str(pruned_for_export), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "structurally pruned" in err and f"convert {verb}" in err
    assert not out.exists()
