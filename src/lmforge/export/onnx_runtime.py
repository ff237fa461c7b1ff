"""Running a `convert to-onnx` dir with ONNX Runtime: greedy generation through the KV-cache graph,
and BERT encodings. This is what the tests compare with lmforge, and a reference for callers.

    onnx = OnnxModel("onnx-dir")                       # int8=True: the --int8 graphs
    onnx.greedy([[5, 6, 7], [8, 9]], max_new_tokens=20)  # new ids per prompt, like lmforge's generate
    onnx.encode(input_ids, attention_mask)             # BERT: (last_hidden_state, embeddings)

Decoder-only prompts of different lengths are left-padded (the graph's attention_mask hides the
padding and numbers each row's positions from its first real token); each step feeds the
presents back as the next step's past. No sliding window: prompt + new tokens must fit block_size.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class OnnxModel:
    """The graphs of an ONNX export dir, as onnxruntime sessions (see the module docstring)."""

    def __init__(self, path: str | Path, *, int8: bool = False) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.config: dict[str, Any] = json.loads((self.path / "onnx_config.json").read_text())
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.sessions = {}
        for name, graph in self.config["graphs"].items():
            file = graph["int8_file"] if int8 else graph["file"]
            self.sessions[name] = ort.InferenceSession(str(self.path / file), options,
                                                       providers=["CPUExecutionProvider"])

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        c = self.config
        shape = (batch, c["num_kv_heads"], 0, c["head_dim"])
        return {f"past_key_values.{i}.{kv}": np.zeros(shape, np.float32)
                for i in range(c["num_layers"]) for kv in ("key", "value")}

    def _step(self, graph: str, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One run: the last position's logits (B, vocab) and the presents renamed as the next past."""
        session = self.sessions[graph]
        outputs = session.run(None, feed)
        names = [o.name for o in session.get_outputs()]
        past = {n.replace("present.", "past_key_values.", 1): v for n, v in zip(names[1:], outputs[1:])}
        return outputs[0][:, -1], past

    def greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               logits_out: list[np.ndarray] | None = None) -> list[list[int]]:
        """Greedy continuations of each prompt (an encoder-decoder: of each source). `logits_out`, when
        given, receives each step's (B, vocab) logits."""
        if self.config["arch"] not in ("gpt", "encdec"):
            raise ValueError(f"a {self.config['arch']} export does not generate")
        longest, block = max(len(p) for p in prompts), self.config["block_size"]
        decoder_only = self.config["arch"] == "gpt"
        if max(longest, max_new_tokens) > block or (decoder_only and longest + max_new_tokens - 1 > block):
            raise ValueError(f"prompts of up to {longest} tokens and {max_new_tokens} new ones do not fit the "
                             f"context (block_size={block}); there is no sliding window here")
        if self.config["arch"] == "encdec":
            return self._greedy_seq2seq(prompts, max_new_tokens, logits_out)
        ids = np.array([[0] * (longest - len(p)) + list(p) for p in prompts], dtype=np.int64)
        mask = np.array([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], dtype=np.int64)
        past, new = self._empty_past(len(prompts)), []
        for _ in range(max_new_tokens):
            logits, past = self._step("model", {"input_ids": ids, "attention_mask": mask, **past})
            if logits_out is not None:
                logits_out.append(logits)
            ids = logits.argmax(-1).astype(np.int64)[:, None]
            new.append(ids[:, 0])
            mask = np.concatenate([mask, np.ones_like(ids)], axis=1)
        return np.stack(new, axis=1).tolist() if new else [[] for _ in prompts]

    def _greedy_seq2seq(self, sources: Sequence[Sequence[int]], max_new_tokens: int,
                        logits_out: list[np.ndarray] | None) -> list[list[int]]:
        start = self.config["graphs"]["decoder"].get("decoder_start_token_id")
        if start is None:
            raise ValueError("the model has no decoder_start_token_id")
        longest = max(len(s) for s in sources)
        src = np.array([list(s) + [0] * (longest - len(s)) for s in sources], dtype=np.int64)
        mask = np.array([[1] * len(s) + [0] * (longest - len(s)) for s in sources], dtype=np.int64)
        hidden = self.sessions["encoder"].run(None, {"input_ids": src, "attention_mask": mask})[0]
        ids = np.full((len(sources), 1), start, dtype=np.int64)
        past, new = self._empty_past(len(sources)), []
        for _ in range(max_new_tokens):
            feed = {"decoder_input_ids": ids, "encoder_hidden_states": hidden, "encoder_attention_mask": mask}
            logits, past = self._step("decoder", {**feed, **past})
            if logits_out is not None:
                logits_out.append(logits)
            ids = logits.argmax(-1).astype(np.int64)[:, None]
            new.append(ids[:, 0])
        return np.stack(new, axis=1).tolist() if new else [[] for _ in sources]

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray,
               token_type_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """BERT: (last_hidden_state (B, T, d), embeddings (B, d), the mean over real tokens)."""
        types = np.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                "token_type_ids": types.astype(np.int64)}
        hidden, embeddings = self.sessions["model"].run(None, feed)
        return hidden, embeddings
