"""Best-fit packing: an example's logits are the same packed or alone, prompt tokens contribute
exactly zero loss, best-fit beats first-fit in input order, truncation is counted."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.models import build_model
from lmforge.posttrain.packing import IGNORE, best_fit, pack


def _examples(seed=0, lengths=(9, 5, 14, 3, 7, 11, 4), vocab=50):
    """(ids, labels) with a prompt of ~half the tokens masked, like encode_example's output."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(0, vocab, n).tolist()
        cut = n // 2
        out.append((ids, [IGNORE] * cut + ids[cut:]))
    return out


@pytest.fixture(scope="module", params=["learned", "rope"])
def model(request):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=16, pos_encoding=request.param)
    return build_model(cfg).eval()


def test_first_fit_in_order_needs_more_rows_than_best_fit_decreasing():
    lengths = [3, 3, 7, 7]  # first-fit in this order: [3, 3], [7], [7]; best-fit decreasing: [7, 3], [7, 3]
    first_fit: list[int] = []
    for n in lengths:
        k = next((i for i, used in enumerate(first_fit) if used + n <= 10), None)
        if k is None:
            first_fit.append(n)
        else:
            first_fit[k] += n
    bins = best_fit(lengths, 10)
    assert len(first_fit) == 3 and len(bins) == 2
    assert sorted(sorted(lengths[i] for i in b) for b in bins) == [[3, 7], [3, 7]]
    assert best_fit([2, 6, 5, 4, 3], 10) == [[1, 3], [2, 4, 0]]  # longest first: 6+4, then 5+3+2
    with pytest.raises(ValueError):
        best_fit([11], 10)


def test_rows_positions_doc_ids_and_counts():
    enc = _examples()
    packed = pack(enc, block_size=16)
    assert packed.examples == len(enc) and packed.truncated == 0 and packed.dropped == 0
    assert packed.input_ids.shape == packed.targets.shape == packed.doc_ids.shape == (packed.rows, 16)
    assert packed.rows == -(-sum(n - 1 for n in (9, 5, 14, 3, 7, 11, 4)) // 16)  # 46 positions: 3 rows, optimal
    seen = []
    for r in range(packed.rows):
        for d in range(packed.doc_ids[r].max() + 1):
            at = np.flatnonzero(packed.doc_ids[r] == d)
            assert (np.diff(at) == 1).all() and (packed.position_ids[r, at] == np.arange(len(at))).all()
            seen.append((packed.input_ids[r, at].tolist(), packed.targets[r, at].tolist()))
    expected = sorted((ids[:-1], labels[1:]) for ids, labels in enc)
    assert sorted(seen) == expected  # every example once, inputs ids[:-1], targets labels[1:]
    assert (packed.targets[packed.doc_ids < 0] == IGNORE).all()


def test_truncation_is_counted_and_examples_without_targets_are_dropped():
    long = list(range(1, 31))
    enc = [(long, long), ([1, 2, 3], [IGNORE, IGNORE, IGNORE]), ([5], [5]), ([1, 2, 3, 4], [1, 2, 3, 4])]
    packed = pack(enc, block_size=8)
    assert packed.truncated == 1 and packed.dropped == 2 and packed.examples == 2
    assert packed.input_ids[0].tolist() == long[:8] and packed.targets[0].tolist() == long[1:9]
    # a prompt longer than the block: its reply is cut off, nothing left to train -> dropped, and counted cut
    cut = pack([([1] * 20 + [2, 3], [IGNORE] * 20 + [2, 3])], block_size=8)
    assert (cut.truncated, cut.dropped, cut.examples, cut.rows) == (1, 1, 0, 0)
    assert pack([(long[:9], long[:9])], block_size=8).truncated == 0  # 9 tokens = 8 positions: fits


def test_logits_same_packed_or_alone(model):
    enc = _examples(lengths=(9, 5, 6, 3, 12))
    packed = pack(enc, block_size=16)
    assert packed.doc_ids.max() >= 1  # some row holds several examples
    t = {k: torch.from_numpy(getattr(packed, k)) for k in ("input_ids", "position_ids", "doc_ids")}
    with torch.no_grad():
        logits, _ = model(t["input_ids"], position_ids=t["position_ids"], doc_ids=t["doc_ids"])
        for r in range(packed.rows):
            for d in range(packed.doc_ids[r].max() + 1):
                at = np.flatnonzero(packed.doc_ids[r] == d)
                alone, _ = model(t["input_ids"][r:r + 1, at])
                torch.testing.assert_close(logits[r, at], alone[0], rtol=1e-5, atol=1e-5)


def test_prompt_tokens_contribute_exactly_zero_loss(model):
    enc = _examples(lengths=(9, 5, 6, 3, 12))
    packed = pack(enc, block_size=16)
    x, y = torch.from_numpy(packed.input_ids), torch.from_numpy(packed.targets)
    pos, doc = torch.from_numpy(packed.position_ids), torch.from_numpy(packed.doc_ids)
    with torch.no_grad():
        _, loss = model(x, y, position_ids=pos, doc_ids=doc)
        # hand computation: mean CE over assistant (trained) positions only, each example alone
        total, count = 0.0, 0
        for ids, labels in enc:
            alone, _ = model(torch.tensor([ids[:-1]]))
            logp = F.log_softmax(alone[0].double(), -1)
            for p, target in enumerate(labels[1:]):
                if target != IGNORE:
                    total, count = total - logp[p, target].item(), count + 1
        assert count == int((y != IGNORE).sum())
        assert loss.item() == pytest.approx(total / count, rel=1e-5)
        # padding inputs are never read either
        assert (y == IGNORE).any()
        _, again = model(x.masked_fill(doc < 0, 7), y, position_ids=pos, doc_ids=doc)
        assert again.item() == loss.item()
    with torch.enable_grad():
        # exactly zero gradient through every position without a target
        logits, loss = model(x, y, position_ids=pos, doc_ids=doc)
        logits.retain_grad()
        loss.backward()
        assert (logits.grad[y == IGNORE] == 0).all() and (logits.grad[y != IGNORE] != 0).any(-1).all()
        y_unmasked = torch.where(y == IGNORE, torch.randint_like(y, 0, 50), y)
        _, unmasked = model(x, y_unmasked, position_ids=pos, doc_ids=doc)
        assert unmasked.item() != pytest.approx(loss.item(), rel=1e-6)  # the masking is what keeps them out
