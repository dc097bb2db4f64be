"""``model_type: ouro`` for transformers 5.x, which does not ship it.

An Ouro ``config.json`` is a Qwen2 config plus the loop count ``total_ut_steps`` (R) and the
early-exit threshold; the class adds exactly those to transformers' ``Qwen2Config`` (which also
turns the legacy ``rope_theta`` into the ``rope_parameters`` vLLM's RoPE reads).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, Qwen2Config


@strict
class OuroConfig(Qwen2Config):
    model_type = "ouro"

    total_ut_steps: int = 4  # R: loops of the shared layers per token
    early_exit_threshold: float = 1.0  # read by HF's adaptive-exit generation, unused here


def register_ouro_config() -> None:
    """Make ``AutoConfig`` (and therefore vLLM's config loader) read ``model_type: ouro``."""
    try:
        AutoConfig.register("ouro", OuroConfig)
    except ValueError:  # already registered, in this process
        pass
