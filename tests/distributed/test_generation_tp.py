"""Native generation under tensor parallelism (2 CPU ranks): TP=2 equals TP=1, PP is refused."""

from __future__ import annotations

import pytest
import torch
from megatron.core import parallel_state

from nemo_loop.models.looplm.config import LoopModelConfig
from nemo_loop.utils.distributed import ParallelConfig, initialize_model_parallel

pytestmark = [pytest.mark.parity, pytest.mark.slow]

TINY = LoopModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                       num_query_groups=2, vocab_size=256, max_sequence_length=64, num_loops=4,
                       init_std=0.1)
WEIGHT_SEED = 21
NEW_TOKENS = 8


def _build(layout: ParallelConfig, seed: int = WEIGHT_SEED):
    from nemo_loop.models.looplm.model import build_loop_model

    initialize_model_parallel(layout)
    # CPU initialization draws each full master weight and slices it, so TP=1 and TP=2 models
    # built after the same seed hold the same weights (checked below via the logits).
    torch.manual_seed(seed)
    return build_loop_model(TINY.transformer_config(layout.tensor_parallel,
                                                    layout.pipeline_parallel))


def _prompts():
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(1, TINY.vocab_size, (n,), generator=gen).tolist() for n in (6, 3, 9)]


def _full_vocab_logits(model, ids):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    with torch.no_grad():
        logits = model(torch.tensor(ids), num_loops=TINY.num_loops).logits
    return gather_from_tensor_model_parallel_region(logits)


def _run_all(model):
    from nemo_loop.generation import NativeLoopEngine, SamplingParams

    engine = NativeLoopEngine(model)
    runs = {}
    for num_loops in (1, TINY.num_loops):
        greedy = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS)
        sampled = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_new_tokens=NEW_TOKENS,
                                 seed=17, stop_token_ids=[5])
        runs[("greedy", num_loops)] = engine.generate(_prompts(), num_loops, greedy)
        runs[("sampled", num_loops)] = engine.generate(_prompts(), num_loops, sampled)
    return runs


def _same_on_every_rank(tokens):
    mine = torch.tensor(tokens)
    gathered = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, mine)
    return all(torch.equal(g, mine) for g in gathered)


def check_tp2_generation_equals_tp1():
    probe = [_prompts()[0]]
    tp2 = _build(ParallelConfig(tensor_parallel=2))
    assert parallel_state.get_tensor_model_parallel_world_size() == 2
    tp2_logits = _full_vocab_logits(tp2, probe)
    tp2_runs = _run_all(tp2)
    parallel_state.destroy_model_parallel()

    tp1 = _build(ParallelConfig(tensor_parallel=1))
    torch.testing.assert_close(tp2_logits, _full_vocab_logits(tp1, probe), atol=1e-5, rtol=0,
                               msg="TP=1 and TP=2 models built from one seed differ")
    tp1_runs = _run_all(tp1)
    for key, tp1_results in tp1_runs.items():
        for one, two in zip(tp1_results, tp2_runs[key]):
            assert one.token_ids == two.token_ids, (key, one.token_ids, two.token_ids)
            assert one.finish_reason == two.finish_reason, key
            torch.testing.assert_close(torch.tensor(two.logprobs), torch.tensor(one.logprobs),
                                       atol=1e-5, rtol=0)
            assert _same_on_every_rank(two.token_ids), key


def check_tp2_refit_copy_matches_trainer_forward():
    from nemo_loop.generation import NativeLoopEngine, SamplingParams

    trainer = _build(ParallelConfig(tensor_parallel=2))
    engine_model = _build(ParallelConfig(tensor_parallel=2), seed=WEIGHT_SEED + 1)
    engine = NativeLoopEngine(engine_model, owns_weights=True)
    with torch.no_grad():
        for param in trainer.parameters():
            param.mul_(1.1)
    assert engine.refit(trainer).mode == "copy"
    result = engine.generate([_prompts()[2]], 2, SamplingParams(
        temperature=1.0, max_new_tokens=NEW_TOKENS, seed=4))[0]
    ids = [_prompts()[2] + result.token_ids]
    with torch.no_grad():
        logits = trainer(torch.tensor(ids), num_loops=2, logit_loops=[2]).logits
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    logprobs = torch.log_softmax(gather_from_tensor_model_parallel_region(logits)[0, :, 0], -1)
    start = len(_prompts()[2]) - 1
    expected = logprobs[start:start + NEW_TOKENS].gather(
        1, torch.tensor(result.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(result.logprobs), expected, atol=1e-5, rtol=0)


# Thresholds at which this model's tokens exit at a mix of loops.
EXIT_POLICIES = {"q_exit": 0.6, "confidence": 0.01, "hidden_delta": 0.6, "oracle": None}


def _run_adaptive(model):
    from nemo_loop.generation import NativeLoopEngine, SamplingParams
    from nemo_loop.generation.exit import ExitConfig

    engine = NativeLoopEngine(model)
    return {(policy, kv_fill): engine.generate(_prompts(), TINY.num_loops, SamplingParams(
                temperature=0, max_new_tokens=NEW_TOKENS,
                exit=ExitConfig(policy, threshold, kv_fill=kv_fill)))
            for policy, threshold in EXIT_POLICIES.items()
            for kv_fill in ("compute", "copy", "propagate")}


def check_tp2_adaptive_exit_equals_tp1():
    """Every policy × kv_fill: the same tokens, exit loops and log-probs at TP=2 as at TP=1
    (confidence and the oracle read the vocab-parallel logits without gathering them)."""
    tp2_runs = _run_adaptive(_build(ParallelConfig(tensor_parallel=2)))
    parallel_state.destroy_model_parallel()
    tp1_runs = _run_adaptive(_build(ParallelConfig(tensor_parallel=1)))
    early = 0
    for key, tp1_results in tp1_runs.items():
        for one, two in zip(tp1_results, tp2_runs[key]):
            assert one.token_ids == two.token_ids, (key, one.token_ids, two.token_ids)
            assert one.exit_loops == two.exit_loops, (key, one.exit_loops, two.exit_loops)
            torch.testing.assert_close(torch.tensor(two.logprobs), torch.tensor(one.logprobs),
                                       atol=1e-5, rtol=0)
            assert _same_on_every_rank(two.exit_loops), key
            early += sum(loop < TINY.num_loops for loop in one.exit_loops)
    assert early > 0


def check_vocab_parallel_exit_statistics_equal_the_full_vocabulary():
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from nemo_loop.generation.exit import top2_probability_gap, vocab_parallel_argmax

    initialize_model_parallel(ParallelConfig(tensor_parallel=2))
    full = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    full[3, 5] = full[3, 30] = full[3].max() + 1  # a tie across shards: the first index wins
    rank = parallel_state.get_tensor_model_parallel_rank()
    shard = full[:, rank * 20:(rank + 1) * 20].contiguous()
    assert torch.equal(gather_from_tensor_model_parallel_region(shard), full)
    probs = torch.softmax(full, -1).topk(2).values
    torch.testing.assert_close(top2_probability_gap(shard), probs[:, 0] - probs[:, 1])
    assert torch.equal(vocab_parallel_argmax(shard), full.argmax(-1))


def check_pipeline_parallel_is_refused():
    from nemo_loop.generation import NativeLoopEngine

    model = _build(ParallelConfig(pipeline_parallel=2))
    with pytest.raises(NotImplementedError, match="pipeline parallel"):
        NativeLoopEngine(model)


def check_tp2_lm_eval_adapter_equals_tp1():
    """Log-likelihoods (vocab-parallel, never gathered), is_greedy flags and greedy
    generations of the lm-eval adapter: the same under TP=2 as under TP=1."""
    from dataclasses import replace

    from lm_eval.api.instance import Instance

    from nemo_loop.evaluation.lm_eval_adapter import NemoLoopLM
    from nemo_loop.evaluation.lm_eval_config import LMEvalModelArgs
    from nemo_loop.evaluation.lm_eval_model import LoadedModel
    from nemo_loop.tasks.shell_game import ShellGameConfig, ShellGameTask

    prompter = ShellGameTask(ShellGameConfig()).tokenizer()  # 14 words
    words = replace(TINY, vocab_size=16)
    contexts = ["ball 1 | 0-1 1-2 =", "0-2 0-1", "ball 2 | 1-2 0-2 0-1 0-2 1-2 ="]
    requests = {
        "loglikelihood": [Instance("loglikelihood", {}, (c, f" {cup} 0-1"), 0, ("t", 0, 1))
                          for c in contexts for cup in "012"],
        "loglikelihood_rolling": [Instance("loglikelihood_rolling", {}, (" ".join(contexts),),
                                           0, ("t", 0, 1))],
        "generate_until": [Instance("generate_until", {}, (c, {"max_gen_toks": 5}), 0,
                                    ("t", 0, 1)) for c in contexts]}

    def evaluate(layout):
        initialize_model_parallel(layout)
        torch.manual_seed(WEIGHT_SEED)
        model = _build_model_of(words, layout).eval()
        args = LMEvalModelArgs(checkpoint="(in memory)", num_loops=3, batch_size=2,
                               max_length=12, tensor_parallel=layout.tensor_parallel)
        lm = NemoLoopLM(LoadedModel(model, prompter, checkpoint={}), args)
        return {kind: getattr(lm, kind)(batch) for kind, batch in requests.items()}

    tp2 = evaluate(ParallelConfig(tensor_parallel=2))
    parallel_state.destroy_model_parallel()
    tp1 = evaluate(ParallelConfig(tensor_parallel=1))
    torch.testing.assert_close(torch.tensor([p for p, _ in tp2["loglikelihood"]]),
                               torch.tensor([p for p, _ in tp1["loglikelihood"]]),
                               atol=1e-5, rtol=0)
    assert [g for _, g in tp2["loglikelihood"]] == [g for _, g in tp1["loglikelihood"]]
    torch.testing.assert_close(torch.tensor(tp2["loglikelihood_rolling"]),
                               torch.tensor(tp1["loglikelihood_rolling"]), atol=1e-5, rtol=0)
    assert tp2["generate_until"] == tp1["generate_until"]
    assert max(len(text.split()) for text in tp1["generate_until"]) > 1


def _build_model_of(config, layout):
    from nemo_loop.models.looplm.model import build_loop_model

    return build_loop_model(config.transformer_config(layout.tensor_parallel,
                                                      layout.pipeline_parallel))


CHECKS = [name for name in dir() if name.startswith("check_")]


@pytest.fixture(scope="module")
def results():
    from tests.multiproc import run_checks

    return run_checks(__name__, CHECKS, world_size=2, timeout_s=120)


@pytest.mark.parametrize("check", CHECKS)
def test_generation_tp(results, check):
    assert results[check] is None, results[check]
