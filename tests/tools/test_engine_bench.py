"""tools/bench/engine.py's ratio to the transformers peers (the issue's ">= 40x generate" row)."""


def test_engine_rows_get_their_ratio_to_the_peer_of_the_same_shape(bench_script):
    row = dict(batch=64, prompt=128, new=256)
    results = [
        dict(model="m", system="engine", output_tok_s=1000.0, warm_tok_s=4000.0, **row),
        dict(model="m", system="engine-fast", output_tok_s=3000.0, **row),
        dict(model="m", system="engine", output_tok_s=9000.0, batch=256, prompt=1024, new=256),  # no peer there
        dict(model="m", system="hf-generate", output_tok_s=100.0, **row),
        dict(model="m", system="hf-generate-batch", skipped="transformers has no generate_batch", **row),
        dict(model="other", system="hf-generate", output_tok_s=1.0, **row),
    ]
    lines = bench_script("engine").vs_peers(results)
    assert results[0]["vs_hf-generate"] == 40.0  # the warm run where there is one
    assert results[1]["vs_hf-generate"] == 30.0  # else the cold one
    assert "vs_hf-generate" not in results[2] and "vs_hf-generate-batch" not in results[0]
    assert lines == ["m b64 p128: engine (warm) 4000 tok/s = 40.0x hf-generate (100 tok/s)",
                     "m b64 p128: engine-fast (cold) 3000 tok/s = 30.0x hf-generate (100 tok/s)"]


def test_warm_row_splits_into_the_first_token_and_each_decode_step(bench_script, capsys):
    engine = bench_script("engine")
    row = dict(model="m", system="engine", batch=64, prompt=128, new=256, wall_s=1.0, output_tok_s=16384.0,
               pct_roofline=20.0, roofline_tok_s=81920.0, prefill_roofline_tok_s=65536.0, preemptions=0)
    row.update(engine.warm_split(64, 256, 0.524, 0.014))
    assert row["warm_tok_s"] == 64 * 256 / 0.524
    assert row["warm_first_ms"] == 14.0 and abs(row["warm_decode_ms"] - 2.0) < 1e-9  # (524 - 14) / 255
    engine.print_row(row)
    assert "warm 31267 tok/s = 38.2% (47.7% with prefill): prefill + first token 14.0 ms, then 2.000 ms a step" \
        in capsys.readouterr().out
    assert engine.warm_split(64, 1, 0.02, None) == dict(warm_tok_s=3200.0)  # one new token: nothing to split
    row.update(warm_overlapped=254, warm_gc_runs=0, warm_gc_ms=0.0, warm_clock=dict(sm_mhz=1754.6, power_w=412.2))
    engine.print_row(row)
    assert "then 2.000 ms a step (254 launched ahead; GC 0 runs, 0.0 ms; SM 1755 MHz, 412 W)" in capsys.readouterr().out
    row["warm_clock"] = None  # no nvidia-smi sample
    engine.print_row(row)
    assert capsys.readouterr().out.endswith("(254 launched ahead; GC 0 runs, 0.0 ms)\n")


def test_prefill_profile_times_new_prompts(bench_script):
    """--profile's prefill part on a tiny CPU engine: every prompt prefilled in the steps it counts, on
    prompts the prefix cache has not seen (two prefills of new prompts), the engine left with nothing."""
    engine = bench_script("engine")
    from miles_fsdp.engine import Engine, EngineConfig

    model = engine.build("tiny", "cpu").float()
    eng = Engine(model, config=EngineConfig(page_size=16, max_model_len=256, kv_memory_bytes=1 << 24))
    engine.run_engine(eng, engine.prompts(4, 40, model.args.vocab_size, seed=0), 2)  # the cache holds these
    cached, step = [], eng.step

    def counted():
        step()
        cached.extend(q.num_cached_prompt_tokens for q in eng.scheduler.running)

    eng.step = counted
    out = engine.prefill_profile(eng, 4, 40, model.args.vocab_size, 3)
    assert out["prefill_steps"] >= 1 and out["prefill_ms"] > 0
    assert out["prefill_gpu_ms"] == 0.0 and out["prefill_kernels_us"] == {}  # no device kernels on the CPU
    assert not eng.has_unfinished() and len(cached) >= 8 and set(cached) == {0}


def test_gc_pauses_add_up_the_collector_runs(bench_script):
    import gc

    pauses = bench_script("engine").GcPauses()
    gc.callbacks.append(pauses)
    try:
        gc.collect()
        gc.collect()
    finally:
        gc.callbacks.remove(pauses)
    assert pauses.runs == 2 and pauses.seconds > 0
