"""RLConfig: one tree of typed, documented configs for `miles-fsdp rl` (field docstrings are --help).

Presets are Python functions returning an RLConfig (see examples/ and miles_fsdp.quickstart);
a variant calls its base and edits a few fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from miles_fsdp.data.datasets import DataConfig
from miles_fsdp.engine.config import EngineConfig
from miles_fsdp.observe.profiler import ProfileConfig
from miles_fsdp.rl.losses import AGGREGATIONS, Aggregation
from miles_fsdp.train.loss import LossNorm
from miles_fsdp.train.trainer import TrainerConfig

Advantage = Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gspo"]


def _bad(where: str, value, want: str):
    raise ValueError(f"{where}={value!r}: {want}")


@dataclass
class RolloutConfig:
    n_samples_per_prompt: int = 8
    """Samples per prompt (the GRPO group size)."""
    temperature: float = 1.0
    """Sampling temperature; the trainer's log-probs use the same one (true on-policy)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 = off). With top_p < 1 the recorded log-probs are of the
    truncated distribution, and the trainer applies the same truncation."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off); applied identically by the trainer."""
    max_new_tokens: int = 256
    """Longest response."""
    stop_strings: tuple[str, ...] = ()
    """Extra stop strings (EOS ids of the tokenizer always stop)."""
    reward: str = "exact_match"
    """Built-in reward ("math", "exact_match") or a user function `module:function` /
    `path/to/file.py:function` (sync or async, per sample or batched)."""
    answer_extract: Literal["full", "after_marker", "last_number", "boxed"] = "last_number"
    """How the exact_match reward reads the answer: the whole response, the text after
    '####', the last number, or the last \\boxed{}."""
    reward_on_error: float = 0.0
    """Score given to a sample whose reward function raised (the error is logged, never fatal)."""
    generate_fn: str = ""
    """Custom generate hook `module:function` for multi-turn / tool rollouts (empty = plain sampling)."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and over-sample prompts to refill the batch."""
    max_sampling_rounds: int = 4
    """With dynamic_sampling: most extra prompt batches drawn to refill one rollout batch."""
    overlong_buffer: int = 0
    """DAPO overlong shaping: linear penalty over the last this-many tokens before max_new_tokens (0 = off)."""
    overlong_penalty: float = 1.0
    """Penalty at max_new_tokens for overlong shaping."""
    servers: tuple[str, ...] = ()
    """Disaggregated rollout: URLs of `miles-fsdp serve` instances (http://host:port) to sample
    on, instead of an engine colocated on each rank (then `engine` options are the servers')."""
    weights_dir: str = ""
    """With servers: a directory every server can read (shared filesystem) where each step's
    weights are written for their /update_weights; empty = RUN_DIR/weights."""
    request_timeout_s: float = 3600.0
    """With servers: seconds one HTTP call may take before the run stops with an error."""

    def __post_init__(self):
        if self.n_samples_per_prompt < 1:
            _bad("rollout.n_samples_per_prompt", self.n_samples_per_prompt, "must be >= 1")
        if self.temperature <= 0:
            _bad("rollout.temperature", self.temperature, "must be > 0 for RL (log-probs of a greedy policy are undefined)")
        if self.max_new_tokens < 1:
            _bad("rollout.max_new_tokens", self.max_new_tokens, "must be >= 1")
        if self.overlong_buffer < 0 or self.overlong_buffer >= self.max_new_tokens:
            _bad("rollout.overlong_buffer", self.overlong_buffer, f"must be in [0, max_new_tokens={self.max_new_tokens})")
        self.stop_strings = tuple(self.stop_strings)
        self.servers = tuple(self.servers)
        for url in self.servers:
            if not url.startswith(("http://", "https://")):
                _bad("rollout.servers", url, "each entry must be a URL like http://host:8000 (a `miles-fsdp serve`)")
        if self.request_timeout_s <= 0:
            _bad("rollout.request_timeout_s", self.request_timeout_s, "must be > 0")


@dataclass
class AlgoConfig:
    advantage: Advantage = "grpo"
    """Advantage estimator: grpo, dr_grpo (no std, constant denominator), rloo, reinforce_pp,
    reinforce_pp_baseline, gspo (GRPO advantages + sequence-level ratio and clipping)."""
    std_normalize: bool = True
    """GRPO: divide by the group's reward std."""
    eps_low: float = 0.2
    """PPO clip lower epsilon (GSPO default 3e-4 is set when advantage=gspo and this is left at 0.2)."""
    eps_high: float = 0.2
    """PPO clip upper epsilon; > eps_low is DAPO's clip-higher (e.g. 0.28)."""
    dual_clip_c: float | None = None
    """Dual-clip constant c > 1 (bounds the loss of negative-advantage tokens); None = off."""
    aggregation: Aggregation = "token-mean"
    """Loss aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum, constant (Dr.GRPO)."""
    aggregation_constant: float = 0.0
    """For aggregation=constant: per-sequence denominator (0 = rollout.max_new_tokens)."""
    kl_coef: float = 0.0
    """KL-to-reference loss coefficient (0 = no reference model is kept)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator for the loss term (k3 = low-variance)."""
    kl_reward_coef: float = 0.0
    """KL penalty folded into the reward per token (REINFORCE++ style); needs the reference model."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (entropy is logged either way)."""
    correction: Literal["none", "tis", "mis"] = "none"
    """Fast mode only (rollout != trainer log-probs): truncated importance sampling or masking."""
    correction_level: Literal["token", "sequence"] = "token"
    tis_cap: float = 2.0
    """TIS: importance weights are min(ratio, tis_cap)."""
    mis_low: float = 0.5
    """MIS: drop tokens/sequences whose ratio is below this."""
    mis_high: float = 2.0
    """MIS: drop tokens/sequences whose ratio is above this."""

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            _bad("algo.aggregation", self.aggregation, f"expected one of {AGGREGATIONS}")
        if self.advantage == "gspo" and (self.eps_low, self.eps_high) == (0.2, 0.2):
            self.eps_low, self.eps_high = 3e-4, 4e-4
        if self.advantage == "dr_grpo" and self.aggregation == "token-mean":
            self.aggregation = "constant"
        if self.eps_low < 0 or self.eps_high < 0:
            _bad("algo.eps_low/eps_high", (self.eps_low, self.eps_high), "must be >= 0")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            _bad("algo.dual_clip_c", self.dual_clip_c, "must be > 1 (or None)")
        if self.tis_cap <= 0 or not 0 <= self.mis_low < 1 < self.mis_high:
            _bad("algo.tis_cap/mis_low/mis_high", (self.tis_cap, self.mis_low, self.mis_high),
                 "need tis_cap > 0 and 0 <= mis_low < 1 < mis_high")

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef != 0.0 or self.kl_reward_coef != 0.0


@dataclass
class EvalConfig:
    path: str = ""
    """Held-out prompt file (.jsonl/.parquet, same keys as the training data); empty = no eval."""
    every: int = 0
    """Evaluate every this many steps (and before the first and after the last); 0 = only before/after."""
    n_samples: int = 1
    """Samples per prompt; pass@k is reported for k = 1 and k = n_samples."""
    temperature: float = 0.0
    """0 = greedy (accuracy = pass@1 of the greedy policy)."""
    max_prompts: int = 0
    """Use at most this many prompts (0 = all)."""
    max_new_tokens: int = 0
    """0 = rollout.max_new_tokens."""


@dataclass
class RLConfig:
    model: str
    """HF checkpoint directory (config.json, safetensors, tokenizer)."""
    data: DataConfig
    """Training prompts."""
    run_dir: str = "runs/rl"
    """Where metrics.jsonl, tensorboard logs, checkpoints and the exported model go."""
    steps: int = 100
    """RL steps (one rollout batch and one optimizer step each)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(kv_memory_bytes=256 << 20))
    eval: EvalConfig = field(default_factory=EvalConfig)
    kernel_mode: Literal["invariant", "fast"] = "invariant"
    """invariant: rollout log-probs equal the trainer's bit for bit (asserted every step).
    fast: vendor kernels; the mismatch is logged and algo.correction applied."""
    seed: int = 0
    """Seeds sampling (per step, prompt and sample) and initialisation."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every this many steps (0 = only at the end / on SIGTERM)."""
    resume: bool = False
    """Continue from the latest checkpoint in run_dir/checkpoints."""
    export_hf: bool = True
    """Write the final policy as an HF checkpoint to run_dir/hf."""
    debug_mode: Literal["none", "rollout_only", "train_only"] = "none"
    """rollout_only: generate and save rollout batches to run_dir/rollouts, no training.
    train_only: train from saved batches (rollout_dir), no engine."""
    rollout_dir: str = ""
    """train_only: directory of saved rollout batches (default run_dir/rollouts)."""
    log_samples: int = 0
    """Append this many of each step's samples (prompt, response, label, reward, status) to
    RUN_DIR/samples.jsonl, to read what the policy writes as it trains (rank 0; 0 = off)."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """torch.profiler traces of chosen steps (RUN_DIR/profile; see observe/profiler.py)."""
    release_engine_memory: bool = False
    """Free the colocated engine's KV cache and CUDA graphs while the trainer runs, so training
    gets that memory; they are rebuilt after the weight sync (costs a graph capture per step)."""

    def __post_init__(self):
        if self.steps < 1:
            _bad("steps", self.steps, "must be >= 1")
        if self.log_samples < 0:
            _bad("log_samples", self.log_samples, "must be >= 0")
        if self.release_engine_memory and self.rollout.servers:
            _bad("release_engine_memory", True, "frees a colocated engine; with rollout.servers there is none, "
                 "so leave it off")
        if self.algo.correction != "none" and self.kernel_mode == "invariant":
            _bad("algo.correction", self.algo.correction,
                 "corrections apply only with kernel_mode=fast (invariant mode has no mismatch to correct)")
        # the trainer must score tokens under the distribution the engine sampled from
        self.trainer.temperature = self.rollout.temperature
        self.trainer.top_k, self.trainer.top_p = self.rollout.top_k, self.rollout.top_p
        self.trainer.loss_norm, self.trainer.loss_norm_constant = _loss_norm(self)


def _loss_norm(cfg: RLConfig) -> tuple[LossNorm, float]:
    agg = cfg.algo.aggregation
    if agg == "token-mean":
        return LossNorm.token_mean, 1.0
    if agg == "seq-mean-token-mean":
        return LossNorm.seq_mean, 1.0
    if agg == "seq-mean-token-sum":
        return LossNorm.constant, 1.0  # token sum per sequence / number of sequences
    return LossNorm.constant, cfg.algo.aggregation_constant or float(cfg.rollout.max_new_tokens)
