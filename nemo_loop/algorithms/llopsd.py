"""Latent-Loop On-Policy Self-Distillation (LLOPSD): config, setup and train step.

Each step: sample prompts x (with answers a); the student samples y from its final loop at R̃
loops; the teacher θ′ (θ itself, an EMA copy or the initial weights) reads c + x + y with all
loops up to max φ(r); the student is trained on Σ_r α_r·D(p_S^(r) ‖ p_T^(φ(r))) over y; then the
optimizer steps, the EMA moves and the engine is refit.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from megatron.core import parallel_state
from tqdm import tqdm

from nemo_loop.algorithms.common import OptimConfig, build_optimizer, train_step, wrap_data_parallel
from nemo_loop.algorithms.contexts import TeacherContextConfig, Verifier, privileged_context
from nemo_loop.algorithms.pretrain import ParallelConfig
from nemo_loop.checkpointing import (
    latest_step,
    load_checkpoint,
    load_model_checkpoint,
    save_checkpoint,
)
from nemo_loop.data.chat import ChatConfig, ChatTokenizer
from nemo_loop.data.prompts import PromptSampler, PromptSetConfig, load_prompt_set
from nemo_loop.data.sequences import build_batch, response_targets
from nemo_loop.evaluation.answers import verifier_for
from nemo_loop.generation.engine import SamplingParams
from nemo_loop.generation.native import NativeLoopEngine
from nemo_loop.losses import LoopDistillConfig, fused_head_distillation_loss
from nemo_loop.models.looplm.config import LoopModelConfig
from nemo_loop.models.looplm.model import build_loop_model
from nemo_loop.models.looplm.pipeline import forward_backward_loops, unwrap_model
from nemo_loop.utils.distributed import initialize_model_parallel
from nemo_loop.utils.logging import MetricsLogger, WandbConfig, is_logging_rank
from nemo_loop.utils.preemption import Preempted, PreemptionHandler

TEACHER_MODES = ("same", "ema", "frozen")


@dataclass
class RolloutConfig:
    student_loops: int = 2  # R̃
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class TeacherConfig:
    mode: str = "same"  # same | ema | frozen
    ema_decay: float = 0.99
    context: TeacherContextConfig = field(default_factory=TeacherContextConfig)


@dataclass
class LLOPSDTrainerConfig:
    max_steps: int = 4
    prompts_per_step: int = 4  # global, across data-parallel ranks
    micro_batch_size: int = 2
    log_interval: int = 1
    seed: int = 1234
    save_interval: int = 0  # 0: only at the end
    checkpoint_dir: str | None = None  # default: <output_dir>/checkpoints
    resume: bool = True
    # Initial weights: a dist_checkpointing directory with a "model" entry (e.g. the `model/`
    # folder of recipes/convert_ouro.py import or of the pretrain recipe), any TP layout.
    init_from: str | None = None


@dataclass
class LLOPSDConfig:
    model: LoopModelConfig = field(default_factory=LoopModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: LLOPSDTrainerConfig = field(default_factory=LLOPSDTrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LoopDistillConfig = field(default_factory=LoopDistillConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: PromptSetConfig = field(default_factory=PromptSetConfig)
    prompt: ChatConfig = field(default_factory=ChatConfig)
    answer_checker: str = "math"  # math: math-verify equivalence | exact: first word equals
    wandb: WandbConfig = field(default_factory=WandbConfig)
    output_dir: str = "runs/llopsd"

    def validate(self, world_size: int | None = None, check_paths: bool = True) -> None:
        """``check_paths=False`` skips the checks on files an earlier pipeline phase writes."""
        parallel = self.parallel
        self.model.validate(parallel.tensor_parallel, parallel.pipeline_parallel)
        if parallel.pipeline_parallel > 1:
            raise ValueError("LLOPSD needs parallel.pipeline_parallel=1: the generation engine "
                             "does not support pipeline parallelism yet")
        if parallel.sequence_parallel:
            raise ValueError("LLOPSD does not support parallel.sequence_parallel yet")
        student, teacher = self.rollout.student_loops, self.model.num_loops
        if not 1 <= student <= teacher:
            raise ValueError(f"rollout.student_loops (R̃={student}) must be in [1, "
                             f"model.num_loops (R={teacher})]")
        self.loss.validate(student, teacher)
        if self.teacher.mode not in TEACHER_MODES:
            raise ValueError(f"teacher.mode must be one of {TEACHER_MODES}, got "
                             f"{self.teacher.mode!r}")
        if not 0.0 <= self.teacher.ema_decay < 1.0:
            raise ValueError(f"teacher.ema_decay must be in [0, 1), got {self.teacher.ema_decay}")
        self.teacher.context.validate()
        self.prompt.validate()
        verifier_for(self.answer_checker)
        self.optim.validate()
        self.wandb.validate()
        self.data.validate(check_path=check_paths)
        init_from = self.trainer.init_from
        if check_paths and init_from and not (Path(init_from) / "metadata.json").is_file():
            raise FileNotFoundError(f"trainer.init_from={init_from} is not a dist_checkpointing "
                                    f"directory (no metadata.json)")
        SamplingParams(temperature=self.rollout.temperature, top_p=self.rollout.top_p,
                       top_k=self.rollout.top_k, max_new_tokens=self.rollout.max_new_tokens)
        trainer = self.trainer
        if trainer.max_steps < 1 or trainer.micro_batch_size < 1:
            raise ValueError("trainer.max_steps and trainer.micro_batch_size must be >= 1")
        if world_size is not None:
            data_parallel = parallel.layout().data_parallel(world_size)
            if trainer.prompts_per_step % (trainer.micro_batch_size * data_parallel):
                raise ValueError(
                    f"trainer.prompts_per_step {trainer.prompts_per_step} is not divisible by "
                    f"micro_batch_size × data_parallel = {trainer.micro_batch_size} × "
                    f"{data_parallel}")

    def checkpoint_root(self) -> Path:
        return Path(self.trainer.checkpoint_dir or Path(self.output_dir) / "checkpoints")


@dataclass
class LLOPSDState:
    config: LLOPSDConfig
    ddp_model: torch.nn.Module
    optimizer: object
    scheduler: object
    teacher_model: torch.nn.Module | None  # None: the student itself (mode "same")
    engine: NativeLoopEngine
    tokenizer: ChatTokenizer
    records: list
    sampler: PromptSampler
    verifier: Verifier
    step: int = 0


def setup(config: LLOPSDConfig, verifier: Verifier) -> LLOPSDState:
    config.validate(torch.distributed.get_world_size())
    tokenizer = ChatTokenizer(config.prompt)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.tokenizer_file} has {tokenizer.vocab_size} "
                         f"tokens but model.vocab_size is only {config.model.vocab_size}")
    initialize_model_parallel(config.parallel.layout(), seed=config.trainer.seed)
    transformer_config = config.model.transformer_config(config.parallel.tensor_parallel)
    model = build_loop_model(transformer_config)
    if config.trainer.init_from:
        # Before DDP and the optimizer, which copy the weights into their buffers/master params.
        load_model_checkpoint(model, config.trainer.init_from)
    ddp_model = wrap_data_parallel(model, config.optim.use_distributed_optimizer)
    optimizer, scheduler = build_optimizer(ddp_model, config.optim)
    teacher_model = None
    if config.teacher.mode != "same":
        teacher_model = build_loop_model(transformer_config).requires_grad_(False).eval()
        teacher_model.load_state_dict(model.state_dict())
    records = load_prompt_set(config.data)
    state = LLOPSDState(config, ddp_model, optimizer, scheduler, teacher_model,
                        NativeLoopEngine(model), tokenizer, records,
                        PromptSampler(len(records), config.trainer.seed), verifier)
    if config.trainer.resume and latest_step(config.checkpoint_root()) is not None:
        resume(state)
    return state


def _extra_modules(state: LLOPSDState) -> dict:
    return {} if state.teacher_model is None else {"teacher": state.teacher_model}


def save(state: LLOPSDState) -> Path:
    return save_checkpoint(state.config.checkpoint_root(), state.step, state.ddp_model,
                           state.optimizer, state.scheduler, _extra_modules(state),
                           {"data_position": state.sampler.state_dict()})


def resume(state: LLOPSDState) -> None:
    trainer_state = load_checkpoint(state.config.checkpoint_root(), state.ddp_model,
                                    state.optimizer, state.scheduler,
                                    extra_modules=_extra_modules(state))
    state.step = trainer_state["step"]
    state.sampler.load_state_dict(trainer_state["data_position"])


def _rollout_seed(config: LLOPSDConfig, step: int) -> int:
    """Depends only on (seed, step, DP rank), so resumed runs sample the same rollouts."""
    key = f"{config.trainer.seed}/{step}/{parallel_state.get_data_parallel_rank()}"
    return zlib.crc32(key.encode())


def _my_records(state: LLOPSDState) -> list:
    indices = state.sampler.next_indices(state.config.trainer.prompts_per_step)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    return [state.records[i] for i in indices[dp_rank::dp_size]]


def generate_rollouts(state: LLOPSDState, records: list) -> tuple[list, list, list]:
    config, tokenizer = state.config, state.tokenizer
    prompts = [tokenizer.encode_prompt(record.problem) for record in records]
    sampling = SamplingParams(temperature=config.rollout.temperature, top_p=config.rollout.top_p,
                              top_k=config.rollout.top_k,
                              max_new_tokens=config.rollout.max_new_tokens,
                              stop_token_ids=tokenizer.stop_token_ids,
                              seed=_rollout_seed(config, state.step))
    with torch.no_grad():
        results = state.engine.generate(prompts, config.rollout.student_loops, sampling)
    responses = [list(result.token_ids) for result in results]
    return prompts, responses, results


def teacher_logits_for(state: LLOPSDState, teacher_batch, response_rows: list[slice],
                       teacher_loops: list[int]) -> list[torch.Tensor]:
    """Teacher logits at its mapped loops over the response window, per micro-batch."""
    teacher = state.teacher_model or unwrap_model(state.ddp_model)
    micro_batches = [teacher_batch.as_micro_batch(rows) for rows in response_rows]
    with torch.no_grad():
        outputs = forward_backward_loops(teacher, micro_batches, None,
                                         num_loops=max(teacher_loops), logit_loops=teacher_loops,
                                         compute_logits=False, forward_only=True)
        window = teacher_batch.response_window
        return [torch.stack([teacher.output_layer(readout[window])[0]
                             for readout in output.readouts]) for output in outputs]


def llopsd_step(state: LLOPSDState) -> dict:
    config = state.config
    timings = {}
    started = time.perf_counter()
    records = _my_records(state)
    student_prompts, responses, results = generate_rollouts(state, records)
    timings["time_generate_s"] = time.perf_counter() - started

    texts = [state.tokenizer.decode(r) for r in responses]
    verdicts = [state.verifier(text, record.answer) for text, record in zip(texts, records)]
    teacher_prompts = [state.tokenizer.encode_prompt(
        record.problem, privileged_context(record, verdict, config.teacher.context))
        for record, verdict in zip(records, verdicts)]
    pad = state.tokenizer.pad_id
    student_batch = build_batch(student_prompts, responses, pad)
    teacher_batch = build_batch(teacher_prompts, responses, pad)
    _, loss_mask = response_targets(responses, student_batch.response_length, pad)
    size = config.trainer.micro_batch_size
    rows = [slice(i, i + size) for i in range(0, len(records), size)]
    mapping = config.loss.teacher_loop_for_each_student_loop(config.rollout.student_loops,
                                                             config.model.num_loops)
    teacher_loops = sorted(set(mapping))

    phase = time.perf_counter()
    teacher_logits = teacher_logits_for(state, teacher_batch, rows, teacher_loops)
    timings["time_teacher_s"] = time.perf_counter() - phase

    student_micro_batches = []
    for index, row in enumerate(rows):
        micro_batch = student_batch.as_micro_batch(row)
        micro_batch.update(loss_mask=loss_mask[:, row], teacher_logits=teacher_logits[index])
        student_micro_batches.append(micro_batch)
    student = unwrap_model(state.ddp_model)
    window = student_batch.response_window
    loss_config = config.loss

    def loss_func(micro_batch, output):
        loss, metrics = fused_head_distillation_loss(
            output.readouts[:, window], student.output_layer.weight, micro_batch["teacher_logits"],
            micro_batch["loss_mask"], loss_config,
            parallel_state.get_tensor_model_parallel_group(), teacher_loop_ids=teacher_loops,
            num_teacher_loops=config.model.num_loops)
        metrics["loss"] = loss.detach()
        return loss / len(student_micro_batches), metrics

    metrics = train_step(state.ddp_model, state.optimizer, state.scheduler,
                         student_micro_batches, loss_func,
                         num_loops=config.rollout.student_loops)
    timings["time_student_s"] = metrics.pop("time_forward_backward_s")
    timings["time_optimizer_s"] = metrics.pop("time_optimizer_s")

    phase = time.perf_counter()
    if config.teacher.mode == "ema":
        update_ema(state.teacher_model, student, config.teacher.ema_decay)
    refit = state.engine.refit(student)
    timings["time_ema_and_refit_s"] = time.perf_counter() - phase
    state.step += 1

    lengths = [len(r) for r in responses]
    elapsed = time.perf_counter() - started
    metrics.update(timings)
    metrics.update(
        step_time_s=elapsed,
        rollout_length=_dp_mean(sum(lengths) / len(lengths)),
        rollout_accuracy=_dp_mean(sum(correct for _, correct in verdicts) / len(verdicts)),
        generation_tokens_per_s=sum(lengths) / max(timings["time_generate_s"], 1e-9),
        training_tokens_per_s=float(loss_mask.sum()) / max(
            timings["time_teacher_s"] + timings["time_student_s"], 1e-9),
        refit_s=getattr(refit, "seconds", float("nan")),
    )
    return metrics


@torch.no_grad()
def update_ema(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """θ′ ← τ·θ′ + (1 − τ)·θ, shard by shard (both models have the same layout)."""
    for teacher_param, student_param in zip(teacher.parameters(), student.parameters()):
        teacher_param.mul_(decay).add_(student_param.detach(), alpha=1.0 - decay)


def _dp_mean(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    if parallel_state.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(tensor, group=parallel_state.get_data_parallel_group())
        tensor /= parallel_state.get_data_parallel_world_size()
    return tensor.item()


def format_step(step: int, metrics: dict) -> str:
    divergence = " ".join(f"{d:.4f}" for d in metrics.get("divergence_per_loop", []))
    return (f"step {step:4d} | loss {metrics.get('loss', float('nan')):.4f} | D per loop "
            f"[{divergence}] | len {metrics['rollout_length']:.1f} | acc "
            f"{metrics['rollout_accuracy']:.2f} | gen {metrics['generation_tokens_per_s']:.0f} "
            f"tok/s | {metrics['step_time_s']:.2f}s")


def train(config: LLOPSDConfig, verifier: Verifier) -> list[dict]:
    state = setup(config, verifier)
    logger = MetricsLogger(config.wandb, config, Path(config.output_dir), format_step)
    history = []
    interval = config.trainer.save_interval
    preemption = PreemptionHandler()
    progress = tqdm(total=config.trainer.max_steps, initial=state.step,
                    desc=Path(config.output_dir).name,
                    # None: only on a terminal; log files get the periodic step lines instead.
                    unit="step", disable=None if is_logging_rank() else True, leave=False)
    while state.step < config.trainer.max_steps:
        metrics = llopsd_step(state)
        history.append(metrics)
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['loss']:.4f}")
        if state.step % config.trainer.log_interval == 0 or state.step == config.trainer.max_steps:
            logger.log(state.step, metrics)
        stop = state.step < config.trainer.max_steps and preemption.stop_requested()
        if stop or (interval and state.step % interval == 0) or \
                state.step == config.trainer.max_steps:
            save(state)
        if stop:
            logger.close()
            preemption.close()
            raise Preempted(state.step)
    progress.close()
    logger.close()
    preemption.close()
    return history
