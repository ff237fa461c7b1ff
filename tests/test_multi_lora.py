"""Several LoRA adapters on one base, chosen per batch row (`lmforge.adapters.multi`). The
reference is each fine-tuned model alone: `load_adapter` of the adapter onto a fresh base, or
`load_pretrained` of the fine-tuning checkpoint; a batch mixing rows of three adapters and the base
must give every row exactly those models' tokens (greedy and seeded sampling)."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from torch import nn

from lmforge.adapters import (
    AdapterOptions,
    apply_adapter,
    base_fingerprint,
    load_adapter,
    save_adapter,
    write_adapter_config,
)
from lmforge.adapters.lora import apply_lora
from lmforge.adapters.multi import MultiLoRALinear, serve_adapters
from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.infer.engine import Engine, SamplingParams
from lmforge.models import ModelConfig, build_model
from lmforge.tokenizer import Tokenizer
from lmforge.train import checkpoint as ckpt

LLAMA = dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=1, tie_embeddings=False)


def tiny(vocab: int, seed: int, **kw) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, block_size=32, **kw))
    with torch.no_grad():  # off the init (ones/zeros), so a mis-wired module shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def save_base(model: nn.Module, out, tokenizer_file):
    return ckpt.save_checkpoint(out, model.state_dict(), model.config.to_dict(), tokenizer_file, None,
                                drop=ckpt.tied_aliases(model))


def lora(base: nn.Module, targets: list[str], rank: int, seed: int, method: str = "lora"):
    """The base with a LoRA adapter whose B is random (non-zero, so the adapter changes the tokens)."""
    opts = AdapterOptions(method=method, lora_rank=rank, lora_alpha=2.0 * rank, lora_targets=targets)
    model = apply_adapter(copy.deepcopy(base), opts)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval(), opts


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer_file):
    vocab = Tokenizer.load(tokenizer_file).vocab_size
    return save_base(tiny(vocab, 0, **LLAMA), tmp_path_factory.mktemp("base") / "ckpt", tokenizer_file)


def fresh(base_dir) -> nn.Module:
    return ckpt.load_pretrained(base_dir)[0]


@pytest.fixture(scope="module")
def adapters(base_dir, tmp_path_factory):
    """Three adapters on different modules with different ranks, in the three accepted forms:
    an adapter dir (save_adapter), and a run dir whose best checkpoint carries adapter_config.json."""
    root = tmp_path_factory.mktemp("adapters")
    base = fresh(base_dir)
    a, opts_a = lora(base, ["qkv", "out"], 4, seed=1)
    b, opts_b = lora(base, ["mlp"], 8, seed=2)
    c, opts_c = lora(base, ["*attn", "mlp"], 2, seed=3)
    dirs = {"a": save_adapter(root / "a", a, opts_a, base_dir), "b": save_adapter(root / "b", b, opts_b, base_dir)}
    run = root / "c"  # what `lmforge finetune` writes: base layout + transform_state + adapter_config.json
    ckpt.save_checkpoint(run / "checkpoints" / "best", c.state_dict(), base.config.to_dict(),
                         base_dir / "tokenizer.json", None, drop=ckpt.tied_aliases(c), base_keys=set(base.state_dict()),
                         write_files=lambda d: write_adapter_config(d, c, opts_c, base_dir))
    dirs["c"] = run
    return dirs


def alone(base_dir, adapters, tag) -> nn.Module:
    """The model that `tag` stands for, by itself."""
    if tag is None:
        return fresh(base_dir)
    if tag == "c":
        return ckpt.load_pretrained(adapters["c"])[0]  # the fine-tuning checkpoint, as generate/chat load it
    return load_adapter(fresh(base_dir), adapters[tag]).eval()


def run_engine(engine: Engine, requests) -> list[list[int]]:
    ids = [engine.add(prompt, params, tag=tag) for prompt, params, tag in requests]
    tokens: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_work:
        for event in engine.step():
            tokens[event.request_id].append(event.token_id)
    return [tokens[i] for i in ids]


def requests(vocab: int, n: int = 16):
    rng = random.Random(0)
    kinds = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, top_k=5),
             dict(temperature=1.2, top_p=0.9)]
    tags = ["a", "b", None, "c"]
    return [([rng.randrange(vocab) for _ in range(rng.randint(1, 9))],
             SamplingParams(max_new_tokens=6 + i % 4, seed=100 + i, **kinds[(i // 4) % 4]), tags[i % 4])
            for i in range(n)]


def test_mixed_batch_rows_get_exactly_what_each_model_gives_alone(base_dir, adapters):
    served = fresh(base_dir)
    adapter_set = serve_adapters(served, adapters)
    assert adapter_set.names == ["a", "b", "c"] and "b" in adapter_set and "d" not in adapter_set
    reqs = requests(served.config.vocab_size)
    # rows join and leave mid-batch: decode and prefill calls with different mixes of adapters
    got = run_engine(Engine(served, max_batch=5, before_forward=adapter_set.set_rows), reqs)
    base = fresh(base_dir)
    for tag in ("a", "b", "c", None):
        model = alone(base_dir, adapters, tag)
        mine = [i for i, r in enumerate(reqs) if r[2] == tag]
        expected = [run_engine(Engine(model, max_batch=1), [reqs[i]])[0] for i in mine]
        assert [got[i] for i in mine] == expected, tag
        if tag is not None:  # the adapter matters: the base gives other tokens for its requests
            base_tokens = [run_engine(Engine(base, max_batch=1), [reqs[i]])[0] for i in mine]
            assert base_tokens != expected, tag


def test_one_forward_mixing_rows_equals_each_model(base_dir, adapters):
    served = fresh(base_dir)
    adapter_set = serve_adapters(served, adapters)
    tags = ["c", None, "a", "b", "a"]
    x = torch.randint(0, served.config.vocab_size, (len(tags), 9), generator=torch.Generator().manual_seed(0))
    adapter_set.set_rows(tags)
    with torch.no_grad():
        logits = served(x)[0]
        for row, tag in enumerate(tags):
            reference = alone(base_dir, adapters, tag)(x[row:row + 1])[0][0]
            torch.testing.assert_close(logits[row], reference, atol=1e-5, rtol=1e-5)
    adapter_set.set_rows(["b"] * 5)  # every row one adapter: the whole batch at once
    with torch.no_grad():
        torch.testing.assert_close(served(x)[0], alone(base_dir, adapters, "b")(x)[0], atol=1e-5, rtol=1e-5)


def test_base_rows_compute_the_base_exactly_and_the_layout_stays(base_dir, adapters):
    base = fresh(base_dir)
    served = fresh(base_dir)
    adapter_set = serve_adapters(served, adapters)
    assert served.state_dict().keys() == base.state_dict().keys()  # adapters are non-persistent buffers
    swapped = [n for n, m in served.named_modules() if isinstance(m, MultiLoRALinear)]
    assert any(n.endswith("mlp.up") for n in swapped) and any(n.endswith("attn.qkv") for n in swapped)
    assert not any(n.endswith("lm_head") for n in swapped)
    x = torch.randint(0, base.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1))
    adapter_set.set_rows([None, None, None])
    assert adapter_set.rows.groups == ()  # nothing but one check per Linear
    with torch.no_grad():
        assert torch.equal(served(x)[0], base(x)[0])
    with pytest.raises(ValueError, match="no adapter named 'zzz'"):
        adapter_set.set_rows(["a", "zzz", None])
    assert adapter_set.rows.groups == ()  # a refused call changes nothing


def test_a_qlora_adapter_is_served_as_lora_on_the_full_precision_base(base_dir, tmp_path):
    base = fresh(base_dir)
    q, opts = lora(base, ["qkv", "down"], 4, seed=7, method="qlora")
    path = save_adapter(tmp_path / "q", q, opts, base_dir)
    # save_adapter hashes the QLoRA model's (dequantized) weights; `lmforge finetune` writes the plain
    # base's fingerprint (posttrain.run.adapter_fingerprint), as here
    config = json.loads((path / "adapter_config.json").read_text())
    config["base_fingerprint"] = base_fingerprint(base.state_dict())
    (path / "adapter_config.json").write_text(json.dumps(config))
    served = fresh(base_dir)
    adapter_set = serve_adapters(served, {"q": path})
    # the reference: plain LoRALinears with the QLoRA run's A and B over the unquantized weights
    reference = fresh(base_dir)
    apply_lora(reference, ["qkv", "down"], 4, 8.0)
    reference.load_state_dict({k: v for k, v in q.state_dict().items() if "lora_" in k}, strict=False)
    x = torch.randint(0, base.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(2))
    adapter_set.set_rows(["q", None])
    with torch.no_grad():
        logits = served(x)[0]
        torch.testing.assert_close(logits[0], reference.eval()(x[:1])[0][0], atol=1e-5, rtol=1e-5)
        assert torch.equal(logits[1], base(x[1:])[0][0])


def test_bad_adapters_are_one_line_user_errors_naming_the_dir(base_dir, adapters, tmp_path, tokenizer_file):
    vocab = Tokenizer.load(tokenizer_file).vocab_size
    other = tiny(vocab, 5, **LLAMA)  # same shapes, other weights
    foreign, opts = lora(other, ["qkv"], 4, seed=1)
    foreign_dir = save_adapter(tmp_path / "foreign", foreign, opts, "elsewhere")
    with pytest.raises(UserError, match=rf"adapter x={foreign_dir}: .*trained on base elsewhere .*fingerprint"):
        serve_adapters(fresh(base_dir), {"a": adapters["a"], "x": foreign_dir})
    base = fresh(base_dir)
    prefix = apply_adapter(copy.deepcopy(base), AdapterOptions(method="prefix", prefix_len=3))
    prefix_dir = save_adapter(tmp_path / "prefix", prefix, AdapterOptions(method="prefix", prefix_len=3), base_dir)
    with pytest.raises(UserError, match=r"is a prefix fine-tune; only LoRA \(and QLoRA\) adapters can be served"):
        serve_adapters(fresh(base_dir), {"p": prefix_dir})
    with pytest.raises(UserError, match="no adapter_config.json: a plain checkpoint"):
        serve_adapters(fresh(base_dir), {"p": base_dir})
    with pytest.raises(UserError, match="does not exist"):
        serve_adapters(fresh(base_dir), {"p": tmp_path / "nowhere"})
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps({"nope": 1}))
    with pytest.raises(UserError, match=f"adapter p={broken}: .*not a valid adapter config"):
        serve_adapters(fresh(base_dir), {"p": broken})
    with pytest.raises(UserError) as info:
        serve_adapters(fresh(base_dir), {"x": foreign_dir})
    assert "\n" not in str(info.value)


def test_a_model_carrying_an_adapter_or_moe_experts_are_refused(base_dir, adapters, tokenizer_file, tmp_path):
    tuned = ckpt.load_pretrained(adapters["c"])[0]
    with pytest.raises(UserError, match="carries an adapter itself"):
        serve_adapters(tuned, {"a": adapters["a"]})
    served = fresh(base_dir)
    serve_adapters(served, {"a": adapters["a"]})
    with pytest.raises(UserError, match="serves adapters already"):
        serve_adapters(served, {"b": adapters["b"]})
    moe = tiny(Tokenizer.load(tokenizer_file).vocab_size, 0, pos_encoding="rope", moe={"num_experts": 2, "top_k": 1})
    moe_lora, opts = lora(moe, ["*attn", "mlp"], 2, seed=1)
    path = save_adapter(tmp_path / "moe", moe_lora, opts, None)
    with pytest.raises(UserError, match="adapts the MoE expert Linear .*experts see routed tokens"):
        serve_adapters(moe, {"m": path})


def test_a_lmforge_finetune_run_serves_as_load_pretrained_gives_it(base_dir, tmp_path, capsys):
    """A real `lmforge finetune sft-lora` run (a few steps): its run dir and its adapter/ dir served
    side by side give what `load_pretrained(run)` gives."""
    data = tmp_path / "chat.jsonl"
    rng = random.Random(0)
    with open(data, "w") as f:
        for i in range(24):
            word = rng.choice(["love", "death", "night"])
            f.write(json.dumps({"messages": [{"role": "user", "content": f"speak of {word} {i}"},
                                             {"role": "assistant", "content": f"the king shall speak of {word}."}]})
                    + "\n")
    out = tmp_path / "ft"
    args = ["finetune", "sft-lora", "--base", str(base_dir), "--data", str(data), "--out", str(out)]
    for s in ("train.max_steps=3", "train.eval_every=3", "train.eval_steps=1", "train.batch_size=2",
              "train.threads=1", "train.precision=fp32", "train.warmup_steps=0", "train.lr=0.05",
              "train.min_lr=0.05", "adapter.lora_rank=4", "adapter.lora_dropout=0.0"):
        args += ["--set", s]
    assert main(args) == 0, capsys.readouterr().err
    served = fresh(base_dir)
    adapter_set = serve_adapters(served, {"run": out, "dir": out / "adapter"})
    tuned = ckpt.load_pretrained(out)[0]
    x = torch.randint(0, served.config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(3))
    adapter_set.set_rows(["run", "dir", None])
    with torch.no_grad():
        logits = served(x)[0]
        for row in (0, 1):
            torch.testing.assert_close(logits[row], tuned(x[row:row + 1])[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[2], fresh(base_dir)(x[2:])[0][0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(tuned(x[2:])[0][0], logits[2], atol=1e-4)  # the fine-tune changed something
