"""The model side of the lm-eval adapter, free of lm_eval: check a checkpoint against what is
asked of it (cheap: no model is built), build the model, and score continuations.

Scoring reads loop R̃'s readout through the model's own API (``run_loops``, ``output_weight``)
and takes log-probs of the given tokens across the tensor-parallel vocabulary shards without
gathering the vocabulary (:mod:`nemo_loop.losses.token_logprobs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemo_loop.data.chat import ChatTokenizer
from nemo_loop.evaluation.lm_eval_config import LMEvalModelArgs
from nemo_loop.evaluation.model_loading import CheckpointLocation, locate_checkpoint
from nemo_loop.models.looplm.config import LoopModelConfig
from nemo_loop.tasks import build_task



@dataclass
class PreparedModel:
    """A resolved checkpoint and the tokenizer to read it with: everything but the weights."""

    location: CheckpointLocation
    model_config: LoopModelConfig
    prompter: ChatTokenizer

    @property
    def max_loops(self) -> int:
        return self.model_config.num_loops


@dataclass
class LoadedModel:
    model: torch.nn.Module  # LoopGPTModel (this rank's tensor-parallel shard), eval mode
    prompter: ChatTokenizer
    checkpoint: dict  # identity of the weights (model_loading.checkpoint_identity)


def prepare_model(args: LMEvalModelArgs, loop_budgets: list[int]) -> PreparedModel:
    """Resolve ``args.checkpoint`` and check the loop budgets, tokenizer and context window
    against it. Every error names the offending value; nothing is built or loaded."""
    from nemo_loop.checkpointing import check_compatible, tokenizer_identity

    location = locate_checkpoint(args.checkpoint, args.checkpoint_step)
    model_config = location.model_config
    bad = [r for r in loop_budgets if not 1 <= r <= model_config.num_loops]
    if bad:
        raise ValueError(f"loop budget(s) {bad} outside 1..R = 1..{model_config.num_loops} of "
                         f"checkpoint {location.directory} ({location.config_file})")
    prompter = build_task(args.task).tokenizer(args.data_root)
    prompter.check_fits(model_config.vocab_size)
    check_compatible(location.directory, model_config,
                     tokenizer_identity(prompter.tokenizer, prompter.source))
    check_max_length(args.max_length, model_config.max_sequence_length)
    return PreparedModel(location, model_config, prompter)


def check_max_length(max_length: int | None, max_sequence_length: int) -> int:
    """The context window requests are truncated to (default: the model's)."""
    if max_length is not None and max_length > max_sequence_length:
        raise ValueError(f"max_length={max_length} exceeds the model's max_sequence_length="
                         f"{max_sequence_length}")
    return max_length or max_sequence_length


def build_model(prepared: PreparedModel, args: LMEvalModelArgs) -> LoadedModel:
    """Build this rank's shard of the model and load the weights (the expensive part)."""
    from nemo_loop.evaluation.model_loading import build_eval_model, checkpoint_identity

    tensor_parallel = ensure_model_parallel(args.tensor_parallel)
    model = build_eval_model(prepared.model_config, prepared.location, tensor_parallel)
    return LoadedModel(model, prepared.prompter, checkpoint_identity(prepared.location,
                                                                     args.seed))


def ensure_model_parallel(tensor_parallel: int) -> int:
    """Join (or start) the process group and the model-parallel layout; every rank must be in
    one tensor-parallel group (lm-eval hands every rank the same requests)."""
    from megatron.core import parallel_state

    from nemo_loop.utils.distributed import (
        ParallelConfig,
        init_distributed,
        initialize_model_parallel,
    )

    init_distributed()
    if not parallel_state.model_parallel_is_initialized():
        initialize_model_parallel(ParallelConfig(tensor_parallel=tensor_parallel))
    layout = (parallel_state.get_tensor_model_parallel_world_size(),
              parallel_state.get_pipeline_model_parallel_world_size(),
              parallel_state.get_data_parallel_world_size())
    if layout != (tensor_parallel, 1, 1):
        raise ValueError(f"the lm-eval adapter runs tensor parallelism only (every rank sees "
                         f"every request): it needs TP={tensor_parallel}, PP=1, DP=1 (world "
                         f"size {tensor_parallel}), but the process group has TP={layout[0]}, "
                         f"PP={layout[1]}, DP={layout[2]}")
    return tensor_parallel


# ----- scoring -----

@torch.no_grad()
def continuation_scores(model, sequences: list[list[int]], continuation_lengths: list[int],
                        num_loops: int, pad_id: int) -> list[tuple[float, bool]]:
    """For each token sequence, (Σ log p of its last n tokens, whether each of them is the
    argmax) with p read out at loop ``num_loops``: one right-padded forward of the batch.

    Sequence i is fed without its last token; position t predicts token t + 1, so its last n
    tokens are predicted by positions len − 1 − n … len − 2. Right padding cannot reach them
    under the causal mask.
    """
    from megatron.core import parallel_state

    from nemo_loop.losses.token_logprobs import token_is_argmax, token_logprobs

    width = max(len(s) for s in sequences) - 1
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    rows, positions, targets = [], [], []
    for row, (sequence, n) in enumerate(zip(sequences, continuation_lengths)):
        if not 1 <= n < len(sequence):
            raise ValueError(f"a scored sequence of {len(sequence)} tokens needs 1 <= "
                             f"continuation length < {len(sequence)}, got {n}")
        tokens[row, :len(sequence) - 1] = torch.tensor(sequence[:-1])
        rows += [row] * n
        positions += range(len(sequence) - 1 - n, len(sequence) - 1)
        targets += sequence[-n:]
    readout = None
    for readout in model.run_loops(tokens, num_loops):  # keeps one loop's activations at a time
        pass
    hidden = readout[torch.tensor(positions), torch.tensor(rows)]  # [N, h]
    weight, ids = model.output_weight(), torch.tensor(targets)
    group = parallel_state.get_tensor_model_parallel_group() \
        if parallel_state.model_parallel_is_initialized() else None
    logp, _ = token_logprobs(hidden, weight, ids, group)
    greedy = token_is_argmax(hidden, weight, ids, group)
    scores, start = [], 0
    for n in continuation_lengths:
        scores.append((float(logp[start:start + n].double().sum()),
                       bool(greedy[start:start + n].all())))
        start += n
    return scores
