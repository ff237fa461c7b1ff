"""Fast CPU decoding (issue 14 item 6): the engine's transposed output layer and the 8-bit output
layer of quantized checkpoints. References: the model's own forward (F.linear over the untouched
weight) for values and greedy tokens, a hand quantization of the head for the int8 copy, and the
checkpoint reloaded from disk."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lmforge.compress.modules import Int8DynamicLinear, Int8Linear
from lmforge.compress.quantize import quant_config, quantize_model
from lmforge.errors import UserError
from lmforge.infer.engine import (
    TRANSPOSED,
    Engine,
    LastPositionHead,
    SamplingParams,
    TransposedLinear,
    inference_layout,
    transposed_output_layer,
)
from lmforge.infer.generate import generate_batch
from lmforge.models import build_model
from lmforge.models.config import ModelConfig


def tiny(**kw) -> nn.Module:
    torch.manual_seed(3)
    base = {"vocab_size": 300, "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 48}
    return build_model(ModelConfig.from_dict({**base, **kw})).eval()


def greedy(model, prompts, n=12, **engine_kw) -> list[list[int]]:
    engine = Engine(model, max_batch=len(prompts), **engine_kw)
    ids = {engine.add(p, SamplingParams(n, temperature=0.0)): i for i, p in enumerate(prompts)}
    out = [[] for _ in prompts]
    while engine.has_work:
        for event in engine.step():
            out[ids[event.request_id]].append(event.token_id)
    return out


@pytest.mark.parametrize("tie", [True, False])
def test_transposed_head_gives_the_model_logits_and_tokens(tie):
    model = tiny(tie_embeddings=tie)
    head = model.lm_head
    x = torch.randint(0, 300, (3, 7))
    with torch.inference_mode():
        ref = model(x)[0]
        with transposed_output_layer(model):
            assert isinstance(model.lm_head, TransposedLinear)
            fast = model(x)[0]
    assert model.lm_head is head and type(head) is nn.Linear  # restored
    assert torch.allclose(fast, ref, atol=1e-5, rtol=1e-5)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    assert greedy(model, prompts) == greedy(model, prompts, fast_head=False)
    assert head in TRANSPOSED and TRANSPOSED[head][1].is_contiguous()
    assert torch.equal(TRANSPOSED[head][1], head.weight.detach().t())


def test_transposed_copy_follows_weight_updates():
    """An in-place update of the weight (an optimizer step between two generations) is seen."""
    model = tiny(tie_embeddings=False)
    prompts = [[5, 6, 7]]
    before = greedy(model, prompts)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)  # flips every logit's sign: another argmax
    after = greedy(model, prompts)
    assert after == greedy(model, prompts, fast_head=False) and after[0][0] != before[0][0]


def test_transposed_head_only_where_it_applies():
    """Not under autocast (bf16 GEMVs are faster in the (out, in) layout), not for bf16 weights,
    not for a wrapped head; generate_batch's tokens stay the plain forward's in every case."""
    model = tiny()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(  # under the prefill's LastPositionHead
        type(m.lm_head.head if isinstance(m.lm_head, LastPositionHead) else m.lm_head)))
    generate_batch(model, [[1, 2]], 2, temperature=0.0, autocast_dtype=torch.bfloat16)
    assert seen and set(seen) == {nn.Linear}
    seen.clear()
    generate_batch(model, [[1, 2]], 2, temperature=0.0)
    assert set(seen) == {TransposedLinear}
    seen.clear()
    quantize_model(model, "bf16")
    generate_batch(model, [[1, 2]], 2, temperature=0.0)
    assert set(seen) == {nn.Linear}


@pytest.mark.parametrize("method,head_cls", [("int4", Int8Linear), ("int8", Int8Linear),
                                             ("int8-dynamic", Int8DynamicLinear)])
def test_quantized_output_layer_is_an_8bit_copy(method, head_cls):
    model = tiny()
    embedding = model.tok_embeddings.weight.detach().clone()
    x = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        ref = model(x)[0]
    quantize_model(model, method, group_size=32, lm_head=True)
    assert type(model.lm_head) is head_cls
    assert torch.equal(model.tok_embeddings.weight, embedding)  # the lookup keeps the fp weights
    scales = embedding.abs().amax(dim=1) / 127  # per output row (token), symmetric
    codes = torch.round(embedding / scales[:, None]).clamp(-127, 127)
    assert torch.allclose(model.lm_head.dequantized_weight(), codes * scales[:, None], atol=1e-7)
    with torch.no_grad():
        err = float((model(x)[0] - ref).abs().max() / ref.abs().max())
    assert err < (0.3 if method == "int4" else 0.05)
    config = quant_config(model, method, group_size=32)
    assert config["lm_head"] == method if method != "int4" else config["lm_head"] == "int8"
    assert "lm_head" in config["modules"]
    assert "lm_head" not in quant_config(quantize_model(tiny(), method, group_size=32), method, group_size=32)
    with pytest.raises(UserError, match="lm_head quantization is for integer methods"):
        quantize_model(tiny(), "bf16", lm_head=True)


def test_quantized_output_layer_round_trips_through_a_checkpoint(tmp_path, tokenizer_file):
    from lmforge.train.checkpoint import load_pretrained, save_checkpoint, tied_aliases

    model = quantize_model(tiny(), "int4", group_size=32, lm_head=True)

    def write(tmp):
        (tmp / "quant_config.json").write_text(json.dumps(quant_config(model, "int4", group_size=32)))

    save_checkpoint(tmp_path / "q", model.state_dict(), model.config.to_dict(), tokenizer_file, None,
                    drop=tied_aliases(model), write_files=write)
    loaded, _ = load_pretrained(tmp_path / "q")
    assert type(loaded.lm_head) is Int8Linear
    x = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])
    assert greedy(loaded, [[3, 4, 5]]) == greedy(model, [[3, 4, 5]])


def test_decode_benchmark_new_columns(tmp_path):
    """decode_speed.py: the "+head" variants, the --plain-head side, and llama.cpp decoding GGUF files
    written by lmforge's to_gguf (its f32 greedy tokens equal lmforge fp32's)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "decode_speed.py"
    spec = importlib.util.spec_from_file_location("decode_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--layers", "2", "--width", "32", "--heads", "2", "--vocab", "384", "--block-size", "32",
                         "--prompt-len", "5", "--new-tokens", "6", "--batches", "1", "2", "--repeats", "1",
                         "--group-size", "32", "--variants", "fp32", "int8+head", "--plain-head",
                         "--threads", "1", "--clock", "cpu"])
    rows = {(r["variant"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {("fp32", 1), ("fp32", 2), ("int8+head", 1), ("int8+head", 2)}
    assert rows["fp32", 1]["plain_head_same_tokens"] and rows["fp32", 2]["plain_head_same_tokens"]
    assert "lmforge_plain_head_tokens_per_s" not in rows["int8+head", 1]
    assert rows["fp32", 2]["same_tokens"]  # transformers agrees too
    llama = result["llama_cpp"]
    if llama["status"].startswith("not installed"):
        pytest.skip("llama-cpp-python is not installed")
    assert llama["status"].endswith("lmforge convert to-gguf"), llama["status"]
    assert llama["f32_ids"] == rows["fp32", 1]["lmforge_ids"][0] and len(llama["q8_0_ids"]) == 6


def test_prefill_computes_the_output_layer_at_each_row_s_last_position_only():
    """Prompts of different lengths: the engine's first tokens (from the prefill) are the argmax of the
    model's own logits at each prompt's last position, and the output layer saw one position per row."""
    model = tiny()
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11]]
    shapes = []
    model.lm_head.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    first = [ids[0] for ids in greedy(model, prompts, n=1, fast_head=False)]
    assert shapes == [(3, 1, 32)]
    with torch.no_grad():
        expected = [int(model(torch.tensor([p]))[0][0, -1].argmax()) for p in prompts]
    assert first == expected


def test_inference_layout_keeps_values_ties_and_tokens():
    """Every Linear weight stored (in, out): the same Parameters and values, tied weights still one
    tensor, the model's logits up to round-off, the same greedy tokens; the engine then needs no copy."""
    model, plain = tiny(), tiny()
    params = dict(model.named_parameters())
    inference_layout(model)
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    assert model.lm_head.weight is model.tok_embeddings.weight and model.lm_head.weight.t().is_contiguous()
    assert model.blocks[0].attn.qkv.weight.t().is_contiguous() and model.blocks[0].attn_norm.weight.is_contiguous()
    for (name, a), b in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(a, b), name
    x = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        assert torch.allclose(model(x)[0], plain(x)[0], atol=1e-5, rtol=1e-5)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(type(m.lm_head)))
    assert greedy(model, prompts) == greedy(plain, prompts, fast_head=False)
    assert TransposedLinear not in seen  # already (in, out): no transposed copy


def test_decode_benchmark_cpu_clock_needs_one_thread():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "decode_speed.py"
    spec = importlib.util.spec_from_file_location("decode_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit):
        bench.parse_args(["--clock", "cpu"])
    assert bench.parse_args(["--clock", "cpu", "--threads", "1"]).clock == "cpu"
