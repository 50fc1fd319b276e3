"""Cost of the sampling filter (mk.filter_logits: top-k / top-p) and of mk.logprobs with it,
at the real vocabulary, for the engine's decode batch and the trainer's row chunk; beside the
peer, transformers' top-k / top-p warpers (torch.topk; torch.sort, softmax, cumsum) on the same rows.

    python tools/bench/filter.py --out filter.json
    python tools/bench/filter.py --rows 64 512 4096 --unroll-rows 0   # the cut one chunk a loop step at every row count
"""

import argparse
import json

import torch
import triton.testing

import miles_kernels as mk


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
    ap.add_argument("--unroll-rows", type=int, default=None, metavar="T",
                    help="top_p_cutoff takes four chunks a loop step up to T rows, one above (rows.TOP_P_UNROLL_ROWS)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if a.unroll_rows is not None:
        from miles_kernels._triton import rows
        rows.TOP_P_UNROLL_ROWS = a.unroll_rows
    res = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for B in a.rows:
        logits = torch.randn(B, a.vocab, generator=g, device="cuda").to(torch.bfloat16)
        ids = torch.randint(0, a.vocab, (B,), generator=g, device="cuda")
        for k, p in ((0, 1.0), (20, 1.0), (0, 0.9), (20, 0.9)):
            f_ms = triton.testing.do_bench(lambda: mk.filter_logits(logits.float() / 0.7, k, p), return_mode="median")
            l_ms = triton.testing.do_bench(lambda: mk.logprobs(logits, ids, 0.7, top_k=k, top_p=p), return_mode="median")
            h_ms = triton.testing.do_bench(lambda: hf_filter(logits.float() / 0.7, k, p), return_mode="median")
            res.append(dict(rows=B, top_k=k, top_p=p, filter_ms=f_ms, logprobs_ms=l_ms, hf_filter_ms=h_ms))
            print(f"rows {B:5d} top_k {k:2d} top_p {p:.1f}: filter {f_ms:8.2f} ms  logprobs {l_ms:8.2f} ms  "
                  f"transformers' warpers {h_ms:8.2f} ms")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), vocab=a.vocab, unroll_rows=a.unroll_rows, results=res), f, indent=1)


if __name__ == "__main__":
    main()
