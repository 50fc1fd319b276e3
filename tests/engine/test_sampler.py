"""Sampler: counter-based Gumbel noise, batch invariance, replay, masking, recorded logprobs."""

from __future__ import annotations

import math

import miles_kernels as mk
import pytest
import torch

from miles_fsdp.engine.sampler import RowParams, gumbel_noise, sample


def rows(n, temperature=1.0, top_k=0, top_p=1.0, seed=7):
    return [RowParams(temperature, top_k, top_p, seed, stream=i % 3, position=10 + i) for i in range(n)]


def test_noise_is_a_pure_function_of_its_keys():
    seed, stream, pos = torch.tensor([0, 2**32 - 1, 5]), torch.tensor([0, 3, 1]), torch.tensor([0, 9, 100000])
    g = gumbel_noise(seed, stream, pos, 50)
    assert torch.isfinite(g).all()
    for i in range(3):  # row alone == row in batch
        assert torch.equal(gumbel_noise(seed[i : i + 1], stream[i : i + 1], pos[i : i + 1], 50)[0], g[i])
    other = gumbel_noise(seed, stream, pos + 1, 50)
    assert not torch.equal(g, other), "the position must change the noise"


def test_samples_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(9, 40)
    mixed = [RowParams(t, k, p, 3, i, 5 + i) for i, (t, k, p) in
             enumerate([(1.0, 0, 1.0), (0.5, 5, 1.0), (0.0, 0, 1.0)] * 3)]
    ids, lps = sample(logits, mixed)
    for i in range(9):
        a, b = sample(logits[i : i + 1], [mixed[i]])
        assert (a[0], b[0]) == (ids[i], lps[i])
    rev_ids, rev_lps = sample(logits.flip(0), mixed[::-1])
    assert rev_ids[::-1] == ids and rev_lps[::-1] == lps


def test_frequencies_match_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    ids, _ = sample(logits, rows(4000))
    freq = torch.bincount(torch.tensor(ids), minlength=4).float() / 4000
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.03)
    hot, _ = sample(logits, rows(4000, temperature=0.25))
    assert sum(i == 0 for i in hot) / 4000 > 0.95, "low temperature concentrates on the mode"


def test_greedy_topk_topp_and_recorded_logprobs():
    torch.manual_seed(1)
    logits = torch.randn(64, 30)
    ids, lps = sample(logits, rows(64, temperature=0.0))
    assert ids == logits.argmax(-1).tolist()
    want, _ = mk.logprobs(logits, torch.tensor(ids), 1.0)
    assert lps == want.tolist()
    ids, lps = sample(logits, rows(64, temperature=1.0, top_k=3))
    top3 = logits.topk(3, -1).indices
    assert all(i in top3[r].tolist() for r, i in enumerate(ids))
    want, _ = mk.logprobs(logits, torch.tensor(ids), 1.0, top_k=3)
    assert lps == want.tolist()
    ids, lps = sample(logits, rows(64, temperature=0.7, top_p=0.5))
    want, _ = mk.logprobs(logits, torch.tensor(ids), 0.7, top_p=0.5)
    assert lps == want.tolist() and all(torch.isfinite(torch.tensor(lps)))


def test_seed_reproduces_and_seeds_differ():
    logits = torch.zeros(32, 100)
    a, _ = sample(logits, rows(32, seed=1))
    b, _ = sample(logits, rows(32, seed=1))
    c, _ = sample(logits, rows(32, seed=2))
    assert a == b and a != c


def _reference(logits_V: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """float64 probabilities of softmax(filter(logits / T)): the distribution the sampler promises."""
    z = logits_V.double() / temperature
    if top_k:
        z = z.masked_fill(z < z.topk(top_k).values[-1], float("-inf"))
    if top_p < 1.0:
        zs = z.sort(descending=True).values
        p = torch.softmax(zs, -1)
        before = torch.cumsum(p, -1) - p
        assert (before - top_p).abs().min() > 1e-4, "premise: no token sits on the top-p cut"
        z = z.masked_fill(z < zs[before < top_p].min(), float("-inf"))
    return torch.softmax(z, -1)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
@pytest.mark.parametrize("top_k", [0, 1, 20])
@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.3])
def test_samples_and_logprobs_follow_the_filtered_distribution(temperature, top_k, top_p):
    """Each recorded logprob is log p(token) under softmax(filter(logits / T)) (float64
    reference), every token lies in that distribution's support, and the frequencies over
    N independent streams match it."""
    g = torch.Generator().manual_seed(5)
    V, N = 50, 6000
    logits_V = torch.randn(V, generator=g) * 2
    p_ref = _reference(logits_V, temperature, top_k, top_p)
    ids, lps = sample(logits_V.repeat(N, 1), [RowParams(temperature, top_k, top_p, 11, i, 3) for i in range(N)])
    ids_t = torch.tensor(ids)
    assert (p_ref[ids_t] > 0).all(), "a token outside the filtered distribution was sampled"
    want = p_ref[ids_t].log()
    assert torch.allclose(torch.tensor(lps, dtype=torch.float64), want, atol=1e-5, rtol=0)
    freq = torch.bincount(ids_t, minlength=V).double() / N
    bound = 5 * (p_ref * (1 - p_ref) / N).sqrt() + 1e-3
    assert ((freq - p_ref).abs() <= bound).all(), f"frequencies off: {(freq - p_ref).abs().max():.4f}"


def test_noise_is_finite_for_every_hash_value():
    """u = uniform_from_bits(k) for every 23-bit k is exact, distinct and strictly inside
    (0, 1), so g = -log(-log(u)) is finite: a +inf draw would pick its token whatever its
    probability (and -inf + inf = nan for a masked one)."""
    from miles_fsdp.engine.sampler import uniform_from_bits

    u = uniform_from_bits(torch.arange(1 << 23))
    assert 0.0 < u.min() and u.max() < 1.0 and bool((u[1:] > u[:-1]).all())
    assert torch.isfinite(-torch.log(-torch.log(u))).all()
    # (seed 24, stream 0, position 0, token 586464) hashes to the top 24-bit value, which the
    # old 24-bit mapping turned into u = 1 and g = +inf
    g = gumbel_noise(torch.tensor([24]), torch.tensor([0]), torch.tensor([0]), 586465)
    assert torch.isfinite(g).all() and g[0, -1] == -torch.log(-torch.log(u[-1]))
    logits = torch.zeros(1, 586465)
    logits[0, -1] = float("-inf")  # masked (as top-k/top-p mask): never sampled, even with the largest noise
    ids, lps = sample(logits, [RowParams(1.0, 0, 1.0, 24, 0, 0)])
    assert ids[0] != 586464 and lps[0] == pytest.approx(-math.log(586464), abs=1e-4)
