"""RLConfig: one tree of typed, documented configs for `miles-fsdp rl` (field docstrings are --help).

Presets are Python functions returning an RLConfig (see examples/ and miles_fsdp.quickstart);
a variant calls its base and edits a few fields.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from miles_fsdp.data.datasets import DataConfig
from miles_fsdp.engine.config import EngineConfig
from miles_fsdp.observe.profiler import ProfileConfig
from miles_fsdp.rl.objectives import AGGREGATIONS, Aggregation
from miles_fsdp.train.draft import DraftConfig
from miles_fsdp.train.loss import LossNorm
from miles_fsdp.train.scoring import ScoringSpec
from miles_fsdp.train.trainer import TrainerConfig

Advantage = Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gspo"]


def _bad(where: str, value, want: str):
    """Refuse a setting, naming both its config path and its command-line flag."""
    flag = "--" + where.replace("_", "-")
    raise ValueError(f"{where}={value!r} ({flag}): {want}")


def _model_context(model_dir: str) -> int:
    """max_position_embeddings from model_dir/config.json; 0 when it cannot be read here
    (the model loader reports a missing or broken checkpoint itself)."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    cfg = cfg.get("text_config", cfg)
    n = cfg.get("max_position_embeddings", 0)
    return n if isinstance(n, int) and n > 0 else 0


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
    """Score given to a sample whose reward function raised, returned a non-number or timed out
    (counted in rollout/reward_errors, recorded on the sample, logged once per kind of failure)."""
    reward_timeout_s: float = 120.0
    """Seconds one reward call (one sample, or one batch for a batched reward) may take; a call
    still running then is abandoned and scored reward_on_error (rollout/reward_timeouts)."""
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
        if not 0 < self.top_p <= 1:
            _bad("rollout.top_p", self.top_p, "must be in (0, 1] (1 = off)")
        if self.top_k < 0:
            _bad("rollout.top_k", self.top_k, "must be >= 0 (0 = off)")
        if self.overlong_buffer < 0 or self.overlong_buffer >= self.max_new_tokens:
            _bad("rollout.overlong_buffer", self.overlong_buffer, f"must be in [0, max_new_tokens={self.max_new_tokens})")
        self.stop_strings = tuple(self.stop_strings)
        self.servers = tuple(self.servers)
        for url in self.servers:
            if not url.startswith(("http://", "https://")):
                _bad("rollout.servers", url, "each entry must be a URL like http://host:8000 (a `miles-fsdp serve`)")
        if self.request_timeout_s <= 0:
            _bad("rollout.request_timeout_s", self.request_timeout_s, "must be > 0")
        if not self.reward_timeout_s > 0:
            _bad("rollout.reward_timeout_s", self.reward_timeout_s, "must be > 0 seconds")


@dataclass
class AlgoConfig:
    advantage: Advantage = "grpo"
    """Advantage estimator: grpo, dr_grpo (no std, constant denominator), rloo, reinforce_pp,
    reinforce_pp_baseline, gspo (GRPO advantages + sequence-level ratio and clipping)."""
    std_normalize: bool = True
    """GRPO: divide by the group's reward std."""
    eps_low: float | None = None
    """PPO clip lower epsilon; unset = the estimator's: 0.2, or 3e-4 for gspo (sequence-level ratios)."""
    eps_high: float | None = None
    """PPO clip upper epsilon; unset = 0.2, or 4e-4 for gspo; > eps_low is DAPO's clip-higher (e.g. 0.28)."""
    dual_clip_c: float | None = None
    """Dual-clip constant c > 1 (bounds the loss of negative-advantage tokens); None = off."""
    aggregation: Aggregation | None = None
    """Loss aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum, constant; unset =
    token-mean, or constant for dr_grpo (Dr.GRPO's fixed-length normalisation)."""
    aggregation_constant: float = 0.0
    """For aggregation=constant: per-sequence denominator (0 = rollout.max_new_tokens)."""
    kl_coef: float = 0.0
    """KL-to-reference loss coefficient (0 = no reference model is kept)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator for the loss term (k3 = low-variance)."""
    kl_reward_coef: float = 0.0
    """KL penalty folded into the reward: each response token pays coef * (logp - ref_logp) (k1,
    rollout log-probs vs the reference's); REINFORCE++ takes it per token, outcome estimators
    (GRPO, Dr.GRPO, RLOO, GSPO) as a per-sample sum. Logged as rollout/kl_reward_penalty."""
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
        # unset fields take the estimator's own defaults; a value the user gives is kept as is
        gspo = self.advantage == "gspo"
        if self.eps_low is None:
            self.eps_low = 3e-4 if gspo else 0.2
        if self.eps_high is None:
            self.eps_high = 4e-4 if gspo else 0.2
        if self.aggregation is None:
            self.aggregation = "constant" if self.advantage == "dr_grpo" else "token-mean"
        if self.aggregation not in AGGREGATIONS:
            _bad("algo.aggregation", self.aggregation, f"expected one of {AGGREGATIONS}")
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

    def __post_init__(self):
        for name in ("every", "max_prompts", "max_new_tokens"):
            if getattr(self, name) < 0:
                _bad(f"eval.{name}", getattr(self, name), "must be >= 0 (0 = " +
                     {"every": "only before and after training", "max_prompts": "all prompts",
                      "max_new_tokens": "rollout.max_new_tokens"}[name] + ")")
        if self.n_samples < 1:
            _bad("eval.n_samples", self.n_samples, "must be >= 1")
        if self.temperature < 0:
            _bad("eval.temperature", self.temperature, "must be >= 0 (0 = greedy)")


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
    engine: EngineConfig = field(default_factory=EngineConfig)
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
    overwrite: bool = False
    """Start over in a run_dir that holds a run: the old run is moved aside to RUN_DIR.old-<time>
    (never deleted). Without it (or resume), a run_dir that holds a run is refused."""
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
    draft: DraftConfig = field(default_factory=DraftConfig)
    """The MTP draft the engine speculates with: trained online on each step's rollout batch
    (the policy's own training forward) by default when engine.num_speculative_tokens > 0; a
    checkpoint without one then gets a fresh one-module draft (train/draft.py)."""

    def __post_init__(self):
        if self.steps < 1:
            _bad("steps", self.steps, "must be >= 1")
        if self.log_samples < 0:
            _bad("log_samples", self.log_samples, "must be >= 0")
        if self.debug_mode == "train_only":  # replays saved samples: nothing here can generate
            for flag, value in (("rollout.generate_fn", self.rollout.generate_fn), ("eval.path", self.eval.path),
                                ("rollout.servers", self.rollout.servers)):
                if value:
                    _bad(flag, value, "train_only replays saved samples and has no engine to call; leave it unset "
                         "(a generate hook's turns are not saved, and eval needs an engine)")
        if self.checkpoint_every < 0:
            _bad("checkpoint_every", self.checkpoint_every, "must be >= 0 (0 = only at the end and on SIGTERM)")
        self._check_context()
        if self.release_engine_memory and self.rollout.servers:
            _bad("release_engine_memory", True, "frees a colocated engine; with rollout.servers there is none, "
                 "so leave it off")
        if self.algo.correction != "none" and self.kernel_mode == "invariant":
            _bad("algo.correction", self.algo.correction,
                 "corrections apply only with kernel_mode=fast (invariant mode has no mismatch to correct)")

    def _check_context(self) -> None:
        """Responses must fit the model's context beside their prompts (checked here, by flag
        name, not after the model has loaded)."""
        ctx = self.engine.max_model_len or _model_context(self.model)
        if not ctx:
            return
        where = "engine.max_model_len" if self.engine.max_model_len else f"max_position_embeddings in {self.model}/config.json"
        for name, n in (("rollout.max_new_tokens", self.rollout.max_new_tokens),
                        ("eval.max_new_tokens", self.eval.max_new_tokens)):
            if n >= ctx:
                _bad(name, n, f"leaves no room for a prompt in the model's context of {ctx} tokens ({where}); lower it")
        p = self.data.max_prompt_len
        if p and p + self.rollout.max_new_tokens > ctx:
            _bad("data.max_prompt_len", p, f"+ rollout.max_new_tokens ({self.rollout.max_new_tokens}) exceeds the "
                 f"model's context of {ctx} tokens ({where}); lower one of them")

    @property
    def n_mtp(self) -> int:
        """Draft modules of the policy (and of the engine's replica): draft.n_mtp, else the
        checkpoint's, else one fresh module when the engine speculates."""
        return self.draft.n_mtp_for(self.model, fresh_default=1 if self.engine.num_speculative_tokens else 0)

    @property
    def trains_draft(self) -> bool:
        """Whether each train step also trains (or, frozen, measures) the draft."""
        return self.draft.trains(self.n_mtp, default=self.engine.num_speculative_tokens > 0)

    @property
    def scoring(self) -> ScoringSpec:
        """How every token is scored: the distribution the rollout samples from (temperature,
        top-k, top-p) under the run's kernel mode; trainer, reference and check use it."""
        r = self.rollout
        return ScoringSpec(r.temperature, r.top_k, r.top_p, self.kernel_mode)

    @property
    def loss_norm(self) -> tuple[LossNorm, float]:
        """The trainer's loss normalisation (and its constant) that algo.aggregation means."""
        return loss_norm_of(self.algo.aggregation, self.algo.aggregation_constant or float(self.rollout.max_new_tokens))


def loss_norm_of(aggregation: Aggregation, constant: float) -> tuple[LossNorm, float]:
    """An RL loss aggregation as the trainer's normalisation (train/loss.py), K = sequences:

        token-mean             sum over tokens / tokens              LossNorm.token_mean
        seq-mean-token-mean    sum over sequences of token means / K LossNorm.seq_mean
        seq-mean-token-sum     sum over sequences of token sums / K  LossNorm.constant, C = 1
        constant (Dr.GRPO)     token sum / (K * C)                   LossNorm.constant, C = constant
    """
    if aggregation == "token-mean":
        return LossNorm.token_mean, 1.0
    if aggregation == "seq-mean-token-mean":
        return LossNorm.seq_mean, 1.0
    if aggregation == "seq-mean-token-sum":
        return LossNorm.constant, 1.0
    return LossNorm.constant, constant
