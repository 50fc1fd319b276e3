"""RoPE inverse frequencies and attention scaling, computed as transformers does.

Returns (inv_freq_F fp32, attention_scale); the kernel `mk.rope_cos_sin(pos, inv_freq,
scale)` turns them into cos/sin tables. F = head_dim / 2.
"""

from __future__ import annotations

import math

import torch

from miles_fsdp.models.args import RopeArgs


def rope_inv_freq(rope: RopeArgs, head_dim: int) -> tuple[torch.Tensor, float]:
    base_F = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.type == "default":
        return base_F, 1.0
    if rope.type == "linear":
        return base_F / rope.factor, 1.0
    if rope.type == "llama3":
        return _llama3(rope, base_F), 1.0
    if rope.type == "yarn":
        return _yarn(rope, head_dim)
    raise ValueError(f"rope type {rope.type!r} is not supported")


def _llama3(rope: RopeArgs, inv_freq_F: torch.Tensor) -> torch.Tensor:
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen_F = 2 * math.pi / inv_freq_F
    # long wavelengths are slowed by `factor`, short ones kept, the middle band interpolated
    scaled_F = torch.where(wavelen_F > low_wavelen, inv_freq_F / rope.factor, inv_freq_F)
    smooth_F = (old_len / wavelen_F - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed_F = (1 - smooth_F) * scaled_F / rope.factor + smooth_F * scaled_F
    medium_F = ~(wavelen_F < high_wavelen) * ~(wavelen_F > low_wavelen)
    return torch.where(medium_F, smoothed_F, scaled_F)


def _yarn(rope: RopeArgs, dim: int) -> tuple[torch.Tensor, float]:
    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = get_mscale(rope.factor, rope.mscale) / get_mscale(rope.factor, rope.mscale_all_dim)
        else:
            attention_factor = get_mscale(rope.factor)

    def correction_dim(n_rot: float) -> float:
        return (dim * math.log(rope.original_max_position_embeddings / (n_rot * 2 * math.pi))) / (
            2 * math.log(rope.theta)
        )

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp_F = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)

    pos_freqs_F = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation_F = 1.0 / pos_freqs_F
    interpolation_F = 1.0 / (rope.factor * pos_freqs_F)
    extra_weight_F = 1 - ramp_F
    inv_freq_F = interpolation_F * (1 - extra_weight_F) + extrapolation_F * extra_weight_F
    return inv_freq_F, float(attention_factor)
