"""Sampler: counter-based Gumbel noise, batch invariance, replay, masking, recorded logprobs."""

from __future__ import annotations

import miles_kernels as mk
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
