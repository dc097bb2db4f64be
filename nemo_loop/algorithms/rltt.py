"""RLTT (Reward Latent Thought Trajectories): GRPO's rollouts and advantages, with the policy
gradient summed over the loops of the latent trajectory.

    L = −(1/G) Σ_i (1/|y_i|) Σ_j Σ_t ω_t · log p^(t)(y_ij | x, y_i,<j) · Â_i  +  β · k3 KL at loop R̃

Each loop's log-prob is taken on the sampled token through the shared head (fused over the
TP-sharded vocabulary) at the rollout temperature. Loop weights ``rltt.weighting``:

* ``uniform``: ω_t = 1/R̃;
* ``progressive``: ω_t = t^γ / Σ_s s^γ (``rltt.gamma``);
* ``exit_pdf``: the current model's per-token exit distribution over the R̃ loops, from the same
  forward and *not* detached, so the policy gradient also trains the exit gate;
* ``learned``: softmax of a learnable R̃-vector, trained jointly with its own Adam
  (``rltt.learned_lr``, default 10 × ``optim.lr`` as in the published RLTT code; no weight
  decay, not clipped), checkpointed with the run.

Defaults are the published RLTT code's: G = 8, lr 1e-6, KL 0.001, grad clip 0.1, rollout
temperature 1.0, exit_pdf weights (``conf/rltt.yaml``). RLTT has no importance ratio, so it is
on-policy: one update per batch of rollouts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule

from nemo_loop.algorithms.grpo import GRPOConfig, Objective, train_policy
from nemo_loop.losses.policy_gradient import (
    RLTT_WEIGHTINGS,
    rltt_loop_weights,
    rltt_loss,
)


@dataclass
class RLTTLoopConfig:
    weighting: str = "exit_pdf"  # uniform | progressive | exit_pdf | learned
    gamma: float = 1.0  # progressive: ω_t ∝ t^γ
    learned_lr: float | None = None  # learned: Adam lr of the loop-weight logits (None: 10 × lr)

    def validate(self) -> None:
        if self.weighting not in RLTT_WEIGHTINGS:
            raise ValueError(f"rltt.weighting must be one of {RLTT_WEIGHTINGS}, got "
                             f"{self.weighting!r}")
        if not self.gamma >= 0:
            raise ValueError(f"rltt.gamma must be >= 0, got {self.gamma}")
        if self.learned_lr is not None and not self.learned_lr > 0:
            raise ValueError(f"rltt.learned_lr must be > 0 or null, got {self.learned_lr}")


@dataclass
class RLTTConfig(GRPOConfig):
    ALGORITHM = "RLTT"

    # optim, loss and rollout defaults are GRPOConfig's: the published RLTT code's.
    rltt: RLTTLoopConfig = field(default_factory=RLTTLoopConfig)
    output_dir: str = "runs/rltt"

    def validate(self, world_size: int | None = None, check_paths: bool = True) -> None:
        super().validate(world_size, check_paths)
        self.rltt.validate()
        if self.trainer.updates_per_batch != 1:
            raise ValueError(f"RLTT is on-policy (no importance ratio): trainer.updates_per_batch "
                             f"must be 1, got {self.trainer.updates_per_batch}")

    def learned_lr(self) -> float:
        return self.rltt.learned_lr if self.rltt.learned_lr is not None else 10 * self.optim.lr


class LearnedLoopWeights(MegatronModule):
    """ω = softmax(logits), logits ∈ R^R̃ starting at 0 (uniform); replicated on every rank."""

    def __init__(self, config, num_loops: int):
        super().__init__(config=config)
        self.logits = torch.nn.Parameter(torch.zeros(num_loops, dtype=torch.float32))


class RLTTObjective(Objective):
    def __init__(self, config: RLTTConfig, model: torch.nn.Module):
        super().__init__(config, model)
        self.weighting = config.rltt
        self.learned = None
        if self.weighting.weighting == "learned":
            self.learned = LearnedLoopWeights(model.config, self.student_loops)
            optim = config.optim
            self.learned_optimizer = torch.optim.Adam(
                self.learned.parameters(), lr=config.learned_lr(),
                betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_eps)

    def logit_loops(self) -> list[int]:
        return list(range(1, self.student_loops + 1))

    def extra_modules(self) -> dict:
        return {} if self.learned is None else {"rltt_loop_weights": self.learned}

    def before_update(self) -> None:
        if self.learned is not None:
            self.learned_optimizer.zero_grad(set_to_none=False)

    def after_update(self) -> None:
        """Average the loop-weight gradient over DP (every TP rank has the same one), step."""
        if self.learned is None:
            return
        grad = self.learned.logits.grad
        if grad is None:
            return
        group = parallel_state.get_data_parallel_group()
        if parallel_state.get_data_parallel_world_size() > 1:
            torch.distributed.all_reduce(grad, group=group)
            grad /= parallel_state.get_data_parallel_world_size()
        self.learned_optimizer.step()

    def state_dict(self) -> dict:
        """The learned weights' Adam moments (JSON floats round-trip float32 exactly)."""
        if self.learned is None:
            return {}
        state = self.learned_optimizer.state.get(self.learned.logits)
        if not state:
            return {"learned_adam": None}
        return {"learned_adam": {"step": float(state["step"]),
                                 "exp_avg": state["exp_avg"].tolist(),
                                 "exp_avg_sq": state["exp_avg_sq"].tolist()}}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("learned_adam") if self.learned is not None else None
        if saved is None:
            return
        as_tensor = lambda values: torch.tensor(values, dtype=torch.float32)
        self.learned_optimizer.state[self.learned.logits] = {
            "step": torch.tensor(saved["step"], dtype=torch.float32),
            "exp_avg": as_tensor(saved["exp_avg"]), "exp_avg_sq": as_tensor(saved["exp_avg_sq"])}

    def loss(self, micro_batch: dict, output, normalizer) -> tuple[torch.Tensor, dict]:
        weights = self.token_weights(micro_batch, normalizer)
        per_loop, entropies = zip(*[self.logprobs(readout, micro_batch)
                                    for readout in output.readouts])
        window = micro_batch["response_window"]
        omega = rltt_loop_weights(
            self.weighting.weighting, self.student_loops, gamma=self.weighting.gamma,
            exit_probs=output.exit_probs[:, window] if self.weighting.weighting == "exit_pdf"
            else None,
            learned_logits=None if self.learned is None else self.learned.logits)
        loss, metrics = rltt_loss(torch.stack(per_loop), omega, micro_batch["advantages"],
                                  weights, self.config.loss, micro_batch.get("reference_logprobs"))
        metrics["entropy"] = (weights * entropies[-1]).sum()
        return loss, metrics


def train(config: RLTTConfig) -> list[dict]:
    return train_policy(config, RLTTObjective)
