"""A loop-aware memory and throughput plan of one training step, per rank, from a training config.

    plan = plan_training(algorithm("llopsd"), config, PlanAssumptions(world_size=64))
    print(plan.render()); plan.check_fits()

Per rank (the largest pipeline stage): the static state — weights, the fp32 gradient buffer,
the optimizer shard (megatron's distributed optimizer over data parallel), the teacher or
reference copy (EMA / frozen) — plus, per phase of the step, what that phase adds:

* training: the activations autograd keeps (``nemo_loop.models.looplm.memory``: loops trained ×
  layers × sequence, per attention backend and recompute) for the chunks the loop-aware 1F1B
  schedule holds at once (R̃·min(P, M) chunks per stage, ``loop_schedule.in_flight_limit``), the
  attention masks and shared attention buffers, the loss's buffers and the teacher readouts;
* rollouts: the native engine's KV cache (loops × layers × rollouts × length) and its logits,
  or vLLM's reservation (``gpu_memory_utilization`` of the device);
* teacher: a no-grad forward (LLOPSD's teacher, the KL reference, LoopRPT's EMA teacher).

The loss buffers: Ouro's loss and SFT's form full logits [loops, tokens, rows, V/TP] and keep a
fp32 softmax of each loop; the backward adds the logits' gradient (3·e + 4 bytes per logit at the
peak, e the activation bytes) and the head's weight gradient before DDP adds it into its fp32
buffer (V/TP·h·e; measured, tests/unit/test_memory_plan.py). The fused heads (LLOPSD's
distillation, the policy losses' token log-probs, LoopRPT) hold ``chunk_size × V/TP`` fp32
temporaries (six for LLOPSD's student and teacher sides, three for a token log-prob) and a fp32
gradient of the head's weight; these are estimates from the code, not measured here.

FLOPs per step follow ``nemo_loop.utils.flops`` (real tokens, backward = 2 × forward) on the
assumed sequence lengths; the step time is FLOPs / (ranks × peak × MFU). Lengths a config does
not fix (prompts, teacher contexts, SFT examples) are assumptions the plan prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nemo_loop.models.looplm.config import dtype_bytes, parameter_count
from nemo_loop.models.looplm.loop_schedule import in_flight_limit
from nemo_loop.models.looplm.memory import (
    FP32,
    StageShape,
    attention_buffers,
    layer_activation_bytes,
    loop_activations,
    stage_parameters,
)
from nemo_loop.utils.flops import (
    H100_BF16_DENSE_FLOPS,
    LoopShape,
    forward_flops,
    generation_flops,
    training_flops,
)

GIB = 2 ** 30
# fp32 [chunk_size × V/TP] temporaries a fused head holds at once (see the module docstring)
FUSED_HEAD_TEMPORARIES = {"llopsd": 6, "grpo": 3, "rltt": 3, "oisd": 3, "looprpt": 3}


@dataclass
class PlanAssumptions:
    """What the plan needs beyond the config (``recipes/plan.py`` options)."""

    world_size: int | None = None  # None: tensor_parallel × pipeline_parallel (one DP rank)
    device_memory_gib: float = 80.0
    mfu: float = 0.4
    peak_flops_per_s: float = H100_BF16_DENSE_FLOPS
    prompt_tokens: int | None = None  # rollouts; None: max_sequence_length − max_new_tokens
    context_tokens: int = 512  # LLOPSD's privileged teacher context
    sequence_tokens: int | None = None  # SFT rows; None: max_sequence_length

    def validate(self) -> None:
        for name in ("device_memory_gib", "mfu", "peak_flops_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("world_size", "prompt_tokens", "sequence_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.context_tokens < 0:
            raise ValueError(f"context_tokens must be >= 0, got {self.context_tokens}")


@dataclass(frozen=True)
class Component:
    name: str
    bytes: int
    detail: str = ""


@dataclass
class Workload:
    """One step of an algorithm on one data-parallel rank, in the planner's terms."""

    algorithm: str
    seq: int  # tokens per trained row
    rows: int  # rows per micro-batch
    micro_batches: int  # per rank and step
    loops: int  # loops trained (R̃)
    masked: bool  # padded rows with bool masks
    loss: str  # "logits" | "fused"
    loss_loops: int  # loops the loss reads through the head
    loss_tokens: int  # tokens per row the loss reads
    teacher_copy: str | None = None  # what the extra frozen/EMA copy is
    teacher_seq: int = 0  # no-grad teacher/reference forward: tokens per row
    teacher_loops: int = 0
    teacher_readouts: int = 0  # loops of teacher readouts kept per row for the student's loss
    rollout_batch: int = 0  # rollouts per generate call on this rank
    rollout_length: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    updates: int = 1
    global_flops: int = 0
    assumptions: list[str] = field(default_factory=list)


@dataclass
class MemoryPlan:
    algorithm: str
    model_name: str
    layout: str
    stage: str
    static: list[Component]
    phases: dict[str, list[Component]]
    device_bytes: int
    flops_per_step: int
    step_seconds: float
    notes: list[str]

    def phase_total(self, phase: str) -> int:
        return sum(c.bytes for c in self.static + self.phases[phase])

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_total)

    @property
    def total(self) -> int:
        return self.phase_total(self.peak_phase)

    @property
    def fits(self) -> bool:
        return self.total <= self.device_bytes

    def check_fits(self) -> None:
        """Raise naming the phase and its largest component when the plan does not fit."""
        if self.fits:
            return
        phase = self.peak_phase
        largest = max(self.static + self.phases[phase], key=lambda c: c.bytes)
        raise PlanDoesNotFit(
            f"{self.algorithm} does not fit on {self.layout}: the {phase} phase needs "
            f"{_gib(self.total)} per rank ({self.stage}) of {_gib(self.device_bytes)}; the "
            f"largest part is {largest.name}: {_gib(largest.bytes)} ({largest.detail})")

    def render(self) -> str:
        width = 30
        lines = [f"memory plan: {self.algorithm}, model {self.model_name}",
                 f"layout: {self.layout}; per rank of {self.stage}"]
        lines += [f"  assumed: {note}" for note in self.notes]
        lines.append(f"  {'component':<{width}}{'GiB':>8}")
        for component in self.static:
            lines.append(_row(component, width))
        for phase, components in self.phases.items():
            lines.append(f"  + {phase} phase:")
            lines += [_row(c, width, indent=4) for c in components]
            lines.append(f"    {'= ' + phase + ' total':<{width - 2}}"
                         f"{self.phase_total(phase) / GIB:>8.2f}")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"peak per rank: {_gib(self.total)} ({self.peak_phase} phase) of "
                     f"{_gib(self.device_bytes)} device memory: {verdict}")
        lines.append(f"FLOPs per step: {self.flops_per_step:.3e}; step time at the assumed "
                     f"MFU: {self.step_seconds:.3g} s")
        return "\n".join(lines)


class PlanDoesNotFit(ValueError):
    pass


def plan_training(entry, config, assumptions: PlanAssumptions | None = None) -> MemoryPlan:
    """The plan of ``config`` (a validated config of registry algorithm ``entry``)."""
    assumptions = assumptions or PlanAssumptions()
    assumptions.validate()
    model, parallel = config.model, config.parallel
    model_parallel = parallel.tensor_parallel * parallel.pipeline_parallel
    world = assumptions.world_size or model_parallel
    data_parallel = parallel.data_parallel(world)
    workload = WORKLOADS[entry.name](entry.name, config, data_parallel, assumptions)
    core_attention = "sdpa" if model.attention_backend == "auto" else model.attention_backend
    e = dtype_bytes(model)
    plans = []
    for stage in StageShape.stages(parallel.tensor_parallel, parallel.pipeline_parallel,
                                   parallel.sequence_parallel):
        static = _static(config, stage, data_parallel, workload, e)
        phases = {"training": _training(config, stage, workload, core_attention, e)}
        rollouts = _rollouts(config, stage, workload, assumptions, e)
        if rollouts:
            phases["rollout"] = rollouts
        if workload.teacher_seq:
            phases["teacher"] = _teacher(config, stage, workload, core_attention, e)
        plans.append((static, phases, stage))
    static, phases, stage = max(plans, key=lambda p: max(
        sum(c.bytes for c in p[0] + phase) for phase in p[1].values()))
    flops = workload.global_flops
    seconds = flops / (world * assumptions.peak_flops_per_s * assumptions.mfu)
    notes = workload.assumptions + [
        f"attention {model.attention_backend} planned as {core_attention}"
        + (" (TE's fused attention keeps the same O(s))" if model.attention_backend == "auto"
           else "") + f", recompute {model.recompute}",
        f"MFU {assumptions.mfu:.2f} of {assumptions.peak_flops_per_s / 1e12:.1f} TFLOP/s "
        f"per rank"]
    layout = (f"TP {parallel.tensor_parallel} × PP {parallel.pipeline_parallel} × "
              f"DP {data_parallel} = {world} ranks")
    return MemoryPlan(entry.name, f"{model.name} ({parameter_count(model) / 1e9:.2f} B "
                      f"parameters, {model.num_layers} layers × R={model.num_loops}, "
                      f"{model.params_dtype})", layout, stage.name, static, phases,
                      int(assumptions.device_memory_gib * GIB), flops, seconds, notes)


def _static(config, stage: StageShape, data_parallel: int, workload: Workload, e: int
            ) -> list[Component]:
    params = stage_parameters(config.model, stage)
    master = 0 if config.model.params_dtype == "float32" else FP32  # fp32 params are the master
    shard = data_parallel if config.optim.use_distributed_optimizer else 1
    components = [
        Component("weights", params * e, f"{params / 1e6:,.1f} M parameters × {e} bytes"),
        Component("gradients", params * FP32, "fp32 gradient buffer (grad_reduce_in_fp32)"),
        Component("optimizer shard", params * (master + 2 * FP32) // shard,
                  f"{'fp32 master + ' if master else ''}Adam m, v"
                  + (f" / DP {shard} (distributed optimizer)" if shard > 1 else ""))]
    if workload.teacher_copy:
        components.append(Component(workload.teacher_copy, params * e, "a second copy of the "
                                    "weights, no gradients"))
    return components


def _training(config, stage: StageShape, workload: Workload, core_attention: str, e: int
              ) -> list[Component]:
    model, w = config.model, workload
    per_loop = loop_activations(model, w.seq, w.rows, stage, core_attention, w.masked, e)
    chunks = in_flight_limit("1f1b", stage.pipeline_parallel, w.micro_batches, w.loops)
    chunk_micro_batches = min(stage.pipeline_parallel, w.micro_batches)
    components = [
        Component("activations", chunks * per_loop.per_loop,
                  f"{w.loops} loop(s) × {min(stage.pipeline_parallel, w.micro_batches)} "
                  f"micro-batch(es) in flight × {w.rows} row(s) × {w.seq:,} tokens; "
                  f"{per_loop.note}")]
    shared = attention_buffers(model, w.seq, w.rows, stage, core_attention, w.masked, e)
    masks = w.micro_batches * w.rows * w.seq * w.seq if w.masked else 0
    masks += w.micro_batches * w.rows * w.teacher_seq ** 2 if w.teacher_seq and w.masked else 0
    if shared or masks:
        components.append(Component("attention masks and buffers",
                                    masks + shared * chunk_micro_batches,
                                    "bool masks of the step's micro-batches"
                                    + (f", {core_attention}'s shared per-micro-batch buffer"
                                       if shared else "")))
    # The loss's buffers are gone when the layers' backward (and its recompute) starts.
    loss = _loss_buffers(config, workload) if stage.last else Component("loss buffers", 0)
    working = Component("backward working set", per_loop.working_set,
                        "one recomputed chunk / one layer's attention scores")
    first, second = sorted((loss, working), key=lambda c: c.bytes, reverse=True)
    if first.bytes:
        components.append(Component(first.name, first.bytes, first.detail + (
            f"; then the {second.name}, {second.bytes / GIB:.2f} GiB" if second.bytes else "")))
    if stage.last:
        if w.teacher_readouts:
            readouts = (w.micro_batches * w.rows * w.loss_tokens * w.teacher_readouts
                        * model.hidden_size * e)
            components.append(Component("teacher readouts", readouts,
                                        f"{w.teacher_readouts} loop(s) × response tokens × "
                                        f"rows, kept for the student's loss"))
    return components


def _loss_buffers(config, workload: Workload) -> Component:
    model, w = config.model, workload
    tp = config.parallel.tensor_parallel
    e = dtype_bytes(model)
    vocab = model.vocab_size // tp
    if w.loss == "logits":
        logits = w.loss_loops * w.loss_tokens * w.rows * vocab
        head_grad = vocab * model.hidden_size * e
        return Component("loss buffers", logits * (3 * e + FP32) + head_grad,
                         f"{w.loss_loops} loop(s) of logits [{w.loss_tokens:,} × {w.rows} × "
                         f"{vocab:,}]: logits, fp32 softmax, their gradient; the head's "
                         f"weight gradient")
    chunk = getattr(config.loss, "chunk_size", None) if hasattr(config, "loss") else None
    chunk = min(chunk or 1024, w.loss_tokens * w.rows)
    count = FUSED_HEAD_TEMPORARIES[w.algorithm]
    head_grad = vocab * model.hidden_size * FP32
    return Component("loss buffers", count * chunk * vocab * FP32 + head_grad,
                     f"fused head: {count} fp32 [{chunk:,} × {vocab:,}] chunk temporaries + "
                     f"the head's fp32 gradient")


def _rollouts(config, stage: StageShape, workload: Workload, assumptions: PlanAssumptions,
              e: int) -> list[Component]:
    w = workload
    if not w.rollout_batch:
        return []
    generation = config.generation
    if generation.backend == "vllm":
        reserved = int(generation.vllm.gpu_memory_utilization * assumptions.device_memory_gib
                       * GIB)
        return [Component("vLLM engine", reserved, f"gpu_memory_utilization "
                          f"{generation.vllm.gpu_memory_utilization} of the device")]
    model = config.model
    heads = model.num_attention_heads
    groups = model.num_query_groups or heads
    head_dim = model.hidden_size // heads
    cache = (2 * w.loops * model.num_layers * w.rollout_batch * w.rollout_length
             * (groups // stage.tensor_parallel) * head_dim * e)
    vocab = model.vocab_size // stage.tensor_parallel
    prefill = layer_activation_bytes(model, w.prompt_tokens, w.rollout_batch, stage,
                                     "sdpa" if model.attention_backend == "auto"
                                     else model.attention_backend, True, e)
    return [Component("KV cache", cache, f"{w.loops} loop(s) × {model.num_layers} layers × "
                      f"{w.rollout_batch} rollouts × {w.rollout_length:,} tokens"),
            Component("engine working set", 2 * w.rollout_batch * vocab * FP32 + prefill,
                      "sampling logits and one layer's prefill tensors")]


def _teacher(config, stage: StageShape, workload: Workload, core_attention: str, e: int
             ) -> list[Component]:
    w = workload
    layer = layer_activation_bytes(config.model, w.teacher_seq, w.rows, stage, core_attention,
                                   w.masked, e)
    readouts = w.micro_batches * w.rows * w.loss_tokens * max(w.teacher_readouts, 1) \
        * config.model.hidden_size * e
    return [Component("no-grad forward working set", layer,
                      f"one layer of {w.rows} row(s) × {w.teacher_seq:,} tokens at a time"),
            Component("readouts", readouts, "the readouts the loss will read")]


# ----- workloads: each algorithm's step in the planner's terms -----

def _rollout_workload(name: str, config, data_parallel: int, assumptions: PlanAssumptions
                      ) -> Workload:
    model, rollout, trainer = config.model, config.rollout, config.trainer
    new = rollout.max_new_tokens
    prompt = assumptions.prompt_tokens or max(model.max_sequence_length - new, 1)
    seq = min(prompt + new, model.max_sequence_length)
    rollouts = trainer.prompts_per_step // data_parallel * rollout.samples_per_prompt
    notes = [f"prompts of {prompt:,} tokens" + ("" if assumptions.prompt_tokens else
             " (the longest the engine allows: max_sequence_length − max_new_tokens; "
             "--prompt-tokens to change)") + f" + {new:,} new tokens"]
    return Workload(algorithm=name, seq=seq, rows=trainer.micro_batch_size,
                    micro_batches=-(-rollouts // trainer.micro_batch_size),
                    loops=rollout.student_loops, masked=True, loss="fused", loss_loops=1,
                    loss_tokens=new, rollout_batch=rollouts, rollout_length=seq,
                    prompt_tokens=prompt, new_tokens=new, assumptions=notes)


def _llopsd(name, config, data_parallel, assumptions) -> Workload:
    w = _rollout_workload(name, config, data_parallel, assumptions)
    mapping = config.loss.teacher_loop_for_each_student_loop(config.rollout.student_loops,
                                                             config.model.num_loops)
    w.loss_loops = w.loops
    w.teacher_seq = w.seq + assumptions.context_tokens
    w.teacher_loops, w.teacher_readouts = max(mapping), len(set(mapping))
    mode = config.teacher.mode
    w.teacher_copy = None if mode == "same" else f"teacher copy ({mode})"
    w.assumptions.append(f"teacher context of {assumptions.context_tokens:,} tokens "
                         f"(--context-tokens)")
    shape, rollouts = LoopShape.of(config.model), w.rollout_batch * data_parallel
    w.global_flops = rollouts * (
        generation_flops(shape, w.prompt_tokens, w.new_tokens, w.loops)
        + forward_flops(shape, w.teacher_seq, w.teacher_loops,
                        readouts=w.new_tokens * w.teacher_readouts)
        + training_flops(shape, w.seq, w.loops, readouts=w.new_tokens * w.loops))
    return w


def _policy(name, config, data_parallel, assumptions) -> Workload:
    w = _rollout_workload(name, config, data_parallel, assumptions)
    w.loss_loops = 1 if name == "grpo" else w.loops  # RLTT, OISD read every loop
    w.updates = config.trainer.updates_per_batch
    if config.loss.kl_coef > 0:
        w.teacher_copy = "KL reference copy"
        w.teacher_seq, w.teacher_loops = w.seq, w.loops
    shape, rollouts = LoopShape.of(config.model), w.rollout_batch * data_parallel
    reference = forward_flops(shape, w.seq, w.loops, readouts=w.new_tokens) \
        if w.teacher_copy else 0
    w.global_flops = rollouts * (
        generation_flops(shape, w.prompt_tokens, w.new_tokens, w.loops) + reference
        + w.updates * training_flops(shape, w.seq, w.loops,
                                     readouts=w.new_tokens * w.loss_loops))
    return w


def _sft(name, config, data_parallel, assumptions) -> Workload:
    model, trainer = config.model, config.trainer
    seq = assumptions.sequence_tokens or model.max_sequence_length
    loops = trainer.student_loops
    loss_loops = loops if config.loss.kind == "ouro" else 1
    rows = trainer.examples_per_step // data_parallel
    w = Workload(algorithm=name, seq=seq, rows=trainer.micro_batch_size,
                 micro_batches=-(-rows // trainer.micro_batch_size), loops=loops, masked=True,
                 loss="logits", loss_loops=loss_loops, loss_tokens=seq,
                 assumptions=[f"examples of {seq:,} tokens"
                              + ("" if assumptions.sequence_tokens else
                                 " (max_sequence_length; --sequence-tokens to change)")])
    w.global_flops = trainer.examples_per_step * training_flops(
        LoopShape.of(model), seq, loops, readouts=seq * loss_loops)
    return w


def _pretrain(name, config, data_parallel, assumptions) -> Workload:
    model, trainer = config.model, config.trainer
    seq, masked, source = _pretraining_sequence(config)
    rows = trainer.global_batch_size // data_parallel
    copies = 1
    w = Workload(algorithm=name, seq=seq, rows=trainer.micro_batch_size,
                 micro_batches=-(-rows // trainer.micro_batch_size), loops=model.num_loops,
                 masked=masked, loss="logits", loss_loops=model.num_loops, loss_tokens=seq,
                 assumptions=[f"sequences of {seq:,} tokens ({source})"])
    if name == "looprpt":  # clean rows + G noisy copies, every loop through the fused head
        copies = 1 + config.looprpt.num_rollouts
        w.rows *= copies
        w.loss = "fused"
        w.teacher_copy = "EMA teacher copy"
        w.teacher_seq, w.teacher_loops = seq, model.num_loops
    shape = LoopShape.of(model)
    w.global_flops = trainer.global_batch_size * (
        copies * training_flops(shape, seq, model.num_loops, readouts=seq * model.num_loops)
        + (forward_flops(shape, seq, model.num_loops, readouts=seq * model.num_loops)
           if copies > 1 else 0))
    return w


def _pretraining_sequence(config) -> tuple[int, bool, str]:
    if config.data.source == "text":
        text = config.data.text
        return text.sequence_length, text.reset_attention_mask, "data.text.sequence_length"
    import torch

    from nemo_loop.algorithms.pretrain import sample_batch
    from nemo_loop.tasks import build_task

    task = build_task(config.task)
    batch = sample_batch(task, task.tokenizer(), config.trainer.global_batch_size,
                         torch.Generator().manual_seed(config.trainer.data_seed * 1_000_003 + 1))
    return batch["input_ids"].shape[1], "attention_mask" in batch, \
        f"the width of step 1's {config.task.name} batch"


WORKLOADS = {"llopsd": _llopsd, "grpo": _policy, "rltt": _policy, "oisd": _policy,
             "sft": _sft, "pretrain": _pretrain, "looprpt": _pretrain}


def _row(component: Component, width: int, indent: int = 2) -> str:
    return (f"{'':{indent}}{component.name:<{width - indent + 2}}{component.bytes / GIB:>8.2f}"
            f"  {component.detail}").rstrip()


def _gib(value: int) -> str:
    return f"{value / GIB:,.1f} GiB"

