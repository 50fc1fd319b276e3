"""The trainer: forward log-probs and one optimizer step over packed micro-batches, under
FSDP2, or on one rank on the plain model (ParallelConfig.fsdp_units "none", the default
there: fp32 masters, forwards and backwards on compute-dtype copies, parallel/local.py).

    trainer = Trainer(model, TrainerConfig(...))          # parallelizes the model, builds AdamW
    mbs = trainer.pack(seqs)                              # this rank's sequences
    logp = trainer.forward_logprobs(mbs, spec)            # no grad; spec: temperature, top-k/p, kernel mode
    metrics = trainer.train_step(mbs, loss_fn, spec)      # accumulate, clip, step
    pending = trainer.train_step_async(mbs, loss_fn, spec)  # the same, not waited for: pending.result() later

`loss_fn(logp_T, entropy_T, mb) -> (loss_sum, stats)` returns the weighted sum
`sum(mb.weight_T * per_token_loss_T)` (see `loss.py`); stats are weighted sums too and are
reported divided by the same global denominator as the loss. Ranks may hold different
numbers of micro-batches: the short ones run dummy micro-batches so FSDP collectives match.

With `draft=DraftConfig(...)` (a model with an MTP draft), every step also trains the draft
on the same forward's hidden states (train/draft.py): one backward, the draft's own AdamW;
the policy's optimizer, clipping and train/grad_norm cover the trunk's parameters only, so
the policy update is bitwise the same with or without it. `train_trunk=False` builds no
policy optimizer; `train_draft_step` then trains the draft alone (trunk forward without grad).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

import miles_kernels as mk
from miles_kernels.meta import host_to_device
from miles_fsdp.models import packed_inputs
from miles_fsdp.models.moe import MoE
from miles_fsdp.observe.memory import is_oom, oom_error, peak_memory_gib, reserved_memory_gib, reset_peak_memory
from miles_fsdp.parallel import (ParallelConfig, build_mesh, dp_group, drop_unsynced_grads, init_distributed,
                                 parallelize)
from miles_fsdp.parallel.reduce import all_reduce_max
from miles_fsdp.train.draft import DraftConfig, DraftTrainer, draft_metrics
from miles_fsdp.train.graphs import TrunkGraphs
from miles_fsdp.train.loss import LossNorm, assign_weights
from miles_fsdp.train.optim import OptimConfig, build_optimizer, clip_scale, grad_norm as grad_norm_of, skips_on_device
from miles_fsdp.train.packing import MicroBatch, TrainSeq, dummy_like, pack, pinned
from miles_fsdp.train.pending import PendingMetrics, StepTimer, device_sums, float64_vector
from miles_fsdp.train.scoring import ScoringSpec

LossFn = Callable[[torch.Tensor, torch.Tensor | None, MicroBatch], tuple[torch.Tensor, dict]]

# Dense bf16 peak FLOP/s per device, by substring of the CUDA device name.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


@dataclass
class TrainerConfig:
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    max_tokens_per_micro_batch: int = 8192
    """Token budget of one packed micro-batch; the global batch is split into as many as needed."""
    fused_logprobs: bool = True
    """Score tokens with the lm_head and log-softmax fused over row chunks (mk.linear_logprobs):
    the same values bit for bit, the [T, V] logits never made whole at once (kept from the forward
    for the backward on CUDA only while they fit in 4% of the device's memory, else recomputed
    there). Off: logits, then logprobs."""
    peak_flops: float = 0.0
    """Peak FLOP/s of one device for MFU; 0 = look up the CUDA device (H100/H200/A100), no MFU on CPU."""
    cuda_graphs: bool | None = None
    """Replay the trunk's forward and backward of each training micro-batch from CUDA graphs
    (train/graphs.py: tokens padded to powers of two, one capture per size; the log-probs are
    the same bits). None: on where they can run (one rank on CUDA, parallel.fsdp_units "none",
    the one-rank default), else off; True: required (refused elsewhere); False: off. The
    graphs keep one memory pool as large as the largest micro-batch's activations."""

    def __post_init__(self):
        if self.max_tokens_per_micro_batch < 2:
            raise ValueError(f"TrainerConfig.max_tokens_per_micro_batch={self.max_tokens_per_micro_batch}: must be >= 2")


def _flop_params(model: nn.Module) -> int:
    # 6 * N * tokens counts the trunk's matmul parameters: the embedding lookup is not a
    # matmul, unless the table is tied to the lm_head (then it is one).
    # MoE experts count as active parameters: each token runs top_k of the n_experts.
    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("mtp."))
    embed = getattr(model, "embed", None)
    if embed is not None and getattr(model, "lm_head", None) is not None:
        n -= sum(p.numel() for p in embed.parameters())
    for name, m in model.named_modules():
        if isinstance(m, MoE) and not name.startswith("mtp."):
            experts = sum(p.numel() for p in (m.w_gate, m.w_up, m.w_down))  # a sharded DTensor's numel is global
            n -= experts - experts * m.top_k // m.n_experts
    return n


def packed_hidden(model: nn.Module, mb: MicroBatch, device):
    """(hidden_TD, meta, slot_T): the trunk's forward over mb's packed sequences."""
    _, meta, slot_T = packed_inputs(mb.cu_seqlens, device)
    ids_T, pos_T = mb.ids_T.to(device, non_blocking=True), mb.pos_T.to(device, non_blocking=True)
    return model(ids_T, pos_T, meta, slot_T), meta, slot_T


def score_targets(model: nn.Module, hidden_TD: torch.Tensor, mb: MicroBatch, spec: ScoringSpec,
                  entropy: bool = False, fused: bool = True, trained_only: bool = False):
    """(logp_T, entropy_T or None) of mb's targets from the trunk's hidden states, as `spec` says.

    trained_only: score only the positions whose target is trained (mb.mask_T > 0), 0 at the
    others: the lm_head and the log-softmax, the costliest part at a large vocabulary, skip
    the prompt. Row-wise ops: the scored positions get the same bits either way.
    """
    dev = hidden_TD.device
    targets_T = mb.targets_T.to(dev, non_blocking=True)  # non-blocking from pinned memory (packing.pinned)
    rows_R = None
    if trained_only:
        rows_R = host_to_device((mb.mask_T > 0).nonzero()[:, 0], dev)
    h, tgt = (hidden_TD, targets_T) if rows_R is None else (hidden_TD[rows_R], targets_T[rows_R])
    t, k, p = spec.temperature, spec.top_k, spec.top_p
    if fused and hasattr(model, "token_logprobs"):  # fused lm_head + logprobs: no [T, V] logits alive
        logp, ent = model.token_logprobs(h, tgt, t, entropy, k, p)
    else:
        logp, ent = mk.logprobs(model.logits(h), tgt, t, entropy=entropy, top_k=k, top_p=p)
    if rows_R is None:
        return logp, ent
    put = lambda x: None if x is None else x.new_zeros(targets_T.shape).index_put((rows_R,), x)  # noqa: E731
    return put(logp), put(ent)


def packed_logprobs(model: nn.Module, mb: MicroBatch, device, spec: ScoringSpec, entropy: bool = False,
                    fused: bool = True, trained_only: bool = False):
    """(logp_T, entropy_T or None) of mb's targets, scored as `spec` says; the one forward
    the trainer and the reference policy share (trained_only: see score_targets)."""
    with mk.use_mode(spec.kernel_mode):
        hidden_TD, _, _ = packed_hidden(model, mb, device)
        return score_targets(model, hidden_TD, mb, spec, entropy, fused, trained_only)


def pad_micro_batches(micro_batches: list[MicroBatch], group) -> list[MicroBatch]:
    """Append dummy micro-batches up to the largest count on any rank (FSDP collectives
    must match across ranks)."""
    pad = int(all_reduce_max([len(micro_batches)], group)[0]) - len(micro_batches)
    return list(micro_batches) + [dummy_like(micro_batches[0] if micro_batches else None) for _ in range(pad)]


class Trainer:
    def __init__(self, model: nn.Module, cfg: TrainerConfig, mesh=None, device: torch.device | None = None,
                 draft: DraftConfig | None = None, train_trunk: bool = True):
        """draft: train the model's MTP draft beside the policy (None: the draft, if any, is
        left alone). train_trunk=False: no policy optimizer (train_draft_step only)."""
        self.cfg = cfg
        self.device = device or init_distributed()
        self.mesh = mesh if mesh is not None else build_mesh(self.device, cfg.parallel.replicate)
        self.group = dp_group(self.mesh)
        self.dp_size = self.mesh.size()
        self.n_flop_params = _flop_params(model)
        # every forward and backward runs inside self.local.compute() (a no-op under FSDP)
        self.model, self.local = parallelize(model, self.mesh, cfg.parallel, self.device)
        # the policy's optimizer and clipping see the trunk only: the draft has its own
        self.trunk_params = [p for name, p in self.model.named_parameters() if not name.startswith("mtp.")]
        self.optimizer = self.scheduler = None
        if train_trunk:
            self.optimizer, self.scheduler = build_optimizer(self.trunk_params, cfg.optim)
        self.draft = DraftTrainer(self.model, draft, self.group) if draft is not None else None
        # FSDP on one rank: reduce (an identity) once per step, after the last micro-batch (FSDP
        # accumulates the micro-batches' grads in fp32 meanwhile: the same sums bit for bit), and
        # under the whole-model unit reshard then too (per-block units keep their memory bound).
        # Without FSDP, self.local accumulates and hands the grads over so.
        units = cfg.parallel.units(self.mesh.size(), self.mesh.size(self.mesh.ndim - 1))
        self.defer_grad_sync = units != "none" and dist.get_world_size() == 1 and not cfg.parallel.cpu_offload
        self.defer_reshard = self.defer_grad_sync and units == "model"
        self.step = 0  # optimizer steps taken
        self.peak_flops = cfg.peak_flops or self._lookup_peak_flops()
        self.graphs = None
        self.timer = StepTimer(self.device)
        graphs_ok = units == "none" and self.device.type == "cuda" and train_trunk
        if cfg.cuda_graphs or (cfg.cuda_graphs is None and graphs_ok):
            if not graphs_ok:
                raise ValueError(
                    f"TrainerConfig.cuda_graphs=True (--trainer.cuda-graphs) needs one rank on CUDA with "
                    f"parallel.fsdp_units 'none' and a trained trunk; this run has {self.device.type}, "
                    f"{dist.get_world_size()} rank(s), units '{units}', train_trunk={train_trunk}: turn "
                    "cuda_graphs off (or leave it unset), or use one GPU with fsdp_units auto")
            self.graphs = TrunkGraphs(self.model, self.device, cfg.max_tokens_per_micro_batch)
            self.graphs.before_replay = self.local.own_grads  # LEND_GRADS: the holder of lent grads
            self.local.keep_shadows = True  # the graphs read the shadows' storage
        self.one_pass = self._one_pass(self.optimizer, cfg.optim.one_pass, units, "trainer.optim.one_pass")
        self.draft_one_pass = draft is not None and self._one_pass(self.draft.optimizer, draft.optim.one_pass, units,
                                                                   "draft.optim.one_pass")

    def _one_pass(self, optimizer, want: bool | None, units: str, name: str) -> bool:
        """Whether `optimizer` steps by AdamW.step_with over the backward's compute-dtype grads
        (train/optim.py): one rank without FSDP, a compute dtype below fp32 (shadows), CUDA (or
        Triton's interpreter on the CPU: tests). name: the config field, for the refusal."""
        if optimizer is None:  # nothing to step (train_draft_step only, a frozen draft)
            return False
        interpreted = self.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
        ok = (units == "none" and bool(self.local.masters)
              and (self.device.type == "cuda" or interpreted))
        if want and not ok:
            raise ValueError(
                f"{name}=True (--{name.replace('_', '-')}) needs one rank without FSDP (parallel.fsdp_units "
                f"'none'), a bf16 compute dtype and CUDA; this run has units '{units}', "
                f"{'bf16' if self.local.masters else 'fp32'} compute, {self.device.type}: set it to None (or False)")
        return ok if want is None else bool(want)

    def _lookup_peak_flops(self) -> float:
        if self.device.type != "cuda":
            return 0.0
        name = torch.cuda.get_device_name(self.device)
        return next((v for k, v in PEAK_FLOPS.items() if k in name), 0.0)

    def pack(self, seqs: list[TrainSeq]) -> list[MicroBatch]:
        return pack(seqs, self.cfg.max_tokens_per_micro_batch)

    def _logprobs(self, mb: MicroBatch, spec: ScoringSpec, entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        return packed_logprobs(self.model, self._pinned(mb), self.device, spec, entropy, self.cfg.fused_logprobs)

    def _pinned(self, mb: MicroBatch) -> MicroBatch:
        """On CUDA, mb in pinned memory: no copy to the device waits for the GPU's queue."""
        return pinned(mb) if self.device.type == "cuda" else mb

    def _forward(self, mb: MicroBatch, spec: ScoringSpec, entropy: bool):
        """(logp_T, entropy_T, draft loss term or None): one trunk forward for the policy's
        scores and, with a draft trainer, the draft's loss on its hidden states."""
        with mk.use_mode(spec.kernel_mode):
            hidden_TD = self.graphs.hidden(mb) if self.graphs is not None and torch.is_grad_enabled() else None
            if hidden_TD is None:
                hidden_TD, meta, slot_T = packed_hidden(self.model, mb, self.device)
            elif self.draft is not None:  # the draft's own attention over the real packing
                _, meta, slot_T = packed_inputs(mb.cu_seqlens, self.device)
            logp_T, ent_T = score_targets(self.model, hidden_TD, mb, spec, entropy, self.cfg.fused_logprobs,
                                          trained_only=True)  # the loss reads no other position
            draft = self.draft.loss(self.model, hidden_TD, mb, meta, slot_T) if self.draft is not None else None
        return logp_T, ent_T, draft

    def _pad(self, micro_batches: list[MicroBatch]) -> list[MicroBatch]:
        return pad_micro_batches(micro_batches, self.group)

    @torch.no_grad()
    def forward_logprobs(self, micro_batches: list[MicroBatch], spec: ScoringSpec = ScoringSpec(),
                         entropy: bool = False):
        """fp32 log-prob of every target position, one [T] tensor per micro-batch (on device).
        With entropy=True returns (logps, entropies). Collective: every rank must call it."""
        self.model.eval()
        logps, ents = [], []
        with self.local.compute():
            for mb in self._pad(micro_batches):
                logp_T, ent_T = self._logprobs(mb, spec, entropy)
                if not mb.dummy:
                    logps.append(logp_T)
                    ents.append(ent_T)
        return (logps, ents) if entropy else logps

    def backward(self, micro_batches: list[MicroBatch], loss_fn: LossFn, spec: ScoringSpec = ScoringSpec(),
                 norm: LossNorm = LossNorm.token_mean, norm_constant: float = 1.0, entropy: bool = False) -> dict:
        """Accumulate gradients of the loss, normalised by `norm` (see loss.py), over this
        rank's micro-batches (no optimizer step): in the parameters' .grad (fp32). Returns
        on-device sums for `train_step`'s metrics."""
        acc = self._accumulate(micro_batches, loss_fn, spec, norm, norm_constant, entropy)
        self.local.flush_grads()
        return acc

    def _accumulate(self, micro_batches, loss_fn, spec, norm, norm_constant, entropy) -> dict:
        """backward() without the flush of a one-rank run's grads into .grad (train_step's one pass reads them)."""
        self._train_mode()
        denom = assign_weights(micro_batches, norm, norm_constant, self.group)
        # FSDP averages gradients over dp ranks; scaling by dp_size makes it the global sum.
        scale = self.dp_size / denom
        loss_acc = torch.zeros((), device=self.device)
        stats_acc: dict[str, torch.Tensor] = {}
        n_tokens = 0
        micro_batches = self._pad(micro_batches)
        if self.draft is not None:
            self.draft.begin(micro_batches)
        try:
            with self.local.compute():
                for i, mb in enumerate(micro_batches):
                    self._grad_sync(i == len(micro_batches) - 1)
                    n_tokens += self._micro_batch_backward(mb, loss_fn, spec, entropy, scale, loss_acc, stats_acc)
        except BaseException:  # a failed step's partial grads never reach a later step
            self.local.discard_grads()
            if self.defer_grad_sync:
                drop_unsynced_grads(self.model)
            raise
        finally:
            self._grad_sync(True)
        return {"denom": denom, "loss_sum": loss_acc, "stats": stats_acc, "tokens": n_tokens}

    def _train_mode(self) -> None:
        """model.train() where forward_logprobs left it in eval mode: the call walks every module
        (~400 at 0.6B, host time at each step's start while the GPU waits)."""
        if not self.model.training:
            self.model.train()

    def _grad_sync(self, on: bool) -> None:
        """FSDP reduces (and reshards) after this backward: always, unless deferred (__init__);
        nothing to do without FSDP."""
        if self.defer_grad_sync:
            self.model.set_requires_gradient_sync(on)
        if self.defer_reshard:
            self.model.set_reshard_after_backward(on)

    def _micro_batch_backward(self, mb, loss_fn, spec, entropy, scale, loss_acc, stats_acc) -> int:
        """Forward and backward of one micro-batch; adds to loss_acc / stats_acc; returns its tokens."""
        mb = self._pinned(mb)
        logp_T, ent_T, draft_loss = self._forward(mb, spec, entropy)
        if mb.dummy:
            loss_sum, stats = logp_T.sum() * 0.0, {}
        else:
            loss_sum, stats = loss_fn(logp_T, ent_T, mb)
        total = loss_sum * scale
        if draft_loss is not None and draft_loss.requires_grad:
            # one backward for both; the draft's term reaches the draft's parameters only
            total = total + draft_loss * self.dp_size
        total.backward()
        self.local.accumulate_grads()  # without FSDP: the compute-dtype grads into fp32 sums
        loss_acc += loss_sum.detach()
        for k, v in stats.items():
            stats_acc[k] = stats_acc.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float32, device=self.device)
        return 0 if mb.dummy else mb.num_tokens

    def train_step(self, micro_batches: list[MicroBatch], loss_fn: LossFn, spec: ScoringSpec = ScoringSpec(),
                   norm: LossNorm = LossNorm.token_mean, norm_constant: float = 1.0,
                   entropy: bool = False) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches: backward (accumulate), clip,
        AdamW, LR schedule. Tokens are scored as `spec` says; the loss is normalised by
        `norm` (norm_constant for LossNorm.constant). Collective: every rank calls it.
        Waits for the step's end; train_step_async does not."""
        return self.train_step_async(micro_batches, loss_fn, spec, norm, norm_constant, entropy).result()

    def train_step_async(self, micro_batches: list[MicroBatch], loss_fn: LossFn, spec: ScoringSpec = ScoringSpec(),
                         norm: LossNorm = LossNorm.token_mean, norm_constant: float = 1.0,
                         entropy: bool = False) -> PendingMetrics:
        """train_step, its work queued but not waited for: the metrics come from `.result()`
        (train/pending.py), so the host packs and launches the next step while the device runs
        this one. A rank may read its metrics whenever it likes (the ranks' sums are made on the
        device); the step's effects (weights, optimizer state, `step`) are in order whether or not
        they are read. Collective: every rank calls it."""
        reset_peak_memory(self.device)
        start = self.timer.start()
        try:
            acc = self._accumulate(micro_batches, loss_fn, spec, norm, norm_constant, entropy)
        except BaseException as e:
            for p in self.trunk_params:  # the failed step's partial grads are dropped
                p.grad = None
            if self.draft is not None:
                self.draft.zero_grad()
            if not (isinstance(e, RuntimeError) and is_oom(e)):
                raise
            c = self.cfg
            longest = max((mb.num_tokens for mb in micro_batches), default=0)
            raise oom_error(
                e, f"train step ({len(micro_batches)} micro-batches, the largest {longest} tokens)",
                f"lower trainer.max_tokens_per_micro_batch (now {c.max_tokens_per_micro_batch}), turn on "
                "trainer.parallel.activation_checkpointing or trainer.parallel.cpu_offload, or keep "
                "trainer.fused_logprobs on; beside a colocated engine also lower engine.kv_memory_fraction "
                "or set release_engine_memory") from e
        kept = self.local.flush_grads(keep=(self.trunk_params if self.one_pass else [])
                                      + (self.draft.params if self.draft_one_pass else []))
        on_device = self.one_pass or self._skips_on_device()
        if self.one_pass:  # the grads as the backward left them (bf16 after one); .grad where set
            grads = self._kept(kept, self.trunk_params)
            grad_norm = grad_norm_of(list(grads.values()))
        else:
            grad_norm = self._clip_grads(scale_in_step=on_device)
        finite_t = torch.isfinite(grad_norm)  # a non-finite step is skipped (and reported), never applied
        if self.one_pass:
            # AdamW and the next forward's bf16 parameters in one pass; clip and skip as below
            shadows = self.local.held_shadows(grads)
            self.optimizer.step_with(grads, shadows, self._clip_scale(grad_norm), (~finite_t).float())
            if shadows is not None:
                self.local.refreshed(grads)
            del grads
        elif on_device:
            # fused AdamW skips the update on the device where found_inf is set (params, moments
            # and step count untouched): the host queues the step without waiting for the backward.
            # It divides the grads by grad_scale as it reads them: the clipping, without a pass of its own.
            self.optimizer.found_inf = (~finite_t).float()
            self.optimizer.grad_scale = self._clip_scale(grad_norm)
            try:
                self.optimizer.step()
            finally:
                self.optimizer.found_inf = self.optimizer.grad_scale = None
        elif bool(finite_t):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.local.free()  # the compute-dtype copies are stale now: their memory goes back
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        draft = self._draft_step(kept) if self.draft is not None else None
        self.step += 1
        return self._pending(acc, grad_norm, finite_t, lr, draft, start)

    def _pending(self, acc: dict, grad_norm: torch.Tensor, finite_t: torch.Tensor, lr: float, draft: dict | None,
                 start) -> PendingMetrics:
        """The step's metrics, to be read later: its device values in one vector (the ranks' sums
        made on the device), the host's (lr, the allocator's peak as queued) kept beside them."""
        names = sorted(acc["stats"])
        summed = [acc["loss_sum"], *(acc["stats"][k] for k in names)]
        n_draft = 0 if draft is None else draft["sums"].numel()
        if n_draft:
            summed.append(draft["sums"])
        summed.append(torch.full((1,), float(acc["tokens"]), dtype=torch.float64, device=self.device))
        once = [grad_norm, finite_t] + ([draft["grad_norm"]] if draft is not None and "grad_norm" in draft else [])
        values = torch.cat([device_sums(summed, self.group), float64_vector(once)])
        host = {"perf/peak_mem_gib": peak_memory_gib(self.device)}  # the allocator's peak, as queued
        reserved = reserved_memory_gib(self.device)
        if reserved is not None:
            host["perf/reserved_gib"] = reserved
        denom, world, n_stats = acc["denom"], dist.get_world_size(), len(names)

        def finish(vals: list[float], dt: float) -> dict[str, float]:
            loss, stats, sums = vals[0], vals[1:1 + n_stats], vals[1 + n_stats:1 + n_stats + n_draft]
            tokens, norm, finite, *draft_norm = vals[1 + n_stats + n_draft:]
            metrics = {"train/loss": loss / denom, "train/grad_norm": norm, "train/lr": lr,
                       "train/tokens": tokens, "train/skipped_step": float(not finite),
                       "perf/tokens_per_s": tokens / dt, **host, "time/train_step_s": dt}
            if self.peak_flops > 0:
                metrics["perf/mfu"] = 6 * self.n_flop_params * tokens / dt / (self.peak_flops * world)
            metrics.update({k: v / denom for k, v in zip(names, stats)})
            if draft is not None:
                metrics.update(draft_metrics(sums, draft["denoms"], draft["lr"], draft_norm[0] if draft_norm else None))
            return metrics

        return PendingMetrics(values, finish, self.timer, start)

    def train_draft_step(self, micro_batches: list[MicroBatch], spec: ScoringSpec = ScoringSpec()) -> dict[str, float]:
        """One step of the draft alone: the trunk's forward without grad, the draft's loss on its
        hidden states, backward through the draft, the draft's AdamW. Collective. Waits for the
        step's end; train_draft_step_async does not."""
        return self.train_draft_step_async(micro_batches, spec).result()

    def train_draft_step_async(self, micro_batches: list[MicroBatch],
                               spec: ScoringSpec = ScoringSpec()) -> PendingMetrics:
        """train_draft_step, queued: its metrics come from `.result()` (as train_step_async's)."""
        if self.draft is None:
            raise ValueError("Trainer.train_draft_step: built without a draft (pass draft=DraftConfig(...))")
        start = self.timer.start()
        self._train_mode()
        micro_batches = self._pad(micro_batches)
        self.draft.begin(micro_batches)
        try:
            with self.local.compute():
                for mb in micro_batches:
                    mb = self._pinned(mb)
                    with mk.use_mode(spec.kernel_mode):
                        with torch.no_grad():
                            hidden_TD, meta, slot_T = packed_hidden(self.model, mb, self.device)
                        draft_loss = self.draft.loss(self.model, hidden_TD, mb, meta, slot_T)
                    if draft_loss.requires_grad:
                        (draft_loss * self.dp_size).backward()
                        self.local.accumulate_grads()
        except BaseException:
            self.local.discard_grads()
            self.draft.zero_grad()
            raise
        kept = self.local.flush_grads(keep=self.draft.params if self.draft_one_pass else ())
        draft = self._draft_step(kept)
        self.step += 1
        n = draft["sums"].numel()
        norm = [draft["grad_norm"]] if "grad_norm" in draft else []
        values = torch.cat([device_sums([draft["sums"]], self.group), *([float64_vector(norm)] if norm else [])])

        def finish(vals: list[float], dt: float) -> dict[str, float]:
            grad_norm = vals[n] if norm else None
            return {**draft_metrics(vals[:n], draft["denoms"], draft["lr"], grad_norm), "time/train_step_s": dt}

        return PendingMetrics(values, finish, self.timer, start)

    def _skips_on_device(self) -> bool:
        return skips_on_device(self.optimizer, self.trunk_params)

    def _clip_scale(self, total: torch.Tensor) -> torch.Tensor | None:
        """What fused AdamW divides the grads by to clip them as clip_grads_with_norm_ does."""
        return clip_scale(total, self.cfg.optim.grad_clip)

    @staticmethod
    def _kept(kept: dict, params: list) -> dict:
        """{param: grad} of params: the grad flush_grads kept, else .grad where one was set."""
        return {p: kept.get(p, p.grad) for p in params if kept.get(p, p.grad) is not None}

    def _draft_step(self, kept: dict) -> dict:
        """The draft's step: over its kept grads in one pass (draft_one_pass), else from .grad."""
        if not self.draft_one_pass:
            return self.draft.step()
        grads = self._kept(kept, self.draft.params)
        shadows = self.local.held_shadows(grads)
        out = self.draft.step(grads, shadows)
        if shadows is not None:
            self.local.refreshed(grads)
        return out

    def _clip_grads(self, scale_in_step: bool = False) -> torch.Tensor:
        """The trunk's global grad norm; clips the grads in place unless the step will (scale_in_step)."""
        grads = [p.grad for p in self.trunk_params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if hasattr(total, "full_tensor"):  # DTensor grads: the norm is a partial sum over shards
            total = total.full_tensor()
        if self.cfg.optim.grad_clip > 0 and not scale_in_step:
            torch.nn.utils.clip_grads_with_norm_(
                [p for p in self.trunk_params if p.grad is not None], self.cfg.optim.grad_clip, total
            )
        return total
