"""Known third-party noise, filtered once for every entry point (``nemo_loop/__init__.py``).

Only messages that say nothing actionable on this project's supported setups are listed: the
CPU/no-TE fallbacks megatron-core announces at import, its deprecation notices about its own
internals, and torch deprecations raised inside megatron. Anything else — above all the
project's own warnings — still reaches the console. The filters also go into
``PYTHONWARNINGS`` so that processes spawned later (dist_checkpointing's writers) inherit them.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

# (category, start of the message). No ':' or ',' inside: PYTHONWARNINGS cannot carry them.
KNOWN_WARNINGS = (
    (UserWarning, "Transformer Engine and Apex are not installed"),
    (UserWarning, "Apex is not installed"),
    (UserWarning, "absl.logging is not installed"),
    (UserWarning, "full scope is deprecated"),
    (UserWarning, "MimoModelConfig is experimental"),
    # model.recompute=selective with core_attn: megatron's advice for TE's fused attention
    # (docs/performance.md says when core_attn recompute pays: dot_product attention).
    (UserWarning, "If you are using transformer_engine as the transformer implementation"),
    # megatron's optimizer probes param.main_grad on non-leaf views of its flat buffers.
    (UserWarning, "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed"),
    (FutureWarning, "`torch.distributed.reduce_scatter_tensor` is deprecated"),
    (FutureWarning, "`torch.distributed.all_gather_into_tensor` is deprecated"),
)
# (logger, start of the message) of megatron-core log records that are notices, not problems.
KNOWN_LOG_RECORDS = (
    ("megatron.core.distributed.distributed_data_parallel",
     "DistributedDataParallel: full_param_layout not provided"),
    ("megatron.core.dist_checkpointing.strategies.torch", "MCore's async save is deprecated"),
    # vLLM engines here take and return token ids (skip_tokenizer_init): there is no tokenizer
    # to warm a chat template with or to read an EOS from; stops are explicit stop_token_ids.
    ("vllm.renderers.base", "Chat template warmup failed"),
    ("vllm.renderers.base", "Using None for EOS token id"),
    # vLLM's CPU worker disables torch.set_num_threads; VLLMEngine restores it for the trainer.
    ("vllm.v1.worker.cpu_worker", "CPU backend doesn't allow to use `torch.set_num_threads`"),
    # A refit reloads weights only; RoPE's cos/sin table is a buffer computed at start-up.
    ("vllm.model_executor.model_loader.reload.layerwise",
     "RotaryEmbedding: Failed to load weights"),
)


class _DropKnownRecords(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_known_third_party_noise() -> None:
    for category, prefix in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(prefix), category=category)
    inherited = [os.environ["PYTHONWARNINGS"]] if os.environ.get("PYTHONWARNINGS") else []
    entries = [f"ignore:{prefix}:{category.__name__}" for category, prefix in KNOWN_WARNINGS]
    os.environ["PYTHONWARNINGS"] = ",".join(inherited + [e for e in entries if e not in
                                                         ",".join(inherited)])
    for name, prefix in KNOWN_LOG_RECORDS:
        logging.getLogger(name).addFilter(_DropKnownRecords(prefix))
