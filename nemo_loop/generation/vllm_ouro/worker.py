"""What ``VLLMEngine`` asks of every vLLM worker, as vLLM's ``worker_extension_cls``.

vLLM mixes this class into its worker, so ``LLM.collective_rpc("nemo_loop_…", args=…)`` runs
these methods on every worker (one per tensor-parallel rank, in-process or not):

* ``nemo_loop_set_num_loops``: the loop budget R̃ of the following requests;
* ``nemo_loop_set_exit``: their adaptive exit policy (``generation.exit``; readout selection);
* ``nemo_loop_load_weights``: HF-named tensors → the live model through its weight loaders
  (each TP rank keeps its shard); ``…_from_bytes`` does the same from raw bytes (an engine in
  another process on CPU) and ``…_from_ipc`` from CUDA IPC handles (GPU, colocated trainer in
  another process, the NeMo-RL pattern);
* ``nemo_loop_install_sampler``: a sampler that returns, for every sampled token, both log-probs
  the ``GenerationEngine`` contract promises (see :class:`TwoLogprobSampler`).
"""

from __future__ import annotations

import torch
from vllm.v1.sample.sampler import Sampler

# Key of the sampling-distribution log-prob in a token's vLLM logprob dict: no vocabulary id.
SAMPLING_LOGPROB_KEY = -1
# Key whose "log-prob" is the loop the token was read out from (adaptive exit, logprobs=2).
EXIT_LOOP_KEY = -2


class TwoLogprobSampler(Sampler):
    """vLLM's sampler, reporting two log-probs per sampled token instead of one.

    vLLM returns either the raw log-probs (model logits, temperature 1, full vocabulary) or the
    processed ones (temperature, top-k and top-p applied), per engine. The engine needs both:
    the raw one is the on-policy distillation/RL quantity, the processed one the behaviour
    policy of importance ratios. Requests ask for ``logprobs=1``: column 0 keeps the sampled
    token with its raw log-prob, column 1 (the top-1 slot) is replaced by
    ``SAMPLING_LOGPROB_KEY`` with the processed log-prob of the sampled token. With an adaptive
    exit policy requests ask for ``logprobs=2`` and column 2 carries ``EXIT_LOOP_KEY`` with the
    row's exit loop (``exit_loops()``: the model's, from the forward that made these logits).
    """

    def __init__(self, use_fp64_gumbel: bool = False, exit_loops=None):
        super().__init__(logprobs_mode="processed_logprobs", use_fp64_gumbel=use_fp64_gumbel)
        self.exit_loops = exit_loops or (lambda: None)

    def forward(self, logits: torch.Tensor, sampling_metadata, predict_bonus_token: bool = False,
                logprobs_mode_override=None):
        wants_logprobs = sampling_metadata.max_num_logprobs is not None
        # Before sampling: vLLM divides the logits by the temperature in place.
        raw = self.compute_logprobs(logits) if wants_logprobs else None
        output = super().forward(logits, sampling_metadata, predict_bonus_token,
                                 logprobs_mode_override)
        tensors = output.logprobs_tensors
        if raw is None or tensors is None or tensors.logprobs.shape[1] < 2:
            return output
        sampled = output.sampled_token_ids[:, 0].long()
        ids = tensors.logprob_token_ids.clone()
        logprobs = tensors.logprobs.clone()
        logprobs[:, 1] = logprobs[:, 0]  # processed log-prob of the sampled token
        ids[:, 1] = SAMPLING_LOGPROB_KEY
        logprobs[:, 0] = raw.gather(1, sampled[:, None])[:, 0]
        exit_loops = self.exit_loops()
        if exit_loops is not None and ids.shape[1] >= 3:
            ids[:, 2] = EXIT_LOOP_KEY
            logprobs[:, 2] = exit_loops.to(logprobs)
        output.logprobs_tensors = tensors._replace(logprob_token_ids=ids, logprobs=logprobs)
        return output


class LoopWorkerExtension:
    """Methods added to vLLM's worker (``self`` is the worker; ``self.model_runner`` its runner)."""

    def _nemo_loop_model(self):
        return self.model_runner.get_model()

    def nemo_loop_set_num_loops(self, num_loops: int) -> int:
        self._nemo_loop_model().set_num_loops(num_loops)
        return num_loops

    def nemo_loop_set_exit(self, exit_fields: dict) -> str:
        from nemo_loop.generation.exit import ExitConfig

        exit_config = ExitConfig(**exit_fields)
        exit_config.validate()
        self._nemo_loop_model().set_exit(exit_config)
        return exit_config.policy

    def nemo_loop_install_sampler(self) -> str:
        runner = self.model_runner
        if not isinstance(getattr(runner, "sampler", None), Sampler):
            raise RuntimeError(
                f"{type(runner).__name__} has no vLLM v1 Sampler to extend (vLLM's model "
                "runner changed); sampling log-probs cannot be reported")
        model = self._nemo_loop_model()
        runner.sampler = TwoLogprobSampler(use_fp64_gumbel=runner.sampler.use_fp64_gumbel,
                                           exit_loops=lambda: model.model.exit_loops)
        return type(runner.sampler).__name__

    def nemo_loop_load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        """HF-named full tensors → this worker's model (its TP shard); returns tensors loaded.

        Through vLLM's in-place reload, not ``model.load_weights`` alone: after loading, vLLM
        post-processes weights per platform (on CPU it repacks every linear weight for oneDNN
        and frees the original), and the reload restores, loads and re-processes them."""
        self.reload_weights(weights_iterator=iter(named_tensors), is_checkpoint_format=True)
        return len(named_tensors)

    def nemo_loop_load_weights_from_bytes(
            self, packed: list[tuple[str, str, list[int], bytes]]) -> int:
        """Same, from (name, dtype, shape, raw bytes): an engine in another process."""
        named = [(name, torch.frombuffer(bytearray(data), dtype=torch.uint8)
                  .view(getattr(torch, dtype)).reshape(shape))
                 for name, dtype, shape, data in packed]
        return self.nemo_loop_load_weights(named)

    def nemo_loop_load_weights_from_ipc(self, handles_by_device: dict[str, dict]) -> int:
        """GPU only: tensors shared by the trainer through CUDA IPC (``reduce_tensor``), keyed
        by the GPU's UUID so that each worker opens the handles of its own device."""
        device_uuid = str(torch.cuda.get_device_properties(self.device).uuid)
        if device_uuid not in handles_by_device:
            raise KeyError(f"no IPC handles for this worker's GPU {device_uuid}")
        named = []
        for name, (rebuild, args) in handles_by_device[device_uuid].items():
            args = list(args)
            args[6] = self.device.index  # the device ordinal as this process sees it
            named.append((name, rebuild(*args)))
        self.reload_weights(weights_iterator=iter(named), is_checkpoint_format=True)
        torch.cuda.synchronize(self.device)
        return len(named)
