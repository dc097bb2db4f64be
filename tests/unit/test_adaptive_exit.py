"""Adaptive loop exit in the native engine (one CPU process): static parity, the exact reference
under kv_fill=compute, every skipped slot written under copy/propagate, compaction, errors."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_loop.generation import NativeLoopEngine, SamplingParams, kv_cache, native
from nemo_loop.generation.exit import ExitConfig, top2_probability_gap, vocab_parallel_argmax
from nemo_loop.models.looplm.config import LoopModelConfig

TINY = LoopModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                       num_query_groups=2, vocab_size=256, max_sequence_length=64, num_loops=4,
                       init_std=0.1)
NEW_TOKENS = 8
# Thresholds at which this random model's rows exit at a mix of loops (1..4).
MIXED = {"q_exit": 0.6, "confidence": 0.01, "hidden_delta": 0.6, "oracle": None}


@pytest.fixture(scope="module")
def model(megatron_single_process):
    from nemo_loop.models.looplm.model import build_loop_model

    torch.manual_seed(0)
    return build_loop_model(TINY.transformer_config()).eval()


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(1, TINY.vocab_size, (n,), generator=gen).tolist() for n in (5, 11, 2)]


@pytest.fixture
def poisoned(monkeypatch):
    """New KV buffers start as NaN and every read of a cached prefix is checked."""
    monkeypatch.setattr(kv_cache, "POISON_NEW_BUFFERS", True)


def _params(exit=None, temperature=0.0, max_new_tokens=NEW_TOKENS, seed=None):
    return SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                          top_k=20 if temperature else 0, exit=exit or ExitConfig())


# ----- the policies that never exit early reproduce static generation -----

@pytest.mark.parametrize("policy,threshold,kv_fill", [
    ("q_exit", 1.0, "compute"), ("q_exit", 1.0, "copy"), ("q_exit", 1.0, "propagate"),
    ("confidence", math.inf, "compute"), ("confidence", math.inf, "propagate"),
    ("hidden_delta", 0.0, "copy")])
def test_never_exiting_policies_reproduce_static_generation(model, prompts, poisoned, policy,
                                                            threshold, kv_fill):
    engine = NativeLoopEngine(model)
    for temperature, seed in ((0.0, None), (0.9, 5)):
        static = engine.generate(prompts, 4, _params(temperature=temperature, seed=seed))
        adaptive = engine.generate(prompts, 4, _params(
            ExitConfig(policy, threshold, kv_fill=kv_fill), temperature, seed=seed))
        for one, two in zip(static, adaptive):
            assert two.token_ids == one.token_ids
            assert two.exit_loops == [4] * NEW_TOKENS
            torch.testing.assert_close(torch.tensor(two.logprobs), torch.tensor(one.logprobs),
                                       atol=1e-5, rtol=0)


# ----- kv_fill=compute is exactly "run every loop, read out the exit loop" -----

def _reference_exit(config: ExitConfig, logits, readouts, gates, num_loops: int) -> int:
    """The exit loop from every loop's last-position logits [R̃, V], readouts [R̃, h] and gate
    logits [R̃], written from the definitions (probability space, full softmax)."""
    for loop in range(config.min_loops, num_loops):
        r = loop - 1
        if config.policy == "q_exit":
            cdf = 1 - torch.prod(1 - torch.sigmoid(gates[:loop].double()))
            if cdf >= config.threshold:
                return loop
        elif config.policy == "confidence":
            top = torch.softmax(logits[r].double(), -1).topk(2).values
            if top[0] - top[1] >= config.threshold:
                return loop
        elif config.policy == "hidden_delta":
            if loop >= 2 and (readouts[r] - readouts[r - 1]).norm() / readouts[r].norm() \
                    < config.threshold:
                return loop
        elif config.policy == "oracle":
            if logits[r].argmax() == logits[-1].argmax():
                return loop
    return num_loops


def _reference_generation(model, prompt, config: ExitConfig, num_loops: int):
    """Greedy tokens, exit loops and log-probs from full no-cache forwards through all loops."""
    ids, tokens, loops, logprobs = list(prompt), [], [], []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            out = model(torch.tensor([ids]), num_loops=num_loops)
            loop = _reference_exit(config, out.logits[:, -1, 0], out.readouts[:, -1, 0],
                                   out.exit_logits[:, -1, 0], num_loops)
            distribution = torch.log_softmax(out.logits[loop - 1, -1, 0].float(), -1)
            token = int(distribution.argmax())
            ids.append(token)
            tokens.append(token)
            loops.append(loop)
            logprobs.append(float(distribution[token]))
    return tokens, loops, logprobs


@pytest.mark.parametrize("policy,min_loops", [(policy, 1) for policy in MIXED]
                         + [("q_exit", 2), ("oracle", 2)])
def test_compute_fill_equals_all_loops_with_exit_readout(model, prompts, poisoned, policy,
                                                         min_loops):
    config = ExitConfig(policy, MIXED[policy], min_loops=min_loops, kv_fill="compute")
    results = NativeLoopEngine(model).generate(prompts, 4, _params(config))
    seen_loops = set()
    for prompt, result in zip(prompts, results):
        tokens, loops, logprobs = _reference_generation(model, prompt, config, 4)
        assert result.token_ids == tokens
        assert result.exit_loops == loops
        torch.testing.assert_close(torch.tensor(result.logprobs), torch.tensor(logprobs),
                                   atol=1e-4, rtol=0)
        seen_loops |= set(loops)
    assert min(seen_loops) >= min_loops
    if min_loops == 1:
        assert len(seen_loops) >= 2, f"{policy}: every token exits at {seen_loops}"


def test_compute_fill_without_kv_cache_equals_cached(model, prompts):
    config = ExitConfig("confidence", MIXED["confidence"])
    cached = NativeLoopEngine(model).generate(prompts, 4, _params(config))
    recomputed = NativeLoopEngine(model, use_kv_cache=False).generate(prompts, 4,
                                                                      _params(config))
    assert [r.token_ids for r in cached] == [r.token_ids for r in recomputed]
    assert [r.exit_loops for r in cached] == [r.exit_loops for r in recomputed]


# ----- copy / propagate: every skipped slot written, with the right keys/values -----

class _RecordingCache(kv_cache.RopeOnceKVCache):
    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _RecordingCache.made.append(self)


@pytest.fixture
def recorded_caches(monkeypatch):
    _RecordingCache.made = []
    monkeypatch.setitem(native.KV_CACHES, "rope_once", _RecordingCache)
    return _RecordingCache.made


@pytest.mark.parametrize("kv_fill", ["copy", "propagate"])
@pytest.mark.parametrize("policy", list(MIXED))
def test_copy_and_propagate_write_every_skipped_slot(model, prompts, poisoned, recorded_caches,
                                                     policy, kv_fill):
    config = ExitConfig(policy, MIXED[policy], kv_fill=kv_fill)
    results = NativeLoopEngine(model).generate(prompts, 4, _params(config))
    assert any(loop < 4 for r in results for loop in r.exit_loops[1:])  # decode steps exited
    # No stop tokens: every row ran to the end, so every slot of every (loop, layer) buffer was
    # fed and must hold a written value (NaN = left as allocated).
    (cache,) = recorded_caches
    assert cache.num_entries == 4 * TINY.num_layers
    for (loop, layer), (keys, values) in cache.buffers.items():
        assert not keys.isnan().any() and not values.isnan().any(), (loop, layer)


def test_a_skipped_fill_is_caught(model, prompts, poisoned, monkeypatch):
    """The NaN check can fail: without the fill, the next token reads an unwritten slot."""
    from nemo_loop.generation import adaptive

    monkeypatch.setattr(adaptive._Run, "fill_skipped", lambda self, *args: None)
    with pytest.raises(RuntimeError, match="unwritten slots"):
        NativeLoopEngine(model).generate(prompts, 4, _params(
            ExitConfig("q_exit", MIXED["q_exit"], kv_fill="copy")))


@pytest.mark.parametrize("kv_fill", ["copy", "propagate"])
def test_filled_slots_hold_the_exit_loops_keys_and_values(model, prompts, recorded_caches,
                                                          kv_fill):
    """After one decode step (slot ``s``): a row that exited after loop e has, in every deeper
    loop, its loop-e keys/values (copy) or, in loop e+1's first layer, exactly the keys/values
    that running loop e+1 writes there (propagate: that layer's input *is* the exit readout) —
    compared with the same step under kv_fill=compute."""
    config = ExitConfig("q_exit", MIXED["q_exit"], kv_fill=kv_fill)
    two_tokens = _params(config, max_new_tokens=2)
    filled = NativeLoopEngine(model).generate(prompts, 4, two_tokens)
    exact = NativeLoopEngine(model).generate(prompts, 4, _params(
        ExitConfig("q_exit", MIXED["q_exit"]), max_new_tokens=2))
    assert [r.exit_loops for r in filled] == [r.exit_loops for r in exact]
    fill_cache, exact_cache = recorded_caches
    slot = max(len(p) for p in prompts)  # the decode step's slot
    checked = 0
    for row, result in enumerate(filled):
        exit_loop = result.exit_loops[1]
        for deeper in range(exit_loop, 4):  # 0-based ids of the skipped loops
            for layer in range(TINY.num_layers):
                keys, values = fill_cache.buffers[(deeper, layer)]
                if kv_fill == "copy":
                    source = fill_cache.buffers[(exit_loop - 1, layer)]
                elif deeper == exit_loop and layer == 0:
                    source = exact_cache.buffers[(deeper, layer)]
                else:
                    continue
                torch.testing.assert_close(keys[slot, row], source[0][slot, row])
                torch.testing.assert_close(values[slot, row], source[1][slot, row])
                checked += 1
    assert checked > 0


def test_compaction_runs_later_loops_on_fewer_rows(model, prompts, monkeypatch):
    """copy/propagate drop exited rows from the following loops (real compute saved)."""
    rows_per_call = []
    run_loop = type(model).run_loop

    def recording(self, hidden, loop, **kwargs):
        rows_per_call.append((hidden.shape[0], hidden.shape[1]))
        return run_loop(self, hidden, loop, **kwargs)

    monkeypatch.setattr(type(model), "run_loop", recording)
    config = ExitConfig("q_exit", MIXED["q_exit"], kv_fill="propagate")
    results = NativeLoopEngine(model).generate(prompts, 4, _params(config))
    decode_rows = [rows for positions, rows in rows_per_call if positions == 1]
    loops_run = sum(loop for r in results for loop in r.exit_loops[1:])
    assert sum(decode_rows) == loops_run < 4 * len(prompts) * (NEW_TOKENS - 1)


# ----- vocab-parallel statistics (TP=1 here; TP=2 in tests/distributed) -----

def test_top2_gap_and_argmax_match_the_full_softmax():
    logits = torch.randn(5, 300)
    logits[2, 7] = logits[2, 9] = logits[2].max() + 1  # a tie: the first index wins
    probs = torch.softmax(logits, -1).topk(2).values
    torch.testing.assert_close(top2_probability_gap(logits), probs[:, 0] - probs[:, 1])
    assert torch.equal(vocab_parallel_argmax(logits), logits.argmax(-1))


# ----- bad input -----

@pytest.mark.parametrize("fields,match", [
    (dict(policy="sometimes"), "policy must be one of"),
    (dict(policy="q_exit", threshold=1.5), r"q_exit must be in \[0, 1\]"),
    (dict(policy="q_exit"), "needs a numeric threshold"),
    (dict(policy="confidence", threshold=2.0), r"confidence must be in \[0, 1\] or .inf"),
    (dict(policy="hidden_delta", threshold=-0.1), "must be >= 0"),
    (dict(policy="oracle", threshold=0.5), "must be null with policy=oracle"),
    (dict(policy="q_exit", threshold=0.5, kv_fill="guess"), "kv_fill must be one of"),
    (dict(policy="q_exit", threshold=0.5, min_loops=0), "min_loops must be an integer >= 1"),
    (dict(kv_fill="copy"), "only apply to an adaptive policy"),
])
def test_bad_exit_config_is_an_error_naming_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        ExitConfig(**fields).validate()
    with pytest.raises(ValueError, match="generation.exit"):
        SamplingParams(exit=ExitConfig(**fields))


def test_engine_refuses_what_it_cannot_run(model, prompts, monkeypatch):
    copy = _params(ExitConfig("q_exit", 0.5, kv_fill="copy"))
    with pytest.raises(ValueError, match="min_loops=3 exceeds the loop budget"):
        NativeLoopEngine(model).generate(prompts, 2, _params(ExitConfig("q_exit", 0.5,
                                                                        min_loops=3)))
    with pytest.raises(ValueError, match="needs the native engine's rope_once KV cache"):
        NativeLoopEngine(model, kv_cache="megatron_static").generate(prompts, 4, copy)
    with pytest.raises(ValueError, match="no KV cache"):
        NativeLoopEngine(model, use_kv_cache=False).generate(prompts, 4, copy)
    monkeypatch.setattr(model, "exit_gate", None)
    with pytest.raises(ValueError, match="q_exit needs the model's exit gate"):
        NativeLoopEngine(model).generate(prompts, 4, copy)


def test_vllm_backend_refuses_copy_and_propagate():
    from nemo_loop.generation.backend import GenerationConfig

    config = GenerationConfig(backend="vllm", exit=ExitConfig("confidence", 0.9,
                                                              kv_fill="propagate"))
    with pytest.raises(ValueError, match="generation.exit.kv_fill=propagate"):
        config.validate()


def test_training_rollouts_refuse_an_adaptive_policy():
    from nemo_loop.algorithms.llopsd import LLOPSDConfig
    from nemo_loop.config import CONF_DIR, load_config

    with pytest.raises(ValueError, match="adaptive exit is an inference setting"):
        load_config(LLOPSDConfig, CONF_DIR / "llopsd.yaml", [
            "generation.exit.policy=q_exit", "generation.exit.threshold=0.5"])


@pytest.mark.parametrize("policy,threshold", [("q_exit", 0.6), ("confidence", 0.02),
                                              ("hidden_delta", 0.4), ("oracle", None)])
def test_readout_selection_without_compute_savings_follows_the_definitions(policy, threshold):
    """``choose_exit_readouts`` (vLLM's path: every loop already ran, full-vocabulary logits)
    against the reference written from the definitions."""
    from nemo_loop.generation.exit import choose_exit_readouts

    gen = torch.Generator().manual_seed(3)
    readouts = [torch.randn(8, 16, generator=gen)]
    for _ in range(3):  # each loop refines the previous readout, as a trained model's do
        readouts.append(readouts[-1] + 0.7 * torch.randn(8, 16, generator=gen))
    gate = torch.randn(16, generator=gen)
    head = 0.2 * torch.randn(16, 50, generator=gen)
    config = ExitConfig(policy, threshold)
    chosen, exit_loops = choose_exit_readouts(config, readouts, lambda r: r @ gate,
                                              lambda r: r @ head)
    stacked = torch.stack(readouts)  # [R̃, n, h]
    expected = [_reference_exit(config, stacked[:, row] @ head, stacked[:, row],
                                stacked[:, row] @ gate, 4) for row in range(8)]
    assert exit_loops.tolist() == expected
    assert len(set(expected)) >= 2
    for row, loop in enumerate(expected):
        assert torch.equal(chosen[row], readouts[loop - 1][row])
