"""Sampling-based accuracy metrics: unbiased pass@k and avg@n.

pass@k is the probability that at least one of k samples, drawn without replacement from the n
generated for a problem (c of them correct), is correct: 1 − C(n−c, k) / C(n, k). The binomials
overflow floats long before n gets large, so the ratio is taken as the product
∏_{i=n−c+1}^{n} (1 − k/i), whose factors all lie in [0, 1).
"""

from __future__ import annotations

from collections.abc import Sequence

PASS_AT_K_CANDIDATES = (1, 2, 4, 8, 16, 32, 64)


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``num_correct`` of ``num_samples`` correct."""
    if num_samples < 1:
        raise ValueError(f"pass@k needs at least one sample, got n={num_samples}")
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"number correct must be in [0, n={num_samples}], got {num_correct}")
    if not 1 <= k <= num_samples:
        raise ValueError(f"k must be in [1, n={num_samples}], got {k}")
    if num_samples - num_correct < k:
        return 1.0  # every k-subset contains a correct sample
    all_incorrect = 1.0
    for i in range(num_samples - num_correct + 1, num_samples + 1):
        all_incorrect *= 1.0 - k / i
    return 1.0 - all_incorrect


def mean_pass_at_k(correct_per_problem: Sequence[int], num_samples: int, k: int) -> float:
    """pass@k averaged over problems (0.0 for an empty benchmark)."""
    if not correct_per_problem:
        return 0.0
    return sum(pass_at_k(num_samples, c, k) for c in correct_per_problem) / len(
        correct_per_problem)


def avg_at_n(correct_per_problem: Sequence[int], num_samples: int) -> float:
    """Mean fraction of correct samples per problem: the expected accuracy of one sample."""
    if not correct_per_problem:
        return 0.0
    return sum(c / num_samples for c in correct_per_problem) / len(correct_per_problem)


def usable_ks(requested: Sequence[int], num_samples: int) -> list[int]:
    """The requested k that an n-sample run can estimate (k ≤ n), sorted and deduplicated."""
    return sorted({k for k in requested if 1 <= k <= num_samples})
