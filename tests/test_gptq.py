"""GPTQ (lmforge.compress.gptq) and its calibration data (lmforge.compress.calib).

References: round-to-nearest (`quantize_groups`) where GPTQ must reduce to it (H = identity); the
reference implementation's `fasterquant` (IST-DASLab/gptq, gptq.py, transcribed below with the
format's own grid fit) on a fixed layer; the layer's output error ||X Wᵀ - X Ŵᵀ|| against RTN's on
the same calibration data; invariants (lazy batch updates change nothing)."""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from lmforge.compress.calib import calibration_batches, capture_block_inputs
from lmforge.compress.formats import dequantize_groups, group_params, quantize_groups
from lmforge.compress.gptq import gptq_model, gptq_quantize_layer
from lmforge.compress.modules import Int4Linear
from lmforge.compress.quantize import quant_targets, quantize_model
from lmforge.errors import UserError
from lmforge.models import GPT, ModelConfig, MoEConfig

LLAMA = dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)


def correlated_inputs(n: int, d: int, seed: int = 0, loud: int = 8, rows_seed: int | None = None) -> Tensor:
    """Rows with correlated channels and a few loud ones (as a transformer's activations have);
    `rows_seed`: other rows from the same distribution."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d) + 3 * torch.randn(d, d, generator=g) / d**0.5
    if rows_seed is not None:
        g = torch.Generator().manual_seed(rows_seed)
    x = torch.randn(n, d, generator=g) @ mix
    x[:, :loud] *= 10
    return x


def hessian(x: Tensor) -> Tensor:
    return 2 * x.T @ x / x.shape[0]


def output_error(x: Tensor, w: Tensor, codes: Tensor, scales: Tensor, zeros: Tensor) -> float:
    return float(torch.linalg.norm(x @ w.T - x @ dequantize_groups(codes, scales, zeros).T))


# ---- one layer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_is_round_to_nearest(symmetric, group_size, act_order):
    # H = I: no column's error correlates with another's, so no update moves a weight; GPTQ is RTN.
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    codes, scales, zeros = gptq_quantize_layer(w, torch.eye(128), 4, group_size, symmetric, act_order=act_order)
    rtn = quantize_groups(w, 4, 128 if group_size == -1 else group_size, symmetric)
    assert torch.equal(codes, rtn[0]) and torch.equal(scales, rtn[1]) and torch.equal(zeros, rtn[2])


@pytest.mark.parametrize("symmetric", [True, False])
def test_lowers_output_error_below_rtn(symmetric):
    x = correlated_inputs(2048, 128)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    rtn = output_error(x, w, *quantize_groups(w, 4, 32, symmetric))
    gptq = output_error(x, w, *gptq_quantize_layer(w, hessian(x), 4, 32, symmetric))
    assert gptq < 0.7 * rtn, (gptq, rtn)
    # held-out rows from the same distribution: the gain is not fitted to the calibration rows
    x_new = correlated_inputs(2048, 128, rows_seed=5)
    assert output_error(x_new, w, *gptq_quantize_layer(w, hessian(x), 4, 32, symmetric)) < 0.7 * output_error(
        x_new, w, *quantize_groups(w, 4, 32, symmetric))


def test_act_order_helps_when_the_loud_inputs_come_last():
    # the high-energy inputs sit in the last columns: in natural order their columns are rounded when
    # no free column is left to absorb the error; act-order takes them first
    x = correlated_inputs(4096, 128, seed=3).flip(1)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    plain = output_error(x, w, *gptq_quantize_layer(w, hessian(x), 4, -1, True))
    ordered = output_error(x, w, *gptq_quantize_layer(w, hessian(x), 4, -1, True, act_order=True))
    grouped = output_error(x, w, *gptq_quantize_layer(w, hessian(x), 4, 32, True, act_order=True))
    assert ordered < plain
    assert grouped < output_error(x, w, *gptq_quantize_layer(w, hessian(x), 4, 32, True))


def test_lazy_batch_updates_change_nothing():
    # block_size 1 applies every update at once; larger blocks defer them (also across a group start)
    x = correlated_inputs(1024, 128, seed=6)
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(7))
    for group in (32, 64):
        one = gptq_quantize_layer(w, hessian(x), 4, group, False, block_size=1)
        for block in (16, 48, 128):
            other = gptq_quantize_layer(w, hessian(x), 4, group, False, block_size=block)
            assert torch.equal(one[0], other[0]) and torch.equal(one[1], other[1]), (group, block)


def reference_fasterquant(W: Tensor, H: Tensor, groupsize: int, sym: bool, blocksize: int = 128,
                          percdamp: float = 0.01, actorder: bool = False, static_groups: bool = False) -> Tensor:
    """IST-DASLab/gptq `GPTQ.fasterquant` (gptq.py), transcribed; its `Quantizer.find_params` is the
    format's fit (`group_params`: the same formulas, the scale rounded up to fp16 as stored).
    Returns the dequantized weight Q."""
    W, H = W.clone().float(), H.clone()
    columns = W.shape[1]
    maxq = 15

    def find_params(x):
        return group_params(x, 4, x.shape[1], sym)

    def quantize(x, scale, zero):
        q = torch.clamp(torch.round(x / scale.float()) + zero, 0, maxq)
        return scale.float() * (q - zero)

    scale, zero = find_params(W)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups:
        groups = [find_params(W[:, i:i + groupsize]) for i in range(0, columns, groupsize)]
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if groupsize != -1:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        scale, zero = find_params(W[:, (i1 + i):(i1 + i + groupsize)])
                else:
                    idx = i1 + i
                    if actorder:
                        idx = perm[idx]
                    scale, zero = groups[idx // groupsize]
            q = quantize(w.unsqueeze(1), scale, zero).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if actorder:
        Q = Q[:, invperm]
    return Q


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize(("groupsize", "actorder"), [(-1, False), (-1, True), (128, False), (64, True)])
def test_matches_the_reference_implementation(sym, groupsize, actorder):
    # groups of 128 with blocks of 128: a group starts with its block, where the reference fits it on
    # up-to-date weights (as lmforge always does); act-order with groups is the reference's static_groups
    x = correlated_inputs(2048, 256, seed=8)
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(9)) * 0.05
    ref = reference_fasterquant(w, hessian(x), groupsize, sym, actorder=actorder, static_groups=actorder)
    codes, scales, zeros = gptq_quantize_layer(w, hessian(x), 4, groupsize, sym, act_order=actorder)
    ours = dequantize_groups(codes, scales, zeros)
    differ = (ours != ref).float().mean().item()
    assert differ < 1e-3, differ  # a code may flip where float round-off meets a rounding tie
    assert torch.allclose(ours, ref, atol=float(scales.float().max()) + 1e-6)


def test_dead_inputs_keep_their_weights_and_an_indefinite_hessian_falls_back():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(10))
    x = correlated_inputs(512, 64, seed=11)
    x[:, 5] = 0  # an input channel never active in calibration: its H row/column is 0
    codes, scales, zeros = gptq_quantize_layer(w, hessian(x), 4, 32, True)
    assert dequantize_groups(codes, scales, zeros)[:, 5].abs().sum() > 0
    bad = -torch.eye(64)  # not positive definite at any dampening: round to nearest
    assert torch.equal(gptq_quantize_layer(w, bad, 4, 32, True)[0], quantize_groups(w, 4, 32, True)[0])


def test_group_size_must_divide_the_width():
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize_layer(torch.randn(4, 48), torch.eye(48), 4, 32, True)


# ---- a model -----------------------------------------------------------------------------------


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=40, n_layer=2, n_head=4, n_embd=64, block_size=32, **overrides)).eval()


def no_kernel(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, Int4Linear):
            m.kernel = False  # fp32 dequantized matmuls: compare the codes, not the kernel's bf16 round-off
    return model


@pytest.mark.parametrize("overrides", [{}, LLAMA, {**LLAMA, "moe": MoEConfig(num_experts=4, top_k=2)}],
                         ids=["gpt2", "llama", "moe"])
def test_gptq_model_swaps_every_target_and_beats_rtn(overrides):
    model = tiny_gpt(**overrides)
    calib = [torch.randint(0, 40, (1, 32), generator=torch.Generator().manual_seed(s)) for s in range(12)]
    test = torch.randint(0, 40, (4, 32), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        ref = model(test)[0]
    names = [n for n, _ in quant_targets(model)]
    gptq = gptq_model(copy.deepcopy(model), calib, group_size=32, progress=False)
    assert [n for n, m in gptq.named_modules() if isinstance(m, Int4Linear)] == names
    assert isinstance(gptq.lm_head, nn.Linear) and (not overrides.get("moe") or isinstance(
        gptq.blocks[0].mlp.router, nn.Linear))
    rtn = quantize_model(copy.deepcopy(model), "int4", group_size=32)
    with torch.no_grad():
        err = {k: float(((no_kernel(m)(test)[0] - ref) ** 2).mean()) for k, m in (("gptq", gptq), ("rtn", rtn))}
    assert err["gptq"] < err["rtn"], err


def test_gptq_model_propagates_through_the_quantized_blocks():
    # block 1's Hessian comes from block 0's *quantized* outputs: rebuilt here by hand from the
    # quantized block 0, it gives block 1's codes exactly
    model = tiny_gpt(seed=3)
    calib = [torch.randint(0, 40, (1, 32), generator=torch.Generator().manual_seed(s)) for s in range(6)]
    full = no_kernel(gptq_model(copy.deepcopy(model), calib, group_size=32, progress=False, sequential=False))
    stack = capture_block_inputs(model, calib)[0]
    sums = 0
    with torch.no_grad():
        for s, x in enumerate(stack.inputs):
            rows = model.blocks[1].attn_norm(full.blocks[0](x, **stack.kwargs[0][s])).reshape(-1, 64)
            sums = sums + rows.T @ rows
    n = sum(x.shape[1] for x in stack.inputs)
    codes = gptq_quantize_layer(model.blocks[1].attn.qkv.weight, 2.0 * sums / n, 4, 32, True)[0]
    assert torch.equal(codes, full.blocks[1].attn.qkv.codes())
    float_codes = gptq_model(copy.deepcopy(model), calib, group_size=32, progress=False).blocks[0].attn.qkv.codes()
    assert torch.equal(float_codes, full.blocks[0].attn.qkv.codes())  # block 0 sees the same inputs either way


def test_an_expert_no_token_reaches_is_rounded_to_nearest(caplog):
    model = tiny_gpt(seed=4, **LLAMA, moe=MoEConfig(num_experts=4, top_k=1))
    with torch.no_grad():
        router = model.blocks[0].mlp.router.weight  # logits (l, -l, 0, 0): experts 2 and 3 never win
        router[1] = -router[0]
        router[2:] = 0
    calib = [torch.randint(0, 40, (1, 32), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    with caplog.at_level(logging.WARNING, logger="lmforge.compress.gptq"):
        out = gptq_model(copy.deepcopy(model), calib, group_size=32, progress=False)
    assert "blocks.0.mlp.experts.2" in caplog.text and "blocks.0.mlp.experts.3" in caplog.text
    assert "blocks.0.mlp.experts.0" not in caplog.text
    expert = model.blocks[0].mlp.experts[3]
    assert torch.equal(out.blocks[0].mlp.experts[3].up.codes(), quantize_groups(expert.up.weight, 4, 32, True)[0])


# ---- calibration data --------------------------------------------------------------------------


def train_tiny_llama(tokens, steps: int) -> GPT:
    """A tiny Llama-style GPT trained `steps` steps on the train split of `tokens`."""
    from lmforge.tokenizer.shards import load_split, read_meta

    train = np.concatenate(load_split(tokens, "train")).astype(np.int64)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=read_meta(tokens)["vocab_size"], n_layer=2, n_head=4, n_embd=64,
                            block_size=32, **LLAMA))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(train) - 33, (8,), generator=g).tolist()
        x = torch.stack([torch.from_numpy(train[i:i + 33]) for i in starts])
        loss = model(x[:, :-1], x[:, 1:])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def save_run(tmp, tokens, model: GPT):
    """A run dir whose config.yaml names `tokens`, with a checkpoint of `model`; returns the checkpoint."""
    from lmforge.train.checkpoint import save_checkpoint

    run = tmp / "run"
    ckpt = save_checkpoint(run / "checkpoints" / "step_000080", model.state_dict(), model.config.to_dict(),
                           tokens / "tokenizer.json", None)
    (run / "config.yaml").write_text(f"data:\n  tokens: {tokens}\n")
    return ckpt


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A token dir and a run dir (config.yaml naming it) with a checkpoint of an untrained tiny GPT."""
    from train_helpers import make_token_dir

    tmp = tmp_path_factory.mktemp("calib")
    tokens = make_token_dir(tmp)
    model = train_tiny_llama(tokens, 0)
    return tokens, save_run(tmp, tokens, model), model


def windows_of(stream: np.ndarray, batches: list[Tensor]) -> bool:
    text = stream.tobytes()
    return all(np.asarray(b[0], dtype=stream.dtype).tobytes() in text for b in batches)


def test_calibration_defaults_to_the_train_split_the_run_trained_on(trained_run):
    from lmforge.tokenizer.shards import load_split

    tokens, ckpt, _ = trained_run
    batches = calibration_batches(ckpt, None, 5, 16)
    assert [tuple(b.shape) for b in batches] == [(1, 16)] * 5 and batches[0].dtype == torch.int64
    stream = np.concatenate(load_split(tokens, "train"))
    assert windows_of(stream, batches)
    again = calibration_batches(ckpt.parent.parent, str(tokens), 5, 16)  # a run dir; the token dir named
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = calibration_batches(ckpt, None, 5, 16, seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(batches, other))
    assert calibration_batches(ckpt, None, 2, 1000)[0].shape == (1, 32)  # no longer than the context


def test_calibration_from_text_uses_the_checkpoints_tokenizer(trained_run, tmp_path):
    from lmforge.tokenizer import Tokenizer

    _, ckpt, _ = trained_run
    (tmp_path / "a.txt").write_text("To be, or not to be, that is the question. " * 5)
    (tmp_path / "b.md").write_text("Shall I compare thee to a summer's day? " * 5)
    tok = Tokenizer.load(ckpt / "tokenizer.json")
    stream = np.asarray(tok.encode((tmp_path / "a.txt").read_text(), add_eos=True)
                        + tok.encode((tmp_path / "b.md").read_text(), add_eos=True), dtype=np.int64)
    batches = calibration_batches(ckpt, str(tmp_path), 4, 24)
    assert len(batches) == 4 and windows_of(stream, batches)
    assert windows_of(stream[:len(stream) // 2 + 5], calibration_batches(ckpt, str(tmp_path / "a.txt"), 3, 24))


def test_calibration_refuses_a_dir_without_text_and_a_run_without_data(trained_run, tmp_path):
    _, ckpt, _ = trained_run
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(UserError, match="no text") as e:
        calibration_batches(ckpt, str(tmp_path / "empty"), 4, 16)
    assert "\n" not in str(e.value)
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "a.bin").write_bytes(b"\0\1")
    with pytest.raises(UserError, match="no .* files under"):
        calibration_batches(ckpt, str(tmp_path / "binary"), 4, 16)
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        (lonely / name).write_bytes((ckpt / name).read_bytes())
    with pytest.raises(UserError, match="pass --calib DIR"):
        calibration_batches(lonely, None, 4, 16)


# ---- end to end --------------------------------------------------------------------------------


@pytest.mark.slow
def test_gptq_and_awq_perplexity_below_rtn_on_a_trained_tiny_gpt(trained_run, tmp_path):
    # int4 in groups of 32: GPTQ (symmetric, its default) and AWQ (asymmetric, its default) each
    # against round-to-nearest with the same grid, on the val split, calibrated on the train split
    from lmforge.tokenizer.shards import load_split

    tokens = trained_run[0]
    model = train_tiny_llama(tokens, 80)
    ckpt = save_run(tmp_path, tokens, model)
    val = torch.from_numpy(np.concatenate(load_split(tokens, "val")).astype(np.int64))
    n = (len(val) - 1) // 32 * 32
    x, y = val[:n].view(-1, 32), val[1:n + 1].view(-1, 32)
    calib = calibration_batches(ckpt, None, 16, 32)

    def ppl(m):
        with torch.no_grad():
            return math.exp(float(no_kernel(m)(x, y)[1]))

    for method, symmetric in (("gptq", True), ("awq", False)):
        rtn = ppl(quantize_model(copy.deepcopy(model), "int4", group_size=32, symmetric=symmetric))
        ours = ppl(quantize_model(copy.deepcopy(model), method, group_size=32, symmetric=symmetric, calib=calib,
                                  progress=False))
        assert ours < rtn, (method, ours, rtn, ppl(model))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_lmforge_quantize_writes_a_checkpoint_that_loads_back(trained_run, tmp_path, method):
    # the command's path: calibration from the run's own train split, then load_pretrained
    from lmforge.compress.run import quantize_checkpoint
    from lmforge.train.checkpoint import load_pretrained

    _, ckpt, model = trained_run
    summary = quantize_checkpoint(ckpt, method, tmp_path / "q", group_size=32, calib_samples=4, progress=False)
    assert summary["metrics"]["calib_seconds"] > 0 and summary["metrics"]["ppl_after"] > 1
    loaded, _ = load_pretrained(tmp_path / "q")
    calib = calibration_batches(ckpt, None, 4, 32)
    here = quantize_model(copy.deepcopy(model), method, group_size=32, symmetric=method == "gptq", calib=calib,
                          progress=False)
    ours = {n: m.qweight for n, m in here.named_modules() if isinstance(m, Int4Linear)}
    theirs = {n: m.qweight for n, m in loaded.named_modules() if isinstance(m, Int4Linear)}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)
