"""Time and peak memory of the cross-loop distillation loss against a naive fp32 baseline (CPU).

Run: ``python benchmarks/distill_loss.py``. R̃ = R = 2 loops (shift mapping, uniform weights),
vocab 49,152, forward KL at τ = 1, every token a response token, T ∈ {4,096, 8,192} tokens, TP = 1.

Cases (each a forward + backward of one step, fp32 inputs):
  naive           log_softmax on student and teacher logits [R̃, T, V] + F.kl_div, autograd
  loss_unchunked  cross_loop_distillation_loss, chunk_size=None (one loop's tokens at a time)
  loss_chunked    cross_loop_distillation_loss, chunk_size=1024
  naive_head      logits = hidden @ W^T, then the naive loss; gradients to hidden and W
  fused_head      fused_head_distillation_loss on the same hidden, W (chunk_size=1024)
The first three take student logits as input; the last two take hidden states [R̃, T, 512] and
W [V, 512] instead. Teacher logits [R, T, V] are an input of every case.

Method: every case runs in a fresh subprocess (sequentially). The child builds the inputs, runs
the case once at T=256 to warm up, then writes "5" to /proc/self/clear_refs (resets the peak RSS
to the current RSS), notes VmRSS, runs the step and reads VmHWM. "Peak extra memory" is VmHWM
minus that VmRSS, i.e. everything the step allocates beyond its inputs, including the input
gradients. Time is the wall time of that one step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

VOCAB, LOOPS, HIDDEN, CHUNK = 49_152, 2, 512, 1024
TOKEN_COUNTS = (4096, 8192)
CASES = ("naive", "loss_unchunked", "loss_chunked", "naive_head", "fused_head")
HEAD_CASES = ("naive_head", "fused_head")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _naive_loss(student_logits, teacher_logits):
    log_p_s = F.log_softmax(student_logits, dim=-1)
    with torch.no_grad():
        log_p_t = F.log_softmax(teacher_logits, dim=-1)
    per_token = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1)
    return per_token.mean(-1).mean()  # one sequence of T tokens per loop, uniform α


def _inputs(case: str, tokens: int):
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(LOOPS, tokens, 1, VOCAB, generator=gen)
    if case in HEAD_CASES:
        hidden = torch.randn(LOOPS, tokens, 1, HIDDEN, generator=gen).requires_grad_(True)
        weight = (torch.randn(VOCAB, HIDDEN, generator=gen) / HIDDEN ** 0.5).requires_grad_(True)
        return (hidden, weight), teacher
    return (torch.randn(LOOPS, tokens, 1, VOCAB, generator=gen).requires_grad_(True),), teacher


def _step(case: str, student_inputs, teacher) -> None:
    from nemo_loop.losses import (
        LoopDistillConfig,
        cross_loop_distillation_loss,
        fused_head_distillation_loss,
    )

    mask = torch.ones(teacher.shape[1:3])
    chunked = LoopDistillConfig(chunk_size=CHUNK)
    if case == "naive":
        loss = _naive_loss(student_inputs[0], teacher)
    elif case == "naive_head":
        hidden, weight = student_inputs
        loss = _naive_loss(hidden @ weight.t(), teacher)
    elif case == "loss_unchunked":
        loss, _ = cross_loop_distillation_loss(student_inputs[0], teacher, mask,
                                               LoopDistillConfig(chunk_size=None))
    elif case == "loss_chunked":
        loss, _ = cross_loop_distillation_loss(student_inputs[0], teacher, mask, chunked)
    else:
        loss, _ = fused_head_distillation_loss(*student_inputs, teacher, mask, chunked)
    loss.backward()


def _cap_address_space() -> None:
    """Fail with a MemoryError instead of waking the OOM killer on a shared machine."""
    import resource

    available_kib = _meminfo_kib("MemAvailable")
    limit = max(available_kib - 1024 * 1024, 1024 * 1024) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _meminfo_kib(field: str) -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/meminfo")


def run_case(case: str, tokens: int) -> dict:
    _cap_address_space()
    torch.set_num_threads(os.cpu_count() or 1)
    warm_inputs, warm_teacher = _inputs(case, 256)
    _step(case, warm_inputs, warm_teacher)
    del warm_inputs, warm_teacher
    student_inputs, teacher = _inputs(case, tokens)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    baseline_kib = _status_kib("VmRSS")
    start = time.perf_counter()
    _step(case, student_inputs, teacher)
    seconds = time.perf_counter() - start
    peak_extra_mib = (_status_kib("VmHWM") - baseline_kib) / 1024
    return {"case": case, "tokens": tokens, "seconds": seconds, "peak_extra_mib": peak_extra_mib}


def _run_in_subprocess(case: str, tokens: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, __file__, "--case", case, str(tokens)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"case": case, "tokens": tokens, "error": (done.stderr or "")[-300:] or
                f"exit code {done.returncode} (killed? likely out of memory)"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rounded_or_none(value: float) -> float | None:
    return None if value != value else round(value, 3)


def main() -> None:
    results = {(case, t): _run_in_subprocess(case, t) for t in TOKEN_COUNTS for case in CASES}
    print(f"{'case':<16}{'T':>7}{'time [s]':>10}{'peak extra [MiB]':>18}{'time ×':>9}"
          f"{'mem ×':>8}   (× relative to naive; head cases relative to naive_head)")
    time_ratio, memory_ratio = {}, {}
    for t in TOKEN_COUNTS:
        for case in CASES:
            row = results[case, t]
            if "error" in row:
                print(f"{case:<16}{t:>7}   failed: {row['error']!r}")
                continue
            base = results["naive_head" if case in HEAD_CASES else "naive", t]
            ratios = (row["seconds"] / base["seconds"], row["peak_extra_mib"] /
                      base["peak_extra_mib"]) if "error" not in base else (float("nan"),) * 2
            print(f"{case:<16}{t:>7}{row['seconds']:>10.2f}{row['peak_extra_mib']:>18.0f}"
                  f"{ratios[0]:>9.2f}{ratios[1]:>8.2f}")
            if case not in ("naive", "naive_head"):
                key = "fused_head_vs_naive_head" if case == "fused_head" else case
                # null, not NaN, when the baseline failed (e.g. out of memory): valid JSON
                time_ratio.setdefault(key, []).append(_rounded_or_none(ratios[0]))
                memory_ratio.setdefault(key, []).append(_rounded_or_none(ratios[1]))
    print(json.dumps({"bench": "distill_loss", "T": list(TOKEN_COUNTS), "time_ratio": time_ratio,
                      "peak_mem_ratio": memory_ratio}))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--case":
        print(json.dumps(run_case(sys.argv[2], int(sys.argv[3]))))
    else:
        main()
