"""The conversions as directories: an HF model dir to an lmforge checkpoint (`from_hf`) and back (`to_hf`).

Reads HF files (config.json; model.safetensors, a sharded index or a weights-only
pytorch_model.bin), maps the tensors (`tensors.py`) and writes the other side with its tokenizer
and metadata. Both directions write the output under a temp name and swap it in (`atomic_dir`);
an output that is, lies inside or holds the input is refused, and a non-empty one needs
`overwrite` (`check_output`).

A BERT's tokenizer.json gains BERT's [CLS]/[SEP] post-processor at to-hf (lmforge's tokenizers add
them in `Tokenizer.__call__`, not in the file), so HF tokenizers and sentence-transformers feed the
encoder what training and `lmforge embed` did.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.errors import UserError
from lmforge.export.hf.registry import arch_for, hf_layout_for
from lmforge.export.hf.tensors import (
    dropped_in_hf,
    expected_shapes,
    state_from_hf,
    state_to_hf,
    with_base_prefix,
)
from lmforge.fsutil import atomic_dir, atomic_write_json, atomic_write_text, write_summary
from lmforge.models.config import ModelConfig

# --------------------------------------------------------------------------------------------
# Files


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    file = hf_dir / "config.json"
    if not file.is_file():
        raise UserError(f"{file} does not exist; pass a Hugging Face model directory (config.json + weights)")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{file}: expected a JSON object")
    return data


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{file} is truncated or corrupt ({str(e).splitlines()[0]}); re-download or "
                        "re-save it") from None


def read_hf_weights(hf_dir: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """HF weights from model.safetensors, a sharded index, or pytorch_model.bin (weights_only)."""
    single, index, pickle = (hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json",
                             hf_dir / "pytorch_model.bin")
    if single.is_file():
        return _load_safetensors(single), single
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{index}: not a safetensors index (needs a 'weight_map' object)") from None
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not (hf_dir / shard).is_file():
                raise UserError(f"{index} names shard {shard!r}, which does not exist in {hf_dir}")
            state.update(_load_safetensors(hf_dir / shard))
        return state, index
    if pickle.is_file():
        try:  # weights_only: a .bin is a pickle, and a pickle may run code; this one may not
            return torch.load(pickle, map_location="cpu", weights_only=True), pickle
        except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
            raise UserError(f"{pickle} cannot be read safely ({type(e).__name__}); convert it to "
                            "safetensors first") from None
    raise UserError(f"{hf_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def check_output(out: Path, inputs: list[tuple[str, Path]], *, overwrite: bool) -> None:
    """Refuse an output dir that would destroy what convert reads, or replace a dir unasked.

    The output is built under a temp name and swapped in whole (`atomic_dir`), so an output that
    is an input, lies inside one or holds one would delete or change that input: always refused.
    An existing non-empty dir is replaced only with `overwrite` (`--overwrite`, as in `pretrain`).
    `inputs` pairs a name for the message ("checkpoint") with the path read.
    """
    target = out.resolve()
    for name, path in inputs:
        source = path.resolve()
        if target == source:
            raise UserError(f"output {out} is the {name} being converted ({path}); converting would replace it; "
                            "pick another output dir")
        if source in target.parents:
            raise UserError(f"output {out} is inside the {name} being converted ({path}); converting would "
                            "change it; pick an output dir outside it")
        if target in source.parents:
            raise UserError(f"output {out} contains the {name} being converted ({path}); converting would "
                            "delete it; pick an output dir outside it")
    if out.is_symlink():  # the swap would replace the link, not the directory it names
        raise UserError(f"output {out} is a symbolic link; give the directory itself ({out.resolve()}) "
                        "or another output dir")
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise UserError(f"output {out} is or contains the current directory, which converting would replace; "
                        "pick a new output dir")
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory; pick another output dir")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} already exists and is not empty; use --overwrite to replace it, or another output dir")


def from_hf(hf_dir: str | Path, out: str | Path, *, overwrite: bool = False,
            require_tokenizer: bool = False) -> dict[str, Any]:
    """Convert an HF model directory into an lmforge checkpoint directory; returns the summary.

    The summary's metrics name the tensors initialized because the file lacked them
    (`initialized`, e.g. BERT's MLM head in a sentence-transformers BertModel). Without a
    tokenizer.json in `hf_dir` the checkpoint holds the weights only: to_hf reads it, but
    generate/eval/embed (`load_pretrained`) do not, so the CLI passes `require_tokenizer`
    and refuses such a dir up front. `out` must not overlap `hf_dir`; a non-empty `out` is
    replaced only with `overwrite` (see `check_output`).
    """
    from lmforge.train.checkpoint import save_checkpoint

    t0 = time.perf_counter()
    hf_dir, out = Path(hf_dir), Path(out)
    hf = read_hf_config(hf_dir)
    where = str(hf_dir / "config.json")
    check_output(out, [("HF model dir", hf_dir)], overwrite=overwrite)
    tokenizer = hf_dir / "tokenizer.json"
    if require_tokenizer and not tokenizer.is_file():
        raise UserError(f"{tokenizer} does not exist; an lmforge checkpoint carries its tokenizer (generate, eval "
                        "and embed need it): write it first, e.g. AutoTokenizer.from_pretrained(dir)"
                        ".save_pretrained(dir)")
    arch = arch_for(hf.get("model_type"), where)
    hf_state, weights_file = read_hf_weights(hf_dir)
    try:
        config = arch.config_from_hf(hf, where)
        if arch.heads_from_weights is not None:
            shapes = {k: tuple(v.shape) for k, v in with_base_prefix(arch, hf_state).items()}
            arch.heads_from_weights(config, shapes)
    except UserError as e:
        if str(e).startswith(where):
            raise
        # ModelConfig's validation names our key (model.n_head); say which file it came from
        raise UserError(f"{where}: {e} (as converted to lmforge's model config)") from None
    state = state_from_hf(config, arch.model_type, hf_state, str(weights_file))
    initialized = sorted(set(expected_shapes(config)) - set(state))
    if initialized:  # heads the HF class does not have: freshly initialized, reproducibly
        from lmforge.models import build_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            fresh = build_model(config).state_dict()
        dtype = next(iter(state.values())).dtype
        state.update({k: fresh[k].to(dtype) for k in initialized})
    if tokenizer.is_file():
        from lmforge.tokenizer import Tokenizer

        if Tokenizer.load(tokenizer).vocab_size > config.vocab_size:  # a mismatched tokenizer
            raise UserError(f"{tokenizer} has more tokens than vocab_size={config.vocab_size} in {where}; "
                            "it belongs to another model")
    config.hf_model_type = arch.model_type  # to-hf writes a Mistral back as Mistral, not Llama
    params = sum(t.numel() for t in state.values())
    with atomic_dir(out) as tmp:  # the checkpoint, its metadata and summary appear together
        save_checkpoint(tmp, state, config.to_dict(), tokenizer if tokenizer.is_file() else None, None)
        if arch.model_type == "bert":
            _copy_sentence_transformers_config(hf_dir, tmp)
        summary = write_summary(tmp, "convert from-hf", config=config.to_dict(), inputs={"hf_dir": hf_dir},
                                metrics={"model_type": arch.model_type, "tensors": len(state), "parameters": params,
                                         "tokenizer": tokenizer.is_file(), "initialized": initialized},
                                wall_time_s=time.perf_counter() - t0)
    return summary


# --------------------------------------------------------------------------------------------
# sentence-transformers metadata (BERT): how `lmforge embed` and SentenceTransformer agree


def _copy_sentence_transformers_config(hf_dir: Path, out: Path) -> None:
    """Keep a sentence-transformers model's max_seq_length (read by `lmforge embed`), and warn
    when its pooling is not the mean pooling `lmforge embed` does."""
    from lmforge.infer.embed import SENTENCE_CONFIG

    st_config = hf_dir / SENTENCE_CONFIG
    if st_config.is_file():
        atomic_write_json(out / SENTENCE_CONFIG, json.loads(st_config.read_text()))
    try:
        modules = json.loads((hf_dir / "modules.json").read_text())
        pooling_dirs = [m.get("path", "") for m in modules if str(m.get("type", "")).endswith(".Pooling")]
        pooling = json.loads((hf_dir / pooling_dirs[0] / "config.json").read_text()) if pooling_dirs else {}
    except (OSError, json.JSONDecodeError, AttributeError, TypeError):
        return  # not a sentence-transformers model, or one without a readable pooling config
    modes = sorted(k.removeprefix("pooling_mode_") for k, v in pooling.items() if k.startswith("pooling_mode_") and v)
    if pooling and modes != ["mean_tokens"]:
        warnings.warn(f"{hf_dir}: this sentence-transformers model pools with {', '.join(modes) or 'nothing'}; "
                      "`lmforge embed` mean-pools, so its vectors will differ", stacklevel=2)


def _write_sentence_transformers_files(tmp: Path, ckpt: Path, c: ModelConfig) -> None:
    """modules.json + pooling config: SentenceTransformer(dir) then computes `lmforge embed`'s
    vectors (the encoder, mean pooling, L2 normalization) with the same max_seq_length."""
    from lmforge.infer.embed import SENTENCE_CONFIG, max_seq_length

    atomic_write_json(tmp / SENTENCE_CONFIG, {"max_seq_length": max_seq_length(ckpt, c), "do_lower_case": False})
    atomic_write_json(tmp / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ])
    (tmp / "1_Pooling").mkdir()
    atomic_write_json(tmp / "1_Pooling" / "config.json", {
        "word_embedding_dimension": c.n_embd, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False})


def _add_chat_template(tok_config: dict[str, Any], ckpt: Path) -> None:
    """Put the checkpoint's chat template into the tokenizer_config.json to-hf writes: the one its
    tokenizer ships (a converted model's, with the special-token strings it names), else lmforge's
    role-token format as jinja when the tokenizer has those tokens."""
    from lmforge.tokenizer import Tokenizer
    from lmforge.tokenizer.chat import END, LMFORGE_JINJA, read_hf_chat_template

    source, specials, _ = read_hf_chat_template(ckpt)
    if source is None and Tokenizer.load(ckpt).token_to_id(END) is not None:
        source = LMFORGE_JINJA
    if source is not None:
        tok_config["chat_template"] = source
        for name, token in specials.items():
            tok_config.setdefault(name, token)


def _tokenizer_config(tokenizer_file: Path, block_size: int,
                      arch: str = "gpt") -> tuple[dict[str, Any], dict[str, int]]:
    """A minimal tokenizer_config.json for `AutoTokenizer`, and the special ids for config.json.

    BERT's roles are [CLS]/[SEP]/[PAD]/[MASK]/[UNK]; lmforge's tokenizers fill [CLS] with
    <|bos|> and [SEP] with <|eos|>, and the mlm objective added <|mask|>.
    """
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.objectives import MASK, MASK_FALLBACKS

    tok = Tokenizer.load(tokenizer_file)
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size}
    ids: dict[str, int] = {}
    roles = (("cls", "bos_id"), ("sep", "eos_id"), ("pad", "pad_id")) if arch == "bert" else \
        (("bos", "bos_id"), ("eos", "eos_id"), ("pad", "pad_id"))
    for role, getter in roles:
        try:
            token_id = getattr(tok, getter)
        except UserError:  # this tokenizer has no such special token
            continue
        cfg[f"{role}_token"] = tok.id_to_token(token_id)
        ids[f"{role}_token_id"] = token_id
    if arch == "bert":
        for role, names in (("mask", (MASK, *MASK_FALLBACKS)), ("unk", ("<|unk|>", "[UNK]", "<unk>"))):
            found = next((n for n in names if tok.token_to_id(n) is not None), None)
            if found is not None:
                cfg[f"{role}_token"] = found
        # segment ids too: BERT reads them, and a pair is segment 0 then 1 (the post-processor's)
        cfg["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    return cfg, ids


def _bert_tokenizer_json(tokenizer_file: Path, type_vocab_size: int = 2) -> str | None:
    """tokenizer.json text that wraps texts as our BERT was trained, or None to copy the file as is.

    lmforge adds [CLS]/[SEP] in `Tokenizer.__call__` (the mlm objective's format, used by `lmforge
    embed`: `<|bos|> A <|eos|>`, a pair `<|bos|> A <|eos|> B <|eos|>` with segment 1 from B on,
    `lmforge.tokenizer.tok.bert_template`), not in its tokenizer.json, which has no post-processor,
    so `AutoTokenizer` / `SentenceTransformer` would feed the encoder bare text (vectors off by
    cosine ~0.99). This adds BERT's TemplateProcessing with our tokens. A tokenizer
    that already adds special tokens (an HF BERT's, e.g. all-MiniLM-L6-v2's) is left untouched.
    A model with one segment type (`type_vocab_size: 1`) keeps B in segment 0: it has no other.
    """
    import tokenizers
    from tokenizers import processors

    from lmforge.tokenizer import Tokenizer
    from lmforge.tokenizer.tok import bert_template

    backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    probe = tokenizers.Tokenizer.from_str(backend.to_str())  # without the file's padding/truncation
    probe.no_padding()
    probe.no_truncation()
    if probe.encode("a b", add_special_tokens=True).ids != probe.encode("a b", add_special_tokens=False).ids:
        return None
    tok = Tokenizer.load(tokenizer_file)
    try:
        cls_id, sep_id = tok.bos_id, tok.eos_id
    except UserError:  # no [CLS]/[SEP] to add (not an lmforge tokenizer); `lmforge embed` refuses it too
        return None
    cls, sep = tok.id_to_token(cls_id), tok.id_to_token(sep_id)
    template = bert_template(cls, cls_id, sep, sep_id, second_type=1 if type_vocab_size > 1 else 0)
    existing = backend.post_processor  # e.g. byte-level offset trimming: keep it, then wrap
    backend.post_processor = template if existing is None else processors.Sequence([existing, template])
    return backend.to_str(pretty=True)


def to_hf(ckpt: str | Path, out: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Convert an lmforge checkpoint (or a run dir's best one) into an HF directory; returns the summary.

    `out` must not overlap the checkpoint (or the run dir given); a non-empty `out` is replaced
    only with `overwrite` (see `check_output`).
    """
    from lmforge.compress.quantize import check_not_quantized
    from lmforge.train.checkpoint import read_model_config, read_weights, resolve_checkpoint

    t0 = time.perf_counter()
    given, out = Path(ckpt), Path(out)
    ckpt = resolve_checkpoint(given)
    check_not_quantized(ckpt, "convert to-hf")
    check_output(out, [("checkpoint", ckpt)] + ([("run dir", given)] if given.resolve() != ckpt.resolve() else []),
                 overwrite=overwrite)
    config = ModelConfig.from_dict(read_model_config(ckpt))
    config.check_unpruned("convert to-hf")
    if config.vocab_size is None:
        raise UserError(f"{ckpt / 'config.json'}: vocab_size is not set; the checkpoint is incomplete")
    arch = hf_layout_for(config)
    hf_state = state_to_hf(config, read_weights(ckpt), str(ckpt / "model.safetensors"))
    hf_config = {"architectures": [arch.class_for(config)], **arch.config_to_hf(config), "dtype": "float32"}
    tokenizer = ckpt / "tokenizer.json"
    with atomic_dir(out) as tmp:
        if tokenizer.is_file():
            tok_config, special_ids = _tokenizer_config(tokenizer, config.block_size, config.arch)
            hf_config.update(special_ids)
            bert_json = _bert_tokenizer_json(tokenizer, config.type_vocab_size) if config.arch == "bert" else None
            if bert_json is None:
                shutil.copyfile(tokenizer, tmp / "tokenizer.json")
            else:
                atomic_write_text(tmp / "tokenizer.json", bert_json)
            if config.arch != "bert":
                _add_chat_template(tok_config, ckpt)
            atomic_write_json(tmp / "tokenizer_config.json", tok_config)
            if config.arch != "bert":  # an encoder does not generate
                generation = {k: v for k, v in special_ids.items() if k != "pad_token_id"}
                if config.arch == "encdec" and config.decoder_start_token_id is not None:
                    generation["decoder_start_token_id"] = config.decoder_start_token_id
                atomic_write_json(tmp / "generation_config.json", generation)
        if config.arch == "bert":
            _write_sentence_transformers_files(tmp, ckpt, config)
        dtypes = {t.dtype for t in hf_state.values()}
        if len(dtypes) == 1:
            hf_config["dtype"] = str(dtypes.pop()).removeprefix("torch.")
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", hf_config)
        write_summary(tmp, "convert to-hf", config=config.to_dict(), inputs={"checkpoint": ckpt},
                      metrics={"model_type": arch.model_type, "hf_class": arch.class_for(config),
                               "tensors": len(hf_state), "tokenizer": tokenizer.is_file(),
                               "dropped": dropped_in_hf(config)},
                      wall_time_s=time.perf_counter() - t0)
    return json.loads((out / "summary.json").read_text())
