"""Means over seeds with Student-t 95% confidence intervals, and paired differences.

A study's unit of replication is the seed (pretraining init, data order, rollouts): a cell's
accuracy at a loop budget is one number per seed, and its interval is the t-interval over those
numbers. A paired difference takes, seed by seed, the cell's accuracy minus the baseline's on the
same test items, and gives the t-interval of those differences — the seed-to-seed variation
both share cancels, which is why the paired interval is narrower than either cell's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# t_{0.975, df} for df = 1..30 (two-sided 95%); larger df use the Cornish–Fisher expansion.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z_975 = 1.959964


def t_quantile_975(df: int) -> float:
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


@dataclass(frozen=True)
class Interval:
    mean: float
    half_width: float  # NaN with fewer than two values: no interval
    count: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def excludes_zero(self) -> bool:
        return self.count > 1 and (self.low > 0 or self.high < 0)

    def __str__(self) -> str:
        if math.isnan(self.half_width):
            return f"{self.mean:.3f}"
        return f"{self.mean:.3f} ± {self.half_width:.3f}"


def mean_interval(values: list[float]) -> Interval:
    """Mean and the half-width of its 95% t-interval (sample standard deviation, n − 1)."""
    if not values:
        raise ValueError("no values to average")
    count = len(values)
    mean = sum(values) / count
    if count < 2:
        return Interval(mean, float("nan"), count)
    variance = sum((value - mean) ** 2 for value in values) / (count - 1)
    return Interval(mean, t_quantile_975(count - 1) * math.sqrt(variance / count), count)


def paired_interval(values: list[float], baseline: list[float]) -> Interval:
    """The 95% t-interval of the per-seed differences ``values[i] − baseline[i]``."""
    if len(values) != len(baseline):
        raise ValueError(f"paired values need one baseline value each, got {len(values)} and "
                         f"{len(baseline)}")
    return mean_interval([value - base for value, base in zip(values, baseline)])


def verdict(difference: Interval) -> str:
    """wins / loses / ties by the paired interval (ties also when it cannot be computed)."""
    if not difference.excludes_zero():
        return "ties"
    return "wins" if difference.mean > 0 else "loses"
