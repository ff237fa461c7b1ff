"""`lmforge convert to-onnx`: ONNX Runtime against lmforge on tiny models.

The reference is lmforge itself, run independently of the export: `generate` (the engine's KV
cache) for tokens, and a full forward without any cache for logits. ONNX Runtime runs the written
graph with no lmforge code in between but `OnnxModel`'s feeding loop (prefill, then one token per
step with the presents fed back as the past).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import perturbed_checkpoint

from lmforge.adapters import AdapterOptions, adapters_disabled, apply_adapter, write_adapter_config
from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.export.onnx import to_onnx
from lmforge.infer.generate import generate
from lmforge.models import ModelConfig, build_model
from lmforge.train.checkpoint import save_checkpoint, tied_aliases

ort = pytest.importorskip("onnxruntime")
OnnxModel = pytest.importorskip("lmforge.export.onnx_runtime").OnnxModel

VOCAB = 320  # >= the test tokenizer's 276 tokens
TINY = dict(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32, block_size=64)
LLAMA = dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, n_kv_head=2)
T5 = dict(arch="encdec", pos_encoding="relative", norm="rmsnorm", bias=False, mlp="relu", attn_scale=1.0,
          scale_decoder_outputs=True, decoder_start_token_id=0)
PROMPTS = [[5, 9, 14, 3, 27, 8, 40], [61, 2, 33]]  # different lengths: the batch is left-padded


def tiny_checkpoint(path: Path, tokenizer_file: Path | None = None, **style) -> tuple[torch.nn.Module, Path]:
    """A tiny random model (weights perturbed off the init, so greedy tokens vary) saved as a checkpoint."""
    return perturbed_checkpoint(path, {**TINY, **style}, tokenizer_file)


@pytest.fixture(scope="module")
def gpt_learned(tmp_path_factory, tokenizer_file):
    """GPT-2 style, exported through the CLI (with a tokenizer)."""
    root = tmp_path_factory.mktemp("learned")
    model, ckpt = tiny_checkpoint(root / "ckpt", tokenizer_file)
    assert main(["convert", "to-onnx", str(ckpt), str(root / "onnx")]) == 0
    return model, root / "onnx"


@pytest.fixture(scope="module")
def gpt_rope(tmp_path_factory):
    """Llama style (rotary, RMSNorm, SwiGLU, grouped-query), exported with --int8, no tokenizer."""
    root = tmp_path_factory.mktemp("rope")
    model, ckpt = tiny_checkpoint(root / "ckpt", **LLAMA)
    to_onnx(ckpt, root / "onnx", quantize_int8=True)
    return model, root / "onnx"


def reference_logits(model, prompt: list[int], new: list[int]) -> np.ndarray:
    """lmforge's logits for each generated position, from full forwards without a cache."""
    seq = torch.tensor([prompt + new])
    with torch.no_grad():
        logits, _ = model(seq)
    return logits[0, len(prompt) - 1:-1].numpy()  # the position before each new token


@pytest.mark.parametrize("which", ["gpt_learned", "gpt_rope"])
def test_onnx_greedy_equals_generate_with_logits_within_1e4(which, request):
    model, out = request.getfixturevalue(which)
    onnx = OnnxModel(out)
    prompt = PROMPTS[0]
    steps: list[np.ndarray] = []
    tokens = onnx.greedy([prompt], 16, logits_out=steps)[0]
    assert tokens == list(generate(model, prompt, 16, temperature=0))
    assert len(set(tokens)) > 1  # not a degenerate model that always says one token
    got = np.stack([s[0] for s in steps])
    np.testing.assert_allclose(got, reference_logits(model, prompt, tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("which", ["gpt_learned", "gpt_rope"])
def test_onnx_batch_of_two_left_padded_equals_each_prompt_alone(which, request):
    model, out = request.getfixturevalue(which)
    batch = OnnxModel(out).greedy(PROMPTS, 10)
    assert batch == [list(generate(model, p, 10, temperature=0)) for p in PROMPTS]


def test_onnx_dir_layout_and_dynamic_axes(gpt_learned):
    model, out = gpt_learned
    assert {p.name for p in out.iterdir()} == {"model.onnx", "config.json", "tokenizer.json", "onnx_config.json",
                                               "summary.json"}
    cfg = json.loads((out / "onnx_config.json").read_text())
    graph = cfg["graphs"]["model"]
    n = model.config.n_layer
    assert list(graph["inputs"]) == ["input_ids", "attention_mask"] + [
        f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    assert list(graph["outputs"]) == ["logits"] + [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    assert graph["inputs"]["input_ids"]["shape"] == ["batch", "sequence"]
    assert graph["inputs"]["past_key_values.0.key"]["shape"] == ["batch", 4, "past_sequence", 8]
    assert graph["outputs"]["logits"]["shape"] == ["batch", "sequence", VOCAB]
    # the file says the same as onnx_config.json (read back by onnxruntime, not by our code)
    session = ort.InferenceSession(str(out / "model.onnx"))
    assert [i.name for i in session.get_inputs()] == list(graph["inputs"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage"] == "convert to-onnx"
    assert summary["metrics"]["max_abs_diff"]["model"] < 1e-4
    assert summary["metrics"]["bytes"]["model.onnx"] == (out / "model.onnx").stat().st_size


def test_int8_graph_runs_and_mostly_agrees(gpt_rope):
    """The int8 graph is smaller and its next-token choices agree with fp32 on most positions.

    Dynamic int8 rounds every weight and activation, so logits move by ~1% and a near-tie can flip;
    after a flip, free-running greedy continuations diverge for good, so token-for-token equality of
    whole continuations is not a property int8 has. What it has: teacher-forced on the fp32 greedy
    sequence, its argmax agrees with fp32's at >= 80% of the positions, and the first generated token
    (no earlier divergence possible) is the same for both prompts.
    """
    model, out = gpt_rope
    assert (out / "model.int8.onnx").stat().st_size < (out / "model.onnx").stat().st_size
    fp32, int8 = OnnxModel(out), OnnxModel(out, int8=True)
    steps32: list[np.ndarray] = []
    steps8: list[np.ndarray] = []
    tokens = fp32.greedy(PROMPTS, 12, logits_out=steps32)
    tokens8 = int8.greedy(PROMPTS, 12, logits_out=steps8)
    assert [t[0] for t in tokens8] == [t[0] for t in tokens]
    # teacher forcing: one prefill of prompt + fp32 tokens through the int8 graph
    seq = PROMPTS[0] + tokens[0]
    logits = int8.sessions["model"].run(None, {
        "input_ids": np.array([seq]), "attention_mask": np.ones((1, len(seq)), np.int64),
        **int8._empty_past(1)})[0][0]
    agree = (logits[len(PROMPTS[0]) - 1:-1].argmax(-1) == np.array(tokens[0])).mean()
    print(f"int8: teacher-forced argmax agreement {agree:.2f}; free-running tokens {tokens8} vs fp32 {tokens}")
    assert agree >= 0.8
    assert np.abs(steps8[0] - steps32[0]).max() > 0  # it is a different (quantized) graph


def test_bert_outputs_within_1e4(tmp_path):
    model, ckpt = tiny_checkpoint(tmp_path / "ckpt", arch="bert", norm_position="post")
    to_onnx(ckpt, tmp_path / "onnx")
    onnx = OnnxModel(tmp_path / "onnx")
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 9))  # other sizes than the traced example
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    types = torch.zeros_like(ids)
    types[2, 4:] = 1
    hidden, embeddings = onnx.encode(ids.numpy(), mask.numpy(), types.numpy())
    with torch.no_grad():
        ref = model.encode(ids, token_type_ids=types, attention_mask=mask)
        ref_emb = model.embed(ids, mask, token_type_ids=types)
    np.testing.assert_allclose(hidden, ref.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(embeddings, ref_emb.numpy(), atol=1e-4, rtol=0)
    assert {p.name for p in (tmp_path / "onnx").iterdir()} >= {"model.onnx", "onnx_config.json", "summary.json"}


def test_encoder_decoder_greedy_equals_generate(tmp_path):
    """T5 style (relative position bias, whose key length is the past + new length in the graph)."""
    model, ckpt = tiny_checkpoint(tmp_path / "ckpt", **T5)
    to_onnx(ckpt, tmp_path / "onnx")
    assert {"encoder.onnx", "decoder.onnx"} <= {p.name for p in (tmp_path / "onnx").iterdir()}
    onnx = OnnxModel(tmp_path / "onnx")
    steps: list[np.ndarray] = []
    tokens = onnx.greedy(PROMPTS, 10, logits_out=steps)  # two sources of different lengths: padded
    assert tokens == [list(generate(model, p, 10, temperature=0)) for p in PROMPTS]
    src, new = PROMPTS[1], tokens[1]
    with torch.no_grad():
        dec = torch.tensor([[model.config.decoder_start_token_id] + new[:-1]])
        ref, _ = model(torch.tensor([src]), decoder_input_ids=dec)
    np.testing.assert_allclose(np.stack([s[1] for s in steps]), ref[0].numpy(), atol=1e-4, rtol=0)


@pytest.mark.slow  # ~25 s on 2 cores: four experts per layer traced
def test_moe_exports_densely_with_the_same_tokens(tmp_path):
    """A Mixture-of-Experts GPT exports with each MoE layer computed densely (`DenseMoE`): same tokens, same logits."""
    model, ckpt = tiny_checkpoint(tmp_path / "ckpt", **LLAMA, moe={"num_experts": 4, "top_k": 2})
    summary = to_onnx(ckpt, tmp_path / "onnx")
    assert summary["metrics"]["dense_moe_layers"] == 2
    prompt = PROMPTS[0]
    steps: list[np.ndarray] = []
    tokens = OnnxModel(tmp_path / "onnx").greedy([prompt], 8, logits_out=steps)[0]
    assert tokens == list(generate(model, prompt, 8, temperature=0))
    np.testing.assert_allclose(np.stack([s[0] for s in steps]), reference_logits(model, prompt, tokens),
                               atol=1e-4, rtol=0)


@pytest.mark.slow  # one more export (~10-20 s on 2 cores)
def test_adapter_checkpoint_exports_with_its_adapter(tmp_path, tokenizer_file):
    """A prefix-tuning run's checkpoint (adapter_config.json beside the weights): the export runs the
    adapter's attention (its prefix keys/values ahead of the cached ones), as `generate` does."""
    torch.manual_seed(0)
    config = ModelConfig(**TINY)
    model = build_model(config)
    base_keys = set(model.state_dict())
    options = AdapterOptions(method="prefix", prefix_len=4)
    model = apply_adapter(model, options)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_checkpoint(tmp_path / "ckpt", model.state_dict(), config.to_dict(), tokenizer_file, None,
                    drop=tied_aliases(model), base_keys=base_keys,
                    write_files=lambda d: write_adapter_config(d, model, options, None))
    to_onnx(tmp_path / "ckpt", tmp_path / "onnx")
    prompt = PROMPTS[0]
    steps: list[np.ndarray] = []
    tokens = OnnxModel(tmp_path / "onnx").greedy([prompt], 8, logits_out=steps)[0]
    assert tokens == list(generate(model.eval(), prompt, 8, temperature=0))
    np.testing.assert_allclose(np.stack([s[0] for s in steps]), reference_logits(model, prompt, tokens),
                               atol=1e-4, rtol=0)
    with adapters_disabled(model):  # the prefix matters: without it the logits differ
        plain = reference_logits(model, prompt, tokens)
    assert np.abs(plain - np.stack([s[0] for s in steps])).max() > 1e-2


# ---- bad input: one line, exit 2, nothing written -----------------------------------------------


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("bad") / "ckpt")[1]


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["convert", "to-onnx", *args])
    err = capsys.readouterr().err.strip()
    return code, err


def test_opset_too_low_is_refused(small_ckpt, tmp_path, capsys):
    code, err = run_cli([str(small_ckpt), str(tmp_path / "out"), "--opset", "17"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "--opset 17" in err and "18" in err
    assert not (tmp_path / "out").exists()
    code, err = run_cli([str(small_ckpt), str(tmp_path / "out"), "--opset", "99"], capsys)
    assert code == 2 and "--opset 99" in err and not (tmp_path / "out").exists()


def test_unsupported_architecture_and_quantized_checkpoints_are_refused(small_ckpt, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_bytes((small_ckpt / "model.safetensors").read_bytes())
    (other / "config.json").write_text(json.dumps({**json.loads((small_ckpt / "config.json").read_text()),
                                                   "arch": "mamba"}))
    code, err = run_cli([str(other), str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "mamba" in err and "gpt, bert, encdec" in err
    (other / "config.json").write_text((small_ckpt / "config.json").read_text())
    (other / "quant_config.json").write_text('{"method": "int4"}')
    code, err = run_cli([str(other), str(tmp_path / "out")], capsys)
    assert code == 2 and "quant_config.json" in err and "--int8" in err
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(small_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli([str(small_ckpt), str(out)], capsys)
    assert code == 2 and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_failed_export_leaves_nothing(small_ckpt, tmp_path, monkeypatch):
    """The exporter failing (here: on purpose, after the checks) leaves no OUT and no temp dir, and
    an existing OUT is kept as it was even with overwrite."""
    import lmforge.export.onnx as onnx_export

    def fail(*args, **kwargs):
        raise RuntimeError("cannot express aten::something\nmore detail")

    monkeypatch.setattr(onnx_export.torch.onnx, "export", fail)
    with pytest.raises(UserError, match="cannot express this model's model graph .RuntimeError: cannot express"):
        to_onnx(small_ckpt, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UserError):
        to_onnx(small_ckpt, tmp_path / "out", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "keep.txt").read_text() == "mine"
