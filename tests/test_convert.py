"""Tests for `lmforge convert`: HF GPT-2 / Llama / Mistral <-> lmforge checkpoints.

Random-weight models built from `transformers` config classes (no download) are the
independent reference: our logits must match theirs after from-hf, HF -> lmforge -> HF must
reproduce every tensor exactly, and HF must load our to-hf output with the same logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.export.hf import from_hf, to_hf
from lmforge.models import GPT, ModelConfig
from lmforge.train.checkpoint import load_pretrained, save_checkpoint, tied_aliases

transformers = pytest.importorskip("transformers")

VOCAB = 320  # >= the test tokenizer (byte-level char: 276 tokens)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _perturb_(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Move every parameter off its init (ones, zeros) so a mis-mapped norm or bias shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def hf_gpt2(**kw):
    cfg = dict(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, resid_pdrop=0.0,
               embd_pdrop=0.0, attn_pdrop=0.0)
    cfg.update(kw)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).eval()


def hf_llama(cls: str = "Llama", **kw):
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
               rms_norm_eps=1e-6, tie_word_embeddings=False)
    if cls == "Mistral":
        cfg["sliding_window"] = None
    cfg.update(kw)
    config = getattr(transformers, f"{cls}Config")(**cfg)
    return getattr(transformers, f"{cls}ForCausalLM")(config).eval()


MODELS = {
    "gpt2": lambda: hf_gpt2(),
    "gpt2-untied-relu": lambda: hf_gpt2(tie_word_embeddings=False, activation_function="relu", n_inner=96),
    "llama-gqa": lambda: hf_llama(rope_theta=500000.0),
    "llama-tied-mha": lambda: hf_llama(tie_word_embeddings=True, num_key_value_heads=4),
    "mistral": lambda: hf_llama("Mistral", num_key_value_heads=1),
}


def save_hf(model, path: Path, tokenizer_file: Path | None = None) -> Path:
    _perturb_(model)
    model.save_pretrained(path)
    if tokenizer_file is not None:
        (path / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    return path


def logits_of(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(idx)
    return out[0] if isinstance(out, tuple) else out.logits


# --------------------------------------------------------------------------------------------
# from-hf: logits and exact round trip


@pytest.mark.parametrize("name", list(MODELS))
def test_from_hf_logits_match_and_round_trip_is_exact(name, tmp_path, tokenizer_file):
    hf = MODELS[name]()
    hf_dir = save_hf(hf, tmp_path / "hf", tokenizer_file)
    summary = from_hf(hf_dir, tmp_path / "ckpt")
    assert summary["metrics"]["tokenizer"] is True
    ours, _ = load_pretrained(tmp_path / "ckpt")
    idx = torch.randint(0, VOCAB, (2, 32))
    torch.testing.assert_close(logits_of(ours, idx), logits_of(hf, idx), atol=1e-4, rtol=0)

    to_hf(tmp_path / "ckpt", tmp_path / "back")
    original, back = load_file(str(hf_dir / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(back) == sorted(original)  # names; GPT-2's attn.bias/masked_bias are non-persistent
    for key, tensor in original.items():
        assert back[key].shape == tensor.shape and back[key].dtype == tensor.dtype, key
        assert torch.equal(back[key], tensor), key


def test_bf16_weights_round_trip_exactly_in_bf16(tmp_path):
    hf = MODELS["llama-gqa"]().to(torch.bfloat16)
    hf_dir = save_hf(hf, tmp_path / "hf")
    from_hf(hf_dir, tmp_path / "ckpt")
    to_hf(tmp_path / "ckpt", tmp_path / "back")
    original, back = load_file(str(hf_dir / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(back) == sorted(original)
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], original[k]) for k in original)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_from_hf_reads_sharded_index_and_pytorch_bin(name, tmp_path):
    hf = MODELS[name]()
    hf_dir = save_hf(hf, tmp_path / "hf")
    state = load_file(str(hf_dir / "model.safetensors"))
    (hf_dir / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for file, names in shards.items():
        save_file({k: state[k] for k in names}, str(hf_dir / file))
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, names in shards.items() for k in names}}))
    from_hf(hf_dir, tmp_path / "from-shards")
    for file in shards:
        (hf_dir / file).unlink()
    (hf_dir / "model.safetensors.index.json").unlink()
    torch.save(state, hf_dir / "pytorch_model.bin")
    from_hf(hf_dir, tmp_path / "from-bin")
    # files saved from the base model class lack its prefix ("transformer." / "model."), and older
    # GPT-2 files hold the causal-mask buffers: both read the same
    prefix = "transformer." if name == "gpt2" else "model."
    bare = {k.removeprefix(prefix): v for k, v in state.items()}
    assert not any(k.startswith(prefix) for k in bare)
    if name == "gpt2":
        bare.update({"h.0.attn.bias": torch.ones(1, 1, 32, 32).tril(), "h.0.attn.masked_bias": torch.tensor(-1e4)})
    torch.save(bare, hf_dir / "pytorch_model.bin")
    from_hf(hf_dir, tmp_path / "from-bare")
    a, b = load_file(str(tmp_path / "from-shards" / "model.safetensors")), load_file(str(tmp_path / "from-bin" / "model.safetensors"))
    c = load_file(str(tmp_path / "from-bare" / "model.safetensors"))
    assert sorted(a) == sorted(b) == sorted(c) and all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)


# --------------------------------------------------------------------------------------------
# to-hf: transformers loads our output


GPT2_STYLE = dict(pos_encoding="learned", norm="layernorm", mlp="gelu_tanh", bias=True, tie_embeddings=True)
LLAMA_STYLE = dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False,
                   n_kv_head=2, rope_theta=10000.0, norm_eps=1e-6)


@pytest.mark.parametrize("style", [GPT2_STYLE, dict(GPT2_STYLE, mlp="gelu", tie_embeddings=False), LLAMA_STYLE,
                                   dict(LLAMA_STYLE, tie_embeddings=True)],
                         ids=["gpt2", "gpt2-gelu-untied", "llama", "llama-tied"])
def test_to_hf_loads_in_transformers_with_the_same_logits(style, tmp_path, tokenizer_file):
    config = ModelConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=64, block_size=32, **style)
    ours = GPT(config).eval()
    _perturb_(ours)
    save_checkpoint(tmp_path / "ckpt", ours.state_dict(), config.to_dict(), tokenizer_file, None,
                    drop=tied_aliases(ours))
    summary = to_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert summary["metrics"]["model_type"] == ("gpt2" if style["pos_encoding"] == "learned" else "llama")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    idx = torch.randint(0, VOCAB, (2, 32))
    torch.testing.assert_close(logits_of(hf, idx), logits_of(ours, idx), atol=1e-4, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert tok("the king")["input_ids"]


# --------------------------------------------------------------------------------------------
# Bad input: one-line errors naming the field


class NotATensor:
    """Pickled into a pytorch_model.bin: torch.load(weights_only=True) must refuse it."""


def _config(hf_dir: Path, **changes) -> None:
    file = hf_dir / "config.json"
    cfg = json.loads(file.read_text())
    cfg.update(changes)
    file.write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,match", [
    (dict(model_type="xlnet"), r"model_type='xlnet' is not supported; allowed: gpt2, llama, mistral"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}), r"rope_type='llama3'"),
    (dict(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0}), r"rope_scaling\.rope_type='linear'"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported; allowed: 'silu'"),
    (dict(attention_bias=True), r"attention_bias=True is not supported"),
    (dict(head_dim=32), r"head_dim=32 is not supported; allowed: hidden_size / num_attention_heads = 16"),
    (dict(hidden_size=96, head_dim=24), r"tensor 'model\.embed_tokens\.weight' has shape \(320, 64\) but config\.json implies \(320, 96\)"),
    (dict(num_key_value_heads=4), r"tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(32, 64\)"),
    (dict(num_hidden_layers=3), r"missing tensor 'model\.layers\.2\.self_attn\.q_proj\.weight'"),
    (dict(num_hidden_layers=1), r"unexpected tensor 'model\.layers\.1\."),
    (dict(model_type="mistral", sliding_window=16), r"sliding_window=16 < max_position_embeddings=32"),
    (dict(num_attention_heads=3, head_dim=None), r"config\.json: model\.n_head: n_embd=64 is not divisible by n_head=3"),
], ids=["model_type", "rope_scaling", "rope_scaling_old", "hidden_act", "attention_bias", "head_dim", "shape", "gqa-shape",
        "missing", "extra", "sliding-window", "heads-divide-width"])
def test_from_hf_rejects_bad_input_in_one_line(changes, match, tmp_path):
    hf_dir = save_hf(MODELS["llama-gqa"](), tmp_path / "hf")
    _config(hf_dir, **changes)
    with pytest.raises(UserError, match=match) as err:
        from_hf(hf_dir, tmp_path / "ckpt")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "ckpt").exists()


def test_from_hf_rejects_truncated_weights_and_gpt2_features(tmp_path):
    hf_dir = save_hf(MODELS["gpt2"](), tmp_path / "hf")
    _config(hf_dir, scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(UserError, match=r"scale_attn_by_inverse_layer_idx=True is not supported; allowed: False"):
        from_hf(hf_dir, tmp_path / "ckpt")
    _config(hf_dir, scale_attn_by_inverse_layer_idx=False)
    weights = hf_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match=r"model\.safetensors is truncated or corrupt"):
        from_hf(hf_dir, tmp_path / "ckpt")
    weights.unlink()
    with pytest.raises(UserError, match=r"no model\.safetensors"):
        from_hf(hf_dir, tmp_path / "ckpt")
    torch.save({"transformer.wte.weight": torch.zeros(2), "payload": NotATensor()}, hf_dir / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"pytorch_model\.bin cannot be read safely \(UnpicklingError\)"):
        from_hf(hf_dir, tmp_path / "ckpt")  # weights_only: a pickle may not run code
    with pytest.raises(UserError, match=r"config\.json does not exist"):
        from_hf(tmp_path / "nowhere", tmp_path / "ckpt")


@pytest.mark.parametrize("changes,match", [
    (dict(pos_encoding="sinusoidal"), r"model\.pos_encoding='sinusoidal'.*allowed: learned \(GPT-2 layout\) or rope"),
    (dict(norm="rmsnorm"), r"model\.norm='rmsnorm'.*needs norm=layernorm"),
    (dict(bias=False), r"model\.bias=False.*needs bias=true"),
    (dict(mlp="swiglu"), r"model\.mlp='swiglu'.*needs mlp=gelu_tanh, gelu or relu"),
    (dict(LLAMA_STYLE, mlp="gelu"), r"model\.mlp='gelu'.*needs mlp=swiglu"),
    (dict(LLAMA_STYLE, bias=True), r"model\.bias=True.*needs bias=false"),
], ids=["sinusoidal", "gpt2-rmsnorm", "gpt2-nobias", "gpt2-swiglu", "llama-gelu", "llama-bias"])
def test_to_hf_rejects_unrepresentable_configs(changes, match, tmp_path):
    config = ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=32, block_size=16, **changes)
    model = GPT(config)
    save_checkpoint(tmp_path / "ckpt", model.state_dict(), config.to_dict(), None, None, drop=tied_aliases(model))
    with pytest.raises(UserError, match=match):
        to_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_to_hf_rejects_a_checkpoint_that_does_not_match_its_config(tmp_path):
    config = ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=32, block_size=16, **LLAMA_STYLE)
    state = GPT(config).state_dict()
    save_checkpoint(tmp_path / "a", {**state, "blocks.1.attn.qkv.weight": torch.zeros(1)}, config.to_dict(), None, None)
    with pytest.raises(UserError, match=r"unexpected tensor 'blocks\.1\.attn\.qkv\.weight'"):
        to_hf(tmp_path / "a", tmp_path / "hf")
    state["norm.weight"] = torch.ones(8)
    save_checkpoint(tmp_path / "b", state, config.to_dict(), None, None)
    with pytest.raises(UserError, match=r"tensor 'norm\.weight' has shape \(8,\), config\.json implies \(32,\)"):
        to_hf(tmp_path / "b", tmp_path / "hf")
    del state["norm.weight"]
    save_checkpoint(tmp_path / "c", state, config.to_dict(), None, None)
    with pytest.raises(UserError, match=r"missing tensor 'norm\.weight'"):
        to_hf(tmp_path / "c", tmp_path / "hf")


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_convert_round_trip(tmp_path, tokenizer_file, capsys):
    hf = MODELS["llama-gqa"]()
    hf_dir = save_hf(hf, tmp_path / "hf", tokenizer_file)
    assert main(["convert", "from-hf", str(hf_dir), str(tmp_path / "ckpt")]) == 0
    assert main(["convert", "to-hf", str(tmp_path / "ckpt"), str(tmp_path / "back")]) == 0
    out = capsys.readouterr().out
    assert "llama" in out and str(tmp_path / "back") in out
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", local_files_only=True).eval()
    idx = torch.randint(0, VOCAB, (1, 16))
    torch.testing.assert_close(logits_of(back, idx), logits_of(hf, idx), atol=0, rtol=0)
    _config(hf_dir, model_type="falcon")
    capsys.readouterr()
    assert main(["convert", "from-hf", str(hf_dir), str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "model_type='falcon'" in err
