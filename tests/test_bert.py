"""Tests for the BERT model and its Hugging Face conversion.

The independent reference is `transformers`: random-weight BERT models built from `BertConfig`
(no download) in every head layout (BertModel, BertForMaskedLM, BertForPreTraining,
BertForNextSentencePrediction, BertForSequenceClassification). After `from_hf` our outputs
(hidden states, pooled output, MLM/NSP/classification logits and losses) must match theirs
within 1e-4 in fp32, with padding and segment ids in play; HF -> lmforge -> HF must give back
every tensor exactly; and HF must load what `to_hf` writes with the same logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.export.hf import from_hf, to_hf
from lmforge.models import BERT, ModelConfig, build_model
from lmforge.train.checkpoint import load_pretrained, save_checkpoint, tied_aliases

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
VOCAB, T = 320, 24  # VOCAB >= the test tokenizer (byte-level char: 276 tokens)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def hf_bert(cls: str = "BertForPreTraining", **kw):
    cfg = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
               max_position_embeddings=32, type_vocab_size=2, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)
    cfg.update(kw)
    model = getattr(transformers, cls)(transformers.BertConfig(**cfg)).eval()
    with torch.no_grad():  # move every parameter off its init (ones, zeros) so a mis-mapped norm or bias shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


MODELS = {
    "pretraining": lambda: hf_bert(),
    "masked-lm": lambda: hf_bert("BertForMaskedLM"),
    "masked-lm-untied-gelu-new": lambda: hf_bert("BertForMaskedLM", tie_word_embeddings=False, hidden_act="gelu_new",
                                                 type_vocab_size=3),
    "nsp": lambda: hf_bert("BertForNextSentencePrediction"),
    "classification": lambda: hf_bert("BertForSequenceClassification", num_labels=3),
    "regression": lambda: hf_bert("BertForSequenceClassification", num_labels=1),
    "base": lambda: hf_bert("BertModel"),
    "base-no-pooler": lambda: transformers.BertModel(hf_bert("BertModel").config, add_pooling_layer=False).eval(),
}


def inputs(batch: int = 3) -> dict[str, torch.Tensor]:
    """Ids, segment ids ([CLS] A [SEP] B [SEP]-like) and a padding mask with ragged rows."""
    ids = torch.randint(0, VOCAB, (batch, T))
    types = (torch.arange(T) >= T // 2).long().expand(batch, T).clone()
    mask = torch.ones(batch, T, dtype=torch.long)
    for row in range(1, batch):
        mask[row, T - 5 * row:] = 0
    types[mask == 0] = 0
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


def convert(hf, tmp_path: Path, tokenizer_file: Path | None = None) -> tuple[Path, dict]:
    hf.save_pretrained(tmp_path / "hf")
    if tokenizer_file is not None:
        (tmp_path / "hf" / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    summary = from_hf(tmp_path / "hf", tmp_path / "ckpt")
    return tmp_path / "hf", summary


def close(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Max abs diff <= 1e-4 (at real tokens only when a padding mask is given: HF and we both
    compute padded positions, but their values are meaningless)."""
    if mask is not None:
        ours, theirs = ours[mask.bool()], theirs[mask.bool()]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------
# from-hf: outputs match transformers, and the round trip is exact


@pytest.mark.parametrize("name", list(MODELS))
def test_from_hf_outputs_match_transformers(name, tmp_path, tokenizer_file):
    hf = MODELS[name]()
    _, summary = convert(hf, tmp_path, tokenizer_file)
    ours, _ = load_pretrained(tmp_path / "ckpt")
    assert isinstance(ours, BERT)
    x = inputs()
    with torch.no_grad():
        out = hf(**x)
        hidden = ours.encode(x["input_ids"], token_type_ids=x["token_type_ids"], attention_mask=x["attention_mask"])
        base = hf if isinstance(hf, transformers.BertModel) else hf.bert
        reference = base(**x)
        close(hidden, reference.last_hidden_state, x["attention_mask"])
        if reference.pooler_output is not None:
            close(ours.pool(hidden), reference.pooler_output)
        if hasattr(out, "prediction_logits"):  # BertForPreTraining
            close(ours.mlm_logits(hidden), out.prediction_logits, x["attention_mask"])
            close(ours.nsp_logits(**x), out.seq_relationship_logits)
        elif isinstance(hf, transformers.BertForMaskedLM):
            close(ours(**x)[0], out.logits, x["attention_mask"])
        elif isinstance(hf, transformers.BertForNextSentencePrediction):
            close(ours.nsp_logits(**x), out.logits)
        elif isinstance(hf, transformers.BertForSequenceClassification):
            close(ours.classify(**x)[0], out.logits)
    # what the file had no tensors for is initialized and reported: exactly BERT's MLM head
    has_mlm_head = isinstance(hf, (transformers.BertForPreTraining, transformers.BertForMaskedLM))
    untied = not hf.config.tie_word_embeddings
    assert summary["metrics"]["initialized"] == ([] if has_mlm_head else
                                                 ["lm_head.bias", "mlm_dense.bias", "mlm_dense.weight",
                                                  "mlm_norm.bias", "mlm_norm.weight"])
    assert ours.config.tie_embeddings is not untied
    assert (ours.lm_head.weight is ours.tok_embeddings.weight) is not untied


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_round_trip_reproduces_every_tensor_exactly(name, tmp_path, tokenizer_file):
    hf = MODELS[name]()
    hf_dir, _ = convert(hf, tmp_path, tokenizer_file)
    summary = to_hf(tmp_path / "ckpt", tmp_path / "back")
    original = load_file(str(hf_dir / "model.safetensors"))
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    if isinstance(hf, transformers.BertModel):  # written from the base class: no "bert." prefix
        original = {f"bert.{k}": v for k, v in original.items()}
    if not hf.config.tie_word_embeddings:
        # transformers 5 unties the decoder bias with the weights and never uses
        # cls.predictions.bias then; the one bias lmforge keeps is the used one, written to both
        assert torch.equal(back["cls.predictions.bias"], original.pop("cls.predictions.decoder.bias"))
        assert torch.equal(back["cls.predictions.decoder.bias"], back.pop("cls.predictions.bias"))
        original.pop("cls.predictions.bias")
        original["cls.predictions.decoder.bias"] = back["cls.predictions.decoder.bias"]
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    extra = sorted(set(back) - set(original))
    if isinstance(hf, transformers.BertModel):
        # a BertModel gains the MLM head from-hf initialized: to-hf writes a BertForMaskedLM
        assert extra == ["cls.predictions.bias", "cls.predictions.transform.LayerNorm.bias",
                         "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.dense.bias",
                         "cls.predictions.transform.dense.weight"]
        assert summary["metrics"]["hf_class"] == "BertForMaskedLM"
    elif isinstance(hf, transformers.BertForNextSentencePrediction):
        assert extra and all(k.startswith("cls.predictions.") for k in extra)
        assert summary["metrics"]["hf_class"] == "BertForPreTraining"
    else:
        assert extra == [] and summary["metrics"]["hf_class"] == type(hf).__name__
    # the classification class has no MLM head: ours is left out, and said so
    dropped = summary["metrics"]["dropped"]
    assert dropped == (["lm_head.bias", "mlm_dense.bias", "mlm_dense.weight", "mlm_norm.bias", "mlm_norm.weight"]
                       if isinstance(hf, transformers.BertForSequenceClassification) else [])
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["architectures"] == [summary["metrics"]["hf_class"]]


def test_from_hf_reads_pytorch_bin_with_legacy_buffers_and_tied_decoder(tmp_path):
    """Files from older transformers hold the position-id buffer and the tied decoder weight and
    bias a second time; they convert to the same checkpoint as the modern file."""
    hf = MODELS["pretraining"]()
    hf_dir, _ = convert(hf, tmp_path)
    state = load_file(str(hf_dir / "model.safetensors"))
    (hf_dir / "model.safetensors").unlink()
    state["bert.embeddings.position_ids"] = torch.arange(32)[None]
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
    state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
    torch.save(state, hf_dir / "pytorch_model.bin")
    from_hf(hf_dir, tmp_path / "legacy")
    a, b = (load_file(str(tmp_path / "ckpt" / "model.safetensors")),
            load_file(str(tmp_path / "legacy" / "model.safetensors")))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------
# Losses: the same as HF's for the same labels


def test_pretraining_loss_matches_transformers(tmp_path, tokenizer_file):
    hf = MODELS["pretraining"]()
    convert(hf, tmp_path, tokenizer_file)
    ours, _ = load_pretrained(tmp_path / "ckpt")
    x = inputs()
    labels = torch.full((3, T), -100)
    chosen = torch.rand(3, T) < 0.3
    labels[chosen] = x["input_ids"][chosen]
    nsp = torch.tensor([0, 1, 1])
    with torch.no_grad():
        theirs = hf(**x, labels=labels, next_sentence_label=nsp).loss
        mlm_only = ours(x["input_ids"], labels, token_type_ids=x["token_type_ids"],
                        attention_mask=x["attention_mask"])[1]
        both = ours(x["input_ids"], labels, token_type_ids=x["token_type_ids"], attention_mask=x["attention_mask"],
                    next_sentence_label=nsp)[1]
        mlm_logits, _ = ours(**x)
    close(both, theirs)
    expected_mlm = torch.nn.functional.cross_entropy(mlm_logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    close(mlm_only, expected_mlm)
    assert both > mlm_only  # the NSP term is added


@pytest.mark.parametrize("name", ["classification", "regression"])
def test_classification_loss_matches_transformers(name, tmp_path, tokenizer_file):
    hf = MODELS[name]()
    convert(hf, tmp_path, tokenizer_file)
    ours, _ = load_pretrained(tmp_path / "ckpt")
    x = inputs()
    labels = torch.tensor([0, 2, 1]) if name == "classification" else torch.tensor([0.5, -1.0, 2.0])
    with torch.no_grad():
        close(ours.classify(**x, labels=labels)[1], hf(**x, labels=labels).loss)


# --------------------------------------------------------------------------------------------
# to-hf: transformers loads what lmforge writes


def tiny(**kw) -> ModelConfig:
    base = dict(arch="bert", vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=64, block_size=32, mlp_hidden=96,
                norm_position="post", norm_eps=1e-12)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("kw,cls", [
    (dict(), "BertForMaskedLM"),
    (dict(tie_embeddings=False, type_vocab_size=3), "BertForMaskedLM"),
    (dict(nsp_head=True, mlp="gelu_tanh"), "BertForPreTraining"),
    (dict(num_labels=4, tie_embeddings=False), "BertForSequenceClassification"),
], ids=["mlm", "mlm-untied", "pretraining", "classification"])
def test_to_hf_loads_in_transformers_with_the_same_outputs(kw, cls, tmp_path, tokenizer_file):
    model = BERT(tiny(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_checkpoint(tmp_path / "ckpt", model.state_dict(), model.config.to_dict(), tokenizer_file, None,
                    drop=tied_aliases(model))
    summary = to_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert summary["metrics"]["hf_class"] == cls
    hf = getattr(transformers, cls).from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    x = inputs()
    with torch.no_grad():
        out = hf(**x)
        if cls == "BertForSequenceClassification":
            close(model.classify(**x)[0], out.logits)
        else:
            logits = out.logits if cls == "BertForMaskedLM" else out.prediction_logits
            close(model(**x)[0], logits, x["attention_mask"])
        if cls == "BertForPreTraining":
            close(model.nsp_logits(**x), out.seq_relationship_logits)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert tok.cls_token == "<|bos|>" and tok.sep_token == "<|eos|>" and tok.pad_token == "<|pad|>"


# --------------------------------------------------------------------------------------------
# The model itself


def test_padding_does_not_change_real_tokens_and_segments_matter():
    model = BERT(tiny(dropout=0.1)).eval()
    ids = torch.randint(0, VOCAB, (1, 10))
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 6)], dim=1).long()
    with torch.no_grad():
        alone = model.encode(ids)
        with_pad = model.encode(padded, attention_mask=mask)
        unmasked = model.encode(padded)
        other_segment = model.encode(ids, token_type_ids=torch.ones_like(ids))
        close(with_pad[:, :10], alone)
        close(model.embed(padded, attention_mask=mask), alone.mean(dim=1))
        close(model(padded, return_embeddings=True, attention_mask=mask)[0], alone.mean(dim=1))
    assert (unmasked[:, :10] - alone).abs().max() > 1e-3  # the mask is what keeps padding out
    assert (other_segment - alone).abs().max() > 1e-3


def test_sizes_and_flops():
    model = BERT(tiny(nsp_head=True))
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.lm_head.weight is model.tok_embeddings.weight
    embeddings = (VOCAB + 32 + 2) * 64
    assert model.num_params(exclude_embeddings=True) == model.num_params() - embeddings
    per_sequence = 64 * 64 + 64 + 2 * 64 + 2  # pooler and NSP head run once per sequence
    n = model.num_params(exclude_embeddings=True) + VOCAB * 64 - per_sequence
    assert model.flops_per_token(16) == 6 * n + 12 * 2 * 64 * 16
    # the pooler exists only where something uses it (or `pooler` keeps it)
    assert BERT(tiny()).pooler is None and BERT(tiny(pooler=True)).pooler is not None
    assert BERT(tiny(num_labels=2)).pooler is not None


def test_training_step_reduces_mlm_loss():
    model = BERT(tiny(dropout=0.1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(5, VOCAB, (8, 16))
    labels = torch.where(torch.rand(8, 16) < 0.3, ids, torch.full_like(ids, -100))
    corrupted = torch.where(labels != -100, torch.full_like(ids, 4), ids)
    losses = []
    for _ in range(30):
        loss = model(corrupted, labels)[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5


def test_build_model_dispatches_and_config_round_trips():
    config = tiny(num_labels=3, type_vocab_size=4)
    model = build_model(ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))))
    assert isinstance(model, BERT) and model.type_embeddings.num_embeddings == 4
    assert model.classifier.out_features == 3


@pytest.mark.parametrize("kw,match", [
    (dict(norm_position="pre"), r"model\.norm_position: 'pre': arch bert is post-norm; set post"),
    (dict(pos_encoding="rope"), r"model\.pos_encoding: 'rope': arch bert uses learned positions"),
    (dict(mlp="swiglu"), r"model\.mlp: .swiglu.: arch bert"),
    (dict(num_labels=-1), r"model\.num_labels: must be a non-negative integer, got -1"),
    (dict(type_vocab_size=0), r"model\.type_vocab_size: must be at least 1"),
    (dict(arch="roberta"), r"model\.arch: 'roberta' is not one of gpt, bert"),
])
def test_bad_config_is_one_line_user_error(kw, match):
    with pytest.raises(UserError, match=match) as err:
        tiny(**kw)
    assert "\n" not in str(err.value)


def test_heads_that_are_not_there_are_user_errors():
    model = BERT(tiny())
    ids = torch.randint(0, VOCAB, (2, 8))
    with pytest.raises(UserError, match=r"needs model\.nsp_head=true"):
        model(ids, None, next_sentence_label=torch.tensor([0, 1]))
    with pytest.raises(UserError, match=r"needs model\.num_labels > 0"):
        model.classify(ids)
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 33, dtype=torch.long))


# --------------------------------------------------------------------------------------------
# Bad input: one-line errors naming the field or tensor


def _edit_config(hf_dir: Path, **changes) -> None:
    file = hf_dir / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


@pytest.mark.parametrize("changes,match", [
    (dict(position_embedding_type="relative_key"),
     r"position_embedding_type='relative_key' is not supported; allowed: 'absolute'"),
    (dict(is_decoder=True), r"is_decoder=True is not supported"),
    (dict(hidden_act="silu"), r"hidden_act='silu' is not supported; allowed: 'gelu'"),
    (dict(num_attention_heads=5), r"config\.json: model\.n_head: n_embd=64 is not divisible by n_head=5"),
    (dict(intermediate_size=128),
     r"tensor 'bert\.encoder\.layer\.0\.intermediate\.dense\.weight' has shape \(96, 64\) "
     r"but config\.json implies \(128, 64\)"),
    (dict(num_hidden_layers=3), r"missing tensor 'bert\.encoder\.layer\.2\.attention\.self\.query\.weight'"),
    (dict(num_hidden_layers=1), r"unexpected tensor 'bert\.encoder\.layer\.1\."),
], ids=["relative-positions", "decoder", "act", "heads-divide-width", "shape", "missing", "extra"])
def test_from_hf_rejects_bad_bert_input_in_one_line(changes, match, tmp_path):
    hf = MODELS["pretraining"]()
    hf.save_pretrained(tmp_path / "hf")
    _edit_config(tmp_path / "hf", **changes)
    with pytest.raises(UserError, match=match) as err:
        from_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "ckpt").exists()


def test_a_partial_mlm_head_is_an_error_not_a_silent_init(tmp_path):
    hf = MODELS["pretraining"]()
    hf.save_pretrained(tmp_path / "hf")
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    del state["cls.predictions.transform.dense.weight"]
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 2
    with pytest.raises(UserError, match=r"missing tensor 'cls\.predictions\.transform\.dense\.weight'"):
        from_hf(tmp_path / "hf", tmp_path / "ckpt")


@pytest.mark.parametrize("kw,match", [
    (dict(norm="rmsnorm"), r"model\.norm='rmsnorm'.*the BERT layout needs norm=layernorm"),
    (dict(bias=False), r"model\.bias=False.*needs bias=true"),
    (dict(n_kv_head=2), r"model\.n_kv_head=2.*needs n_kv_head=n_head"),
])
def test_to_hf_rejects_unrepresentable_bert_configs(kw, match, tmp_path):
    model = BERT(tiny(**kw))
    save_checkpoint(tmp_path / "ckpt", model.state_dict(), model.config.to_dict(), None, None, drop=tied_aliases(model))
    with pytest.raises(UserError, match=match):
        to_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# --------------------------------------------------------------------------------------------
# Training through `lmforge pretrain` (objective mlm, the lead's objectives module)


def test_pretrain_mlm_with_nsp_then_to_hf_and_embed(tmp_path, capsys):
    """A tiny BERT trains with mlm + nsp; its checkpoint converts to a BertForPreTraining that
    transformers loads with the same logits, and embeds."""
    from train_helpers import make_token_dir, tiny_config

    from lmforge.train.loop import pretrain

    tokens = make_token_dir(tmp_path)
    cfg = tiny_config(tokens, "model.arch=bert", "model.norm_position=post", "model.nsp_head=true",
                      "objective=mlm", "mlm.nsp=true", "model.dropout=0.1", "train.max_steps=30")
    summary = pretrain(cfg, tmp_path / "run")
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["val_loss"] for r in evals if "val_loss" in r]
    assert len(evals) == 3 and evals[0] > evals[1] > evals[2]
    assert summary["metrics"]["final_val_loss"] == pytest.approx(evals[-1])
    assert "## Sample" not in (tmp_path / "run" / "report.md").read_text()  # an encoder does not generate

    ours, tokenizer = load_pretrained(tmp_path / "run")
    assert isinstance(ours, BERT) and tokenizer.token_to_id("<|mask|>") is not None
    to_hf(tmp_path / "run", tmp_path / "hf")
    hf = transformers.BertForPreTraining.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert hf_tok.mask_token == "<|mask|>" and hf_tok.cls_token == "<|bos|>" and hf_tok.sep_token == "<|eos|>"
    ids = torch.tensor([[tokenizer.bos_id, *tokenizer.encode("the king shall")[:10], tokenizer.eos_id]])
    with torch.no_grad():
        close(ours(ids)[0], hf(ids).prediction_logits)
    capsys.readouterr()
    assert main(["embed", "--ckpt", str(tmp_path / "run"), "--text", "the king"]) == 0
    vector = json.loads(capsys.readouterr().out)["embedding"]
    assert len(vector) == 32 and abs(sum(v * v for v in vector) - 1) < 1e-5


@pytest.mark.slow
def test_bert_mini_preset_learns_shakespeare(shakespeare_dir, tmp_path):
    """configs/bert-mini.yaml (mlm + nsp) on Shakespeare with the demo's tokenizer (byte-level
    BPE, 4096), on CPU: the val loss falls at every eval and ends below what knowing only the
    token frequencies gives (the unigram cross-entropy of val tokens + ln 2 for a coin-flip NSP)."""
    import math

    import numpy as np

    from lmforge.config import load_config
    from lmforge.tokenizer.shards import tokenize_corpus
    from lmforge.tokenizer.train import train_tokenizer
    from lmforge.train.loop import pretrain

    train_tokenizer(shakespeare_dir, tmp_path / "tok", kind="bpe", vocab_size=4096)
    tokenize_corpus(tmp_path / "tok", shakespeare_dir, tmp_path / "tokens", val_fraction=0.05)
    cfg = load_config(ROOT / "configs" / "bert-mini.yaml",
                      [f"data.tokens={tmp_path / 'tokens'}", "train.max_steps=300", "train.eval_every=100",
                       "train.eval_steps=4"])
    summary = pretrain(cfg, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [100, 200, 300]
    assert evals[0]["val_loss"] > evals[1]["val_loss"] > evals[2]["val_loss"]
    assert summary["metrics"]["final_val_loss"] == evals[-1]["val_loss"]

    meta = json.loads((tmp_path / "tokens" / "meta.json").read_text())

    def ordinary(split: str) -> np.ndarray:  # ids 0..6 are the special tokens of every lmforge tokenizer
        ids = np.concatenate([np.fromfile(tmp_path / "tokens" / shard, dtype=meta["dtype"])
                              for shard in meta["splits"][split]["shards"]]).astype(np.int64)
        return ids[ids > 6]

    counts = np.bincount(ordinary("train"), minlength=4096) + 1.0
    unigram = -np.log(counts / counts.sum())[ordinary("val")].mean()
    assert evals[-1]["val_loss"] < unigram + math.log(2) - 0.1, (evals, unigram)
