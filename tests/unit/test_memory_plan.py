"""The memory plan (``recipes/plan.py``): its activation model against what autograd keeps, its
total against the peak tensor memory of real pretraining steps on CPU (tiny and mid models),
every algorithm's config, and the refusal of a layout that does not fit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nemo_loop.models.looplm.config import LoopModelConfig
from nemo_loop.models.looplm.memory import StageShape, attention_buffers, loop_activations

SMALL = LoopModelConfig(num_layers=2, hidden_size=96, ffn_hidden_size=200, num_attention_heads=4,
                        num_query_groups=2, vocab_size=64, max_sequence_length=128, num_loops=2)


def _saved_bytes(model, seq: int, rows: int, masked: bool) -> int:
    """Bytes of the storages autograd keeps for one loop's backward (parameters excluded):
    tensors saved during the forward and still alive after it (a checkpointed chunk's inner
    graph is saved and dropped)."""
    import weakref

    from nemo_loop.data.sequences import teacher_forced_batch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(1, SMALL.vocab_size, (rows, seq + 1),
                        generator=torch.Generator().manual_seed(0))
    mask = None
    if masked:
        half = (seq + 1) // 2
        mask = teacher_forced_batch([r[:half].tolist() for r in ids],
                                    [r[half:].tolist() for r in ids], 0)["attention_mask"]
    saved = []

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved.append((storage.data_ptr(), storage.nbytes(), weakref.ref(tensor)))
        return tensor

    hidden = model.embed(ids[:, :seq]).detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model.run_shared_layers(hidden, mask, model.rotary_embedding(seq))
    alive = {pointer: size for pointer, size, ref in saved if ref() is not None}
    del output
    return sum(alive.values())


@pytest.mark.parametrize("fields, masked", [
    (dict(attention_backend="sdpa"), False),
    (dict(attention_backend="sdpa"), True),
    (dict(attention_backend="dot_product"), False),
    (dict(attention_backend="dot_product", num_query_groups=4, layer_spec="prenorm"), True),
    (dict(recompute="selective", recompute_modules=["core_attn", "mlp"]), True),
    (dict(attention_backend="dot_product", recompute="selective"), True),
    (dict(recompute="full"), True),
    (dict(recompute="full", recompute_method="block", recompute_num_layers=1), False),
])
def test_activation_model_matches_what_autograd_keeps(megatron_single_process, fields, masked):
    from nemo_loop.models.looplm.model import build_loop_model

    config = dataclasses.replace(SMALL, **fields)
    model = build_loop_model(config.transformer_config())
    seq, rows = 40, 3
    measured = _saved_bytes(model, seq, rows, masked)
    backend = model.config.core_attention
    stage = StageShape()
    predicted = loop_activations(config, seq, rows, stage, backend, masked, 4).per_loop
    if backend == "sdpa":  # its additive mask; DotProductAttention's buffer is not saved
        predicted += attention_buffers(config, seq, rows, stage, backend, masked, 4)
    if masked and config.recompute != "none":  # the checkpoints keep the micro-batch's bool mask
        predicted += rows * (seq + 1) ** 2  # (a view of the [b, 1, s + 1, s + 1] batch mask)
    # Full recompute also keeps the checkpoint's RoPE table (s·d floats): within the 2%.
    assert predicted == pytest.approx(measured, rel=0.02), (predicted, measured)


@pytest.mark.parametrize("overrides", [
    [],  # conf/pretrain.yaml: the tiny model, one micro-batch of 128 shell games
    ["model=mid", "trainer.micro_batch_size=4", "trainer.global_batch_size=8"],
])
def test_planned_peak_matches_a_measured_pretraining_step(megatron_single_process, overrides):
    """Two optimizer steps of pretraining (megatron DDP, distributed optimizer, the loop
    pipeline, Ouro's loss) under the allocator-level peak measurement: the plan's total is
    within 20% of the measured peak (the model, its state and every activation included)."""
    from nemo_loop.algorithms.common import build_optimizer, train_step, wrap_data_parallel
    from nemo_loop.algorithms.memory_plan import plan_training
    from nemo_loop.algorithms.pretrain import PretrainConfig, my_micro_batches
    from nemo_loop.algorithms.registry import algorithm
    from nemo_loop.config import CONF_DIR, load_config
    from nemo_loop.losses.ouro_pretrain import ouro_pretraining_loss
    from nemo_loop.models.looplm.model import build_loop_model
    from nemo_loop.tasks import build_task
    from nemo_loop.utils.memory import PeakTensorMemory

    config = load_config(PretrainConfig, CONF_DIR / "pretrain.yaml", overrides)
    plan = plan_training(algorithm("pretrain"), config)
    task = build_task(config.task)
    batches = my_micro_batches(config, task, task.tokenizer(), step=1)

    def loss_func(batch, output, normalizer):
        return ouro_pretraining_loss(output, batch["labels"], batch["loss_mask"],
                                     normalizer=normalizer)

    torch.manual_seed(0)
    with PeakTensorMemory("cpu") as peak:
        ddp = wrap_data_parallel(build_loop_model(config.model.transformer_config()))
        optimizer, scheduler = build_optimizer(ddp, config.optim)
        for _ in range(2):  # the second step holds Adam's state while it back-propagates
            train_step(ddp, optimizer, scheduler, batches, loss_func)
    print(f"{config.model.name}: planned {plan.total / 2**20:.1f} MiB, measured "
          f"{peak.bytes / 2**20:.1f} MiB")
    assert plan.total == pytest.approx(peak.bytes, rel=0.2)


def test_peak_tensor_memory_counts_what_is_alive_at_once():
    from nemo_loop.utils.memory import PeakTensorMemory

    with PeakTensorMemory("cpu") as peak:
        first = torch.empty(1_000_000, dtype=torch.float32)  # 4 MB
        second = torch.empty(500_000, dtype=torch.float32)  # 2 MB, both alive: 6 MB
        del first, second
        third = torch.empty(1_250_000, dtype=torch.float32)  # 5 MB alone
        del third
    assert peak.bytes == pytest.approx(6_000_000, rel=0.01)


@pytest.mark.parametrize("name", ["llopsd", "grpo", "rltt", "oisd", "sft", "looprpt",
                                  "pretrain"])
def test_every_algorithm_config_has_a_plan(name):
    from nemo_loop.algorithms.memory_plan import plan_training
    from nemo_loop.algorithms.registry import algorithm
    from nemo_loop.config import CONF_DIR, load_config

    entry = algorithm(name)
    config = load_config(entry.config_class(), CONF_DIR / f"{name}.yaml", [],
                         check_paths=False)
    plan = plan_training(entry, config)
    parts = {c.name for c in plan.static + plan.phases["training"]}
    assert {"weights", "gradients", "optimizer shard", "activations", "loss buffers"} <= parts
    assert ("rollout" in plan.phases) == (name in ("llopsd", "grpo", "rltt", "oisd"))
    assert plan.flops_per_step > 0 and plan.fits
    assert "peak per rank" in plan.render()


def test_recompute_and_attention_backend_change_the_planned_activations():
    from nemo_loop.algorithms.memory_plan import plan_training
    from nemo_loop.algorithms.registry import algorithm
    from nemo_loop.config import CONF_DIR, load_config

    def activations(*overrides):
        config = load_config(algorithm("llopsd").config_class(),
                             CONF_DIR / "cluster" / "ouro_1p4b_64gpu.yaml", list(overrides),
                             check_paths=False)
        plan = plan_training(algorithm("llopsd"), config)
        return next(c.bytes for c in plan.phases["training"] if c.name == "activations")

    sdpa = activations()
    assert activations("model.attention_backend=dot_product") > 2 * sdpa  # [b, n, s, s] probs
    assert activations("model.recompute=full") < sdpa / 20
    assert activations("rollout.student_loops=4") == 2 * sdpa  # loops trained


def test_a_layout_that_does_not_fit_is_refused_naming_the_part(capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))
    import plan as plan_recipe

    status = plan_recipe.main(["--config", "conf/cluster/ouro_1p4b_64gpu.yaml",
                               "--world-size", "64", "trainer.micro_batch_size=8"])
    out, err = capsys.readouterr()
    assert status == plan_recipe.DOES_NOT_FIT
    assert "DOES NOT FIT" in out and "TP 1 × PP 1 × DP 64" in out
    assert "the largest part is activations" in err
    assert plan_recipe.main(["--algorithm", "ppo"]) == plan_recipe.BAD_CONFIG
    assert "unknown algorithm 'ppo'" in capsys.readouterr().err
