"""Teacher-forced accuracy at every loop budget for single-token answers (pretraining monitor).

With a one-token answer, greedy generation at R̃ loops emits argmax of loop R̃'s logits at the
last prompt position, so one forward with the loop-dimension head scores every budget at once.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from nemo_loop.data.sequences import build_batch
from nemo_loop.models.looplm.pipeline import forward_backward_loops


@torch.no_grad()
def accuracy_per_loop(model, prompts: list[list[int]], answers: list[int], pad_id: int,
                      batch_size: int = 128) -> list[float] | None:
    """Fraction of correct greedy answers at loops 1..R (None on non-last pipeline stages)."""
    correct = None
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        batch = build_batch(chunk, [[] for _ in chunk], pad_id)
        outputs = forward_backward_loops(model, [batch.as_micro_batch(slice(None))], None,
                                         forward_only=True)
        if not outputs:
            return None
        logits = outputs[0].logits[:, batch.prompt_length - 1]  # [R, b, V/TP]
        # The answer position only: gathering its full-vocab logits is [R, b, V], cheap.
        predictions = gather_from_tensor_model_parallel_region(logits.contiguous()).argmax(-1)
        hits = (predictions == torch.tensor(answers[start:start + batch_size])).sum(-1)
        correct = hits if correct is None else correct + hits
    return (correct.double() / len(prompts)).tolist()
