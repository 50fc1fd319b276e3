"""The graphed draft's draw against the sampler, shared by tests/engine/test_speculative.py (CPU)
and tests/gpu/test_engine_gpu.py (151,936 vocab): a plain module (no conftest import), so
either directory's tests can import it."""

import torch


def draw_vs_sampler(device: str, V: int, B: int = 96) -> None:
    """draft_graph.draw on bf16-rounded logits (ties at the maximum are common) picks the
    sampler's token for every temperature, top-k 0 and 1: the graphed draft is the eager one."""
    from miles_fsdp.engine.draft_graph import GREEDY, SAMPLE, TOP1, draw, temperature_scale
    from miles_fsdp.engine.sampler import RowParams, gumbel_noise, sample

    g = torch.Generator().manual_seed(3)
    logits_BV = (torch.randn(B, V, generator=g) * 2).round().to(torch.bfloat16).to(device)  # few values: ties
    rows = [RowParams(t, k, 1.0, 11, i % 3, 40 + i) for i, (t, k) in
            enumerate([(t, k) for t in (0.0, 0.6, 1.0, 1.3) for k in (0, 1)] * (B // 8))]
    want, _ = sample(logits_BV, rows)
    mode = torch.tensor([GREEDY if r.temperature == 0 else TOP1 if r.top_k == 1 else SAMPLE for r in rows], device=device)
    scale = torch.tensor([float(temperature_scale(r.temperature or 1.0, torch.device(device))) for r in rows],
                         device=device)
    keys = torch.tensor([[r.seed, r.stream, r.position] for r in rows], device=device).T
    got = draw(logits_BV.float(), mode, scale, gumbel_noise(keys[0], keys[1], keys[2], V))
    assert got.tolist() == want
