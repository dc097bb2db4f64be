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
    total = prompt_len + response_len
    # Padded in Python and converted once: a tensor per row costs more than the step's model
    # work on small models (see benchmarks/step_overhead.py).
    input_ids = torch.tensor([[pad_id] * (prompt_len - len(p)) + list(p) + list(r)
                              + [pad_id] * (response_len - len(r))
                              for p, r in zip(prompts, responses)], dtype=torch.long)
    columns = torch.arange(total)
    starts = torch.tensor([prompt_len - len(p) for p in prompts])
    ends = torch.tensor([prompt_len + len(r) for r in responses])
    real = (columns >= starts[:, None]) & (columns < ends[:, None])
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
    if any(len(r) > response_length for r in responses):
        raise ValueError(f"a response is longer than response_length={response_length}")
    ids = torch.tensor([list(r) + [pad_id] * (response_length - len(r)) for r in responses],
                       dtype=torch.long).reshape(len(responses), response_length).t()
    lengths = torch.tensor([len(r) for r in responses], dtype=torch.long)
    mask = (torch.arange(response_length)[:, None] < lengths[None]).float()
    return ids, mask


def teacher_forced_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                         response_weights: torch.Tensor | None = None) -> dict:
    """A next-token micro-batch dict of prompt + response rows (supervised training).

    ``input_ids``/``position_ids``/``attention_mask`` drop the last column and ``labels`` are
    the ids shifted by one, so column P − 1 + t predicts response token t. ``loss_mask``
    ``[b, P + T − 1]`` is 1 at the columns that predict a row's own response tokens (0 past its
    end), or ``response_weights`` ``[T, b]`` placed there instead. ``row_lengths`` ``[b]``: each
    row's real prompt + response − 1 tokens, the ones that predict a next token (FLOPs count).
    """
    batch = build_batch(prompts, responses, pad_id)
    _, mask = response_targets(responses, batch.response_length, pad_id)
    weights = mask if response_weights is None else response_weights
    if weights.shape != mask.shape:
        raise ValueError(f"response_weights must be [T, b] = {tuple(mask.shape)}, got "
                         f"{tuple(weights.shape)}")
    loss_mask = torch.zeros(len(prompts), batch.input_ids.shape[1] - 1, dtype=weights.dtype)
    loss_mask[:, batch.response_window] = weights.t()
    return dict(input_ids=batch.input_ids[:, :-1], labels=batch.input_ids[:, 1:],
                position_ids=batch.position_ids[:, :-1],
                attention_mask=batch.attention_mask[:, :, :-1, :-1], loss_mask=loss_mask,
                row_lengths=torch.tensor([len(p) + len(r) - 1
                                          for p, r in zip(prompts, responses)]))


def micro_batch_rows(prompt_lengths: list[int], response_lengths: list[int], max_rows: int,
                     max_tokens: int | None = None) -> list[list[int]]:
    """Which rows go into each micro-batch (row indices, each row exactly once).

    Without ``max_tokens``: consecutive groups of ``max_rows`` rows, in order. With it
    (NeMo-RL's dynamic batching): rows sorted by length, longest first, and packed greedily
    into micro-batches of at most ``max_rows`` rows whose padded size — rows × (longest prompt
    + longest response), what :func:`build_batch` allocates — stays within ``max_tokens``; so
    a batch with a long tail of lengths does not pad every row to the longest. A row longer
    than ``max_tokens`` alone still forms a micro-batch.
    """
    if len(prompt_lengths) != len(response_lengths):
        raise ValueError(f"{len(prompt_lengths)} prompt lengths but {len(response_lengths)} "
                         f"response lengths")
    if max_rows < 1 or (max_tokens is not None and max_tokens < 1):
        raise ValueError(f"max_rows and max_tokens must be >= 1, got {max_rows}, {max_tokens}")
    count = len(prompt_lengths)
    if max_tokens is None:
        return [list(range(start, min(start + max_rows, count)))
                for start in range(0, count, max_rows)]
    order = sorted(range(count), key=lambda i: (-(prompt_lengths[i] + response_lengths[i]), i))
    groups, current, prompt_width, response_width = [], [], 0, 0
    for row in order:
        wider_prompt = max(prompt_width, prompt_lengths[row])
        wider_response = max(response_width, max(response_lengths[row], 1))
        fits = (len(current) + 1) * (wider_prompt + wider_response) <= max_tokens
        if current and (len(current) == max_rows or not fits):
            groups.append(current)
            current, wider_prompt, wider_response = [], prompt_lengths[row], \
                max(response_lengths[row], 1)
        current.append(row)
        prompt_width, response_width = wider_prompt, wider_response
    if current:
        groups.append(current)
    return groups


def padded_tokens(prompt_lengths: list[int], response_lengths: list[int],
                  groups: list[list[int]]) -> int:
    """Token slots the micro-batches of ``groups`` allocate (rows × padded width each)."""
    return sum(len(rows) * (max(prompt_lengths[i] for i in rows)
                            + max(max(response_lengths[i] for i in rows), 1))
               for rows in groups)
