"""SDPA core attention vs megatron's DotProductAttention, and activation recompute vs none (fp32).

Backends: the same weights through ``attention_backend=sdpa`` and ``=dot_product`` give the same
logits, losses and every gradient (≤ 1e-5) with causal and padded masks at TP=1, TP=2 and PP=2,
the same tokens and log-probs in generation with both KV caches at TP=2, and the same loss and
grad norm in one LLOPSD step (TP=2) and one GRPO step (DP=2). Recompute: full and selective give
the gradients of no recompute (≤ 1e-6) at PP=1 and PP=2. All in one two-process launch.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron.core import parallel_state

from nemo_loop.models.looplm.config import LoopModelConfig
from nemo_loop.utils.distributed import ParallelConfig, initialize_model_parallel

pytestmark = [pytest.mark.parity, pytest.mark.slow]

BACKEND_TOLERANCE = 1e-5
RECOMPUTE_TOLERANCE = 1e-6
SEED = 1234
TINY = LoopModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                       num_query_groups=2, vocab_size=128, max_sequence_length=64, num_loops=4)


def _micro_batches(padded: bool, count: int = 2) -> list[dict]:
    """Causal rows of random tokens, or left-padded prompt + right-padded response rows with
    megatron's bool masks (the rollout layout)."""
    from nemo_loop.data.sequences import teacher_forced_batch

    gen = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(count):
        if padded:
            lengths = [(3, 6), (7, 2)]
            rows = [torch.randint(1, TINY.vocab_size, (p + r,), generator=gen).tolist()
                    for p, r in lengths]
            batches.append(teacher_forced_batch([row[:p] for row, (p, _) in zip(rows, lengths)],
                                                [row[p:] for row, (p, _) in zip(rows, lengths)],
                                                pad_id=0))
        else:
            tokens = torch.randint(0, TINY.vocab_size, (2, 13), generator=gen)
            batches.append(dict(input_ids=tokens[:, :-1], labels=tokens[:, 1:],
                                loss_mask=torch.ones(2, 12)))
    return batches


def _build(layout: ParallelConfig, weights=None, **fields):
    from nemo_loop.models.looplm.model import build_loop_model
    from nemo_loop.models.looplm.state_dict import load_full_state_dict

    initialize_model_parallel(layout, seed=SEED)
    config = dataclasses.replace(TINY, **fields)
    model = build_loop_model(config.transformer_config(layout.tensor_parallel,
                                                       layout.pipeline_parallel))
    if weights is not None:
        load_full_state_dict(model, weights)
    return model


def _step(layout: ParallelConfig, batches, weights=None, **fields):
    """(full weights, per-micro-batch full-vocab logits and losses on the last stage, full grads)
    of one pass of the loop pipeline."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from nemo_loop.losses.ouro_pretrain import ouro_pretraining_loss
    from nemo_loop.models.looplm.pipeline import forward_backward_loops
    from nemo_loop.models.looplm.state_dict import gather_full_state_dict

    model = _build(layout, weights, **fields)
    weights = gather_full_state_dict(model)
    captured = []

    def loss_func(batch, output):
        loss, metrics = ouro_pretraining_loss(output, batch["labels"], batch["loss_mask"])
        captured.append((gather_from_tensor_model_parallel_region(output.logits.detach()),
                         loss.detach()))
        return loss / len(batches), metrics

    forward_backward_loops(model, batches, loss_func)
    grads = gather_full_state_dict(model, use_grads=True)
    parallel_state.destroy_model_parallel()
    return weights, captured, grads


def _max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def _compare(layout: ParallelConfig, padded: bool, reference: dict, candidate: dict,
             tolerance: float, label: str) -> None:
    batches = _micro_batches(padded)
    weights, ref_out, ref_grads = _step(layout, batches, **reference)
    _, out, grads = _step(layout, batches, weights, **candidate)
    assert grads.keys() == ref_grads.keys()
    grad_err = max(_max_err(grads[n], ref_grads[n]) for n in ref_grads)
    assert len(out) == len(ref_out)
    logit_err = max((_max_err(a[0], b[0]) for a, b in zip(out, ref_out)), default=0.0)
    loss_err = max((_max_err(a[1], b[1]) for a, b in zip(out, ref_out)), default=0.0)
    errors = torch.tensor([logit_err, loss_err, grad_err], dtype=torch.float64)
    torch.distributed.all_reduce(errors, op=torch.distributed.ReduceOp.MAX)
    if torch.distributed.get_rank() == 0:
        print(f"PARITY {label} tp={layout.tensor_parallel} pp={layout.pipeline_parallel} "
              f"padded={padded} logits={errors[0]:.1e} loss={errors[1]:.1e} "
              f"grads={errors[2]:.1e}", flush=True)
    assert max(errors.tolist()) <= tolerance, errors.tolist()
    # The comparison is not vacuous: the gradients are far from zero.
    assert max(g.abs().max().item() for g in ref_grads.values()) > 1e-2


def _backends(layout: ParallelConfig, padded: bool) -> None:
    _compare(layout, padded, dict(attention_backend="dot_product"),
             dict(attention_backend="sdpa"), BACKEND_TOLERANCE, "sdpa-vs-dot_product")


def check_sdpa_tp1_causal():
    _backends(ParallelConfig(), padded=False)


def check_sdpa_tp1_padded():
    _backends(ParallelConfig(), padded=True)


def check_sdpa_tp2_padded():
    _backends(ParallelConfig(tensor_parallel=2), padded=True)


def check_sdpa_pp2_causal():
    _backends(ParallelConfig(pipeline_parallel=2), padded=False)


def check_sdpa_pp2_padded():
    _backends(ParallelConfig(pipeline_parallel=2), padded=True)


def _recompute(layout: ParallelConfig, **fields) -> None:
    _compare(layout, True, dict(), fields, RECOMPUTE_TOLERANCE, f"recompute {fields}")


def check_recompute_full_pp1():
    _recompute(ParallelConfig(), recompute="full")


def check_recompute_selective_pp1():
    _recompute(ParallelConfig(), recompute="selective", recompute_modules=["core_attn", "mlp"])


def check_recompute_full_pp2():
    _recompute(ParallelConfig(pipeline_parallel=2), recompute="full")


def check_recompute_selective_pp2_dot_product():
    _compare(ParallelConfig(pipeline_parallel=2), True, dict(attention_backend="dot_product"),
             dict(attention_backend="dot_product", recompute="selective"), RECOMPUTE_TOLERANCE,
             "recompute selective (dot_product)")


def check_generation_with_kv_caches_tp2():
    from nemo_loop.generation import NativeLoopEngine, SamplingParams
    from nemo_loop.models.looplm.state_dict import gather_full_state_dict

    layout = ParallelConfig(tensor_parallel=2)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, TINY.vocab_size, (n,), generator=gen).tolist() for n in (6, 3, 9)]
    params = [SamplingParams(temperature=0, max_new_tokens=8),
              SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=8, seed=17)]
    runs = {}
    weights = None
    for backend in ("dot_product", "sdpa"):
        model = _build(layout, weights, attention_backend=backend)
        weights = gather_full_state_dict(model)
        for kv_cache in ("rope_once", "megatron_static"):
            engine = NativeLoopEngine(model, kv_cache=kv_cache)
            for loops in (1, TINY.num_loops):
                for index, sampling in enumerate(params):
                    runs[backend, kv_cache, loops, index] = engine.generate(prompts, loops,
                                                                            sampling)
        parallel_state.destroy_model_parallel()
    for (backend, *key), results in runs.items():
        if backend == "sdpa":
            for got, want in zip(results, runs[("dot_product", *key)]):
                assert got.token_ids == want.token_ids, key
                torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs),
                                           atol=BACKEND_TOLERANCE, rtol=0)


def _shared_tmp() -> str:
    import tempfile

    path = [tempfile.mkdtemp() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(path)
    return path[0]


def _one_step(schema_name: str, tensor_parallel: int, overrides: list[str]) -> dict:
    """Metrics of one training step per attention backend, from the same initial weights."""
    from nemo_loop.algorithms.registry import algorithm
    from nemo_loop.config import CONF_DIR, load_config

    entry = algorithm(schema_name)
    metrics = {}
    for backend in ("dot_product", "sdpa"):
        config = load_config(entry.config_class(), CONF_DIR / f"{schema_name}.yaml", [
            f"output_dir={_shared_tmp()}", f"parallel.tensor_parallel={tensor_parallel}",
            "trainer.max_steps=1", "trainer.resume=false", f"model.attention_backend={backend}",
            "checkpoint.check_free_space=false", *overrides])
        metrics[backend] = entry.train_function()(config)[0]
    return metrics


def _assert_same_step(metrics: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        want, got = metrics["dot_product"][key], metrics["sdpa"][key]
        assert abs(got - want) <= BACKEND_TOLERANCE * max(1.0, abs(want)), (key, got, want)
    assert metrics["sdpa"]["grad_norm"] > 1e-3  # a real update happened


def check_llopsd_step_tp2():
    metrics = _one_step("llopsd", 2, ["trainer.prompts_per_step=2", "trainer.micro_batch_size=1",
                                      "rollout.max_new_tokens=6", "data.limit=4"])
    _assert_same_step(metrics, ("loss", "grad_norm", "rollout_length"))


def check_grpo_step_dp2():
    from nemo_loop.tasks.answers import Verdict
    from nemo_loop.tasks.math import MathTask

    # A random tiny policy never solves a MATH problem, so every advantage would be 0: judge by
    # the response's length instead (the same rollouts under both backends, so the same rewards).
    original = MathTask.check
    MathTask.check = lambda self, response, reference: Verdict(len(response) % 2 == 0, None)
    try:
        metrics = _one_step("grpo", 1, [
            "trainer.prompts_per_step=2", "rollout.samples_per_prompt=4",
            "trainer.micro_batch_size=4", "rollout.max_new_tokens=6", "data.limit=4",
            "optim.clip_grad=1000"])
    finally:
        MathTask.check = original
    _assert_same_step(metrics, ("loss", "grad_norm"))


CHECKS = [name for name in dir() if name.startswith("check_")]


@pytest.fixture(scope="module")
def results():
    from tests.multiproc import run_checks

    return run_checks(__name__, CHECKS, world_size=2, timeout_s=240)


@pytest.mark.parametrize("check", CHECKS)
def test_attention_backends_and_recompute(results, check):
    assert results[check] is None, results[check]
