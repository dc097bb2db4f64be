"""TP / PP / TP×PP / DP parity of the LoopLM against a single-layout reference (fp32)."""

from __future__ import annotations

import pytest
import torch
from megatron.core import parallel_state

from nemo_loop.models.looplm.config import LoopModelConfig
from nemo_loop.utils.distributed import ParallelConfig, initialize_model_parallel

pytestmark = [pytest.mark.parity, pytest.mark.slow]

TOLERANCE = 1e-5
SEED = 1234
TINY = LoopModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                       num_query_groups=2, vocab_size=128, max_sequence_length=64, num_loops=4)


def _micro_batches(count=2, batch=2, seq=12, seed=7):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, TINY.vocab_size, (batch, seq + 1), generator=gen)
        mask = torch.ones(batch, seq)
        mask[0, : seq // 3] = 0  # a prompt that the loss must ignore
        batches.append(dict(input_ids=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=mask))
    return batches


def _build(layout: ParallelConfig):
    from nemo_loop.models.looplm.model import build_loop_model

    initialize_model_parallel(layout, seed=SEED)
    return build_loop_model(TINY.transformer_config(layout.tensor_parallel,
                                                    layout.pipeline_parallel,
                                                    layout.sequence_parallel))


def _reference(batches, num_loops=None):
    """TP=1/PP=1, plain autograd through all loops (no pipeline machinery)."""
    from nemo_loop.losses.ouro_pretrain import ouro_pretraining_loss
    from nemo_loop.models.looplm.state_dict import gather_full_state_dict

    model = _build(ParallelConfig())
    weights = gather_full_state_dict(model)
    logits, losses = [], []
    for batch in batches:
        output = model(batch["input_ids"], num_loops=num_loops)
        loss, _ = ouro_pretraining_loss(output, batch["labels"], batch["loss_mask"])
        (loss / len(batches)).backward()
        logits.append(output.logits.detach())
        losses.append(loss.detach())
    grads = {name: param.grad.clone() for name, param in model.named_parameters()}
    parallel_state.destroy_model_parallel()
    return weights, logits, losses, grads


def _gather_vocab(logits):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits.detach().contiguous())


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _check_layout(layout: ParallelConfig, count_visits: bool = False):
    from nemo_loop.losses.ouro_pretrain import ouro_pretraining_loss
    from nemo_loop.models.looplm.pipeline import forward_backward_loops
    from nemo_loop.models.looplm.state_dict import gather_full_state_dict, load_full_state_dict

    batches = _micro_batches()
    weights, ref_logits, ref_losses, ref_grads = _reference(batches)
    model = _build(layout)
    load_full_state_dict(model, weights)
    visits = [0] * len(model.decoder.layers)
    for index, layer in enumerate(model.decoder.layers):
        layer.register_forward_hook(lambda *_, i=index: visits.__setitem__(i, visits[i] + 1))
    captured = []

    def loss_func(batch, output):
        loss, metrics = ouro_pretraining_loss(output, batch["labels"], batch["loss_mask"])
        captured.append((_gather_vocab(output.logits), loss.detach()))
        return loss / len(batches), metrics

    forward_backward_loops(model, batches, loss_func)
    grads = gather_full_state_dict(model, use_grads=True)
    grad_err = max(_max_err(grads[name], ref_grads[name]) for name in ref_grads)
    assert set(grads) == set(ref_grads), set(grads) ^ set(ref_grads)
    logit_err = loss_err = 0.0
    if parallel_state.is_pipeline_last_stage():
        assert len(captured) == len(batches)
        logit_err = max(_max_err(c[0], r) for c, r in zip(captured, ref_logits))
        loss_err = max(_max_err(c[1], r) for c, r in zip(captured, ref_losses))
    if count_visits:
        assert visits == [TINY.num_loops * len(batches)] * len(visits), visits
    errors = torch.tensor([logit_err, loss_err, grad_err], dtype=torch.float64)
    torch.distributed.all_reduce(errors, op=torch.distributed.ReduceOp.MAX)
    logit_err, loss_err, grad_err = errors.tolist()
    if torch.distributed.get_rank() == 0:
        print(f"PARITY tp={layout.tensor_parallel} pp={layout.pipeline_parallel} "
              f"sp={layout.sequence_parallel} logits={logit_err:.2e} loss={loss_err:.2e} "
              f"grads={grad_err:.2e}", flush=True)
    assert logit_err <= TOLERANCE and loss_err <= TOLERANCE and grad_err <= TOLERANCE, \
        (logit_err, loss_err, grad_err)


def check_tp2():
    _check_layout(ParallelConfig(tensor_parallel=2))


def check_tp2_sequence_parallel_forward():
    from nemo_loop.models.looplm.pipeline import forward_backward_loops
    from nemo_loop.models.looplm.state_dict import load_full_state_dict

    batches = _micro_batches()
    weights, ref_logits, _, _ = _reference(batches)
    model = _build(ParallelConfig(tensor_parallel=2, sequence_parallel=True))
    assert model.config.sequence_parallel
    load_full_state_dict(model, weights)
    outputs = forward_backward_loops(model, batches, None, forward_only=True)
    err = max(_max_err(_gather_vocab(o.logits), r) for o, r in zip(outputs, ref_logits))
    assert err <= TOLERANCE, err


def check_pp2():
    _check_layout(ParallelConfig(pipeline_parallel=2), count_visits=True)


def check_tp2_pp2():
    _check_layout(ParallelConfig(tensor_parallel=2, pipeline_parallel=2), count_visits=True)


def _run_schedule(model, batches, schedule):
    """(per-micro-batch losses on the last stage, every parameter's gradient) of one call."""
    from nemo_loop.losses.ouro_pretrain import ouro_pretraining_loss
    from nemo_loop.models.looplm.pipeline import forward_backward_loops

    model.zero_grad(set_to_none=True)
    losses = []

    def loss_func(batch, output):
        loss, metrics = ouro_pretraining_loss(output, batch["labels"], batch["loss_mask"])
        losses.append(loss.detach())
        return loss / len(batches), metrics

    forward_backward_loops(model, batches, loss_func, schedule=schedule)
    return losses, {name: param.grad.clone() for name, param in model.named_parameters()}


def _check_1f1b_is_bitwise_gpipe(layout: ParallelConfig):
    """5 micro-batches at PP=2: 1F1B's steady state and a partial last group. Same losses and
    gradients, bit for bit, as every-forward-first; and both match plain autograd."""
    from nemo_loop.models.looplm.state_dict import gather_full_state_dict, load_full_state_dict

    batches = _micro_batches(count=5, seed=21)
    weights, _, ref_losses, ref_grads = _reference(batches)
    model = _build(layout)
    load_full_state_dict(model, weights)
    gpipe_losses, gpipe_grads = _run_schedule(model, batches, "gpipe")
    losses, grads = _run_schedule(model, batches, "1f1b")
    assert len(losses) == (len(batches) if parallel_state.is_pipeline_last_stage() else 0)
    assert all(torch.equal(a, b) for a, b in zip(losses, gpipe_losses))
    assert grads.keys() == gpipe_grads.keys()
    differing = [name for name in grads if not torch.equal(grads[name], gpipe_grads[name])]
    assert not differing, differing
    full_grads = gather_full_state_dict(model, use_grads=True)  # the 1F1B run's
    grad_err = max(_max_err(full_grads[name], ref_grads[name]) for name in ref_grads)
    loss_err = max((_max_err(a, b) for a, b in zip(losses, ref_losses)), default=0.0)
    assert grad_err <= TOLERANCE and loss_err <= TOLERANCE, (grad_err, loss_err)


def check_pp2_1f1b_is_bitwise_gpipe():
    _check_1f1b_is_bitwise_gpipe(ParallelConfig(pipeline_parallel=2))


def check_tp2_pp2_1f1b_is_bitwise_gpipe():
    _check_1f1b_is_bitwise_gpipe(ParallelConfig(tensor_parallel=2, pipeline_parallel=2))


def check_pp2_fewer_loops_are_a_prefix():
    from nemo_loop.models.looplm.pipeline import forward_backward_loops
    from nemo_loop.models.looplm.state_dict import load_full_state_dict

    batches = _micro_batches()
    weights, ref_logits, _, _ = _reference(batches)
    model = _build(ParallelConfig(tensor_parallel=2, pipeline_parallel=2))
    load_full_state_dict(model, weights)
    outputs = forward_backward_loops(model, batches, None, num_loops=2, logit_loops=[1, 2],
                                     forward_only=True)
    if parallel_state.is_pipeline_last_stage():
        err = max(_max_err(_gather_vocab(o.logits), r[:2]) for o, r in zip(outputs, ref_logits))
        assert err <= TOLERANCE, err
        assert all(o.exit_logits.shape[0] == 2 for o in outputs)
    else:
        assert outputs == []


def check_distributed_optimizer_tp2_dp2_matches_single_process():
    """Two steps of megatron's DDP + distributed optimizer at TP=2×DP=2 vs plain AdamW."""
    from nemo_loop.algorithms.common import (
        OptimConfig,
        build_optimizer,
        train_step,
        wrap_data_parallel,
    )
    from nemo_loop.losses.ouro_pretrain import ouro_pretraining_loss
    from nemo_loop.models.looplm.state_dict import gather_full_state_dict, load_full_state_dict

    # Adam's update m/(√v+ε) turns fp32 round-off in near-zero grads into ±lr jumps when ε is
    # tiny; ε=1e-4 keeps the comparison about the parallel layout, not about that amplification.
    optim = OptimConfig(lr=1e-3, min_lr=1e-3, decay_style="constant", clip_grad=1.0,
                        adam_eps=1e-4)
    steps = [_micro_batches(count=4, seed=11 + step) for step in range(2)]

    model = _build(ParallelConfig())
    initial = gather_full_state_dict(model)
    reference = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=0.0,
                                  betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_eps)
    for batches in steps:
        reference.zero_grad()
        for batch in batches:
            loss, _ = ouro_pretraining_loss(model(batch["input_ids"]), batch["labels"],
                                            batch["loss_mask"])
            (loss / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.clip_grad)
        reference.step()
    expected = gather_full_state_dict(model)
    parallel_state.destroy_model_parallel()

    model = _build(ParallelConfig(tensor_parallel=2))
    load_full_state_dict(model, initial)
    ddp = wrap_data_parallel(model, use_distributed_optimizer=True)
    optimizer, scheduler = build_optimizer(ddp, optim)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    assert dp_size == 2
    for batches in steps:
        mine = batches[dp_rank::dp_size]

        def loss_func(batch, output, normalizer):
            return ouro_pretraining_loss(output, batch["labels"], batch["loss_mask"],
                                         normalizer=normalizer)

        train_step(ddp, optimizer, scheduler, mine, loss_func)
    trained = gather_full_state_dict(ddp)
    err = max(_max_err(trained[name], expected[name]) for name in expected)
    moved = max(_max_err(expected[name], initial[name]) for name in expected)
    if torch.distributed.get_rank() == 0:
        print(f"PARITY distributed-optimizer tp=2 dp=2 params={err:.2e} (update size {moved:.2e})",
              flush=True)
    assert moved > 1e-4, "the optimizer did not move the weights"
    assert err <= TOLERANCE, err


def check_checkpoint_resume_is_exact_tp2_dp2():
    """Save at step 2 of 4 with the distributed optimizer, resume in fresh objects, compare."""
    import tempfile

    from nemo_loop.algorithms.common import (
        OptimConfig,
        build_optimizer,
        train_step,
        wrap_data_parallel,
    )
    from nemo_loop.checkpointing import load_checkpoint, save_checkpoint
    from nemo_loop.losses.ouro_pretrain import ouro_pretraining_loss
    from nemo_loop.models.looplm.state_dict import gather_full_state_dict

    optim = OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=1, decay_steps=10)
    layout = ParallelConfig(tensor_parallel=2)

    def fresh():
        ddp = wrap_data_parallel(_build(layout))
        return (ddp, *build_optimizer(ddp, optim))

    def step(objects, index):
        batches = _micro_batches(count=2, seed=100 + index)
        mine = batches[parallel_state.get_data_parallel_rank()::2]

        def loss_func(batch, output, normalizer):
            return ouro_pretraining_loss(output, batch["labels"], batch["loss_mask"],
                                         normalizer=normalizer)

        train_step(*objects, mine, loss_func)

    root = [tempfile.mkdtemp() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(root)
    original = fresh()
    for index in range(4):
        if index == 2:
            save_checkpoint(root[0], 2, *original)
        step(original, index)
    expected = gather_full_state_dict(original[0])
    parallel_state.destroy_model_parallel()

    resumed = fresh()
    start = load_checkpoint(root[0], *resumed)["step"]
    assert start == 2
    for index in range(start, 4):
        step(resumed, index)
    got = gather_full_state_dict(resumed[0])
    err = max(_max_err(got[name], expected[name]) for name in expected)
    if torch.distributed.get_rank() == 0:
        print(f"PARITY checkpoint resume tp=2 dp=2 params={err:.2e}", flush=True)
    assert err == 0.0, err


CHECKS = [name for name in dir() if name.startswith("check_")]


@pytest.fixture(scope="module")
def results():
    from tests.multiproc import run_checks

    return run_checks(__name__, CHECKS, world_size=4, timeout_s=180)


@pytest.mark.parametrize("check", CHECKS)
def test_parallel_layouts(results, check):
    assert results[check] is None, results[check]
