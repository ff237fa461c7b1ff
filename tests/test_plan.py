"""Tests for `lmforge plan`: exact parameter counts, FLOPs, and memory predictions vs measurement."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lmforge.cli import main
from lmforge.config import load_config
from lmforge.models import ARCHITECTURES, GPT, ModelConfig, build_model
from lmforge.peakmem import can_measure, measure_training_peak, objective_batch, reference_lora
from lmforge.plan import (
    LoRA,
    attention_kernel,
    block_activation_bytes,
    count_params,
    count_params_built,
    flops_per_token,
    lora_params,
    nf4_bytes,
    objective_lengths,
    plan,
    stacks,
    training_memory,
)
from lmforge.train.device import GPU_PEAK_BF16

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
needs_glibc = pytest.mark.skipif(not can_measure(), reason="peak measurement reads glibc's mallinfo2")
PRESETS = sorted(CONFIGS.glob("*.yaml"))
GPT_PRESETS = [p for p in PRESETS if load_config(p).model.arch == "gpt"]


def preset_model(path: Path, *overrides: str, vocab: int = 320) -> tuple[ModelConfig, int]:
    """The preset's model config (vocab from the config, else `vocab`) and its micro-batch."""
    cfg = load_config(path, list(overrides))
    model = ModelConfig.from_dict({**cfg.model.to_dict(), "vocab_size": cfg.model.vocab_size or vocab})
    return model, cfg.train.batch_size


# --------------------------------------------------------------------------------------------
# Parameters and FLOPs


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_exact_counts_equal_the_built_model_for_every_preset(path, tie):
    config, _ = preset_model(path, f"model.tie_embeddings={str(tie).lower()}")
    with torch.device("meta"):
        model = build_model(config)
    counts = count_params(config)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["embedding"] + counts["non_embedding"] == counts["total"]
    if config.arch != "gpt":
        assert counts["method"] == "exact (counted)"
        return
    # GPT: the closed formula, which must also agree with counting the built model
    assert counts["method"] == "exact (formula)"
    assert counts["total"] == model.num_params()
    assert counts["non_embedding"] == model.num_params(exclude_embeddings=True)
    built = count_params_built(config)
    assert {k: built[k] for k in ("total", "embedding", "non_embedding", "matmul", "per_block")} == \
        {k: counts[k] for k in ("total", "embedding", "non_embedding", "matmul", "per_block")}
    if config.moe.num_experts == 0:
        assert counts["active"] == counts["total"]
        assert flops_per_token(config) == model.flops_per_token()
        assert flops_per_token(config, 17) == model.flops_per_token(17)


def test_12Ld2_approximation_is_close_for_gpt2_small():
    config, _ = preset_model(CONFIGS / "gpt2-124m.yaml")
    counts = count_params(config)
    assert counts["total"] == 124_475_904  # the well-known 124M (vocab padded to 50304)
    assert counts["approx_12Ld2"] == 12 * 12 * 768**2
    assert abs(counts["approx_12Ld2"] / counts["non_embedding"] - 1) < 0.01


MOE_TINY = dict(n_layer=2, n_head=4, n_embd=64, block_size=16, vocab_size=100, mlp="gelu", bias=True,
                moe={"num_experts": 4, "top_k": 2})


def test_moe_active_and_total_parameters_by_hand():
    c = ModelConfig(**MOE_TINY)
    # by hand: attention 64*192+192 + 64*64+64 = 16,640; one expert (dense MLP shape)
    # 64*256+256 + 256*64+64 = 33,088; router 64*4 = 256 (no bias); norms 2*(64+64) = 256
    per_block = 16_640 + 256 + 4 * 33_088 + 256  # 149,504
    embedding = 100 * 64 + 16 * 64  # tokens + learned positions = 7,424
    total = embedding + 2 * per_block + 128  # + final norm = 306,560
    active = total - 2 * (4 - 2) * 33_088  # two of four experts idle in each layer = 174,208
    counts = count_params(c)
    assert (counts["per_block"], counts["total"], counts["active"]) == (per_block, total, active) == \
        (149_504, 306_560, 174_208)
    # FLOPs per token use the active matmul parameters (the tied head included)
    assert flops_per_token(c) == 6 * (active - embedding + 100 * 64) + 12 * 2 * 64 * 16
    dense = ModelConfig(**{**MOE_TINY, "moe": {"num_experts": 0}})
    assert count_params(dense)["total"] == total - 2 * (256 + 3 * 33_088)


def test_moe_counts_equal_the_built_moe_model():
    """Against `sum(p.numel())` of the real MoE GPT, once `GPT` builds MoE blocks."""
    c = ModelConfig(**MOE_TINY)
    with torch.device("meta"):
        model = GPT(c)
    n = sum(p.numel() for p in model.parameters())
    if n == count_params(ModelConfig(**{**MOE_TINY, "moe": {"num_experts": 0}}))["total"]:
        pytest.skip("GPT does not build MoE blocks yet (models/moe.py)")
    assert count_params(c)["total"] == n


# --------------------------------------------------------------------------------------------
# LoRA / QLoRA: counts and storage


def test_lora_parameters_by_hand_and_target_parsing():
    config, _ = preset_model(CONFIGS / "nano.yaml")  # d=128, MLP hidden 512, 4 layers
    r = 8
    # qkv 128 -> 384, out 128 -> 128, up 128 -> 512, down 512 -> 128; each adapter r*(in + out)
    per_layer = r * (128 + 384) + r * (128 + 128) + r * (128 + 512) + r * (512 + 128)
    assert lora_params(config, LoRA.parse(r))["total"] == 4 * per_layer == 65_536
    assert lora_params(config, LoRA.parse(r, "attn"))["total"] == 4 * r * (512 + 256)
    assert LoRA.parse(4, "mlp,qkv").targets == ("qkv", "gate", "up", "down")
    llama, _ = preset_model(CONFIGS / "llama-tiny.yaml")  # swiglu: gate too; GQA qkv 384 -> 384 + 2*128
    assert lora_params(llama, LoRA.parse(2, "qkv,gate"))["per_layer"] == 2 * (384 + 640) + 2 * (384 + 1024)
    with pytest.raises(Exception, match="--lora-targets: 'q_proj' is not one of"):
        LoRA.parse(8, "q_proj")
    with pytest.raises(Exception, match="--lora-rank must be a positive integer"):
        LoRA.parse(0)


def test_nf4_storage_matches_bitsandbytes():
    """QLoRA storage: 4.127 bits per weight (the paper's double quantization), as bitsandbytes stores it."""
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    n = 64 * 256 * 8
    assert (nf4_bytes(n) - nf4_bytes(0)) * 8 / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
    for shape in [(384, 128), (128, 128), (512, 128), (640, 384), (1000, 7)]:
        w = torch.randn(shape, dtype=torch.bfloat16)
        packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        tensors = [packed, state.absmax, state.code, state.state2.absmax, state.state2.code, state.offset]
        assert nf4_bytes(w.numel()) == sum(t.numel() * t.element_size() for t in tensors), shape
        packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
        tensors = [packed, state.absmax, state.code]
        assert nf4_bytes(w.numel(), double_quant=False) == sum(t.numel() * t.element_size() for t in tensors)


# --------------------------------------------------------------------------------------------
# Memory: predicted vs measured on CPU (see `lmforge.peakmem` for the method)


def force_fused_attention(monkeypatch) -> None:
    from lmforge.models.blocks import Attention

    monkeypatch.setattr(Attention, "_use_cpu_attention", lambda self, *a, **k: False)


# CUDA always takes the fused attention (SDPA), and so does the CPU in fp32; in bf16 the CPU
# takes a hand-written attention that also saves the (T, T) probabilities. Both are checked in
# bf16: the fused one by forcing SDPA (what a GPU run does), the CPU one as it runs here.
@needs_glibc
@pytest.mark.parametrize("preset,precision,attention", [
    ("nano", "fp32", "fused"), ("demo", "fp32", "fused"), ("nano", "bf16", "fused"), ("nano", "bf16", "cpu"),
    ("demo", "bf16", "cpu")])
def test_predicted_peak_training_memory_within_15_percent_of_measured(preset, precision, attention, monkeypatch):
    config, batch = preset_model(CONFIGS / f"{preset}.yaml")
    if attention == "fused":
        force_fused_attention(monkeypatch)
    else:
        assert attention_kernel(config, precision, config.block_size, "cpu") == "cpu"
    predicted = training_memory(config, batch, precision=precision, attention=attention)
    measured = measure_training_peak(config, batch, precision)
    assert abs(predicted["peak"] / measured["peak"] - 1) < 0.15, (predicted["peak"], measured)
    # activations dominate these peaks: the check is not carried by the exact weight terms
    assert measured["step_growth"] > measured["persistent"]


@needs_glibc
@pytest.mark.parametrize("precision,batch", [("fp32", 4), ("bf16", 4),
                                             pytest.param("bf16", 16, marks=pytest.mark.slow)])
def test_moe_peak_memory_within_15_percent_of_measured(precision, batch):
    """moe-tiny: at batch 4 its expert weights outweigh its activations, and the peak moves from
    the start of backward to the block being differentiated (predicted by walking backward)."""
    config, _ = preset_model(CONFIGS / "moe-tiny.yaml")
    attention = attention_kernel(config, precision, config.block_size, "cpu")
    predicted = training_memory(config, batch, precision=precision, attention=attention)
    measured = measure_training_peak(config, batch, precision)
    assert abs(predicted["peak"] / measured["peak"] - 1) < 0.15, (predicted["peak"], measured)
    if batch == 4:
        assert predicted["peak_phase"] != "head"


@needs_glibc
@pytest.mark.parametrize("method,preset,attention,batch", [
    ("lora", "nano", "cpu", None), ("qlora", "nano", "cpu", None), ("lora", "nano", "fused", None),
    ("lora", "demo", "cpu", None),
    # bitsandbytes' CPU path is slow
    *(pytest.param(*case, marks=pytest.mark.slow) for case in [
        ("qlora", "nano", "fused", None), ("qlora", "demo", "cpu", None), ("lora", "moe-tiny", "cpu", 4),
        ("qlora", "moe-tiny", "cpu", 4)])])
def test_lora_and_qlora_peak_memory_within_15_percent_of_measured(method, preset, attention, batch, monkeypatch):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    config, preset_batch = preset_model(CONFIGS / f"{preset}.yaml")
    batch = batch or preset_batch
    if attention == "fused":
        force_fused_attention(monkeypatch)
    lora = LoRA.parse(8, quantized=method == "qlora")
    predicted = training_memory(config, batch, attention=attention, lora=lora)
    measured = measure_training_peak(config, batch, "bf16", adapt=lambda model: reference_lora(model, lora))
    # the frozen base and the adapters' state are exact (bitsandbytes' own tensors for QLoRA)
    assert predicted["weights"] + predicted["optimizer"] == pytest.approx(measured["persistent"], rel=1e-3)
    assert predicted["trainable_params"] == lora_params(config, lora)["total"]
    assert abs(predicted["peak"] / measured["peak"] - 1) < 0.15, (predicted["peak"], measured)


@needs_glibc
def test_activation_checkpointing_prediction_within_15_percent_of_measured(monkeypatch):
    """Our trainer has no activation checkpointing yet; applied from outside, as it will be
    (`torch.utils.checkpoint` around each block), the measured peak matches the AC formula."""
    from torch.utils.checkpoint import checkpoint

    from lmforge.models.blocks import TransformerBlock as Block

    forward = Block.forward
    monkeypatch.setattr(Block, "forward",
                        lambda self, x, **kw: checkpoint(forward, self, x, use_reentrant=False, **kw))
    config, batch = preset_model(CONFIGS / "nano.yaml")
    predicted = training_memory(config, batch, precision="fp32", checkpointing=True)["peak"]
    measured = measure_training_peak(config, batch, "fp32")["peak"]
    assert abs(predicted / measured - 1) < 0.15, (predicted, measured)
    assert predicted < training_memory(config, batch, precision="fp32")["peak"]


# BERT and encoder-decoders, with the batches their objectives cut: bert-mini's mlm + nsp rows
# (post-norm blocks, dropout 0.1: the CPU takes the hand-written attention in fp32 too), t5-small's
# and transformer-base's span corruption (128 encoder and 29 decoder positions; T5's relative
# bias sends its self-attention to SDPA's math path).
ENCODER_CASES = [("bert-mini", "fp32"), ("bert-mini", "bf16"), ("t5-small", "fp32"), ("t5-small", "bf16"),
                 ("transformer-base", "fp32"), ("transformer-base", "bf16")]


def preset_run(name: str, *overrides: str, vocab: int = 320):
    """The preset's config tree (for its objective) and model config (vocab `vocab` when unset)."""
    cfg = load_config(CONFIGS / f"{name}.yaml", list(overrides))
    return cfg, ModelConfig.from_dict({**cfg.model.to_dict(), "vocab_size": cfg.model.vocab_size or vocab})


def _is_weight_copy(t: torch.Tensor) -> bool:
    """Whether t is (a view of) autocast's bf16 copy of a parameter (the plan counts those apart)."""
    fn = t.grad_fn
    while fn is not None and type(fn).__name__ in ("TBackward0", "ViewBackward0", "TransposeBackward0"):
        fn = fn.next_functions[0][0]
    return (fn is not None and type(fn).__name__ == "ToCopyBackward0"
            and type(fn.next_functions[0][0]).__name__ == "AccumulateGrad")


def saved_bytes_of_blocks(model: nn.Module, blocks: list[nn.Module], cfg, config: ModelConfig, batch_size: int,
                          precision: str) -> list[int]:
    """Bytes autograd saves for backward while each of `blocks` runs forward (one training forward
    with the objective's batch): every saved storage once, to the block that saved it first, without
    parameters and autocast's weight copies."""
    from lmforge.train.device import autocast

    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    totals = [0] * len(blocks)
    current: list[int | None] = [None]
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
        block.register_forward_hook(lambda m, a, o: current.__setitem__(0, None))

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen and storage.data_ptr() not in parameters and not _is_weight_copy(t):
            seen.add(storage.data_ptr())
            if current[0] is not None:
                totals[current[0]] += storage.nbytes()
        return t

    batch, loss_of = objective_batch(cfg, config, batch_size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(torch.device("cpu"), precision):
        loss_of(model, batch)
    return totals


@pytest.mark.parametrize("preset,precision", [*ENCODER_CASES, ("t5-small", "fp32-dropout"), ("nano", "bf16"),
                                            ("llama-tiny", "bf16")])
def test_block_activations_equal_what_autograd_saves(preset, precision):
    """Per block, the plan's tensor-by-tensor model against the tensors autograd really saves
    (saved-tensor hooks: exact, unlike a peak), block 1 of every stack (block 0 of a decoder
    also saves the shared fp32 encoder output, which the plan counts once outside the blocks)."""
    precision, *dropout = precision.split("-")
    cfg, config = preset_run(preset, *(["model.dropout=0.1"] if dropout else []))
    seq_len, decoder_len = objective_lengths(cfg, config.block_size)
    torch.manual_seed(0)
    model = build_model(config)
    lists = {"encoder": model.encoder_blocks, "decoder": model.decoder_blocks} if config.arch == "encdec" \
        else {"encoder" if config.arch == "bert" else "": model.blocks}
    model_stacks = stacks(config, seq_len, decoder_len)
    batch_size = 2
    measured = saved_bytes_of_blocks(model, [lists[s.name][1] for s in model_stacks], cfg, config, batch_size,
                                     precision)
    attention = attention_kernel(config, precision, seq_len, "cpu")
    for stack, saved in zip(model_stacks, measured):
        predicted = sum(block_activation_bytes(config, stack, precision, attention).values()) * batch_size
        if config.pos_encoding == "rope" and precision == "bf16":
            predicted += 4 * stack.length * config.head_dim * 2  # the cast cos/sin tables
        assert predicted == pytest.approx(saved, rel=0.01), (stack, predicted, saved)


@needs_glibc
@pytest.mark.parametrize("preset,precision", ENCODER_CASES)
def test_bert_and_encoder_decoder_peak_memory_within_15_percent_of_measured(preset, precision):
    """The whole step (batch 4, to stay fast), as the GPT presets are checked above."""
    cfg, config = preset_run(preset)
    seq_len, decoder_len = objective_lengths(cfg, config.block_size)
    attention = attention_kernel(config, precision, seq_len, "cpu")
    predicted = training_memory(config, 4, seq_len, precision, attention=attention, decoder_len=decoder_len)
    measured = measure_training_peak(config, 4, precision, cfg=cfg)
    # the plan's lengths are the objective's real batch shapes
    assert measured["shapes"]["input_ids"] == (4, seq_len)
    if decoder_len is not None:
        assert measured["shapes"]["labels"] == (4, decoder_len) and decoder_len < seq_len
    else:
        assert "next_sentence_label" in measured["shapes"]  # bert-mini trains mlm + nsp
    # (AdamW also keeps a step count per parameter tensor)
    assert predicted["weights"] + predicted["optimizer"] == pytest.approx(measured["persistent"], rel=1e-4)
    assert abs(predicted["peak"] / measured["peak"] - 1) < 0.15, (predicted["peak"], measured)
    # the step's own memory (activations, gradients, weight copies) alone, without the exact terms
    step = predicted["peak"] - predicted["weights"] - predicted["optimizer"]
    assert abs(step / measured["step_growth"] - 1) < 0.15, (step, measured)


@needs_glibc
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_contrastive_peak_memory_within_15_percent_of_measured(precision):
    """bert-mini under the contrastive objective: both dropout views of each example through the
    encoder, no MLM head (which, like the pooler and NSP head, gets no gradient or AdamW state)."""
    cfg, config = preset_run("bert-mini", "objective=contrastive")
    attention = attention_kernel(config, precision, config.block_size, "cpu")
    predicted = training_memory(config, 4, config.block_size, precision, attention=attention,
                                objective="contrastive")
    measured = measure_training_peak(config, 4, precision, cfg=cfg)
    assert measured["shapes"]["input_ids"] == (4, config.block_size)  # the loss doubles the rows itself
    assert predicted["weights"] + predicted["optimizer"] == pytest.approx(measured["persistent"], rel=1e-4)
    assert abs(predicted["peak"] / measured["peak"] - 1) < 0.15, (predicted["peak"], measured)
    step = predicted["peak"] - predicted["weights"] - predicted["optimizer"]
    assert abs(step / measured["step_growth"] - 1) < 0.15, (step, measured)
    # the encoder runs both views: twice the block activations of the same batch under mlm
    as_mlm = training_memory(config, 4, config.block_size, precision, attention=attention)
    assert as_mlm["activations_layers"] == predicted["activations_layers"] / 2


def test_contrastive_flops_count_two_encoder_passes_and_no_mlm_head():
    cfg, config = preset_run("bert-mini", "objective=contrastive")
    model = build_model(config)
    # N: the encoder's non-embedding parameters (norms included, as GPT.flops_per_token counts them)
    encoder = sum(p.numel() for m in (model.emb_norm, model.blocks) for p in m.parameters())
    L, d, T = config.n_layer, config.n_embd, config.block_size
    expected = 2 * (6 * encoder + 12 * L * d * T)
    assert flops_per_token(config, T, objective="contrastive") == expected
    assert plan(cfg, vocab_size=config.vocab_size)["flops_per_token"] == expected
    # the training loop's MFU uses the objective's count (Objective.flops_per_token)
    objective = objective_batch(cfg, config, 1)[1].__self__  # the Contrastive objective, as training builds it
    assert objective.flops_per_token(model) == expected


@pytest.mark.slow
@needs_glibc
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_small_preset_peak_memory_within_15_percent_of_measured(precision):
    """The `small` preset as configured (batch 16 x 256 tokens: ~1 GB of activations)."""
    config, batch = preset_model(CONFIGS / "small.yaml")
    attention = attention_kernel(config, precision, config.block_size, "cpu")
    predicted = training_memory(config, batch, precision=precision, attention=attention)["peak"]
    measured = measure_training_peak(config, batch, precision, threads=2)["peak"]
    assert abs(predicted / measured - 1) < 0.15, (predicted, measured)


def test_memory_terms_scale_as_expected():
    config, batch = preset_model(CONFIGS / "gpt2-124m.yaml")
    n = count_params(config)["total"]
    fp32 = training_memory(config, batch, precision="fp32")
    assert (fp32["weights"], fp32["gradients"], fp32["optimizer"]) == (4 * n, 4 * n, 8 * n)
    bf16 = training_memory(config, batch, precision="bf16")
    assert bf16["activations_layers"] < fp32["activations_layers"]
    assert bf16["autocast_weight_copies"] == 2 * count_params(config)["matmul"]
    ckpt = training_memory(config, batch, precision="bf16", checkpointing=True)
    assert ckpt["activations_layers"] < bf16["activations_layers"] / 4
    fsdp = training_memory(config, batch, precision="bf16", gpus=8)
    assert fsdp["optimizer"] == bf16["optimizer"] / 8 and fsdp["fsdp_gathered"] > 0
    # FSDP gathers bf16 parameters (train/distributed.py's policy): no autocast copies; two blocks
    # and the root (embeddings 50304*768 + 1024*768, final norm) are unsharded at a time
    per_block = count_params(config)["per_block"]
    assert fsdp["autocast_weight_copies"] == 0
    assert fsdp["fsdp_gathered"] == 2 * (2 * per_block + 50304 * 768 + 1024 * 768 + 2 * 768)
    assert fsdp["activations_layers"] == bf16["activations_layers"]  # per device: its own micro-batch
    assert fsdp["peak"] < bf16["peak"]
    lora = training_memory(config, batch, lora=LoRA.parse(16))
    qlora = training_memory(config, batch, lora=LoRA.parse(16, quantized=True))
    trainable = lora_params(config, LoRA.parse(16))["total"]
    assert lora["weights"] == 2 * n + 4 * trainable and lora["optimizer"] == 8 * trainable
    # QLoRA stores the blocks' Linear weights (12 x (768*2304 + 768*768 + 2*768*3072)) in 4.127
    # bits instead of 16; the same adapters, gradients and AdamW state
    assert lora["weights"] - qlora["weights"] == pytest.approx(12 * 7_077_888 * (2 - 4.127 / 8), rel=1e-3)
    assert qlora["gradients"] == lora["gradients"] == 4 * trainable
    assert qlora["peak"] < lora["peak"] < bf16["peak"]


# --------------------------------------------------------------------------------------------
# The report and the CLI


def test_plan_report_compute_budget_and_time():
    cfg = load_config(CONFIGS / "gpt2-124m.yaml")
    report = plan(cfg, gpus=8, gpu_type="A100", mfu=0.5)
    n = report["parameters"]["total"]
    comp = report["compute"]
    assert comp["tokens"] == 20 * n
    assert comp["training_flops"] == pytest.approx(report["flops_per_token"] * 20 * n)
    assert comp["wall_time_s"] == pytest.approx(comp["training_flops"] / (8 * GPU_PEAK_BF16["A100"] * 0.5))
    assert report["memory"]["fsdp"] and set(report["memory"]["per_device"]) == {
        "fp32", "fp32+act_ckpt", "bf16", "bf16+act_ckpt"}
    assert plan(cfg, tokens=1e9)["compute"]["tokens"] == 1e9
    moe = plan(load_config(CONFIGS / "nano.yaml", ["model.moe.num_experts=8"]), vocab_size=64)
    assert moe["compute"]["tokens"] == 20 * moe["parameters"]["active"] < 20 * moe["parameters"]["total"]


def test_plan_takes_the_vocab_from_the_token_dir(tmp_path):
    from train_helpers import make_token_dir

    from lmforge.tokenizer.shards import read_meta

    tokens = make_token_dir(tmp_path, kind="bpe")
    tokenizer_vocab = read_meta(tokens)["vocab_size"]  # ~300
    cfg = load_config(CONFIGS / "nano.yaml", [f"data.tokens={tokens}"])
    report = plan(cfg)
    assert report["model"]["vocab_size"] == 64 * math.ceil(tokenizer_vocab / 64)
    assert report["vocab_source"].startswith(f"tokenizer of {tokens}: {tokenizer_vocab} tokens")
    missing = plan(load_config(CONFIGS / "nano.yaml", [f"data.tokens={tmp_path / 'nothing'}"]))
    assert missing["model"]["vocab_size"] == 50304 and missing["vocab_source"].startswith("assumed 50304")


def test_cli_plan_table_json_and_errors(capsys):
    assert main(["plan", str(CONFIGS / "gpt2-124m.yaml")]) == 0
    table = capsys.readouterr().out
    for text in ("non-embedding", "12*L*d^2", "FLOPs/token", "bf16+act_ckpt", "H100", "chinchilla",
                 "exact (formula)"):
        assert text in table
    assert main(["plan", str(CONFIGS / "nano.yaml"), "--json", "--vocab-size", "65", "--gpus", "2",
                 "--set", "model.n_layer=6", "--lora-rank", "4", "--lora-targets", "attn"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["n_layer"] == 6 and report["model"]["vocab_size"] == 65
    assert report["memory"]["gpus"] == 2
    assert report["lora"]["targets"] == ["qkv", "out"] and "qlora+act_ckpt" in report["memory"]["per_device"]
    assert main(["plan", str(CONFIGS / "nano.yaml"), "--lora-rank", "8", "--set", "model.moe.num_experts=4"]) == 0
    table = capsys.readouterr().out
    assert "active per token" in table and "qlora" in table and "MoE 4 experts top-2" in table
    for bad, message in [(["--gpu-type", "TPU"], "error: --gpu-type 'TPU' is not known"),
                         (["--lora-rank", "8", "--lora-targets", "gate"], "error: --lora-targets 'gate': none"),
                         # what training refuses, plan refuses with the same line
                         (["--set", "objective=mlm"],
                          "error: objective mlm trains model.arch=bert, but model.arch is gpt"),
                         (["-c", "bert-mini", "--set", "objective=contrastive", "--set", "model.dropout=0"],
                          "error: objective contrastive: model.dropout must be > 0"),
                         (["-c", "t5-small", "--set", "objective=contrastive"],
                          "error: objective contrastive trains model.arch=bert, but model.arch is encdec")]:
        config = str(CONFIGS / "nano.yaml")
        if bad[0] == "-c":
            config, bad = str(CONFIGS / f"{bad[1]}.yaml"), bad[2:]
        assert main(["plan", config, *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1


OTHER_PRESETS = [p for p in PRESETS if load_config(p).model.arch != "gpt"]


@pytest.mark.parametrize("path", OTHER_PRESETS, ids=[p.stem for p in OTHER_PRESETS])
def test_plan_counts_other_architectures_by_building_them(path, capsys):
    cfg = load_config(path, ["model.vocab_size=128"])
    report = plan(cfg, lora_rank=4)
    model = build_model(cfg.model)  # a real (not meta) model, as training builds it
    assert report["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert report["parameters"]["non_embedding"] == model.num_params(exclude_embeddings=True)
    assert report["parameters"]["method"] == "exact (counted)"
    seq_len, decoder_len = objective_lengths(cfg, cfg.model.block_size)
    assert report["flops_per_token"] == (model.flops_per_token(seq_len, decoder_len) if cfg.model.arch == "encdec"
                                         else model.flops_per_token(seq_len))
    # LoRA adapters on every Linear named qkv/out/gate/up/down inside the blocks
    named = [m for name, m in model.named_modules() if isinstance(m, nn.Linear)
             and name.rsplit(".", 1)[-1] in ("qkv", "out", "gate", "up", "down")]
    assert report["lora"]["trainable"] == sum(4 * (m.in_features + m.out_features) for m in named)
    # full training is validated for these architectures; LoRA on them is not
    assert report["memory"]["activations_method"].startswith("per-tensor model")
    assert "LoRA/QLoRA rows: not validated" in report["memory"]["activations_method"]
    assert "not validated" not in plan(cfg)["memory"]["activations_method"]
    assert main(["plan", str(path), "--set", "model.vocab_size=128"]) == 0
    assert "exact (counted)" in capsys.readouterr().out


def test_every_architecture_has_a_preset():
    """So that the every-preset count test covers every architecture."""
    assert {load_config(p).model.arch for p in PRESETS} == set(ARCHITECTURES)
