"""Engine API behaviour: stops, abort, memory release, weight updates (versions, no mixing)."""

from __future__ import annotations

import pytest
import torch

from miles_fsdp.engine import Engine, EngineConfig, FinishReason, Request, SamplingParams

from conftest import finish_all, load_tiny, mock_engine, trainer_logprobs


def letters(ids: list[int]) -> str:
    return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_token_string_and_length():
    eng, _ = mock_engine(num_pages=32)
    eng.detokenize = eng.scheduler.detokenize = letters
    prompt = list(range(3, 20))
    [[free]] = eng.generate([Request(prompt, SamplingParams(max_new_tokens=25, seed=3))])
    assert free.finish_reason is FinishReason.LENGTH and len(free.token_ids) == 25
    toks = free.token_ids
    # stop token: the first occurrence of the 6th generated token ends the sample there
    stop_tok = toks[5]
    [[a]] = eng.generate([Request(prompt, SamplingParams(max_new_tokens=25, seed=3, stop_token_ids=(stop_tok,)))])
    assert a.finish_reason is FinishReason.STOP and a.token_ids == toks[: toks.index(stop_tok) + 1]
    # engine eos ids stop too, unless ignore_eos
    eng.scheduler.waiting.clear()
    eng.eos_token_ids = frozenset({stop_tok})
    [[b], [c]] = eng.generate([Request(prompt, SamplingParams(max_new_tokens=25, seed=3)),
                               Request(prompt, SamplingParams(max_new_tokens=25, seed=3, ignore_eos=True))])
    assert b.token_ids == a.token_ids and c.token_ids == toks
    eng.eos_token_ids = frozenset()
    # stop string spanning several tokens: cut right after the token completing it
    text = letters(toks)
    stop = text[10:13]
    [[d]] = eng.generate([Request(prompt, SamplingParams(max_new_tokens=25, seed=3, stop_strings=(stop,)))])
    assert d.finish_reason is FinishReason.STOP and d.token_ids == toks[: text.index(stop) + 3]


def test_abort_finishes_with_partial_output_and_frees_pages():
    eng, _ = mock_engine(num_pages=16)
    eng.add_request(Request([1, 2, 3], SamplingParams(n=2, max_new_tokens=40, seed=0), request_id="a"))
    eng.add_request(Request([4, 5, 6], SamplingParams(max_new_tokens=10, seed=0), request_id="b"))
    for _ in range(4):
        eng.step()
    eng.abort("a")
    eng.abort("missing")  # unknown ids are a no-op (the request may have just finished)
    done = finish_all(eng)
    assert {k: r.finish_reason for k, r in done.items()} == {
        ("a", 0): FinishReason.ABORT, ("a", 1): FinishReason.ABORT, ("b", 0): FinishReason.LENGTH}
    assert 0 < len(done[("a", 0)].token_ids) < 40 and len(done[("a", 0)].logprobs) == len(done[("a", 0)].token_ids)
    assert eng.stats()["num_free_pages"] == 15


def test_release_and_resume_keep_samples_exact():
    reqs = [Request([7, 8, 9] * 7, SamplingParams(n=2, max_new_tokens=12, seed=1), request_id="x")]
    ref, _ = mock_engine(num_pages=16)
    [want] = ref.generate(reqs)
    eng, _ = mock_engine(num_pages=16)
    eng.add_request(Request(list(reqs[0].prompt_ids), reqs[0].params, "x"))
    for _ in range(3):
        eng.step()
    eng.release()
    assert eng.runner.kv_caches is None
    with pytest.raises(RuntimeError, match="resume"):
        eng.step()
    eng.resume()
    got = {i: r for (_, i), r in finish_all(eng).items()}
    for i, w in enumerate(want):
        assert got[i].token_ids == w.token_ids and torch.equal(got[i].logprobs, w.logprobs)


def test_close_gives_the_kv_cache_back():
    """close() (the rollout interface's end) releases the KV cache and graphs at once; the engine
    says what to call before stepping again."""
    eng, _ = mock_engine(num_pages=16, graphs=True)
    eng.generate([Request([1, 2, 3], SamplingParams(max_new_tokens=4, seed=0))])
    eng.close()
    assert eng.runner.kv_caches is None and eng.runner.graphs is None
    eng.add_request(Request([1, 2, 3], SamplingParams(max_new_tokens=4, seed=0)))
    with pytest.raises(RuntimeError, match="resume"):
        eng.step()


def test_out_of_memory_names_the_settings(monkeypatch):
    eng, _ = mock_engine(num_pages=16)

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(eng.runner, "run", oom)
    eng.add_request(Request([1, 2, 3], SamplingParams(max_new_tokens=4, seed=0)))
    with pytest.raises(torch.OutOfMemoryError, match=r"engine step \(1 sequences, 3 tokens\) ran out of memory; "
                       r"lower EngineConfig.max_prefill_tokens .* Allocator: CUDA out of memory"):
        eng.step()
    eng.release()
    monkeypatch.setattr(eng.runner, "allocate", lambda n: (_ for _ in ()).throw(
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1024 bytes")))
    with pytest.raises(torch.OutOfMemoryError, match=r"engine KV cache \(16 pages, .* GiB\).*kv_memory_fraction"):
        eng.resume()
    monkeypatch.setattr(eng.runner, "allocate", lambda n: (_ for _ in ()).throw(RuntimeError("other failure")))
    with pytest.raises(RuntimeError, match="^other failure$"):  # not an OOM: untouched
        eng.resume()


@pytest.fixture(scope="module")
def two_models(tiny_ckpts, tmp_path_factory):
    from miles_fsdp.models.testing import build_tiny_checkpoint

    other = build_tiny_checkpoint(tmp_path_factory.mktemp("other") / "m", "qwen3", seed=11, tokenizer=False)
    return load_tiny(tiny_ckpts["qwen3"]), load_tiny(other)


def _clone(model):
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("policy", ["finish", "restart"])
def test_update_weights_versions_and_no_mixing(two_models, policy):
    old, new = two_models
    model = _clone(old)
    eng = Engine(model, config=EngineConfig(page_size=32, num_pages=32, weight_update=policy), eos_token_ids=[])
    prompt = list(range(40, 110))  # > 2 pages: cached after the first run
    p = SamplingParams(n=2, max_new_tokens=10, seed=5)
    eng.add_request(Request(prompt, p, "early"))
    eng.add_request(Request([1, 2, 3], p, "queued"))
    out = []
    for _ in range(3):
        out += eng.step()
    started = {o.request_id for o in out if o.new_token_ids}
    assert "early" in started, "early must be mid-generation"
    eng.update_weights(new.state_dict(), version=7)
    assert eng.weight_version == 7 and eng.stats()["num_cached_pages"] == 0
    eng.add_request(Request(prompt, p, "late"))
    results, resets = {}, set()
    while eng.has_unfinished():
        for o in eng.step():
            if o.reset:
                resets.add(o.request_id)
            if o.finished:
                results[(o.request_id, o.sample_index)] = o.result
    for (rid, _), r in results.items():
        prompt_ids = prompt if rid != "queued" else [1, 2, 3]
        on_old = rid in started and policy == "finish"
        assert r.weight_version == (0 if on_old else 7), (rid, policy)
        want = trainer_logprobs(old if on_old else new, prompt_ids, r.token_ids, p)
        assert torch.equal(r.logprobs, want), f"{rid}: tokens mix weight versions"
    assert resets == (started if policy == "restart" else set())
    late = [results[("late", i)] for i in range(2)]
    if policy == "restart":  # both restarted early samples and the late ones run on v7 with one seed
        assert [r.token_ids for r in late] == [results[("early", i)].token_ids for i in range(2)]
    for name, param in model.named_parameters():
        assert torch.equal(param, new.state_dict()[name])


def test_update_weights_rejects_bad_state_dict(two_models):
    eng = Engine(_clone(two_models[0]), config=EngineConfig(page_size=32, num_pages=8), eos_token_ids=[])
    sd = dict(two_models[1].state_dict())
    sd.pop("norm.weight")
    sd["extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing \['norm.weight'\], unexpected \['extra'\]"):
        eng.update_weights(sd, version=1)
    assert eng.weight_version == 0


def test_generate_from_prompts_matches_engine(two_models):
    from miles_fsdp.engine.offline import generate_from_prompts

    model = two_models[0]
    prompts = [[5, 6, 7], list(range(100, 140))]
    out = generate_from_prompts(model, prompts, max_new_tokens=6, temperature=0.9, top_k=50, seed=3)
    assert [len(r.token_ids) for r in out] == [6, 6]
    # prompt i uses seed + i: alone, prompt 1 gives the same sample
    [alone] = generate_from_prompts(model, prompts[1:], max_new_tokens=6, temperature=0.9, top_k=50, seed=4)
    assert alone.token_ids == out[1].token_ids and torch.equal(alone.logprobs, out[1].logprobs)
    [greedy] = generate_from_prompts(model, prompts[:1], max_new_tokens=4)
    [stopped] = generate_from_prompts(model, prompts[:1], max_new_tokens=4, stop_ids=(greedy.token_ids[1],))
    cut = greedy.token_ids.index(greedy.token_ids[1]) + 1
    assert stopped.finish_reason is FinishReason.STOP and stopped.token_ids == greedy.token_ids[:cut]


def test_run_metrics_count_preemptions_and_report_no_graphs_on_cpu():
    eng, _ = mock_engine(num_pages=6, page_size=16)  # 5 usable pages: two 40-token samples cannot both fit
    assert eng.metrics() == {"engine/preemptions_total": 0.0}
    eng.generate([Request([1, 2, 3] * 10, SamplingParams(n=2, max_new_tokens=40, seed=0))])
    m = eng.metrics()
    assert m["engine/preemptions_total"] > 0
    assert "engine/cuda_graphs_active" not in m  # graphs do not apply on CPU: absent, not 0
    assert eng.cuda_graphs_active is None


@pytest.mark.parametrize("mode", ["invariant", "fast"])
def test_the_engine_runs_its_kernel_mode_on_any_thread(two_models, monkeypatch, mode):
    """The mode is the engine's, not the calling thread's: a server's engine thread (or any
    other) runs fast kernels for a fast engine and invariant ones otherwise."""
    import threading

    from miles_kernels import _ref

    calls = []
    ref_linear = _ref.linear
    monkeypatch.setattr(_ref, "linear", lambda *a: (calls.append(threading.current_thread().name), ref_linear(*a))[1])
    eng = Engine(_clone(two_models[0]), config=EngineConfig(page_size=16, num_pages=32, kv_memory_bytes=0),
                 eos_token_ids=[], kernel_mode=mode)
    worker = threading.Thread(target=lambda: eng.generate([Request([1, 2, 3], SamplingParams(max_new_tokens=3,
                                                                                            seed=0))]),
                              name="engine-thread")
    worker.start()
    worker.join()
    assert (set(calls) == {"engine-thread"}) if mode == "fast" else not calls
    with pytest.raises(ValueError, match="kernel_mode='turbo'"):
        Engine(_clone(two_models[0]), config=EngineConfig(page_size=16, num_pages=32), kernel_mode="turbo")


def test_update_weights_streams_one_bucket_at_a_time(two_models):
    """A WeightSource's buckets are consumed one by one: the engine holds no reference to a
    bucket once it asks for the next (peak extra memory: one bucket)."""
    import weakref

    old, new = two_models
    eng = Engine(_clone(old), config=EngineConfig(page_size=16, num_pages=32), eos_token_ids=[])
    names = [n for n, _ in new.named_parameters()]

    class Source:
        alive_at_next: list[int] = []

        def buckets(self):
            refs = []
            for i in range(0, len(names), 3):
                self.alive_at_next.append(sum(r() is not None for r in refs))
                bucket = {n: new.state_dict()[n].clone() for n in names[i: i + 3]}
                refs = [weakref.ref(t) for t in bucket.values()]
                yield bucket
                bucket = None

    src = Source()
    eng.update_weights(src, version=3)
    assert len(src.alive_at_next) > 2 and max(src.alive_at_next) == 0
    assert eng.weight_version == 3
    assert all(torch.equal(p, new.state_dict()[n]) for n, p in eng.model.named_parameters())
