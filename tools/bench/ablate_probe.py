"""What each kind of op costs inside the decode step's CUDA graph, and the floor of a step made of one
launch an op: the step timed with a kind of op taken out, or with its launches replaced by stubs.

The decode step at b64 is latency-bound (docs/kernel_tuning.md): ~200 launches of 2-20 us. A kernel's time
in a profile is not what the step would lose without it (programmatic dependent launch overlaps each
kernel's start with the one before), so this probe times the step itself (split_probe's `whole`: forward
and logits, b x ctx, graphs replayed by turns as step_peer does), as:

    shipped     the engine's decode graph body today
    no_KIND     KIND's ops launch nothing and hand an input on (right shape and dtype, wrong values)
    stub_KIND   each of KIND's launches replaced by a stub: one program that waits for the kernel before
                (griddepcontrol.wait) and releases the next; the launch without the work
    stub_all_nopdl  every op's launches as stubs launched without PDL

KIND: norms (add_rms_norm, rms_norm), attn (qk_norm_rope_kv_attention, kv_attention, apply_rope: Qwen3's
norm / RoPE / K/V store and the decode attention, two launches), linears (linear, linears, swiglu; the lm
head included), all. So shipped - no_norms bounds what fusing the norms into their neighbours could save,
stub_norms - no_norms is their launches' share, and stub_all is the floor of a step of one kernel an op
(embedding and RoPE tables, torch's, stay). Only the times are read; the values after a removed op are
garbage. Without a GPU it refuses; its patching is checked on the CPU (tests/kernels: check_ablate_probe).

    PYTHONPATH=src:kernels python tools/bench/ablate_probe.py --model qwen3-0.6b --shapes 64x256 --out ablate.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import miles_kernels as mk  # noqa: E402
from miles_kernels._triton import launch  # noqa: E402
from miles_kernels._triton.gdc import gdc_release, gdc_wait  # noqa: E402
from miles_kernels._triton.launch import fast_launch  # noqa: E402

KINDS = {"norms": ("add_rms_norm", "rms_norm"),
         "attn": ("qk_norm_rope_kv_attention", "kv_attention", "apply_rope"),
         "linears": ("linear", "linears", "swiglu")}
LAUNCHES = {"qk_norm_rope_kv_attention": 2, "kv_attention": 2}  # norm / RoPE / K/V store, then decode; else 1
VARIANTS = ["shipped"] + [f"{how}_{k}" for k in (*KINDS, "all") for how in ("no", "stub")] + ["stub_all_nopdl"]


@fast_launch
@triton.jit
def _stub_kernel(x_ptr, USE_GDC: tl.constexpr = False):
    """A launch without work: wait for the kernel before, release the next."""
    gdc_wait(USE_GDC)
    gdc_release(USE_GDC)


def _out(name: str, args):
    """What op `name` returns, shaped as it would be, from its arguments (no values computed)."""
    x = args[0]
    if name == "linear":
        return x.new_empty((*x.shape[:-1], args[1].shape[0]))
    if name == "linears":
        return [x.new_empty((*x.shape[:-1], w.shape[0])) for w in args[1]]
    if name == "swiglu":
        return x.new_empty((*x.shape[:-1], args[1].shape[0]))
    if name == "add_rms_norm":
        return torch.empty_like(args[1]), torch.empty_like(args[1])
    return torch.empty_like(x)  # rms_norm, apply_rope, the attentions: q's shape


def _handed_on(name: str, args):
    """An input standing for op `name`'s output (no allocation, no launch)."""
    x = args[0]
    if name in ("linear", "swiglu"):
        return x if x.shape[-1] == args[1].shape[0] else _out(name, args)
    if name == "linears":
        return _out(name, args)
    if name == "add_rms_norm":
        return args[1], args[1]
    return x


class Stubs:
    """The stub launches made while patched (counted, so a test can check them)."""

    def __init__(self, pdl: bool):
        self.pdl, self.launched = pdl, 0

    def launch(self, x: torch.Tensor, n: int) -> None:
        for _ in range(n):
            _stub_kernel[(1,)](x, USE_GDC=self.pdl and launch.gdc_rows(x, x.shape[0], launch.PDL_NORM_MAX_ROWS))
            self.launched += 1


@contextlib.contextmanager
def patched(variant: str):
    """Within: the variant's ops replaced on the miles_kernels module (the models call them through it).
    Yields the Stubs counter (None for shipped)."""
    if variant not in VARIANTS:
        raise ValueError(f"ablate_probe: variant {variant!r}: choose from {VARIANTS}")
    if variant == "shipped":
        yield None
        return
    how, kind = variant.split("_")[:2]
    names = [n for k, ns in KINDS.items() if kind in (k, "all") for n in ns]
    stubs = Stubs(pdl=not variant.endswith("_nopdl"))
    saved = {n: getattr(mk, n) for n in names}

    def make(name):
        def op(*args, **kwargs):
            if how == "no":
                return _handed_on(name, args)
            stubs.launch(args[0], LAUNCHES.get(name, 1))
            return _out(name, args)
        return op

    for n in names:
        setattr(mk, n, make(n))
    try:
        yield stubs
    finally:
        for n, fn in saved.items():
            setattr(mk, n, fn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["qwen3-0.6b"])
    ap.add_argument("--shapes", nargs="+", default=["64x256"], metavar="BxCTX",
                    help="batch x context (tokens cached a sequence)")
    ap.add_argument("--variants", nargs="+", default=VARIANTS, help=f"from {VARIANTS} (shipped always timed)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default="ablate_probe.json")
    a = ap.parse_args()
    from split_probe import check_models, parse_shapes

    shapes = parse_shapes("ablate_probe", a.shapes)
    check_models("ablate_probe", a.model)
    bad = [v for v in a.variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"ablate_probe: --variants {bad}: choose from {VARIANTS}")
    if not torch.cuda.is_available():
        raise SystemExit("ablate_probe: needs a CUDA GPU (it times CUDA graph replays); its patching is checked "
                         "on the CPU by tests/kernels (check_ablate_probe)")
    from engine import build
    from split_probe import decode_inputs, graphed, make_forwards, time_rounds

    variants = ["shipped"] + [v for v in a.variants if v != "shipped"]
    rows = []
    for name in a.model:
        model = build(name)
        for batch, ctx in shapes:
            inputs = decode_inputs(model, batch, ctx, 64)
            step = make_forwards(model, *inputs, 1)["whole"]
            graphs, stubs = {}, {}
            for v in variants:
                with patched(v) as counter:
                    graphs[v] = graphed(step)[0]
                    stubs[v] = counter.launched // 2 if counter else 0  # graphed calls the step twice
            us = time_rounds(graphs, a.reps, a.rounds)
            rows.append(dict(model=name, batch=batch, ctx=ctx, us=us, stub_launches=stubs))
            print(f"{name} b{batch} ctx{ctx}: {'variant':<15} {'us':>8} {'saved':>8} {'stubs':>6}")
            for v in variants:
                print(f"  {v:<15} {us[v]:8.1f} {us['shipped'] - us[v]:8.1f} {stubs[v]:6d}", flush=True)
            del graphs, step, inputs
            torch.cuda.empty_cache()
            Path(a.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1))
        del model
        torch.cuda.empty_cache()
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
