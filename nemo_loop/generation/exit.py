"""Adaptive loop exit at inference: the ``generation.exit`` section and the exit policies.

A LoopLM can stop looping early for a token: after each loop r the policy looks at the active
rows' last position and decides which of them exit; the token is then sampled from loop r's
distribution. The prefill always runs all R̃ loops (the prompt's KV of every loop is exact); the
first generated token is still read out at the loop the policy picks there.

    generation:
      exit:
        policy: confidence   # static | q_exit | confidence | hidden_delta | oracle
        threshold: 0.9       # q_exit: q in [0, 1]; confidence: τ in [0, 1] or .inf;
                             # hidden_delta: ε >= 0; static, oracle: null
        min_loops: 1         # no exit before this loop (forced exit at R̃)
        kv_fill: compute     # compute | copy | propagate: the KV of the loops a token skipped

Policies (evaluated on loop r's readout of the last position, r ≥ ``min_loops``, r < R̃):

* ``static``: never; every token runs R̃ loops (the default, and what training rollouts use).
* ``q_exit``: Ouro's rule, the first r whose exit CDF 1 − ∏_{j≤r}(1 − σ(g_j)) ≥ q, compared in
  log space (Σ_{j≤r} log σ(−g_j) ≤ log(1 − q)), so q = 1 never exits early even when the gate
  saturates.
* ``confidence``: top-1 minus top-2 probability of loop r's next-token distribution ≥ τ, from
  per-shard maxima and log-sum-exps of the vocab-parallel logits (the vocabulary is never
  gathered); τ = ∞ never exits.
* ``hidden_delta``: ‖h_r − h_{r−1}‖ / ‖h_r‖ < ε between consecutive readouts (so the earliest
  exit is loop 2).
* ``oracle``: the earliest loop whose argmax equals loop R̃'s (a diagnostic: it needs every loop,
  so it saves nothing; with ``kv_fill`` copy/propagate it isolates the KV error).

``kv_fill`` (see ``adaptive.py``): ``compute`` runs the skipped loops for their KV only (exact,
no compute saved), ``copy`` writes the exit loop's K/V into the deeper loops' slots,
``propagate`` projects the exit readout through each layer's input norm and K/V projection
(CALM's state propagation; Q, attention and MLP skipped).

Every tensor-parallel rank takes the same decision: the decisions are broadcast from the TP
group's first rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EXIT_POLICIES = ("static", "q_exit", "confidence", "hidden_delta", "oracle")
KV_FILLS = ("compute", "copy", "propagate")
# Policies that read loop r's next-token distribution (the head runs at every loop they see).
LOGIT_POLICIES = ("confidence", "oracle")


@dataclass
class ExitConfig:
    """The ``generation.exit`` section (also carried by ``SamplingParams.exit``)."""

    policy: str = "static"
    threshold: float | None = None
    min_loops: int = 1
    kv_fill: str = "compute"

    def validate(self) -> None:
        problems = []
        if self.policy not in EXIT_POLICIES:
            problems.append(f"policy must be one of {EXIT_POLICIES}, got {self.policy!r}")
        if self.kv_fill not in KV_FILLS:
            problems.append(f"kv_fill must be one of {KV_FILLS}, got {self.kv_fill!r}")
        if not (isinstance(self.min_loops, int) and self.min_loops >= 1):
            problems.append(f"min_loops must be an integer >= 1, got {self.min_loops!r}")
        problem = _threshold_problem(self.policy, self.threshold)
        if problem:
            problems.append(problem)
        if self.policy == "static" and (self.min_loops != 1 or self.kv_fill != "compute"):
            problems.append("min_loops and kv_fill only apply to an adaptive policy; with "
                            "policy=static leave them at 1 and compute")
        if problems:
            raise ValueError("invalid generation.exit: " + "; ".join(problems))

    @property
    def adaptive(self) -> bool:
        return self.policy != "static"

    def check_loops(self, num_loops: int) -> None:
        """``min_loops`` must leave the policy a loop to act on within R̃ = ``num_loops``."""
        if self.adaptive and self.min_loops > num_loops:
            raise ValueError(f"generation.exit.min_loops={self.min_loops} exceeds the loop "
                             f"budget R̃={num_loops}")


def _threshold_problem(policy: str, threshold) -> str | None:
    if policy in ("static", "oracle"):
        return None if threshold is None else \
            f"threshold must be null with policy={policy}, got {threshold!r}"
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or \
            math.isnan(threshold):
        return f"policy={policy} needs a numeric threshold, got {threshold!r}"
    if policy == "q_exit" and not 0 <= threshold <= 1:
        return f"threshold (q) of q_exit must be in [0, 1], got {threshold}"
    if policy == "confidence" and not (0 <= threshold <= 1 or threshold == math.inf):
        return f"threshold (τ) of confidence must be in [0, 1] or .inf, got {threshold}"
    if policy == "hidden_delta" and not threshold >= 0:
        return f"threshold (ε) of hidden_delta must be >= 0, got {threshold}"
    return None


def check_model_supports(config: ExitConfig, model) -> None:
    """``q_exit`` reads the exit gate: the model (its last stage) must have one."""
    if config.policy == "q_exit" and getattr(model, "exit_gate", None) is None:
        raise ValueError("generation.exit.policy=q_exit needs the model's exit gate, and this "
                         "model has none")


def work_per_token(config: ExitConfig, exit_loops: list[int], num_loops: int
                   ) -> tuple[list[int], list[int], list[bool]]:
    """What the native engine ran for each generated token (token 0: the prefill's last
    position): loops run, head evaluations, and whether a K/V projection filled its skipped
    loops — the inputs of :func:`nemo_loop.utils.flops.adaptive_generation_flops`."""
    compact = config.kv_fill != "compute" and config.policy != "oracle"
    loops = [num_loops] + [loop if compact else num_loops for loop in exit_loops[1:]]
    if config.policy == "oracle":
        heads = [num_loops] * len(exit_loops)
    elif config.policy == "confidence":  # the head reads every loop a row runs
        heads = loops[:len(exit_loops)]
    else:
        heads = [1] * len(exit_loops)
    propagated = [t > 0 and config.kv_fill == "propagate" and loop < num_loops
                  for t, loop in enumerate(exit_loops)]
    return loops[:len(exit_loops)], heads, propagated


# ----- the decision after one loop -----

class ExitDecider:
    """Decides, loop by loop, which rows of one decode step exit.

    ``after_loop(loop, readout, rows)`` takes loop ``loop``'s (1-based) readout [n, h] of the
    last position of the batch rows ``rows`` (indices into the step's batch, the rows still
    running) and returns a bool [n]: which of them exit now. At loop R̃ every row exits. State
    that accumulates over loops (the gate's log-survival, the previous readout) is kept per
    batch row, so the caller may drop exited rows between loops. ``oracle`` decides after the
    last loop only (:meth:`oracle_exits`).

    ``gate_logits(readout [n, h]) → [n]`` is the model's exit gate. ``vocab_parallel``: the
    logits a caller passes are this rank's megatron TP shard (the native engine; statistics
    combine across the TP group and decisions are broadcast from its first rank); False: they
    cover the full vocabulary and every rank computes the same decisions (vLLM's model, whose
    TP group is vLLM's own).
    """

    def __init__(self, config: ExitConfig, num_loops: int, batch_size: int, gate_logits,
                 vocab_parallel: bool = True):
        self.config, self.num_loops, self.gate_logits = config, num_loops, gate_logits
        self.vocab_parallel = vocab_parallel
        self.batch_size = batch_size
        self.log_survival: torch.Tensor | None = None  # q_exit: Σ_{j≤r} log σ(−g_j) [B]
        self.previous: torch.Tensor | None = None  # hidden_delta: readout of loop r−1 [B, h]
        if config.policy == "q_exit":
            self.log_stay_below = math.log1p(-config.threshold) if config.threshold < 1 \
                else -math.inf

    def after_loop(self, loop: int, readout: torch.Tensor, rows: torch.Tensor,
                   logits: torch.Tensor | None = None) -> torch.Tensor:
        """``logits`` [n, V/TP]: loop ``loop``'s head output of ``readout`` (confidence)."""
        if loop >= self.num_loops:
            return torch.ones(len(rows), dtype=torch.bool, device=readout.device)
        exits = self._policy_exits(loop, readout, rows, logits)
        if loop < self.config.min_loops:
            exits = torch.zeros_like(exits)
        return same_on_all_tp_ranks(exits) if self.vocab_parallel else exits

    def _policy_exits(self, loop, readout, rows, logits) -> torch.Tensor:
        policy = self.config.policy
        if policy == "q_exit":
            gate = self.gate_logits(readout).float()  # [n]
            if self.log_survival is None:
                self.log_survival = gate.new_zeros(self.batch_size)
            self.log_survival[rows] += torch.nn.functional.logsigmoid(-gate)
            return self.log_survival[rows] <= self.log_stay_below
        if policy == "confidence":
            return top2_probability_gap(logits, self.vocab_parallel) >= self.config.threshold
        if policy == "hidden_delta":
            current = readout.float()
            if self.previous is None:
                self.previous = current.new_zeros(self.batch_size, current.shape[-1])
                self.previous[rows] = current
                return torch.zeros(len(rows), dtype=torch.bool, device=readout.device)
            delta = (current - self.previous[rows]).norm(dim=-1) / current.norm(dim=-1)
            self.previous[rows] = current
            return delta < self.config.threshold
        # static; oracle decides after the last loop
        return torch.zeros(len(rows), dtype=torch.bool, device=readout.device)

    def oracle_exits(self, argmax_per_loop: torch.Tensor) -> torch.Tensor:
        """[R̃, B] argmax of every loop → [B] the earliest loop (1-based, ≥ min_loops) whose
        argmax equals loop R̃'s."""
        agrees = argmax_per_loop == argmax_per_loop[-1:]
        agrees[:self.config.min_loops - 1] = False
        agrees[-1] = True
        loops = torch.arange(1, agrees.shape[0] + 1, device=agrees.device)
        loops = loops.unsqueeze(1).expand_as(agrees)
        exits = torch.where(agrees, loops, agrees.shape[0] + 1).min(0).values
        return same_on_all_tp_ranks(exits) if self.vocab_parallel else exits


def choose_exit_readouts(config: ExitConfig, readouts: list[torch.Tensor], gate_logits,
                         full_logits) -> tuple[torch.Tensor, torch.Tensor]:
    """Readout selection with every loop already run (``kv_fill: compute``; vLLM's model):
    ``readouts`` [n, h] of loops 1..R̃ at the sampled positions → (each row's exit readout
    [n, h], its exit loop [n]). ``full_logits(readout) → [n, V]`` (full vocabulary) is called
    only for the policies that read the next-token distribution."""
    num_loops, rows = len(readouts), len(readouts[0])
    decider = ExitDecider(config, num_loops, rows, gate_logits, vocab_parallel=False)
    active = torch.arange(rows, device=readouts[0].device)
    logits = [full_logits(readout) if config.policy in LOGIT_POLICIES else None
              for readout in readouts]
    if config.policy == "oracle":
        exit_loops = decider.oracle_exits(torch.stack([z.argmax(-1) for z in logits]))
    else:
        exit_loops = torch.full((rows,), num_loops, dtype=torch.long, device=active.device)
        decided = torch.zeros(rows, dtype=torch.bool, device=active.device)
        for loop, (readout, loop_logits) in enumerate(zip(readouts, logits), start=1):
            new = decider.after_loop(loop, readout, active, loop_logits) & ~decided
            exit_loops[new] = loop
            decided |= new
    chosen = torch.stack(readouts)[exit_loops - 1, active]
    return chosen, exit_loops


# ----- statistics of vocab-parallel logits, without gathering the vocabulary -----

def top2_probability_gap(logits: torch.Tensor, vocab_parallel: bool = True) -> torch.Tensor:
    """[n, V/TP] logit shards (``vocab_parallel=False``: [n, V]) → [n] p(top-1) − p(top-2) of
    the full softmax.

    Each rank reduces its shard to its two largest logits and its log-sum-exp; those [n, 3]
    numbers are all-gathered (identical on every rank) and combined locally.
    """
    logits = logits.float()
    top = logits.topk(min(2, logits.shape[-1]), dim=-1).values
    if top.shape[-1] == 1:
        top = torch.cat([top, torch.full_like(top, -math.inf)], dim=-1)
    stats = torch.cat([top, logits.logsumexp(-1, keepdim=True)], dim=-1)
    stats = _all_gather_tp(stats) if vocab_parallel else stats.unsqueeze(1)
    maxima = stats[..., :2].flatten(-2)  # [n, 2·TP]
    best = maxima.topk(2, dim=-1).values
    log_normalizer = stats[..., 2].logsumexp(-1, keepdim=True)
    probs = (best - log_normalizer).exp()
    return probs[:, 0] - probs[:, 1]


def vocab_parallel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """[n, V/TP] logit shards → [n] argmax over the full vocabulary (first index on ties)."""
    values, indices = logits.float().max(dim=-1)
    rank, width = _tp_rank(), logits.shape[-1]
    stats = _all_gather_tp(torch.stack([values, (indices + rank * width).float()], dim=-1))
    # The earliest shard holding the maximum wins, as torch.argmax on the gathered logits.
    shard = stats[..., 0].argmax(dim=-1, keepdim=True)
    return stats[..., 1].gather(-1, shard).squeeze(-1).long()


def _tp_size() -> int:
    # Imported here: engine.py (imported by vLLM's plugin processes) reads ExitConfig from this
    # module without megatron-core.
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_tensor_model_parallel_world_size()


def _tp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank() if _tp_size() > 1 else 0


def _all_gather_tp(tensor: torch.Tensor) -> torch.Tensor:
    """[n, k] on every TP rank → [n, TP, k], ranks in order."""
    if _tp_size() == 1:
        return tensor.unsqueeze(1)
    from megatron.core import parallel_state

    parts = [torch.empty_like(tensor) for _ in range(_tp_size())]
    torch.distributed.all_gather(parts, tensor.contiguous(),
                                 group=parallel_state.get_tensor_model_parallel_group())
    return torch.stack(parts, dim=1)


def same_on_all_tp_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The TP group's first rank's ``tensor`` on every rank (decisions never diverge)."""
    if _tp_size() == 1:
        return tensor
    from megatron.core import parallel_state

    as_long = tensor.long().contiguous()
    torch.distributed.broadcast(as_long, src=parallel_state.get_tensor_model_parallel_src_rank(),
                                group=parallel_state.get_tensor_model_parallel_group())
    return as_long.to(tensor.dtype)
