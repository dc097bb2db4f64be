"""A synthetic reasoning task for CPU runs: the sum of k operands modulo P.

``[BOS] a₁ + a₂ + … + a_k = s [EOS]`` with s = Σ aᵢ mod P. Composing k modular additions takes
several serial steps, so a LoopLM can spend extra loops on it; the operands are uniform, so the
only learnable tokens are the answer and EOS, which is where the loss mask points.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD, BOS, EOS, PLUS, EQUALS = 0, 1, 2, 3, 4
FIRST_DIGIT = 5


@dataclass
class ModularSumConfig:
    modulus: int = 23
    num_operands: int = 4
    seed: int = 0

    def validate(self, vocab_size: int) -> None:
        if self.modulus < 2 or self.num_operands < 1:
            raise ValueError("data: modulus must be >= 2 and num_operands >= 1")
        if FIRST_DIGIT + self.modulus > vocab_size:
            raise ValueError(f"data: modulus {self.modulus} needs a vocab of at least "
                             f"{FIRST_DIGIT + self.modulus}, the model has {vocab_size}")

    @property
    def sequence_length(self) -> int:
        return 2 * self.num_operands + 3  # BOS, operands and pluses, '=', answer, EOS


def sample_batch(config: ModularSumConfig, batch_size: int, generator: torch.Generator) -> dict:
    """input_ids/labels/loss_mask of shape [batch, seq] for next-token prediction."""
    operands = torch.randint(0, config.modulus, (batch_size, config.num_operands),
                             generator=generator)
    answer = operands.sum(1) % config.modulus
    pieces = [torch.full((batch_size, 1), BOS)]
    for index in range(config.num_operands):
        if index:
            pieces.append(torch.full((batch_size, 1), PLUS))
        pieces.append(FIRST_DIGIT + operands[:, index: index + 1])
    pieces += [torch.full((batch_size, 1), EQUALS), FIRST_DIGIT + answer[:, None],
               torch.full((batch_size, 1), EOS)]
    tokens = torch.cat(pieces, dim=1)
    loss_mask = torch.zeros(batch_size, tokens.shape[1] - 1)
    loss_mask[:, -2:] = 1.0  # predicting the answer and EOS
    return dict(input_ids=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=loss_mask,
                answer=answer)
