"""Few-shot and chain-of-thought prompting for `lmforge eval` (`--fewshot K`, `--cot`, `--template`).

A prompt template is a YAML file (`configs/prompts/*.yaml`; `DEFAULT_TEMPLATE` below is
`configs/prompts/default.yaml`) with exactly the keys of `TEMPLATE_KEYS`:

    instruction: ""                       # text before everything (empty: none)
    separator: "\\n\\n"                     # between the instruction, the shots and the item
    shot: "{query}{target}"               # one solved example
    cot_cue: "\\nLet's think step by step.\\n"   # appended to a generation/qa item under --cot
    cot_shot: "{query}{cue}{marker} {target}"  # a solved example under --cot
    answer_marker: ["Answer:"]            # the final answer follows the last one (the first is written)
    cot_max_new_tokens: 128               # the reply budget under --cot (--max-new-tokens wins)

Each kind says what an item's `query` (what the model reads) and `target` (the right
continuation) are (`query_target`): multiple_choice: the context and the gold choice;
binary: the filled question template and " yes"/" no"; generation: the prompt and the first
reference; qa: the filled template and " " + the first answer; classification: the filled
template and " " + the label. Perplexity reads no prompt: `--fewshot` leaves it alone.

Shots come from the task's pool: the task file's header names it (`"fewshot": "FILE"`, relative
to the task file), a task file of the same kind whose header says `split: train`; no pool item
may equal a scored item (`check_pool`). Item i's shots are the first K of a permutation of
the pool seeded by (`--fewshot-seed`, i): the same seed gives the same shots, item i's shots do
not depend on the other items, and the 3 shots of an item are its 1 shot plus 2 more. When the
prompt with K shots does not fit the model's context (with room for the answer), the last shots
are dropped, whole, until it fits; the results say how many shots items got on average.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import UserError
from lmforge.eval.tasks import Task, load_task

TEMPLATE_KEYS: dict[str, type | tuple[type, ...]] = {
    "instruction": str, "separator": str, "shot": str, "cot_cue": str, "cot_shot": str,
    "answer_marker": (str, list), "cot_max_new_tokens": int,
}
OPTIONAL_KEYS = {"name": str, "description": str}
DEFAULT_TEMPLATE: dict[str, Any] = {
    "instruction": "",
    "separator": "\n\n",
    "shot": "{query}{target}",
    "cot_cue": "\nLet's think step by step.\n",
    "cot_shot": "{query}{cue}{marker} {target}",
    "answer_marker": ["Answer:"],
    "cot_max_new_tokens": 128,
}
TEMPLATE_DIRS = (Path("configs/prompts"), Path(__file__).resolve().parents[3] / "configs" / "prompts")
COT_KINDS = ("generation", "qa")  # kinds whose answer is generated text, so a reasoning cue applies
IGNORES_SHOTS = ("perplexity",)


@dataclass
class PromptTemplate:
    instruction: str
    separator: str
    shot: str
    cot_cue: str
    cot_shot: str
    answer_markers: list[str]
    cot_max_new_tokens: int
    source: str = "built-in default"


def find_template(name: str | Path) -> Path:
    """A template file: a path, or a name of `configs/prompts/NAME.yaml` (working dir, then lmforge's checkout)."""
    path = Path(name)
    if path.is_file():
        return path
    if path.suffix == "" and path.parent == Path("."):
        for folder in TEMPLATE_DIRS:
            if (folder / f"{name}.yaml").is_file():
                return folder / f"{name}.yaml"
    raise UserError(f"prompt template {name} does not exist; pass a YAML file or a name in configs/prompts/ "
                    "(default, cot, zh)")


def load_template(name: str | Path | None) -> PromptTemplate:
    """Read and check a template file (None: the built-in default); a bad key is one line naming file and key."""
    if name is None:
        return _template(dict(DEFAULT_TEMPLATE), "built-in default")
    import yaml

    path = find_template(name)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{path}: not a readable YAML file ({type(e).__name__}); fix its syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a prompt template is a YAML mapping with the keys {', '.join(TEMPLATE_KEYS)}")
    for key in data:
        if key not in TEMPLATE_KEYS and key not in OPTIONAL_KEYS:
            raise UserError(f"{path}: unknown key {key!r}; allowed: {', '.join([*TEMPLATE_KEYS, *OPTIONAL_KEYS])}")
    for key, kind in TEMPLATE_KEYS.items():
        if key not in data:
            raise UserError(f"{path}: missing key {key!r}; a prompt template needs {', '.join(TEMPLATE_KEYS)} "
                            "(see configs/prompts/default.yaml)")
        if not isinstance(data[key], kind) or isinstance(data[key], bool):
            raise UserError(f"{path}: key {key!r} must be {_type_name(kind)}, got {type(data[key]).__name__}")
    return _template(data, str(path))


def _type_name(kind: type | tuple[type, ...]) -> str:
    return "a string or a list of strings" if isinstance(kind, tuple) else {str: "a string", int: "an integer"}[kind]


def _template(data: dict[str, Any], source: str) -> PromptTemplate:
    markers = data["answer_marker"]
    markers = [markers] if isinstance(markers, str) else markers
    if not markers or not all(isinstance(m, str) and m.strip() for m in markers):
        raise UserError(f"{source}: key 'answer_marker' must be a non-empty string or list of them")
    if data["cot_max_new_tokens"] < 1:
        raise UserError(f"{source}: key 'cot_max_new_tokens' must be >= 1, got {data['cot_max_new_tokens']}")
    fields = {"shot": ("query", "target"), "cot_shot": ("query", "target", "cue", "marker")}
    for key, names in fields.items():
        try:
            data[key].format(**{n: "" for n in names})
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(f"{source}: key {key!r} cannot be filled ({type(e).__name__}: {e}); "
                            f"use only {', '.join('{' + n + '}' for n in names)}") from None
    return PromptTemplate(instruction=data["instruction"], separator=data["separator"], shot=data["shot"],
                          cot_cue=data["cot_cue"], cot_shot=data["cot_shot"], answer_markers=list(markers),
                          cot_max_new_tokens=data["cot_max_new_tokens"], source=source)


# ---- chain of thought: the final answer after a marker -----------------------------------------

def _marker_pattern(markers: list[str]) -> re.Pattern:
    """Any marker, case-insensitive; a trailing ':' or '：' matches either (CJK full-width colon)."""
    parts = []
    for marker in markers:
        core = marker.strip().rstrip(":：")
        tail = r"\s*[:：]" if marker.strip()[-1] in ":：" else ""
        parts.append(re.escape(core) + tail)
    return re.compile("|".join(f"(?:{p})" for p in parts), re.IGNORECASE)


def parse_answer(reply: str, markers: list[str]) -> str | None:
    """The text after the LAST answer marker in `reply`, to the end of its line (the next non-empty
    line when the marker ends its line), stripped; None when no marker occurs or nothing follows it."""
    matches = list(_marker_pattern(markers).finditer(reply))
    if not matches:
        return None
    rest = reply[matches[-1].end():]
    for line in rest.split("\n"):
        if line.strip():
            return line.strip()
    return None


# ---- shots --------------------------------------------------------------------------------------

def draw_shots(n_pool: int, index: int, k: int, seed: int) -> list[int]:
    """The pool indices of item `index`'s k shots: the first k of a permutation seeded by (seed, index)."""
    order = list(range(n_pool))
    random.Random(f"fewshot:{seed}:{index}").shuffle(order)
    return order[:k]


def item_key(kind: str, item: dict[str, Any]) -> Any:
    """What makes two items the same question (a pool item must never be a scored item)."""
    return {"multiple_choice": lambda: (item["context"], tuple(item["choices"])),
            "binary": lambda: item["question"], "generation": lambda: item["prompt"],
            "qa": lambda: (item.get("context", ""), item["question"]),
            "classification": lambda: item["text"], "perplexity": lambda: item["text"]}[kind]()


def query_target(task: Task, item: dict[str, Any], where: str) -> tuple[str, str]:
    """(what the model reads, the right continuation) of a solved item, as the task's runner prompts it."""
    from lmforge.eval.runners import DEFAULT_TEMPLATES

    kind, template = task.kind, task.options.get("template")
    try:
        if kind == "multiple_choice":
            return item["context"], item["choices"][item["gold"]]
        if kind == "generation":
            return item["prompt"], item["references"][0]
        if kind == "binary":
            return (template or DEFAULT_TEMPLATES["binary"]).format(question=item["question"]), " " + item["answer"]
        if kind == "qa":
            context = item.get("context", "")
            t = template or (DEFAULT_TEMPLATES["qa"] if context else DEFAULT_TEMPLATES["qa_no_context"])
            return t.format(question=item["question"], context=context), " " + item["answers"][0]
        if kind == "classification":
            return (template or DEFAULT_TEMPLATES["classification"]).format(text=item["text"]), " " + item["label"]
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"{where}: the task's template cannot be filled for this few-shot example "
                        f"({type(e).__name__}: {e})") from None
    raise ValueError(f"no few-shot rendering for kind {kind}")


def pool_path(task: Task) -> Path | None:
    """The few-shot pool the task file's header names (`"fewshot": FILE`, relative to the task file)."""
    name = task.header.get("fewshot")
    if name is None:
        return None
    if not isinstance(name, str) or not name:
        raise UserError(f"{task.path}: header key 'fewshot' must be a file name (a task file of train examples)")
    return (task.path.parent / name) if not Path(name).is_absolute() else Path(name)


def load_pool(task: Task, k: int) -> Task:
    """The task's pool of solved train examples, checked: same kind, split train, >= k items, no scored item."""
    path = pool_path(task)
    if path is None:
        raise UserError(f"{task.path}: --fewshot {k} needs solved examples from the train split; add "
                        "\"fewshot\": \"FILE\" to the header (a task file of the same kind, split train) or "
                        "regenerate with `lmforge data make-tasks`")
    _check_pool_kind(task, path)
    pool = load_task(path, task.kind)
    if pool.split is None or pool.split.split()[0].lower() not in ("train", "training"):
        raise UserError(f"{path}: few-shot examples must come from the train split, but its header says split "
                        f"{pool.split!r}; set \"split\": \"train\" in its header (and draw them from train data)")
    if len(pool.items) < k:
        raise UserError(f"{path}: {len(pool.items)} few-shot examples, fewer than --fewshot {k}; "
                        "add examples or lower --fewshot")
    check_pool(task, pool)
    return pool


def _check_pool_kind(task: Task, path: Path) -> None:
    from lmforge.data.readers import iter_jsonl_objects

    if not path.is_file():
        raise UserError(f"{task.path}: its few-shot pool {path} does not exist; fix the header's \"fewshot\"")
    lineno, first = next(iter_jsonl_objects(path), (0, {}))
    header = first.get("task") if set(first) == {"task"} else None
    kind = header.get("kind") if isinstance(header, dict) else None
    if kind is not None and kind != task.kind:
        raise UserError(f"{path}:{lineno}: a {kind} pool for the {task.kind} task {task.path}; "
                        "few-shot examples must be of the task's kind")


def check_pool(task: Task, pool: Task) -> None:
    """No pool item may be a scored item (the shots would give the answer away)."""
    scored = {item_key(task.kind, item): i for i, item in enumerate(task.items)}
    for j, item in enumerate(pool.items):
        i = scored.get(item_key(task.kind, item))
        if i is not None:
            raise UserError(f"{pool.where(j)}: this few-shot example is the scored item at {task.where(i)}; "
                            "remove it from the pool (shots must never be scored items)")


@dataclass
class Prompter:
    """Builds the prompts of one task: instruction, k shots from its pool, the item, and the CoT cue."""

    template: PromptTemplate
    k: int = 0
    seed: int = 0
    cot: bool = False
    pool: Task | None = None
    shots_used: list[int] = field(default_factory=list)  # per scored item, after fitting the context
    cot_budget: int | None = None  # the CoT reply budget the runner used

    def render(self, task: Task, index: int, query: str, n_shots: int) -> str:
        t = self.template
        parts = [t.instruction] if t.instruction else []
        cot = self.cot and task.kind in COT_KINDS
        if n_shots:
            for j in draw_shots(len(self.pool.items), index, n_shots, self.seed):
                q, a = query_target(self.pool, self.pool.items[j], self.pool.where(j))
                fmt = t.cot_shot if cot else t.shot
                parts.append(fmt.format(query=q, target=a, cue=t.cot_cue, marker=t.answer_markers[0]))
        parts.append(query + (t.cot_cue if cot else ""))
        return t.separator.join(parts)

    def prompts(self, task: Task, queries: list[str], model, tokenizer, reserve: int | list[int]) -> list[str]:
        """Each item's full prompt, with as many of its k shots as fit the context with `reserve` tokens after it."""
        from lmforge.infer.generate import is_encoder_decoder

        block = model.config.block_size
        encdec = is_encoder_decoder(model)
        out = []
        self.shots_used = []
        for i, query in enumerate(queries):
            room = block - 1 if encdec else block - 1 - (reserve[i] if isinstance(reserve, list) else reserve)
            n = self.k
            text = self.render(task, i, query, n)
            while n > 0 and len(tokenizer.encode(text)) > room:
                n -= 1
                text = self.render(task, i, query, n)
            out.append(text)
            self.shots_used.append(n)
        return out

    def info(self) -> dict[str, Any]:
        """What results.json records under `prompting`."""
        used = self.shots_used
        info: dict[str, Any] = {"fewshot": self.k, "fewshot_seed": self.seed, "cot": self.cot,
                                "template": self.template.source,
                                "pool": str(self.pool.path) if self.pool is not None else None}
        if used:
            info["shots_mean"] = sum(used) / len(used)
            info["items_with_fewer_shots"] = sum(u < self.k for u in used)
        return info

    def notes(self, task: Task) -> list[str]:
        if task.kind in IGNORES_SHOTS:
            return ["perplexity reads no prompt: --fewshot, --cot and --template do not apply"] if (
                self.k or self.cot) else []
        notes = []
        if self.k:
            notes.append(f"{self.k}-shot: examples from {self.pool.path} (split {self.pool.split}), drawn with "
                         f"--fewshot-seed {self.seed}; template {self.template.source}")
        fewer = sum(u < self.k for u in self.shots_used)
        if fewer:
            mean = sum(self.shots_used) / max(len(self.shots_used), 1)
            notes.append(f"{fewer} of {len(self.shots_used)} prompts were too long for the context with "
                         f"{self.k} shots: their last shots were dropped (mean shots given {mean:.2f})")
        if self.cot_budget is not None:
            notes.append(f"chain of thought: cue {self.template.cot_cue!r}, replies up to {self.cot_budget} new "
                         f"tokens (template: {self.template.cot_max_new_tokens}, at most half a decoder's context; "
                         "--max-new-tokens overrides), the answer read after the last of "
                         f"{self.template.answer_markers}")
        if self.cot and task.kind not in COT_KINDS:
            notes.append(f"--cot applies to generation and qa tasks; this {task.kind} task was prompted without it")
        return notes


def make_prompter(task: Task, k: int, seed: int, cot: bool, template: PromptTemplate | None) -> Prompter | None:
    """The task's prompter (None when nothing changes the prompts: 0 shots, no CoT, no template)."""
    if k < 0:
        raise UserError(f"--fewshot must be >= 0, got {k}")
    if not k and not cot and template is None:
        return None
    pool = load_pool(task, k) if k and task.kind not in IGNORES_SHOTS else None
    return Prompter(template=template or load_template(None), k=k, seed=seed, cot=cot, pool=pool)


def parse_shots(text: str) -> list[int]:
    """`--fewshot 0,1,3,5` -> [0, 1, 3, 5] (one or more distinct counts >= 0)."""
    try:
        shots = [int(x) for x in str(text).split(",")]
    except ValueError:
        raise UserError(f"--fewshot {text!r}: give a number of shots or a comma-separated list, e.g. 0,1,3,5") from None
    if any(k < 0 for k in shots) or len(set(shots)) != len(shots):
        raise UserError(f"--fewshot {text!r}: shot counts must be distinct and >= 0")
    return shots
