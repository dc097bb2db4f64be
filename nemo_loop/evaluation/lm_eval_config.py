"""Typed settings of the lm-evaluation-harness adapter (its ``model_args``) and of the sweep
recipe (``conf/lm_eval.yaml``). Importing this module never imports lm_eval.

The adapter's ``model_args`` are this project's config fields, so lm-eval's
``key=value,key=value`` string takes the same dotted keys as a recipe override::

    checkpoint=runs/pretrain,num_loops=2,task.name=shell_game,generation.backend=native

An exit policy lives in ``generation.exit`` (:mod:`nemo_loop.generation.exit`), as in every
recipe that generates.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from nemo_loop.generation.backend import GenerationConfig
from nemo_loop.tasks import TaskConfig, build_task
from nemo_loop.tasks.shell_game import SPLITS
from nemo_loop.utils.logging import WandbConfig

# What lm-eval itself adds to model_args; the adapter has no use for them (see from_kwargs).
LM_EVAL_EXTRAS = ("batch_size", "max_batch_size", "device")


def exit_policy(generation: GenerationConfig) -> str:
    return generation.exit.policy


def with_exit_threshold(generation: GenerationConfig, threshold: float) -> GenerationConfig:
    """``generation`` with ``exit.threshold`` set (one point of an exit-threshold sweep)."""
    return replace(generation, exit=replace(generation.exit, threshold=threshold))


@dataclass
class LMEvalModelArgs:
    """The ``nemo_loop`` model of lm-eval: a checkpoint at one loop budget."""

    # A run directory, its checkpoints/, one step, a model-only directory or a converted Ouro
    # checkpoint (nemo_loop.checkpointing.resolve_checkpoint); the architecture comes from it.
    checkpoint: str = ""
    checkpoint_step: int | None = None  # with a checkpoint root: which step (default: latest)
    num_loops: int | None = None  # loop budget R̃ in 1..R (null: the model's R)
    # The tokenizer and chat template the model was trained with (task.name=shell_game for the
    # shell game; math: the Ouro tokenizer and ChatML, task.math.prompt.*).
    task: TaskConfig = field(default_factory=TaskConfig)
    data_root: str | None = None  # where a relative tokenizer path lives
    batch_size: int = 16  # sequences per scoring forward and per generation batch
    max_length: int | None = None  # context window in tokens (null: model.max_sequence_length)
    max_gen_toks: int = 256  # for generation tasks whose generation_kwargs name no limit
    seed: int = 1234  # the sampling stream of tasks that sample (do_sample: true)
    # Which engine generates (native | vllm) and its exit policy (generation.exit).
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # Used when the adapter sets up model parallelism itself (world size = tensor_parallel);
    # an already initialised layout must match it.
    tensor_parallel: int = 1

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "LMEvalModelArgs":
        """lm-eval's parsed ``model_args`` (+ its batch_size/device extras) → validated args."""
        from nemo_loop.config import load_config

        kwargs = dict(kwargs)
        if kwargs.get("max_batch_size") is not None or kwargs.get("device") is not None:
            raise ValueError("nemo_loop model: max_batch_size and device are not model args; "
                             "the adapter runs where the launcher put this rank (CPU, or the "
                             "CUDA device of LOCAL_RANK) in batches of batch_size")
        kwargs.pop("max_batch_size", None)
        kwargs.pop("device", None)
        if str(kwargs.get("batch_size", "")).startswith("auto"):
            raise ValueError("nemo_loop model: batch_size must be an integer, not 'auto'")
        overrides = [f"{key}={'null' if value is None else value}"
                     for key, value in kwargs.items()]
        return load_config(cls, None, overrides)

    def validate(self) -> None:
        if not self.checkpoint:
            raise ValueError("checkpoint is required: a run directory, its checkpoints/, a step "
                             "directory, a model/ directory or a converted Ouro checkpoint")
        if self.checkpoint_step is not None and self.checkpoint_step < 0:
            raise ValueError(f"checkpoint_step must be >= 0, got {self.checkpoint_step}")
        if self.num_loops is not None and self.num_loops < 1:
            raise ValueError(f"num_loops must be >= 1 (and at most the model's R), got "
                             f"{self.num_loops}")
        if self.batch_size < 1 or self.max_gen_toks < 1 or self.tensor_parallel < 1:
            raise ValueError(f"batch_size, max_gen_toks and tensor_parallel must be >= 1, got "
                             f"{self.batch_size}, {self.max_gen_toks}, {self.tensor_parallel}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 or null, got {self.max_length}")
        self.task.validate()
        self.generation.validate()


@dataclass
class ShellGameTasksConfig:
    """The shell game as two local lm-eval tasks (``shell_game_mc``: the answer cup's
    log-likelihood among all cups; ``shell_game_gen``: greedy generation, exact match), written
    into ``<output_dir>/lm_eval_tasks`` from held-out games of the task in model_args.task."""

    problems: int = 0  # distinct games (0: do not write the tasks)
    split: str = "test"


@dataclass
class LMEvalConfig:
    model_args: LMEvalModelArgs = field(default_factory=LMEvalModelArgs)
    tasks: list[str] = field(default_factory=list)  # lm-eval task, group or tag names
    include_paths: list[str] = field(default_factory=list)  # folders of local YAML tasks
    shell_game_tasks: ShellGameTasksConfig = field(default_factory=ShellGameTasksConfig)
    loop_budgets: list[int] = field(default_factory=list)  # empty: 1..R
    # One evaluation per threshold of generation.exit's policy at every budget.
    exit_thresholds: list[float] = field(default_factory=list)
    num_fewshot: int | None = None  # null: each task's own default
    limit: int | None = None  # first N documents of every task (null: all)
    # Prompts through the model's chat template (as in training) rather than as raw text.
    apply_chat_template: bool = True
    bootstrap_iters: int = 1000  # standard errors of metrics without a closed form
    wandb: WandbConfig = field(default_factory=WandbConfig)
    output_dir: str = "runs/lm_eval"

    def validate(self) -> None:
        self._validate_exit_thresholds()  # and model_args, at every threshold
        self.wandb.validate()
        if self.model_args.num_loops is not None:
            raise ValueError("model_args.num_loops is set, but this recipe sweeps loop_budgets; "
                             "leave num_loops null and list the budgets in loop_budgets")
        if not self.tasks:
            raise ValueError("tasks is empty: name at least one lm-eval task")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks lists a task twice: {self.tasks}")
        if any(r < 1 for r in self.loop_budgets) or \
                len(set(self.loop_budgets)) != len(self.loop_budgets):
            raise ValueError(f"loop_budgets must be distinct integers >= 1 (and at most the "
                             f"model's R), got {self.loop_budgets}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or null, got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(f"num_fewshot must be >= 0 or null, got {self.num_fewshot}")
        if self.bootstrap_iters < 0:
            raise ValueError(f"bootstrap_iters must be >= 0, got {self.bootstrap_iters}")
        self._validate_shell_game_tasks()

    def _validate_exit_thresholds(self) -> None:
        """Without thresholds, model_args as they are; with them, the exit policy is swept, so
        it must take a threshold, its own must be unset, and each swept one must be valid."""
        if not self.exit_thresholds:
            self.model_args.validate()
            return
        generation = self.model_args.generation
        if generation.exit.policy in ("static", "oracle"):
            raise ValueError(f"exit_thresholds is set but generation.exit.policy is "
                             f"{generation.exit.policy!r}: thresholds sweep q_exit, confidence "
                             f"or hidden_delta")
        if generation.exit.threshold is not None:
            raise ValueError(f"set either generation.exit.threshold "
                             f"({generation.exit.threshold}) or exit_thresholds "
                             f"({self.exit_thresholds}), not both")
        if len(set(self.exit_thresholds)) != len(self.exit_thresholds):
            raise ValueError(f"exit_thresholds must be distinct, got {self.exit_thresholds}")
        for threshold in self.exit_thresholds:
            replace(self.model_args,
                    generation=with_exit_threshold(generation, threshold)).validate()

    def _validate_shell_game_tasks(self) -> None:
        local = self.shell_game_tasks
        if local.problems < 0:
            raise ValueError(f"shell_game_tasks.problems must be >= 0, got {local.problems}")
        if local.problems == 0:
            return
        if self.model_args.task.name != "shell_game":
            raise ValueError(f"shell_game_tasks.problems is set but model_args.task.name is "
                             f"{self.model_args.task.name!r}; the shell-game tasks need "
                             f"task.name=shell_game")
        if local.split not in SPLITS:
            raise ValueError(f"shell_game_tasks.split must be one of {SPLITS}, got "
                             f"{local.split!r}")
        build_task(self.model_args.task).check_count(local.split, local.problems)

    def sweep_points(self, max_loops: int) -> list[tuple[int, float | None]]:
        """(loop budget, exit threshold or None) of every evaluation, budgets ascending."""
        budgets = sorted(self.loop_budgets) or list(range(1, max_loops + 1))
        thresholds = self.exit_thresholds or [None]
        return [(loops, threshold) for loops in budgets for threshold in thresholds]
