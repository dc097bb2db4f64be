"""The generation interface every LoopLM engine implements, and its request/result types.

An engine turns token-id prompts into continuations with a chosen loop budget (1 ≤ num_loops ≤
R) and can be refit with the trainer's current weights. Two kinds of log-prob come back with
every generated token:

* ``logprobs``: log-softmax of the logits of the loop the token was read out from (the final
  loop, unless an adaptive exit policy stopped earlier: ``exit_loops``) at temperature 1, over
  the full vocabulary, with no top-k/top-p truncation. This is the model's own distribution
  log π_θ(y_t | x, y_<t) at the loop budget that generated the token, which is what a trainer
  recomputes with a plain forward; on-policy distillation compares it with the teacher's.
* ``sampling_logprobs``: the log-prob of the token under the distribution it was actually drawn
  from (temperature, top-k and top-p applied). It is the behaviour policy's log-prob that an
  importance ratio needs. Greedy decoding draws from a point mass, so it is 0 there.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from nemo_loop.generation.exit import ExitConfig

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each new token.

    ``temperature == 0`` is greedy (argmax of the final loop's logits). ``top_k == 0`` and
    ``top_p == 1`` switch those filters off. ``seed`` fixes the sampling stream; ``None`` draws a
    fresh one (still identical on every tensor-parallel rank). ``exit``: the per-token adaptive
    loop exit (``generation.exit``, see ``exit.py``); static by default.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    stop_token_ids: Sequence[int] = ()
    seed: int | None = None
    exit: ExitConfig = field(default_factory=ExitConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.exit, ExitConfig):
            raise TypeError(f"SamplingParams.exit must be an ExitConfig, got "
                            f"{type(self.exit).__name__}")
        self.exit.validate()
        problems = []
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            problems.append(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            problems.append(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            problems.append(f"max_new_tokens must be an integer >= 1, got "
                            f"{self.max_new_tokens!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            problems.append(f"stop_token_ids must be non-negative integers, got "
                            f"{list(self.stop_token_ids)!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            problems.append(f"seed must be an integer or None, got {self.seed!r}")
        if problems:
            raise ValueError("invalid SamplingParams: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class SamplingConfig:
    """The sampling section of a config (``rollout:``, ``sampling:``); :meth:`params` is the one
    place a config becomes :class:`SamplingParams`."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64

    def params(self, stop_token_ids: Sequence[int] = (), seed: int | None = None,
               exit: ExitConfig | None = None) -> SamplingParams:
        """``exit``: the ``generation.exit`` section (None: static, every token R̃ loops)."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens,
                              stop_token_ids=tuple(stop_token_ids), seed=seed,
                              exit=replace(exit) if exit is not None else ExitConfig())

    def validate(self) -> None:
        self.params()


@dataclass
class GenerationResult:
    """One prompt's continuation. A stop token that ended it is the last of ``token_ids``.

    ``exit_loops[t]``: the loop token t was read out from (``num_loops`` for every token under
    the static policy; under an adaptive one, the loop the policy stopped at)."""

    token_ids: list[int]
    logprobs: list[float]  # exit loop, temperature 1, full vocabulary (see module docstring)
    sampling_logprobs: list[float]  # under the distribution the token was drawn from
    finish_reason: FinishReason
    num_loops: int
    exit_loops: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.exit_loops:
            self.exit_loops = [self.num_loops] * len(self.token_ids)

    @property
    def length(self) -> int:
        return len(self.token_ids)


@dataclass
class RefitReport:
    """What a refit did: ``"rebind"`` shares the trainer's tensors (no copy), ``"copy"`` copied
    them into the engine's own parameters."""

    mode: Literal["rebind", "copy"]
    seconds: float
    bytes_copied: int = 0
    tensors: int = 0
    notes: list[str] = field(default_factory=list)


class GenerationEngine(ABC):
    """Generates with a LoopLM at a per-call loop budget; refit() brings in trainer weights."""

    @abstractmethod
    def generate(self, prompts: list[list[int]], num_loops: int,
                 sampling: SamplingParams) -> list[GenerationResult]:
        """Continue each prompt; results come back in prompt order."""

    @abstractmethod
    def refit(self, source: torch.nn.Module | Mapping[str, torch.Tensor]) -> RefitReport:
        """Make the engine generate with ``source``'s current weights."""

    def close(self) -> None:
        """Release what the engine holds beyond the model (vLLM: its KV cache and workers)."""


def validate_prompts(prompts: list[list[int]], vocab_size: int,
                     max_sequence_length: int) -> None:
    """Clear errors for the ways a prompt batch can be malformed."""
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or len(prompt) == 0:
            raise ValueError(f"prompt {index} must be a non-empty list of token ids")
        if len(prompt) >= max_sequence_length:
            raise ValueError(f"prompt {index} has {len(prompt)} tokens, which leaves no room to "
                             f"generate within max_sequence_length={max_sequence_length}")
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {index} has token ids outside [0, {vocab_size}): "
                             f"{bad[:5]!r}")
