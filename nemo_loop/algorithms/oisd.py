"""OISD adapted to loops: GRPO plus advantage-weighted self-distillation of intermediate loops.

    L = L_GRPO(loop R̃)
        + λ_logit · mean_r Σ_tokens w · clip(Â, −c, c) · JSD_τ(p^(r) ‖ sg p^(R̃))
        + λ_attn  · mean_r Σ_sampled steps w · clip(Â, −c, c) · mean_heads JSD(a^(r) ‖ sg a^(R̃))

for the configured intermediate loops r < R̃ (``oisd.loops``, default all of them). A loop's
readout goes through the shared final norm and head, so p^(r) is a logit lens; a^(r) are one
shared layer's attention rows at loop r, compared at a few sampled decoding steps over sampled
keys (``nemo_loop.losses.oisd``). Rollouts with above-average reward pull the intermediate
loops towards the last loop, below-average ones push them away. The paper's coefficients are
not public: the defaults (``conf/oisd.yaml``, ``OISDLossConfig``) are this project's choice,
documented in docs/baselines.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nemo_loop.algorithms.grpo import GRPOConfig, Objective, train_policy
from nemo_loop.losses.oisd import (
    OISDLossConfig,
    attention_jsd,
    logit_lens_jsd,
    sample_attention_steps,
)
from nemo_loop.models.looplm.attention_probe import AttentionProbe


@dataclass
class OISDConfig(GRPOConfig):
    ALGORITHM = "OISD"

    oisd: OISDLossConfig = field(default_factory=OISDLossConfig)
    output_dir: str = "runs/oisd"

    def validate(self, world_size: int | None = None, check_paths: bool = True) -> None:
        super().validate(world_size, check_paths)
        self.oisd.validate(self.rollout.student_loops, self.model.num_layers)
        if self.oisd.attention_coef > 0 and self.model.recompute != "none":
            # The probe taps the core attention's inputs during the forward; a recomputed layer
            # calls it again inside backward (selective: the first call runs without grad), and
            # the attention term's gradient would not reach the layer.
            raise ValueError(f"oisd.attention_coef > 0 needs model.recompute none (got "
                             f"{self.model.recompute!r}): the attention probe cannot see a "
                             f"recomputed attention; set oisd.attention_coef=0 to recompute")


class OISDObjective(Objective):
    def __init__(self, config: OISDConfig, model: torch.nn.Module):
        super().__init__(config, model)
        self.settings = config.oisd
        self.loops = self.settings.intermediate_loops(self.student_loops)
        self.probe = AttentionProbe(model, self.settings.attention_layer) \
            if self.settings.attention_coef > 0 else None
        self.total_heads = model.config.num_attention_heads
        self.seed = config.trainer.seed

    def logit_loops(self) -> list[int]:
        return self.loops + [self.student_loops]

    def recording(self):
        return super().recording() if self.probe is None else self.probe

    def loss(self, micro_batch: dict, output, normalizer) -> tuple[torch.Tensor, dict]:
        loss, metrics = super().loss(micro_batch, output, normalizer)
        weights, window = self.token_weights(micro_batch, normalizer), \
            micro_batch["response_window"]
        clip = self.settings.advantage_clip
        clipped = micro_batch["advantages"].clamp(-clip, clip)
        if self.settings.logit_coef > 0:
            with torch.no_grad():
                final_logits = self.model.logits(output.readouts[-1:, window])
            logit_term, per_loop = logit_lens_jsd(
                output.readouts[:-1, window], self.model.output_weight(), final_logits,
                micro_batch["loss_mask"].t(), weights * clipped[None], self.settings.temperature,
                self.tp_group, self.config.loss.chunk_size)
            loss = loss + self.settings.logit_coef * logit_term
            metrics["oisd_logit_term"] = logit_term.detach()
            metrics["oisd_logit_term_per_loop"] = per_loop
        metrics["loss"] = loss.detach()
        if self.probe is not None:
            # This rank's heads only: their sum over TP ranks is the head average.
            attention_term = self._attention_term(micro_batch, weights.sum(0) * clipped)
            every_head = attention_term.detach().clone()
            torch.distributed.all_reduce(every_head, group=self.tp_group)
            metrics["oisd_attention_term"] = every_head
            metrics["loss"] = metrics["loss"] + self.settings.attention_coef * every_head
            loss = loss + self.settings.attention_coef * attention_term
        return loss, metrics

    def _attention_term(self, micro_batch: dict, sequence_weights: torch.Tensor
                        ) -> torch.Tensor:
        """Mean over the loops r of the advantage-weighted attention-row JSD."""
        rollouts = micro_batch["rollouts"]
        samples = sample_attention_steps(
            [len(r.response) for r in rollouts], micro_batch["prompt_length"],
            [len(r.prompt) for r in rollouts], [r.uid for r in rollouts],
            f"{self.seed}/{micro_batch['step']}", self.settings, sequence_weights)
        mask = micro_batch["attention_mask"]  # the probe's key for this micro-batch
        final_query, final_key = self.probe.query_key(mask, self.student_loops)
        terms = []
        for loop in self.loops:
            query, key = self.probe.query_key(mask, loop)
            terms.append(attention_jsd(query, key, final_query, final_key, samples,
                                       self.probe.softmax_scale, self.total_heads))
        return torch.stack(terms).mean()


def train(config: OISDConfig) -> list[dict]:
    return train_policy(config, OISDObjective)
