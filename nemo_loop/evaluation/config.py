"""Typed configuration of an evaluation run (``conf/eval.yaml`` + ``key=value`` overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from nemo_loop.data.chat import ChatConfig
from nemo_loop.evaluation.answers import ANSWER_CHECKERS
from nemo_loop.evaluation.benchmarks import BenchmarkSpec, get_spec
from nemo_loop.evaluation.metrics import PASS_AT_K_CANDIDATES
from nemo_loop.models.looplm.config import LoopModelConfig
from nemo_loop.utils.logging import WandbConfig


@dataclass
class EvalSamplingConfig:
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 1024
    seed: int = 1234

    def validate(self) -> None:
        from nemo_loop.generation.engine import SamplingParams

        SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                       max_new_tokens=self.max_new_tokens, seed=self.seed)


@dataclass
class EvalConfig:
    model: LoopModelConfig = field(default_factory=LoopModelConfig)
    # A training-checkpoint root (with latest_checkpointed_step.txt) or one step directory;
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
    prompt: ChatConfig = field(default_factory=ChatConfig)
    generation_batch_size: int = 64  # sequences per engine call
    entropy_batch_size: int = 16  # sequences per entropy forward
    answer_checker: str = "math"  # math: math-verify equivalence | exact: first word equals
    verify_timeout_s: int = 5
    tensor_parallel: int = 1
    wandb: WandbConfig = field(default_factory=WandbConfig)
    output_dir: str = "runs/eval"

    def validate(self, check_paths: bool = True) -> None:
        """``check_paths=False`` skips the checks on files an earlier pipeline phase writes."""
        self.model.validate(self.tensor_parallel)
        self.sampling.validate()
        self.prompt.validate()
        self.wandb.validate()
        for name in self.benchmarks:
            get_spec(name)
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
        if self.answer_checker not in ANSWER_CHECKERS:
            raise ValueError(f"answer_checker must be one of {ANSWER_CHECKERS}, got "
                             f"{self.answer_checker!r}")
        if self.verify_timeout_s < 1:
            raise ValueError(f"verify_timeout_s must be >= 1 second, got {self.verify_timeout_s}")
        if self.checkpoint_step is not None and self.checkpoint is None:
            raise ValueError("checkpoint_step is set but checkpoint is null")

    def budgets(self) -> list[int]:
        return sorted(self.loop_budgets) or list(range(1, self.model.num_loops + 1))

    def benchmark_specs(self) -> list[BenchmarkSpec]:
        """The registered benchmarks, then the custom file; ``limit`` applies to all of them."""
        specs = [get_spec(name) for name in self.benchmarks]
        specs += [self.custom] if self.custom.path else []
        return specs if self.limit is None else [replace(s, limit=self.limit) for s in specs]
