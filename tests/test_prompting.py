"""Prompting: few-shot examples from a task's train-split pool (never scored items), chain-of-thought
answers parsed after a marker (English and CJK), prompt template files, `--fewshot 0` = today's eval,
`--fewshot 0,1` side by side, and the chat's --system FILE / --fewshot FILE."""

from __future__ import annotations

import io
import json

import pytest
import sacrebleu
from eval_helpers import direct_logprob, make_checkpoint, write_task

from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.eval import evaluate, load_task, scoring
from lmforge.eval.prompting import DEFAULT_TEMPLATE, draw_shots, load_template, make_prompter, parse_answer, parse_shots
from lmforge.eval.scoring import encode_pair


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("promptckpt"), block_size=96)


POOL_MC = [{"context": "Q: two and two?\nA:", "choices": [" four", " five"], "gold": 0},
           {"context": "Q: the sky?\nA:", "choices": [" green", " blue"], "gold": 1}]
SCORED_MC = [{"context": "Q: grass?\nA:", "choices": [" green", " red"], "gold": 0},
             {"context": "Q: snow?\nA:", "choices": [" black", " white"], "gold": 1}]


def mc_task(tmp_path, pool=POOL_MC, pool_split="train", items=SCORED_MC):
    write_task(tmp_path / "pool.jsonl", pool, {"kind": "multiple_choice", "split": pool_split})
    header = {"kind": "multiple_choice", "split": "test", "fewshot": "pool.jsonl"}
    return write_task(tmp_path / "mc.jsonl", items, header)


def big_pool_task(tmp_path, n_pool=12):
    pool = [{"question": f"Is {n} odd?", "answer": "yes" if n % 2 else "no"} for n in range(n_pool)]
    items = [{"question": f"Is {n} odd?", "answer": "yes" if n % 2 else "no"} for n in range(100, 108)]
    write_task(tmp_path / "bpool.jsonl", pool, {"kind": "binary", "split": "train"})
    return write_task(tmp_path / "odd.jsonl", items, {"kind": "binary", "split": "test", "fewshot": "bpool.jsonl"})


def test_shots_come_from_the_train_pool_never_scored_items_and_the_seed_fixes_them(tmp_path):
    task = load_task(big_pool_task(tmp_path))
    pool_shots = {f"Question: Is {n} odd?\nAnswer: {'yes' if n % 2 else 'no'}" for n in range(12)}
    scored_queries = [f"Question: {item['question']}\nAnswer:" for item in task.items]
    scored = set(scored_queries)

    def prompts(k, seed):
        p = make_prompter(task, k, seed, False, None)
        return [p.render(task, i, q, k) for i, q in enumerate(scored_queries)]

    for text, query in zip(prompts(5, 7), scored_queries):
        *shots, last = text.split("\n\n")
        assert last == query and len(shots) == 5 and len(set(shots)) == 5
        assert set(shots) <= pool_shots and not set(shots) & scored
    assert prompts(5, 7) == prompts(5, 7)  # the same seed, the same shots
    assert prompts(5, 7) != prompts(5, 8)
    # nested: item i's 3 shots are its 1 shot plus 2 more
    assert draw_shots(12, 4, 3, 7)[:1] == draw_shots(12, 4, 1, 7)
    assert draw_shots(12, 4, 3, 7) == draw_shots(12, 4, 5, 7)[:3]


def test_a_pool_that_holds_a_scored_item_or_is_not_train_is_refused(tmp_path):
    task = load_task(mc_task(tmp_path, pool=[*POOL_MC, SCORED_MC[1]]))
    with pytest.raises(UserError, match=r"pool.jsonl:4: this few-shot example is the scored item at .*mc.jsonl:3"):
        make_prompter(task, 1, 0, False, None)
    task = load_task(mc_task(tmp_path, pool_split="test"))
    with pytest.raises(UserError, match=r"pool.jsonl: few-shot examples must come from the train split"):
        make_prompter(task, 1, 0, False, None)
    task = load_task(mc_task(tmp_path))
    with pytest.raises(UserError, match=r"2 few-shot examples, fewer than --fewshot 3"):
        make_prompter(task, 3, 0, False, None)
    write_task(tmp_path / "pool.jsonl", [{"question": "Is it?", "answer": "yes"}], {"kind": "binary", "split": "train"})
    with pytest.raises(UserError, match=r"pool.jsonl:1: a binary pool for the multiple_choice task"):
        make_prompter(task, 1, 0, False, None)
    plain = write_task(tmp_path / "plain.jsonl", SCORED_MC, {"kind": "multiple_choice", "split": "test"})
    with pytest.raises(UserError, match=r"plain.jsonl: --fewshot 1 needs solved examples from the train split"):
        make_prompter(load_task(plain), 1, 0, False, None)
    assert make_prompter(load_task(plain), 0, 0, False, None) is None  # 0 shots: nothing changes


def test_two_shot_multiple_choice_prompt_is_the_hand_written_string(ckpt, tmp_path):
    ckpt_dir, model, tok = ckpt
    path = mc_task(tmp_path)
    task = load_task(path)
    order = draw_shots(2, 0, 2, 5)
    shot = {0: "Q: two and two?\nA: four", 1: "Q: the sky?\nA: blue"}
    expected = f"{shot[order[0]]}\n\n{shot[order[1]]}\n\nQ: grass?\nA:"
    assert make_prompter(task, 2, 5, False, None).render(task, 0, "Q: grass?\nA:", 2) == expected
    # the runner scores each choice after exactly that prompt (direct log-probs as the reference)
    evaluate(ckpt_dir, [path], tmp_path / "out", fewshot=2, fewshot_seed=5, limit=1, progress=False)
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    for choice, ll in zip(SCORED_MC[0]["choices"], result["predictions"][0]["loglikelihoods"]):
        ctx, cont = encode_pair(tok, expected, choice)
        assert ll == pytest.approx(direct_logprob(model, ctx + cont, len(cont)), abs=1e-4)
    assert result["prompting"]["fewshot"] == 2 and result["prompting"]["shots_mean"] == 2


def test_shots_that_do_not_fit_the_context_are_dropped_whole(ckpt, tmp_path):
    ckpt_dir, _, tok = ckpt
    long_pool = [{"question": "Is " + "very " * 40 + f"{n} odd?", "answer": "no"} for n in range(4)]
    write_task(tmp_path / "lp.jsonl", long_pool, {"kind": "binary", "split": "train"})
    path = write_task(tmp_path / "t.jsonl", [{"question": "Is 3 odd?", "answer": "yes"}],
                      {"kind": "binary", "split": "test", "fewshot": "lp.jsonl"})
    out = evaluate(ckpt_dir, [path], tmp_path / "o", fewshot=3, progress=False)["tasks"][0]
    given = out["prompting"]["shots_mean"]
    assert given < 3 and out["prompting"]["items_with_fewer_shots"] == 1
    assert any("their last shots were dropped" in n for n in out["notes"])


@pytest.mark.parametrize("reply,markers,answer", [
    ("The king speaks first.\nAnswer: Hamlet\n", ["Answer:"], "Hamlet"),
    ("answer: yes, I think\nthen again...\nANSWER : no", ["Answer:"], "no"),  # the last marker, any case
    ("Let me see.\nAnswer:\n\n  the rest of the line  \nmore", ["Answer:"], "the rest of the line"),
    ("Answer：Hamlet", ["Answer:"], "Hamlet"),  # a full-width colon matches an ASCII one
    ("先想一想：他是王子。\n答案：哈姆雷特\n", ["答案：", "Answer:"], "哈姆雷特"),
    ("推理……答案:国王", ["答案：", "Answer:"], "国王"),
    ("I think so.\nFinal answer: the queen", ["Answer:", "Final answer:"], "the queen"),
    ("no marker in this reply", ["Answer:"], None),
    ("the reply ends with the marker. Answer:  \n", ["Answer:"], None),
    ("只是思考，没有答案标记", ["答案："], None),
])
def test_chain_of_thought_answer_is_read_after_the_last_marker(reply, markers, answer):
    assert parse_answer(reply, markers) == answer


def test_cot_generation_prompts_with_the_cue_and_counts_parse_failures(ckpt, tmp_path, monkeypatch):
    ckpt_dir, _, _ = ckpt
    seen = {}

    def fake_replies(model, tokenizer, prompts, max_new_tokens, stop, **kwargs):
        seen.update(prompts=list(prompts), max_new=max_new_tokens, stop=stop)
        return ["He is sad.\nAnswer: To be or not", "I do not know", "hmm\nAnswer: the sun\n"]

    monkeypatch.setattr(scoring, "generate_replies", fake_replies)
    items = [{"prompt": "HAMLET.\n", "reference": "To be, or not to be"}, {"prompt": "KING.\n", "reference": "Rise"},
             {"prompt": "ROMEO.\n", "reference": "It is the east, and Juliet is the sun"}]
    path = write_task(tmp_path / "gen.jsonl", items, {"kind": "generation", "split": "test", "stop": ["\n"],
                                                     "max_new_tokens": 8})
    result = evaluate(ckpt_dir, [path], tmp_path / "out", cot=True, progress=False)["tasks"][0]
    assert seen["prompts"][0] == "HAMLET.\n" + DEFAULT_TEMPLATE["cot_cue"]
    assert seen["max_new"] == 48 and seen["stop"] == ["\n\n"]  # min(template's 128, half the 96 context)
    m = result["metrics"]
    assert m["cot_parse_failures"] == 1 and m["cot_parse_failure_rate"] == pytest.approx(1 / 3)
    answers = [p["prediction"] for p in result["predictions"]]
    assert answers == ["To be or not", "", "the sun"] and result["predictions"][1]["reply"] == "I do not know"
    refs = [[item["reference"] for item in items]]
    assert m["chrf"] == pytest.approx(sacrebleu.corpus_chrf(answers, refs).score)


@pytest.mark.parametrize("content,expected", [
    ({k: v for k, v in DEFAULT_TEMPLATE.items() if k != "answer_marker"}, "missing key 'answer_marker'"),
    ({**DEFAULT_TEMPLATE, "separtor": "\n"}, "unknown key 'separtor'"),
    ({**DEFAULT_TEMPLATE, "cot_max_new_tokens": "many"}, "key 'cot_max_new_tokens' must be an integer"),
    ({**DEFAULT_TEMPLATE, "shot": "{query}{answer}"}, "key 'shot' cannot be filled"),
])
def test_a_bad_template_file_is_one_line_naming_the_file_and_key(ckpt, tmp_path, capsys, content, expected):
    import yaml

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(content))
    task = mc_task(tmp_path)
    code = main(["eval", "--ckpt", str(ckpt[0]), "--task", str(task), "--out", str(tmp_path / "o"),
                 "--template", str(bad), "--fewshot", "1"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert str(bad) in lines[0] and expected in lines[0]
    assert not (tmp_path / "o").exists()


def test_the_shipped_templates_load_and_default_is_the_built_in_one():
    import yaml

    from lmforge.eval.prompting import TEMPLATE_DIRS

    folder = TEMPLATE_DIRS[1]
    shipped = yaml.safe_load((folder / "default.yaml").read_text(encoding="utf-8"))
    shipped.pop("name")
    assert shipped == DEFAULT_TEMPLATE
    assert load_template("zh").answer_markers[0] == "答案：" and load_template(folder / "cot.yaml").instruction
    assert parse_shots("0,1,3,5") == [0, 1, 3, 5] and parse_shots("2") == [2]
    with pytest.raises(UserError, match="comma-separated"):
        parse_shots("one")


def three_tasks(tmp_path):
    mc = mc_task(tmp_path)
    binary = big_pool_task(tmp_path)
    gen_pool = [{"prompt": f"Count {n}:", "reference": f"{n + 1}"} for n in range(4)]
    write_task(tmp_path / "gpool.jsonl", gen_pool, {"kind": "generation", "split": "train"})
    gen = write_task(tmp_path / "gen.jsonl", [{"prompt": "Count 9:", "reference": "10"}],
                     {"kind": "generation", "split": "test", "max_new_tokens": 4, "fewshot": "gpool.jsonl"})
    ppl = write_task(tmp_path / "ppl.jsonl", [{"text": "the king my lord"}], {"kind": "perplexity", "split": "test"})
    return [mc, binary, gen, ppl]


def test_fewshot_zero_is_todays_eval_and_a_list_writes_each_run_side_by_side(ckpt, tmp_path, capsys):
    tasks = three_tasks(tmp_path)
    evaluate(ckpt[0], tasks, tmp_path / "plain", progress=False)  # today's eval, without the flags
    assert main(["eval", "--ckpt", str(ckpt[0]), *[a for t in tasks for a in ("--task", str(t))],
                 "--out", str(tmp_path / "zero"), "--fewshot", "0"]) == 0
    for t in (p.stem for p in tasks):
        plain = json.loads((tmp_path / "plain" / t / "results.json").read_text())
        zero = json.loads((tmp_path / "zero" / t / "results.json").read_text())
        assert zero == plain and "prompting" not in zero
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(ckpt[0]), *[a for t in tasks for a in ("--task", str(t))],
                 "--out", str(tmp_path / "fs"), "--fewshot", "0,1"]) == 0
    out = capsys.readouterr().out
    assert "[1-shot, multiple_choice" in out and "fewshot_K/" in out
    table = json.loads((tmp_path / "fs" / "results.json").read_text())
    assert table["fewshot"] == [0, 1]
    for stem in ("mc", "odd", "gen", "ppl"):
        plain = json.loads((tmp_path / "plain" / stem / "results.json").read_text())
        by = table["tasks"][plain["task"]]["by_shots"]
        zero = json.loads((tmp_path / "fs" / "fewshot_0" / stem / "results.json").read_text())
        one = json.loads((tmp_path / "fs" / "fewshot_1" / stem / "results.json").read_text())
        assert zero["metrics"] == plain["metrics"] and zero["predictions"] == plain["predictions"]
        assert {k: v for k, v in by["0"].items() if k != "shots_mean"} == {
            k: v for k, v in plain["metrics"].items() if k not in ("per_class", "confusion_matrix")}
        if plain["kind"] == "perplexity":
            assert one["metrics"] == plain["metrics"]
        else:
            assert by["1"]["shots_mean"] == 1 and one["prompting"]["fewshot"] == 1
    mc_one = json.loads((tmp_path / "fs" / "fewshot_1" / "mc" / "results.json").read_text())
    assert mc_one["predictions"][0]["loglikelihoods"] != json.loads(
        (tmp_path / "plain" / "mc" / "results.json").read_text())["predictions"][0]["loglikelihoods"]
    report = (tmp_path / "fs" / "report.md").read_text()
    assert "| shots | shots given | acc | acc 95% CI |" in report and "Perplexity reads no prompt" in report


def test_make_tasks_pools_come_from_the_train_split(tmp_path):
    from test_eval_shakespeare import ALPHA, BETA, FOLIO_TWIN, write_split

    from lmforge.data.tasks import make_shakespeare_tasks

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "alpha_gut.txt").write_text(ALPHA[0])
    (corpus / "beta_gut.txt").write_text(BETA[0])
    test = [{"text": ALPHA[2], "source": str(corpus / "alpha_gut.txt"), "id": "alpha:40"},
            {"text": BETA[2], "source": str(corpus / "beta_gut.txt"), "id": "beta:30"}]
    train = [{"text": ALPHA[1], "source": str(corpus / "alpha_gut.txt"), "id": "alpha:1"},
             {"text": FOLIO_TWIN, "source": str(corpus / "alpha_gut_f.txt"), "id": "alphaf:1"},
             {"text": BETA[1], "source": str(corpus / "beta_gut.txt"), "id": "beta:1"}]
    for split, rows in (("train", train), ("val", train[:1]), ("test", test)):
        write_split(tmp_path / "data", split, rows)
    make_shakespeare_tasks(corpus, tmp_path / "data", tmp_path / "t0", max_items=4, fewshot_items=0)
    make_shakespeare_tasks(corpus, tmp_path / "data", tmp_path / "t", max_items=4, fewshot_items=10)
    for name in ("speaker_mc", "continue_line", "character_in_play", "heldout_ppl"):
        with_pools, without = load_task(tmp_path / "t" / f"{name}.jsonl"), load_task(tmp_path / "t0" / f"{name}.jsonl")
        assert with_pools.items == without.items  # the scored items do not depend on the pools
        if name == "heldout_ppl":
            assert "fewshot" not in with_pools.header and not (tmp_path / "t" / "fewshot" / f"{name}.jsonl").exists()
            continue
        pool = load_task(tmp_path / "t" / with_pools.header["fewshot"], with_pools.kind)
        assert pool.split == "train" and 0 < len(pool.items) <= 10
        if name != "character_in_play":
            assert {item["passage"] for item in pool.items} <= {"alpha:1", "beta:1"}
        else:
            assert not {i["character"] for i in pool.items} & {i["character"] for i in with_pools.items}
        make_prompter(with_pools, 1, 0, False, None)  # no pool item is a scored item


def test_chat_system_file_and_fewshot_exchanges_open_the_conversation(tmp_path, monkeypatch):
    from lmforge.infer import chat as chat_module
    from lmforge.infer.chat import load_fewshot_messages, system_text

    (tmp_path / "sys.txt").write_text("Answer in one word.\n")
    assert system_text(str(tmp_path / "sys.txt")) == "Answer in one word."
    assert system_text("Be brief.") == "Be brief." and system_text(None) is None
    examples = tmp_path / "ex.jsonl"
    examples.write_text(json.dumps({"user": "Who is Hamlet?", "assistant": "A prince."}) + "\n"
                        + json.dumps({"messages": [{"role": "user", "content": "And Ophelia?"},
                                                   {"role": "assistant", "content": "His love."}]}) + "\n")
    shots = load_fewshot_messages(examples)
    assert [m["role"] for m in shots] == ["user", "assistant", "user", "assistant"]
    seen = []

    def fake_reply(model, template, messages, **kwargs):
        seen.append([dict(m) for m in messages])
        return "ok"

    monkeypatch.setattr(chat_module, "chat_reply", fake_reply)
    monkeypatch.setattr(chat_module, "chat_template", lambda tok: None)
    chat_module.chat_loop(None, None, system="S", fewshot=shots, stdin=io.StringIO("hi\n/reset\nyo\n"),
                          stdout=io.StringIO())
    opening = [{"role": "system", "content": "S"}, *shots]
    assert seen[0] == [*opening, {"role": "user", "content": "hi"}]
    assert seen[1] == [*opening, {"role": "user", "content": "yo"}]  # /reset keeps the system and the examples
    chat_module.chat_loop(None, None, stdin=io.StringIO("hi\n"), stdout=io.StringIO())
    assert seen[2] == [{"role": "user", "content": "hi"}]  # without the flags: as before


@pytest.mark.parametrize("line,expected", [
    ({"user": "hi"}, r"ex.jsonl:1: an example exchange is"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, r"ex.jsonl:1: turn 1 must be \{\"role\": \"user\""),
    ({"messages": [{"role": "user", "content": "x"}]}, r"ex.jsonl:1: an example exchange must end with the assistant"),
    ({"user": "hi", "assistant": " "}, r"ex.jsonl:1: turn 2 \(assistant\) needs a non-empty"),
])
def test_bad_chat_fewshot_file_is_one_line(tmp_path, line, expected):
    from lmforge.infer.chat import load_fewshot_messages

    (tmp_path / "ex.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(UserError, match=expected):
        load_fewshot_messages(tmp_path / "ex.jsonl")
