"""One pretraining step with SDPA core attention vs megatron's DotProductAttention (CPU).

Run: ``python benchmarks/attention_backends.py`` (about 10 minutes on an idle 2-core machine;
``--seq 512,2048`` for a shorter run). For s ∈ {512, 2,048, 4,096}: a LoopLM of 2 shared
layers × R = 2 loops, hidden 128, 4 heads, SwiGLU 352, vocabulary 1,024, fp32, one sequence of s
random tokens (causal, no padding); one step of ``train_step`` (megatron DDP + distributed
optimizer, the loop pipeline, Ouro's loss), both backends from the same initial weights.

Method: per s, both backends are built, warmed up with one step (Adam's state appears), then
timed alternately (sdpa, dot_product, sdpa, ...) ``--repeats`` times each, keeping each one's
fastest step, so load from other processes hits both alike. Peak memory is one more step under
``PeakTensorMemory`` (allocator level: every tensor the step allocates, activations,
gradients of activations and temporaries; the weights, gradient buffer and Adam state existed
before the step and are not in it). The last line printed is one JSON line with the ratios
dot_product / sdpa per s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BACKENDS = ("sdpa", "dot_product")
VOCAB = 1024


def _model_config(seq: int, backend: str):
    from nemo_loop.models.looplm.config import LoopModelConfig

    return LoopModelConfig(num_layers=2, hidden_size=128, ffn_hidden_size=352,
                           num_attention_heads=4, num_query_groups=4, vocab_size=VOCAB,
                           max_sequence_length=seq, num_loops=2, attention_backend=backend)


class Step:
    """One backend's model, optimizer and fixed micro-batch; calling it runs one train step."""

    def __init__(self, seq: int, backend: str, weights: dict | None):
        from nemo_loop.algorithms.common import OptimConfig, build_optimizer, wrap_data_parallel
        from nemo_loop.models.looplm.model import build_loop_model

        torch.manual_seed(0)
        model = build_loop_model(_model_config(seq, backend).transformer_config())
        if weights is not None:
            model.load_state_dict(weights)
        self.weights = {k: v.clone() for k, v in model.state_dict().items()
                        if isinstance(v, torch.Tensor)}
        self.ddp = wrap_data_parallel(model)
        self.optimizer, self.scheduler = build_optimizer(self.ddp, OptimConfig())
        tokens = torch.randint(0, VOCAB, (1, seq + 1), generator=torch.Generator().manual_seed(1))
        self.batches = [dict(input_ids=tokens[:, :-1], labels=tokens[:, 1:],
                             loss_mask=torch.ones(1, seq))]

    def __call__(self) -> float:
        from nemo_loop.algorithms.common import train_step
        from nemo_loop.losses.ouro_pretrain import ouro_pretraining_loss

        def loss_func(batch, output, normalizer):
            return ouro_pretraining_loss(output, batch["labels"], batch["loss_mask"],
                                         normalizer=normalizer)

        started = time.perf_counter()
        metrics = train_step(self.ddp, self.optimizer, self.scheduler, self.batches, loss_func)
        self.loss = metrics["loss"]
        return time.perf_counter() - started


def bench(seq: int, repeats: int) -> dict:
    from nemo_loop.utils.memory import PeakTensorMemory

    steps = {}
    for backend in BACKENDS:
        weights = next(iter(steps.values())).weights if steps else None
        steps[backend] = Step(seq, backend, weights)
        steps[backend]()  # warm-up: Adam's state, allocator
    times = {backend: float("inf") for backend in BACKENDS}
    for _ in range(repeats):
        for backend, step in steps.items():
            times[backend] = min(times[backend], step())
    peaks = {}
    for backend, step in steps.items():
        with PeakTensorMemory("cpu") as peak:
            step()
        peaks[backend] = peak.bytes / 2**20
    same = abs(steps["sdpa"].loss - steps["dot_product"].loss) <= 1e-4 * abs(steps["sdpa"].loss)
    return {"times": times, "peaks": peaks, "same_loss": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", default="512,2048,4096")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from nemo_loop.utils.distributed import (
        ParallelConfig,
        init_distributed,
        initialize_model_parallel,
    )

    init_distributed()
    initialize_model_parallel(ParallelConfig())
    seqs = [int(s) for s in args.seq.split(",")]
    results = {seq: bench(seq, args.repeats) for seq in seqs}
    print(f"{'seq':>6}{'sdpa s/step':>13}{'dot s/step':>12}{'sdpa MiB':>10}{'dot MiB':>10}")
    for seq, r in results.items():
        print(f"{seq:>6}{r['times']['sdpa']:>13.3f}{r['times']['dot_product']:>12.3f}"
              f"{r['peaks']['sdpa']:>10.1f}{r['peaks']['dot_product']:>10.1f}")
    summary = {"bench": "attention_backends", "seq": seqs}
    for backend in BACKENDS:
        summary[f"{backend}_step_s"] = [round(results[s]["times"][backend], 3) for s in seqs]
        summary[f"{backend}_step_peak_mib"] = [round(results[s]["peaks"][backend], 1)
                                               for s in seqs]
    summary["time_ratio_dot_product_over_sdpa"] = [
        round(results[s]["times"]["dot_product"] / results[s]["times"]["sdpa"], 2) for s in seqs]
    summary["memory_ratio_dot_product_over_sdpa"] = [
        round(results[s]["peaks"]["dot_product"] / results[s]["peaks"]["sdpa"], 2) for s in seqs]
    summary["same_loss"] = all(results[s]["same_loss"] for s in seqs)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
