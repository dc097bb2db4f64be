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

* adaptive exit (``--engines adaptive``; mid config, R = 4, 128 prompt tokens,
  ``--exit-new-tokens`` greedy tokens, batches ``--exit-batches``): tokens/s end-to-end and
  decode-only (minus a 1-token call with the same prefill) and mean loops per decoded token for
  ``q_exit`` at q ∈ {0.5, 0.8, 0.95, 1.0} with ``kv_fill: propagate``, next to static R̃ = 1..4.
  The random model's gate is replaced by a seeded random linear gate (g = w·h + b, w ~ N(0,
  0.15²), b = −0.5) whose exit loops spread over 1..4. A controlled case pins the gate to
  σ(g) = 0.3 everywhere, so q = 0.5 exits every decoded token after loop 2 (mean loops 2.0):
  its decode speed-up over static R̃ = 4 at every batch, with ``copy``, ``propagate`` and
  ``compute`` (no compute saved: the control), and static R̃ = 2 as the ideal.
  ``--exit-clock cpu`` times with this process's CPU time instead of wall time (with
  ``--threads 1``, robust to other processes on a shared host).
  Agreement under the oracle policy (batch 16): the share of rows whose tokens equal static
  R̃ = 4's and the mean share of tokens before the first difference, with ``compute`` (1.0 by
  construction), ``copy`` and ``propagate`` — the cost of the KV fill alone.

Ends with one JSON line: {"bench": "generation", ...}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
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


EXIT_QUANTILES = (0.5, 0.8, 0.95, 1.0)


def _set_gate(model, weight_std: float, bias: float, seed: int = 0) -> None:
    """A gate whose exits spread over the loops (weight_std > 0) or a constant one."""
    gate = model.exit_gate
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=torch.Generator()
                                      .manual_seed(seed)) * weight_std)
        gate.bias.fill_(bias)


def bench_adaptive(config: LoopModelConfig, batches: list[int], new_tokens: int,
                   repeats: int, clock_name: str = "wall") -> dict:
    """q_exit with compaction vs static budgets; the controlled mean-loops-2.0 case; the KV
    fills' agreement under the oracle."""
    from nemo_loop.generation import NativeLoopEngine, SamplingParams
    from nemo_loop.generation.exit import ExitConfig

    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    model = _build(config, seed=0)
    engine = NativeLoopEngine(model)
    gen = torch.Generator().manual_seed(0)
    pool = torch.randint(0, config.vocab_size, (max(batches), PROMPT_TOKENS),
                         generator=gen).tolist()
    full = config.num_loops

    def params(n, exit=None):
        return SamplingParams(temperature=0, max_new_tokens=n, exit=exit or ExitConfig())

    def mean_decode_loops(results):
        loops = [loop for r in results for loop in r.exit_loops[1:]]
        return sum(loops) / max(1, len(loops))

    runs = {f"static_{r}": (r, ExitConfig()) for r in range(1, full + 1)}
    runs.update({f"q_{q}": (full, ExitConfig("q_exit", q, kv_fill="propagate"))
                 for q in EXIT_QUANTILES})
    runs.update({f"mean2_{fill}": (full, ExitConfig("q_exit", 0.5, kv_fill=fill))
                 for fill in ("copy", "propagate", "compute")})
    per_batch = {}
    engine.generate(pool[:2], 1, params(2))  # warm-up
    for batch in batches:
        prompts = pool[:batch]
        # Every run (and the 1-token prefill runs) once per repeat, interleaved; the fastest
        # of each counts, so load from other processes biases none of them. The clock is
        # wall time, or this process's CPU time (--exit-clock cpu: with --threads 1 it ignores
        # time spent waiting for a core on a shared host).
        best = {label: float("inf") for label in [*runs, *(f"prefill_{r}" for r in
                                                           range(1, full + 1))]}
        loops_seen = {}
        for _ in range(repeats):
            for loops in range(1, full + 1):
                started = clock()
                engine.generate(prompts, loops, params(1))
                best[f"prefill_{loops}"] = min(best[f"prefill_{loops}"], clock() - started)
            for label, (loops, exit) in runs.items():
                _set_gate(model, 0.0, math.log(0.3 / 0.7)) if label.startswith("mean2") \
                    else _set_gate(model, 0.15, -0.5)
                started = clock()
                results = engine.generate(prompts, loops, params(new_tokens, exit))
                best[label] = min(best[label], clock() - started)
                loops_seen[label] = mean_decode_loops(results)
        rows = {}
        for label, (loops, _) in runs.items():
            decode_s = best[label] - best[f"prefill_{loops}"]
            rows[label] = {"tokens_per_s": round(batch * new_tokens / best[label], 1),
                           "decode_tokens_per_s": round(batch * (new_tokens - 1) / decode_s, 1)
                           if decode_s > 0 else float("nan"),
                           "mean_loops": round(loops_seen[label], 3)}
        for label in ("static_2", "mean2_copy", "mean2_propagate", "mean2_compute"):
            rows[label]["speedup_vs_static_4"] = round(
                rows[label]["tokens_per_s"] / rows["static_4"]["tokens_per_s"], 3)
            rows[label]["decode_speedup_vs_static_4"] = round(
                rows[label]["decode_tokens_per_s"] / rows["static_4"]["decode_tokens_per_s"], 3)
        if any(math.isnan(row["decode_tokens_per_s"]) for row in rows.values()):
            print("WARNING: a 1-token run took longer than a full one (host load changed "
                  "mid-measurement); decode-only numbers are NaN, rerun with --repeats 3")
        per_batch[str(batch)] = rows
        print(f"\n== adaptive exit, mid, batch {batch}, prompt {PROMPT_TOKENS}, new {new_tokens} "
              f"(greedy; q_exit with kv_fill propagate; mean2_*: σ(g) = 0.3, q = 0.5; "
              f"{clock_name} clock)")
        print(f"{'run':>16} {'mean loops':>11} {'tok/s':>9} {'decode tok/s':>13} "
              f"{'vs R̃=4 (e2e / decode)':>24}")
        for label, row in rows.items():
            ratio = "" if "speedup_vs_static_4" not in row else \
                f"{row['speedup_vs_static_4']:.2f}x / {row['decode_speedup_vs_static_4']:.2f}x"
            print(f"{label:>16} {row['mean_loops']:>11.2f} {row['tokens_per_s']:>9.1f} "
                  f"{row['decode_tokens_per_s']:>13.1f} {ratio:>24}")
    _set_gate(model, 0.15, -0.5)
    agreement = _oracle_agreement(engine, pool[:16], new_tokens, params)
    print("oracle policy, batch 16: rows equal to static R̃=4 / mean share of tokens before "
          "the first difference: " + ", ".join(
              f"{fill} {a['rows_equal']:.2f} / {a['prefix_share']:.2f}"
              for fill, a in agreement.items()))
    return {"per_batch": per_batch, "oracle_agreement": agreement, "clock": clock_name}


def _oracle_agreement(engine, prompts, new_tokens, params) -> dict:
    from nemo_loop.generation.exit import ExitConfig

    reference = engine.generate(prompts, 4, params(new_tokens))
    agreement = {}
    for fill in ("compute", "copy", "propagate"):
        results = engine.generate(prompts, 4, params(new_tokens, ExitConfig("oracle",
                                                                            kv_fill=fill)))
        prefixes = []
        for one, two in zip(reference, results):
            same = next((t for t, (a, b) in enumerate(zip(one.token_ids, two.token_ids))
                         if a != b), len(one.token_ids))
            prefixes.append(same / len(one.token_ids))
        agreement[fill] = {"rows_equal": sum(p == 1.0 for p in prefixes) / len(prefixes),
                           "prefix_share": round(sum(prefixes) / len(prefixes), 3),
                           "mean_loops": round(sum(loop for r in results
                                                   for loop in r.exit_loops[1:])
                                               / sum(len(r.exit_loops) - 1 for r in results), 3)}
    return agreement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny,mid")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--no-cache-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1,
                        help="time each loop budget this many times (interleaved), keep the best")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--engines", default="native,vllm,adaptive",
                        help="native: the native benchmark; vllm: vLLM vs native on the same "
                        "weights (times both engines); adaptive: adaptive loop exit (mid "
                        "config); any comma-separated subset")
    parser.add_argument("--exit-batches", default="1,16,64")
    parser.add_argument("--exit-new-tokens", type=int, default=64)
    parser.add_argument("--exit-clock", choices=("wall", "cpu"), default="wall",
                        help="adaptive section: wall time, or this process's CPU time (with "
                        "--threads 1: robust to other processes on a shared host)")
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
    adaptive = {}
    if "adaptive" in engines:
        adaptive = bench_adaptive(CONFIGS["mid"], [int(b) for b in args.exit_batches.split(",")],
                                  args.exit_new_tokens, args.repeats, args.exit_clock)
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
    exit_headline = {}
    if adaptive:
        middle = adaptive["per_batch"].get("16") or next(iter(adaptive["per_batch"].values()))
        exit_headline = {
            "exit_mean2_speedup_vs_static_4": {
                fill: middle[f"mean2_{fill}"]["speedup_vs_static_4"]
                for fill in ("copy", "propagate", "compute")},
            "exit_mean2_decode_speedup_vs_static_4": {
                fill: middle[f"mean2_{fill}"]["decode_speedup_vs_static_4"]
                for fill in ("copy", "propagate", "compute")},
            "exit_static2_decode_speedup_vs_static_4": middle["static_2"][
                "decode_speedup_vs_static_4"],
            "exit_q_mean_loops": {label: row["mean_loops"] for label, row in middle.items()
                                  if label.startswith("q_")},
            "exit_oracle_agreement": adaptive["oracle_agreement"],
            "exit_clock": adaptive["clock"]}
    print(json.dumps({"bench": "generation", **{k: v for k, v in headline.items() if k != "vllm"},
                      **vllm_headline, **exit_headline, "new_tokens": args.new_tokens,
                      "per_config": per_config, "adaptive_exit": adaptive,
                      "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
