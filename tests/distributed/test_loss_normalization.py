"""One normalization contract: one step of every algorithm is the same whatever the layout.

For LLOPSD (full and sampled-token objectives), GRPO, RLTT (exit-pdf and learned loop weights),
OISD, SFT, Ouro pretraining and LoopRPT, one training step at micro-batch sizes 1, 2 and 4, with
a token budget per micro-batch (rollout algorithms and SFT), at DP=2 and at TP=2 (and PP=2 for
pretraining and LoopRPT) equals the same step in one process with one micro-batch: the loss,
every layout-independent metric and every updated weight within 1e-5.

The batches are the hard case for a per-micro-batch mean: masked rows (SDPO rollouts without a
correct sibling and no feedback; an empty response) and unequal response and prompt lengths
(SFT references of 1 to 6 words). Rollout algorithms train on scripted rollouts: a generation
engine that answers each prompt with fixed responses whatever batch the prompt comes in, so every
layout trains on the same rollouts; π_old is the initial policy's log-probs plus noise, so some
ratios are clipped. Adam's first step is lr·g/(|g| + ε): with ε = 1 and no clipping it moves each
weight by about g, so a wrongly weighted gradient shows (with the usual tiny ε every weight would
move by ±lr whatever the gradient). The single-process steps run in the pytest process, the
DP=2/TP=2/PP=2 steps in one two-process launch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.parity]

TOLERANCE = 1e-5
SHARED_DIR = "NEMO_LOOP_NORMALIZATION_DIR"  # set by the fixture, inherited by the spawned ranks
GROUP = 2  # rollouts per prompt
WRONG_LONG, WRONG_SHORT = "0 1 2 1 0", "2 1"
SFT_REFERENCES = ["0", "1 2", "2 0 1", "1 1 0 2 2 0", "2", "0 0 1 2", "1 0", "2 2 2 1 0"]
ADAM_LIKE_SGD = ["optim.lr=1.0", "optim.min_lr=1.0", "optim.adam_eps=1.0", "optim.clip_grad=0",
                 "optim.warmup_steps=0"]
# SDPO without feedback: a rollout with no correct sibling is masked out of the loss.
MASKED_SDPO = ["teacher.context.kind=sdpo", "teacher.context.feedback=false",
               f"rollout.samples_per_prompt={GROUP}"]
CASES = {
    "llopsd": ("llopsd", MASKED_SDPO),
    "llopsd_sampled_token": ("llopsd", MASKED_SDPO + ["loss.objective=sampled_token",
                                                      "teacher.mode=frozen"]),
    # two PPO epochs (the second off-policy), the k3 KL and dual-clip
    "grpo": ("grpo", ["trainer.updates_per_batch=2", "loss.kl_coef=0.05", "loss.dual_clip=2.0",
                      "loss.aggregation=token_mean"]),
    "rltt": ("rltt", ["loss.kl_coef=0.05"]),
    # the learned loop weights' own Adam: their gradient is averaged over DP
    "rltt_learned": ("rltt", ["rltt.weighting=learned", "rltt.learned_lr=1.0"]),
    "oisd": ("oisd", ["oisd.logit_coef=0.5", "oisd.attention_coef=0.5",
                      "oisd.attention_window=3", "oisd.attention_stride=2"]),
    "sft": ("sft", ["loss.aggregation=sequence_mean"]),
    "pretrain": ("pretrain", ["loss.aggregation=sequence_mean"]),
    "looprpt": ("looprpt", ["looprpt.num_rollouts=3", "looprpt.hard_token_ratio=0.5",
                            "looprpt.kl_coef=0.1", "looprpt.ema_decay=0.5"]),
}
ROLLOUT_ALGORITHMS = ("llopsd", "grpo", "rltt", "oisd")
SEQUENCE_ALGORITHMS = ("pretrain", "looprpt")  # sequences the algorithm draws itself
ROWS = 8  # rollouts (4 prompts × G), SFT examples or pretraining sequences per step
# the single-process micro-batchings, against the reference of one micro-batch
LOCAL_LAYOUTS = ("mbs1", "mbs2", "mbs4", "budget")
PARALLEL_LAYOUTS = ("dp2", "tp2", "pp2")


def _layouts(case: str) -> list[str]:
    algorithm = CASES[case][0]
    local = [layout for layout in LOCAL_LAYOUTS
             if layout != "budget" or algorithm not in SEQUENCE_ALGORITHMS]
    if case == "rltt_learned":  # its loss is rltt's; what it adds is data-parallel
        local = []
    parallel = [layout for layout in PARALLEL_LAYOUTS
                if layout != "pp2" or algorithm in SEQUENCE_ALGORITHMS]
    return local + parallel


def _layout_overrides(algorithm: str, layout: str) -> list[str]:
    size = {"reference": ROWS, "mbs1": 1, "mbs2": 2, "mbs4": 4, "budget": ROWS, "dp2": 2,
            "tp2": 2, "pp2": 2}[layout]
    overrides = [f"trainer.micro_batch_size={size}"]
    if layout == "budget":  # tiny's max_sequence_length: a few rows per micro-batch, packed
        overrides.append("trainer.max_tokens_per_micro_batch=128")
    if layout == "tp2":
        overrides.append("parallel.tensor_parallel=2")
    if layout == "pp2":
        overrides.append("parallel.pipeline_parallel=2")
    return overrides


def _config(shared: Path, case: str, layout: str, output_dir: Path):
    from nemo_loop.config import CONF_DIR, load_config

    algorithm, overrides = CASES[case]
    common = ["model=tiny", f"output_dir={output_dir}", f"trainer.init_from={shared / 'init'}",
              "trainer.resume=false", "trainer.max_steps=1", "checkpoint.check_free_space=false",
              *ADAM_LIKE_SGD]
    if algorithm in ROLLOUT_ALGORITHMS or algorithm == "sft":
        common += ["task.name=shell_game", "data.id_field=id", "data.problem_field=problem",
                   "data.answer_format=plain"]
    if algorithm in ROLLOUT_ALGORITHMS:
        common += [f"data.path={shared / 'prompts.jsonl'}", "trainer.prompts_per_step=4",
                   f"rollout.samples_per_prompt={GROUP}", "rollout.temperature=1.0"]
    if algorithm == "sft":
        common += [f"data.path={shared / 'references.jsonl'}", "data.solution_field=null",
                   f"trainer.examples_per_step={ROWS}"]
    if algorithm in SEQUENCE_ALGORITHMS:
        common += [f"trainer.global_batch_size={ROWS}", "trainer.eval_interval=0"]
    return load_config(_schema(algorithm), CONF_DIR / f"{algorithm}.yaml",
                       common + overrides + _layout_overrides(algorithm, layout))


def _schema(algorithm: str):
    from nemo_loop.algorithms import grpo, llopsd, looprpt, oisd, pretrain, rltt, sft

    return {"llopsd": llopsd.LLOPSDConfig, "grpo": grpo.GRPOConfig, "rltt": rltt.RLTTConfig,
            "oisd": oisd.OISDConfig, "sft": sft.SFTConfig, "pretrain": pretrain.PretrainConfig,
            "looprpt": looprpt.LoopRPTConfig}[algorithm]


class ScriptedEngine:
    """Answers copy g of a prompt with the g-th scripted response and its log-probs, whatever
    else is in the batch: every layout trains on the same rollouts."""

    def __init__(self, scripted: dict):
        self.scripted = scripted

    def generate(self, prompts, num_loops, sampling):
        from nemo_loop.generation.engine import GenerationResult

        results, previous, copy = [], None, 0
        for prompt in prompts:
            key = json.dumps(list(prompt))
            copy = copy + 1 if key == previous else 0
            previous = key
            response, logprobs = self.scripted[key][copy]
            results.append(GenerationResult(list(response), list(logprobs), list(logprobs),
                                            "stop", num_loops))
        return results

    def refit(self, source):
        from nemo_loop.generation.engine import RefitReport

        return RefitReport(mode="rebind", seconds=0.0)


def one_step(shared: Path, case: str, layout: str, output_dir: Path) -> dict:
    """The metrics (last pipeline stage; None elsewhere) and full weights after one step."""
    from megatron.core import parallel_state
    from megatron.core.utils import unwrap_model

    from nemo_loop.models.looplm.state_dict import gather_full_state_dict

    algorithm = CASES[case][0]
    config = _config(shared, case, layout, output_dir)
    extra = {}
    if algorithm == "llopsd":
        from nemo_loop.algorithms.llopsd import llopsd_step, setup

        state = setup(config)
        state.engine = ScriptedEngine(_scripted(shared))
        metrics, ddp_model = llopsd_step(state), state.ddp_model
    elif algorithm in ("grpo", "rltt", "oisd"):
        from nemo_loop.algorithms import grpo, oisd, rltt

        objective = {"grpo": grpo.Objective, "rltt": rltt.RLTTObjective,
                     "oisd": oisd.OISDObjective}[algorithm]
        state = grpo.setup(config, objective)
        state.engine = ScriptedEngine(_scripted(shared))
        metrics, ddp_model = grpo.policy_step(state), state.ddp_model
        learned = getattr(state.objective, "learned", None)
        if learned is not None:
            extra["learned_loop_logits"] = learned.logits.detach().clone()
    elif algorithm == "sft":
        from nemo_loop.algorithms.sft import setup, sft_step

        state = setup(config)
        metrics, ddp_model = sft_step(state), state.ddp_model
    elif algorithm == "pretrain":
        from nemo_loop.algorithms.common import train_step
        from nemo_loop.algorithms.pretrain import ouro_loss, setup, training_source

        source = training_source(config)
        _, ddp_model, optimizer, scheduler = setup(config, source.tokenizer)
        metrics = train_step(ddp_model, optimizer, scheduler, source.micro_batches(1),
                             lambda batch, output, normalizer: ouro_loss(config, batch, output,
                                                                         normalizer))
    else:
        from nemo_loop.algorithms.looprpt import looprpt_step, setup

        state = setup(config)
        metrics, ddp_model = looprpt_step(state, 1), state.ddp_model
        extra = {f"teacher.{name}": tensor
                 for name, tensor in gather_full_state_dict(state.teacher).items()}
    weights = gather_full_state_dict(unwrap_model(ddp_model))
    weights.update(extra)
    return {"metrics": metrics if parallel_state.is_pipeline_last_stage() else None,
            "weights": weights}


# ----- the two-process launch -----

def _shared_tmp() -> Path:
    import tempfile

    path = [tempfile.mkdtemp() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(path)
    return Path(path[0])


def _check(case: str, layout: str) -> None:
    from megatron.core import parallel_state

    shared = Path(os.environ[SHARED_DIR])
    result = one_step(shared, case, layout, _shared_tmp())
    if parallel_state.is_pipeline_last_stage() and \
            parallel_state.get_tensor_model_parallel_rank() == 0 and \
            parallel_state.get_data_parallel_rank() == 0:
        torch.save(result, shared / f"{case}_{layout}.pt")


def _define_checks() -> list[str]:
    names = []
    for case in CASES:
        for layout in _layouts(case):
            if layout in PARALLEL_LAYOUTS:
                name = f"check_{case}_{layout}"
                globals()[name] = lambda case=case, layout=layout: _check(case, layout)
                names.append(name)
    return names


CHECKS = _define_checks()


# ----- inputs and the single-process runs -----

def _records():
    """Four shell-game prompts of different lengths (fewer swaps) with their answers."""
    from nemo_loop.data.prompts import PromptRecord
    from nemo_loop.tasks import TaskConfig, build_task

    task = build_task(TaskConfig(name="shell_game"))
    records = task.heldout_problems("train", 4)
    shortened = []
    for index, record in enumerate(records):
        head, swaps = record.problem.rstrip(" =").split(" | ")
        kept = " ".join(swaps.split()[:len(swaps.split()) - 2 * index])
        shortened.append(PromptRecord(f"{head} | {kept} =", record.answer, None, record.id))
    return task, shortened


def _write_inputs(shared: Path) -> None:
    """Initial weights; the prompt set and its scripted rollouts; SFT references."""
    from nemo_loop.checkpointing import save_model_checkpoint
    from nemo_loop.config import CONF_DIR, read_section
    from nemo_loop.data.prompts import PromptRecord, write_prompt_set
    from nemo_loop.data.sequences import build_batch
    from nemo_loop.losses.token_logprobs import token_logprobs
    from nemo_loop.models.looplm.config import LoopModelConfig
    from nemo_loop.models.looplm.model import build_loop_model
    from nemo_loop.models.looplm.state_dict import gather_full_state_dict

    model_config = read_section(CONF_DIR / "model" / "tiny.yaml", LoopModelConfig)
    torch.manual_seed(0)
    model = build_loop_model(model_config.transformer_config())
    save_model_checkpoint(model, shared / "init")
    torch.save(gather_full_state_dict(model), shared / "init_full.pt")

    task, records = _records()
    tokenizer = task.tokenizer()
    write_prompt_set(shared / "prompts.jsonl", records)
    wrong = {"0": "1", "1": "2", "2": "0"}
    # per prompt, G responses: (correct, long wrong) → the correct one has no correct sibling
    # and is masked under SDPO; (wrong, wrong) → both masked; (correct, correct); (empty,
    # correct) → the empty response is a masked row everywhere
    answers = [[r.answer, WRONG_LONG] for r in records[:1]] + \
        [[WRONG_SHORT, wrong[records[1].answer]], [records[2].answer] * 2,
         [None, records[3].answer]]
    generator = torch.Generator().manual_seed(1)
    scripted = {}
    for record, texts in zip(records, answers):
        prompt = tokenizer.encode_prompt(record.problem)
        responses = []
        for text in texts:
            response = [] if text is None else tokenizer.encode_response(text)
            logprobs = []
            if response:
                batch = build_batch([prompt], [response], tokenizer.pad_id)
                ids = torch.tensor(response)[:, None]
                with torch.no_grad():
                    output = model(batch.input_ids, batch.position_ids, batch.attention_mask,
                                   num_loops=2, logit_loops=[2], compute_logits=False)
                    logp, _ = token_logprobs(output.readouts[0, batch.response_window],
                                             model.output_weight(), ids)
                logprobs = (logp[:, 0] + 0.3 * torch.randn(len(response),
                                                           generator=generator)).tolist()
            responses.append((response, logprobs))
        scripted[json.dumps(prompt)] = responses
    (shared / "scripted.json").write_text(json.dumps(scripted))
    # SFT: references of 1 to 6 words on prompts of different lengths
    write_prompt_set(shared / "references.jsonl",
                     [PromptRecord(records[i % 4].problem, text, None, str(i))
                      for i, text in enumerate(SFT_REFERENCES)])


def _scripted(shared: Path) -> dict:
    return {key: [tuple(entry) for entry in value]
            for key, value in json.loads((shared / "scripted.json").read_text()).items()}


@pytest.fixture(scope="module")
def runs(megatron_single_process, tmp_path_factory):
    """Every case's reference step and its single-process micro-batchings, then the DP=2,
    TP=2 and PP=2 steps in one two-process launch."""
    from tests.multiproc import run_checks
    from nemo_loop.utils.distributed import ParallelConfig, initialize_model_parallel

    shared = tmp_path_factory.mktemp("normalization")
    _write_inputs(shared)
    results = {}
    for case in CASES:
        for layout in ("reference",) + tuple(l for l in _layouts(case) if l in LOCAL_LAYOUTS):
            results[case, layout] = one_step(shared, case, layout,
                                             shared / f"{case}_{layout}_run")
    os.environ[SHARED_DIR] = str(shared)
    try:
        failures = run_checks(__name__, CHECKS, world_size=2, timeout_s=300)
    finally:
        del os.environ[SHARED_DIR]
    initialize_model_parallel(ParallelConfig(), seed=1234)  # as the session fixture left it
    return shared, results, failures


# metrics that measure time or hardware, not the step's values
def _layout_independent(key: str) -> bool:
    return not (key.startswith(("time_", "refit")) or key.endswith("_s") or "flops" in key
                or "per_s" in key or key in ("lr", "mfu", "update_skipped", "step"))


CASE_LAYOUTS = [(case, layout) for case in CASES for layout in _layouts(case)]


@pytest.mark.parametrize("case, layout", CASE_LAYOUTS, ids=[f"{c}-{l}" for c, l in CASE_LAYOUTS])
def test_one_step_is_the_same_in_every_layout(runs, case, layout):
    shared, results, failures = runs
    if layout in PARALLEL_LAYOUTS:
        assert failures[f"check_{case}_{layout}"] is None, failures[f"check_{case}_{layout}"]
        got = torch.load(shared / f"{case}_{layout}.pt")
    else:
        got = results[case, layout]
    want = results[case, "reference"]
    assert want["metrics"]["loss"] != 0
    keys = [key for key in want["metrics"] if _layout_independent(key)]
    for key in keys:
        assert got["metrics"][key] == pytest.approx(want["metrics"][key], abs=TOLERANCE), key
    assert got["weights"].keys() == want["weights"].keys()
    for name, tensor in want["weights"].items():
        torch.testing.assert_close(got["weights"][name], tensor, rtol=0, atol=TOLERANCE,
                                   msg=name)


def test_the_reference_steps_learn_from_the_masked_uneven_batches(runs):
    """The comparisons above are not vacuous: every step moved the weights well beyond the
    tolerance, the batches have masked rows and unequal lengths, and the loss tokens differ
    between micro-batches."""
    shared, results, _ = runs
    initial = torch.load(shared / "init_full.pt")
    for case in CASES:
        moved = max((results[case, "reference"]["weights"][name] - tensor).abs().max().item()
                    for name, tensor in initial.items())
        assert moved > 100 * TOLERANCE, case
    # LoopRPT's EMA teacher moved halfway to the student (ema_decay 0.5)
    looprpt = results["looprpt", "reference"]["weights"]
    for name, tensor in initial.items():
        torch.testing.assert_close(looprpt[f"teacher.{name}"], 0.5 * tensor + 0.5 * looprpt[name])
    scripted = _scripted(shared)
    lengths = [len(response) for responses in scripted.values() for response, _ in responses]
    assert 0 in lengths and len(set(lengths)) >= 3
    # SDPO masks 4 of the 8 rollouts (see _write_inputs)
    assert results["llopsd", "reference"]["metrics"]["teacher_context_masked"] == 0.5
    sft = results["sft", "reference"]["metrics"]
    assert sft["target_tokens"] == sum(len(text.split()) + 1 for text in SFT_REFERENCES)
    logits = results["rltt_learned", "reference"]["weights"]["learned_loop_logits"]
    assert logits.abs().max() > 100 * TOLERANCE
