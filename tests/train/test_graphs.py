"""train/graphs.py on CPU: the padded bucket inputs the CUDA graphs replay, run eagerly
(capture=False), train like the plain trunk: the same log-probs and loss bits (padding is
its own sequence; the kernels are batch-invariant), weights within rounding (the weight
grads' sums see the zero padding rows). The capture itself is GPU-tested
(tests/gpu/test_trainer_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from miles_fsdp.models import ModelArgs, Transformer
from miles_fsdp.parallel import ParallelConfig
from miles_fsdp.train.draft import DraftConfig
import miles_kernels as mk
from miles_fsdp.models.transformer import TRAIN_PAGE_SIZE
from miles_fsdp.train.graphs import TrunkGraphs, fill_packing, padded_offsets
from miles_fsdp.train.loss import sft_loss
from miles_fsdp.train.optim import OptimConfig
from miles_fsdp.train.packing import TrainSeq
from miles_fsdp.train.trainer import Trainer, TrainerConfig

HF = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=256, hidden_size=64,
          intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
          max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
          num_nextn_predict_layers=1)


def test_padded_offsets():
    assert padded_offsets([0, 3, 10], 16, 8) == [0, 3, 10, 16, 16, 16, 16, 16, 16]  # one padding sequence
    assert padded_offsets([0, 256], 256, 8) == [0, 256] + [256] * 7  # full: zero-length ones only


@pytest.mark.parametrize("cu", [[0, 3, 10], [0, 256], [0, 40, 100, 137], [0, 0, 5, 5, 300], [0, 64, 128, 129]])
def test_fill_packing_is_varlen_meta(cu):
    """The bucket's kv_lens, block table and slots made by tensor ops (fill_packing, as on the GPU)
    equal varlen_meta's on the host, padded as the bucket pads them (zero-length sequences too)."""
    t_b = max(256, 1 << (cu[-1] - 1).bit_length())
    full = padded_offsets(cu, t_b, 8)
    meta, slot_want, _ = mk.varlen_meta(torch.tensor(full), TRAIN_PAGE_SIZE, "cpu")
    width = -(-t_b // TRAIN_PAGE_SIZE)
    kv_lens, table = torch.full((8,), -1, dtype=torch.int32), torch.full((8, width), -1, dtype=torch.int32)
    slot = torch.full((t_b,), -1, dtype=torch.int64)
    fill_packing(torch.tensor(full, dtype=torch.int32), kv_lens, table, slot, TRAIN_PAGE_SIZE)
    table_want = torch.zeros(8, width, dtype=torch.int32)
    table_want[:, : meta.block_table.shape[1]] = meta.block_table
    assert torch.equal(kv_lens, meta.kv_lens) and torch.equal(table, table_want) and torch.equal(slot, slot_want)


def _trainer(graphs: bool, dtype: str) -> Trainer:
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_hf(HF))
    model.init_weights(seed=0)
    t = Trainer(model, TrainerConfig(optim=OptimConfig(lr=1e-2), max_tokens_per_micro_batch=256,
                                     parallel=ParallelConfig(param_dtype=dtype)), draft=DraftConfig())
    if graphs:
        t.graphs = TrunkGraphs(t.model, t.device, 256, capture=False)
    return t


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_padded_buckets_train_like_the_plain_trunk(dtype, monkeypatch):
    g = torch.Generator().manual_seed(0)
    # two micro-batches, one bucket: 256 tokens exactly (no padding sequence), and 3 sequences
    # of 137 tokens (+ a padding sequence of 119)
    seqs = [TrainSeq(torch.randint(0, 256, (n,), generator=g).tolist(), [0] * 5 + [1] * (n - 5))
            for n in (256, 40, 60, 37)]
    plain, graphed = _trainer(False, dtype), _trainer(True, dtype)
    runs = []
    trunk = TrunkGraphs._trunk
    monkeypatch.setattr(TrunkGraphs, "_trunk", lambda self, b: runs.append(b.ids.shape[0]) or trunk(self, b))
    m_plain = plain.train_step(plain.pack(seqs), sft_loss)
    m_graph = graphed.train_step(graphed.pack(seqs), sft_loss)
    assert len(graphed.pack(seqs)) == 2 and runs == [256, 256]
    assert list(graphed.graphs.buckets) == [("invariant", 256, 8)]
    assert m_plain["train/loss"] == m_graph["train/loss"] and m_plain["draft/loss"] == m_graph["draft/loss"]
    assert m_graph["train/grad_norm"] == pytest.approx(m_plain["train/grad_norm"], rel=1e-4)
    for (k, a), b in zip(plain.model.state_dict().items(), graphed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
    assert all(s.numel() == 0 for s in graphed.local.shadows)  # capture=False: shadows still freed


def test_cuda_graphs_refused_where_they_cannot_run():
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_hf(HF))
    model.init_weights(seed=0)
    with pytest.raises(ValueError, match="cuda-graphs"):
        Trainer(model, TrainerConfig(cuda_graphs=True))
    assert Trainer(model, TrainerConfig()).graphs is None  # the default: on only where they can run


class _Replayer:
    """A stand-in for a captured CUDA graph: replay() runs the recorded function."""

    def __init__(self, fn):
        self.replay = fn


def _stand_in_record(self, bucket) -> None:
    """TrunkGraphs._record on the CPU: the forward and backward "graphs" run the trunk eagerly
    into the bucket's static output and the shared static grads, as the captured ones write them."""
    live = {}

    def fwd():
        # a graph captured earlier may keep its temporaries where the static grads now live (the
        # first bucket's forward: captured before the grads were allocated): any replay may rewrite them
        for static in self.grads or ():
            if static is not None:
                static.fill_(float("nan"))
        with torch.enable_grad():
            live["out"] = self._trunk(bucket)
        bucket.out.copy_(live["out"].detach())

    def bwd():
        grads = torch.autograd.grad(live.pop("out"), bucket.params, bucket.grad_out, allow_unused=True)
        for static, g in zip(self.grads, grads):
            if static is not None:
                static.copy_(g)

    with torch.enable_grad():
        out = self._trunk(bucket)
        probe = torch.autograd.grad(out, bucket.params, torch.zeros_like(out), allow_unused=True)
    bucket.out, bucket.grad_out = torch.empty_like(out), torch.empty_like(out)
    if self.grads is None:
        self.grads = tuple(None if g is None else torch.empty_like(g) for g in probe)
    bucket.grads = self.grads
    bucket.fwd, bucket.bwd = _Replayer(fwd), _Replayer(bwd)


# (budget, sequence lengths, micro-batches): one micro-batch a step; two; five over three
# buckets of 8 / 16 / 64 sequences (run_rl's steps: many micro-batches, the buckets interleaved)
LEND_CASES = [(512, (200, 40, 60, 37), 1), (256, (200, 40, 60, 37), 2),
              (512, (500, 200, 250) + (10,) * 20 + (300, 150) + (7,) * 40 + (480, 30), 5)]


@pytest.mark.parametrize("budget,lens,n_mb", LEND_CASES)
def test_lent_grads_train_the_bits_of_copies(budget, lens, n_mb, monkeypatch):
    """LEND_GRADS: the backward graph's static grads lent to .grad (copied by LocalParams only
    before the next backward replay rewrites them) train the bits of autograd's copies: one
    micro-batch a step, two (the second replay rewrites the first's grads), five in three
    buckets; the tied embedding (the lm_head's eager grad added to the lent one), the draft beside."""
    import miles_fsdp.train.graphs as graphs_mod

    monkeypatch.setattr(TrunkGraphs, "_record", _stand_in_record)
    g = torch.Generator().manual_seed(0)
    seqs = [TrainSeq(torch.randint(0, 256, (n,), generator=g).tolist(), [0] * 5 + [1] * (n - 5)) for n in lens]
    out = {}
    for lend in (False, True):
        monkeypatch.setattr(graphs_mod, "LEND_GRADS", lend)
        t = _trainer(True, "bf16")
        t.cfg.max_tokens_per_micro_batch = budget
        t.graphs = TrunkGraphs(t.model, t.device, budget, capture=False)
        t.graphs.capture = True  # the stand-in "captures"
        t.graphs.before_replay = t.local.own_grads
        t.local.keep_shadows = True
        metrics = [t.train_step(t.pack(seqs), sft_loss) for _ in range(2)]
        assert len(t.pack(seqs)) == n_mb and len(t.graphs.buckets) == (3 if n_mb == 5 else 1)
        out[lend] = ([{k: v for k, v in m.items() if not k.startswith(("perf/", "time/"))} for m in metrics],
                     {k: v.clone() for k, v in t.model.state_dict().items()})
    assert out[False][0] == out[True][0]
    for k, v in out[False][1].items():
        assert torch.equal(v, out[True][1][k]), f"{k}: lent grads trained other bits"
