"""One step of SFT and of LLOPSD with the sampled-token objective: TP=2 and DP=2 equal TP=1 × DP=1.

The reference step runs in the test process (a world of one); the TP=2 and TP=1 × DP=2 steps run
in one two-process launch, from the same initial weights (a TP=1 checkpoint, resharded on
load). Loss and every updated weight must agree within 1e-5. The step's batch is split over
two micro-batches per rank at DP=1 and one per rank at DP=2 (SFT: two examples per micro-batch,
so the micro-batches hold different examples in the two layouts). LLOPSD decodes greedily so
that the rollouts do not depend on the per-rank sampling seeds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.parity, pytest.mark.slow]

TOLERANCE = 1e-5
DIR_VARIABLE = "NEMO_LOOP_PARITY_DIR"  # set by the fixture, inherited by the spawned ranks


def _shared_tmp() -> str:
    import tempfile

    path = [tempfile.mkdtemp() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(path)
    return path[0]


def _config(algorithm: str, root: Path, output_dir: str, tensor_parallel: int):
    from nemo_loop.config import CONF_DIR, load_config

    common = [f"output_dir={output_dir}", "model=tiny", "task.name=shell_game",
              f"data.path={root / 'games.jsonl'}", "data.problem_field=problem",
              "data.answer_format=plain", "data.id_field=id",
              f"parallel.tensor_parallel={tensor_parallel}", "trainer.max_steps=1",
              f"trainer.init_from={root / 'init'}", "trainer.resume=false",
              # Adam's first step is lr·g/(|g| + eps): with eps = 1 and no clipping it moves
              # each weight by about g, so a wrongly scaled gradient shows (with the usual tiny
              # eps it would move every weight by ±lr whatever the gradient's scale).
              "optim.lr=1.0", "optim.min_lr=1.0", "optim.adam_eps=1.0", "optim.clip_grad=0"]
    if algorithm == "sft":
        from nemo_loop.algorithms.sft import SFTConfig

        return load_config(SFTConfig, CONF_DIR / "sft.yaml", common + [
            "data.solution_field=null", "trainer.examples_per_step=8",
            "trainer.micro_batch_size=2", "loss.kind=ouro"])
    from nemo_loop.algorithms.llopsd import LLOPSDConfig

    return load_config(LLOPSDConfig, CONF_DIR / "ablations" / "objective_sampled_token.yaml",
                       common + ["trainer.prompts_per_step=4", "trainer.micro_batch_size=1",
                                 "rollout.temperature=0", "rollout.max_new_tokens=3",
                                 "teacher.mode=frozen"])


def one_step(algorithm: str, root: Path, output_dir: str, tensor_parallel: int
             ) -> tuple[dict, dict]:
    """Metrics and the full (TP=1) weights after one step."""
    from nemo_loop.models.looplm.state_dict import gather_full_state_dict

    config = _config(algorithm, root, output_dir, tensor_parallel)
    if algorithm == "sft":
        from nemo_loop.algorithms.sft import setup
        from nemo_loop.algorithms.sft import sft_step as step
    else:
        from nemo_loop.algorithms.llopsd import llopsd_step as step
        from nemo_loop.algorithms.llopsd import setup
    state = setup(config)
    metrics = step(state)
    return metrics, gather_full_state_dict(state.ddp_model)


def _compare(algorithm: str, tensor_parallel: int) -> None:
    root = Path(os.environ[DIR_VARIABLE])
    metrics, weights = one_step(algorithm, root, _shared_tmp(), tensor_parallel)
    reference = torch.load(root / f"{algorithm}.pt")
    loss_error = abs(metrics["loss"] - reference["loss"])
    assert loss_error <= TOLERANCE, (metrics["loss"], reference["loss"])
    errors = {name: (weights[name] - value).abs().max().item()
              for name, value in reference["weights"].items()}
    assert set(weights) == set(reference["weights"])
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, (worst, errors[worst])
    moved = max((weights[n] - reference["initial"][n]).abs().max().item() for n in weights)
    assert moved > 1e-4  # the step really updated the weights


def check_sft_tp2():
    _compare("sft", 2)


def check_sft_dp2():
    _compare("sft", 1)


def check_llopsd_sampled_token_tp2():
    _compare("llopsd", 2)


def check_llopsd_sampled_token_dp2():
    _compare("llopsd", 1)


CHECKS = [name for name in dir() if name.startswith("check_")]


@pytest.fixture(scope="module")
def reference_dir(megatron_single_process, tmp_path_factory):
    """Initial weights, the prompt set and the TP=1 × DP=1 step of each algorithm."""
    from nemo_loop.checkpointing import save_model_checkpoint
    from nemo_loop.config import CONF_DIR, read_section
    from nemo_loop.data.prompts import write_prompt_set
    from nemo_loop.models.looplm.config import LoopModelConfig
    from nemo_loop.models.looplm.model import build_loop_model
    from nemo_loop.models.looplm.state_dict import gather_full_state_dict
    from nemo_loop.tasks import TaskConfig, build_task
    from nemo_loop.utils.distributed import ParallelConfig, initialize_model_parallel

    root = tmp_path_factory.mktemp("parity")
    write_prompt_set(root / "games.jsonl",
                     build_task(TaskConfig(name="shell_game")).heldout_problems("train", 16))
    initialize_model_parallel(ParallelConfig(), seed=1234)
    torch.manual_seed(0)
    model_config = read_section(CONF_DIR / "model" / "tiny.yaml", LoopModelConfig)
    model = build_loop_model(model_config.transformer_config())
    save_model_checkpoint(model, root / "init")
    initial = gather_full_state_dict(model)
    for algorithm in ("sft", "llopsd"):
        metrics, weights = one_step(algorithm, root, str(root / f"{algorithm}_run"), 1)
        if algorithm == "llopsd":
            assert metrics["rollout_length"] > 0  # greedy responses are not all empty
        torch.save({"loss": metrics["loss"], "weights": weights, "initial": initial},
                   root / f"{algorithm}.pt")
    initialize_model_parallel(ParallelConfig(), seed=1234)  # as the session fixture left it
    return root


@pytest.fixture(scope="module")
def results(reference_dir):
    from tests.multiproc import run_checks

    os.environ[DIR_VARIABLE] = str(reference_dir)
    try:
        return run_checks(__name__, CHECKS, world_size=2, timeout_s=240)
    finally:
        del os.environ[DIR_VARIABLE]


@pytest.mark.parametrize("check", CHECKS)
def test_one_step_matches_the_single_process_step(results, check):
    assert results[check] is None, results[check]
