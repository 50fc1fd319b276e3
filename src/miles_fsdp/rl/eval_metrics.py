"""Evaluation metrics over n samples per prompt (groups contiguous, as in training).

pass@k (Chen et al. 2021, unbiased): with n samples of which c are correct,
    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)
averaged over prompts. pass@1 reduces to the mean correctness c / n.
"""

import torch


def mean_reward(rewards_N: torch.Tensor) -> float:
    if rewards_N.numel() == 0:
        raise ValueError("mean_reward of an empty batch: evaluation produced no samples")
    return float(rewards_N.float().mean())


def pass_at_k_single(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt with n samples, c correct (numerically stable product form)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def pass_at_k(correct_N: torch.Tensor, group_size: int, k: int) -> float:
    """Mean over prompts of the unbiased pass@k; `correct_N` is bool (e.g. reward >= threshold)."""
    if correct_N.numel() == 0 or correct_N.numel() % group_size != 0:
        raise ValueError(f"{correct_N.numel()} results do not split into groups of n={group_size}")
    counts_G = correct_N.bool().view(-1, group_size).sum(dim=1).tolist()
    return sum(pass_at_k_single(group_size, c, k) for c in counts_G) / len(counts_G)


def pass_at_1(correct_N: torch.Tensor, group_size: int) -> float:
    return pass_at_k(correct_N, group_size, 1)
