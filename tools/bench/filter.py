"""Cost of the sampling filter (mk.filter_logits: top-k / top-p) and of mk.logprobs with it,
at the real vocabulary, for the engine's decode batch and the trainer's row chunk; beside the
peer, transformers' top-k / top-p warpers (torch.topk; torch.sort, softmax, cumsum) on the same rows.

    python tools/bench/filter.py --out filter.json
    python tools/bench/filter.py --cut-only --rows 64 512 --launch 16:4:8   # the cut at 16 warps, 4 chunks a step,
                                                                           # 8 programs a row
    python tools/bench/filter.py --cut-only --launch 32:2:1:3   # loads 2 steps ahead (3 stages)
    python tools/bench/filter.py --cut-only --logits lm    # rows shaped like an LM's (a head ~15 above the bulk)
    python tools/bench/filter.py --cut-only --logits lm --launch 16:4:1:1:1   # brackets snapped to tokens

--logits randn (default): N(0, 1) rows; lm: a bulk N(0, 2.5^2) and a head of 32 tokens at 15 +- 3, as an
LM's logits sit; the top-p search's passes follow the rows (its first bracket starts ~15 under the max),
so --cut-only prints the passes a row took.
"""

import argparse
import functools
import hashlib
import json

import torch
import triton.testing

import miles_kernels as mk
from miles_kernels._triton import cut, rows


def hf_filter(x: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The peer: transformers' TopKLogitsWarper then TopPLogitsWarper (sort, softmax, cumsum)."""
    if top_k:
        x = x.masked_fill(x < torch.topk(x, top_k)[0][..., -1, None], float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=False)
        remove = sorted_x.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[..., -1:] = False
        x = x.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--rows", type=int, nargs="+", default=[256, 4096])
    ap.add_argument("--launch", default=None, metavar="WARPS:UNROLL[:SPLIT[:STAGES[:SNAP]]]",
                    help="the top-p cut's launch at every row count (cut.CUT_LAUNCH; same bits): e.g. 16:4:8, "
                    "32:2:1:3, 16:4:1:1:1")
    ap.add_argument("--cut-only", action="store_true", help="time the top-p 0.9 and top-k 20 filters alone (a launch "
                    "sweep)")
    ap.add_argument("--logits", choices=("randn", "lm"), default="randn", help="the rows' shape (see the module)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if a.launch is not None:
        try:
            warps, unroll, *rest = (int(v) for v in a.launch.split(":"))
            if len(rest) > 3:
                raise ValueError
            split, stages, snap = rest + [1, 1, 0][len(rest):]  # the fields not given: 1, 1, 0
        except ValueError:
            raise SystemExit(f"filter.py: --launch {a.launch!r}: want WARPS:UNROLL[:SPLIT[:STAGES[:SNAP]]], "
                             "e.g. 16:4:8") from None
        if (warps not in (1, 2, 4, 8, 16, 32) or unroll < 1 or split < 1 or split & (split - 1) or stages < 1
                or snap not in (0, 1) or (snap and split != 1)):
            raise SystemExit(f"filter.py: --launch {a.launch!r}: warps a power of two up to 32, unroll >= 1, "
                             "split a power of two, stages >= 1, snap 0 or 1 (1 only with split 1)")
        cut.CUT_LAUNCH = ((0, warps, unroll, split, stages, snap),)
    if not torch.cuda.is_available():
        raise SystemExit("tools/bench/filter.py needs a CUDA device (the filter's kernels are Triton on CUDA)")
    res = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for B in a.rows:
        logits = torch.randn(B, a.vocab, generator=g, device="cuda")
        if a.logits == "lm":
            head = torch.randint(0, a.vocab, (B, 32), generator=g, device="cuda")
            logits = (logits * 2.5).scatter(1, head, 15 + 3 * torch.randn(B, 32, generator=g, device="cuda"))
        logits = logits.to(torch.bfloat16)
        ids = torch.randint(0, a.vocab, (B,), generator=g, device="cuda")
        for k, p in ((0, 0.9), (20, 1.0)) if a.cut_only else ((0, 1.0), (20, 1.0), (0, 0.9), (20, 0.9)):
            ms = functools.partial(triton.testing.do_bench, return_mode="median")
            f_ms = ms(lambda: mk.filter_logits(logits.float() / 0.7, k, p))
            if a.cut_only:  # the cut's digest: every launch must give the same bits
                floor = rows.filter_floor(logits.float() / 0.7, k, p)
                digest = hashlib.sha1(floor.cpu().numpy().tobytes()).hexdigest()[:12]
                passes_mean = None  # top-k by torch.topk, or the split launch (passes as launches): not counted
                if (p < 1.0 or rows.TOPK_BY_CUT) and cut._launch(B)[2] == 1:  # the passes one program a row took
                    passes = torch.zeros(B, dtype=torch.int32, device="cuda")
                    cut._floor(logits.float() / 0.7, p if p < 1.0 else k, p >= 1.0, passes)
                    passes_mean = passes.float().mean().item()
                res.append(dict(rows=B, top_k=k, top_p=p, filter_ms=f_ms, cut_sha1=digest, passes_mean=passes_mean))
                shown = "-" if passes_mean is None else f"{passes_mean:.2f}"
                print(f"rows {B:5d} top_k {k:2d} top_p {p:.1f} launch {a.launch or 'shipped'}: filter {f_ms:8.3f} ms  "
                      f"cut {digest}  passes {shown}", flush=True)
                continue
            l_ms = ms(lambda: mk.logprobs(logits, ids, 0.7, top_k=k, top_p=p))
            h_ms = ms(lambda: hf_filter(logits.float() / 0.7, k, p))
            res.append(dict(rows=B, top_k=k, top_p=p, filter_ms=f_ms, logprobs_ms=l_ms, hf_filter_ms=h_ms))
            print(f"rows {B:5d} top_k {k:2d} top_p {p:.1f}: filter {f_ms:8.2f} ms  logprobs {l_ms:8.2f} ms  "
                  f"transformers' warpers {h_ms:8.2f} ms")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), vocab=a.vocab, launch=a.launch, logits=a.logits,
                           results=res), f,
                      indent=1)


if __name__ == "__main__":
    main()
