"""Qwen3-MoE sparse MLP on batch-invariant kernels.

    x_TD --router (mk.linear)--> logits_TE --mk.route_topk--> (w_Tk, ids_Tk)
    (t, j) pairs, R = T*k, stable-sorted by expert id --> x_RD = mk.moe_dispatch: x_TD[token_R]
    expert_fn: grouped_linear gate/up -> mk.silu_mul -> grouped_linear down -> y_RD
    out_TD = mk.moe_combine: sum_j w_Tk[:, j] * y_RD[pos_Tk[t, j]] in fixed j order (fp32)

Every routed row is computed independently of the others, and the combine order depends
only on j, so a token's output does not depend on the rest of the batch. Experts are
stacked 3-D params (w_gate/w_up [E, F, D], w_down [E, D, F]) as grouped_linear and
expert parallelism want them.

Seam for expert parallelism: `MoE.expert_fn(moe, x_RD, group_sizes_E) -> y_RD` computes the
experts over rows sorted by expert id. It defaults to `local_experts` (all E experts on
this process). `miles_fsdp.parallel.ep.apply_ep` replaces it from outside with a function
that ships each row to the rank holding its expert and back; routing and the combine stay
here, so EP moves rows and never changes arithmetic. This file has no distributed code.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

import miles_kernels as mk
from miles_fsdp.models.args import ModelArgs


def swiglu_experts(x_RD, w_gate_EFD, w_up_EFD, w_down_EDF, group_sizes_E) -> torch.Tensor:
    """SwiGLU of each row with its expert's weights; rows sorted by expert, group_sizes_E rows each."""
    gate_RF = mk.grouped_linear(x_RD, w_gate_EFD, group_sizes_E)
    up_RF = mk.grouped_linear(x_RD, w_up_EFD, group_sizes_E)
    return mk.grouped_linear(mk.silu_mul(gate_RF, up_RF), w_down_EDF, group_sizes_E)


def local_experts(moe: "MoE", x_RD: torch.Tensor, group_sizes_E: torch.Tensor) -> torch.Tensor:
    """The default `expert_fn`: every expert lives on this process."""
    return swiglu_experts(x_RD, moe.w_gate, moe.w_up, moe.w_down, group_sizes_E)


ExpertFn = Callable[["MoE", torch.Tensor, torch.Tensor], torch.Tensor]


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        E, F, D = args.n_experts, args.moe_ffn_dim, args.dim
        self.n_experts = E
        self.top_k = args.n_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        self.router = Router(E, D)
        self.w_gate = nn.Parameter(torch.empty(E, F, D))
        self.w_up = nn.Parameter(torch.empty(E, F, D))
        self.w_down = nn.Parameter(torch.empty(E, D, F))
        self.expert_fn: ExpertFn = local_experts  # see the module docstring (EP seam)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        T, D = x_TD.shape
        k, E = self.top_k, self.n_experts
        logits_TE = mk.linear(x_TD, self.router.weight)
        w_Tk, ids_Tk = mk.route_topk(logits_TE, k, self.norm_topk_prob)

        ids_R = ids_Tk.reshape(-1)  # row r is the pair (token r // k, slot r % k)
        order_R = torch.argsort(ids_R, stable=True)
        # rows per expert from the sorted ids; unlike bincount (which reads the max id on the
        # host) searchsorted never syncs, so decode steps can be captured in CUDA graphs
        bounds_E1 = torch.searchsorted(ids_R[order_R], torch.arange(E + 1, device=ids_R.device))
        group_sizes_E = bounds_E1[1:] - bounds_E1[:-1]
        pos_Tk = torch.empty_like(order_R)  # the sorted row of pair (t, j)
        pos_Tk[order_R] = torch.arange(order_R.numel(), device=order_R.device)
        pos_Tk = pos_Tk.view(T, k)
        x_RD = mk.moe_dispatch(x_TD, order_R, pos_Tk)
        y_RD = self.expert_fn(self, x_RD, group_sizes_E)
        return mk.moe_combine(y_RD, pos_Tk, w_Tk)


class Router(nn.Module):
    def __init__(self, n_experts: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, dim))
