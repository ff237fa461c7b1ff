"""`lmforge posttrain-eval`: speaker accuracy (each model in its own format), preference accuracy and
replies that end by themselves, against direct computations on a tiny GPT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from eval_helpers import direct_logprob, make_checkpoint
from scipy.stats import binomtest

from lmforge.cli import main
from lmforge.data import sft as S
from lmforge.errors import UserError
from lmforge.models import GPT
from lmforge.posttrain import evaluate as E
from lmforge.posttrain.data import Pair
from lmforge.tokenizer.chat import encode_chat

CONTEXTS = ["KING:\nthe crown is heavy on my head tonight.\n\n", "JULIET:\nwhere art thou now, my love?\n\n",
            "LEAR:\nblow winds and crack your cheeks.\n\n", "ROMEO:\nbut soft, what light through yonder window.\n\n",
            "KING:\nmy lords, the day is ours.\n\n"]
NAMES = ["KING", "LEAR", "ROMEO", "JULIET"]


def speaker_items() -> list[dict]:
    items = []
    for i, context in enumerate(CONTEXTS):
        line = f"and so it goes, line {i}"
        names = NAMES[i % 4:] + NAMES[:i % 4]
        items.append({"context": context, "choices": [f"{n}.\n{line}" for n in names], "gold": i % 4,
                      "messages": [{"role": "user", "content": S.speaker_question(context, line, names)}],
                      "answers": names})
    return items


def pairs() -> list[Pair]:
    out = []
    for i, context in enumerate(CONTEXTS):
        messages = [{"role": "user", "content": S.play_question(context)}]
        replies = ["The Tragedy of King Lear", "Romeo and Juliet" if i % 2 else "Hamlet"]
        out.append(Pair(messages, replies[i % 2], replies[1 - i % 2], "x:1", ""))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, GPT, object]:
    return make_checkpoint(tmp_path_factory.mktemp("tiny"), block_size=128, seed=3)


def test_speaker_accuracy_scores_each_format_as_a_direct_forward_would(tiny) -> None:
    from lmforge.tokenizer.chat import chat_template

    _, model, tok = tiny
    template = chat_template(tok)
    items = speaker_items()
    end = tok.token_to_id("<|end|>")
    for fmt in ("plain", "chat"):
        correct = 0
        for item in items:
            scores = []
            for choice, answer in zip(item["choices"], item["answers"]):
                if fmt == "plain":  # the passage (after eos) and the choice as running text
                    context = [tok.eos_id, *tok.encode(item["context"])]
                    whole = [tok.eos_id, *tok.encode(item["context"] + choice)]
                    scores.append(direct_logprob(model, whole, len(whole) - len(context)))
                else:  # the chat question, then the answer and the end-of-turn token
                    prompt = encode_chat(tok, item["messages"], add_generation_prompt=True)
                    reply = [*tok.encode(answer), end]
                    scores.append(direct_logprob(model, prompt + reply, len(reply)))
            correct += max(range(4), key=scores.__getitem__) == item["gold"]
        got = E.speaker_accuracy(model, tok, template, items, fmt, progress=False)
        ci = binomtest(correct, len(items)).proportion_ci(method="wilson")
        assert got["speaker_acc"] == correct / len(items) and got["speaker_n"] == len(items)
        assert got["speaker_ci95"] == pytest.approx([ci.low, ci.high])


def test_preference_accuracy_matches_direct_loglikelihoods(tiny) -> None:
    from lmforge.tokenizer.chat import chat_template

    _, model, tok = tiny
    template = chat_template(tok)
    end = tok.token_to_id("<|end|>")
    for fmt in ("plain", "chat"):
        wins = []
        for pair in pairs():
            lp = []
            for reply in (pair.chosen, pair.rejected):
                if fmt == "chat":
                    prompt = encode_chat(tok, pair.messages, add_generation_prompt=True)
                    ids = [*tok.encode(reply), end]
                    lp.append(direct_logprob(model, prompt + ids, len(ids)))
                else:
                    text = pair.messages[0]["content"] + "\n"
                    context, whole = tok.encode(text), tok.encode(text + reply)
                    lp.append(direct_logprob(model, [tok.eos_id, *whole], len(whole) - len(context)))
            wins.append(lp[0] > lp[1])
        got = E.preference_accuracy(model, tok, template, pairs(), fmt, progress=False)
        assert got["pref_acc"] == sum(wins) / len(wins) and got["pref_acc_by_kind"] == {"play": got["pref_acc"]}


class EndBias(GPT):
    """A GPT whose logit for one token is shifted (to make it end, or never end, its replies)."""

    def __init__(self, config, token: int, shift: float) -> None:
        super().__init__(config)
        self.token, self.shift = token, shift

    def forward(self, idx, targets=None, **kw):
        logits, loss = super().forward(idx, targets, **kw)
        return logits + self.shift * torch.nn.functional.one_hot(torch.tensor(self.token), logits.shape[-1]), loss


def greedy_reference(model, prompt: list[int], max_new: int, stop: set[int]) -> list[int]:
    """Greedy decoding by full forwards (no KV cache, no engine)."""
    ids, new = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new):
            token = int(model(torch.tensor([ids]))[0][0, -1].argmax())
            new.append(token)
            ids.append(token)
            if token in stop:
                break
    return new


@pytest.mark.parametrize("shift", [-100.0, 0.3, 100.0])
def test_ends_by_itself_counts_replies_closed_by_the_end_token(tiny, shift: float) -> None:
    from lmforge.tokenizer.chat import chat_template

    _, plain, tok = tiny
    template = chat_template(tok)
    model = EndBias(plain.config, template.end_id, shift).eval()
    model.load_state_dict(plain.state_dict())
    prompts = [item["messages"] for item in speaker_items()] + [p.messages for p in pairs()]
    got, replies = E.replies_that_end(model, tok, template, prompts, max_new_tokens=6, batch_size=4, progress=False)
    stop = set(template.stop_ids) | {tok.eos_id}
    expected = [greedy_reference(model, template.encode(m), 6, stop)[-1] == template.end_id for m in prompts]
    assert got["ends_by_itself"] == sum(expected) / len(prompts) and got["ends_n"] == len(prompts)
    if shift == 100.0:
        assert got["ends_by_itself"] == 1.0 and replies == [""] * len(prompts)
    if shift == -100.0:
        assert got["ends_by_itself"] == 0.0


def write_heldout(root: Path) -> Path:
    root.mkdir()
    (root / "speaker_heldout.jsonl").write_text("".join(json.dumps(i) + "\n" for i in speaker_items()))
    lines = [{"messages": p.messages, "chosen": p.chosen, "rejected": p.rejected} for p in pairs()]
    (root / "preferences_heldout.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    examples = [{"messages": [*p.messages, {"role": "assistant", "content": p.chosen}]} for p in pairs()]
    (root / "sft_heldout.jsonl").write_text("".join(json.dumps(x) + "\n" for x in examples))
    return root


def test_cli_writes_the_table_and_summary(tiny, tmp_path: Path, capsys) -> None:
    ckpt, model, tok = tiny
    data = write_heldout(tmp_path / "data")
    out = tmp_path / "eval"
    args = ["posttrain-eval", "--model", f"base={ckpt}", "--model", f"sft={ckpt}", "--model", f"dpo={ckpt}",
            "--data", str(data), "--out", str(out), "--max-new-tokens", "4"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage"] == "posttrain-eval" and list(summary["metrics"]) == ["base", "sft", "dpo"]
    for name, m in summary["metrics"].items():
        assert set(m) >= {"speaker_acc", "speaker_ci95", "pref_acc", "ends_by_itself"}
        assert m["format"] == ("plain" if name == "base" else "chat") and name in printed
        assert summary[name] == m  # the keys: summary["sft"]["speaker_acc"], ...
    # the same weights: chat-format models measure the same; goals computed from the rows
    assert summary["metrics"]["sft"]["speaker_acc"] == summary["metrics"]["dpo"]["speaker_acc"]
    assert summary["goals"]["dpo_beats_sft_pref"] is False
    assert summary["goals"]["speaker_margin"] == pytest.approx(
        summary["metrics"]["sft"]["speaker_acc"] - summary["metrics"]["base"]["speaker_acc"])


def test_bad_input_is_one_line(tiny, tmp_path: Path, capsys) -> None:
    ckpt, _, _ = tiny
    for bad in (["x"], ["a=b", "a=c"], ["goals=b"]):
        with pytest.raises(UserError, match="--model"):
            E.parse_models(bad)
    with pytest.raises(UserError, match="--format"):
        E.parse_models(["base=x"], ["sft=chat"])
    assert E.parse_models(["base=x", "sft=y"], ["base=chat"])[0].format == "chat"
    data = write_heldout(tmp_path / "data")
    with open(data / "speaker_heldout.jsonl", "a") as f:
        f.write(json.dumps({"context": "x", "choices": ["a"], "gold": 3, "messages": [], "answers": ["a"]}) + "\n")
    assert main(["posttrain-eval", "--model", f"base={ckpt}", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "speaker_heldout.jsonl:6: choices, answers and gold do not agree" in err and len(err.splitlines()) == 1
