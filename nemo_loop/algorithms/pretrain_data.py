"""Where pretraining sequences come from: ``data.source`` picks the synthetic task (the
``task`` section, :class:`nemo_loop.algorithms.pretrain.TaskSource`) or a tokenized text corpus
(``data.text``, :class:`TextSource` here, on megatron-core's ``GPTDataset``).

A source gives the run its tokenizer, this rank's micro-batches of step k (a function of k
alone, so resuming needs no data position) and held-out metrics per loop: answer accuracy for a
task, cross-entropy on the validation/test splits for text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.utils import unwrap_model

from nemo_loop.data.chat import ChatConfig, ChatTokenizer
from nemo_loop.data.text import TextCorpus, TextDataConfig
from nemo_loop.losses.token_logprobs import token_logprobs
from nemo_loop.models.looplm.pipeline import forward_backward_loops

SOURCES = ("task", "text")


@dataclass
class PretrainDataConfig:
    # task: sequences the synthetic task draws (the `task` section); text: the corpus of `text`.
    source: str = "task"
    text: TextDataConfig = field(default_factory=TextDataConfig)

    def validate(self, vocab_size: int, max_sequence_length: int,
                 check_paths: bool = True) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data.source must be one of {SOURCES}, got {self.source!r}")
        if self.source == "text":
            self.text.validate(vocab_size, max_sequence_length, check_paths=check_paths)
        elif self.text != TextDataConfig():
            raise ValueError("data.text is set but data.source is 'task'; set "
                             "data.source=text or remove the data.text settings")


def my_rows(config, step: int) -> list[range]:
    """Global-batch rows of ``step`` (1-based) that this data-parallel rank trains on, one
    range per micro-batch."""
    trainer = config.trainer
    per_rank = trainer.global_batch_size // parallel_state.get_data_parallel_world_size()
    first = (step - 1) * trainer.global_batch_size \
        + parallel_state.get_data_parallel_rank() * per_rank
    return [range(first + start, first + min(start + trainer.micro_batch_size, per_rank))
            for start in range(0, per_rank, trainer.micro_batch_size)]


class TextSource:
    """Training micro-batches and held-out per-loop cross-entropy from ``data.text``. Building
    the corpus is collective (every rank of the job)."""

    def __init__(self, config):
        text = config.data.text
        self.config = config
        self.tokenizer = ChatTokenizer.from_file(ChatConfig(tokenizer_path=text.tokenizer_path))
        trainer = config.trainer
        self.corpus = TextCorpus(text, trainer.max_steps * trainer.global_batch_size,
                                 seed=trainer.data_seed)

    def micro_batches(self, step: int) -> list[dict]:
        return [self.corpus.batch("train", list(rows)) for rows in my_rows(self.config, step)]

    @torch.no_grad()
    def heldout_metrics(self, model, split: str) -> dict:
        """``<split>_ce_per_loop``: the token-mean cross-entropy of every loop on the first
        ``data.text.<split>_sequences`` sequences (on the last pipeline stage; {} elsewhere)."""
        count = self.corpus.heldout_count(split)
        size = self.config.trainer.micro_batch_size
        batches = [self.corpus.batch(split, list(range(start, min(start + size, count))))
                   for start in range(0, count, size)]
        if not batches:
            return {}
        outputs = forward_backward_loops(model, batches, None, compute_logits=False,
                                         forward_only=True)
        if not outputs:
            return {}
        stage = unwrap_model(model)
        total = tokens = 0.0
        for batch, output in zip(batches, outputs):
            readouts = output.readouts
            if stage.config.sequence_parallel:
                readouts = torch.stack([gather_from_sequence_parallel_region(r)
                                        for r in readouts])
            targets = batch["labels"].t().to(readouts.device)
            logp, _ = token_logprobs(readouts, stage.output_weight(),
                                     targets.expand(readouts.shape[0], *targets.shape),
                                     parallel_state.get_tensor_model_parallel_group())
            mask = batch["loss_mask"].t().to(logp)
            total = total + (-logp * mask).sum((1, 2))
            tokens += float(mask.sum())
        return {f"{split}_ce_per_loop": (total / max(tokens, 1.0)).tolist()}
