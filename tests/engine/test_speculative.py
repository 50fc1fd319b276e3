"""Speculative decoding is exact: for any K, tokens and log-probs equal K = 0, bit for bit,
across sampling settings, n > 1, stop strings, prefix-cache hits, chunked prefill,
preemption and weight updates; dense and MoE. Drafts come from the model's MTP module."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from miles_fsdp.engine import Engine, EngineConfig, Request, SamplingParams
from miles_fsdp.engine.scheduler import SpecCounts, accepted
from miles_fsdp.models import load_model
from miles_fsdp.models.testing import build_tiny_checkpoint

from conftest import GRID, grid_requests
from draw_check import draw_vs_sampler


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    out = {}
    for arch in ("qwen3", "qwen3_moe"):
        path = build_tiny_checkpoint(root / arch, arch, seed=4, tokenizer=False, max_position_embeddings=512)
        out[arch] = load_model(path, n_mtp=1).eval()  # a fresh draft: the last layer once more
    other = build_tiny_checkpoint(root / "other", "qwen3", seed=9, tokenizer=False, max_position_embeddings=512)
    out["other"] = load_model(other, n_mtp=1).eval()
    return out


def _requests(n_req: int = 10, seed: int = 0) -> list[Request]:
    return grid_requests(n_req, seed, stops=lambda i: [7] if i % 4 == 1 else [], new=lambda i: 12 + 3 * i)


def _run(model, k: int, reqs, **cfg) -> list:
    eng = Engine(model, config=EngineConfig(page_size=16, num_pages=cfg.pop("num_pages", 96), max_prefill_tokens=64,
                                            num_speculative_tokens=k, **cfg), eos_token_ids=[3])
    res = eng.generate([Request(list(r.prompt_ids), r.params) for r in reqs])
    return [[(s.token_ids, s.logprobs.tolist(), s.finish_reason) for s in rs] for rs in res], eng


@pytest.mark.parametrize("arch, ks", [("qwen3", (1, 4)), ("qwen3_moe", (2,))])
def test_speculation_changes_nothing_but_speed(models, arch, ks):
    reqs = _requests()
    want, _ = _run(models[arch], 0, reqs)
    for k in ks:
        got, eng = _run(models[arch], k, reqs)
        assert got == want, f"K={k}: speculation changed the output"
        m = eng.metrics()
        assert m["engine/spec_mean_accept_len"] >= 1.0 and 0.0 <= m["engine/spec_accept_rate"] <= 1.0
        assert f"engine/spec_accept_rate_{k}" in m


def test_exact_under_preemption_chunking_and_no_prefix_cache(models):
    reqs = _requests(8, seed=1)
    want, _ = _run(models["qwen3"], 0, reqs)
    got, eng = _run(models["qwen3"], 3, reqs, num_pages=12)  # KV too small: preemption, short drafts
    assert got == want and eng.stats()["num_preemptions"] > 0
    got, _ = _run(models["qwen3"], 3, reqs, prefix_cache=False, max_num_seqs=3)
    assert got == want


def test_stop_strings_and_every_grid_setting(models):
    model = models["qwen3"]
    reqs = [Request([5, 6, 7, 8] * 4, SamplingParams(n=2, temperature=t, top_k=k, top_p=p, max_new_tokens=20,
                                                      seed=7, stop_strings=("ab",)))
            for t, k, p in GRID]

    def detok(ids):
        return "".join(chr(97 + i % 3) for i in ids)

    outs = []
    for k in (0, 2):
        eng = Engine(model, config=EngineConfig(page_size=16, num_pages=128, num_speculative_tokens=k),
                     eos_token_ids=[], detokenize=detok)
        res = eng.generate([Request(list(r.prompt_ids), r.params) for r in reqs])
        outs.append([[(s.token_ids, s.logprobs.tolist(), s.finish_reason) for s in rs] for rs in res])
    assert outs[0] == outs[1]
    assert any(s[2].value == "stop" for rs in outs[0] for s in rs), "some sample must stop on the string"


def test_exact_across_a_weight_update(models):
    import copy

    reqs = _requests(6, seed=2)
    results = []
    for k in (0, 2):
        eng = Engine(copy.deepcopy(models["qwen3"]), config=EngineConfig(page_size=16, num_pages=96,
                                                                         num_speculative_tokens=k), eos_token_ids=[])
        for r in reqs:
            eng.add_request(Request(list(r.prompt_ids), r.params, request_id=f"r{id(r)}"))
        done = {}
        for i in range(200):
            if i == 5:  # mid-generation: the in-flight samples finish on the old weights first
                eng.update_weights(models["other"].state_dict(), version=1)
            for out in eng.step():
                if out.finished:
                    done[(out.request_id, out.sample_index)] = (out.result.token_ids, out.result.logprobs.tolist(),
                                                                out.result.weight_version)
            if not eng.has_unfinished():
                break
        results.append(done)
    assert results[0] == results[1]


def test_a_model_without_a_draft_is_refused(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "m", "qwen3", tokenizer=False)
    with pytest.raises(ValueError, match="num_speculative_tokens=2 needs a model with an MTP draft"):
        Engine(load_model(path).eval(), config=EngineConfig(page_size=16, num_pages=8, num_speculative_tokens=2))


def test_accept_rule_and_counts():
    assert accepted([5, 6, 7], [5, 6, 9, 1]) == [5, 6, 9]  # two drafts kept, the target's token at the mismatch
    assert accepted([5, 6], [5, 6, 4]) == [5, 6, 4]  # all kept, plus the token after them
    assert accepted([5], [2, 3]) == [2]
    assert accepted([], [8]) == [8]  # plain decode
    c = SpecCounts()
    c.add(3, 2)
    c.add(3, 0)
    m = c.take()
    assert m["engine/spec_accept_rate_1"] == 0.5 and m["engine/spec_accept_rate_3"] == 0.0
    assert m["engine/spec_mean_accept_len"] == 2.0 and c.take() == {}


def test_compare_speculation_reports_identical_outputs_and_acceptance(models):
    from miles_fsdp.engine.spec_compare import compare_speculation

    reqs = _requests(6)
    out = compare_speculation(lambda k: Engine(models["qwen3"], config=EngineConfig(num_pages=96, num_speculative_tokens=k),
                                               eos_token_ids=[3]), reqs, k=2, repeats=1)
    assert out["outputs_identical"] is True and out["k"] == 2 and len(out["accept_rate_by_position"]) == 2
    assert out["tokens"] > 0 and out["speedup"] > 0 and out["mean_accept_length"] >= 1.0


def test_graph_draw_is_the_sampler_choice():
    draw_vs_sampler("cpu", 1000)


def _graph_layout_run(model, k: int, reqs, num_pages: int):
    """An engine whose decode steps take the CUDA-graph paths (padded verify rows, the draft
    chain of draft_graph.py) without capture, so that the layouts run on CPU."""
    eng = Engine(model, config=EngineConfig(page_size=16, num_pages=num_pages, max_prefill_tokens=64,
                                            num_speculative_tokens=k, cuda_graph_max_batch=8), eos_token_ids=[3])
    eng.runner.use_graphs, eng.runner.graph_capture = True, False
    eng.runner.allocate(eng.num_pages)
    calls = {"verify": [], "draft": []}
    replay, run = eng.runner.graphs.replay, eng.runner.draft_graphs.run
    eng.runner.graphs.replay = lambda key, n: calls["verify"].append(key) or replay(key, n)
    eng.runner.draft_graphs.run = lambda n, h: calls["draft"].append(n) or run(n, h)
    res = eng.generate([Request(list(r.prompt_ids), r.params) for r in reqs])
    return [[(s.token_ids, s.logprobs.tolist(), s.finish_reason) for s in rs] for rs in res], eng, calls


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_graph_layouts_change_nothing(models, arch):
    """The CUDA-graph layouts of a speculative decode step, run without capture: the same
    outputs as K = 0 over the sampling grid (several graph buckets, preemption); where the
    draft samples as the eager drafter does (no top-k > 1 / top-p < 1 filter), the same
    drafts too, so the padded rows give the eager hidden states and draft KV."""
    reqs = _requests()
    want, _ = _run(models[arch], 0, reqs)
    for k in (1, 3):
        got, eng, calls = _graph_layout_run(models[arch], k, reqs, num_pages=40)
        assert got == want, f"K={k}: the graph layouts changed the output"
        assert len({b for b, _ in calls["verify"]}) >= 2 and len(calls["draft"]) >= len(calls["verify"]) - 2
        m = eng.metrics()
        assert m["engine/cuda_graphs_active"] == m["engine/draft_graphs_active"] == 1.0
        assert m["engine/preemptions_total"] > 0
    plain = [Request(r.prompt_ids, dataclasses.replace(r.params, top_k=1 if r.params.top_k == 1 else 0, top_p=1.0))
             for r in reqs]
    _, eager = _run(models[arch], 3, plain, num_pages=40)
    _, eng, _ = _graph_layout_run(models[arch], 3, plain, num_pages=40)
    m = eng.metrics()
    del m["engine/cuda_graphs_active"], m["engine/draft_graphs_active"]
    assert m == eager.metrics(), "the graph layouts drafted otherwise than the eager drafter"
