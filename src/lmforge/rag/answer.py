"""Answer a question from retrieved chunks with a local model, citing the chunks it used.

The prompt puts the retrieved chunks, numbered, each with its source and char offsets, before the
question:

    Answer the question from the numbered passages below; cite the passages you use as [n].

    [1] (hamlet.txt:120-410) To be, or not to be, ...   (the source's file name and char offsets)
    [2] ...

    Question: ...
    Answer:

A checkpoint with a chat format (`lmforge.tokenizer.chat.chat_template`: lmforge's role tokens or a
converted model's jinja template) gets it as one user message followed by the generation prompt;
any other gets the plain text. Chunks are added best first while the prompt still leaves room for
`max_new_tokens` in the model's context; the first chunk that does not fit whole is cut at a token
boundary (its citation's `end` moves with it) and the rest are left out. A question that does not fit
even without chunks is a one-line UserError.

Citations: the chunks the answer cites with [n] markers (n among the passages in the prompt), or,
when it cites none, every chunk in the prompt (`cited_by`: "markers" or "context").
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from lmforge.errors import UserError
from lmforge.rag.retrieve import Hit, RagIndex

INSTRUCTION = "Answer the question from the numbered passages below; cite the passages you use as [n]."
_MARKER = re.compile(r"\[(\d+)\]")


@functools.lru_cache(maxsize=2)
def load_generator(path: str, device: str = "cpu") -> tuple[Any, Any, Any]:
    """(model, tokenizer, chat template or None) of a generative checkpoint, loaded once per process."""
    from lmforge.infer.generate import require_generative
    from lmforge.tokenizer.chat import chat_template
    from lmforge.train.checkpoint import load_pretrained

    model, tokenizer = load_pretrained(path, device)
    require_generative(model, path)
    try:
        template = chat_template(tokenizer)
    except UserError:
        template = None
    return model, tokenizer, template


def format_passage(n: int, hit: Hit, text: str | None = None) -> str:
    text = hit.text if text is None else text
    return f"[{n}] ({Path(hit.source).name}:{hit.start}-{hit.start + len(text)}) {' '.join(text.split())}"


def render_prompt(passages: list[str], question: str) -> str:
    context = "\n".join(passages)
    return f"{INSTRUCTION}\n\n{context}\n\nQuestion: {question.strip()}\nAnswer:"


def encode_prompt(tokenizer: Any, template: Any, prompt: str) -> list[int]:
    if template is not None:
        return list(template.encode([{"role": "user", "content": prompt}], add_generation_prompt=True))
    return tokenizer.encode(prompt)


def fit_passages(hits: list[Hit], question: str, budget: int, tokenizer: Any,
                 template: Any) -> tuple[list[int], list[tuple[Hit, str]]]:
    """(prompt ids, [(hit, the text of it in the prompt)]): the most chunks that fit in `budget` tokens."""
    length = len(encode_prompt(tokenizer, template, render_prompt([], question)))
    if length > budget:
        raise UserError(f"the question is {length} tokens with the prompt around it, more than the {budget} the "
                        f"model's context leaves besides max_new_tokens; shorten the question or lower max_new_tokens")
    used: list[tuple[Hit, str]] = []
    for hit in hits:
        texts = [format_passage(i + 1, h, t) for i, (h, t) in enumerate(used)]
        if _fits(texts + [format_passage(len(used) + 1, hit)], question, budget, tokenizer, template):
            used.append((hit, hit.text))
            continue
        lo, hi = 0, len(hit.text)  # the longest prefix that fits (at a token boundary)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _fits(texts + [format_passage(len(used) + 1, hit, hit.text[:mid])], question, budget, tokenizer,
                     template):
                lo = mid
            else:
                hi = mid - 1
        if lo > 0:
            used.append((hit, hit.text[:lo]))
        break
    passages = [format_passage(i + 1, h, t) for i, (h, t) in enumerate(used)]
    return encode_prompt(tokenizer, template, render_prompt(passages, question)), used


def _fits(passages: list[str], question: str, budget: int, tokenizer: Any, template: Any) -> bool:
    return len(encode_prompt(tokenizer, template, render_prompt(passages, question))) <= budget


def cite(answer: str, used: list[tuple[Hit, str]]) -> tuple[list[dict[str, Any]], str]:
    """(citations, "markers" | "context"): the [n] the answer names among the prompt's passages, else all."""
    numbers = list(dict.fromkeys(int(m) for m in _MARKER.findall(answer) if 1 <= int(m) <= len(used)))
    basis = "markers" if numbers else "context"
    chosen = [used[n - 1] for n in numbers] if numbers else used
    return [{"chunk_id": h.chunk_id, "source": h.source, "start": h.start, "end": h.start + len(t)}
            for h, t in chosen], basis


def answer_question(index: RagIndex, question: str, ckpt: str | Path, *, k: int = 5, mode: str = "hybrid",
                    max_new_tokens: int = 128, seed: int | None = 0, temperature: float = 0.0) -> dict[str, Any]:
    """Retrieve the top-k chunks, generate an answer from them with `ckpt`, and cite the chunks used.

    Returns {"question", "answer", "citations": [{"chunk_id", "source", "start", "end"}], "hits": [Hit
    dicts], "cited_by", "prompt_tokens"}. Greedy by default (temperature 0); `seed` seeds sampling.
    """
    from lmforge.infer.generate import generate_text
    from lmforge.train.checkpoint import resolve_checkpoint

    if not question.strip():
        raise UserError("the question is empty; pass a question")
    model, tokenizer, template = load_generator(str(resolve_checkpoint(ckpt).resolve()))
    context = model.config.block_size
    if max_new_tokens < 1 or max_new_tokens >= context:
        raise UserError(f"max_new_tokens {max_new_tokens} must be between 1 and the model's context {context} - 1")
    hits = index.search(question, k, mode=mode)
    prompt_ids, used = fit_passages(hits, question, context - max_new_tokens, tokenizer, template)
    stop_ids = set(template.stop_ids) if template is not None else None
    answer = generate_text(model, tokenizer, prompt_ids, max_new_tokens, temperature=temperature, seed=seed,
                           stop_ids=stop_ids)
    citations, basis = cite(answer, used)
    return {"question": question, "answer": answer.strip(), "citations": citations,
            "hits": [h.to_dict() for h in hits], "cited_by": basis, "prompt_tokens": len(prompt_ids)}


def format_result(result: dict[str, Any]) -> str:
    """`lmforge rag query`'s readable output: the answer and its citations (when there is one), then the hits."""
    lines = []
    if "answer" in result:
        lines += [f"answer: {result['answer']}", f"citations ({result['cited_by']}):"]
        lines += [f"  [{c['chunk_id']}] {c['source']}:{c['start']}-{c['end']}" for c in result["citations"]]
        lines.append("")
    for rank, hit in enumerate(result["hits"], start=1):
        text = " ".join(hit["text"].split())
        text = text if len(text) <= 200 else text[:197] + "..."
        lines.append(f"{rank}. [{hit['chunk_id']}] {hit['score']:.4f} {hit['source']}:{hit['start']}-{hit['end']}")
        lines.append(f"   {text}")
    return "\n".join(lines) if lines else "no chunks found"
