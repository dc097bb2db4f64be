"""Which engine generates: the one ``generation:`` config section and ``build_engine``.

Every caller that generates (LLOPSD rollouts, the evaluation harness, benchmarks) builds its
engine here, so ``generation.backend: native | vllm`` means the same thing everywhere.

    generation:
      backend: vllm          # native (default): megatron model in this process; vllm: vLLM
      vllm:                  # used by backend=vllm only (see VLLMConfig)
        kv_cache_memory_gb: 1.0
      exit:                  # adaptive loop exit at inference (ExitConfig, exit.py)
        policy: static

``generation.exit`` reaches the engine through ``SamplingConfig.params(..., exit=...)``; vLLM
runs every policy with ``kv_fill: compute`` only (readout selection: its scheduler keeps every
request in every loop).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nemo_loop.generation.engine import GenerationEngine
from nemo_loop.generation.exit import ExitConfig
from nemo_loop.generation.vllm_engine import VLLMConfig

BACKENDS = ("native", "vllm")


@dataclass
class GenerationConfig:
    backend: str = "native"  # native | vllm
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    exit: ExitConfig = field(default_factory=ExitConfig)

    def validate(self) -> None:
        self.validate_engine()
        self.exit.validate()
        if self.backend == "vllm" and self.exit.kv_fill != "compute":
            raise ValueError(f"generation.exit.kv_fill={self.exit.kv_fill} is not supported by "
                             f"generation.backend=vllm: its scheduler runs every request "
                             f"through every loop, so only kv_fill=compute (the exit loop's "
                             f"readout, no compute saved) is possible; use backend=native")

    def validate_engine(self) -> None:
        """What building the engine needs (the exit policy travels with each generate call)."""
        if self.backend not in BACKENDS:
            raise ValueError(f"generation.backend must be one of {BACKENDS}, got "
                             f"{self.backend!r}")
        self.vllm.validate()


def build_engine(config: GenerationConfig, model: torch.nn.Module, *,
                 max_batch_size: int | None = None) -> GenerationEngine:
    """The engine for ``model`` (a LoopGPTModel or its DDP wrapper, this rank's TP shard).

    native: generates with ``model`` itself (refit rebinds, zero copies). vllm: a vLLM engine
    holding a copy of the current weights (refit copies them in). ``max_batch_size`` bounds the
    native engine's batches; vLLM schedules its own (``generation.vllm.max_num_seqs``).
    """
    config.validate_engine()
    if config.backend == "vllm":
        from nemo_loop.generation.vllm_engine import VLLMEngine

        return VLLMEngine.from_model(model, config.vllm)
    from nemo_loop.generation.native import NativeLoopEngine

    return NativeLoopEngine(model, max_batch_size=max_batch_size)
