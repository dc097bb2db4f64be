"""LLOPSD at TP=2 and at TP=1 × DP=2, every teacher mode and context; TP=2 → TP=1 checkpoints."""

from __future__ import annotations

import math

import pytest
import torch


pytestmark = [pytest.mark.slow]




def _shared_tmp() -> str:
    import tempfile

    path = [tempfile.mkdtemp() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(path)
    return path[0]


def _config(output_dir, tensor_parallel, *overrides):
    from nemo_loop.algorithms.llopsd import LLOPSDConfig
    from nemo_loop.config import CONF_DIR, load_config

    return load_config(LLOPSDConfig, CONF_DIR / "llopsd.yaml", [
        f"output_dir={output_dir}", f"parallel.tensor_parallel={tensor_parallel}",
        "trainer.max_steps=2", "trainer.prompts_per_step=2", "trainer.micro_batch_size=1",
        "rollout.max_new_tokens=5", "data.limit=8", *overrides])


def _run(tensor_parallel, mode, context, *overrides):
    from nemo_loop.algorithms.llopsd import train

    history = train(_config(_shared_tmp(), tensor_parallel, f"teacher.mode={mode}",
                            f"teacher.context.kind={context}", *overrides))
    assert len(history) == 2
    for metrics in history:
        assert math.isfinite(metrics["loss"]) and metrics["loss"] >= 0
        assert len(metrics["divergence_per_loop"]) == 2
        assert metrics["rollout_length"] > 0


def check_tp2_same_opsd():
    _run(2, "same", "opsd")


def check_tp2_ema_sdpo():  # SDPO's sibling context: G = 2 rollouts per prompt
    _run(2, "ema", "sdpo", "rollout.samples_per_prompt=2")


def check_tp2_frozen_opsdc():
    _run(2, "frozen", "opsdc")


def check_dp2_same_sdpo_verdict():
    _run(1, "same", "sdpo_verdict")


def check_dp2_ema_opsdc():
    _run(1, "ema", "opsdc")


def check_dp2_frozen_opsd():
    _run(1, "frozen", "opsd")


def check_checkpoint_saved_at_tp2_loads_at_tp1():
    from megatron.core import parallel_state

    from nemo_loop.algorithms.llopsd import setup, train
    from nemo_loop.models.looplm.state_dict import gather_full_state_dict

    root = _shared_tmp()
    train(_config(root, 2, "teacher.mode=ema"))
    saved = setup(_config(root, 2, "teacher.mode=ema"))  # resumes at TP=2
    expected = gather_full_state_dict(saved.ddp_model)
    expected_teacher = gather_full_state_dict(saved.teacher_model)
    parallel_state.destroy_model_parallel()
    resumed = setup(_config(root, 1, "teacher.mode=ema"))
    assert resumed.step == 2 and parallel_state.get_tensor_model_parallel_world_size() == 1
    got = gather_full_state_dict(resumed.ddp_model)
    got_teacher = gather_full_state_dict(resumed.teacher_model)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    assert all(torch.equal(got_teacher[n], expected_teacher[n]) for n in expected_teacher)


CHECKS = [name for name in dir() if name.startswith("check_")]


@pytest.fixture(scope="module")
def results():
    from tests.multiproc import run_checks

    return run_checks(__name__, CHECKS, world_size=2, timeout_s=240)


@pytest.mark.parametrize("check", CHECKS)
def test_llopsd_parallel(results, check):
    assert results[check] is None, results[check]
