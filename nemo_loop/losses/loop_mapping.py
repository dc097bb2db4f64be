"""Which teacher loop supervises which student loop (φ), and how much each loop counts (α).

Loops are 1-based throughout, as in the paper's notation: the student runs loops r = 1..R̃, the
teacher runs loops 1..R with R̃ ≤ R, and student loop r is distilled towards teacher loop φ(r).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

MAPPING_KINDS = ("shift", "linear", "fixed", "explicit")
WEIGHTING_KINDS = ("terminal", "uniform", "late_heavy", "explicit", "adaptive")
WEIGHT_SUM_TOLERANCE = 1e-6


def _check_loop_counts(student_loops: int, teacher_loops: int) -> None:
    if not (isinstance(student_loops, int) and isinstance(teacher_loops, int)):
        raise ValueError(f"loop counts must be integers, got student_loops={student_loops!r}, "
                         f"teacher_loops={teacher_loops!r}")
    if not 1 <= student_loops <= teacher_loops:
        raise ValueError(f"need 1 ≤ student_loops ≤ teacher_loops, got student_loops="
                         f"{student_loops}, teacher_loops={teacher_loops}")


def validate_loop_mapping(mapping: Sequence[int], student_loops: int, teacher_loops: int) -> None:
    """Raise ValueError unless φ has R̃ entries, is non-decreasing and r ≤ φ(r) ≤ R."""
    _check_loop_counts(student_loops, teacher_loops)
    if len(mapping) != student_loops:
        raise ValueError(f"loop mapping has {len(mapping)} entries, expected one per student loop "
                         f"({student_loops})")
    for r, target in enumerate(mapping, start=1):
        if not isinstance(target, int) or isinstance(target, bool):
            raise ValueError(f"loop mapping entries must be integers, got φ({r})={target!r}")
        if not r <= target <= teacher_loops:
            raise ValueError(f"loop mapping needs r ≤ φ(r) ≤ R={teacher_loops}, got φ({r})="
                             f"{target}")
    if any(later < earlier for earlier, later in zip(mapping, mapping[1:])):
        raise ValueError(f"loop mapping must be non-decreasing, got {list(mapping)}")


def loop_mapping(kind: str, student_loops: int, teacher_loops: int,
                 explicit: Sequence[int] | None = None) -> list[int]:
    """The 1-based teacher loop φ(r) for each student loop r = 1..R̃.

    - ``"shift"``: φ(r) = r + (R − R̃), the student's last loop meets the teacher's last loop.
    - ``"linear"``: φ(r) = ⌈r·R / R̃⌉, student loops spread evenly over the teacher's, e.g.
      (R, R̃) = (4, 2) → [2, 4].
    - ``"fixed"``: φ(r) = R, every student loop chases the teacher's final distribution.
    - ``"explicit"``: the user's list ``explicit``.

    Every mapping is validated: non-decreasing and r ≤ φ(r) ≤ R.
    """
    _check_loop_counts(student_loops, teacher_loops)
    if kind != "explicit" and explicit is not None:
        raise ValueError(f"an explicit loop mapping was given but mapping kind is {kind!r}; "
                         "use kind='explicit'")
    loops = range(1, student_loops + 1)
    if kind == "shift":
        mapping = [r + teacher_loops - student_loops for r in loops]
    elif kind == "linear":
        mapping = [-(-r * teacher_loops // student_loops) for r in loops]  # integer ceil
    elif kind == "fixed":
        mapping = [teacher_loops] * student_loops
    elif kind == "explicit":
        if explicit is None:
            raise ValueError("mapping kind 'explicit' needs the list of teacher loops")
        mapping = list(explicit)
    else:
        raise ValueError(f"unknown loop mapping {kind!r}; expected one of {MAPPING_KINDS}")
    validate_loop_mapping(mapping, student_loops, teacher_loops)
    return mapping


def adaptive_loop_weights(per_loop_divergence: torch.Tensor) -> torch.Tensor:
    """α_r = d_r / Σ_j d_j from detached per-loop divergences d (negative values count as 0).

    Loops the student still gets wrong are weighted up. Falls back to uniform weights when every
    d_r is 0, e.g. when the student already matches the teacher at every loop.
    """
    divergence = per_loop_divergence.detach().clamp(min=0)
    total = divergence.sum()
    uniform = torch.full_like(divergence, 1.0 / divergence.numel())
    return torch.where(total > 0, divergence / torch.where(total > 0, total, 1), uniform)


def loop_weights(kind: str, student_loops: int, gamma: float = 1.0,
                 explicit: Sequence[float] | None = None,
                 divergences: torch.Tensor | None = None) -> torch.Tensor:
    """Non-negative weights α_1..α_R̃ summing to 1, as a float64 tensor.

    - ``"terminal"``: α_R̃ = 1, every other loop 0 (the terminal-only baseline).
    - ``"uniform"``: α_r = 1/R̃.
    - ``"late_heavy"``: α_r ∝ r^γ with γ ≥ 0 (γ = 0 is uniform).
    - ``"explicit"``: the user's list; rejected unless it has R̃ non-negative entries summing to
      1 within 1e-6 (it is not silently renormalized).
    - ``"adaptive"``: α_r ∝ d_r from the detached per-loop divergences ``divergences``, see
      :func:`adaptive_loop_weights`. The distillation losses compute these internally.
    """
    if not isinstance(student_loops, int) or student_loops < 1:
        raise ValueError(f"student_loops must be a positive integer, got {student_loops!r}")
    if kind != "explicit" and explicit is not None:
        raise ValueError(f"explicit loop weights were given but weighting kind is {kind!r}; "
                         "use kind='explicit'")
    loops = torch.arange(1, student_loops + 1, dtype=torch.float64)
    if kind == "terminal":
        weights = torch.zeros(student_loops, dtype=torch.float64)
        weights[-1] = 1.0
        return weights
    if kind == "uniform":
        return torch.full((student_loops,), 1.0 / student_loops, dtype=torch.float64)
    if kind == "late_heavy":
        if not (math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"late_heavy weighting needs a finite gamma ≥ 0, got {gamma}")
        powers = loops.pow(gamma)
        return powers / powers.sum()
    if kind == "explicit":
        return _validated_explicit_weights(explicit, student_loops)
    if kind == "adaptive":
        if divergences is None:
            raise ValueError("adaptive loop weights need the per-loop divergences")
        if divergences.shape != (student_loops,):
            raise ValueError(f"adaptive loop weights need {student_loops} per-loop divergences, "
                             f"got shape {tuple(divergences.shape)}")
        return adaptive_loop_weights(divergences.to(torch.float64))
    raise ValueError(f"unknown loop weighting {kind!r}; expected one of {WEIGHTING_KINDS}")


def _validated_explicit_weights(explicit: Sequence[float] | None,
                                student_loops: int) -> torch.Tensor:
    if explicit is None:
        raise ValueError("weighting kind 'explicit' needs the list of loop weights")
    if len(explicit) != student_loops:
        raise ValueError(f"explicit loop weights have {len(explicit)} entries, expected one per "
                         f"student loop ({student_loops})")
    weights = torch.tensor([float(w) for w in explicit], dtype=torch.float64)
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError(f"explicit loop weights must be finite and non-negative, got "
                         f"{list(explicit)}")
    total = weights.sum().item()
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise ValueError(f"explicit loop weights must sum to 1 (within {WEIGHT_SUM_TOLERANCE}); "
                         f"they sum to {total}. They are not renormalized automatically.")
    return weights
