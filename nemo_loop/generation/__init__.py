"""On-policy generation for looped LMs: the engine interface and the native megatron engine."""

from nemo_loop.generation.engine import (
    GenerationEngine,
    GenerationResult,
    RefitReport,
    SamplingParams,
)
from nemo_loop.generation.native import NativeLoopEngine

__all__ = ["GenerationEngine", "GenerationResult", "NativeLoopEngine", "RefitReport",
           "SamplingParams"]
