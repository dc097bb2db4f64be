"""Batches of prompt + response sequences in which every response starts at the same column.

Prompts are left-padded to a common length P and responses right-padded, so response token t
sits at column P + t for every sequence: the logits that predict it are at column P − 1 + t.
The student (prompt x) and the teacher (prompt c + x) get different P but the same response
window, which is what lets both score exactly the same tokens y.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptResponseBatch:
    input_ids: torch.Tensor  # [b, P + T]
    position_ids: torch.Tensor  # [b, P + T], 0 at each sequence's first real token
    attention_mask: torch.Tensor  # [b, 1, P + T, P + T] bool, True = may not attend
    prompt_length: int  # P
    response_length: int  # T

    @property
    def response_window(self) -> slice:
        """Columns whose logits predict the response tokens."""
        return slice(self.prompt_length - 1, self.prompt_length - 1 + self.response_length)

    def as_micro_batch(self, rows: slice) -> dict:
        return dict(input_ids=self.input_ids[rows], position_ids=self.position_ids[rows],
                    attention_mask=self.attention_mask[rows])


def build_batch(prompts: list[list[int]], responses: list[list[int]],
                pad_id: int) -> PromptResponseBatch:
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need as many prompts as responses (>0), got {len(prompts)} and "
                         f"{len(responses)}")
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    prompt_len = max(len(p) for p in prompts)
    response_len = max(1, max(len(r) for r in responses))
    batch, total = len(prompts), prompt_len + response_len
    input_ids = torch.full((batch, total), pad_id, dtype=torch.long)
    real = torch.zeros(batch, total, dtype=torch.bool)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        start = prompt_len - len(prompt)
        input_ids[row, start:prompt_len] = torch.tensor(prompt)
        input_ids[row, prompt_len:prompt_len + len(response)] = torch.tensor(response,
                                                                             dtype=torch.long)
        real[row, start:prompt_len + len(response)] = True
    position_ids = (torch.cumsum(real.long(), dim=1) - 1).clamp_min(0)
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    allowed = causal[None] & real[:, None, :]
    # Padding queries attend to themselves so no softmax row is empty.
    allowed |= torch.eye(total, dtype=torch.bool)[None]
    return PromptResponseBatch(input_ids, position_ids, (~allowed)[:, None], prompt_len,
                               response_len)


def response_targets(responses: list[list[int]], response_length: int,
                     pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Response ids and their loss mask, both ``[T, b]`` (megatron's sequence-first layout)."""
    ids = torch.full((response_length, len(responses)), pad_id, dtype=torch.long)
    mask = torch.zeros(response_length, len(responses))
    for column, response in enumerate(responses):
        ids[:len(response), column] = torch.tensor(response, dtype=torch.long)
        mask[:len(response), column] = 1.0
    return ids, mask
