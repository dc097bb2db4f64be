"""pass@k and avg@n against exact combinatorics."""

from fractions import Fraction
from math import comb

import pytest

from nemo_loop.evaluation.metrics import avg_at_n, mean_pass_at_k, pass_at_k, usable_ks


def exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(comb(n - c, k), comb(n, k))


@pytest.mark.parametrize("n", [1, 2, 5, 16, 64])
def test_pass_at_k_matches_the_binomial_formula(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(exact_pass_at_k(n, c, k)),
                                                       abs=1e-12), (n, c, k)


def test_edge_cases():
    assert pass_at_k(10, 0, 1) == 0.0  # nothing correct
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 7, 4) == 1.0  # n - c = 3 < k: every 4-subset has a correct sample
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)  # pass@1 is the fraction correct


def test_large_n_stays_finite_and_exact():
    n, c, k = 1000, 3, 64
    assert pass_at_k(n, c, k) == pytest.approx(float(exact_pass_at_k(n, c, k)), rel=1e-12)


@pytest.mark.parametrize("args", [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_invalid_arguments(args):
    with pytest.raises(ValueError):
        pass_at_k(*args)


def test_averages_and_usable_ks():
    assert avg_at_n([0, 2, 4], 4) == pytest.approx((0 + 0.5 + 1) / 3)
    assert mean_pass_at_k([0, 1], 4, 2) == pytest.approx(float(exact_pass_at_k(4, 1, 2)) / 2)
    assert avg_at_n([], 4) == 0.0
    assert usable_ks([1, 2, 4, 8, 16, 32, 64], 6) == [1, 2, 4]
