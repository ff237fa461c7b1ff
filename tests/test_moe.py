"""Mixture-of-Experts: routing, auxiliary losses, capacity, the MoE GPT against HF Mixtral, training.

Independent references: hand computations in plain Python floats, a per-token loop over the
experts (the dispatch's definition, without sorting or batching), transformers' Mixtral
(`MixtralForCausalLM` from a random-weight `MixtralConfig`, no download) and its
`load_balancing_loss_func`.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from train_helpers import make_token_dir, tiny_config

from lmforge.cli import main
from lmforge.errors import Interrupted, UserError
from lmforge.export.hf import from_hf, to_hf
from lmforge.models import GPT, ModelConfig
from lmforge.models.moe import MoE, expert_capacity, load_balancing_loss, route, router_z_loss
from lmforge.train import checkpoint as ckpt
from lmforge.train.loop import pretrain

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 320  # >= the test tokenizer (byte-level char: 276 tokens)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def moe_config(**kw) -> ModelConfig:
    """A tiny Mixtral-like config: RoPE, RMSNorm, SwiGLU experts, GQA, no biases."""
    cfg = dict(vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=32, bias=False,
               pos_encoding="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False,
               moe=dict(num_experts=4, top_k=2))
    cfg.update(kw)
    return ModelConfig(**cfg)


def softmax(xs: list[float]) -> list[float]:
    exps = [math.exp(x) for x in xs]
    return [e / sum(exps) for e in exps]


# --------------------------------------------------------------------------------------------
# Routing and losses on hand examples


@pytest.mark.parametrize("top_k", [1, 2])
def test_gates_are_a_softmax_over_the_selected_logits_and_sum_to_one(top_k):
    logits = torch.randn(50, 6)
    r = route(logits, top_k)
    assert r.token.numel() == 50 * top_k and int(r.counts.sum()) == 50 * top_k
    assert r.dropped == 0 and torch.equal(r.counts, r.routed)
    # grouped by expert: the first counts[0] assignments belong to expert 0, and so on
    expert_of = torch.repeat_interleave(torch.arange(6), r.counts)
    gate_sum = torch.zeros(50).index_add_(0, r.token, r.weight)
    torch.testing.assert_close(gate_sum, torch.ones(50))
    for t in range(50):
        row = logits[t].tolist()
        chosen = sorted(range(6), key=lambda e: -row[e])[:top_k]
        mine = r.token == t
        assert sorted(expert_of[mine].tolist()) == sorted(chosen)
        want = dict(zip(chosen, softmax([row[e] for e in chosen])))
        for e, g in zip(expert_of[mine].tolist(), r.weight[mine].tolist()):
            assert g == pytest.approx(want[e], abs=1e-6)
    if top_k == 1:
        assert torch.all(r.weight == 1.0)


def test_load_balancing_and_z_loss_equal_hand_computation():
    rows = [[2.0, 0.5, 0.0], [0.0, 1.0, 0.2], [1.0, 0.0, -1.0], [0.0, 0.5, 3.0]]
    logits = torch.tensor(rows)
    probs = [softmax(r) for r in rows]
    P = [sum(p[i] for p in probs) / 4 for i in range(3)]
    # top-1 experts 0, 1, 0, 2 -> f = (2, 1, 1) / 4; second choices 1, 2, 1, 1 -> top-2 f = (2, 4, 2) / 4
    for top_k, f in ((1, [2 / 4, 1 / 4, 1 / 4]), (2, [2 / 4, 4 / 4, 2 / 4])):
        r = route(logits, top_k)
        assert r.routed.tolist() == [round(x * 4) for x in f]
        want = 3 * sum(fi * pi for fi, pi in zip(f, P))
        got = load_balancing_loss(logits.softmax(-1), r.routed, 4)
        assert got.item() == pytest.approx(want, rel=1e-6)
    want_z = sum(math.log(sum(math.exp(x) for x in r)) ** 2 for r in rows) / 4
    assert router_z_loss(logits).item() == pytest.approx(want_z, rel=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
def test_load_balancing_loss_equals_transformers(top_k):
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = torch.randn(64, 8) * 2
    r = route(logits, top_k)
    ours = load_balancing_loss(logits.softmax(-1), r.routed, 64)
    theirs = load_balancing_loss_func((logits,), num_experts=8, top_k=top_k)
    torch.testing.assert_close(ours, theirs)
    assert transformers  # the import is the point


def test_capacity_drops_exactly_the_overflow_first_choices_first():
    # top-1, 2 experts, 4 tokens: cap = ceil(1.0 * 4 * 1 / 2) = 2; tokens 0, 1, 2 want expert 0
    logits = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    assert expert_capacity(1.0, 4, 1, 2) == 2
    r = route(logits, 1, capacity=2)
    assert r.routed.tolist() == [3, 1] and r.counts.tolist() == [2, 1] and int(r.dropped) == 1
    assert r.token.tolist() == [0, 1, 3]  # expert 0 keeps the earlier tokens 0 and 1; token 2 is dropped
    # top-2, 3 experts, 3 tokens: cap = ceil(1.0 * 3 * 2 / 3) = 2. Choices (first, second):
    # t0 (1, 0), t1 (0, 2), t2 (0, 1). Expert 0 is wanted by t1 and t2 first and by t0 second:
    # first choices are served first, so t0's second choice is the one dropped (by token order
    # it would have been t2's first choice).
    logits = torch.tensor([[1.0, 2.0, 0.0], [2.0, 0.0, 1.0], [2.0, 1.0, 0.0]])
    r = route(logits, 2, capacity=expert_capacity(1.0, 3, 2, 3))
    assert r.routed.tolist() == [3, 2, 1] and r.counts.tolist() == [2, 2, 1] and int(r.dropped) == 1
    groups = r.token.split(r.counts.tolist())
    assert [g.tolist() for g in groups] == [[1, 2], [0, 2], [1]]


# --------------------------------------------------------------------------------------------
# The MoE layer against a per-token loop


def naive_moe(layer: MoE, x: torch.Tensor, capacity: int | None) -> torch.Tensor:
    """y_t = sum over t's top-k experts e (kept by capacity) of gate_e * expert_e(x_t), token by token."""
    logits = x @ layer.router.weight.t()
    top, experts = logits.topk(layer.top_k, dim=-1)
    gates = top.softmax(-1)
    used = [0] * layer.num_experts
    kept = torch.ones_like(experts, dtype=torch.bool)
    if capacity is not None:
        for j in range(layer.top_k):  # first choices before second choices, tokens in order
            for t in range(x.shape[0]):
                e = int(experts[t, j])
                kept[t, j] = used[e] < capacity
                used[e] += 1
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros(x.shape[1])
        for j in range(layer.top_k):
            if kept[t, j]:
                y = y + gates[t, j] * layer.experts[int(experts[t, j])](x[t:t + 1])[0]
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("kind,capacity_factor", [("swiglu", 0.0), ("gelu", 0.0), ("swiglu", 1.0)])
def test_moe_layer_forward_and_gradients_equal_a_per_token_loop(kind, capacity_factor):
    layer = MoE(16, 24, kind, num_experts=4, top_k=2, capacity_factor=capacity_factor, bias=kind == "gelu")
    with torch.no_grad():
        layer.router.weight.mul_(20)  # uneven routing, so a capacity of 1.0 really drops tokens
    x = torch.randn(40, 16, requires_grad=True)
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_()
    capacity = expert_capacity(capacity_factor, 40, 2, 4) if capacity_factor else None
    y_ref = naive_moe(layer, x_ref, capacity)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    stats = layer.stats
    if capacity_factor:
        assert int(stats["dropped"]) > 0  # the example exercises dropping
    assert int(stats["routed"].sum()) == 80
    grad = torch.randn_like(y)
    params = list(layer.experts.parameters())
    ours = torch.autograd.grad(y, [x, *params], grad)
    ref = torch.autograd.grad(y_ref, [x_ref, *params], grad, allow_unused=True)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, atol=1e-5, rtol=1e-5)


def test_capacity_applies_in_training_only():
    layer = MoE(16, 24, "swiglu", num_experts=4, top_k=2, capacity_factor=0.5)
    x = torch.randn(40, 16)
    layer(x)
    assert int(layer.stats["dropped"]) > 0
    layer.eval()
    torch.testing.assert_close(layer(x), naive_moe(layer, x, None), atol=1e-5, rtol=1e-5)
    assert int(layer.stats["dropped"]) == 0


# --------------------------------------------------------------------------------------------
# The MoE GPT


def test_training_loss_adds_router_losses_eval_loss_is_cross_entropy():
    model = GPT(moe_config(moe=dict(num_experts=4, top_k=2, aux_loss_coef=0.5, z_loss_coef=0.25)))
    idx, targets = torch.randint(0, VOCAB, (2, 32)), torch.randint(0, VOCAB, (2, 32))
    logits, loss = model(idx, targets)
    ce = F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))
    stats = model.moe_stats()
    assert loss.item() == pytest.approx(ce.item() + 0.5 * stats["aux_loss"] + 0.25 * stats["z_loss"], rel=1e-6)
    assert stats["aux_loss"] > 0 and stats["z_loss"] > 0
    assert len(stats["util"]) == 4 and sum(stats["util"]) == pytest.approx(1.0)
    assert len(stats["util_per_layer"]) == 2
    loss.backward()
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0
    model.eval()
    logits, loss = model(idx, targets)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1)).item(), rel=1e-6)
    assert GPT(moe_config(moe=dict(num_experts=0))).moe_stats() is None


def test_active_parameters_and_flops_equal_the_dense_model_with_top_k_times_the_hidden():
    moe = GPT(moe_config(mlp_hidden=48, moe=dict(num_experts=8, top_k=2)))
    dense = GPT(moe_config(mlp_hidden=96, moe=dict(num_experts=0)))
    router = 2 * 8 * 32  # n_layer * E * n_embd
    expert = 3 * 32 * 48
    assert moe.num_params() == dense.num_params() + router + 2 * (8 * expert - 2 * expert)
    assert moe.num_params(active=True) == dense.num_params() + router
    assert moe.flops_per_token() == dense.flops_per_token() + 6 * router


def test_kv_cached_generation_equals_full_forward():
    model = GPT(moe_config(moe=dict(num_experts=4, top_k=2, capacity_factor=1.0))).eval()
    idx = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_kv_cache(2)
        steps = [model(idx[:, :8], kv_cache=cache)[0]]
        for t in range(8, 20):
            steps.append(model(idx[:, t:t + 1], kv_cache=cache)[0])
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_bad_moe_config_is_a_one_line_user_error(tmp_path, capsys):
    with pytest.raises(UserError,
                       match=r"model\.moe\.top_k: 3 is more than model\.moe\.num_experts=2; allowed: 1\.\.2"):
        moe_config(moe=dict(num_experts=2, top_k=3))
    with pytest.raises(UserError, match=r"model\.moe\.capacity_factor"):
        moe_config(moe=dict(num_experts=2, capacity_factor=-1))
    tokens = make_token_dir(tmp_path)
    capsys.readouterr()
    assert main(["pretrain", str(ROOT / "configs" / "moe-tiny.yaml"), "--out", str(tmp_path / "run"),
                 "--set", f"data.tokens={tokens}", "--set", "model.moe.top_k=9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.moe.top_k" in err[0] and "allowed: 1..8" in err[0], err


# --------------------------------------------------------------------------------------------
# Hugging Face Mixtral


def hf_mixtral(**kw):
    transformers = pytest.importorskip("transformers")
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
               rms_norm_eps=1e-6, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
               router_aux_loss_coef=0.02)
    cfg.update(kw)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**cfg)).eval()
    with torch.no_grad():  # move every parameter off its init, so a mis-mapped norm shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("kw", [{}, {"num_local_experts": 3, "num_experts_per_tok": 1, "tie_word_embeddings": True,
                                     "num_key_value_heads": 4}],
                         ids=["top2-of-4-gqa", "top1-of-3-tied"])
def test_mixtral_from_hf_logits_match_and_round_trip_is_exact(kw, tmp_path, tokenizer_file):
    hf = hf_mixtral(**kw)
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    summary = from_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert summary["metrics"]["model_type"] == "mixtral"
    ours, _ = ckpt.load_pretrained(tmp_path / "ckpt")
    moe = ours.config.moe
    assert (moe.num_experts, moe.top_k, moe.aux_loss_coef) == (hf.config.num_local_experts,
                                                               hf.config.num_experts_per_tok, 0.02)
    idx = torch.randint(0, VOCAB, (2, 32))
    with torch.no_grad():
        theirs = hf(idx).logits
        mine = ours(idx)[0]
    assert (mine - theirs).abs().max().item() <= 1e-4

    to_hf(tmp_path / "ckpt", tmp_path / "back")
    original = load_file(str(tmp_path / "hf" / "model.safetensors"))
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(back) == sorted(original)
    assert any(".block_sparse_moe.experts.0.w1." in k for k in original)  # the layout HF writes
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == moe.num_experts


def test_lmforge_moe_to_hf_loads_with_the_same_logits_and_aux_loss(tmp_path, tokenizer_file):
    transformers = pytest.importorskip("transformers")
    model = GPT(moe_config(n_layer=1, rope_theta=1e6))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ckpt.save_checkpoint(tmp_path / "ckpt", model.state_dict(), model.config.to_dict(), tokenizer_file, None)
    to_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, VOCAB, (2, 32))
    model.eval()
    with torch.no_grad():
        out = hf(idx, output_router_logits=True)
        mine = model(idx)[0]
    assert (mine - out.logits).abs().max().item() <= 1e-4
    # one layer: HF's pooled load-balancing loss is this layer's, as ours
    assert model.moe_stats()["aux_loss"] == pytest.approx(out.aux_loss.item(), rel=1e-5)


def test_moe_without_rope_cannot_convert_to_hf(tmp_path, tokenizer_file):
    model = GPT(ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=32, block_size=16,
                            moe=dict(num_experts=2, top_k=1)))
    ckpt.save_checkpoint(tmp_path / "ckpt", model.state_dict(), model.config.to_dict(), tokenizer_file, None,
                         drop=ckpt.tied_aliases(model))
    with pytest.raises(UserError, match=r"model\.moe\.num_experts=2: .*Mixtral, which needs pos_encoding=rope"):
        to_hf(tmp_path / "ckpt", tmp_path / "hf")


def test_mixtral_with_bad_top_k_is_a_user_error(tmp_path, tokenizer_file):
    hf = hf_mixtral(num_hidden_layers=1)
    hf.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["num_experts_per_tok"] = 5
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"config\.json: num_experts_per_tok=5 is not supported; "
                                        r"allowed: 1\.\.num_local_experts=4"):
        from_hf(tmp_path / "hf", tmp_path / "ckpt")


# --------------------------------------------------------------------------------------------
# Training


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return make_token_dir(tmp_path_factory.mktemp("tok"))


MOE_SETS = ("model.moe.num_experts=4", "model.moe.top_k=2", "model.mlp=swiglu", "model.pos_encoding=rope",
            "model.norm=rmsnorm", "model.bias=false")


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_logs_expert_utilization(tokens, tmp_path, capsys):
    out = tmp_path / "run"
    pretrain(tiny_config(tokens, *MOE_SETS, "model.moe.capacity_factor=1.0", "train.max_steps=20"), out)
    recs = records(out)
    assert len(recs) == 20
    for r in recs:
        assert len(r["moe_util"]) == 4 and sum(r["moe_util"]) == pytest.approx(1.0, abs=1e-3)
        assert 0.0 <= r["moe_dropped"] < 0.5 and r["moe_aux_loss"] > 0 and r["moe_z_loss"] > 0
    assert any(r["moe_dropped"] > 0 for r in recs)  # capacity 1.0 drops some at this size
    evals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20] and evals[1]["val_loss"] < evals[0]["val_loss"]
    report = (out / "report.md").read_text()
    assert "- experts: 4, top-2; utilization at step 20:" in report


@pytest.mark.parametrize("interrupt_at", [7])
def test_moe_interrupt_then_resume_equals_uninterrupted(tokens, tmp_path, interrupt_at):
    sets = (*MOE_SETS, "model.dropout=0.1", "model.moe.capacity_factor=1.25", "train.max_steps=20")
    straight = tmp_path / "straight"
    pretrain(tiny_config(tokens, *sets), straight)

    def ctrl_c(step):
        if step == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)

    resumed = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        pretrain(tiny_config(tokens, *sets), resumed, on_step=ctrl_c)
    pretrain(tiny_config(tokens, *sets), resumed, resume=True)
    a, b = records(straight), records(resumed)
    assert [r["step"] for r in b] == list(range(1, 21))
    assert abs(a[-1]["loss"] - b[-1]["loss"]) <= 1e-6
    assert abs(a[-1]["val_loss"] - b[-1]["val_loss"]) <= 1e-6
    assert a[-1]["moe_util"] == b[-1]["moe_util"]


@pytest.mark.slow
def test_moe_tiny_preset_learns_shakespeare(shakespeare_dir, tmp_path):
    """configs/moe-tiny.yaml on character-level Shakespeare (CPU): val loss falls well below the start."""
    from lmforge.config import load_config
    from lmforge.tokenizer.shards import tokenize_corpus
    from lmforge.tokenizer.train import train_tokenizer

    train_tokenizer(shakespeare_dir, tmp_path / "tok", kind="char")
    tokenize_corpus(tmp_path / "tok", shakespeare_dir, tmp_path / "tokens", val_fraction=0.05)
    cfg = load_config(ROOT / "configs" / "moe-tiny.yaml",
                      [f"data.tokens={tmp_path / 'tokens'}", "train.max_steps=150", "train.eval_every=50",
                       "train.warmup_steps=20", "train.eval_steps=4", "train.batch_size=8",
                       # one thread: on a shared 2-core machine two OpenMP threads stall whenever
                       # another process holds a core (measured 10x slower steps under load)
                       "train.threads=1"])
    summary = pretrain(cfg, tmp_path / "run")
    evals = [r for r in records(tmp_path / "run") if "val_loss" in r]
    assert [r["step"] for r in evals] == [50, 100, 150]
    assert evals[0]["val_loss"] > evals[1]["val_loss"] > evals[2]["val_loss"]
    assert evals[-1]["val_loss"] < 2.6  # from ln(vocab) ~ 4.4 at init
    util = evals[-1]["moe_util"]
    assert len(util) == 8 and min(util) > 0.02  # no expert starved
    assert summary["metrics"]["final_val_loss"] == evals[-1]["val_loss"]


def test_row_buckets_are_few_and_waste_at_most_an_eighth():
    from lmforge.models.moe import bucket_rows

    sizes = [bucket_rows(n) for n in range(1, 4097)]
    assert sizes[:16] == list(range(1, 17))
    assert all(n <= b <= n * 1.125 for n, b in zip(range(1, 4097), sizes))
    assert {bucket_rows(n) for n in range(1024, 2048)} == set(range(1024, 2049, 128))  # 8 per octave (+2048)


def test_padded_groups_pad_with_zero_gates_and_keep_every_assignment():
    from lmforge.models.moe import padded_groups

    r = route(torch.randn(300, 4), 2)
    token, weight, sizes = padded_groups(r)
    assert sum(sizes) > r.token.numel()  # this example is padded
    offsets = [0]
    for n, m in zip(r.counts.tolist(), sizes):  # each group: the expert's assignments, then zeros
        assert torch.equal(token[offsets[-1]:offsets[-1] + n], r.token[sum(r.counts[:len(offsets) - 1]):][:n])
        assert torch.all(weight[offsets[-1] + n:offsets[-1] + m] == 0)
        offsets.append(offsets[-1] + m)
    assert torch.equal(weight[weight != 0].sort().values, r.weight.sort().values)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_moe_two_processes_match_one(tokens, tmp_path, parallel):
    """Under torchrun every expert gets a gradient on every rank (DDP would fail otherwise), and
    without the load-balancing loss — a function of each rank's own batch, as in every MoE
    implementation — two processes reproduce one."""
    import subprocess
    import sys

    def run(out: Path, batch: int, *launcher: str, extra: tuple[str, ...] = ()) -> list[dict]:
        cmd = [*launcher, "pretrain", "configs/nano.yaml", "--out", str(out)]
        for s in (f"data.tokens={tokens}", *MOE_SETS, "model.moe.aux_loss_coef=0", "model.n_layer=2",
                  "model.n_head=2", "model.n_embd=32", "model.block_size=32", f"train.batch_size={batch}",
                  "train.grad_accum=2", "train.max_steps=6", "train.warmup_steps=2", "train.lr=3e-3",
                  "train.eval_every=3", "train.eval_steps=2", "train.precision=fp32", "train.threads=1", *extra):
            cmd += ["--set", s]
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return records(out)

    single = run(tmp_path / "single", 4, sys.executable, "-m", "lmforge")
    multi = run(tmp_path / "multi", 2, sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", "-m", "lmforge", extra=(f"train.parallel={parallel}",))
    assert len(single) == len(multi) == 6
    for a, b in zip(single, multi):
        assert abs(a["loss"] - b["loss"]) <= 1e-4, (a, b)
        assert len(b["moe_util"]) == 4
    assert abs(single[-1]["val_loss"] - multi[-1]["val_loss"]) <= 1e-4
