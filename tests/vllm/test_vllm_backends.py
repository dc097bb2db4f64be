"""``generation.backend: vllm`` in the callers: LLOPSD rollouts and the evaluation harness.

Both run the real Ouro tokenizer's 49,152-token vocabulary with a tiny model whose heads are 32
wide (vLLM's CPU attention has no 16-wide kernel). Greedy decoding makes the two engines'
outputs comparable token for token, so everything downstream must be identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nemo_loop.config import CONF_DIR, load_config

pytestmark = pytest.mark.vllm

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
WIDE_HEADS = ["model.num_attention_heads=2", "model.num_query_groups=1"]
SMALL_VLLM = ["generation.vllm.kv_cache_memory_gb=0.1"]


def _llopsd(tmp_path, *overrides):
    from nemo_loop.algorithms.llopsd import LLOPSDConfig, train

    config = load_config(LLOPSDConfig, CONF_DIR / "llopsd.yaml", [
        f"output_dir={tmp_path}", "rollout.max_new_tokens=6", "data.limit=8",
        "trainer.prompts_per_step=2", "trainer.micro_batch_size=1", "trainer.resume=false",
        *WIDE_HEADS, *SMALL_VLLM, *overrides])
    return train(config)


def _count_vllm_calls(monkeypatch) -> list:
    from nemo_loop.generation.vllm_engine import VLLMEngine

    calls, generate = [], VLLMEngine.generate

    def counting(self, prompts, num_loops, sampling):
        calls.append(num_loops)
        return generate(self, prompts, num_loops, sampling)

    monkeypatch.setattr(VLLMEngine, "generate", counting)
    return calls


def test_llopsd_with_vllm_rollouts_matches_native_step_for_step(megatron_single_process,
                                                               tmp_path, monkeypatch):
    common = ["trainer.max_steps=3", "rollout.temperature=0"]
    calls = _count_vllm_calls(monkeypatch)
    native = _llopsd(tmp_path / "native", *common, "generation.backend=native")
    assert calls == []
    vllm = _llopsd(tmp_path / "vllm", *common, "generation.backend=vllm")
    assert calls == [2, 2, 2]  # one rollout per step at R̃ = rollout.student_loops
    for key in ("loss", "rollout_length", "divergence_per_loop"):
        assert [m[key] for m in vllm] == [m[key] for m in native], key
    assert len({m["loss"] for m in native}) == 3  # the student really changes: refits matter
    sampled = _llopsd(tmp_path / "sampled", "trainer.max_steps=2", "rollout.temperature=1.0",
                      "generation.backend=vllm")
    assert len(sampled) == 2 and sampled[0]["loss"] != native[0]["loss"]
    assert all(1 <= m["rollout_length"] <= 6 for m in sampled)


@pytest.mark.skipif(not (DATA / "math500").is_dir(), reason=f"no benchmark data at {DATA}")
def test_evaluation_with_vllm_gives_native_per_problem_results(megatron_single_process,
                                                               monkeypatch):
    import torch

    from nemo_loop.evaluation.config import EvalConfig
    from nemo_loop.evaluation.harness import run_evaluation
    from nemo_loop.models.looplm.model import build_loop_model
    from nemo_loop.tasks import build_task
    from nemo_loop.utils.distributed import ParallelConfig, initialize_model_parallel

    def config(backend):
        return load_config(EvalConfig, CONF_DIR / "eval.yaml", [
            "benchmarks=[math500]", "limit=10", "n_samples=1", "loop_budgets=[1,2]",
            "model.num_loops=2", "model.vocab_size=49152", "model.max_sequence_length=1024",
            "sampling.temperature=0", "sampling.max_new_tokens=8", f"data_root={DATA}",
            f"generation.backend={backend}", *WIDE_HEADS, *SMALL_VLLM])

    native_config = config("native")
    initialize_model_parallel(ParallelConfig(), seed=0)
    torch.manual_seed(0)
    model = build_loop_model(native_config.model.transformer_config()).eval()
    prompter = build_task(native_config.task).tokenizer(native_config.data_root)
    calls = _count_vllm_calls(monkeypatch)
    runs = {backend: run_evaluation(config(backend), model, prompter)[1]
            for backend in ("native", "vllm")}
    assert calls == [1, 2]

    def per_sample(records):
        return [(r.problem_id, r.num_loops, r.response, r.correct, r.finish_reason)
                for r in records]

    assert len(runs["native"]) == 20  # 10 problems × 2 loop budgets
    assert per_sample(runs["vllm"]) == per_sample(runs["native"])
