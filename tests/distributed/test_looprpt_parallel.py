"""One LoopRPT step at TP=2, PP=2 and DP=2 equals the same step in one process: the loss, the
per-loop metrics, every updated student weight and the EMA teacher within 1e-5.

All layouts start from the same initial weights (a TP=1 checkpoint each loads, resharded) and
draw the same shell-game batch, latent noise and exit draws (seeded per global row), with G = 3
rollouts and every loss-mask token hard so that every term has a signal. The single-process
reference runs in the pytest process; the other layouts share one two-process launch.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.parity]

SHARED_DIR = "NEMO_LOOP_LOOPRPT_PARITY_DIR"
# Adam's first step moves every weight by ±lr whatever its gradient; with ε = 1e-2 the step is
# ≈ lr·g/(|g| + ε), so rounding-level gradient differences stay rounding-level (see
# tests/distributed/test_baselines_parallel.py).
ADAM_LIKE_SGD = ["optim.lr=1.0", "optim.min_lr=1.0", "optim.adam_eps=1e-2",
                 "optim.warmup_steps=0"]
LAYOUTS = {"tp1": [], "tp2": ["parallel.tensor_parallel=2"],
           "pp2": ["parallel.pipeline_parallel=2"], "dp2": []}


def _one_step(shared: Path, layout: str, output_dir: Path) -> dict:
    from megatron.core import parallel_state
    from megatron.core.utils import unwrap_model

    from nemo_loop.algorithms.looprpt import LoopRPTConfig, looprpt_step, setup
    from nemo_loop.config import CONF_DIR, load_config
    from nemo_loop.models.looplm.state_dict import gather_full_state_dict

    config = load_config(LoopRPTConfig, CONF_DIR / "looprpt.yaml", [
        "model=tiny", f"trainer.init_from={shared / 'init'}",
        f"output_dir={output_dir}", "trainer.resume=false", "trainer.max_steps=1",
        "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "looprpt.num_rollouts=3",
        "looprpt.hard_token_ratio=1.0", "looprpt.kl_coef=0.1", "looprpt.ema_decay=0.5",
        "checkpoint.check_free_space=false", *ADAM_LIKE_SGD, *LAYOUTS[layout]])
    state = setup(config)
    metrics = looprpt_step(state, 1)
    return {"metrics": metrics if parallel_state.is_pipeline_last_stage() else None,
            "weights": gather_full_state_dict(unwrap_model(state.ddp_model)),
            "teacher": gather_full_state_dict(state.teacher)}


def _check(layout: str) -> None:
    import tempfile

    from megatron.core import parallel_state

    shared = Path(os.environ[SHARED_DIR])
    result = _one_step(shared, layout, Path(tempfile.mkdtemp()))
    last = parallel_state.is_pipeline_last_stage()
    if last and parallel_state.get_tensor_model_parallel_rank() == 0 \
            and parallel_state.get_data_parallel_rank() == 0:
        torch.save(result, shared / f"{layout}.pt")


def check_tp2():
    _check("tp2")


def check_pp2():
    _check("pp2")


def check_dp2():
    _check("dp2")


CHECKS = ["check_tp2", "check_pp2", "check_dp2"]


@pytest.fixture(scope="module")
def layouts(megatron_single_process, tmp_path_factory):
    from megatron.core import parallel_state

    from nemo_loop.checkpointing import save_model_checkpoint
    from nemo_loop.config import CONF_DIR, read_section
    from nemo_loop.models.looplm.config import LoopModelConfig
    from nemo_loop.models.looplm.model import build_loop_model
    from nemo_loop.models.looplm.state_dict import gather_full_state_dict
    from nemo_loop.utils.distributed import ParallelConfig, initialize_model_parallel
    from tests.multiproc import run_checks

    shared = tmp_path_factory.mktemp("looprpt_parity")
    torch.manual_seed(0)
    model = build_loop_model(read_section(CONF_DIR / "model" / "tiny.yaml",
                                          LoopModelConfig).transformer_config())
    save_model_checkpoint(model, shared / "init")
    torch.save(gather_full_state_dict(model), shared / "init_full.pt")
    reference = _one_step(shared, "tp1", shared / "reference")
    parallel_state.destroy_model_parallel()
    os.environ[SHARED_DIR] = str(shared)
    try:
        failures = run_checks(__name__, CHECKS, world_size=2, timeout_s=240)
    finally:
        del os.environ[SHARED_DIR]
    initialize_model_parallel(ParallelConfig(), seed=1234)  # as the session fixture left it
    return shared, reference, failures


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_one_looprpt_step_matches_the_single_process_step(layouts, layout):
    shared, reference, failures = layouts
    assert failures[f"check_{layout}"] is None, failures[f"check_{layout}"]
    got = torch.load(shared / f"{layout}.pt")
    want = reference["metrics"]
    assert want["loss"] != 0 and want["policy_loss"] != 0 and want["kl"] > 0
    for key in ("loss", "policy_loss", "backbone_loss", "gate_entropy", "kl", "rollout_return",
                "rollout_exit_loop", "teacher_exit_loop"):
        assert got["metrics"][key] == pytest.approx(want[key], abs=1e-5), key
    for key in ("hard_ce_per_loop", "accuracy_per_loop", "reward_per_loop",
                "exit_prob_per_loop"):
        assert got["metrics"][key] == pytest.approx(want[key], abs=1e-5), key
    for part in ("weights", "teacher"):
        assert got[part].keys() == reference[part].keys()
        for name, tensor in reference[part].items():
            torch.testing.assert_close(got[part][name], tensor, rtol=0, atol=1e-5,
                                       msg=f"{part} {name}")
    # the step moved the student, and the EMA teacher halfway to it (ema_decay 0.5)
    initial = torch.load(shared / "init_full.pt")
    qkv = "decoder.layers.1.self_attention.linear_qkv.weight"
    assert (reference["weights"][qkv] - initial[qkv]).abs().max() > 1e-3
    torch.testing.assert_close(reference["teacher"][qkv],
                               0.5 * initial[qkv] + 0.5 * reference["weights"][qkv])
