"""Engine test helpers: tiny real models, a paged mock model, and the trainer-side replay."""

from __future__ import annotations

import math
from types import SimpleNamespace

import miles_kernels as mk
import pytest
import torch

from miles_fsdp.engine import Engine, EngineConfig


class PagedMockModel(torch.nn.Module):
    """A model that really goes through the paged cache, in plain Python.

    K stores token ids, V stores position + 1. Each query reads its sequence's KV through
    the block table and checks the positions, so a wrong slot, table or kv_len raises
    instead of silently giving other logits. The hidden state of position p is a hash of
    tokens[0..p]; logits are a fixed function of it. `reference_hidden` is the same hash
    computed from a plain token list, with no cache at all.
    """

    def __init__(self, vocab: int = 48, max_len: int = 512):
        super().__init__()
        self.args = SimpleNamespace(n_layers=1, n_kv_heads=1, head_dim=1, vocab_size=vocab,
                                    max_position_embeddings=max_len)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.forward_tokens = 0

    @staticmethod
    def reference_hidden(tokens: list[int]) -> float:
        return float(sum((t + 1) * (j % 7 + 1) for j, t in enumerate(tokens)) % 997)

    def forward(self, ids_T, pos_T, meta, slot_T, kv_caches):
        k, v = kv_caches[0]
        S = k.shape[1]
        k.view(-1).index_copy_(0, slot_T, ids_T.float())
        v.view(-1).index_copy_(0, slot_T, pos_T.float() + 1)
        cu, kv_lens = meta.cu_seqlens_q.tolist(), meta.kv_lens.tolist()
        hidden = torch.empty(ids_T.shape[0], 1)
        for b, L in enumerate(kv_lens):
            pages = meta.block_table[b, : math.ceil(L / S)].long()
            toks = k[pages].reshape(-1)[:L].long().tolist()
            if v[pages].reshape(-1)[:L].tolist() != [float(i + 1) for i in range(L)]:
                raise AssertionError(f"sequence {b}: KV positions are not 0..{L - 1}: paging is broken")
            q = cu[b + 1] - cu[b]
            for i in range(q):
                hidden[cu[b] + i, 0] = self.reference_hidden(toks[: L - q + i + 1])
        self.forward_tokens += ids_T.shape[0]
        return hidden

    def logits(self, hidden_T1):
        v_V = torch.arange(1, self.args.vocab_size + 1, dtype=torch.float32)
        return torch.sin(hidden_T1.float() * v_V * 0.7) * 4.0

    def reference_logits(self, tokens: list[int]) -> torch.Tensor:
        return self.logits(torch.tensor([[self.reference_hidden(tokens)]]))


def mock_engine(num_pages: int = 64, page_size: int = 16, graphs: bool = False, **cfg) -> tuple[Engine, PagedMockModel]:
    """graphs: decode on the CUDA-graph path without capture (graph_layout), overlap scheduling on."""
    model = PagedMockModel()
    config = EngineConfig(page_size=page_size, num_pages=num_pages, **{"max_prefill_tokens": 64, **cfg})
    eng = Engine(model, config=config, eos_token_ids=[])
    return (graph_layout(eng) if graphs else eng), model


def finish_all(eng: Engine) -> dict:
    """Step `eng` until nothing is unfinished; {(request_id, sample_index): Result} of every
    sample that finished meanwhile."""
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[(out.request_id, out.sample_index)] = out.result
    return done


GRID = [(t, k, p) for t in (0.0, 0.6, 1.0, 1.3) for k in (0, 1, 20) for p in (1.0, 0.9)]


def grid_requests(n_req: int, seed: int, stops, new) -> list:
    """Requests over GRID: random prompts (every third with a shared 40-token prefix), n of
    1-3, stop_token_ids stops(i), max_new_tokens new(i), seed 100 + i."""
    from miles_fsdp.engine import Request, SamplingParams

    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(0, 256, (40,), generator=g).tolist()
    reqs = []
    for i in range(n_req):
        t, k, p = GRID[(i * 5) % len(GRID)]
        prompt = torch.randint(0, 256, (int(torch.randint(3, 60, (1,), generator=g)),), generator=g).tolist()
        if i % 3 == 0:
            prompt = shared + prompt[:8]  # prefix-cache hits
        reqs.append(Request(prompt, SamplingParams(n=1 + i % 3, temperature=t, top_k=k, top_p=p,
                                                   max_new_tokens=new(i), seed=100 + i, stop_token_ids=stops(i))))
    return reqs


def graph_layout(eng: Engine) -> Engine:
    """Decode steps take the CUDA-graph path (static buffers, padding, device-side input ids
    under overlap scheduling) without capture, so that it runs on CPU."""
    eng.runner.use_graphs, eng.runner.graph_capture = True, False
    eng.runner.allocate(eng.num_pages)
    return eng


def count_overlapped(eng: Engine) -> list[int]:
    """Wrap eng.runner.launch; the returned list grows by one per step launched with its
    input ids on the device (overlap scheduling)."""
    calls, launch = [], eng.runner.launch
    eng.runner.launch = lambda batch, prev=None: (calls.append(1) if prev is not None else None) or launch(batch, prev)
    return calls


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    from miles_fsdp.models.testing import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("engine_ckpts")
    return {arch: build_tiny_checkpoint(root / arch, arch, seed=3) for arch in ("qwen3", "qwen3_moe")}


def load_tiny(path, dtype=torch.float32):
    from miles_fsdp.models import load_model

    return load_model(path, dtype).eval()


@torch.no_grad()
def trainer_logprobs(model, prompt: list[int], completion: list[int], params) -> torch.Tensor:
    """What the trainer recomputes: one full-sequence forward over prompt + completion."""
    full = prompt + completion
    cu = torch.tensor([0, len(full)], dtype=torch.int32)
    meta, slot_T, _ = mk.varlen_meta(cu, mk.ATTN_BLOCK)
    hidden_TD = model.forward(torch.tensor(full), mk.positions_from_cu_seqlens(cu), meta, slot_T)
    logits_TV = model.logits(hidden_TD)[len(prompt) - 1 : -1]
    temp = params.temperature if params.temperature > 0 else 1.0
    logp_T, _ = mk.logprobs(logits_TV, torch.tensor(completion), temp, top_k=params.top_k, top_p=params.top_p)
    return logp_T
