"""PPO-RLHF (issue 12): the math against hand computations (plain Python loops over lists, no
tensors, written from the formulas of Schulman et al. 2016/2017 independently of the code),
and a tiny end-to-end run in which the policy learns what a hand-made reward model rewards
while its KL to the reference stays bounded."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.train.objectives.ppo import entropy, gae, kl_rewards, policy_loss, value_loss, whiten

# two rows of 6 positions: prompt (mask 0), reply tokens (mask 1), then padding (mask 0)
MASK = [[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]
VALUES = [[9.0, 9.0, 0.5, -0.2, 0.3, 9.0], [9.0, 0.1, 0.4, 0.0, -0.5, 0.2]]
REWARDS = [[0.0, 0.0, 0.1, -0.3, 1.2, 0.0], [0.0, -0.1, 0.0, 0.2, 0.0, -0.7]]


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def hand_gae(rewards, values, mask, gamma, lam):
    """Per row: the reply span [s, e]; A_t = sum_k (gamma lam)^k delta_{t+k}, delta_t = r_t +
    gamma V_{t+1} - V_t with V_{e+1} = 0; written as the explicit sum, not a recursion."""
    advantages, returns = [], []
    for r, v, m in zip(rewards, values, mask):
        span = [i for i, x in enumerate(m) if x]
        e = span[-1]
        delta = {i: r[i] + gamma * (v[i + 1] if i < e else 0.0) - v[i] for i in span}
        a_row = [0.0] * len(r)
        for i in span:
            a_row[i] = sum((gamma * lam) ** (k - i) * delta[k] for k in range(i, e + 1))
        advantages.append(a_row)
        returns.append([a_row[i] + v[i] if m[i] else 0.0 for i in range(len(r))])
    return advantages, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_equals_the_hand_computation(gamma, lam):
    advantages, returns = gae(t(REWARDS), t(VALUES), t(MASK), gamma, lam)
    want_a, want_r = hand_gae(REWARDS, VALUES, MASK, gamma, lam)
    for got, want in ((advantages, want_a), (returns, want_r)):
        for got_row, want_row in zip(got.tolist(), want):
            assert got_row == pytest.approx(want_row, abs=1e-6)


def test_gae_with_lambda_one_and_no_discount_is_reward_to_go_minus_value():
    """An invariant besides the hand sum: gamma = lam = 1 gives A_t = sum_{k>=t} r_k - V_t."""
    advantages, returns = gae(t(REWARDS), t(VALUES), t(MASK), 1.0, 1.0)
    for row in range(2):
        for i, m in enumerate(MASK[row]):
            togo = sum(REWARDS[row][k] for k in range(i, 6) if MASK[row][k])
            assert advantages[row, i].item() == pytest.approx((togo - VALUES[row][i]) if m else 0.0, abs=1e-6)
            assert returns[row, i].item() == pytest.approx(togo if m else 0.0, abs=1e-6)


def test_kl_rewards_penalize_each_token_and_add_the_score_at_the_last_reply_token():
    logp = [[-1.0, -2.0, -0.5, -1.5, -0.7, -3.0], [-0.2, -0.9, -1.1, -0.4, -2.2, -0.6]]
    ref = [[-1.5, -1.0, -0.9, -1.0, -0.7, -1.0], [-0.1, -1.3, -0.6, -0.4, -2.0, -0.9]]
    scores, beta = [0.8, -1.25], 0.1
    rewards, kl = kl_rewards(t(logp), t(ref), t(scores), t(MASK), beta)
    for b in range(2):
        last = max(i for i, m in enumerate(MASK[b]) if m)
        for i in range(6):
            k = (logp[b][i] - ref[b][i]) if MASK[b][i] else 0.0
            want = -beta * k + (scores[b] if i == last else 0.0)
            assert kl[b, i].item() == pytest.approx(k, abs=1e-9)
            assert rewards[b, i].item() == pytest.approx(want, abs=1e-9)


def test_clipped_policy_loss_and_clip_fraction_equal_the_hand_computation():
    logp = [[0.0, 0.0, -0.5, -1.0, -2.0, 0.0], [0.0, -0.3, -1.4, -0.2, -0.9, -1.0]]
    old = [[0.0, 0.0, -0.9, -0.95, -1.5, 0.0], [0.0, -0.3, -1.0, -0.6, -0.8, -1.3]]
    adv = [[0.0, 0.0, 1.0, -0.5, 2.0, 0.0], [0.0, -1.0, 0.7, 0.3, -0.2, 1.5]]
    eps = 0.2
    terms, clipped = [], []
    for b in range(2):
        for i in range(6):
            if not MASK[b][i]:
                continue
            ratio = math.exp(logp[b][i] - old[b][i])
            a = adv[b][i]
            plain, cut = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
            terms.append(max(plain, cut))
            clipped.append(1.0 if cut > plain else 0.0)
    loss, fraction = policy_loss(t(logp), t(old), t(adv), t(MASK), eps)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-9)
    assert fraction.item() == pytest.approx(sum(clipped) / len(clipped), abs=1e-9)
    assert 0 < fraction.item() < 1  # the example has clipped and unclipped tokens


def test_policy_loss_gradient_vanishes_on_clipped_tokens():
    """Only a ratio inside [1-eps, 1+eps] (or one clipped against the advantage's sign) moves the policy."""
    logp = torch.tensor([[0.5, 0.0, -0.5]], requires_grad=True)  # ratios e^0.5 (clipped, A>0), 1, e^-0.5 (A<0)
    old, adv, mask = torch.zeros(1, 3), torch.tensor([[1.0, 1.0, -1.0]]), torch.ones(1, 3)
    policy_loss(logp, old, adv, mask, 0.2)[0].backward()
    assert logp.grad[0, 0].item() == 0.0 and logp.grad[0, 2].item() == 0.0
    assert logp.grad[0, 1].item() == pytest.approx(-1.0 / 3)


def test_clipped_value_loss_equals_the_hand_computation():
    values = [[0.0, 0.0, 0.9, -0.2, 0.35, 0.0], [0.0, 0.5, 0.4, -0.1, -0.6, 0.25]]
    old = [[0.0, 0.0, 0.5, -0.2, 0.3, 0.0], [0.0, 0.1, 0.4, 0.0, -0.5, 0.2]]
    returns = [[0.0, 0.0, 1.0, 0.4, -0.3, 0.0], [0.0, 0.2, 0.9, -0.4, -0.5, 1.0]]
    c = 0.2
    terms, clipped, plain_terms = [], [], []
    for b in range(2):
        for i in range(6):
            if not MASK[b][i]:
                continue
            v, o, r = values[b][i], old[b][i], returns[b][i]
            vc = o + min(max(v - o, -c), c)
            terms.append(max((v - r) ** 2, (vc - r) ** 2))
            clipped.append(1.0 if (vc - r) ** 2 > (v - r) ** 2 else 0.0)
            plain_terms.append((v - r) ** 2)
    loss, fraction = value_loss(t(values), t(old), t(returns), t(MASK), c)
    assert loss.item() == pytest.approx(0.5 * sum(terms) / len(terms), abs=1e-9)
    assert fraction.item() == pytest.approx(sum(clipped) / len(clipped), abs=1e-9)
    assert 0 < fraction.item() < 1
    unclipped, _ = value_loss(t(values), t(old), t(returns), t(MASK), 0.0)
    assert unclipped.item() == pytest.approx(0.5 * sum(plain_terms) / len(plain_terms), abs=1e-9)


def test_entropy_and_whitening_equal_the_hand_computation():
    logits = torch.tensor([[[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]], [[3.0, -1.0, 0.2], [0.1, 0.2, 0.3]]],
                          dtype=torch.float64)
    mask = [[1, 0], [1, 1]]
    per_token = []
    for b in range(2):
        for i in range(2):
            if mask[b][i]:
                z = [math.exp(x) for x in logits[b, i].tolist()]
                p = [x / sum(z) for x in z]
                per_token.append(-sum(q * math.log(q) for q in p))
    assert entropy(logits, t(mask)).item() == pytest.approx(sum(per_token) / len(per_token), abs=1e-6)  # fp32

    x = [[3.0, 1.0, 9.0], [2.0, 6.0, -1.0]]
    m = [[1, 1, 0], [1, 1, 1]]
    kept = [x[b][i] for b in range(2) for i in range(3) if m[b][i]]
    mean = sum(kept) / len(kept)
    std = math.sqrt(sum((v - mean) ** 2 for v in kept) / (len(kept) - 1))
    got = whiten(t(x), t(m))
    for b in range(2):
        for i in range(3):
            assert got[b, i].item() == pytest.approx((x[b][i] - mean) / std if m[b][i] else 0.0, abs=1e-6)
