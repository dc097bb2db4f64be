"""Evaluation of LoopLMs on math benchmarks at every loop budget (see docs/evaluation.md)."""
