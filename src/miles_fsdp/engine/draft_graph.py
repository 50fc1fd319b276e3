"""The drafter's work after a decode (verify) step, replayed from one CUDA graph per batch
bucket: the teacher-forced entries of the newly committed positions and the K-token draft
chain, with one host-to-device copy in and one device-to-host copy out.

For sequence b, committed up to position n (num_tokens = n + 1) after a verify that started
at p0 and accepted j draft tokens (n = p0 + j + 1), with R = 1 + K rows per sequence:

    teacher-forced  rows b*R + i, i = 0..R-1: entry s = p0 + 1 + i from (H_{s-1}, x_s); rows
                    i <= j are real (their draft KV goes to the sequence's pages), the rest
                    padding (scratch page 0; after the real rows, so causal attention keeps
                    them out). kv_len p0 + 1 + R puts row i at position p0 + 1 + i.
    chain           g = the output at row b*R + j (entry n); K times: draft token d drawn
                    by `draw` (the sampler's rule: greedy at T = 0, else the Gumbel-max of
                    logits / T, top-k 1 keeping ties at the maximum); then module 0 on (g, d)
                    at d's position gives the next g.

The draft here samples without a top-k > 1 / top-p filter (a selection over the vocabulary
is data-dependent work a graph cannot hold): it can propose a token outside the target's
nucleus, which the target then rejects. Proposals only decide which positions a verify
checks, never an output token or log-prob, so this costs acceptance, not exactness. Positions past a sequence's pages
read and write the scratch page (their draft tokens are dropped by the caller).
`capture=False` runs the same function on the same buffers without a graph (CPU tests).
"""

from __future__ import annotations

import miles_kernels as mk
import numpy as np
import torch

from miles_fsdp.engine.cuda_graph import batch_buckets
from miles_fsdp.engine.sampler import gumbel_noise, temperature_scale
from miles_fsdp.graph_capture import capture_graph

# per-sequence int64 fields after the N = B * R row fields (ids, pos, slot, hidden row)
_SEQ_FIELDS = ("kv_lens", "last", "num_tokens", "seed", "stream", "mode", "scale_bits")
SAMPLE, GREEDY, TOP1 = 0, 1, 2  # per-sequence draw modes

# The sampler writes `logits / temperature`, so the graph multiplies by its reciprocal on CUDA
# and divides on the CPU (sampler.temperature_scale) to draw bitwise as it does.


def draw(logits_BV: torch.Tensor, mode_B: torch.Tensor, scale_B: torch.Tensor, noise_BV: torch.Tensor) -> torch.Tensor:
    """The sampler's choice for unfiltered or top-k 1 rows, per-row parameters as tensors:
    GREEDY argmax; else argmax(x + noise), x = logits / T (scale_B from temperature_scale),
    TOP1 keeping only x at its maximum (ties too, as filter_logits does)."""
    scale_B1 = scale_B[:, None]
    x_BV = logits_BV * scale_B1 if logits_BV.is_cuda else logits_BV / scale_B1
    x_BV = x_BV.masked_fill((mode_B[:, None] == TOP1) & (x_BV < x_BV.amax(-1, keepdim=True)), float("-inf"))
    return torch.where(mode_B[:, None] == GREEDY, logits_BV, x_BV + noise_BV).argmax(-1)


class DraftGraphs:
    def __init__(self, model, draft_kv, max_batch: int, k: int, max_pages: int, page_size: int,
                 device: torch.device, dtype: torch.dtype, capture: bool = True):
        self.model, self.draft_kv, self.k, self.R = model, draft_kv, k, k + 1
        self.S, self.P, self.device, self.capture = page_size, max_pages, device, capture
        self.buckets = batch_buckets(max_batch)
        B, N = self.buckets[-1], self.buckets[-1] * self.R
        self.table_at = 4 * N + len(_SEQ_FIELDS) * B  # the table comes last: a step uploads its first rows only
        self.n_int = self.table_at + B * max_pages
        pin = device.type == "cuda"
        self.host = torch.zeros(self.n_int, dtype=torch.int64, pin_memory=pin)
        self.dev = torch.zeros(self.n_int, dtype=torch.int64, device=device)
        self.np = self._views(self.host.numpy(), B)
        self.hidden_ND = torch.zeros(N, model.args.dim, dtype=dtype, device=device)
        self.cu = torch.arange(B + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.out: dict[int, torch.Tensor] = {}
        self.pool = None
        if capture:
            for bs in reversed(self.buckets):
                self._capture(bs)

    def _views(self, flat, B: int) -> dict:
        N = B * self.R
        v = {name: flat[i * N:(i + 1) * N] for i, name in enumerate(("ids", "pos", "slot", "rows"))}
        off = 4 * N
        for name in _SEQ_FIELDS:
            v[name], off = flat[off: off + B], off + B
        v["table"] = flat[off:].reshape(B, self.P)
        return v

    def fits(self, n: int) -> bool:
        return n <= self.buckets[-1]

    def fill(self, b: int, seq, p0: int, j: int, hidden_row: int, room: int) -> None:
        """Sequence b's inputs: verify start p0, j accepted, its hidden rows from hidden_row
        (H_{p0} .. H_{p0+j} in the runner's compact layout); `room` draft positions have pages."""
        h, R, S = self.np, self.R, self.S
        r, n = b * R, p0 + j + 1
        pages = seq.block_table
        h["ids"][r: r + j + 1] = seq.token_ids[p0 + 1: n + 1]
        h["pos"][r: r + R] = p0 + 1
        h["pos"][r: r + j + 1] = range(p0 + 1, n + 1)
        h["slot"][r: r + j + 1] = [pages[q // S] * S + q % S for q in range(p0 + 1, n + 1)]
        h["rows"][r: r + R] = hidden_row
        h["rows"][r: r + j + 1] = range(hidden_row, hidden_row + j + 1)
        h["kv_lens"][b], h["last"][b], h["num_tokens"][b] = p0 + 1 + R, r + j, n + 1
        p = seq.params
        mode = GREEDY if p.temperature == 0.0 else TOP1 if p.top_k == 1 else SAMPLE
        h["seed"][b], h["stream"][b], h["mode"][b] = seq.seed, seq.sample_index, mode
        h["scale_bits"][b] = temperature_scale(p.temperature or 1.0, self.device).view(np.int32)
        used = min(len(pages), -(-(n + 1 + room) // S), self.P)
        h["table"][b, :used] = pages[:used]

    def run(self, n: int, hidden_TD: torch.Tensor) -> list[list[int]]:
        """Draft tokens [n][K] of the n filled sequences; hidden_TD: the verify's hidden states."""
        bs = next(b for b in self.buckets if b >= n)
        self._pad(n, bs)
        end = self.table_at + bs * self.P
        self.dev[:end].copy_(self.host[:end], non_blocking=True)
        d, N = self._views(self.dev, self.buckets[-1]), bs * self.R
        torch.index_select(hidden_TD, 0, d["rows"][:N], out=self.hidden_ND[:N])
        if self.capture:
            self.graphs[bs].replay()
            out = self.out[bs]
        else:
            out = self._chain(bs)
        return out[:n].tolist()

    def clear(self, n: int) -> None:
        """Zero the row fields of sequences [0, n) before filling them (padding rows of a
        real sequence keep ids 0 and slot 0: the scratch page)."""
        h, N = self.np, n * self.R
        for name in ("ids", "slot"):
            h[name][:N] = 0
        h["table"][:n] = 0

    def _pad(self, n: int, bs: int) -> None:
        """Padding sequences [n, bs): every row on the scratch page, greedy, kv_len R."""
        h, R = self.np, self.R
        for name in ("ids", "pos", "slot", "rows"):
            h[name][n * R: bs * R] = 0
        h["kv_lens"][n:bs], h["last"][n:bs], h["num_tokens"][n:bs], h["mode"][n:bs] = R, 0, 0, GREEDY
        h["scale_bits"][n:bs] = np.float32(1.0).view(np.int32)
        h["table"][n:bs] = 0

    def _chain(self, bs: int) -> torch.Tensor:
        d, R, S, N = self._views(self.dev, self.buckets[-1]), self.R, self.S, bs * self.R
        table = d["table"][:bs].to(torch.int32)
        meta = mk.AttnMeta(self.cu[: bs + 1] * R, d["kv_lens"][:bs].to(torch.int32), table, max_q_len=R)
        g_ND = self.model.draft_forward(self.hidden_ND[:N], d["ids"][:N], d["pos"][:N], meta, d["slot"][:N],
                                        kv_cache=self.draft_kv)
        g_BD = g_ND.index_select(0, d["last"][:bs])
        n_B = d["num_tokens"][:bs]
        mode_B, scale_B = d["mode"][:bs], d["scale_bits"][:bs].to(torch.int32).view(torch.float32)
        seed_B, stream_B = d["seed"][:bs], d["stream"][:bs]
        toks = []
        for step in range(self.k):
            logits_BV = self.model.draft_logits(g_BD).float()
            noise_BV = gumbel_noise(seed_B, stream_B, n_B + step, logits_BV.shape[1])
            tok_B = draw(logits_BV, mode_B, scale_B, noise_BV)
            toks.append(tok_B)
            if step + 1 < self.k:  # module 0 on (g, d) at d's position
                p_B = n_B + step
                page_B = table.gather(1, (p_B // S)[:, None]).squeeze(1).long()
                meta1 = mk.AttnMeta(self.cu[: bs + 1], (p_B + 1).to(torch.int32), table, max_q_len=1)
                g_BD = self.model.draft_forward(g_BD, tok_B, p_B, meta1, page_B * S + p_B % S,
                                                kv_cache=self.draft_kv)
        return torch.stack(toks, 1)

    @torch.inference_mode()
    def _capture(self, bs: int) -> None:
        self._pad(0, bs)
        self.dev.copy_(self.host)
        self._chain(bs)  # warm-up: Triton compiles, the sampler's one-time log check runs
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with capture_graph(graph, pool=self.pool):
            self.out[bs] = self._chain(bs)
        self.pool = graph.pool()
        self.graphs[bs] = graph
        torch.cuda.synchronize()
