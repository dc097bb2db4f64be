"""LoopLM generation throughput on CPU, native engine and vLLM: loop budgets, KV cache, refit.

    python benchmarks/generation.py [--configs tiny,mid] [--new-tokens 256]
                                    [--no-cache-tokens 16] [--repeats 1] [--threads N]
                                    [--engines native,vllm] [--bf16 auto|on|off]

For each config: batch 8, 128 random prompt tokens per row, greedy, no stop tokens.

* tokens/s at num_loops = 1..R: generated tokens / wall time of one ``generate`` call
  (prefill included). Decode-only tokens/s subtracts a ``max_new_tokens=1`` call (prefill + one
  sample) and divides the remaining tokens by the remaining time. Budgets are interleaved and
  each is timed ``--repeats`` times; the fastest run counts (robust to a shared, loaded host).
* loop_speedup_2_vs_4: tokens/s at 2 loops over tokens/s at 4 loops (mid config).
* kv_cache_speedup (R loops): both engines generate the same first ``no-cache-tokens`` tokens
  (positions 128..128+n-1). Per-token decode time = (time for n tokens - time for 1 token) / (n-1),
  i.e. steps 2..n, where the cached engine feeds one token and the no-cache engine re-runs the
  whole 128+t token sequence (head on the last position only, as the engine does). The
  end-to-end ratio for the n tokens (prefill included in both) is printed too.
* refit: ``rebind`` (engine shares the trainer's module) and ``copy`` (engine owns a model; the
  trainer's parameters are copied into it), median of 5.
* vLLM (``VLLMEngine``, in this process, on the *same* weights and prompts): tokens/s at every
  loop budget, timed interleaved with a native engine on the same model (prefix caching off,
  so repeats cannot reuse the prompts' KV), the vLLM/native ratio per budget, engine start time
  (vLLM start + the first refit that loads the weights), refit time (trainer → vLLM, median of 3) and whether its greedy
  tokens equal the native engine's. Configs whose heads vLLM's CPU attention cannot run (tiny:
  head_dim 16) are skipped with the reason. With ``--bf16`` (auto: when the CPU has AVX512-BF16
  or AMX) both engines are timed again with bf16 weights.

Ends with one JSON line: {"bench": "generation", ...}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from nemo_loop.config import CONF_DIR
from nemo_loop.models.looplm.config import LoopModelConfig, read_model_config

CONFIGS = {
    "tiny": LoopModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=176,
                            num_attention_heads=4, num_query_groups=2, vocab_size=256,
                            max_sequence_length=512, num_loops=4),
    "mid": read_model_config(CONF_DIR / "model" / "mid.yaml"),
}
BATCH = 8
PROMPT_TOKENS = 128


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _build(config: LoopModelConfig, seed: int):
    from nemo_loop.models.looplm.model import build_loop_model

    torch.manual_seed(seed)
    return build_loop_model(config.transformer_config())


def bench_config(name: str, config: LoopModelConfig, new_tokens: int, no_cache_tokens: int,
                 repeats: int) -> dict:
    from nemo_loop.generation import NativeLoopEngine, SamplingParams

    model = _build(config, seed=0)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, config.vocab_size, (BATCH, PROMPT_TOKENS), generator=gen).tolist()
    cached = NativeLoopEngine(model)

    def greedy(n):
        return SamplingParams(temperature=0, max_new_tokens=n)

    cached.generate(prompts[:2], 1, greedy(2))  # warm-up (allocator, lazy init)
    # The loop budgets are interleaved and repeated, keeping each one's fastest run, so that
    # load from other processes on the machine biases no budget against another.
    first = {r: float("inf") for r in range(1, config.num_loops + 1)}
    total = dict(first)
    for _ in range(repeats):
        for num_loops in first:
            first[num_loops] = min(first[num_loops], _timed(
                lambda: cached.generate(prompts, num_loops, greedy(1))))
            total[num_loops] = min(total[num_loops], _timed(
                lambda: cached.generate(prompts, num_loops, greedy(new_tokens))))
    rows, tokens_per_s, decode_tokens_per_s = [], {}, {}
    for num_loops in first:
        tokens_per_s[num_loops] = BATCH * new_tokens / total[num_loops]
        decode_tokens_per_s[num_loops] = BATCH * (new_tokens - 1) / max(
            total[num_loops] - first[num_loops], 1e-9)
        rows.append((num_loops, first[num_loops], total[num_loops], tokens_per_s[num_loops],
                     decode_tokens_per_s[num_loops]))

    full_loops = config.num_loops
    recompute = NativeLoopEngine(model, use_kv_cache=False)
    first_cached = first[full_loops]
    n_cached = min(_timed(lambda: cached.generate(prompts, full_loops, greedy(no_cache_tokens)))
                   for _ in range(repeats))
    first_recompute = _timed(lambda: recompute.generate(prompts, full_loops, greedy(1)))
    n_recompute = _timed(lambda: recompute.generate(prompts, full_loops, greedy(no_cache_tokens)))
    per_token_cached = (n_cached - first_cached) / (no_cache_tokens - 1)
    per_token_recompute = (n_recompute - first_recompute) / (no_cache_tokens - 1)
    if per_token_cached <= 0 or per_token_recompute <= 0:
        print("WARNING: a 1-token run took longer than the n-token run (host load changed "
              "mid-measurement); rerun with --repeats 2")
        per_token_cached = per_token_recompute = float("nan")

    trainer = _build(config, seed=1)
    rebind_engine = NativeLoopEngine(_build(config, seed=2))
    copy_engine = NativeLoopEngine(_build(config, seed=2), owns_weights=True)
    rebind_s = statistics.median(rebind_engine.refit(trainer).seconds for _ in range(5))
    copy_reports = [copy_engine.refit(trainer) for _ in range(5)]
    copy_s = statistics.median(r.seconds for r in copy_reports)

    params = sum(p.numel() for p in model.parameters())
    print(f"\n== {name}: L={config.num_layers} h={config.hidden_size} "
          f"heads={config.num_attention_heads}/{config.num_query_groups} "
          f"ffn={config.ffn_hidden_size} V={config.vocab_size} R={config.num_loops} "
          f"params={params / 1e6:.1f}M; batch {BATCH}, prompt {PROMPT_TOKENS}, "
          f"new {new_tokens} (greedy)")
    print(f"{'loops':>5} {'prefill+1 s':>12} {'total s':>9} {'tok/s':>9} {'decode tok/s':>13}")
    for num_loops, first, total, tps, dtps in rows:
        print(f"{num_loops:>5} {first:>12.3f} {total:>9.2f} {tps:>9.1f} {dtps:>13.1f}")
    print(f"loop speedup 2 vs 4: {tokens_per_s[2] / tokens_per_s[4]:.2f}x end-to-end, "
          f"{decode_tokens_per_s[2] / decode_tokens_per_s[4]:.2f}x decode-only")
    print(f"KV cache vs recompute (R={full_loops}, first {no_cache_tokens} tokens): "
          f"per decoded token {per_token_cached * 1e3:.1f} ms vs {per_token_recompute * 1e3:.1f} "
          f"ms = {per_token_recompute / per_token_cached:.1f}x; end-to-end {n_cached:.2f} s vs "
          f"{n_recompute:.2f} s = {n_recompute / n_cached:.1f}x")
    print(f"refit: rebind {rebind_s * 1e6:.1f} us, copy {copy_s * 1e3:.1f} ms "
          f"({copy_reports[0].bytes_copied / 2**20:.1f} MiB, {copy_reports[0].tensors} tensors)")
    return {
        "tokens_per_s": {str(k): round(v, 1) for k, v in tokens_per_s.items()},
        "decode_tokens_per_s": {str(k): round(v, 1) for k, v in decode_tokens_per_s.items()},
        "loop_speedup_2_vs_4": round(tokens_per_s[2] / tokens_per_s[4], 3),
        "kv_cache_speedup": round(per_token_recompute / per_token_cached, 2),
        "kv_cache_speedup_end_to_end": round(n_recompute / n_cached, 2),
        "refit_s": round(copy_s, 5),
        "refit_rebind_s": round(rebind_s, 7),
    }


def _interleaved_tokens_per_s(engines: dict, prompts, budgets, new_tokens, repeats):
    """Best-of-``repeats`` tokens/s per (engine, loop budget), engines and budgets interleaved so
    that load from other processes biases neither; also each engine's last generated tokens."""
    from nemo_loop.generation import SamplingParams

    greedy = SamplingParams(temperature=0, max_new_tokens=new_tokens)
    for engine in engines.values():  # warm-up (allocator, vLLM's compiled sampler helpers)
        engine.generate(prompts[:2], 1, SamplingParams(temperature=0, max_new_tokens=2))
    best = {name: {r: float("inf") for r in budgets} for name in engines}
    tokens = {name: {} for name in engines}
    for _ in range(repeats):
        for num_loops in budgets:
            for name, engine in engines.items():
                started = time.perf_counter()
                results = engine.generate(prompts, num_loops, greedy)
                best[name][num_loops] = min(best[name][num_loops],
                                            time.perf_counter() - started)
                tokens[name][num_loops] = [r.token_ids for r in results]
    generated = len(prompts) * new_tokens  # no stop tokens: every row runs to the limit
    return {name: {r: generated / t for r, t in times.items()} for name, times in best.items()}, \
        tokens


def bench_vllm(name: str, config: LoopModelConfig, new_tokens: int, repeats: int,
               bf16: bool) -> dict:
    """vLLM against the native engine on the same weights (seed 0) and prompts."""
    from nemo_loop.generation import NativeLoopEngine
    from nemo_loop.generation.vllm_engine import VLLMConfig, VLLMEngine

    head_dim = config.hidden_size // config.num_attention_heads
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError as error:
        return {"skipped": f"vLLM not importable: {error}"}
    if head_dim not in CPUAttentionBackend.get_supported_head_sizes():
        print(f"\n== {name}: vLLM skipped (head_dim {head_dim} has no CPU attention kernel)")
        return {"skipped": f"head_dim {head_dim} not supported by vLLM's CPU attention"}
    budgets = list(range(1, config.num_loops + 1))
    gen = torch.Generator().manual_seed(0)  # the native benchmark's prompts
    prompts = torch.randint(0, config.vocab_size, (BATCH, PROMPT_TOKENS), generator=gen).tolist()
    # Prefix caching off: repeats reuse the same prompts, whose KV vLLM would otherwise reuse.
    engine_config = VLLMConfig(kv_cache_memory_gb=1.0, enable_prefix_caching=False)

    def run(dtype: str) -> dict:
        model = _build(dataclasses.replace(config, params_dtype=dtype), seed=0)
        started = time.perf_counter()
        engine = VLLMEngine.from_model(model, engine_config)
        start_s = time.perf_counter() - started
        tps, tokens = _interleaved_tokens_per_s(
            {"native": NativeLoopEngine(model), "vllm": engine}, prompts, budgets, new_tokens,
            repeats)
        trainer = _build(dataclasses.replace(config, params_dtype=dtype), seed=1)
        refit_s = statistics.median(engine.refit(trainer).seconds for _ in range(3))
        engine.close()
        ratio = {r: tps["vllm"][r] / tps["native"][r] for r in budgets}
        same = {r: sum(a == b for a, b in zip(tokens["native"][r], tokens["vllm"][r])) / BATCH
                for r in budgets}
        print(f"\n== {name} vLLM vs native ({dtype}, batch {BATCH}, prompt {PROMPT_TOKENS}, new "
              f"{new_tokens}, greedy): engine start {start_s:.1f} s, refit {refit_s * 1e3:.0f} ms")
        print(f"{'loops':>5} {'native tok/s':>13} {'vLLM tok/s':>11} {'ratio':>6} "
              f"{'rows with equal tokens':>23}")
        for r in budgets:
            print(f"{r:>5} {tps['native'][r]:>13.1f} {tps['vllm'][r]:>11.1f} {ratio[r]:>6.2f} "
                  f"{same[r]:>23.2f}")
        return {"native_tokens_per_s": {str(r): round(tps["native"][r], 1) for r in budgets},
                "vllm_tokens_per_s": {str(r): round(tps["vllm"][r], 1) for r in budgets},
                "vllm_native_ratio": {str(r): round(ratio[r], 2) for r in budgets},
                "greedy_rows_equal": {str(r): same[r] for r in budgets},
                "engine_start_s": round(start_s, 2), "refit_s": round(refit_s, 4)}

    results = {"float32": run("float32")}
    if bf16:
        results["bfloat16"] = run("bfloat16")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny,mid")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--no-cache-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1,
                        help="time each loop budget this many times (interleaved), keep the best")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--engines", default="native,vllm",
                        help="native: the native benchmark; vllm: vLLM vs native on the same "
                        "weights (times both engines); native,vllm: both sections")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                        help="also compare in bf16 (auto: when the CPU has AVX512-BF16 or AMX)")
    args = parser.parse_args()
    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and (
        torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))

    import warnings

    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    from nemo_loop.utils.distributed import (
        ParallelConfig,
        init_distributed,
        initialize_model_parallel,
    )

    init_distributed()
    initialize_model_parallel(ParallelConfig())
    start = time.perf_counter()
    engines = args.engines.split(",")
    per_config = {name: bench_config(name, CONFIGS[name], args.new_tokens,
                                      args.no_cache_tokens, args.repeats)
                  if "native" in engines else {} for name in args.configs.split(",")}
    if "vllm" in engines:
        for name, numbers in per_config.items():
            numbers["vllm"] = bench_vllm(name, CONFIGS[name], args.new_tokens, args.repeats,
                                         bf16)
    headline = per_config.get("mid") or next(iter(per_config.values()))
    print(f"\n(total benchmark time {time.perf_counter() - start:.0f} s; headline numbers from "
          f"the {'mid' if 'mid' in per_config else next(iter(per_config))} config)")
    vllm_headline = {}
    for dtype, numbers in headline.get("vllm", {}).items():
        if isinstance(numbers, dict):
            suffix = "" if dtype == "float32" else "_bf16"
            vllm_headline.update({f"vllm_native_ratio{suffix}": numbers["vllm_native_ratio"],
                                  f"vllm_tokens_per_s{suffix}": numbers["vllm_tokens_per_s"],
                                  f"vllm_engine_start_s{suffix}": numbers["engine_start_s"],
                                  f"vllm_refit_s{suffix}": numbers["refit_s"]})
    print(json.dumps({"bench": "generation", **{k: v for k, v in headline.items() if k != "vllm"},
                      **vllm_headline, "new_tokens": args.new_tokens,
                      "per_config": per_config, "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
