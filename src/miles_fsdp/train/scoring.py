"""The scoring spec: how a token's log-prob is computed, built once per run.

The sampler draws each token from softmax(filter(logits / temperature)) (top-k, then top-p,
on the scaled logits) and records its log-prob under that distribution. The trainer, the
reference policy and the on-policy check must score tokens exactly so, with the same
kernels. This one frozen record carries those settings from the config to each of them,
so no component copies them into another's config and none can drift.
"""

from __future__ import annotations

from dataclasses import dataclass

import miles_kernels as mk


@dataclass(frozen=True)
class ScoringSpec:
    temperature: float = 1.0
    top_k: int = 0
    """0 = no top-k."""
    top_p: float = 1.0
    """1 = no top-p."""
    kernel_mode: str = "invariant"
    """miles_kernels mode the scores are computed in ("invariant" or "fast")."""

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"ScoringSpec.temperature={self.temperature}: must be > 0")
        if self.top_k < 0:
            raise ValueError(f"ScoringSpec.top_k={self.top_k}: must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"ScoringSpec.top_p={self.top_p}: must be in (0, 1] (1 = off)")
        if self.kernel_mode not in mk.MODES:
            raise ValueError(f"ScoringSpec.kernel_mode={self.kernel_mode!r}: expected one of {mk.MODES}")
