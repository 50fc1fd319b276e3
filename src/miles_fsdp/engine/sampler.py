"""Gumbel-max sampling with counter-based noise, and the logprob of what was sampled.

token = argmax(filter(logits / T) + g), g = -log(-log(u)), u = hash(seed, sample index,
position, token id) mapped to (0, 1) as (23 hash bits + 0.5) / 2**23: exact in fp32 and
never 1, so g is always finite. (With 24 bits, 2**24 - 0.5 rounded to 2**24, u to 1 and g to
+inf: that token won whatever its probability, and a masked one gave -inf + inf = nan.)
The noise is a pure function of those four integers, computed on device with int64 ops kept to
32 bits (every product < 2**63, no overflow), so a sample depends neither on the batch nor on
the device's RNG state: any sample can be
replayed from (seed, sample index). argmax over filter(logits / T) + Gumbel noise is an exact
draw from softmax(filter(logits / T)); `filter` is mk.filter_logits, the top-k/top-p mask
that mk.logprobs applies too. So the recorded logprob, mk.logprobs(logits, id, T, top_k,
top_p), is the log-probability of the token under the distribution it was drawn from.

Temperature 0 is greedy argmax; its logprob is recorded at temperature 1 (same filter).

On CUDA the noise comes from one fused Triton kernel (`_gumbel_kernel`) instead of ~20
int64 passes over [B, V]: the hash is the same int64 arithmetic, so it is exact; the two
logs use Triton's tl.log (libdevice's logf on CUDA), which the first use checks against
torch.log on every one of the 2**23 possible u values: the few that differ (one on an H200
with CUDA 13) get torch's value from a table in the kernel; were there many, the kernel
returns u and torch takes the logs. Where the logs stay in the kernel the argmax kernel
makes the noise itself. Either way the noise is bit-for-bit what `gumbel_noise` computes.
That kernel ranks each chunk by a fast approximation first (SCREEN: two lg2.approx, within
NOISE_BOUND of the exact noise at every u, which a GPU test checks): where one token leads the
rest by more than that error it is the exact argmax, and only its exact logs are taken; near
ties take every token's exact logs. The same token and value either way, with two one-
instruction logs a token in place of two libdevice polynomials. Filtered rows (top-k / top-p)
go through the same kernel, their -inf kept.
One step does one host<->device round trip: row parameters in (one copy), (ids, logprob
bits) out (one copy, waited on only by Sampled.wait(), so the engine can launch its next
step first).
"""

from __future__ import annotations

from typing import NamedTuple

import miles_kernels as mk
import numpy as np
import torch

_M32 = 0xFFFFFFFF

try:  # pragma: no cover - depends on the install
    import triton
    import triton.language as tl

    from miles_kernels._triton.launch import fast_launch
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:

    @triton.jit
    def _low32(x):  # x & 0xFFFFFFFF for x >= 0 (every value here is), without a uint32 constant
        return x - ((x >> 32) << 32)

    @triton.jit
    def _mix32_tl(x):  # _mix32, op for op, in int64
        x = _low32(x)
        x = x ^ (x >> 16)
        x = _low32(x * 0x7FEB352D)
        x = x ^ (x >> 15)
        x = _low32(x * 0x2C1B3C6D)
        return x ^ (x >> 16)

    @triton.jit
    def _mix32_u32(x):  # _mix32 on uint32 lanes (the per-token hash: int64 products cost 3-4x)
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D  # wraps mod 2**32, as _mix32's mask does
        x = x ^ (x >> 15)
        x = x * 0x2C1B3C6D
        return x ^ (x >> 16)

    @triton.jit
    def _hash_k(keys_ptr, key_stride, row, tok):
        """The 23 hash bits of (row's keys, tok) that _noise maps to u."""
        seed = tl.load(keys_ptr + row).to(tl.int64)
        stream = tl.load(keys_ptr + key_stride + row).to(tl.int64)
        pos = tl.load(keys_ptr + 2 * key_stride + row).to(tl.int64)
        h = _mix32_tl(_mix32_tl(_mix32_tl(seed) ^ stream) ^ pos)
        return (_mix32_u32((h ^ tok.to(tl.int64)).to(tl.uint32)) >> 9).to(tl.int32)  # h < 2**32, tok < 2**31

    @triton.jit
    def _noise(keys_ptr, key_stride, row, tok, fix_k_ptr, fix_v_ptr, LOGS: tl.constexpr, NFIX: tl.constexpr):
        """gumbel_noise's value at (row, tok) (LOGS), or its u (not LOGS: torch takes the logs)."""
        k = _hash_k(keys_ptr, key_stride, row, tok)
        u = (k.to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        if LOGS:
            u = -tl.log(-tl.log(u))
            for j in tl.static_range(NFIX):  # the few u whose logs differ from torch's: torch's value
                u = tl.where(k == tl.load(fix_k_ptr + j), tl.load(fix_v_ptr + j), u)
        return u

    @fast_launch
    @triton.jit
    def _gumbel_kernel(keys_ptr, key_stride, out_ptr, V, fix_k_ptr, fix_v_ptr, BLOCK: tl.constexpr,
                       LOGS: tl.constexpr, NFIX: tl.constexpr):
        row = tl.program_id(0)
        tok = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        u = _noise(keys_ptr, key_stride, row, tok, fix_k_ptr, fix_v_ptr, LOGS, NFIX)
        tl.store(out_ptr + row.to(tl.int64) * V + tok, u, mask=tok < V)

    @fast_launch
    @triton.jit
    def _logs_kernel(u_ptr, out_ptr, N, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        u = tl.load(u_ptr + i, mask=i < N, other=0.5)
        tl.store(out_ptr + i, -tl.log(-tl.log(u)), mask=i < N)

    @triton.jit
    def _lg2(x, ASM: tl.constexpr):
        """log2: the GPU's one-instruction approximation (ASM), else tl.log2 (the interpreter)."""
        if ASM:
            return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        return tl.log2(x)

    @triton.jit
    def _fast_noise(k, ASM: tl.constexpr):
        """-log(-log(u)), u = (k + 0.5) / 2**23, within NOISE_BOUND of _noise's value: two fast
        logs; from u = 0.75 on, -log(u) = 2 atanh(w / (2 - w)) by its series in w = 1 - u (exact),
        where the log of u would cancel."""
        kf = k.to(tl.float32)
        u = (kf + 0.5) * (1.0 / 8388608.0)
        w = (8388607.5 - kf) * (1.0 / 8388608.0)
        s = w / (2.0 - w)
        s2 = s * s
        series = 2.0 * s * (1.0 + s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0)))))
        t = tl.where(w < 0.25, series, _lg2(u, ASM) * -0.6931471805599453)
        return _lg2(t, ASM) * -0.6931471805599453

    @fast_launch
    @triton.jit
    def _fast_noise_kernel(k_ptr, out_ptr, N, BLOCK: tl.constexpr, ASM: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        k = tl.load(k_ptr + i, mask=i < N, other=0)
        tl.store(out_ptr + i, _fast_noise(k, ASM), mask=i < N)

    @triton.jit
    def _chunk_argmax(x, mask, n_ptr, key_stride, row, tok, V, fix_k_ptr, fix_v_ptr, NEG: tl.constexpr,
                      KEYS: tl.constexpr, NFIX: tl.constexpr):
        """(max, first index) of the chunk's x + n (NEG: x - n), masked tokens -inf."""
        if KEYS:
            n = _noise(n_ptr, key_stride, row, tok, fix_k_ptr, fix_v_ptr, True, NFIX)
        else:
            n = tl.load(n_ptr + row * V + tok, mask=mask, other=0.0)
        z = tl.where(mask, x - n if NEG else x + n, float("-inf"))
        return tl.max(z, 0), tl.argmax(z, 0, tie_break_left=True)

    @fast_launch
    @triton.jit
    def _noisy_argmax_kernel(x_ptr, n_ptr, max_ptr, idx_ptr, V, stride_x, n_chunks, key_stride, fix_k_ptr, fix_v_ptr,
                             scale, NEG: tl.constexpr, CHUNK: tl.constexpr, KEYS: tl.constexpr, NFIX: tl.constexpr,
                             SCREEN: tl.constexpr, ASM: tl.constexpr, BOUND: tl.constexpr, SCALED: tl.constexpr):
        """Per (row, chunk of V): max and first index of x + n (NEG: x - n), x cast to fp32; n read
        from n_ptr, or with KEYS computed here from the row keys at n_ptr (gumbel_noise's value).
        SCREEN (with KEYS): the chunk's z = x + n with _fast_noise first; where one token leads
        all others by more than the noise's and the sums' error, it is the exact argmax, and only
        its exact n is computed; otherwise (and for a chunk of -inf only, token 0) as without.
        SCALED: x is the logit times `scale` (fp32, one rounding: torch's CUDA x / T), launched
        without FMA contraction so x * scale + n rounds twice, as torch's two ops do."""
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        tok = c * CHUNK + tl.arange(0, CHUNK)
        mask = tok < V
        x = tl.load(x_ptr + row * stride_x + tok, mask=mask, other=0.0).to(tl.float32)
        if SCALED:
            x = x * scale
        if KEYS and SCREEN:  # |z~ - z| <= BOUND + 2**-22 |z|: a lead of 2 BOUND + 2**-18 (|m| + 1) is safe
            zf = tl.where(mask, x + _fast_noise(_hash_k(n_ptr, key_stride, row, tok), ASM), float("-inf"))
            best = tl.max(zf, 0)
            i = tl.argmax(zf, 0, tie_break_left=True)
            near = tl.sum((zf >= best - (2.0 * BOUND + (tl.abs(best) + 1.0) * 3.814697265625e-06)).to(tl.int32), 0)
            if (best > float("-inf")) & (near == 1):
                t1 = c * CHUNK + i
                x1 = tl.load(x_ptr + row * stride_x + t1).to(tl.float32)
                if SCALED:
                    x1 = x1 * scale
                best = x1 + _noise(n_ptr, key_stride, row, t1, fix_k_ptr, fix_v_ptr, True, NFIX)
            elif near > 1:
                best, i = _chunk_argmax(x, mask, n_ptr, key_stride, row, tok, V, fix_k_ptr, fix_v_ptr, NEG, KEYS, NFIX)
        else:
            best, i = _chunk_argmax(x, mask, n_ptr, key_stride, row, tok, V, fix_k_ptr, fix_v_ptr, NEG, KEYS, NFIX)
        tl.store(max_ptr + row * n_chunks + c, best)
        tl.store(idx_ptr + row * n_chunks + c, c * CHUNK + i)

    @fast_launch
    @triton.jit
    def _argmax_merge_kernel(max_ptr, idx_ptr, out_ptr, n_chunks, BLOCK: tl.constexpr):
        """Per row: the first chunk holding the row's max (chunks in token order), its index."""
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        m = tl.load(max_ptr + row * n_chunks + c, mask=c < n_chunks, other=float("-inf"))
        best = tl.argmax(m, 0, tie_break_left=True)
        tl.store(out_ptr + row, tl.load(idx_ptr + row * n_chunks + best).to(tl.int64))

_FUSED_LOGS: dict[torch.device, tuple[torch.Tensor, torch.Tensor] | None] = {}
_ARGMAX_CHUNK = 4096  # tokens per program of the noisy argmax: ~38 programs a row at a 151,936 vocab
# The noisy argmax ranks a chunk by fast logs first and takes the exact logs of its winner only
# (same token, same value: see _noisy_argmax_kernel); False: the exact logs of every token.
SCREEN = True
# |_fast_noise - gumbel_noise| never exceeds this: the GPU test checks all 2**23 u (~1e-6 there).
NOISE_BOUND = 2.0**-14
LOG_FIXES_MAX = 16  # more u values than this where the kernel's logs differ: torch takes the logs


def _log_fixes(dev: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Where the kernel's -log(-log(u)) differs from torch's over all 2**23 possible u (Triton's
    logf vs the one torch was built with: one value of 2**23 on an H200 with CUDA 13): (their
    23-bit k, int64 [n]; torch's noise there, fp32 [n]), which the kernel substitutes; None if
    more than LOG_FIXES_MAX differ (then torch's ops take the logs)."""
    if dev not in _FUSED_LOGS:
        u = uniform_from_bits(torch.arange(1 << 23, device=dev))
        want = -torch.log(-torch.log(u))
        got = torch.empty_like(u)
        _logs_kernel[(triton.cdiv(u.numel(), 4096),)](u, got, u.numel(), BLOCK=4096)
        bad = torch.nonzero(want.view(torch.int32) != got.view(torch.int32)).flatten()
        _FUSED_LOGS[dev] = (bad, want[bad].contiguous()) if bad.numel() <= LOG_FIXES_MAX else None
    return _FUSED_LOGS[dev]


def _fix_table(fixes, dummy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(fix k, fix values, their number) for the kernels; no table: any valid pointers, never read."""
    n = 0 if fixes is None else len(fixes[0])
    return (*(fixes if n else (dummy, dummy)), n)


def _launch_gumbel(keys_3B: torch.Tensor, out_BV: torch.Tensor, block: int) -> bool:
    """Fill out_BV with the noise of gumbel_noise (True) or, where the kernel's logs cannot be
    made torch's, with u for torch's ops to take the logs of (False)."""
    B, V = out_BV.shape
    fixes = _log_fixes(out_BV.device)
    fix_k, fix_v, n = _fix_table(fixes, out_BV)
    _gumbel_kernel[(B, triton.cdiv(V, block))](keys_3B, B, out_BV, V, fix_k, fix_v, BLOCK=block,
                                               LOGS=fixes is not None, NFIX=n)
    return fixes is not None


def fast_noise(k_N: torch.Tensor) -> torch.Tensor:
    """The screen's approximate noise (_fast_noise) at 23-bit values k, fp32 [N]: the tests hold it
    to NOISE_BOUND of gumbel_noise's value -log(-log(uniform_from_bits(k)))."""
    k = k_N.to(torch.int32).contiguous()
    out = torch.empty(k.shape, dtype=torch.float32, device=k.device)
    _fast_noise_kernel[(triton.cdiv(k.numel(), 4096),)](k, out, k.numel(), BLOCK=4096, ASM=k.is_cuda)
    return out


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # lowbias32-style finalizer: a bijection on 32-bit ints; multipliers < 2**31 keep int64 exact
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def gumbel_noise(seed_B: torch.Tensor, stream_B: torch.Tensor, pos_B: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise, fp32 [B, vocab], a pure function of (seed, stream, position, token id)."""
    if seed_B.is_cuda and triton is not None:
        B, block, dev = seed_B.shape[0], 2048, seed_B.device
        out_BV = torch.empty(B, vocab, dtype=torch.float32, device=dev)
        if B:
            keys_3B = torch.stack([seed_B.long(), stream_B.long(), pos_B.long()])
            if not _launch_gumbel(keys_3B, out_BV, block):  # same ops as gumbel_noise_torch, in place
                out_BV.log_().neg_().log_().neg_()
        return out_BV
    h_B = _mix32(_mix32(_mix32(seed_B.long()) ^ stream_B.long()) ^ pos_B.long())
    return gumbel_noise_torch(h_B, vocab)


def temperature_scale(temperature: float, device: torch.device) -> np.float32:
    """What torch multiplies or divides by in `logits / temperature`: a CUDA tensor by a Python
    float is a * fp32(1 / fp32(b)) (BinaryDivTrueKernel.cu), a CPU one a true division by b."""
    t = np.float32(temperature)
    return np.float32(1.0) / t if device.type == "cuda" else t


def gumbel_argmax(logits_BV: torch.Tensor, temp: float, seed_B, stream_B, pos_B,
                  out_B: torch.Tensor | None = None) -> torch.Tensor:
    """argmax(logits / temp + gumbel_noise(...)) per row, bit for bit as the torch ops compute
    it, in two launches (chunk maxima with the noise made in the kernel, merge) instead of a
    pass per op: CUDA only.
    The division is torch's (x times the fp32 reciprocal, one rounding), skipped at temp 1
    where it is exact; the noise is gumbel_noise's; where the fused logs do not match torch's,
    torch's ops leave t = log(-log(u)) and the kernel adds -t (x - t == x + (-t) exactly);
    ties go to the first index, as torch's argmax. No NaN handling: logits must be finite or -inf.
    seed_B, stream_B, pos_B: int64 rows, taken as they are where they are the rows of one
    contiguous [3, B] tensor (no stack). out_B: int64 [B] to write the ids into (else a new one)."""
    B, V = logits_BV.shape
    dev = logits_BV.device
    x = logits_BV if logits_BV.stride(-1) == 1 else logits_BV.contiguous()
    keys_3B = _key_rows(seed_B, stream_B, pos_B)
    fixes = _log_fixes(dev)
    if fixes is not None:  # the noise made inside the argmax kernel: no [B, V] noise in memory
        return noisy_argmax(x, keys_3B, neg=False, fixes=fixes, out=out_B, temp=temp)
    x = x if temp == 1.0 else x.float() / temp
    noise = torch.empty(B, V, dtype=torch.float32, device=dev)
    _launch_gumbel(keys_3B, noise, 2048)
    noise.log_().neg_().log_()  # t = log(-log(u)): the noise is -t
    return noisy_argmax(x, noise, neg=True, out=out_B)


def _key_rows(seed_B: torch.Tensor, stream_B: torch.Tensor, pos_B: torch.Tensor) -> torch.Tensor:
    """The [3, B] int64 keys: a view where the three rows lie one after another in memory (the
    rows of one [3, B] or [4, B] tensor, as sample_launch passes them), else a stacked copy."""
    B = seed_B.shape[0]
    rows = (seed_B, stream_B, pos_B)
    store = seed_B.untyped_storage().data_ptr()
    if (all(r.dtype == torch.int64 and r.dim() == 1 and r.shape[0] == B and (B < 2 or r.stride(0) == 1)
            and r.untyped_storage().data_ptr() == store for r in rows)  # one tensor's rows, not neighbours
            and [r.data_ptr() for r in rows] == [seed_B.data_ptr() + i * B * 8 for i in range(3)]):
        return seed_B.as_strided((3, B), (B, 1))
    return torch.stack([seed_B.long(), stream_B.long(), pos_B.long()])


def noisy_argmax(x_BV: torch.Tensor, noise_BV: torch.Tensor, neg: bool, chunk: int = 0,
                 fixes: tuple[torch.Tensor, torch.Tensor] | None = None, out: torch.Tensor | None = None,
                 temp: float = 1.0) -> torch.Tensor:
    """(x + noise).argmax(-1) (neg: x - noise), x cast to fp32, noise fp32 contiguous; in two
    launches: each chunk's max and first index, then the first chunk holding the row's max.
    With `fixes` (_log_fixes' table) noise_BV is instead the [3, B] row keys, and the kernel
    makes gumbel_noise's values itself; then temp != 1 takes x as torch's x.float() / temp on
    the device (x times fp32(1 / fp32(temp)) on CUDA, true division on the CPU), in the kernel."""
    B, V = x_BV.shape
    chunk = chunk or _ARGMAX_CHUNK
    chunks = triton.cdiv(V, chunk)
    maxes = torch.empty(B, chunks, dtype=torch.float32, device=x_BV.device)
    idx = torch.empty(B, chunks, dtype=torch.int32, device=x_BV.device)
    out = torch.empty(B, dtype=torch.int64, device=x_BV.device) if out is None else out
    fix_k, fix_v, n = _fix_table(fixes, maxes)
    scaled = temp != 1.0
    if scaled and fixes is None:
        raise ValueError("noisy_argmax: a temperature needs the noise made in the kernel (fixes)")
    if scaled and not x_BV.is_cuda:  # the interpreter: torch's CPU x / T is a true division
        x_BV, scaled = x_BV.float() / temp, False
    _noisy_argmax_kernel[(B, chunks)](x_BV, noise_BV, maxes, idx, V, x_BV.stride(0), chunks, B, fix_k, fix_v,
                                      float(temperature_scale(temp, x_BV.device)) if scaled else 1.0, NEG=neg,
                                      CHUNK=chunk, KEYS=fixes is not None, NFIX=n, SCREEN=SCREEN, ASM=x_BV.is_cuda,
                                      BOUND=NOISE_BOUND, SCALED=scaled, num_warps=8, enable_fp_fusion=not scaled)
    _argmax_merge_kernel[(B,)](maxes, idx, out, chunks, BLOCK=max(16, triton.next_power_of_2(chunks)))
    return out


def gumbel_noise_torch(h_B: torch.Tensor, vocab: int) -> torch.Tensor:
    """The reference: the same noise in plain torch int64 ops, from the mixed row keys h_B."""
    tok_V = torch.arange(vocab, device=h_B.device, dtype=torch.int64)
    h_BV = _mix32(h_B[:, None] ^ tok_V[None, :])  # distinct per token within a row
    return -torch.log(-torch.log(uniform_from_bits(h_BV >> 9)))


def uniform_from_bits(k: torch.Tensor) -> torch.Tensor:
    """23-bit integers k -> fp32 (k + 0.5) / 2**23: exact, distinct, strictly inside (0, 1)."""
    return (k.float() + 0.5) * (1.0 / (1 << 23))


class RowParams(NamedTuple):
    """Sampling parameters of one logits row (a tuple: one is built per row per step)."""

    temperature: float
    top_k: int
    top_p: float
    seed: int
    stream: int  # sample index within the request
    position: int  # position the sampled token will take


def _to_device(host: torch.Tensor, dev: torch.device) -> torch.Tensor:
    if dev.type != "cuda":
        return host
    return host.pin_memory().to(dev, non_blocking=True)


class Sampled:
    """A launched sample: (ids, logprob bits) on the device and their copy to the host in
    flight; wait() blocks on that copy only and returns (token ids, fp32 logprobs)."""

    __slots__ = ("dev_2B", "host_2B", "event", "_out")

    def __init__(self, dev_2B: torch.Tensor):
        self.dev_2B, self.event, self._out = dev_2B, None, None
        if dev_2B.is_cuda:
            self.host_2B = torch.empty(dev_2B.shape, dtype=dev_2B.dtype, pin_memory=True)
            self.host_2B.copy_(dev_2B, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host_2B = dev_2B

    @property
    def ids(self) -> torch.Tensor:
        """The sampled ids, int64 [B], on the device (the next step's inputs under overlap)."""
        return self.dev_2B[0]

    def wait(self) -> tuple[list[int], list[float]]:
        if self._out is None:
            if self.event is not None:
                self.event.synchronize()
            out = self.host_2B
            self._out = out[0].tolist(), out[1].to(torch.int32).view(torch.float32).tolist()
        return self._out


def sample(logits_BV: torch.Tensor, rows: list[RowParams]) -> tuple[list[int], list[float]]:
    """Sample one token per row; returns (token ids, fp32 logprobs as Python floats).
    sample_launch(...).wait(): see there."""
    return sample_launch(logits_BV, rows).wait()


def sample_launch(logits_BV: torch.Tensor, rows: list[RowParams]) -> Sampled:
    """Launch the sampling of one token per row; the result's wait() gives (token ids, fp32
    logprobs as Python floats).

    Rows are grouped by (temperature, top_k, top_p); every row's result depends only on
    its own logits and keys. One copy in (the keys and group indices of all rows), one
    copy out (ids and logprob bits), so one sync per call, in wait().
    """
    B, V = logits_BV.shape
    dev = logits_BV.device
    groups: dict[tuple[float, int, float], list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault((r.temperature, r.top_k, r.top_p), []).append(i)
    # one host tensor: [seed, stream, position] of every row, then each group's row indices
    order = [i for idx in groups.values() for i in idx]
    host = torch.tensor([[r.seed for r in rows], [r.stream for r in rows], [r.position for r in rows], order]
                        if B else [[], [], [], []], dtype=torch.int64)
    keys_4B = _to_device(host, dev)
    out_2B = torch.empty(2, B, dtype=torch.int64, device=dev)  # ids, logprob fp32 bits
    off = 0
    for (temp, top_k, top_p), idx in groups.items():
        G = len(idx)
        whole = G == B  # one group covers the batch: no gather / scatter
        idx_G = None if whole else keys_4B[3, off : off + G]
        logits_GV = logits_BV if whole else logits_BV.index_select(0, idx_G)
        if temp == 0.0:
            chosen_G = logits_GV.argmax(-1)
            lp_G, _ = mk.logprobs(logits_GV, chosen_G, 1.0, top_k=top_k, top_p=top_p)
        else:
            k3 = keys_4B[:3] if whole else keys_4B[:3].index_select(1, idx_G)
            filtered = bool(top_k or top_p < 1.0)
            if filtered:
                x_GV = mk.filter_logits(logits_GV.float() / temp, top_k, top_p)
            if logits_GV.is_cuda and triton is not None:  # argmax(x + noise) in two launches
                into = out_2B[0] if whole else None  # the ids straight into the copied-out buffer
                chosen_G = gumbel_argmax(x_GV if filtered else logits_GV, 1.0 if filtered else temp, *k3, out_B=into)
            else:
                x = x_GV if filtered else mk.filter_logits(logits_GV.float() / temp, top_k, top_p)
                chosen_G = (x + gumbel_noise(k3[0], k3[1], k3[2], V)).argmax(-1)
            if filtered:
                # mk.logprobs(logits, chosen, temp, top_k, top_p) filters logits / temp exactly as
                # above, then takes log_softmax at T = 1: start from x_GV, not filter twice
                lp_G, _ = mk.logprobs(x_GV, chosen_G, 1.0)
            else:  # unfiltered, the kernel divides by T itself (as the trainer's call does)
                lp_G, _ = mk.logprobs(logits_GV, chosen_G, temp)
        bits_G = lp_G.float().view(torch.int32)  # widened to int64 by the copy
        if whole:
            if chosen_G.data_ptr() != out_2B[0].data_ptr():
                out_2B[0].copy_(chosen_G)
            out_2B[1].copy_(bits_G)
        else:
            out_2B[0].index_copy_(0, idx_G, chosen_G)
            out_2B[1].index_copy_(0, idx_G, bits_G.long())
        off += G
    return Sampled(out_2B)
