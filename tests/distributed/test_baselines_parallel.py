"""One GRPO / RLTT / OISD update at TP=2 and at DP=2 equals the same update in one process:
the loss and every updated weight within 1e-5.

All layouts train on the same fixed rollouts (16 = 4 prompts × G=4, rewards that give every
group a signal, π_old = the initial policy's log-probs ± noise so that some ratios are clipped),
from the same initial weights (a TP=1 checkpoint that each layout loads, resharded). The
single-process reference runs in the pytest process; the TP=2 and DP=2 runs share one
two-process launch and write their results next to it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.parity]

SHARED_DIR = "NEMO_LOOP_BASELINE_PARITY_DIR"
PROMPTS, GROUP = 4, 4
# Adam's first step moves every weight by ±lr whatever the size of its gradient, so a gradient
# that is 0 up to rounding would flip the sign of a whole lr-sized step between layouts. With
# ε = 1e-2 the step is ≈ lr·g/(|g| + ε): proportional to small gradients (rounding noise stays
# rounding noise) and, at lr = 1, still ~100·g, far above the 1e-5 tolerance.
ADAM_LIKE_SGD = ["optim.lr=1.0", "optim.min_lr=1.0", "optim.adam_eps=1e-2"]
CASES = {
    # two PPO epochs (the second one off-policy, clipping active) and the k3 KL reference
    "grpo": ["trainer.updates_per_batch=2", "loss.kl_coef=0.05", "loss.aggregation=token_mean"],
    "rltt": ["loss.kl_coef=0.05"],  # exit_pdf loop weights
    "rltt_learned": ["rltt.weighting=learned", "rltt.learned_lr=0.05"],
    "oisd": ["oisd.logit_coef=0.5", "oisd.attention_coef=0.5", "oisd.attention_window=3",
             "oisd.attention_stride=2"],
}


def _config(shared: Path, case: str, tensor_parallel: int, output_dir: Path):
    from nemo_loop.algorithms.grpo import GRPOConfig
    from nemo_loop.algorithms.oisd import OISDConfig
    from nemo_loop.algorithms.rltt import RLTTConfig
    from nemo_loop.config import CONF_DIR, load_config

    algorithm = case.split("_")[0]
    schema = {"grpo": GRPOConfig, "rltt": RLTTConfig, "oisd": OISDConfig}[algorithm]
    return load_config(schema, CONF_DIR / f"{algorithm}.yaml", [
        "model=tiny", "task.name=shell_game", "task.shell_game.num_swaps=3",
        f"data.path={shared / 'train.jsonl'}", "data.id_field=id",
        f"trainer.init_from={shared / 'init'}", f"output_dir={output_dir}",
        f"parallel.tensor_parallel={tensor_parallel}", "trainer.resume=false",
        f"trainer.prompts_per_step={PROMPTS}", f"rollout.samples_per_prompt={GROUP}",
        "trainer.micro_batch_size=4", *ADAM_LIKE_SGD, "checkpoint.check_free_space=false",
        *CASES[case]])


def _objective(case: str):
    from nemo_loop.algorithms import grpo, oisd, rltt

    return {"grpo": grpo.Objective, "rltt": rltt.RLTTObjective,
            "oisd": oisd.OISDObjective}[case.split("_")[0]]


def _my_rollouts(shared: Path):
    """This DP rank's share (whole groups) of the fixed global rollouts."""
    from nemo_loop.algorithms.rollouts import Rollout, RolloutBatch, data_parallel_share
    from nemo_loop.data.prompts import PromptRecord
    from nemo_loop.tasks.answers import Verdict

    stored = json.loads((shared / "rollouts.json").read_text())
    groups = data_parallel_share([stored[g * GROUP:(g + 1) * GROUP] for g in range(PROMPTS)])
    rollouts = []
    for group, members in enumerate(groups):
        for sample, r in enumerate(members):
            rollouts.append(Rollout(group, sample, PromptRecord(r["problem"], r["answer"], None,
                                                                r["id"]),
                                    r["prompt"], r["response"], r["logprobs"], "",
                                    Verdict(r["correct"], None)))
    return RolloutBatch(rollouts, GROUP)


def _one_update(shared: Path, case: str, tensor_parallel: int, output_dir: Path) -> dict:
    from megatron.core.utils import unwrap_model

    from nemo_loop.algorithms.grpo import setup, train_on_rollouts
    from nemo_loop.models.looplm.state_dict import gather_full_state_dict

    state = setup(_config(shared, case, tensor_parallel, output_dir), _objective(case))
    metrics = train_on_rollouts(state, _my_rollouts(shared))
    weights = gather_full_state_dict(unwrap_model(state.ddp_model))
    learned = getattr(state.objective, "learned", None)
    if learned is not None:
        weights["learned_loop_logits"] = learned.logits.detach().clone()
    return {"loss": metrics["loss"], "weights": weights, "metrics": metrics}


def _shared_tmp() -> Path:
    import tempfile

    path = [tempfile.mkdtemp() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(path)
    return Path(path[0])


def _check(case: str, layout: str) -> None:
    shared = Path(os.environ[SHARED_DIR])
    result = _one_update(shared, case, 2 if layout == "tp2" else 1, _shared_tmp())
    if torch.distributed.get_rank() == 0:
        torch.save(result, shared / f"{case}_{layout}.pt")


def check_grpo_tp2():
    _check("grpo", "tp2")


def check_grpo_dp2():
    _check("grpo", "dp2")


def check_rltt_tp2():
    _check("rltt", "tp2")


def check_rltt_dp2():
    _check("rltt", "dp2")


def check_rltt_learned_tp2():
    _check("rltt_learned", "tp2")


def check_rltt_learned_dp2():
    _check("rltt_learned", "dp2")


def check_oisd_tp2():
    _check("oisd", "tp2")


def check_oisd_dp2():
    _check("oisd", "dp2")


CHECKS = [name for name in dir() if name.startswith("check_")]


def _write_inputs(shared: Path) -> None:
    """Initial weights, the prompt set, and fixed rollouts with π_old near the initial policy."""
    from nemo_loop.algorithms.rollouts import Rollout, RolloutBatch
    from nemo_loop.checkpointing import save_model_checkpoint
    from nemo_loop.config import CONF_DIR, read_section
    from nemo_loop.data.prompts import write_prompt_set
    from nemo_loop.losses.token_logprobs import token_logprobs
    from nemo_loop.models.looplm.config import LoopModelConfig
    from nemo_loop.models.looplm.model import build_loop_model
    from nemo_loop.models.looplm.state_dict import gather_full_state_dict
    from nemo_loop.tasks import TaskConfig, build_task
    from nemo_loop.tasks.answers import Verdict
    from nemo_loop.tasks.shell_game import ShellGameConfig

    task = build_task(TaskConfig(name="shell_game", shell_game=ShellGameConfig(num_swaps=3)))
    tokenizer = task.tokenizer()
    records = task.heldout_problems("train", PROMPTS)
    write_prompt_set(shared / "train.jsonl", records)
    model_config = read_section(CONF_DIR / "model" / "tiny.yaml", LoopModelConfig)
    torch.manual_seed(0)
    model = build_loop_model(model_config.transformer_config())
    save_model_checkpoint(model, shared / "init")
    torch.save(gather_full_state_dict(model), shared / "init_full.pt")

    generator = torch.Generator().manual_seed(1)
    correct = [[1, 0, 0, 1], [0, 0, 0, 1], [1, 1, 0, 1], [1, 0, 1, 0]]
    stored = []
    for group, record in enumerate(records):
        for sample in range(GROUP):
            length = int(torch.randint(1, 4, (1,), generator=generator))
            stored.append(dict(id=record.id, problem=record.problem, answer=record.answer,
                               prompt=tokenizer.encode_prompt(record.problem),
                               response=torch.randint(8, 20, (length,), generator=generator)
                               .tolist(), correct=bool(correct[group][sample])))
    batch = RolloutBatch([Rollout(0, 0, records[0], r["prompt"], r["response"], [], "",
                                  Verdict(False, None)) for r in stored], GROUP)
    sequences = batch.sequences(tokenizer.pad_id)
    ids, _ = batch.targets(sequences.response_length, tokenizer.pad_id)
    with torch.no_grad():
        output = model(sequences.input_ids, sequences.position_ids, sequences.attention_mask,
                       num_loops=2, logit_loops=[2], compute_logits=False)
        logp, _ = token_logprobs(output.readouts[0, sequences.response_window],
                                 model.output_weight(), ids)
    noise = 0.3 * torch.randn(logp.shape, generator=generator)
    for column, rollout in enumerate(stored):
        rollout["logprobs"] = (logp + noise)[:len(rollout["response"]), column].tolist()
    (shared / "rollouts.json").write_text(json.dumps(stored))


@pytest.fixture(scope="module")
def layouts(megatron_single_process, tmp_path_factory):
    from megatron.core import parallel_state

    from tests.multiproc import run_checks

    shared = tmp_path_factory.mktemp("baseline_parity")
    _write_inputs(shared)
    reference = {}
    for case in CASES:
        reference[case] = _one_update(shared, case, 1, shared / f"reference_{case}")
        parallel_state.destroy_model_parallel()
    os.environ[SHARED_DIR] = str(shared)
    try:
        failures = run_checks(__name__, CHECKS, world_size=2, timeout_s=240)
    finally:
        del os.environ[SHARED_DIR]
    from nemo_loop.utils.distributed import ParallelConfig, initialize_model_parallel

    initialize_model_parallel(ParallelConfig(), seed=1234)  # as the session fixture left it
    return shared, reference, failures


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("layout", ["tp2", "dp2"])
def test_one_update_matches_the_single_process_run(layouts, case, layout):
    shared, reference, failures = layouts
    assert failures[f"check_{case}_{layout}"] is None, failures[f"check_{case}_{layout}"]
    got = torch.load(shared / f"{case}_{layout}.pt")
    expected = reference[case]
    assert expected["loss"] != 0
    assert abs(got["loss"] - expected["loss"]) <= 1e-5, (got["loss"], expected["loss"])
    assert got["weights"].keys() == expected["weights"].keys()
    for name, tensor in expected["weights"].items():
        torch.testing.assert_close(got["weights"][name], tensor, rtol=0, atol=1e-5, msg=name)
    # the update really moved the weights (Adam's first steps move each by ~lr)
    initial = torch.load(shared / "init_full.pt")
    qkv = "decoder.layers.1.self_attention.linear_qkv.weight"
    assert (expected["weights"][qkv] - initial[qkv]).abs().max() > 1e-4
    if case == "rltt_learned":
        assert expected["weights"]["learned_loop_logits"].abs().max() > 1e-3

