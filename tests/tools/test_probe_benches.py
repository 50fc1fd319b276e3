"""The decode-step probes in tools/bench (split_probe, step_peer, prefetch_probe, wgmma_probe, mma_probe,
tma_linear_probe, linear_chain_probe, fold_probe, ablate_probe, cublas_kernels, wide_probe, streamk_probe) refuse
a machine without a GPU with a message saying so; on CPU, split_probe's layer-at-a-time trunk gives
Transformer.forward's bits (its two-stream variants rest on that), step_peer's torch step runs (right shape,
finite logits), tma_linear_probe's kernel source is well formed, with_cuda_linear and linear_chain_probe pick
configs from a probe output as they say, and fold_probe and ablate_probe check their arguments (their kernels and
patching: tests/kernels, check_fold_probe and check_ablate_probe)."""

import json

import pytest
import torch

pytest.importorskip("triton")


@pytest.mark.parametrize("name", ["split_probe", "step_peer", "prefetch_probe", "wgmma_probe", "tma_linear_probe",
                                  "mma_probe", "fold_probe", "ablate_probe", "cublas_kernels", "wide_probe",
                                  "streamk_probe"])
def test_needs_a_gpu(bench_refusal, monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "needs a CUDA GPU" in bench_refusal(name)


def test_linear_chain_probe_refusals(bench_refusal, monkeypatch, tmp_path):
    """A file that is not a probe output, one without a config for every op of the model, and a machine
    without a GPU are refused with a message naming what is missing."""
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    assert "not a tma_linear_probe output" in bench_refusal("linear_chain_probe", str(bad))
    rows = [dict(M=64, op="linear", N=1024, K=2048, triton_us=6.0, cfgs={"wg1_n16_c1_s8": dict(same=True, us=7.0)})]
    part = tmp_path / "part.json"
    part.write_text(json.dumps(dict(rows=rows)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "needs a CUDA GPU" in bench_refusal("linear_chain_probe", str(part))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (9, 0))
    msg = bench_refusal("linear_chain_probe", str(part))
    assert "no same-bits M 64 config for qwen3-0.6b" in msg and "linears ((2048, 1024, 1024), 1024)" in msg
    assert "linear (1024, 2048)" not in msg  # o has one (slower than Triton: the chain takes it anyway)
    assert "linear (1024, 2048)" in bench_refusal("linear_chain_probe", str(part), "--only", "_w4")  # o's is not _w4


def test_fold_probe_arguments_are_checked(bench_refusal):
    """Shapes past the decode batch, chunks off the 64-step grid and unknown widths are refused by name."""
    assert "write BxCTX" in bench_refusal("fold_probe", "--shapes", "64by256")
    assert "the batch must be 1..64" in bench_refusal("fold_probe", "--shapes", "128x256")
    assert "multiples of 64" in bench_refusal("fold_probe", "--chunk", "500")
    assert "multiples of 64" in bench_refusal("fold_probe", "--block-n", "24")


def test_cublas_kernels_rows_are_checked(bench_refusal):
    assert "--ms must be positive" in bench_refusal("cublas_kernels", "--ms", "64", "0")


def test_ablate_probe_arguments_are_checked(bench_refusal):
    """Malformed shapes, unknown models and unknown variants are refused by name (the shapes and models by
    split_probe's parse_shapes / check_models, which fold_probe and step_peer share)."""
    assert "write BxCTX" in bench_refusal("ablate_probe", "--shapes", "64by256")
    assert "write BxCTX" in bench_refusal("ablate_probe", "--shapes", "64x256x2")
    assert "must be positive" in bench_refusal("ablate_probe", "--shapes", "0x256")
    assert "must be positive" in bench_refusal("fold_probe", "--shapes", "64x0")
    msg = bench_refusal("ablate_probe", "--model", "qwen9")
    assert "--model ['qwen9']" in msg and "qwen3-0.6b" in msg
    msg = bench_refusal("ablate_probe", "--variants", "no_sampler")
    assert "no_sampler" in msg and "stub_norms" in msg


def test_step_peer_shapes_are_checked(bench_refusal, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "write BxCTX" in bench_refusal("step_peer", "--shapes", "64by256")


def test_step_peer_variants_are_checked(bench_refusal, monkeypatch, capsys):
    """A variant without NAME=, a name given twice, changes that change nothing or that with_tiles does not know
    are refused naming the variant; good ones are made and undone while parsing (then the CPU refusal)."""
    from miles_kernels._triton import matmul, streamk

    assert "write NAME=OPTIONS" in bench_refusal("step_peer", "--variants", "stream-k")
    assert "write NAME=OPTIONS" in bench_refusal("step_peer", "--variants", "sk=--stream-k on", "sk=--pdl off")
    assert "nothing to change" in bench_refusal("step_peer", "--variants", "sk=")
    bench_refusal("step_peer", "--variants", "sk=--stream-k maybe")
    err = capsys.readouterr().err
    assert "step_peer --variants sk" in err and "'maybe'" in err
    tiles, shipped, fill = dict(matmul.SMALL_M_TILES), streamk.STREAM_K, matmul.FILL
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "needs a CUDA GPU" in bench_refusal("step_peer", "--variants", "sk=--stream-k on",
                                               "c6=--small-table 64x64:tma:4:6 --fill 0.5")
    assert matmul.SMALL_M_TILES == tiles and streamk.STREAM_K is shipped and matmul.FILL == fill


def test_step_peer_captures_each_variant_under_its_changes(bench_script, monkeypatch):
    """variant_graphs captures the step once a variant with that variant's changes made, and undoes them after
    each capture (also when a capture fails)."""
    from miles_kernels._triton import fused_linears, matmul, streamk

    peer = bench_script("step_peer")
    seen = []

    def graphed(fn):
        seen.append((streamk.STREAM_K, fused_linears.TMA_STORE,
                     [t.block_n for t in matmul.SMALL_M_TILES[torch.bfloat16]]))
        if len(seen) == 3:
            raise RuntimeError("capture failed")
        return f"graph{len(seen)}", fn()

    monkeypatch.setattr(peer, "graphed", graphed)
    shipped = (streamk.STREAM_K, fused_linears.TMA_STORE, [t.block_n for t in matmul.SMALL_M_TILES[torch.bfloat16]])
    variants = peer.parse_variants(["sk=--stream-k on", "st=--linears-tma-store on --small-table 64x32:ptr:4:6:2"])
    graphs, outs = peer.variant_graphs(lambda: 7, variants)
    assert graphs == dict(sk="graph1", st="graph2") and outs == dict(sk=7, st=7)
    assert seen == [(True, shipped[1], shipped[2]), (shipped[0], True, [32])]
    with pytest.raises(RuntimeError, match="capture failed"):
        peer.variant_graphs(lambda: 7, dict(sk=variants["sk"]))
    assert seen[2][0] is True
    assert (streamk.STREAM_K, fused_linears.TMA_STORE, [t.block_n for t in matmul.SMALL_M_TILES[torch.bfloat16]]
            ) == shipped


def test_step_peer_variant_summary(bench_script):
    """Each variant's geometric mean, range and bits over the shapes, per model and over all."""
    peer = bench_script("step_peer")
    rows = [dict(model=m, variants=dict(sk=dict(x_ours=x, same_bits=ok)))
            for m, x, ok in (("a", 1.1, True), ("a", 0.9, True), ("b", 1.21, False))]
    got = peer.variant_summary(rows + [dict(model="c")])  # a row without variants (none asked) is left out
    assert set(got) == {"sk"} and set(got["sk"]) == {"a", "b", "all"}
    assert got["sk"]["a"]["geomean"] == pytest.approx((1.1 * 0.9) ** 0.5) and got["sk"]["a"]["same_bits"]
    assert got["sk"]["b"] == dict(geomean=pytest.approx(1.21), min=1.21, max=1.21, rows=1, same_bits=False)
    assert got["sk"]["all"]["rows"] == 3 and got["sk"]["all"]["min"] == 0.9 and not got["sk"]["all"]["same_bits"]
    assert got["sk"]["all"]["geomean"] == pytest.approx((1.1 * 0.9 * 1.21) ** (1 / 3))
    assert peer.variant_summary([dict(model="a")]) == {}


def _tiny(bench_script):
    engine = bench_script("engine")
    from miles_fsdp.models.args import ModelArgs

    return engine, ModelArgs.from_hf(dict(engine.TINY))


def test_trunk_layers_is_the_forward(bench_script):
    import miles_kernels as mk

    engine, _ = _tiny(bench_script)
    probe = bench_script("split_probe")
    model = engine.build("tiny", device="cpu").float()
    B, ctx, page = 3, 20, 16
    a = model.args
    g = torch.Generator().manual_seed(0)
    per_seq = (ctx + 1 + page - 1) // page
    caches = [(torch.randn(1 + B * per_seq, page, a.n_kv_heads, a.head_dim, generator=g),
               torch.randn(1 + B * per_seq, page, a.n_kv_heads, a.head_dim, generator=g)) for _ in range(a.n_layers)]
    table = (1 + torch.arange(B * per_seq)).view(B, per_seq).to(torch.int32)
    pos = torch.full((B,), ctx)
    slot = table[:, ctx // page].long() * page + ctx % page
    ids = torch.randint(0, a.vocab_size, (B,), generator=g)
    meta = mk.AttnMeta(torch.arange(B + 1, dtype=torch.int32), torch.full((B,), ctx + 1, dtype=torch.int32), table,
                       max_q_len=1)
    with torch.no_grad():
        want = model.forward(ids, pos, meta, slot, caches)
        steps = probe.trunk_layers(model, ids, pos, meta, slot, caches)
        n = 0
        while True:
            try:
                next(steps)
                n += 1
            except StopIteration as stop:
                got = stop.value
                break
    assert n == a.n_layers
    assert torch.equal(got, want)


def test_step_peer_torch_step_runs_on_cpu(bench_script):
    _, args = _tiny(bench_script)
    peer = bench_script("step_peer")
    logits = peer.torch_step(args, 4, 10, dev="cpu")()
    assert logits.shape == (4, args.vocab_size)
    assert bool(logits.isfinite().all())


def test_wgmma_probe_needs_a_hopper(bench_refusal, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "compute capability 9.0" in bench_refusal("wgmma_probe")


@pytest.mark.parametrize("bn", [16, 32, 64, 128])
def test_tma_linear_source_names_every_accumulator(bench_script, bn):
    """Each config's kernel: one wgmma of shape m64n{bn}k16 whose operands are the bn / 2 accumulators and the
    two descriptors, and a fence on each accumulator (a missing one lets ptxas serialize the wgmmas)."""
    probe = bench_script("tma_linear_probe")
    src, name = probe.source(1, bn, 2, 4)
    assert name == f"tma_linear_wg1_n{bn}_c2_s4" and "void __launch_bounds__(WG * 128 + 32) __cluster_dims__" in src
    asm = probe.wgmma_asm(bn)
    assert f"m64n{bn}k16" in asm and f"%{bn // 2 - 1}}}, %{bn // 2}, %{bn // 2 + 1}," in asm
    assert asm.count('"+f"') == bn // 2 and f"d[{bn // 2}]" not in asm
    assert src.count(f'asm volatile("" : "+f"(d[{bn // 2 - 1}]) :: "memory");') == 3
    assert probe.smem_bytes(1, bn, 4) == 4 * (8192 + bn * 128) + 64 + 1024
    assert "#define SWIGLU 0" in src and "e[i] = 0.f;" not in src and 'asm volatile("" : "+f"(e[' not in src


def test_tma_swiglu_source_walks_both_products(bench_script):
    """The swiglu kernel: a second accumulator (up) with its own wgmmas and fences, both products rounded to bf16
    before silu_times (Triton's swiglu), and a stage holding x and both weights' tiles."""
    probe = bench_script("tma_linear_probe")
    src, name = probe.source(1, 32, 2, 8, swiglu=True)
    assert name == "tma_swiglu_wg1_n32_c2_s8" and "#define SWIGLU 1" in src and "e[i] = 0.f;" in src
    assert probe.wgmma_asm(32, "e") in src and probe.wgmma_asm(32) in src
    assert src.count('asm volatile("" : "+f"(e[15]) :: "memory");') == 3
    assert "silu_times(bf16_round(d[i]), bf16_round(e[i]))" in src and "div.full.f32 t, %1, t" in src
    assert probe.smem_bytes(1, 32, 8, swiglu=True) == 8 * (8192 + 2 * 32 * 128) + 128 + 1024


def test_tma_mma_configs_and_source(bench_script):
    """The mma.sync consumers: 16 MT-row tiles, each cluster CTA's x slice at least 8 rows (one 1,024-byte
    swizzle period), four empty-barrier arrivals a warpgroup, the stage's fragments loaded before the
    previous step's mma chains, and the shared memory of 16 MT x rows."""
    probe = bench_script("tma_linear_probe")
    for m, mts in ((1, {1}), (16, {1}), (32, {1, 2}), (64, {1, 2, 4})):
        mma = [cfg for cfg in probe.configs(m, True) if cfg[4]]
        assert {cfg[4] for cfg in mma} == mts and all(16 * cfg[4] * cfg[5] // cfg[2] >= 8 for cfg in mma)
        assert {cfg[5] for cfg in mma} == ({1} if m <= 16 else {1, 4})  # warps along M only where M fills them
    assert (1, 8, 8, 8, 1, 4) in probe.configs(64, True)  # 8-row x slices of a 64-row tile: a cluster of 8
    assert not [cfg for cfg in probe.configs(64, True, swiglu=True) if cfg[4] and cfg[1] == 64]
    assert not [cfg for cfg in probe.configs(128, True) if cfg[4]]
    src, name = probe.source(1, 32, 2, 8, mt=4)
    assert name == "tma_linear_mma_wg1_n32_c2_s8_m4" and "#define MT 4" in src
    assert "mbar_init(empty0 + 8 * s, C * WG * (MT ? 4 : 1))" in src
    assert src.index("fetch(f1, ks + 1);") < src.index("chains(f0);")
    # a stage goes back to the producer a chain after its ldmatrix, behind the generic -> async proxy fence
    loop = src[src.index("for (; ks + 2 < nk; ks += 2)"):]
    assert loop.index("release(ks);") < loop.index("fetch(f1, ks + 1);") < loop.index("chains(f0);") < loop.index(
        "release(ks + 1);") < loop.index("fetch(f0, ks + 2);")
    rel = src[src.index("auto release"):]
    assert rel.index("fence.proxy.async.shared::cta") < rel.index("mbar_arrive_cta(")
    assert probe.config_name((1, 32, 2, 8, 4)) == "wg1_n32_c2_s8_m4" and probe.config_name((1, 16, 1, 8, 0)) == (
        "wg1_n16_c1_s8")
    assert probe.config_name((1, 8, 8, 8, 1, 4)) == "wg1_n8_c8_s8_m1_w4"
    for cfg in [(1, 16, 1, 8, 0, 1), (1, 32, 2, 8, 4, 1), (1, 8, 8, 12, 1, 4)]:
        assert probe.parse_config(probe.config_name(cfg)) == cfg
    assert probe.smem_bytes(1, 32, 8, mt=2) == 8 * (32 * 128 + 32 * 128) + 128 + 1024
    assert probe.smem_bytes(1, 8, 8, mt=1, wm=4) == 8 * (64 * 128 + 8 * 128) + 128 + 1024
    src, name = probe.source(1, 8, 8, 8, mt=1, wm=4)
    assert name == "tma_linear_mma_wg1_n8_c8_s8_m1_w4" and "#define WM 4" in src and "#define PDL 0" in src


def test_tma_pdl_source_and_launch_structs(bench_script):
    """PDL: the producer loads the first S stages' weights, then waits for the previous kernel, then loads their
    x; consumers wait before any store; mode 1 lets the next kernel launch at once. The launch structs have the
    driver's layout (CUlaunchAttribute 72 bytes, CUlaunchConfig 56 with the stream at 32)."""
    import ctypes

    probe = bench_script("tma_linear_probe")
    src, name = probe.source(1, 16, 2, 8, pdl=1)
    assert name == "tma_linear_wg1_n16_c2_s8_pdl1" and "#define PDL 1" in src
    prod = src[src.index("if (warp == WG * 4)"):]
    assert prod.index("for (int ks = 0; ks < ks0; ++ks) load_w(ks);") < prod.index("pdl_wait();") < prod.index(
        "for (int ks = 0; ks < ks0; ++ks) load_x(ks);")
    assert src.index("if (PDL == 1) pdl_launch_next();") < src.index("if (warp == WG * 4)")
    for part in src.split("} else {  // mma.sync consumers")[1], src.split("const int g = warp / 4;")[0][-200:]:
        assert "if (PDL) pdl_wait();" in part
    # mode 3: the producer triggers after its last load, each consumer after its K walk, before its stores
    late = "if (PDL == 3) pdl_launch_next();"
    assert src.count(late) == 3 and prod.index("load_x(ks);\n            }") < prod.index(late)
    mma, wg = src.split("} else {  // mma.sync consumers")[1].split("const int g = warp / 4;")
    for part, walked in (mma, "chains(f0);\n        }"), (wg, "wgmma.wait_group.sync.aligned 0;"):
        assert part.index(walked) < part.index(late) < part.index("store2(")
    assert ctypes.sizeof(probe.LaunchAttribute) == 72 and probe.LaunchAttribute.value.offset == 8
    assert ctypes.sizeof(probe.LaunchConfig) == 56 and probe.LaunchConfig.stream.offset == 32
    assert probe.LaunchConfig.attrs.offset == 40 and probe.LaunchConfig.n_attrs.offset == 48


def test_with_cuda_linear_takes_the_fastest_same_bits_config(bench_script, tmp_path, monkeypatch):
    """Per (N, K) at M 64: the fastest config that gave linear's bits, only where it beat Triton; a file that is
    not a probe output, or one with no such config, is refused with a message naming it."""
    tool = bench_script("with_cuda_linear")
    rows = [dict(M=64, N=1024, K=2048, triton_us=6.0, cfgs={"wg1_n16_c4_s8": dict(same=True, us=4.0),
                                                             "wg1_n32_c2_s8_m4": dict(same=True, us=3.5),
                                                             "wg1_n64_c1_s8": dict(same=False, differ=3)}),
            dict(M=64, N=4096, K=1024, triton_us=3.0, cfgs={"wg1_n16_c4_s8": dict(same=True, us=4.0)}),
            dict(M=37, N=1024, K=2048, cfgs={"wg1_n16_c4_s8": dict(same=True)})]
    assert tool.best_configs(rows) == {(1024, 2048): (1, 32, 2, 8, 4, 1)}
    assert tool.best_configs(rows, beat=False) == {(1024, 2048): (1, 32, 2, 8, 4, 1), (4096, 1024): (1, 16, 4, 8, 0, 1)}
    fused = [dict(M=64, op="swiglu", N=[3072, 3072], K=1024, triton_us=8.0, cfgs={"wg1_n32_c2_s8": dict(same=True,
                                                                                                    us=5.0)}),
             dict(M=64, op="linears", N=[2048, 1024, 1024], K=1024, triton_us=6.0,
                  cfgs={"wg1_n16_c4_s8": dict(same=True, us=6.5)})]
    assert tool.best_configs(rows + fused) == {(1024, 2048): (1, 32, 2, 8, 4, 1)}
    assert tool.best_configs(rows + fused, op="swiglu") == {((3072, 3072), 1024): (1, 32, 2, 8, 0, 1)}
    assert tool.best_configs(rows + fused, op="linears") == {}
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    monkeypatch.setattr("sys.argv", ["with_cuda_linear.py", str(bad), "--", "engine.py"])
    with pytest.raises(SystemExit, match="not a tma_linear_probe output"):
        tool.main()
    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps(dict(rows=rows[1:])))
    monkeypatch.setattr("sys.argv", ["with_cuda_linear.py", str(slow), "--", "engine.py"])
    with pytest.raises(SystemExit, match="no M 64 shape"):
        tool.main()
    monkeypatch.setattr("sys.argv", ["with_cuda_linear.py", str(slow)])
    with pytest.raises(SystemExit, match="usage"):
        tool.main()
    monkeypatch.setattr("sys.argv", ["with_cuda_linear.py", str(slow), "--pdl", "4", "--", "engine.py"])
    with pytest.raises(SystemExit, match="got .*--pdl 4"):
        tool.main()
    monkeypatch.setattr("sys.argv", ["with_cuda_linear.py", str(slow), "--pdl", "3", "--", "engine.py"])
    with pytest.raises(SystemExit, match="no M 64 shape"):
        tool.main()


def test_step_peer_profile_count_is_checked(bench_refusal, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "--profile -2: give a count of replays" in bench_refusal("step_peer", "--profile", "-2")


def test_sm90_regs_refusals(bench_script, monkeypatch):
    """sm90_regs.py (offline sm_90a compiles) refuses a kernel it does not know, a linear kernel without tiles and
    a wide_probe config that does not exist, naming the choices; nothing is compiled for these."""
    import sys

    mod = bench_script("sm90_regs")
    for args, msg in ((["foo"], "kernel 'foo': pick from"), (["_linear_streamk_kernel"], "name its tiles"),
                      (["wide_probe", "nope"], "wide_probe config 'nope': pick from")):
        monkeypatch.setattr(sys, "argv", ["sm90_regs.py", *args])
        with pytest.raises(SystemExit) as e:
            mod.main()
        assert msg in str(e.value), (args, str(e.value))
