"""fsdp_units="none": one rank, no FSDP. The model keeps its fp32 parameters (the masters:
what the optimizer, checkpoints, weight sync and export see) and, with a bf16 compute
dtype, runs forward and backward on bf16 shadows of them, as FSDP2 does at world size 1
with param_dtype bf16 and reduce_dtype fp32, without its per-parameter hooks and DTensors:

    masters (fp32)      in the modules outside `compute()`
       | one foreach cast, only after a master changed (its _version moved)
    shadows (bf16)      swapped into the modules inside `compute()`; freed after each
       |                optimizer step (`free()`), allocated again by the next compute()
       | backward: bf16 grads
    accumulators        `accumulate_grads()` after each backward: the first backward's bf16
       |                grads as they are; a second makes them fp32 and adds, as FSDP2 does
       |                between unsynced backwards (at one rank its reduce is a copy)
    masters' .grad      `flush_grads()` after the step's last backward: fp32 (the bf16 upcast);
                        or, for the masters it is asked to keep, the accumulators as they are
                        (train/optim.py's one-pass AdamW reads the bf16 grads directly and
                        writes the shadows with the new masters: `refreshed()`)

With fp32 compute (or under FSDP, whose all-gather casts) there are no shadows and every
method does nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
import torch.nn as nn


class LocalParams:
    def __init__(self, model: nn.Module, dtype: torch.dtype | None):
        """dtype: the compute dtype of the shadows; None: no shadows (the modules compute on
        their own parameters). A parameter shared by several modules (tied embeddings) is one
        master with one shadow."""
        self.masters: list[nn.Parameter] = []
        self._slots: list[tuple[nn.Module, str, int]] = []  # (module, name, index into masters)
        if dtype is not None:
            index: dict[int, int] = {}
            for module in model.modules():
                for name, p in module._parameters.items():
                    if p is None:
                        continue
                    if id(p) not in index:
                        index[id(p)] = len(self.masters)
                        self.masters.append(p)
                    self._slots.append((module, name, index[id(p)]))
        # allocated by the first compute() and freed after each optimizer step (free())
        self.shadows = [nn.Parameter(m.new_empty(0, dtype=dtype)) for m in self.masters]
        self._versions = [None] * len(self.masters)  # the masters' _version at the last refresh
        self._accs: list[torch.Tensor | None] = [None] * len(self.masters)
        self._inside = False
        self.keep_shadows = False  # set while CUDA graphs read the shadows' storage (train/graphs.py)

    @contextmanager
    def compute(self) -> Iterator[None]:
        """Inside, the modules hold the shadows (refreshed first where a master changed, each
        requiring grad as its master does); at exit the masters again. Nested: no-op."""
        if self._inside or not self._slots:
            yield
            return
        self._refresh()
        for shadow, master in zip(self.shadows, self.masters):
            shadow.requires_grad_(master.requires_grad)
        for module, name, i in self._slots:
            if module._parameters[name] is not self.masters[i]:
                raise RuntimeError(f"LocalParams: the parameter {name!r} of a {type(module).__name__} was replaced "
                                   "after parallelize(); update it in place (copy_, load_state_dict) instead")
            module._parameters[name] = self.shadows[i]
        self._inside = True
        try:
            yield
        finally:
            self._inside = False
            for module, name, i in self._slots:
                module._parameters[name] = self.masters[i]

    def accumulate_grads(self) -> None:
        """Take the shadows' grads (one backward's, in the compute dtype) into the accumulators:
        a master's first grad as it is; a second makes its accumulator fp32 (the first grad
        upcast) and adds the upcast grad in fp32, as every later one. The shadows' grads are cleared."""
        later, later_g = [], []
        for i, shadow in enumerate(self.shadows):
            g = shadow.grad
            if g is None:
                continue
            shadow.grad = None
            if self._accs[i] is None:
                self._accs[i] = g
                continue
            later.append(i)
            later_g.append(g)
        self._upcast([i for i in later if self._accs[i].dtype != self.masters[i].dtype])
        if later:
            with torch.no_grad():
                torch._foreach_add_([self._accs[i] for i in later], later_g)

    def _upcast(self, idx: list[int]) -> None:
        """These accumulators as fresh fp32 (the masters' dtype) copies, one foreach copy."""
        if not idx:
            return
        owned = [torch.empty_like(self.masters[i]) for i in idx]
        with torch.no_grad():
            torch._foreach_copy_(owned, [self._accs[i] for i in idx])
        for i, a in zip(idx, owned):
            self._accs[i] = a

    def own_grads(self, lent: tuple) -> None:
        """Copy the grads that are `lent` tensors (CUDA graphs' static grads, which the next replay
        may rewrite: train/graphs.py LEND_GRADS) wherever they sit: an accumulator
        becomes the fp32 upcast a second backward adds into, a shadow's .grad a copy."""
        ids = {id(t) for t in lent if t is not None}
        self._upcast([i for i, a in enumerate(self._accs) if a is not None and id(a) in ids])
        for shadow in self.shadows:
            if shadow.grad is not None and id(shadow.grad) in ids:
                shadow.grad = shadow.grad.clone()

    def discard_grads(self) -> None:
        """Drop what the backwards since the last flush accumulated (a failed step's partial grads)."""
        for shadow in self.shadows:
            shadow.grad = None
        self._accs = [None] * len(self.masters)

    def flush_grads(self, keep: Iterable[nn.Parameter] = ()) -> dict[nn.Parameter, torch.Tensor]:
        """Hand what the backwards since the last flush accumulated to the masters' .grad in
        fp32 (added to a .grad already there, as FSDP's reduce does); call after the step's last
        backward. The masters in `keep` whose .grad is None get none: their grads come back as
        {master: grad}, in the dtype they were accumulated in (the compute dtype after one backward)."""
        self.accumulate_grads()
        keep_ids = {id(p) for p in keep}
        kept: dict[nn.Parameter, torch.Tensor] = {}
        flush = []
        for i, (master, acc) in enumerate(zip(self.masters, self._accs)):
            if acc is None:
                continue
            if id(master) in keep_ids and master.grad is None:
                kept[master] = acc
            else:
                flush.append(i)
        self._upcast([i for i in flush if self._accs[i].dtype != self.masters[i].dtype])
        with torch.no_grad():
            for master, acc in ((self.masters[i], self._accs[i]) for i in flush):
                if master.grad is None:
                    master.grad = acc
                else:
                    master.grad += acc
        self._accs = [None] * len(self.masters)
        return kept

    def held_shadows(self, masters: Iterable[nn.Parameter]) -> dict[nn.Parameter, torch.Tensor] | None:
        """{master: its shadow} when every one of these masters' shadows holds storage that stays
        past the step (keep_shadows): what an optimizer may write the new masters into (then
        `refreshed`); else None (the shadows are freed after the step and filled again later)."""
        if not self.keep_shadows:
            return None
        index = {id(m): i for i, m in enumerate(self.masters)}
        out = {}
        for m in masters:
            i = index.get(id(m))
            if i is None or self.shadows[i].shape != m.shape:
                return None
            out[m] = self.shadows[i]
        return out

    def refreshed(self, masters: Iterable[nn.Parameter]) -> None:
        """These masters' shadows hold their current values (an optimizer wrote both): no cast
        at the next compute()."""
        index = {id(m): i for i, m in enumerate(self.masters)}
        for m in masters:
            self._versions[index[id(m)]] = m._version

    def free(self) -> None:
        """Free the shadows' memory (after an optimizer step they are stale anyway): between
        steps a colocated engine has it, as FSDP frees its gathered copy after backward. The
        next compute() allocates and fills them again. Not while keep_shadows."""
        if self.keep_shadows:
            return
        for shadow in self.shadows:
            shadow.data = shadow.data.new_empty(0)
        self._versions = [None] * len(self.masters)

    def _refresh(self) -> None:
        """Cast the masters that changed since the last refresh into their shadows. In-place
        updates bump a tensor's _version; fused optimizers do not, so train/optim.py bumps it."""
        stale = [i for i, m in enumerate(self.masters) if m._version != self._versions[i]]
        if not stale:
            return
        for i in stale:
            if self.shadows[i].shape != self.masters[i].shape:  # freed: allocate again
                self.shadows[i].data = torch.empty_like(self.masters[i], dtype=self.shadows[i].dtype)
        with torch.no_grad():
            torch._foreach_copy_([self.shadows[i] for i in stale], [self.masters[i] for i in stale])
        for i in stale:
            self._versions[i] = self.masters[i]._version
