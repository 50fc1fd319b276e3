"""Overlap scheduling (EngineConfig.overlap_schedule): decode step n+1 is launched with its
input ids on the device before step n is post-processed. It changes no token, logprob or
finish reason: checked against the eager engine over the sampling grid, stop tokens and
strings, n > 1, prefix-cache hits, preemption, admission from a waiting queue, abort,
release/resume and weight updates, on the CUDA-graph layout run without capture (CPU)."""

from __future__ import annotations

import pytest

from miles_fsdp.engine import Engine, EngineConfig, FinishReason, Request, SamplingParams
from miles_fsdp.models import load_model
from miles_fsdp.models.testing import build_tiny_checkpoint

from conftest import count_overlapped, finish_all, graph_layout, grid_requests, mock_engine


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("overlap")
    return {arch: load_model(build_tiny_checkpoint(root / arch, arch, seed=6, tokenizer=False,
                                                   max_position_embeddings=512)).eval()
            for arch in ("qwen3", "qwen3_moe")}


def _requests(n_req: int = 12, seed: int = 0) -> list[Request]:
    # 0-24 stop ids of 256: samples stop at scattered steps
    return grid_requests(n_req, seed, stops=lambda i: list(range(8 * (i % 4))), new=lambda i: 10 + 4 * i)


def _run(model, reqs, graphs: bool, **cfg):
    eng = Engine(model, config=EngineConfig(page_size=16, num_pages=cfg.pop("num_pages", 96), max_prefill_tokens=64,
                                            cuda_graph_max_batch=16, **cfg), eos_token_ids=[3])
    calls = count_overlapped(graph_layout(eng)) if graphs else []
    res = eng.generate([Request(list(r.prompt_ids), r.params) for r in reqs])
    return [[(s.token_ids, s.logprobs.tolist(), s.finish_reason) for s in rs] for rs in res], eng, calls


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_overlap_changes_nothing(models, arch):
    reqs = _requests()
    want, _, _ = _run(models[arch], reqs, graphs=False)
    assert {r for rs in want for _, _, r in rs} == {FinishReason.STOP, FinishReason.LENGTH}
    for cfg in (dict(), dict(num_pages=14), dict(max_num_seqs=5, prefix_cache=False)):
        got, eng, calls = _run(models[arch], reqs, graphs=True, **cfg)
        assert got == want, f"{cfg}: overlap scheduling changed the output"
        # with waiting samples that may fit (tight pages, few slots) steps overlap less often
        assert len(calls) > (20 if not cfg else 0), f"{cfg}: decode steps did not overlap"
        assert eng.metrics()["engine/overlap_steps_total"] == len(calls)
        assert eng.stats()["num_free_pages"] == eng.num_pages - 1  # cached pages count as free
        if "num_pages" in cfg:
            assert eng.stats()["num_preemptions"] > 0
    got, eng, calls = _run(models[arch], reqs, graphs=True, overlap_schedule=False)
    assert got == want and not calls and "engine/overlap_steps_total" not in eng.metrics()


@pytest.mark.parametrize("graphs", [False, True])
def test_paged_kv_and_abort_in_flight(graphs):
    """The paged mock model checks every KV position it reads; an abort while a step is in
    flight ends the sample with its tokens so far and frees its pages."""
    ref, _ = mock_engine(num_pages=40)
    p = SamplingParams(n=3, max_new_tokens=50, seed=2, stop_token_ids=(5, 9))
    [want] = ref.generate([Request(list(range(1, 30)), p)])
    eng, _ = mock_engine(num_pages=40, graphs=graphs)
    calls = count_overlapped(eng)
    [got] = eng.generate([Request(list(range(1, 30)), p)])
    assert [(r.token_ids, r.logprobs.tolist(), r.finish_reason) for r in got] == \
        [(r.token_ids, r.logprobs.tolist(), r.finish_reason) for r in want]
    assert bool(calls) == graphs
    eng.add_request(Request(list(range(1, 30)), SamplingParams(n=2, max_new_tokens=50, seed=2), "a"))
    eng.add_request(Request([4, 5], SamplingParams(max_new_tokens=20, seed=1), "b"))
    for _ in range(6):
        eng.step()
    assert graphs == (eng._inflight is not None)
    eng.abort("a")
    done = finish_all(eng)
    assert {k: r.finish_reason for k, r in done.items()} == {
        ("a", 0): FinishReason.ABORT, ("a", 1): FinishReason.ABORT, ("b", 0): FinishReason.LENGTH}
    a0 = done[("a", 0)]
    assert 0 < len(a0.token_ids) < 50 and len(a0.logprobs) == len(a0.token_ids)
    assert eng.stats()["num_free_pages"] == 39


def test_release_and_weight_update_drain_the_step_in_flight(models):
    """release() and update_weights() with a step in flight: it is finished and reported by
    the next step(); samples stay exact."""
    reqs = [Request(list(range(20, 50)), SamplingParams(n=2, max_new_tokens=30, seed=4, temperature=1.0))]
    want, _, _ = _run(models["qwen3"], reqs, graphs=False)
    for action in ("release", "update"):
        eng = graph_layout(Engine(models["qwen3"], config=EngineConfig(page_size=16, num_pages=40,
                                                                       max_prefill_tokens=64), eos_token_ids=[3]))
        eng.add_request(Request(list(reqs[0].prompt_ids), reqs[0].params, "x"))
        outs = []
        for _ in range(5):
            outs += eng.step()
        assert eng._inflight is not None
        if action == "release":
            eng.release()
            eng.resume()
        else:
            eng.update_weights(models["qwen3"].state_dict(), version=1)
        assert eng._inflight is None
        got = finish_all(eng)
        got = [(r.token_ids, r.logprobs.tolist(), r.finish_reason) for r in (got["x", 0], got["x", 1])]
        assert got == want[0], action
