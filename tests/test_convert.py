"""Tests for `lmforge convert`: HF GPT-2 / Llama / Mistral <-> lmforge checkpoints.

Random-weight models built from `transformers` config classes (no download) are the
independent reference: our logits must match theirs after from-hf, HF -> lmforge -> HF must
reproduce every tensor exactly, and HF must load our to-hf output with the same logits.
Also here: convert never writes over or into its input; the tokenizer a BERT export ships adds
[CLS]/[SEP] as lmforge does (checked against `AutoTokenizer` and `SentenceTransformer`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.export.hf import from_hf, to_hf
from lmforge.models import BERT, GPT, ModelConfig
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
    cfg = dict(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1,
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
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
    original = load_file(str(hf_dir / "model.safetensors"))
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(back) == sorted(original)  # names; GPT-2's attn.bias/masked_bias are non-persistent
    for key, tensor in original.items():
        assert back[key].shape == tensor.shape and back[key].dtype == tensor.dtype, key
        assert torch.equal(back[key], tensor), key


def test_bf16_weights_round_trip_exactly_in_bf16(tmp_path):
    hf = MODELS["llama-gqa"]().to(torch.bfloat16)
    hf_dir = save_hf(hf, tmp_path / "hf")
    from_hf(hf_dir, tmp_path / "ckpt")
    to_hf(tmp_path / "ckpt", tmp_path / "back")
    original = load_file(str(hf_dir / "model.safetensors"))
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
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
    a = load_file(str(tmp_path / "from-shards" / "model.safetensors"))
    b = load_file(str(tmp_path / "from-bin" / "model.safetensors"))
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
    (dict(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}),
     r"rope_scaling\.type='dynamic' \(RoPE scaling\) is not supported; lmforge implements unscaled RoPE only"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported; allowed: 'silu'"),
    (dict(attention_bias=True), r"attention_bias=True is not supported"),
    # a head_dim other than hidden_size / heads is a model transformers builds: the weights decide
    (dict(head_dim=32),
     r"tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' has shape \(64, 64\) but config\.json implies \(128, 64\)"),
    (dict(num_attention_heads=5, head_dim=16),
     r"config\.json: hidden_size=64 is not divisible by num_attention_heads=5; transformers' Llama requires it"),
    (dict(num_key_value_heads=3), r"config\.json: num_key_value_heads=3 does not divide num_attention_heads=4"),
    (dict(hidden_size=96, head_dim=24),
     r"tensor 'model\.embed_tokens\.weight' has shape \(320, 64\) but config\.json implies \(320, 96\)"),
    (dict(num_key_value_heads=4), r"tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(32, 64\)"),
    (dict(num_hidden_layers=3), r"missing tensor 'model\.layers\.2\.self_attn\.q_proj\.weight'"),
    (dict(num_hidden_layers=1), r"unexpected tensor 'model\.layers\.1\."),
    (dict(model_type="mistral", sliding_window=16), r"sliding_window=16 < max_position_embeddings=32"),
    (dict(model_type="mistral", num_attention_heads=3, num_key_value_heads=3, head_dim=None),
     r"config\.json: hidden_size // num_attention_heads = 64 // 3 = 21 \(there is no head_dim\) is odd; "
     r"RoPE needs an even head dim"),
], ids=["model_type", "rope_scaling", "rope_scaling_old", "hidden_act", "attention_bias", "head_dim",
        "llama-heads-divide-width", "kv-heads", "shape", "gqa-shape", "missing", "extra", "sliding-window",
        "odd-head-dim"])
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


def test_cli_from_hf_needs_a_tokenizer_json(tmp_path, capsys):
    hf_dir = save_hf(MODELS["gpt2"](), tmp_path / "hf")  # no tokenizer.json
    capsys.readouterr()
    assert main(["convert", "from-hf", str(hf_dir), str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {hf_dir / 'tokenizer.json'} does not exist; an lmforge checkpoint carries its "
                          "tokenizer") and err.count("\n") == 1
    assert not (tmp_path / "ckpt").exists()
    # what it prevents: the library still converts the weights alone, and that checkpoint cannot be loaded
    assert from_hf(hf_dir, tmp_path / "weights-only")["metrics"]["tokenizer"] is False
    with pytest.raises(UserError, match=r"tokenizer\.json is missing; the checkpoint is incomplete"):
        load_pretrained(tmp_path / "weights-only")


# --------------------------------------------------------------------------------------------
# Output directories: never the input, never inside or around it; a non-empty one needs --overwrite


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_convert_never_writes_over_into_or_around_its_input(tmp_path, tokenizer_file, capsys):
    hf_dir = save_hf(MODELS["llama-gqa"](), tmp_path / "hf", tokenizer_file)
    ckpt, run = tmp_path / "ckpt", tmp_path / "run"
    assert main(["convert", "from-hf", str(hf_dir), str(ckpt)]) == 0
    shutil.copytree(ckpt, run / "checkpoints" / "best")  # a run dir: to-hf reads its best checkpoint
    (tmp_path / "link").symlink_to(ckpt)
    before = {p: _tree(p) for p in (hf_dir, ckpt, run)}
    cases = [
        (["from-hf", hf_dir, hf_dir], "is the HF model dir being converted"),
        (["from-hf", hf_dir, hf_dir / "lmforge"], "is inside the HF model dir being converted"),
        (["from-hf", hf_dir, tmp_path], "contains the HF model dir being converted"),
        (["to-hf", ckpt, ckpt], "is the checkpoint being converted"),
        (["to-hf", ckpt, tmp_path / "link"], "is the checkpoint being converted"),  # the same dir, another name
        (["to-hf", ckpt, tmp_path / "hf" / ".." / "ckpt"], "is the checkpoint being converted"),
        (["to-hf", ckpt, ckpt / "hf"], "is inside the checkpoint being converted"),
        (["to-hf", run, run / "checkpoints" / "best"], "is the checkpoint being converted"),
        (["to-hf", run, run / "hf"], "is inside the run dir being converted"),  # a stage never edits another's output
        (["to-hf", run / "checkpoints" / "best", run], "contains the checkpoint being converted"),
    ]
    for args, message in cases:
        for overwrite in ([], ["--overwrite"]):  # --overwrite replaces other dirs, never the input
            capsys.readouterr()
            assert main(["convert", *map(str, args), *overwrite]) == 2, args
            err = capsys.readouterr().err
            assert err.startswith(f"error: output {args[2]} {message}") and err.count("\n") == 1, (args, err)
    assert {p: _tree(p) for p in before} == before
    assert not (hf_dir / "lmforge").exists() and not (ckpt / "hf").exists() and not (run / "hf").exists()


def test_convert_refuses_a_symlink_or_the_working_directory_as_output(tmp_path, tokenizer_file, capsys, monkeypatch):
    """A symlinked output would be swapped for a real dir (the linked one left as it was); "." or a
    parent of the working directory would be renamed away under the user: one line, exit 2."""
    hf_dir = save_hf(MODELS["gpt2"](), tmp_path / "hf", tokenizer_file)
    ckpt = tmp_path / "ckpt"
    assert main(["convert", "from-hf", str(hf_dir), str(ckpt)]) == 0
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "full")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "a" / "work").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "work")
    for out, message in [(tmp_path / "link", "is a symbolic link"), (tmp_path / "dangling", "is a symbolic link"),
                         (".", "is or contains the current directory"),
                         (tmp_path / "a", "is or contains the current directory")]:
        capsys.readouterr()
        assert main(["convert", "to-hf", str(ckpt), str(out), "--overwrite"]) == 2, out
        err = capsys.readouterr().err
        assert err.startswith(f"error: output {out} {message}") and err.count("\n") == 1, err
    assert (tmp_path / "full" / "keep.txt").read_text() == "x" and (tmp_path / "link").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "ckpt", "dangling", "full", "hf", "link"]
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["work"]


def test_convert_replaces_a_non_empty_output_only_with_overwrite(tmp_path, tokenizer_file, capsys):
    hf_dir = save_hf(MODELS["gpt2"](), tmp_path / "hf", tokenizer_file)
    out = tmp_path / "existing"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert main(["convert", "from-hf", str(hf_dir), str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {out} already exists and is not empty; "
                   "use --overwrite to replace it, or another output dir\n")
    assert _tree(out) == {"notes.txt": b"keep me"}
    # --overwrite, and the conversion fails: the old dir is still whole (the new one is built aside)
    _config(hf_dir, n_layer=3)
    assert main(["convert", "from-hf", str(hf_dir), str(out), "--overwrite"]) == 2
    assert "missing tensor 'transformer.h.2.ln_1.weight'" in capsys.readouterr().err
    assert _tree(out) == {"notes.txt": b"keep me"}
    _config(hf_dir, n_layer=2)
    assert main(["convert", "from-hf", str(hf_dir), str(out), "--overwrite"]) == 0
    assert sorted(_tree(out)) == ["config.json", "model.safetensors", "summary.json", "tokenizer.json"]

    hf_out = tmp_path / "hf-out"
    hf_out.mkdir()  # an empty dir is taken as it is
    assert main(["convert", "to-hf", str(out), str(hf_out)]) == 0
    assert main(["convert", "to-hf", str(out), str(hf_out)]) == 2
    assert f"{hf_out} already exists and is not empty; use --overwrite" in capsys.readouterr().err
    assert main(["convert", "to-hf", str(out), str(hf_out), "--overwrite"]) == 0
    (tmp_path / "a-file").write_text("x")
    assert main(["convert", "to-hf", str(out), str(tmp_path / "a-file"), "--overwrite"]) == 2
    assert "a-file exists and is not a directory" in capsys.readouterr().err
    assert (tmp_path / "a-file").read_text() == "x"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


# --------------------------------------------------------------------------------------------
# Head widths, RoPE scaling, Mistral


@pytest.mark.parametrize("cls,kw,drop_head_dim", [
    ("Llama", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32), False),  # wider heads (Qwen3-like)
    ("Mistral", dict(num_attention_heads=5, num_key_value_heads=1, head_dim=16), False),  # 5 heads on a width of 64
    ("Mistral", dict(num_attention_heads=5, num_key_value_heads=5, head_dim=12), True),  # no head_dim: 64 // 5
], ids=["llama-head-dim-32", "mistral-5x16", "mistral-no-head-dim"])
def test_heads_that_do_not_tile_the_width_convert_exactly(cls, kw, drop_head_dim, tmp_path, tokenizer_file):
    """transformers takes head_dim * heads != hidden_size (and, without head_dim, hidden_size //
    heads); lmforge's attention takes any head width, so these convert with the same logits."""
    hf = hf_llama(cls, **kw)
    hf_dir = save_hf(hf, tmp_path / "hf", tokenizer_file)
    if drop_head_dim:
        config = json.loads((hf_dir / "config.json").read_text())
        del config["head_dim"]
        (hf_dir / "config.json").write_text(json.dumps(config))
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    from_hf(hf_dir, tmp_path / "ckpt")
    ours, _ = load_pretrained(tmp_path / "ckpt")
    assert ours.config.head_dim == kw["head_dim"] and ours.config.n_head * ours.config.head_dim != 64
    idx = torch.randint(0, VOCAB, (2, 32))
    torch.testing.assert_close(logits_of(ours, idx), logits_of(hf, idx), atol=1e-4, rtol=0)
    to_hf(tmp_path / "ckpt", tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", local_files_only=True).eval()
    assert type(back).__name__ == f"{cls}ForCausalLM" and back.config.head_dim == kw["head_dim"]
    torch.testing.assert_close(logits_of(back, idx), logits_of(hf, idx), atol=0, rtol=0)


def test_mistral_goes_back_as_mistral_and_our_rope_models_as_llama(tmp_path, tokenizer_file):
    hf = MODELS["mistral"]()
    hf_dir = save_hf(hf, tmp_path / "hf", tokenizer_file)
    from_hf(hf_dir, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["hf_model_type"] == "mistral"
    summary = to_hf(tmp_path / "ckpt", tmp_path / "back")
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert summary["metrics"]["hf_class"] == "MistralForCausalLM" and config["architectures"] == ["MistralForCausalLM"]
    assert config["model_type"] == "mistral" and config["sliding_window"] is None and "attention_bias" not in config
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", local_files_only=True).eval()
    assert isinstance(back, transformers.MistralForCausalLM)
    idx = torch.randint(0, VOCAB, (2, 32))
    torch.testing.assert_close(logits_of(back, idx), logits_of(hf, idx), atol=0, rtol=0)
    # the same weights trained here (no recorded family) go out as Llama, with the same logits
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**cfg, "hf_model_type": None}))
    to_hf(tmp_path / "ckpt", tmp_path / "as-llama")
    llama = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "as-llama", local_files_only=True).eval()
    assert isinstance(llama, transformers.LlamaForCausalLM)
    torch.testing.assert_close(logits_of(llama, idx), logits_of(hf, idx), atol=0, rtol=0)


def test_a_width_its_heads_do_not_divide_has_no_llama_class(tmp_path):
    config = ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=5, n_embd=64, attn_head_dim=16, block_size=16,
                         **dict(LLAMA_STYLE, n_kv_head=1))
    model = GPT(config)
    save_checkpoint(tmp_path / "ckpt", model.state_dict(), config.to_dict(), None, None)
    with pytest.raises(UserError, match=r"model\.n_head=5 has no Hugging Face equivalent for this model; the Llama "
                                        r"layout needs n_embd=64 divisible by n_head"):
        to_hf(tmp_path / "ckpt", tmp_path / "hf")


@pytest.mark.parametrize("field,value,match", [
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, r"rope_scaling\.rope_type='linear'"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, r"rope_scaling\.type='linear'"),
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0},
     r"rope_parameters\.rope_type='linear'"),
], ids=["legacy-rope_type", "legacy-type", "rope_parameters"])
def test_rope_scaling_in_either_field_is_refused(field, value, match, tmp_path):
    """transformers 5 writes a default `rope_parameters`; a legacy `rope_scaling` beside it still
    scales RoPE in transformers (the logits change), so converting it as plain RoPE would be wrong."""
    hf = MODELS["llama-gqa"]()
    hf_dir = save_hf(hf, tmp_path / "hf")
    assert json.loads((hf_dir / "config.json").read_text())["rope_parameters"]["rope_type"] == "default"
    _config(hf_dir, **{field: value})
    scaled = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    idx = torch.randint(0, VOCAB, (1, 32))
    assert (logits_of(scaled, idx) - logits_of(hf, idx)).abs().max() > 1e-4  # transformers does scale
    with pytest.raises(UserError, match=match + r" \(RoPE scaling\) is not supported; lmforge implements unscaled "
                                                r"RoPE only") as err:
        from_hf(hf_dir, tmp_path / "ckpt")
    assert "\n" not in str(err.value) and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("rope_scaling,theta", [({"rope_type": "default"}, 10000.0),
                                                 ({"type": "default", "rope_theta": 500000.0}, 500000.0)])
def test_a_default_rope_scaling_converts_with_the_base_transformers_reads(rope_scaling, theta, tmp_path,
                                                                          tokenizer_file):
    """transformers reads a non-empty rope_scaling instead of rope_parameters (which holds 500000
    here): the base is its rope_theta, else the top-level one (none here), else 10000."""
    hf = MODELS["llama-gqa"]()
    hf_dir = save_hf(hf, tmp_path / "hf", tokenizer_file)
    _config(hf_dir, rope_scaling=rope_scaling)
    from_hf(hf_dir, tmp_path / "ckpt")
    ours, _ = load_pretrained(tmp_path / "ckpt")
    assert ours.config.rope_theta == theta
    idx = torch.randint(0, VOCAB, (1, 32))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    torch.testing.assert_close(logits_of(ours, idx), logits_of(reloaded, idx), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------
# BERT exports: the tokenizer adds [CLS]/[SEP] as lmforge does


@pytest.fixture(scope="module")
def trained_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT run, a few mlm steps (the objective adds <|mask|> to its tokenizer)."""
    from train_helpers import make_token_dir, tiny_config

    from lmforge.train.loop import pretrain

    tmp = tmp_path_factory.mktemp("bert")
    cfg = tiny_config(make_token_dir(tmp), "model.arch=bert", "model.norm_position=post", "objective=mlm",
                      "train.max_steps=4", "train.eval_every=4")
    pretrain(cfg, tmp / "run")
    return tmp / "run"


def test_bert_to_hf_tokenizer_adds_cls_and_sep_like_lmforge(trained_bert, tmp_path):
    _, tok = load_pretrained(trained_bert)
    assert main(["convert", "to-hf", str(trained_bert), str(tmp_path / "hf")]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    mask_id = tok.token_to_id("<|mask|>")
    assert (hf_tok.cls_token, hf_tok.sep_token, hf_tok.pad_token, hf_tok.mask_token) == \
        ("<|bos|>", "<|eos|>", "<|pad|>", "<|mask|>")
    assert (hf_tok.cls_token_id, hf_tok.sep_token_id, hf_tok.pad_token_id, hf_tok.mask_token_id) == \
        (tok.bos_id, tok.eos_id, tok.pad_id, mask_id)
    single = hf_tok("To be or not")
    assert single["input_ids"] == [tok.bos_id, *tok.encode("To be or not"), tok.eos_id]
    assert single["token_type_ids"] == [0] * len(single["input_ids"])
    # a pair as the mlm objective's NSP builds it: [CLS] A [SEP] B [SEP], segment 1 from B on
    a, b = tok.encode("To be"), tok.encode("or not")
    pair = hf_tok("To be", "or not")
    assert pair["input_ids"] == [tok.bos_id, *a, tok.eos_id, *b, tok.eos_id]
    assert pair["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_to_hf_refuses_heads_the_layernorm_layouts_cannot_hold(arch, tmp_path, tokenizer_file, capsys):
    """GPT-2 and BERT in transformers have heads of hidden/heads: attn_head_dim is named, exit 2."""
    from lmforge.models import build_model
    from lmforge.train.checkpoint import save_checkpoint, tied_aliases

    extra = {"norm_position": "post"} if arch == "bert" else {}
    config = ModelConfig(arch=arch, vocab_size=320, n_layer=1, n_head=4, n_embd=16, block_size=32,
                         attn_head_dim=8, **extra)
    model = build_model(config)
    ckpt = save_checkpoint(tmp_path / "ck", model.state_dict(), config.to_dict(), tokenizer_file, None,
                           drop=tied_aliases(model))
    capsys.readouterr()
    assert main(["convert", "to-hf", str(ckpt), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "model.attn_head_dim=8 has no Hugging Face equivalent" in err and err.count("\n") == 1, err
    assert not (tmp_path / "hf").exists()


def test_bert_with_one_segment_type_keeps_pairs_in_segment_0(tmp_path, tokenizer_file):
    """type_vocab_size 1 has no segment 1: the exported tokenizer must not make one (HF's model
    would index out of its segment table)."""
    from lmforge.models import build_model
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.checkpoint import save_checkpoint, tied_aliases

    vocab = Tokenizer.load(tokenizer_file).vocab_size
    config = ModelConfig(arch="bert", vocab_size=vocab + 8, n_layer=1, n_head=2, n_embd=16, block_size=32,
                         type_vocab_size=1, norm_position="post")
    model = build_model(config)
    ckpt = save_checkpoint(tmp_path / "bert", model.state_dict(), config.to_dict(), tokenizer_file, None,
                           drop=tied_aliases(model))
    assert main(["convert", "to-hf", str(ckpt), str(tmp_path / "hf")]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    pair = hf_tok("the king", "shall speak", return_tensors="pt")
    assert pair["token_type_ids"].max() == 0
    hf = transformers.BertModel.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    with torch.no_grad():
        hidden = hf(**pair).last_hidden_state
        ours = model.eval().encode(pair["input_ids"], token_type_ids=pair["token_type_ids"],
                                   attention_mask=pair["attention_mask"])
    assert (hidden - ours).abs().max() < 1e-4


def test_bert_to_hf_gives_lmforge_embed_vectors_in_sentence_transformers(trained_bert, tmp_path, monkeypatch):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    np = pytest.importorskip("numpy")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub download would be a bug: make it fail
    texts = ["To be or not to be", "the king shall speak", "a",
             "good night sweet prince, and flights of angels sing thee to thy rest"]  # > 32 tokens: cut
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    assert main(["embed", "--ckpt", str(trained_bert), "--input", str(tmp_path / "texts.txt"),
                 "--out", str(tmp_path / "v.npy")]) == 0
    ours = np.load(tmp_path / "v.npy")
    assert main(["convert", "to-hf", str(trained_bert), str(tmp_path / "hf")]) == 0
    model = sentence_transformers.SentenceTransformer(str(tmp_path / "hf"), device="cpu")
    assert model.max_seq_length == 32
    theirs = model.encode(texts, convert_to_numpy=True)
    cosines = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cosines.min() >= 0.9999, cosines


def test_bert_to_hf_keeps_a_tokenizer_that_already_adds_special_tokens(tmp_path, tokenizer_file):
    """An HF BERT's tokenizer (all-MiniLM-L6-v2's) has its post-processor: copied byte for byte.
    One with a post-processor that adds nothing (byte-level offsets) gets ours after it."""
    import tokenizers
    from tokenizers import processors

    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_file)
    config = ModelConfig(arch="bert", vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16, block_size=16,
                         norm_position="post")
    model = BERT(config)
    posts = {"bert": processors.BertProcessing(("<|eos|>", tok.eos_id), ("<|bos|>", tok.bos_id)),
             "byte-level": processors.ByteLevel(trim_offsets=True)}
    for name, post in posts.items():
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        backend.post_processor = post
        (tmp_path / name).mkdir()
        backend.save(str(tmp_path / name / "tokenizer.json"))
        save_checkpoint(tmp_path / name / "ckpt", model.state_dict(), config.to_dict(),
                        tmp_path / name / "tokenizer.json", None, drop=tied_aliases(model))
        to_hf(tmp_path / name / "ckpt", tmp_path / name / "hf")
        hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / name / "hf", local_files_only=True)
        assert hf_tok("the king")["input_ids"] == [tok.bos_id, *tok.encode("the king"), tok.eos_id], name
    assert ((tmp_path / "bert" / "hf" / "tokenizer.json").read_bytes()
            == (tmp_path / "bert" / "tokenizer.json").read_bytes())
