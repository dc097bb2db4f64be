"""Native LoopLM generation on one CPU process: cache vs full forwards, padding, sampling, refit."""

from __future__ import annotations

import pytest
import torch

from nemo_loop.generation import NativeLoopEngine, SamplingParams
from nemo_loop.generation import native
from nemo_loop.generation.native import filter_top_k_top_p
from nemo_loop.models.looplm.config import LoopModelConfig

# init_std 0.1 gives peakier next-token distributions than 0.02, so greedy runs are not long
# repeats of one token and argmax comparisons are far from ties.
TINY = LoopModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                       num_query_groups=2, vocab_size=256, max_sequence_length=64, num_loops=4,
                       init_std=0.1)
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def model():
    from nemo_loop.utils.distributed import (
        ParallelConfig,
        init_distributed,
        initialize_model_parallel,
    )

    init_distributed()
    initialize_model_parallel(ParallelConfig(), seed=1234)
    return _build(seed=0)


def _build(seed: int, config: LoopModelConfig = TINY):
    from nemo_loop.models.looplm.model import build_loop_model

    torch.manual_seed(seed)
    return build_loop_model(config.transformer_config())


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(1, TINY.vocab_size, (n,), generator=gen).tolist() for n in (5, 11, 2)]


def _greedy(max_new_tokens=NEW_TOKENS, stop=()):
    return SamplingParams(temperature=0, max_new_tokens=max_new_tokens, stop_token_ids=stop)


def _reference_greedy(model, prompt, num_loops, max_new_tokens):
    """argmax of the final loop over a full no-cache forward of the whole sequence, per step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids]), num_loops=num_loops,
                           logit_loops=[num_loops]).logits[0, -1, 0]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def _reference_logprobs(model, prompt, generated, num_loops):
    """Final-loop log-softmax (T=1) of each generated token under a plain full forward."""
    ids = torch.tensor([list(prompt) + list(generated)])
    with torch.no_grad():
        logits = model(ids, num_loops=num_loops, logit_loops=[num_loops]).logits[0, :, 0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)[len(prompt) - 1:-1]
    return logprobs.gather(1, torch.tensor(generated)[:, None])[:, 0]


@pytest.mark.parametrize("kv_cache", ["rope_once", "megatron_static"])
@pytest.mark.parametrize("num_loops", [1, 2, 3, 4])
def test_greedy_matches_full_forward_argmax_with_ragged_prompts(model, prompts, num_loops,
                                                                kv_cache):
    results = NativeLoopEngine(model, kv_cache=kv_cache).generate(prompts, num_loops, _greedy())
    for prompt, result in zip(prompts, results):
        assert result.token_ids == _reference_greedy(model, prompt, num_loops, NEW_TOKENS)
        assert result.finish_reason == "length" and result.length == NEW_TOKENS
        assert result.num_loops == num_loops
        expected = _reference_logprobs(model, prompt, result.token_ids, num_loops)
        torch.testing.assert_close(torch.tensor(result.logprobs), expected, atol=1e-5, rtol=0)
        assert result.sampling_logprobs == [0.0] * NEW_TOKENS


@pytest.mark.parametrize("kv_cache", ["rope_once", "megatron_static"])
def test_padded_prompt_equals_prompt_alone(model, prompts, kv_cache):
    engine = NativeLoopEngine(model, kv_cache=kv_cache)
    together = engine.generate(prompts, 3, _greedy())
    for prompt, in_batch in zip(prompts, together):
        alone = engine.generate([prompt], 3, _greedy())[0]
        assert alone.token_ids == in_batch.token_ids
        torch.testing.assert_close(torch.tensor(alone.logprobs), torch.tensor(in_batch.logprobs),
                                   atol=1e-5, rtol=0)


def test_no_cache_engine_agrees_with_cache(model, prompts):
    sampling = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=NEW_TOKENS, seed=5)
    cached = NativeLoopEngine(model).generate(prompts, 2, sampling)
    recomputed = NativeLoopEngine(model, use_kv_cache=False).generate(prompts, 2, sampling)
    assert [r.token_ids for r in cached] == [r.token_ids for r in recomputed]


@pytest.mark.parametrize("kv_cache", ["rope_once", "megatron_static"])
def test_kv_cache_allocated_for_loops_run_only(model, prompts, monkeypatch, kv_cache):
    caches = []
    implementation = native.KV_CACHES[kv_cache]

    class SpyCache(implementation):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            caches.append(self)

    monkeypatch.setitem(native.KV_CACHES, kv_cache, SpyCache)
    engine = NativeLoopEngine(model, kv_cache=kv_cache)
    engine.generate(prompts, 2, _greedy(max_new_tokens=3))
    assert len(caches) == 1
    assert caches[0].num_entries == 2 * TINY.num_layers  # (loop, layer) pairs, not R × L
    hooks = [layer.self_attention.core_attention._forward_pre_hooks
             for layer in model.decoder.layers]
    assert not any(hooks), "cache hooks must be removed after generate"


def test_num_loops_can_change_between_calls_and_is_validated(model, prompts):
    engine = NativeLoopEngine(model)
    first = engine.generate(prompts, 4, _greedy())
    engine.generate(prompts, 1, _greedy())
    assert engine.generate(prompts, 4, _greedy())[0].token_ids == first[0].token_ids
    for bad in (0, TINY.num_loops + 1, 2.0):
        with pytest.raises(ValueError, match="num_loops"):
            engine.generate(prompts, bad, _greedy())


def test_sampling_is_reproducible_per_seed(model, prompts):
    engine = NativeLoopEngine(model)

    def run(seed):
        params = SamplingParams(temperature=1.0, top_k=40, top_p=0.9, max_new_tokens=12,
                                seed=seed)
        return [r.token_ids for r in engine.generate(prompts, 3, params)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_sampling_logprobs(model, prompts):
    engine = NativeLoopEngine(model)
    top1 = engine.generate(prompts, 2, SamplingParams(temperature=1.0, top_k=1,
                                                      max_new_tokens=NEW_TOKENS, seed=1))
    greedy = engine.generate(prompts, 2, _greedy())
    assert [r.token_ids for r in top1] == [r.token_ids for r in greedy]
    assert all(lp == 0.0 for r in top1 for lp in r.sampling_logprobs)
    # At temperature 1 without filters the sampling distribution is the model's.
    plain = engine.generate(prompts, 2, SamplingParams(temperature=1.0, max_new_tokens=4, seed=2))
    for result in plain:
        torch.testing.assert_close(torch.tensor(result.sampling_logprobs),
                                   torch.tensor(result.logprobs), atol=1e-5, rtol=0)


def test_filter_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert kept(filter_top_k_top_p(logits, 2, 1.0)) == [True, True, False, False]
    assert kept(filter_top_k_top_p(logits, 0, 0.5)) == [True, False, False, False]
    assert kept(filter_top_k_top_p(logits, 0, 0.8)) == [True, True, False, False]
    assert kept(filter_top_k_top_p(logits, 0, 0.81)) == [True, True, True, False]
    assert kept(filter_top_k_top_p(logits, 3, 0.99)) == [True, True, True, False]


@pytest.mark.parametrize("kv_cache", ["rope_once", "megatron_static"])
def test_stop_tokens_end_rows_and_others_continue(model, prompts, kv_cache):
    engine = NativeLoopEngine(model, kv_cache=kv_cache)
    unstopped = engine.generate(prompts, 1, _greedy())
    # A token that first appears mid-way through some row, so that row stops early while rows
    # that never produce it keep going on the compacted batch.
    candidates = [token for result in unstopped for index, token in enumerate(result.token_ids)
                  if 0 < index < NEW_TOKENS - 1 and token not in result.token_ids[:index]]
    stop = candidates[0]
    stopped = engine.generate(prompts, 1, _greedy(stop=[stop]))
    assert any(r.finish_reason == "stop" and r.length < NEW_TOKENS for r in stopped)
    assert any(r.finish_reason == "length" for r in stopped), "no row outlived the stop"
    for full, result in zip(unstopped, stopped):
        if stop in full.token_ids:
            cut = full.token_ids.index(stop) + 1
            assert result.token_ids == full.token_ids[:cut] and result.finish_reason == "stop"
            expected_logprobs = full.logprobs[:cut]
        else:
            assert result.token_ids == full.token_ids and result.finish_reason == "length"
            expected_logprobs = full.logprobs
        torch.testing.assert_close(torch.tensor(result.logprobs),
                                   torch.tensor(expected_logprobs), atol=1e-5, rtol=0)


def test_length_limits(model, prompts):
    engine = NativeLoopEngine(model)
    assert [r.length for r in engine.generate(prompts, 1, _greedy(max_new_tokens=3))] == [3] * 3
    near_limit = prompts[0] * 20
    near_limit = near_limit[:TINY.max_sequence_length - 2]
    results = engine.generate([near_limit, prompts[1]], 1, _greedy(max_new_tokens=5))
    assert results[0].length == 2 and results[0].finish_reason == "length"
    assert results[1].token_ids == engine.generate([prompts[1]], 1, _greedy(5))[0].token_ids


def test_max_batch_size_splits_without_changing_greedy_output(model, prompts):
    whole = NativeLoopEngine(model).generate(prompts, 2, _greedy())
    split = NativeLoopEngine(model, max_batch_size=2).generate(prompts, 2, _greedy())
    assert [r.token_ids for r in whole] == [r.token_ids for r in split]


def test_bad_inputs_raise_clear_errors(model, prompts):
    engine = NativeLoopEngine(model)
    with pytest.raises(ValueError, match="non-empty list"):
        engine.generate([], 1, _greedy())
    with pytest.raises(ValueError, match="prompt 1 must be a non-empty"):
        engine.generate([[1], []], 1, _greedy())
    with pytest.raises(ValueError, match="no room"):
        engine.generate([[1] * TINY.max_sequence_length], 1, _greedy())
    with pytest.raises(ValueError, match="outside"):
        engine.generate([[1, TINY.vocab_size]], 1, _greedy())
    with pytest.raises(TypeError, match="SamplingParams"):
        engine.generate(prompts, 1, {"temperature": 0})
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                dict(max_new_tokens=0), dict(stop_token_ids=[-1]), dict(seed="x")):
        with pytest.raises(ValueError, match="invalid SamplingParams"):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="unknown kv_cache"):
        NativeLoopEngine(model, kv_cache="paged")
    with pytest.raises(TypeError, match="LoopGPTModel"):
        NativeLoopEngine(torch.nn.Linear(2, 2))


def _perturb(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("owns_weights", [False, True], ids=["rebind", "copy"])
def test_refit_makes_engine_logprobs_match_trainer(model, prompts, owns_weights):
    trainer = _build(seed=3)
    engine = NativeLoopEngine(_build(seed=4), owns_weights=owns_weights)
    trainer.train()
    _perturb(trainer, seed=5)  # a "training step"
    report = engine.refit(trainer)
    assert report.mode == ("copy" if owns_weights else "rebind")
    assert (engine.model is trainer) == (not owns_weights)
    if owns_weights:
        assert report.bytes_copied == sum(p.numel() * 4 for p in trainer.parameters())
    sampling = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=NEW_TOKENS, seed=9)
    results = engine.generate(prompts, 3, sampling)
    assert trainer.training, "generation must restore the trainer's training mode"
    for prompt, result in zip(prompts, results):
        expected = _reference_logprobs(trainer, prompt, result.token_ids, 3)
        torch.testing.assert_close(torch.tensor(result.logprobs), expected, atol=1e-5, rtol=0)


def test_refit_from_state_dict_rejects_mismatches(model):
    engine = NativeLoopEngine(_build(seed=4), owns_weights=True)
    state = {name: p.detach().clone() for name, p in model.named_parameters()}
    engine.refit(state)
    assert all(torch.equal(p, state[n]) for n, p in engine.model.named_parameters())
    with pytest.raises(KeyError, match="lacks"):
        engine.refit({})
    name = next(iter(state))
    with pytest.raises(ValueError, match="shape mismatch"):
        engine.refit({**state, name: torch.zeros(1)})


def test_unseeded_sampling_leaves_torch_rng_alone(model, prompts):
    state = torch.get_rng_state()
    NativeLoopEngine(model).generate(prompts, 1, SamplingParams(max_new_tokens=2))
    assert torch.equal(state, torch.get_rng_state())
