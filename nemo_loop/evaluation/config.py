"""Typed configuration of an evaluation run (``conf/eval.yaml`` + ``key=value`` overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from nemo_loop.data.prompts import BenchmarkSpec
from nemo_loop.evaluation.metrics import PASS_AT_K_CANDIDATES
from nemo_loop.generation.backend import GenerationConfig
from nemo_loop.generation.engine import SamplingConfig
from nemo_loop.models.looplm.config import LoopModelConfig
from nemo_loop.tasks import TaskConfig, build_task
from nemo_loop.utils.logging import WandbConfig


@dataclass
class EvalSamplingConfig(SamplingConfig):
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 1024
    seed: int = 1234


@dataclass
class EvalConfig:
    model: LoopModelConfig = field(default_factory=LoopModelConfig)
    # Anywhere inside a run: its directory, its checkpoint root, one step directory or a
    # model-only directory (the architecture is read from the checkpoint, not from model);
    # null evaluates a randomly initialised model (a smoke test of the pipeline, loudly logged).
    checkpoint: str | None = None
    checkpoint_step: int | None = None  # with a checkpoint root: which step (default: latest)
    benchmarks: list[str] = field(default_factory=lambda: ["math500"])
    # A user file with its own field names; evaluated in addition to ``benchmarks`` when
    # custom.path is set.
    custom: BenchmarkSpec = field(default_factory=BenchmarkSpec)
    data_root: str | None = None  # default: $NEMO_LOOP_DATA, else ../shared/data
    limit: int | None = None  # first N problems of every benchmark (None: all)
    loop_budgets: list[int] = field(default_factory=list)  # empty: 1..R
    n_samples: int = 4
    pass_at_k: list[int] = field(default_factory=lambda: list(PASS_AT_K_CANDIDATES))
    sampling: EvalSamplingConfig = field(default_factory=EvalSamplingConfig)
    # Prompt format, tokenizer, answer checking and the benchmark registry.
    task: TaskConfig = field(default_factory=TaskConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # native | vllm
    # With an adaptive generation.exit policy: the thresholds it is evaluated at (empty: its own
    # generation.exit.threshold), after the static budgets, at R̃ = exit_loops: one of the loop
    # budgets (its static run is the reference; null: the largest), e.g. a student's R̃.
    exit_thresholds: list[float] = field(default_factory=list)
    exit_loops: int | None = None
    generation_batch_size: int = 64  # sequences per native-engine batch (vLLM batches itself)
    entropy_batch_size: int = 16  # sequences per entropy forward
    tensor_parallel: int = 1
    wandb: WandbConfig = field(default_factory=WandbConfig)
    output_dir: str = "runs/eval"

    def validate(self, check_paths: bool = True) -> None:
        """``check_paths=False`` skips the checks on files an earlier pipeline phase writes."""
        self.model.validate(self.tensor_parallel)
        self.sampling.validate()
        self._validate_generation()
        self.task.validate()
        self.wandb.validate()
        task = build_task(self.task)
        for name in self.benchmarks:
            task.benchmark(name)
        if self.custom.path:
            if self.custom.name in self.benchmarks:
                raise ValueError(f"custom.name {self.custom.name!r} clashes with a benchmark in "
                                 f"benchmarks")
            self.custom.validate(self.data_root, check_path=check_paths)
        if not self.benchmarks and not self.custom.path:
            raise ValueError("nothing to evaluate: benchmarks is empty and custom.path is unset")
        bad_budgets = [r for r in self.loop_budgets if not 1 <= r <= self.model.num_loops]
        if bad_budgets or len(set(self.loop_budgets)) != len(self.loop_budgets):
            raise ValueError(f"loop_budgets must be distinct integers in [1, model.num_loops="
                             f"{self.model.num_loops}], got {self.loop_budgets}")
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        if not self.pass_at_k or any(k < 1 for k in self.pass_at_k):
            raise ValueError(f"pass_at_k must be a non-empty list of k >= 1, got "
                             f"{self.pass_at_k}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or null, got {self.limit}")
        if self.generation_batch_size < 1 or self.entropy_batch_size < 1:
            raise ValueError("generation_batch_size and entropy_batch_size must be >= 1")
        if self.checkpoint_step is not None and self.checkpoint is None:
            raise ValueError("checkpoint_step is set but checkpoint is null")

    def _validate_generation(self) -> None:
        exit = self.generation.exit
        if not self.exit_thresholds:
            self.generation.validate()
        elif not exit.adaptive or exit.policy == "oracle":
            raise ValueError(f"exit_thresholds is set but generation.exit.policy is "
                             f"{exit.policy!r}: thresholds sweep q_exit, confidence or "
                             f"hidden_delta")
        elif exit.threshold is not None:
            raise ValueError(f"set either generation.exit.threshold ({exit.threshold}) or "
                             f"exit_thresholds ({self.exit_thresholds}), not both")
        else:
            for threshold in self.exit_thresholds:
                replace(self.generation, exit=replace(exit, threshold=threshold)).validate()
        if self.exit_loops is not None and self.exit_loops not in self.budgets():
            raise ValueError(f"exit_loops {self.exit_loops} must be one of the loop budgets "
                             f"{self.budgets()} (its static run is the adaptive sweep's "
                             f"reference)")
        exit.check_loops(self.exit_budget())

    def budgets(self) -> list[int]:
        return sorted(self.loop_budgets) or list(range(1, self.model.num_loops + 1))

    def exit_budget(self) -> int:
        """R̃ of the adaptive-exit sweep: ``exit_loops``, else the largest loop budget."""
        return self.exit_loops or max(self.budgets())

    def benchmark_specs(self) -> list[BenchmarkSpec]:
        """The registered benchmarks, then the custom file; ``limit`` applies to all of them."""
        task = build_task(self.task)
        specs = [task.benchmark(name) for name in self.benchmarks]
        specs += [self.custom] if self.custom.path else []
        return specs if self.limit is None else [replace(s, limit=self.limit) for s in specs]
