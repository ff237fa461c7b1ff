"""A tiny GPT overfit on a few chat conversations, saved as a checkpoint, for the chat page and
`lmforge chat --url` tests: it answers the trained turns word for word under greedy decoding, so a
test knows the reply (an HTML-injection string, Chinese text); and a random one whose replies never end."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

INJECTION = "<script>alert(1)</script> and <img src=x onerror=alert(2)>"
GREETING = "Hello! I am a tiny lmforge model. Ask me anything."
ABILITIES = "I stream my reply token by token. 我也会说中文：你好，世界！"
# One conversation, every assistant turn trained in its context (the chat page's multi-turn flow).
CONVERSATION = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": GREETING},
    {"role": "user", "content": "What can you do?"},
    {"role": "assistant", "content": ABILITIES},
    {"role": "user", "content": "Show me some HTML"},
    {"role": "assistant", "content": INJECTION},
]
ENDLESS_MAX_TOKENS = 4000


_CACHE: dict[str, Path] = {}


def chat_checkpoint() -> Path:
    """make_chat_checkpoint's checkpoint, trained once per test process (the page and client tests share it)."""
    if "chat" not in _CACHE:
        _CACHE["chat"] = make_chat_checkpoint(_temp_root())
    return _CACHE["chat"]


def endless_checkpoint() -> Path:
    """A random tiny GPT that never ends a reply itself (serve_helpers.make_gpt_ckpt) with a context of
    ENDLESS_MAX_TOKENS + 96: a reply of ENDLESS_MAX_TOKENS tokens takes seconds, long enough to stop it."""
    from serve_helpers import make_gpt_ckpt

    if "endless" not in _CACHE:
        _CACHE["endless"] = make_gpt_ckpt(_temp_root(), block_size=ENDLESS_MAX_TOKENS + 96)
    return _CACHE["endless"]


def _temp_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="lmforge-chat-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def make_chat_checkpoint(root: Path, steps: int = 150, seed: int = 0) -> Path:
    """Train the tiny model on CONVERSATION; return its checkpoint dir."""
    import torch

    from lmforge.models import GPT, ModelConfig
    from lmforge.tokenizer import Tokenizer
    from lmforge.tokenizer.chat import chat_template
    from lmforge.tokenizer.train import train_tokenizer
    from lmforge.train.checkpoint import save_checkpoint, tied_aliases

    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    text = "\n".join(m["content"] for m in CONVERSATION)
    (corpus / "chat.txt").write_text(text + "\n", encoding="utf-8")
    train_tokenizer(corpus, root / "tok", kind="char")
    tokenizer = Tokenizer.load(root / "tok")
    template = chat_template(tokenizer)

    rows = [_masked(template.encode(CONVERSATION, add_generation_prompt=False, return_assistant_mask=True))]

    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=64, block_size=256,
                            dropout=0.0))
    _overfit(model, rows, steps)
    path = root / "ckpt"
    save_checkpoint(path, model.state_dict(), model.config.to_dict(), root / "tok" / "tokenizer.json", None,
                    drop=tied_aliases(model))
    return path


def _masked(encoded: dict) -> tuple[list[int], list[int]]:
    return encoded["input_ids"], encoded["assistant_mask"]


def _overfit(model, rows: list[tuple[list[int], list[int]]], steps: int) -> None:
    """Plain AdamW on the rows (one batch, right-padded); loss only where the mask is 1."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    idx = torch.zeros(len(rows), width - 1, dtype=torch.long)
    targets = torch.full((len(rows), width - 1), -100, dtype=torch.long)
    for r, (ids, mask) in enumerate(rows):
        idx[r, :len(ids) - 1] = torch.tensor(ids[:-1])
        for t in range(1, len(ids)):
            if mask[t]:
                targets[r, t - 1] = ids[t]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    counts = (targets != -100).sum(1, keepdim=True).clamp(min=1).float()
    model.train()
    for _ in range(steps):  # every row weighs the same, however many tokens it trains
        logits, _ = model(idx)
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        loss = (losses / counts).sum() / len(rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
