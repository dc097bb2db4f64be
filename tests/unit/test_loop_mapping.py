"""Loop mappings φ and loop weights α."""

from __future__ import annotations

import pytest
import torch

from nemo_loop.losses import (
    LoopDistillConfig,
    adaptive_loop_weights,
    loop_mapping,
    loop_weights,
    validate_loop_mapping,
)


@pytest.mark.parametrize("kind,student,teacher,expected", [
    ("shift", 2, 4, [3, 4]),
    ("shift", 3, 3, [1, 2, 3]),
    ("linear", 2, 4, [2, 4]),
    ("linear", 3, 4, [2, 3, 4]),
    ("linear", 4, 4, [1, 2, 3, 4]),
    ("linear", 1, 5, [5]),
    ("fixed", 3, 4, [4, 4, 4]),
])
def test_builtin_mappings(kind, student, teacher, expected):
    mapping = loop_mapping(kind, student, teacher)
    assert mapping == expected
    assert mapping[-1] == teacher  # every built-in mapping ends on the teacher's last loop


def test_explicit_mapping():
    assert loop_mapping("explicit", 3, 4, [1, 3, 3]) == [1, 3, 3]


@pytest.mark.parametrize("kind,student,teacher,explicit,message", [
    ("explicit", 2, 4, [3, 2], "non-decreasing"),
    ("explicit", 2, 4, [1, 1], r"r ≤ φ\(r\)"),
    ("explicit", 2, 4, [2, 5], r"r ≤ φ\(r\)"),
    ("explicit", 2, 4, [2], "expected one per student loop"),
    ("explicit", 2, 4, None, "needs the list"),
    ("explicit", 2, 4, [1.5, 2], "integers"),
    ("shift", 2, 4, [3, 4], "use kind='explicit'"),
    ("shift", 5, 4, None, "student_loops ≤ teacher_loops"),
    ("shift", 0, 4, None, "student_loops ≤ teacher_loops"),
    ("nearest", 2, 4, None, "unknown loop mapping"),
])
def test_invalid_mappings_raise(kind, student, teacher, explicit, message):
    with pytest.raises(ValueError, match=message):
        loop_mapping(kind, student, teacher, explicit)


def test_validate_loop_mapping_directly():
    validate_loop_mapping([2, 4], 2, 4)
    with pytest.raises(ValueError):
        validate_loop_mapping([4, 3], 2, 4)


def test_weights():
    assert loop_weights("terminal", 3).tolist() == [0.0, 0.0, 1.0]
    assert torch.allclose(loop_weights("uniform", 4), torch.full((4,), 0.25, dtype=torch.float64))
    late = loop_weights("late_heavy", 3, gamma=2.0)
    assert torch.allclose(late, torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64) / 14)
    assert torch.allclose(loop_weights("late_heavy", 3, gamma=0.0), loop_weights("uniform", 3))
    assert loop_weights("explicit", 2, explicit=[0.25, 0.75]).tolist() == [0.25, 0.75]
    adaptive = loop_weights("adaptive", 2, divergences=torch.tensor([1.0, 3.0]))
    assert adaptive.tolist() == [0.25, 0.75]
    for kind in ("terminal", "uniform", "late_heavy"):
        weights = loop_weights(kind, 5, gamma=1.5)
        assert (weights >= 0).all() and abs(weights.sum().item() - 1) < 1e-12


def test_adaptive_weights_fall_back_to_uniform_and_ignore_negatives():
    assert adaptive_loop_weights(torch.zeros(4)).tolist() == [0.25] * 4
    assert adaptive_loop_weights(torch.tensor([-1.0, 2.0])).tolist() == [0.0, 1.0]
    divergences = torch.tensor([1.0, 1.0], requires_grad=True)
    assert not adaptive_loop_weights(divergences).requires_grad


@pytest.mark.parametrize("kwargs,message", [
    (dict(kind="explicit", explicit=[0.5, 0.6]), "sum to 1"),
    (dict(kind="explicit", explicit=[0.5]), "expected one per student loop"),
    (dict(kind="explicit", explicit=[1.2, -0.2]), "non-negative"),
    (dict(kind="explicit", explicit=None), "needs the list"),
    (dict(kind="late_heavy", gamma=-1.0), "gamma"),
    (dict(kind="adaptive"), "per-loop divergences"),
    (dict(kind="uniform", explicit=[0.5, 0.5]), "use kind='explicit'"),
    (dict(kind="softmax"), "unknown loop weighting"),
])
def test_invalid_weights_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        loop_weights(student_loops=2, **kwargs)


def test_terminal_only_baseline_config():
    config = LoopDistillConfig.terminal_only(divergence="reverse_kl")
    config.validate(3, 5)
    assert config.teacher_loop_for_each_student_loop(3, 5)[-1] == 5
    assert config.fixed_loop_weights(3).tolist() == [0.0, 0.0, 1.0]
    assert config.divergence == "reverse_kl"
