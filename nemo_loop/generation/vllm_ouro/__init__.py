"""The LoopLM (Ouro format) as an out-of-tree vLLM model, owned by this project.

vLLM dropped its Ouro model after 0.26 and transformers 5.x has no ``model_type: ouro``, so this
package brings both: ``OuroConfig`` (registered with transformers' ``AutoConfig``) and
``OuroForCausalLM`` (registered with vLLM's ``ModelRegistry``). :func:`register` is the
``vllm.general_plugins`` entry point declared in pyproject.toml, so ``vllm.LLM(model=<an exported
Ouro dir>)`` works in every process vLLM starts (engine core, TP workers), not only in ours.

Nothing here imports vLLM or megatron-core at import time: vLLM loads plugins in fresh
processes, and the model module is registered lazily by name.
"""

from __future__ import annotations

ARCHITECTURE = "OuroForCausalLM"
MODEL_CLASS = "nemo_loop.generation.vllm_ouro.model:OuroForCausalLM"
WORKER_EXTENSION = "nemo_loop.generation.vllm_ouro.worker.LoopWorkerExtension"


def register() -> None:
    """Register the Ouro config with transformers and the model with vLLM (idempotent)."""
    from vllm import ModelRegistry

    from nemo_loop.generation.vllm_ouro.config import register_ouro_config

    register_ouro_config()
    # By "module:class" so that registering imports neither torch layers nor CUDA.
    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
