"""The logprobs' autograd with a top-k / top-p filter filters once in the forward and keeps each
row's floor for the backward (CUDA; forced on the CPU here): the same logprobs, entropy and grads,
bit for bit, as filtering again in the backward, for mk.logprobs and mk.linear_logprobs."""

import pytest
import torch

import miles_kernels as mk
from miles_kernels import _logprobs, _ref


def _run(fn, *leaves):
    logp, ent = fn()
    g = torch.Generator().manual_seed(3)
    loss = (logp.masked_fill(~torch.isfinite(logp), 0) * torch.randn(logp.shape, generator=g)).sum() \
        + (ent * torch.randn(ent.shape, generator=g)).sum()
    return [logp, ent, *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.8), (7, 0.6)])
def test_kept_floor_gives_the_bits_of_filtering_again(monkeypatch, top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 300, generator=g) * 3).requires_grad_(True)
    ids = torch.randint(0, 300, (37,), generator=g)
    x = torch.randn(37, 16, generator=g).requires_grad_(True)
    w = torch.randn(300, 16, generator=g).requires_grad_(True)
    plain = _run(lambda: mk.logprobs(logits, ids, 0.7, entropy=True, top_k=top_k, top_p=top_p), logits)
    plain_lin = [_run(lambda: mk.linear_logprobs(x, w, ids, 0.7, True, top_k, top_p, chunk_rows=16, keep_bytes=kb),
                      x, w) for kb in (0, 1 << 30)]
    calls = []
    prefiltered = _logprobs._prefiltered
    monkeypatch.setattr(_logprobs, "_keeps_floor", lambda logits_TV, k, p: bool(k or p < 1.0))
    monkeypatch.setattr(_logprobs, "_prefiltered", lambda *a: calls.append(1) or prefiltered(*a))
    refilters = []
    monkeypatch.setattr(_logprobs, "filter_logits", lambda *a: refilters.append(1) or _ref.filter_logits(*a))
    kept = _run(lambda: mk.logprobs(logits, ids, 0.7, entropy=True, top_k=top_k, top_p=top_p), logits)
    assert calls, "the floor path did not run"
    for a, b in zip(plain, kept):
        assert torch.equal(a, b)
    for kb, want in zip((0, 1 << 30), plain_lin):  # backward recomputing the logits, then keeping them
        calls.clear()
        got = _run(lambda: mk.linear_logprobs(x, w, ids, 0.7, True, top_k, top_p, chunk_rows=16, keep_bytes=kb), x, w)
        assert len(calls) == 3  # one per 16-row chunk of 37
        for a, b in zip(want, got):
            assert torch.equal(a, b)
    assert not refilters, "a backward filtered again instead of masking from the kept floor"


def test_floor_is_the_mask():
    """Tokens under filter_floor are exactly the ones filter_logits masks; the floor is a kept value."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 200, generator=g) * 2
    x[2, :30] = 3.0  # ties at the top
    for top_k, top_p in ((0, 0.9), (4, 1.0), (4, 0.5), (50, 0.9999999), (1, 0.3)):
        floor = _ref.filter_floor(x, top_k, top_p)
        z = _ref.filter_logits(x, top_k, top_p)
        assert torch.equal(torch.isinf(z), x < floor[:, None])
        assert torch.equal(torch.where(torch.isinf(z), float("inf"), z).amin(-1), floor)
    assert torch.equal(_ref.filter_floor(x, 0, 1.0), torch.full((9,), float("-inf")))
