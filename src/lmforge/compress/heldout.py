"""The held-out text a compressed model is measured on: perplexity before and after.

By default the val split of the token dir the checkpoint was trained on — the run records it
(`config.yaml` `data.tokens`, `summary.json` `inputs.tokens`); a checkpoint made from another
checkpoint (`lmforge quantize`, `convert`, `merge`) is followed back through its summary's
`inputs` — or a text file (`--eval FILE`). At most `max_tokens` tokens are scored (the first
ones: the same tokens before and after), in disjoint windows of the model's context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from lmforge.errors import UserError

DEFAULT_EVAL_TOKENS = 16384
SOURCE_KEYS = ("checkpoint", "ckpt", "base", "src")  # summary.json inputs that name the checkpoint a dir came from


@dataclass
class Heldout:
    ids: np.ndarray  # int64, starting with the <|eos|> that precedes the first document
    n_bytes: int  # UTF-8 bytes of the scored text (bits per byte)
    source: str  # what it is, for summary.json


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    except (ValueError, OSError):
        return {}


def _recorded(run_dir: Path) -> tuple[list[str], list[str]]:
    """(token dirs, source checkpoints) that `run_dir`'s config.yaml / summary.json name."""
    tokens, sources = [], []
    inputs = _read_json(run_dir / "summary.json").get("inputs") or {}
    if isinstance(inputs.get("tokens"), dict):
        tokens.append(inputs["tokens"].get("path"))
    sources += [inputs[k].get("path") for k in SOURCE_KEYS if isinstance(inputs.get(k), dict)]
    if (run_dir / "config.yaml").is_file():
        try:
            config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
            tokens.append(((config.get("data") or {}) if isinstance(config, dict) else {}).get("tokens"))
        except yaml.YAMLError:
            pass
    return [t for t in tokens if t], [s for s in sources if s]


def _tokenizer_bytes(ckpt: Path) -> bytes | None:
    for file in (ckpt / "tokenizer.json", ckpt / "checkpoints" / "best" / "tokenizer.json"):
        if file.is_file():
            return file.read_bytes()
    return None


def _candidates(run_dir: Path, recorded: str) -> list[Path]:
    """Where a recorded token dir may be: as written (relative to the working dir), and relative to the
    run dir and each of its parents (a run made with `--out runs/x` from another directory)."""
    path = Path(recorded)
    if path.is_absolute():
        return [path]
    return [path, *(parent / path for parent in (run_dir, *run_dir.resolve().parents))]


def token_dir_of(ckpt: str | Path, depth: int = 4) -> Path | None:
    """The token dir (with meta.json) the checkpoint `ckpt` was trained on, if its run recorded one:
    the first candidate whose tokenizer.json is the checkpoint's own (a relative path recorded from
    another working dir can name a different run's tokens)."""
    ckpt = Path(ckpt)
    mine = _tokenizer_bytes(ckpt)
    for run_dir in dict.fromkeys((ckpt, ckpt.parent.parent, ckpt.parent)):
        tokens, sources = _recorded(run_dir)
        for t in tokens:
            for candidate in _candidates(run_dir, t):
                theirs = candidate / "tokenizer.json"
                if (candidate / "meta.json").is_file() and (
                        mine is None or not theirs.is_file() or theirs.read_bytes() == mine):
                    return candidate
        for s in sources if depth > 0 else ():
            if Path(s).resolve() != ckpt.resolve() and (found := token_dir_of(Path(s), depth - 1)):
                return found
    return None


def from_token_dir(path: Path, tokenizer, max_tokens: int, split: str = "val") -> Heldout:
    from lmforge.tokenizer.shards import load_split, read_meta

    meta = read_meta(path)
    if meta.get("eos_id") != tokenizer.eos_id or meta.get("vocab_size") != tokenizer.vocab_size:
        raise UserError(f"{path}/meta.json was made with another tokenizer than the checkpoint's; "
                        "pass --eval FILE (a text file) instead")
    ids = np.concatenate([np.array([tokenizer.eos_id]), *load_split(path, split)]).astype(np.int64)[:max_tokens + 1]
    text_ids = ids[1:][ids[1:] != tokenizer.eos_id]
    return Heldout(ids, len(tokenizer.decode(text_ids.tolist()).encode("utf-8")),
                   f"the '{split}' split of {path} (first {len(ids) - 1} tokens)")


def from_text_file(file: Path, tokenizer, max_tokens: int) -> Heldout:
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--eval {file} does not exist; pass a UTF-8 text file") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise UserError(f"--eval {file} is not a UTF-8 text file ({type(e).__name__}); pass one") from None
    ids = tokenizer.encode(text)[:max_tokens]
    if not ids:
        raise UserError(f"--eval {file} has no text; pass a file with held-out text")
    return Heldout(np.array([tokenizer.eos_id, *ids], dtype=np.int64), len(tokenizer.decode(ids).encode("utf-8")),
                   f"{file} (first {len(ids)} tokens)")


def heldout_text(ckpt: Path, tokenizer, eval_file: str | Path | None, max_tokens: int) -> Heldout | None:
    """`--eval FILE`, else the val split of the checkpoint's token dir; None if there is neither."""
    if max_tokens <= 0:
        raise UserError(f"--eval-tokens must be positive, got {max_tokens}")
    if eval_file is not None:
        return from_text_file(Path(eval_file), tokenizer, max_tokens)
    tokens = token_dir_of(ckpt)
    return None if tokens is None else from_token_dir(tokens, tokenizer, max_tokens)


def perplexity(model, heldout: Heldout, batch_size: int = 8, progress: bool = True) -> float:
    from lmforge.eval.runners import Settings, run_perplexity_sequences

    settings = Settings(batch_size=batch_size, progress=progress)
    return float(run_perplexity_sequences(model, [heldout.ids], [heldout.n_bytes], settings).metrics["perplexity"])
