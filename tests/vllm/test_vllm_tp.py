"""vLLM inside a torchrun-style world (2 CPU ranks, gloo): every rank runs its own in-process
engine on vLLM's ``external_launcher`` executor over the trainer's world. At TP=2 vLLM shards the
model like the trainer and its output equals the native engine's at TP=2 (itself tested equal to
TP=1); at DP=2 each rank's engine serves its own prompts."""

from __future__ import annotations

import pytest
import torch

from nemo_loop.models.looplm.config import LoopModelConfig
from nemo_loop.utils.distributed import ParallelConfig, initialize_model_parallel
from tests.multiproc import run_checks

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

CONFIG = LoopModelConfig(num_layers=2, hidden_size=128, ffn_hidden_size=256,
                         num_attention_heads=4, num_query_groups=2, vocab_size=256,
                         max_sequence_length=96, num_loops=3, init_std=0.1)


def _build(seed: int):
    from nemo_loop.models.looplm.model import build_loop_model

    torch.manual_seed(seed)  # CPU init slices full master weights: same weights at any TP
    return build_loop_model(CONFIG.transformer_config(tensor_parallel=2)).eval()


def check_tp2_engine_equals_native_and_refits():
    from nemo_loop.generation import NativeLoopEngine, SamplingParams
    from nemo_loop.generation.vllm_engine import VLLMConfig, VLLMEngine

    initialize_model_parallel(ParallelConfig(tensor_parallel=2))
    model = _build(seed=0)
    engine = VLLMEngine.from_model(model, VLLMConfig(kv_cache_memory_gb=0.02, block_size=32))
    from vllm.distributed import get_tensor_model_parallel_world_size

    assert get_tensor_model_parallel_world_size() == 2  # vLLM shards like the trainer
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, CONFIG.vocab_size, (n,), generator=gen).tolist()
               for n in (3, 9, 40)]
    greedy = SamplingParams(temperature=0, max_new_tokens=6)
    for source in (model, _build(seed=1)):
        if source is not model:
            engine.refit(source)  # gathers the TP shards, each vLLM rank loads its own
        for num_loops in (1, CONFIG.num_loops):
            expected = NativeLoopEngine(source).generate(prompts, num_loops, greedy)
            got = engine.generate(prompts, num_loops, greedy)
            assert [r.token_ids for r in got] == [r.token_ids for r in expected], num_loops
            gap = max(abs(a - b) for x, y in zip(got, expected)
                      for a, b in zip(x.logprobs, y.logprobs))
            assert gap <= 1e-4, gap
    engine.close()
    assert torch.distributed.is_initialized()  # the trainer's world survives the engine


def check_dp2_engines_serve_their_own_prompts():
    """TP=1 × DP=2: each rank's engine generates its own rank's prompts (as LLOPSD's do)."""
    from nemo_loop.generation import NativeLoopEngine, SamplingParams
    from nemo_loop.generation.vllm_engine import VLLMConfig, VLLMEngine

    from nemo_loop.models.looplm.model import build_loop_model

    initialize_model_parallel(ParallelConfig(tensor_parallel=1))
    torch.manual_seed(0)
    model = build_loop_model(CONFIG.transformer_config()).eval()
    engine = VLLMEngine.from_model(model, VLLMConfig(kv_cache_memory_gb=0.02))
    rank = torch.distributed.get_rank()
    gen = torch.Generator().manual_seed(10 + rank)
    prompts = [torch.randint(1, CONFIG.vocab_size, (n,), generator=gen).tolist()
               for n in (3, 9, 14)[:2 + rank]]  # different counts and lengths per rank
    greedy = SamplingParams(temperature=0, max_new_tokens=5 + rank)
    expected = NativeLoopEngine(model).generate(prompts, 2, greedy)
    assert [r.token_ids for r in engine.generate(prompts, 2, greedy)] == \
        [r.token_ids for r in expected]
    engine.close()


CHECKS = ["check_tp2_engine_equals_native_and_refits", "check_dp2_engines_serve_their_own_prompts"]


def test_vllm_tensor_and_data_parallel_in_the_trainer_world():
    failures = run_checks(__name__, CHECKS, world_size=2, timeout_s=300)
    assert failures == dict.fromkeys(CHECKS), failures
