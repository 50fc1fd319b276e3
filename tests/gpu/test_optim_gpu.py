"""GPU: the optimizer's one pass (miles_kernels/_triton/adamw.py, train/optim.py AdamW.step_with)
gives torch's fused AdamW bits, and a trainer with OptimConfig.one_pass trains the bits of one
without it.

Run on a CUDA machine:  pytest -q tests/gpu/test_optim_gpu.py
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from miles_fsdp.models import ModelArgs, Transformer  # noqa: E402
from miles_fsdp.parallel import ParallelConfig  # noqa: E402
from miles_fsdp.train.draft import DraftConfig  # noqa: E402
from miles_fsdp.train.loss import sft_loss  # noqa: E402
from miles_fsdp.train.optim import OptimConfig  # noqa: E402
from miles_fsdp.train.packing import TrainSeq  # noqa: E402
from miles_fsdp.train.trainer import Trainer, TrainerConfig  # noqa: E402

SIZES = (1, 7, 1023, 16384 + 5, 300_001, 151_936 * 64)  # inside a block, across programs, a vocab-sized one


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weight_decay,clip", [(0.0, None), (0.1, 1.7)])
def test_adamw_step_is_torch_fused_adamw(grad_dtype, weight_decay, clip):
    from miles_kernels._triton.adamw import adamw_step

    g = torch.Generator(device="cuda").manual_seed(0)
    p0 = [torch.randn(n, device="cuda", generator=g) * 0.02 for n in SIZES]
    ref = [torch.nn.Parameter(x.clone()) for x in p0]
    opt = torch.optim.AdamW(ref, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay, fused=True)
    ps = [x.clone() for x in p0]
    ms, vs = [torch.zeros_like(x) for x in p0], [torch.zeros_like(x) for x in p0]
    steps = [torch.zeros((), device="cuda") for _ in p0]
    shadows = [torch.empty_like(x, dtype=torch.bfloat16) for x in p0]
    scale = torch.tensor(clip, device="cuda") if clip else None
    for step in range(4):
        # grads of many magnitudes (small ones: eps matters), one step with a non-finite norm
        grads = [(torch.randn(n, device="cuda", generator=g) * 10.0 ** (-step - i % 4)).to(grad_dtype)
                 for i, n in enumerate(SIZES)]
        inf = torch.tensor(float(step == 2), device="cuda")
        for p, gr in zip(ref, grads):
            p.grad = gr.float().clone()  # torch's step writes the unscaled grads back: not into ours
        opt.grad_scale, opt.found_inf = scale, inf
        opt.step()
        torch._foreach_add_(steps, 1)
        adamw_step(ps, grads, ms, vs, steps, shadows, lr=3e-4, beta1=0.9, beta2=0.95, weight_decay=weight_decay,
                   eps=1e-8, grad_scale=scale, found_inf=inf)
        torch._foreach_sub_(steps, [inf] * len(steps))
        for i, (p, m, v, s, st, r) in enumerate(zip(ps, ms, vs, shadows, steps, ref)):
            state = opt.state[r]
            what = f"step {step}, tensor {i} ({SIZES[i]} elements)"
            assert torch.equal(p, r.detach()), f"{what}: params differ in {int((p != r).sum())}"
            assert torch.equal(m, state["exp_avg"]) and torch.equal(v, state["exp_avg_sq"]), f"{what}: moments"
            assert torch.equal(st, state["step"]), f"{what}: step count {st} vs {state['step']}"
            assert torch.equal(s, p.to(torch.bfloat16)), f"{what}: the shadow is not the new params in bf16"


HF = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=4096, hidden_size=128,
          intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
          max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
          num_nextn_predict_layers=1)


def _train(one_pass: bool, budget: int, graphs: bool, monkeypatch=None, lend: bool | None = None,
           lens: tuple = (300, 200, 100)) -> tuple[dict, list]:
    if lend is not None:
        import miles_fsdp.train.graphs as graphs_mod

        monkeypatch.setattr(graphs_mod, "LEND_GRADS", lend)
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_hf(HF))
    model.init_weights(seed=0)
    cfg = TrainerConfig(optim=OptimConfig(lr=1e-3, weight_decay=0.01, one_pass=one_pass),
                        max_tokens_per_micro_batch=budget, cuda_graphs=graphs, parallel=ParallelConfig())
    draft = DraftConfig(optim=OptimConfig(lr=1e-4, grad_clip=1.0, one_pass=one_pass))
    trainer = Trainer(model, cfg, draft=draft)
    assert trainer.one_pass == one_pass and trainer.draft_one_pass == one_pass
    gen = torch.Generator().manual_seed(0)
    seqs = [TrainSeq(torch.randint(0, 4096, (n,), generator=gen).tolist(), [0] * 8 + [1] * (n - 8))
            for n in lens]
    assert len(trainer.pack(seqs)) == (1 if budget >= sum(lens) else 2 if budget >= 512 else len(lens))
    out = []
    for _ in range(3):
        m = trainer.train_step(trainer.pack(seqs), sft_loss)
        logp = [t.cpu() for t in trainer.forward_logprobs(trainer.pack(seqs))]
        out.append(({k: v for k, v in m.items() if not k.startswith(("perf/", "time/"))}, logp))
    return {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}, out


@pytest.mark.parametrize("budget,graphs", [(1024, True), (512, True), (1024, False)])
def test_one_pass_trains_the_bits_of_torch_adamw(budget, graphs):
    """3 steps (one or two micro-batches a step: bf16 or fp32 grads into the pass; CUDA graphs
    on: the pass writes the shadows the graphs read; off: they are cast again), weight decay,
    the draft's own AdamW in one pass too (draft.optim.one_pass): weights (the draft's included),
    metrics and the scores after every step are the same bits."""
    w_torch, m_torch = _train(False, budget, graphs)
    w_one, m_one = _train(True, budget, graphs)
    for k in w_torch:
        assert torch.equal(w_torch[k], w_one[k]), f"{k} differs after 3 steps"
    for step, ((a, la), (b, lb)) in enumerate(zip(m_torch, m_one)):
        assert a == b, f"step {step} metrics: {a} vs {b}"
        assert all(torch.equal(x, y) for x, y in zip(la, lb)), f"scores after step {step}"


@pytest.mark.parametrize("budget,lens", [(1024, (300, 200, 100)), (512, (300, 200, 100)), (256, (200, 250, 180))])
def test_lent_grads_train_the_bits_of_copies(budget, lens, monkeypatch):
    """train/graphs.py LEND_GRADS: the backward graph's static grads lent to .grad, copied before
    the next replay, train the bits of autograd's copies, with the one pass reading them: one
    micro-batch a step, two in two buckets, three in one bucket (its forward graph, captured before
    the grads were allocated, replays while they are lent: copied only before the next backward,
    they gave run_rl at scale a NaN grad norm, H200 2026-12-05)."""
    w_copy, m_copy = _train(True, budget, True, monkeypatch, lend=False, lens=lens)
    w_lent, m_lent = _train(True, budget, True, monkeypatch, lend=True, lens=lens)
    for k in w_copy:
        assert torch.equal(w_copy[k], w_lent[k]), f"{k} differs after 3 steps"
    for step, ((a, la), (b, lb)) in enumerate(zip(m_copy, m_lent)):
        assert a == b, f"step {step} metrics: {a} vs {b}"
        assert all(torch.equal(x, y) for x, y in zip(la, lb)), f"scores after step {step}"
