"""VLLMEngine against the native engine and plain forwards, fp32, one vLLM engine per module.

The model has head_dim 32 (vLLM's CPU attention has no kernel for the tiny configs' 16) and
prompts longer than a 32-token KV block, so vLLM's prefix cache really reuses blocks across
calls: a missing prefix-cache reset (after a refit, or before a call with more loops) shows up
as wrong tokens here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from nemo_loop.generation import NativeLoopEngine, SamplingParams
from nemo_loop.generation.native import filter_top_k_top_p
from nemo_loop.models.looplm.config import LoopModelConfig

pytestmark = pytest.mark.vllm

CONFIG = LoopModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=176,
                         num_attention_heads=2, num_query_groups=1, vocab_size=256,
                         max_sequence_length=160, num_loops=4, init_std=0.1)
NEW_TOKENS = 8
TOLERANCE = 1e-4  # max |Δ log-prob| (observed ≈ 2e-6 in fp32)


def _build(seed: int, config: LoopModelConfig = CONFIG):
    from nemo_loop.models.looplm.model import build_loop_model

    torch.manual_seed(seed)
    return build_loop_model(config.transformer_config()).eval()


def _vllm_config():
    from nemo_loop.generation.vllm_engine import VLLMConfig

    return VLLMConfig(kv_cache_memory_gb=0.05, block_size=32)


@pytest.fixture(scope="module")
def model(megatron_single_process):
    return _build(seed=0)


@pytest.fixture(scope="module")
def engine(model):
    from nemo_loop.generation.vllm_engine import VLLMEngine

    engine = VLLMEngine.from_model(model, _vllm_config())
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(11)
    shared = torch.randint(1, CONFIG.vocab_size, (40,), generator=gen).tolist()
    ragged = [torch.randint(1, CONFIG.vocab_size, (n,), generator=gen).tolist()
              for n in (5, 11, 2, 70)]
    return ragged + [shared + [7, 8], shared + [9]]  # two prompts sharing a 32-token block


def _greedy(max_new_tokens=NEW_TOKENS, stop=()):
    return SamplingParams(temperature=0, max_new_tokens=max_new_tokens, stop_token_ids=stop)


def _final_loop_logits(model, prompt, generated, num_loops) -> torch.Tensor:
    """Full no-cache forward: final-loop logits predicting each generated token [n, V]."""
    ids = torch.tensor([list(prompt) + list(generated)])
    with torch.no_grad():
        logits = model(ids, num_loops=num_loops, logit_loops=[num_loops]).logits[0, :, 0]
    return logits.float()[len(prompt) - 1:-1]


def _max_logprob_gap(model, prompts, results, num_loops) -> float:
    gap = 0.0
    for prompt, result in zip(prompts, results):
        logits = _final_loop_logits(model, prompt, result.token_ids, num_loops)
        expected = torch.log_softmax(logits, -1).gather(
            1, torch.tensor(result.token_ids)[:, None])[:, 0]
        gap = max(gap, (torch.tensor(result.logprobs) - expected).abs().max().item())
    return gap


def test_greedy_tokens_and_logprobs_equal_native_at_every_loop_budget(model, engine, prompts):
    native = NativeLoopEngine(model)
    for num_loops in (1, 2, 3, 4):  # increasing: each call needs loops the cache lacks
        expected = native.generate(prompts, num_loops, _greedy())
        got = engine.generate(prompts, num_loops, _greedy())
        assert [r.token_ids for r in got] == [r.token_ids for r in expected], num_loops
        assert all(r.finish_reason == "length" and r.num_loops == num_loops for r in got)
        assert all(r.sampling_logprobs == [0.0] * NEW_TOKENS for r in got)
        assert _max_logprob_gap(model, prompts, got, num_loops) <= TOLERANCE


def test_fewer_loops_after_more_reuse_the_cache_correctly(model, engine, prompts):
    native = NativeLoopEngine(model)
    for num_loops in (4, 1, 3):
        expected = native.generate(prompts, num_loops, _greedy())
        got = engine.generate(prompts, num_loops, _greedy())
        assert [r.token_ids for r in got] == [r.token_ids for r in expected], num_loops


@pytest.mark.parametrize("num_loops", [2, 4])
def test_prompt_logprobs_equal_the_trainer_forward(model, engine, prompts, num_loops):
    scored = engine.prompt_logprobs(prompts, num_loops)
    for prompt, logprobs in zip(prompts, scored):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            logits = model(ids, num_loops=num_loops, logit_loops=[num_loops]).logits[0, :-1, 0]
        expected = torch.log_softmax(logits.float(), -1).gather(1, ids[0, 1:, None])[:, 0]
        assert len(logprobs) == len(prompt) - 1
        torch.testing.assert_close(torch.tensor(logprobs), expected, atol=TOLERANCE, rtol=0)


def test_stop_tokens_and_length_limits_match_native(model, engine, prompts):
    native = NativeLoopEngine(model)
    free = native.generate(prompts, 2, _greedy())
    stop = (free[0].token_ids[2], free[3].token_ids[5])  # row 0 stops at 3 tokens, row 3 ≤ 6
    near_limit = prompts[:2] + [list(range(1, CONFIG.max_sequence_length - 2))]  # room: 3
    for batch in (prompts, near_limit):
        expected = native.generate(batch, 2, _greedy(stop=stop))
        got = engine.generate(batch, 2, _greedy(stop=stop))
        assert [(r.token_ids, r.finish_reason) for r in got] == \
            [(r.token_ids, r.finish_reason) for r in expected]
    assert got[2].length == 3 and got[2].finish_reason in ("length", "stop")
    stopped = engine.generate(prompts[:1], 2, _greedy(stop=stop))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids[-1] in stop


def test_sampling_logprobs_are_those_of_the_filtered_tempered_distribution(model, engine,
                                                                           prompts):
    sampling = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=NEW_TOKENS,
                              seed=5)
    results = engine.generate(prompts, 3, sampling)
    for prompt, result in zip(prompts, results):
        logits = _final_loop_logits(model, prompt, result.token_ids, 3)
        tokens = torch.tensor(result.token_ids)[:, None]
        behaviour = torch.log_softmax(filter_top_k_top_p(logits / 0.7, 20, 0.9), -1)
        torch.testing.assert_close(torch.tensor(result.sampling_logprobs),
                                   behaviour.gather(1, tokens)[:, 0], atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(torch.tensor(result.logprobs),
                                   torch.log_softmax(logits, -1).gather(1, tokens)[:, 0],
                                   atol=TOLERANCE, rtol=0)
    plain = engine.generate(prompts[:2], 3, SamplingParams(max_new_tokens=4, seed=1))
    for result in plain:  # temperature 1, no filters: both log-probs are the same quantity
        torch.testing.assert_close(torch.tensor(result.sampling_logprobs),
                                   torch.tensor(result.logprobs), atol=1e-6, rtol=0)


def test_seeds_fix_samples_and_every_request_gets_its_own(engine, prompts):
    def sample(seed):
        params = SamplingParams(temperature=1.0, max_new_tokens=NEW_TOKENS, seed=seed)
        return [r.token_ids for r in engine.generate([prompts[1]] * 3, 2, params)]

    first = sample(7)
    assert sample(7) == first
    assert len({tuple(tokens) for tokens in first}) == 3  # same prompt, different samples
    assert sample(8) != first


def test_refit_brings_new_weights_and_drops_stale_prefix_blocks(model, engine, prompts):
    from nemo_loop.generation.vllm_engine import VLLMEngine

    engine.generate(prompts, 4, _greedy())  # fill the prefix cache with the old weights
    perturbed = _build(seed=0)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for param in perturbed.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    report = engine.refit(perturbed)
    assert report.mode == "copy" and report.tensors == 5 + 11 * CONFIG.num_layers  # HF tensors
    expected = NativeLoopEngine(perturbed).generate(prompts, 4, _greedy())
    got = engine.generate(prompts, 4, _greedy())
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert [r.token_ids for r in got] != \
        [r.token_ids for r in NativeLoopEngine(model).generate(prompts, 4, _greedy())]
    assert _max_logprob_gap(perturbed, prompts, got, 4) <= TOLERANCE
    fresh = VLLMEngine.from_model(perturbed, _vllm_config())
    try:
        fresh_results = fresh.generate(prompts, 4, _greedy())
    finally:
        fresh.close()
    assert [r.token_ids for r in fresh_results] == [r.token_ids for r in got]
    for ours, theirs in zip(got, fresh_results):
        torch.testing.assert_close(torch.tensor(ours.logprobs), torch.tensor(theirs.logprobs),
                                   atol=1e-6, rtol=0)
    engine.refit(model)  # back to the module's weights (a full megatron state dict works too)
    assert engine.generate(prompts, 2, _greedy())[0].token_ids == \
        NativeLoopEngine(model).generate(prompts, 2, _greedy())[0].token_ids


def test_bad_requests_and_unsupported_models_name_the_problem(engine, prompts,
                                                               megatron_single_process):
    from nemo_loop.generation.vllm_engine import VLLMEngine

    for loops in (0, 5):
        with pytest.raises(ValueError, match="num_loops"):
            engine.generate(prompts, loops, _greedy())
    with pytest.raises(ValueError, match="outside"):
        engine.generate([[CONFIG.vocab_size]], 1, _greedy())
    narrow_heads = LoopModelConfig(num_layers=1, hidden_size=64, ffn_hidden_size=64,
                                   num_attention_heads=4, vocab_size=64, max_sequence_length=32)
    with pytest.raises(ValueError, match="head_dim=16"):
        VLLMEngine.from_model(_build(0, narrow_heads), _vllm_config())


def test_missing_vllm_names_the_install_step(monkeypatch):
    from nemo_loop.generation.vllm_engine import import_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match="make setup"):
        import_vllm()


def test_exported_ouro_dir_runs_in_a_plain_vllm_process(model, engine, prompts, tmp_path):
    """The entry-point plugin: a fresh Python process that imports vLLM only (not nemo_loop)
    serves the export. (The next test runs an engine core in a process of its own.)"""
    from nemo_loop.models.looplm.hf_ouro import write_ouro_checkpoint
    from nemo_loop.models.looplm.state_dict import gather_full_state_dict
    from nemo_loop.models.looplm.state_dict_adapter import (
        megatron_to_ouro,
        model_config_to_ouro_config,
    )

    hf_config = model_config_to_ouro_config(CONFIG, num_loops=3)  # exported with R̃ = 3
    write_ouro_checkpoint(tmp_path, megatron_to_ouro(gather_full_state_dict(model), CONFIG),
                          hf_config)
    script = (
        "import json, sys, vllm\n"
        f"llm = vllm.LLM(model={str(tmp_path)!r}, skip_tokenizer_init=True, dtype='float32',"
        " enforce_eager=True, kv_cache_memory_bytes=1 << 24, max_model_len=160)\n"
        "params = vllm.SamplingParams(temperature=0, max_tokens=8, detokenize=False)\n"
        f"outputs = llm.generate([{{'prompt_token_ids': p}} for p in {prompts[:3]!r}], params,"
        " use_tqdm=False)\n"
        "print(json.dumps([list(o.outputs[0].token_ids) for o in outputs]))\n")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "ERROR"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    tokens = json.loads(run.stdout.strip().splitlines()[-1])
    assert tokens == [r.token_ids for r in engine.generate(prompts[:3], 3, _greedy())]


def test_engine_in_another_process_generates_and_refits(model, prompts):
    """``in_process=false``: vLLM's engine core in its own process; refits travel as bytes."""
    from nemo_loop.generation.vllm_engine import VLLMConfig, VLLMEngine

    engine = VLLMEngine.from_model(model, VLLMConfig(kv_cache_memory_gb=0.05, in_process=False))
    try:
        other = _build(seed=1)
        for source in (model, other):
            if source is other:
                engine.refit(other)
            expected = NativeLoopEngine(source).generate(prompts, 3, _greedy())
            assert [r.token_ids for r in engine.generate(prompts, 3, _greedy())] == \
                [r.token_ids for r in expected]
    finally:
        engine.close()
    assert torch.distributed.is_initialized()


# ----- adaptive exit: readout selection (kv_fill=compute) equals the native engine's -----

EXIT_THRESHOLDS = {"q_exit": 0.6, "confidence": 0.01, "hidden_delta": 0.6, "oracle": None}


@pytest.mark.parametrize("policy", list(EXIT_THRESHOLDS))
def test_adaptive_exit_tokens_and_exit_loops_equal_native(model, engine, prompts, policy):
    from nemo_loop.generation.exit import ExitConfig

    sampling = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS,
                              exit=ExitConfig(policy, EXIT_THRESHOLDS[policy]))
    expected = NativeLoopEngine(model).generate(prompts, 4, sampling)
    got = engine.generate(prompts, 4, sampling)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert [r.exit_loops for r in got] == [r.exit_loops for r in expected]
    assert len({loop for r in got for loop in r.exit_loops}) >= 2  # exits do vary
    gaps = [abs(a - b) for one, two in zip(got, expected)
            for a, b in zip(one.logprobs, two.logprobs)]
    assert max(gaps) <= TOLERANCE
    static = engine.generate(prompts, 4, _greedy())  # and back to the final loop's readout
    assert [r.exit_loops for r in static] == [[4] * NEW_TOKENS] * len(prompts)
    assert [r.token_ids for r in static] == \
        [r.token_ids for r in NativeLoopEngine(model).generate(prompts, 4, _greedy())]


def test_adaptive_exit_refuses_kv_fills_vllm_cannot_do(engine, prompts):
    from nemo_loop.generation.exit import ExitConfig

    with pytest.raises(ValueError, match="kv_fill=copy is not supported by the vLLM engine"):
        engine.generate(prompts, 4, SamplingParams(exit=ExitConfig("q_exit", 0.5,
                                                                   kv_fill="copy")))
