"""Cost of one pretraining step through the project's machinery vs a plain PyTorch loop (CPU).

Run: ``python benchmarks/step_overhead.py`` (about a minute). One process, the default
pretraining setup of ``conf/pretrain.yaml`` (the tiny LoopLM, R = 4, one micro-batch of 128
shell games, Ouro's loss with β = 0.05).

Cases, both on the same megatron-core ``LoopGPTModel`` with the same initial weights:
  ours   one step of ``nemo_loop.algorithms.pretrain``: the step's micro-batches are drawn and
         tokenized (``my_micro_batches``), then ``train_step``: megatron-core's DDP and
         distributed optimizer (Adam, grad clipping, LR schedule) and the loop-aware pipeline
         schedule (``forward_backward_loops``), metrics averaged.
  plain  the same batch, prebuilt once: ``model(...)`` with autograd through all loops, the same
         loss, one ``backward``, ``clip_grad_norm_`` and ``torch.optim.AdamW``.

Method: both steps alternate (ours, plain, ours, ...) after warm-up, so load from other
processes on the machine hits both alike; each is timed with ``perf_counter`` and the median
over the steps is reported. ``ratio`` is ours / plain; ``ratio_without_data`` leaves out the
data building, which the plain loop does not do. The JSON line is the last line printed.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nemo_loop.algorithms.common import build_optimizer, train_step, wrap_data_parallel  # noqa: E402
from nemo_loop.algorithms.pretrain import PretrainConfig, my_micro_batches  # noqa: E402
from nemo_loop.config import CONF_DIR, load_config  # noqa: E402
from nemo_loop.losses.normalization import LossNormalizer  # noqa: E402
from nemo_loop.losses.ouro_pretrain import ouro_pretraining_loss  # noqa: E402
from nemo_loop.models.looplm.model import build_loop_model  # noqa: E402
from nemo_loop.tasks import build_task  # noqa: E402
from nemo_loop.utils.distributed import init_distributed, initialize_model_parallel  # noqa: E402

WARMUP_STEPS, TIMED_STEPS = 3, 12
SEED = 1234


def _loss_func(beta: float):
    def loss_func(batch, output, normalizer):
        return ouro_pretraining_loss(output, batch["labels"], batch["loss_mask"], beta,
                                     normalizer)
    return loss_func


class OurStep:
    """What ``pretrain()`` runs per step, minus logging and checkpointing."""

    def __init__(self, config: PretrainConfig):
        self.config = config
        self.task = build_task(config.task)
        self.tokenizer = self.task.tokenizer()
        initialize_model_parallel(config.parallel, seed=SEED)
        model = build_loop_model(config.model.transformer_config(1, 1, False))
        self.initial = {name: p.detach().clone() for name, p in model.state_dict().items()
                        if isinstance(p, torch.Tensor)}
        self.ddp = wrap_data_parallel(model, config.optim.use_distributed_optimizer)
        self.optimizer, self.scheduler = build_optimizer(self.ddp, config.optim)
        self.data_seconds = []

    def __call__(self, step: int) -> None:
        started = time.perf_counter()
        micro_batches = my_micro_batches(self.config, self.task, self.tokenizer, step)
        self.data_seconds.append(time.perf_counter() - started)
        loss_func = _loss_func(self.config.trainer.entropy_beta)
        train_step(self.ddp, self.optimizer, self.scheduler, micro_batches, loss_func)


class PlainStep:
    """The same model and batch in a textbook PyTorch loop."""

    def __init__(self, config: PretrainConfig, initial_weights: dict, batches: list[dict]):
        self.model = build_loop_model(config.model.transformer_config(1, 1, False))
        self.model.load_state_dict(initial_weights, strict=False)
        optim = config.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=optim.lr,
                                           betas=(optim.adam_beta1, optim.adam_beta2),
                                           eps=optim.adam_eps, weight_decay=optim.weight_decay)
        self.clip = optim.clip_grad
        self.batches = batches
        self.loss_func = _loss_func(config.trainer.entropy_beta)
        self.normalizer = LossNormalizer.count([batch["loss_mask"] for batch in batches])

    def __call__(self, step: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for batch in self.batches:
            output = self.model(batch["input_ids"], batch["position_ids"],
                                batch["attention_mask"])
            loss, _ = self.loss_func(batch, output, self.normalizer)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()


def _timed(step_fn, step: int) -> float:
    started = time.perf_counter()
    step_fn(step)
    return time.perf_counter() - started


def main() -> None:
    init_distributed()
    config = load_config(PretrainConfig, CONF_DIR / "pretrain.yaml", [])
    ours = OurStep(config)
    plain = PlainStep(config, ours.initial,
                      my_micro_batches(config, ours.task, ours.tokenizer, step=1))
    times = {"ours": [], "plain": []}
    for step in range(1, WARMUP_STEPS + TIMED_STEPS + 1):
        for name, fn in (("ours", ours), ("plain", plain)):
            seconds = _timed(fn, step)
            if step > WARMUP_STEPS:
                times[name].append(seconds)
    data = statistics.median(ours.data_seconds[WARMUP_STEPS:])
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"ours  {median['ours'] * 1e3:7.1f} ms/step (of which data {data * 1e3:.1f} ms)")
    print(f"plain {median['plain'] * 1e3:7.1f} ms/step")
    print(json.dumps({
        "bench": "step_overhead", "steps": TIMED_STEPS,
        "ours_ms": round(median["ours"] * 1e3, 1), "plain_ms": round(median["plain"] * 1e3, 1),
        "data_ms": round(data * 1e3, 1),
        "ratio": round(median["ours"] / median["plain"], 3),
        "ratio_without_data": round((median["ours"] - data) / median["plain"], 3),
        "target_ratio": 1.15}))


if __name__ == "__main__":
    main()
