"""`lmforge finetune` / `lmforge merge` (issue 12): a tiny pretrained GPT fine-tuned on a small chat
JSONL with every method through the CLI. The fine-tuned model's loss on held-out examples is
computed here, example by example without packing, from its assistant tokens alone; frozen
tensors are compared bit for bit with the base's; a LoRA run's dir loads with `load_pretrained`
and computes what the base plus its saved adapter computes; merged == unmerged."""

from __future__ import annotations

import json
import math
import os
import random
import signal

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from train_helpers import make_token_dir, tiny_config

from lmforge.cli import main
from lmforge.errors import Interrupted, UserError
from lmforge.train import checkpoint as ckpt
from lmforge.train.loop import pretrain

SPEAKERS = ("KING", "LEAR", "ROMEO", "JULIET")
TOPICS = ("love", "death", "night", "sun", "lord", "sir")
FAST = ["train.max_steps=12", "train.eval_every=6", "train.eval_steps=2", "train.batch_size=4", "train.threads=1",
        "train.precision=fp32", "train.warmup_steps=2", "adapter.freeze_layers=1"]
LR = {"full": 3e-3, "freeze": 3e-3, "lora": 1e-2, "qlora": 1e-2, "prefix": 0.1, "prompt": 0.1}
EXTRA = {"prefix": ["train.max_steps=30"], "prompt": ["train.max_steps=30"]}  # few parameters: slower to learn
GAIN = {"prefix": 0.02, "prompt": 0.02}  # least fall of the held-out reply loss (others: 0.3)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny GPT pretrained for a few steps on the char-level test corpus (its tokenizer has the chat tokens)."""
    root = tmp_path_factory.mktemp("ftbase")
    tokens = make_token_dir(root)
    pretrain(tiny_config(tokens, "train.max_steps=150", "model.block_size=64", "train.eval_every=50"), root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """A chat JSONL whose replies follow a rule (the speaker of a topic), with a held-out file."""
    root = tmp_path_factory.mktemp("chat")
    rng = random.Random(0)
    for name, n in (("train.jsonl", 96), ("val.jsonl", 12)):
        with open(root / name, "w") as f:
            for i in range(n):
                topic = rng.choice(TOPICS)
                speaker = SPEAKERS[TOPICS.index(topic) % len(SPEAKERS)]
                f.write(json.dumps({"messages": [
                    {"role": "user", "content": f"who speaks of {topic}? ({name[0]}{i})"},
                    {"role": "assistant", "content": f"{speaker} speaks of {topic}."}]}) + "\n")
    return root


def finetune(base, chat, out, method, *extra, data=None):
    args = ["finetune", f"sft-{method}", "--base", str(base), "--data", str(data or chat / "train.jsonl"),
            "--out", str(out), "--set", f"data.val_file={chat / 'val.jsonl'}", "--set", f"train.lr={LR[method]}",
            "--set", f"train.min_lr={LR[method] / 10}"]
    for s in FAST + list(EXTRA.get(method, ())):
        args += ["--set", s]
    return main(args + list(extra))


def reply_loss(model, tokenizer, path) -> float:
    """Mean cross-entropy of the assistant tokens of every example in `path`, each example alone."""
    from lmforge.posttrain.data import encode_example, read_sft
    from lmforge.tokenizer.chat import chat_template

    template = chat_template(tokenizer)
    total, count = 0.0, 0
    with torch.no_grad():
        for example in read_sft(path):
            ids, labels = encode_example(template, example)
            logits = model(torch.tensor([ids[:-1]]))[0][0]
            target = torch.tensor(labels[1:])
            total += F.cross_entropy(logits.float(), target, ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    return total / count


def best_weights(out):
    return load_file(str(out / "checkpoints" / "best" / "model.safetensors"))


@pytest.mark.parametrize("method", ["full", "freeze", "lora", "qlora", "prefix", "prompt"])
def test_each_method_fine_tunes_and_freezes_what_it_should(base, chat, tmp_path, method, capsys):
    out = tmp_path / method
    assert finetune(base, chat, out, method) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"adapter {method}" in printed and "lmforge plan predicts a peak of" in printed
    assert "measured" in printed and "0 truncated" in printed
    base_model, tokenizer = ckpt.load_pretrained(base)
    tuned, _ = ckpt.load_pretrained(out)
    before, after = reply_loss(base_model, tokenizer, chat / "val.jsonl"), reply_loss(tuned, tokenizer,
                                                                                      chat / "val.jsonl")
    assert after < before - GAIN.get(method, 0.3), (method, before, after)

    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    assert summary["stage"] == "finetune" and m["method"] == method
    assert 0 < m["trainable_params"] <= m["total_params"]
    assert m["peak_memory_predicted_bytes"] > 0 and m["peak_memory_measured_bytes"] > 0
    assert m["data"]["train"]["examples"] == 96 and m["data"]["val"]["examples"] == 12

    start = ckpt.read_weights(ckpt.resolve_checkpoint(base))
    saved = best_weights(out)
    frozen = {"full": [], "freeze": [k for k in start if k.startswith(("tok_embeddings", "blocks.0."))]}.get(
        method, [k for k in start if method != "qlora" or not k.endswith(("qkv.weight", "out.weight", "up.weight",
                                                                            "down.weight", "gate.weight"))])
    for k in frozen:
        assert torch.equal(saved[k], start[k]), (method, k)
    changed = [k for k in start if not torch.equal(saved[k], start[k])]
    if method in ("full", "freeze"):
        assert changed and all(k not in frozen for k in changed)
    has_adapter = method not in ("full", "freeze")
    assert (out / "adapter" / "adapter.safetensors").exists() == has_adapter
    assert (out / "checkpoints" / "best" / "adapter_config.json").exists() == (method != "full")


def test_a_lora_run_loads_as_base_plus_adapter_and_merges(base, chat, tmp_path, capsys):
    from lmforge.adapters import load_adapter

    out = tmp_path / "lora"
    assert finetune(base, chat, out, "lora") == 0, capsys.readouterr().err
    tuned, tokenizer = ckpt.load_pretrained(out)
    plain, _ = ckpt.load_pretrained(base)
    x = torch.tensor([tokenizer.encode("who speaks of love?")])
    with torch.no_grad():
        base_logits = plain(x)[0]
        on_base = load_adapter(plain, out / "adapter").eval()(x)[0]  # the adapter alone, onto the base
        tuned_logits = tuned(x)[0]
    assert torch.allclose(on_base, tuned_logits, atol=1e-6)
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-3)  # the adapter does something

    merged = tmp_path / "merged"
    capsys.readouterr()
    assert main(["merge", "--ckpt", str(out), "--out", str(merged)]) == 0, capsys.readouterr().err
    assert not (merged / "adapter_config.json").exists()
    assert json.loads((merged / "summary.json").read_text())["stage"] == "merge"
    plain_merged, _ = ckpt.load_pretrained(merged)
    assert not any("lora" in k for k in plain_merged.state_dict())
    with torch.no_grad():
        assert torch.allclose(plain_merged(x)[0], tuned_logits, atol=1e-5)
    assert main(["merge", "--ckpt", str(out), "--out", str(merged)]) == 2  # exists: needs --overwrite
    assert "--overwrite" in capsys.readouterr().err

    # a LoRA run as the base of the next stage: merged into OUT/base, which computes what the run computes
    second = tmp_path / "second"
    assert finetune(out, chat, second, "lora", "--set", "train.max_steps=2") == 0, capsys.readouterr().err
    assert "carries a lora adapter: merged into" in capsys.readouterr().out
    start, _ = ckpt.load_pretrained(second / "base")
    with torch.no_grad():
        assert torch.allclose(start(x)[0], tuned_logits, atol=1e-5)
    assert finetune(out, chat, second, "lora", "--set", "train.max_steps=2", "--overwrite") == 0
    assert "merged into" not in capsys.readouterr().out  # the same base: its merged copy is reused


def test_an_adapter_for_another_base_is_refused(base, chat, tmp_path, capsys):
    from lmforge.adapters import load_adapter
    from lmforge.models import build_model
    from lmforge.models.config import ModelConfig

    out = tmp_path / "lora"
    assert finetune(base, chat, out, "lora") == 0, capsys.readouterr().err
    other = build_model(ModelConfig.from_dict(ckpt.read_model_config(ckpt.resolve_checkpoint(base))))
    with pytest.raises(UserError, match="was saved for base"):
        load_adapter(other, out / "adapter")


def test_a_lora_run_resumes_exactly(base, chat, tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert finetune(base, chat, straight, "lora") == 0

    from lmforge.config import load_config
    from lmforge.posttrain.run import posttrain

    sets = [*FAST, f"data.val_file={chat / 'val.jsonl'}", f"train.lr={LR['lora']}", f"train.min_lr={LR['lora'] / 10}",
            "objective=sft"]
    cfg = load_config("sft-lora", sets)

    def ctrl_c(step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        posttrain(cfg, resumed, base=base, data=chat / "train.jsonl", on_step=ctrl_c)
    assert ckpt.latest_checkpoint(resumed).name == "step_000005"
    capsys.readouterr()
    assert finetune(straight, chat, resumed, "lora", "--resume") == 2  # another base (the LoRA run, merged)
    assert "was trained on the base" in capsys.readouterr().err
    assert not (resumed / "base").exists()  # what the refused start wrote is gone
    assert finetune(base, chat, resumed, "lora", "--resume") == 0, capsys.readouterr().err
    a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == list(range(1, 13))
    assert abs(a[-1]["loss"] - b[-1]["loss"]) <= 1e-6 and abs(a[-1]["val_loss"] - b[-1]["val_loss"]) <= 1e-6


def test_bad_input_is_one_line_exit_2_and_nothing_written(base, chat, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "narrator", "content": "hi"}]}\n')
    cases = [
        (["--set", "adapter.lora_targets=[nothing_like_this]"], None, "lora", "nothing_like_this"),
        ([], tmp_path / "missing.jsonl", "lora", "missing.jsonl"),
        ([], bad, "lora", f"{bad}:2"),
    ]
    for i, (extra, data, method, needle) in enumerate(cases):
        out = tmp_path / f"out{i}"
        capsys.readouterr()
        assert finetune(base, chat, out, method, *extra, data=data) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err and "\n" not in err, err
        assert not out.exists()
    existing = tmp_path / "existing"  # a dir that exists: what a failed start wrote into it is removed
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    assert finetune(base, chat, existing, "prefix", "--set", "adapter.prefix_len=1000") == 2
    assert "prefix_len=1000" in capsys.readouterr().err
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]
    not_a_checkpoint = tmp_path / "empty"
    not_a_checkpoint.mkdir()
    assert finetune(not_a_checkpoint, chat, tmp_path / "out_nb", "lora") == 2
    err = capsys.readouterr().err.strip()
    assert "--base" in err and "\n" not in err and not (tmp_path / "out_nb").exists()


def completion_loss(model, tokenizer, path) -> float:
    """Mean cross-entropy of the completion tokens (and eos) of prompt/completion lines, each alone."""
    total, count = 0.0, 0
    with torch.no_grad():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            prompt = tokenizer.encode(record["prompt"])
            completion = tokenizer.encode(record["completion"]) + [tokenizer.eos_id]
            ids = torch.tensor([prompt + completion])
            logits = model(ids[:, :-1])[0][0, len(prompt) - 1:]
            total += F.cross_entropy(logits.float(), ids[0, len(prompt):], reduction="sum").item()
            count += len(completion)
    return total / count


def hf_model(transformers, family: str, vocab: int):
    """A tiny transformers causal LM of `family` (random weights, eos/bos id 0)."""
    if family == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0))
    cfg = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=0,
               eos_token_id=0)
    if family == "mixtral":
        cfg.update(num_local_experts=4, num_experts_per_tok=2)
    name = {"llama": "Llama", "mistral": "Mistral", "mixtral": "Mixtral"}[family]
    return getattr(transformers, f"{name}ForCausalLM")(getattr(transformers, f"{name}Config")(**cfg))


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "mixtral"])
def test_a_converted_hf_model_with_its_own_tokenizer_fine_tunes(tmp_path, capsys, family):
    """A transformers GPT-2 / Llama / Mistral / Mixtral with GPT-2's kind of tokenizer (byte-level
    BPE, <|endoftext|> only: no chat format), converted with `convert from-hf`, then `finetune
    --base` it with LoRA on prompt/completion lines: the model config comes from its config.json
    (no model section), and the held-out completion loss falls."""
    transformers = pytest.importorskip("transformers")
    from test_init_from import gpt2_style_tokenizer
    from train_helpers import write_corpus

    tk = gpt2_style_tokenizer(write_corpus(tmp_path / "corpus", docs=6))
    torch.manual_seed(0)
    hf_dir, conv = tmp_path / "hf", tmp_path / "converted"
    hf_model(transformers, family, tk.get_vocab_size()).save_pretrained(hf_dir)
    tk.save(str(hf_dir / "tokenizer.json"))
    assert main(["convert", "from-hf", str(hf_dir), str(conv)]) == 0, capsys.readouterr().err
    rng = random.Random(1)
    for name, n in (("train.jsonl", 64), ("val.jsonl", 8)):
        with open(tmp_path / name, "w") as f:
            for _ in range(n):
                topic = rng.choice(TOPICS)
                line = {"prompt": f"Who speaks of {topic}?", "completion": f" The {topic} speaker."}
                f.write(json.dumps(line) + "\n")
    chat = tmp_path  # train.jsonl and val.jsonl
    out = tmp_path / "ft"
    assert finetune(conv, chat, out, "lora") == 0, capsys.readouterr().err
    saved = ckpt.read_model_config(out / "checkpoints" / "best")
    assert saved == ckpt.read_model_config(conv) and saved["hf_model_type"] == family
    tuned, tokenizer = ckpt.load_pretrained(out)
    plain, _ = ckpt.load_pretrained(conv)
    before, after = completion_loss(plain, tokenizer, tmp_path / "val.jsonl"), completion_loss(
        tuned, tokenizer, tmp_path / "val.jsonl")
    assert after < before - 0.3, (before, after)


@pytest.mark.slow
def test_a_lora_finetune_under_ddp_and_fsdp_gives_the_same_model(base, chat, tmp_path):
    """`torchrun ... lmforge finetune sft-lora` with train.parallel=ddp and =fsdp (2 CPU processes,
    gloo): the same losses and the same fine-tuned model, each with its adapter dir."""
    import subprocess
    import sys
    from pathlib import Path

    outs = {}
    for parallel in ("ddp", "fsdp"):
        out = outs[parallel] = tmp_path / parallel
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "lmforge", "finetune", "sft-lora", "--base", str(base), "--data", str(chat / "train.jsonl"),
               "--out", str(out)]
        for s in [*FAST, f"data.val_file={chat / 'val.jsonl'}", f"train.parallel={parallel}", "train.batch_size=2",
                  "train.max_steps=6", "train.eval_every=3", "adapter.lora_dropout=0.0"]:
            cmd += ["--set", s]
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (out / "adapter" / "adapter_config.json").exists()
    losses = {p: [json.loads(x)["loss"] for x in (o / "metrics.jsonl").read_text().splitlines()]
              for p, o in outs.items()}
    assert losses["ddp"] == pytest.approx(losses["fsdp"], abs=1e-5)
    (ddp, tokenizer), (fsdp, _) = ckpt.load_pretrained(outs["ddp"]), ckpt.load_pretrained(outs["fsdp"])
    x = torch.tensor([tokenizer.encode("who speaks of love?")])
    with torch.no_grad():
        assert torch.allclose(ddp(x)[0], fsdp(x)[0], atol=1e-5)


def test_finetune_runs_objective_classify_too(base, tmp_path, capsys):
    """`lmforge finetune` with `objective: classify` (a score head on the GPT base, LoRA on the
    blocks): the run learns the labels; the head is new, so it is trained and saved with the adapter."""
    rng = random.Random(2)
    for name, n in (("train.jsonl", 80), ("val.jsonl", 10)):
        with open(tmp_path / name, "w") as f:
            for _ in range(n):
                topic = rng.choice(TOPICS)
                f.write(json.dumps({"text": f"i speak of {topic}", "label": int(topic in ("love", "sun", "lord"))})
                        + "\n")
    out = tmp_path / "cls"
    args = ["finetune", "sft-lora", "--base", str(base), "--data", str(tmp_path / "train.jsonl"), "--out", str(out),
            "--set", "objective=classify", "--set", f"data.val_file={tmp_path / 'val.jsonl'}", "--set",
            "train.lr=1e-2"]
    for s in [*FAST, "train.max_steps=30", "train.eval_every=10", "train.batch_size=8"]:
        args += ["--set", s]
    assert main(args) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage"] == "finetune" and summary["metrics"]["method"] == "lora"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert "score.weight" in config["trainable"]
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert evals[-1]["val_loss"] < min(evals[0]["val_loss"] - 0.2, math.log(2) - 0.1), evals  # below chance (ln 2)
    capsys.readouterr()
    assert main([*args[:10], "--set", "objective=dpo", "--overwrite"]) == 2
    assert "lmforge align" in capsys.readouterr().err
