"""Fixed vs token-budget micro-batches on a long-tailed length distribution (CPU).

Run: ``python benchmarks/micro_batching.py`` (a minute or two). One process.

The rows: 48 MATH problems with their worked solutions (``math_test_full/test.jsonl`` under the
data root), in the Ouro tokenizer's chat format — prompt = the problem in ChatML, response = the
solution — drawn at random among those of at most 512 tokens: the response lengths have a long
tail (MATH solutions run from a line to a page; median ≈ 160 tokens, p90 ≈ 370). The model is the tiny LoopLM (2 layers × R̃ = 2
loops, hidden 64) with token ids folded into its 64-token vocabulary: lengths, not token
identities, set the cost.

Cases, the same 48 rows through one SFT training step (``sft.teacher_forced_micro_batches`` and
``sft.supervised_loss_function`` with ``common.train_step``):
  fixed   ``trainer.micro_batch_size=8``: consecutive rows, each micro-batch padded to its own
          longest prompt and response;
  budget  ``trainer.max_tokens_per_micro_batch=4096`` (8 rows × the 512-token maximum, so no
          micro-batch is larger than fixed's worst case): rows sorted by length and packed.

Reported: the padding fraction (padded slots / slots allocated), training tokens/s (response
tokens per second of the step), their ratios, and the two steps' losses, which must agree (the
loss is normalized over the whole step, so packing cannot change it). Both cases alternate after
a warm-up so load from other processes hits both alike; the median step time is used. The JSON
line is the last line printed.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nemo_loop.algorithms.common import (  # noqa: E402
    OptimConfig,
    build_optimizer,
    train_step,
    wrap_data_parallel,
)
from nemo_loop.algorithms.sft import (  # noqa: E402
    SFTExample,
    SFTLossConfig,
    SFTTrainerConfig,
    supervised_loss_function,
    teacher_forced_micro_batches,
)
from nemo_loop.config import CONF_DIR, read_section  # noqa: E402
from nemo_loop.data.chat import ChatConfig, ChatTokenizer  # noqa: E402
from nemo_loop.data.prompts import data_path  # noqa: E402
from nemo_loop.losses.supervised import logit_loops_for  # noqa: E402
from nemo_loop.models.looplm.config import LoopModelConfig  # noqa: E402
from nemo_loop.models.looplm.model import build_loop_model  # noqa: E402
from nemo_loop.utils.distributed import (  # noqa: E402
    ParallelConfig,
    init_distributed,
    initialize_model_parallel,
)

ROWS, MAX_TOKENS, MICRO_BATCH = 48, 512, 8
STUDENT_LOOPS, WARMUP, TIMED = 2, 1, 2
SOURCE = "math_test_full/test.jsonl"


def long_tailed_examples(vocab_size: int) -> list[SFTExample]:
    tokenizer = ChatTokenizer.from_file(ChatConfig(tokenizer_path="tokenizer/ouro-1.4b"))
    records = [json.loads(line) for line in data_path(SOURCE).read_text().splitlines()]
    random.Random(0).shuffle(records)
    examples = []
    for record in records:
        prompt = tokenizer.encode_prompt(record["problem"])
        response = tokenizer.encode_response(record["solution"])
        if len(prompt) + len(response) <= MAX_TOKENS:
            examples.append(SFTExample([t % vocab_size for t in prompt],
                                       [t % vocab_size for t in response]))
        if len(examples) == ROWS:
            return examples
    raise RuntimeError(f"{SOURCE} has fewer than {ROWS} examples of <= {MAX_TOKENS} tokens")


def padding(micro_batches: list[dict]) -> tuple[int, int]:
    """(real tokens, slots allocated) of the micro-batches' inputs."""
    real = sum(int(batch["row_lengths"].sum()) for batch in micro_batches)
    return real, sum(batch["input_ids"].numel() for batch in micro_batches)


class Step:
    """One SFT step on fixed weights: the optimizer state is reset and the weights restored
    after each timed step, so every repetition computes the same thing."""

    def __init__(self, model_config: LoopModelConfig, micro_batches: list[dict]):
        torch.manual_seed(0)
        self.ddp = wrap_data_parallel(build_loop_model(model_config.transformer_config()))
        self.initial = {k: v.detach().clone() for k, v in self.ddp.module.state_dict().items()
                        if isinstance(v, torch.Tensor)}
        self.micro_batches = micro_batches
        self.loss_func = supervised_loss_function(SFTLossConfig(), self.ddp.module)

    def __call__(self) -> tuple[float, float]:
        self.ddp.module.load_state_dict(self.initial, strict=False)
        optimizer, scheduler = build_optimizer(self.ddp, OptimConfig())
        started = time.perf_counter()
        metrics = train_step(self.ddp, optimizer, scheduler, self.micro_batches,
                             self.loss_func, num_loops=STUDENT_LOOPS,
                             logit_loops=logit_loops_for("ouro", STUDENT_LOOPS),
                             compute_logits=False)
        return time.perf_counter() - started, metrics["loss"]


def main() -> None:
    init_distributed()
    initialize_model_parallel(ParallelConfig(), seed=0)
    tiny = read_section(CONF_DIR / "model" / "tiny.yaml", LoopModelConfig)
    model_config = replace(tiny, max_sequence_length=MAX_TOKENS)
    examples = long_tailed_examples(model_config.vocab_size)
    lengths = sorted(len(e.response) for e in examples)
    fixed = SFTTrainerConfig(micro_batch_size=MICRO_BATCH)
    budget = SFTTrainerConfig(micro_batch_size=ROWS,
                              max_tokens_per_micro_batch=MICRO_BATCH * MAX_TOKENS)
    cases = {name: teacher_forced_micro_batches(examples, trainer, pad_id=0)
             for name, trainer in (("fixed", fixed), ("budget", budget))}
    steps = {name: Step(model_config, batches) for name, batches in cases.items()}
    times, losses = {name: [] for name in cases}, {}
    for repetition in range(WARMUP + TIMED):
        for name, step in steps.items():
            seconds, losses[name] = step()
            if repetition >= WARMUP:
                times[name].append(seconds)
    response_tokens = sum(lengths)
    result = {"bench": "micro_batching", "rows": ROWS,
              "response_tokens_median": lengths[len(lengths) // 2],
              "response_tokens_p90": lengths[int(0.9 * len(lengths))],
              "response_tokens_max": lengths[-1]}
    for name, batches in cases.items():
        real, allocated = padding(batches)
        seconds = statistics.median(times[name])
        result[f"{name}_micro_batches"] = len(batches)
        result[f"{name}_padding_fraction"] = round(1 - real / allocated, 4)
        result[f"{name}_tokens_per_s"] = round(response_tokens / seconds, 1)
        print(f"{name:6s} {len(batches):2d} micro-batches, padding {1 - real / allocated:6.1%}, "
              f"{seconds * 1e3:7.1f} ms/step, {response_tokens / seconds:8.1f} tokens/s, "
              f"loss {losses[name]:.6f}")
    result["padding_ratio"] = round(result["budget_padding_fraction"]
                                    / result["fixed_padding_fraction"], 4)
    result["tokens_per_s_ratio"] = round(result["budget_tokens_per_s"]
                                         / result["fixed_tokens_per_s"], 3)
    result["loss_abs_diff"] = abs(losses["budget"] - losses["fixed"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
