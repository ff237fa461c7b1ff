"""BERT: a bidirectional Transformer encoder with BERT's heads (Devlin et al. 2019).

    embeddings  token + learned position + segment (`token_type_ids`), then LayerNorm, dropout
    encoder     post-norm `TransformerBlock(causal=False)` x n_layer (the blocks GPT uses)
    MLM head    dense + activation + LayerNorm, then logits against the (tied) token embedding + bias
    pooler      tanh(dense(h[CLS])), feeding the NSP head (2 classes) and the classification head

The layout is Hugging Face's `BertForPreTraining` / `BertForSequenceClassification`, so HF
checkpoints convert tensor for tensor (`lmforge.export.hf`). The MLM head always exists: it is
what `forward` computes (the `mlm` objective). The pooler and the heads on it exist only when
the config asks for them (`nsp_head`, `num_labels`, `pooler`): a head no objective uses would
hold parameters that never get gradients, which DDP rejects.

`embed` is the sentence vector of sentence-transformers models such as all-MiniLM-L6-v2: the
last hidden states averaged over the non-padding tokens (not normalized; callers do that).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.models.blocks import (
    MLP,
    Dropout,
    RMSNorm,
    TransformerBlock,
    init_normal_,
    make_norm,
    sinusoidal_table,
)
from lmforge.models.config import ModelConfig


class BERT(nn.Module):
    """Encoder-only model. `forward(input_ids, labels)` -> (MLM logits, loss); see the module doc."""

    capabilities = frozenset({"embed"})  # reads text, never writes it (`lmforge.models.has_capability`)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.check_buildable()
        self.config = c = config
        if c.num_labels:
            self.capabilities = self.capabilities | {"classify"}
        if c.nsp_head:
            self.capabilities = self.capabilities | {"nsp"}
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.n_embd)
        self.pos_embeddings = nn.Embedding(c.block_size, c.n_embd)
        self.type_embeddings = nn.Embedding(c.type_vocab_size, c.n_embd)
        self.emb_norm = make_norm(c.norm, c.n_embd, c.norm_eps, c.bias)
        self.dropout = Dropout(c.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(c, causal=False) for _ in range(c.n_layer))
        # MLM head (HF `cls.predictions`): a transform, then the output projection with its own bias
        self.mlm_dense = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.mlm_act = MLP.ACTIVATIONS[c.mlp]
        self.mlm_norm = make_norm(c.norm, c.n_embd, c.norm_eps, c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=True)
        if c.tie_embeddings:  # BERT ties the MLM output matrix to the input embedding
            self.lm_head.weight = self.tok_embeddings.weight
        self.pooler = nn.Linear(c.n_embd, c.n_embd, bias=c.bias) if c.has_pooler else None
        self.nsp_head = nn.Linear(c.n_embd, 2, bias=c.bias) if c.nsp_head else None
        self.classifier = nn.Linear(c.n_embd, c.num_labels, bias=c.bias) if c.num_labels else None
        self.init_weights()

    def init_weights(self) -> None:
        """BERT's init (N(0, init_std) weights, zero biases, unit norms), except the positions.

        The learned position embeddings start as the sinusoidal table scaled to init_std, not
        as noise. A masked token's own input says nothing about it, so MLM learns only once
        attention can pick out neighbours by their relative position; sinusoids make relative
        offsets a linear function of the embeddings from the start (Vaswani et al. 2017, 3.5),
        while random positions must learn them for every absolute position. Measured on a
        task decided by the neighbours (3 seeds, bert-mini shape): the loss leaves the plateau
        after ~75-100 steps instead of ~175-200+. The table stays a learned parameter, so the
        model and its HF conversion are unchanged.
        """
        c = self.config
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.LayerNorm, RMSNorm)):
                    module.reset_parameters()
            self.apply(lambda m: init_normal_(m, c.init_std))  # also zeroes lm_head.bias
            table = sinusoidal_table(c.block_size, c.n_embd).to(self.pos_embeddings.weight.device)
            self.pos_embeddings.weight.copy_(table * c.init_std)

    # ---- the encoder ------------------------------------------------------------------------

    def encode(self, input_ids: Tensor, *, token_type_ids: Tensor | None = None,
               attention_mask: Tensor | None = None) -> Tensor:
        """Last hidden states (B, T, n_embd) (HF `last_hidden_state`).

        attention_mask (B, T): 1 = real token, 0 = padding; padded keys are masked out of every
        attention. token_type_ids default to 0 (segment A) everywhere. Raises ValueError
        (internal misuse) for a sequence longer than `block_size`.
        """
        B, T = input_ids.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the context "
                             f"block_size={self.config.block_size}")
        x = self.tok_embeddings(input_ids) + self.pos_embeddings.weight[:T]
        if token_type_ids is None:
            x = x + self.type_embeddings.weight[0]
        else:
            x = x + self.type_embeddings(token_type_ids)
        x = self.dropout(self.emb_norm(x))
        mask = None
        # An all-ones mask is no mask: without one, attention takes its fast unmasked paths.
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): which keys to attend to
        for block in self.blocks:
            x = block(x, attn_mask=mask)
        return x

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """MLM logits (B, T, vocab) from hidden states."""
        return self.lm_head(self.mlm_norm(self.mlm_act(self.mlm_dense(hidden))))

    def pool(self, hidden: Tensor) -> Tensor:
        """BERT's pooled output (B, n_embd): tanh(dense(hidden state of the first token, [CLS]))."""
        if self.pooler is None:
            raise ValueError("this model has no pooler (model.pooler, nsp_head and num_labels are off)")
        return torch.tanh(self.pooler(hidden[:, 0]))

    @staticmethod
    def mean_pool(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        """The mean of hidden (B, T, d) over the positions where attention_mask is 1."""
        if attention_mask is None:
            return hidden.mean(dim=1)
        weights = attention_mask.to(hidden.dtype)[:, :, None]
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    # ---- the tasks ----------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, *,
                token_type_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                next_sentence_label: Tensor | None = None,
                return_embeddings: bool = False) -> tuple[Tensor, Tensor | None]:
        """(MLM logits (B, T, vocab), loss) — or, with return_embeddings, (`embed` vectors, None).

        loss = MLM cross-entropy in fp32 over positions whose label is not -100, plus the NSP
        cross-entropy when next_sentence_label (B,) is given (0 = B follows A, 1 = B is random,
        as HF); None when neither is given. return_embeddings routes the contrastive objective
        through `forward`, where DDP/FSDP hooks run.
        """
        hidden = self.encode(input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
        if return_embeddings:
            return self.mean_pool(hidden, attention_mask), None
        logits = self.mlm_logits(hidden)
        loss = None
        if labels is not None:
            # fp32 upcast: a bf16 log-softmax over a large vocabulary loses the small
            # differences between logits that the gradient is made of.
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        if next_sentence_label is not None:
            if self.nsp_head is None:
                raise UserError("next-sentence prediction needs model.nsp_head=true")
            nsp_logits = self.nsp_head(self.pool(hidden))
            nsp_loss = F.cross_entropy(nsp_logits.float(), next_sentence_label.flatten())
            loss = nsp_loss if loss is None else loss + nsp_loss
        return logits, loss

    def nsp_logits(self, input_ids: Tensor, *, token_type_ids: Tensor | None = None,
                   attention_mask: Tensor | None = None) -> Tensor:
        """Next-sentence logits (B, 2) (HF `seq_relationship_logits`)."""
        if self.nsp_head is None:
            raise UserError("next-sentence prediction needs model.nsp_head=true")
        hidden = self.encode(input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
        return self.nsp_head(self.pool(hidden))

    def classify(self, input_ids: Tensor, labels: Tensor | None = None, *,
                 token_type_ids: Tensor | None = None,
                 attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(Classification logits (B, num_labels), loss) from the pooled output (HF
        `BertForSequenceClassification`): cross-entropy for num_labels > 1, mean squared error
        (regression) for num_labels == 1."""
        if self.classifier is None:
            raise UserError("sequence classification needs model.num_labels > 0")
        hidden = self.encode(input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
        logits = self.classifier(self.dropout(self.pool(hidden)))
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.float().squeeze(-1), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.flatten())
        return logits, loss

    def embed(self, input_ids: Tensor, attention_mask: Tensor | None = None,
              token_type_ids: Tensor | None = None) -> Tensor:
        """Sentence vectors (B, n_embd): last hidden states mean-pooled over non-padding tokens.

        Not normalized (sentence-transformers models like all-MiniLM-L6-v2 L2-normalize after).
        """
        hidden = self.encode(input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
        return self.mean_pool(hidden, attention_mask)

    # ---- sizing -------------------------------------------------------------------------------

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Exact parameter count; the tied MLM output matrix counts once.

        exclude_embeddings drops the lookup tables (token, position and segment embeddings; the
        tied output matrix is the token embedding).
        """
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(e.weight.numel() for e in (self.tok_embeddings, self.pos_embeddings, self.type_embeddings))
        return n

    def flops_per_token(self, seq_len: int | None = None, mlm_head: bool = True) -> float:
        """Training FLOPs per token (forward + backward), defined as `GPT.flops_per_token`.

        6 * N + 12 * n_layer * n_embd * seq_len, with N the parameters of the per-token matmuls:
        the encoder, the MLM transform and the MLM output projection (vocab * n_embd, counted
        even when tied, and computed at every position as `forward` does). The pooler and the
        heads on it run once per sequence, not per token, and are left out. mlm_head=False: the
        encoder alone (sentence vectors, `forward(..., return_embeddings=True)`).
        """
        c = self.config
        n = self.num_params(exclude_embeddings=True)
        if c.tie_embeddings:
            n += self.lm_head.weight.numel()
        if not mlm_head:
            n -= sum(p.numel() for m in (self.mlm_dense, self.mlm_norm, self.lm_head) for p in m.parameters())
        for head in (self.pooler, self.nsp_head, self.classifier):
            if head is not None:
                n -= sum(p.numel() for p in head.parameters())
        seq_len = c.block_size if seq_len is None else seq_len
        return 6.0 * n + 12.0 * c.n_layer * c.n_embd * seq_len
