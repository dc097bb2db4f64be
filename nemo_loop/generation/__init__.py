"""On-policy generation for looped LMs: the engine interface, the native megatron engine, the
vLLM engine and the ``generation.backend`` switch between them (``backend.py``).

The engines are imported on first use: vLLM loads this package's Ouro plugin in processes of its
own, which need neither megatron-core nor vLLM's engine to be imported twice.
"""

from nemo_loop.generation.engine import (
    GenerationEngine,
    GenerationResult,
    RefitReport,
    SamplingParams,
)

_LAZY = {
    "NativeLoopEngine": "nemo_loop.generation.native",
    "VLLMEngine": "nemo_loop.generation.vllm_engine",
    "VLLMConfig": "nemo_loop.generation.vllm_engine",
    "GenerationConfig": "nemo_loop.generation.backend",
    "build_engine": "nemo_loop.generation.backend",
}

__all__ = ["GenerationConfig", "GenerationEngine", "GenerationResult", "NativeLoopEngine",
           "RefitReport", "SamplingParams", "VLLMConfig", "VLLMEngine", "build_engine"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
