"""Time and peak memory of the cross-loop distillation loss on CPU, forward + backward, in two parts.

Run: ``python benchmarks/distill_loss.py`` (about 8 minutes on an idle 2-core machine; check
``free -g`` first, the peer's formula needs about 11 GB) or with ``--full`` (every token a
response token at every T, and part 1 also at T = 8,192: about 40 minutes). R̃ = 2 student
loops (shift mapping, uniform weights) against the teacher's 2 mapped loops, vocabulary
V = 49,152, forward KL at τ = 1, TP = 1.

Part 1, the loss (h = 512, fp32, T = 4,096, every token a response token):
  naive           log_softmax on student and teacher logits [R̃, T, V] + F.kl_div, autograd
  loss_unchunked  cross_loop_distillation_loss, chunk_size=None (one loop's tokens at a time)
  loss_chunked    cross_loop_distillation_loss, chunk_size=1024
  naive_head      logits = hidden @ W^T, then the naive loss; gradients to hidden and W
  fused_head      fused_head_distillation_loss on the same hidden, W (chunk_size=1024)
The first three take student logits as input; the last two hidden states [R̃, T, 512] and
W [V, 512]. Teacher logits [R̃, T, V] are an input of every case.

Part 2, the teacher through the fused head (Ouro-1.4B's h = 2,048, bf16 readouts and heads as in
bf16 training, T ∈ {8,192, 32,768, 65,536}). Inputs: student readouts [R̃, T, h] and head W
[V, h] (both trained), teacher readouts [R̃, T, h] and its own head W_T [V, h]:
  naive_h2048   both heads' logits (the teacher's without gradient), then the naive formula
  peer          the proposal author's formula in plain torch, as their verl code does it: per loop,
                full-vocabulary log_softmax of both sides (fp32), KL = Σ p_T·(log p_T − log p_S),
                token mean; one backward through both loops
  fused_head_h2048  LLOPSD's previous path: the student through the fused head, the teacher's
                logits [R̃, T, V] (bf16) formed before the step and passed in (input memory)
  fully_fused   student and teacher through the fused head: teacher logits exist one chunk at a
                time (``teacher_output_weight``), LLOPSD's path now
naive_h2048 and peer run (on every token) where their [R̃, T, V] fp32 tensors fit in the available
memory and are reported as not fitting elsewhere. The fused cases allocate the same buffers
whatever the loss mask (gradients [R̃, T, h] and [V, h], the temporaries of one 1,024-token
chunk), while their time is proportional to the response tokens; so by default only the last
quarter (T = 8,192) or sixteenth (T ≥ 32,768) of the tokens is the response: memory is that of
the full run, time is reported per response token. Time ratios come from a separate child that alternates
fused_head_h2048, fully_fused (T = 8,192, a quarter of it the response) and the peer's formula
(on as many tokens) twice and keeps the fastest run of each, so load from other processes hits
all alike; the single runs' times only show the order of magnitude on a shared machine.

Method: every case runs in a fresh subprocess (sequentially). The child builds the inputs, runs
the case once at T=256 to warm up, then writes "5" to /proc/self/clear_refs (resets the peak RSS
to the current RSS), notes VmRSS, runs the step and reads VmHWM. "Peak extra memory" is VmHWM
minus that VmRSS, i.e. everything the step allocates beyond its inputs, including the input
gradients; "inputs" is the RSS the inputs added. Time is the wall time of that one step. The
last line printed is one JSON line: part 1's ratios to its naive formulas, part 2's numbers
and ratios to the fully fused step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

VOCAB, LOOPS, CHUNK = 49_152, 2, 1024
HIDDEN, TOKEN_COUNTS = 512, (4096, 8192)
CASES = ("naive", "loss_unchunked", "loss_chunked", "naive_head", "fused_head")
HEAD_CASES = ("naive_head", "fused_head")
TEACHER_HIDDEN, TEACHER_TOKEN_COUNTS = 2048, (8192, 32_768, 65_536)
TEACHER_CASES = ("naive_h2048", "peer", "fused_head_h2048", "fully_fused")
NAIVE_TEACHER_CASES = ("naive_h2048", "peer")
NAIVE_TENSORS = {"naive_h2048": 7, "peer": 4}  # [R̃, T, V] fp32 tensors alive at the peak
SPARSE_FROM, SPARSE_STRIDE, DENSE_STRIDE = 32_768, 16, 4
PAIR_REPEATS = 2
GIB = 1024 ** 3


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


def _peer_loss(student_hidden, weight, teacher_hidden, teacher_weight):
    """Per loop: full-vocabulary log-softmax of both sides and KL(p_T ‖ p_S), token mean."""
    total = 0.0
    for r in range(student_hidden.shape[0]):
        log_p_s = F.log_softmax((student_hidden[r] @ weight.t()).float(), dim=-1)
        with torch.no_grad():
            log_p_t = F.log_softmax((teacher_hidden[r] @ teacher_weight.t()).float(), dim=-1)
            p_t = log_p_t.exp()
        total = total + (p_t * (log_p_t - log_p_s)).sum(-1).mean()
    return total / student_hidden.shape[0]


def _inputs(case: str, tokens: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    if case in TEACHER_CASES:
        def head():
            return (torch.randn(VOCAB, TEACHER_HIDDEN, generator=gen)
                    / TEACHER_HIDDEN ** 0.5).bfloat16()

        def readouts():
            return torch.randn(LOOPS, tokens, 1, TEACHER_HIDDEN, generator=gen).bfloat16()

        inputs = dict(hidden=readouts().requires_grad_(True), weight=head().requires_grad_(True),
                      teacher_hidden=readouts(), teacher_weight=head())
        if case == "fused_head_h2048":  # the teacher's logits, formed before the step
            inputs["teacher"] = inputs.pop("teacher_hidden") @ inputs.pop("teacher_weight").t()
        return inputs
    teacher = torch.randn(LOOPS, tokens, 1, VOCAB, generator=gen)
    if case in HEAD_CASES:
        hidden = torch.randn(LOOPS, tokens, 1, HIDDEN, generator=gen).requires_grad_(True)
        weight = (torch.randn(VOCAB, HIDDEN, generator=gen) / HIDDEN ** 0.5).requires_grad_(True)
        return dict(hidden=hidden, weight=weight, teacher=teacher)
    student = torch.randn(LOOPS, tokens, 1, VOCAB, generator=gen).requires_grad_(True)
    return dict(student=student, teacher=teacher)


def _mask(tokens: int, stride: int) -> torch.Tensor:
    """The last tokens/stride positions are the response (a prompt, then one response)."""
    mask = torch.zeros(tokens, 1)
    mask[tokens - tokens // stride:] = 1.0
    return mask


def _step(case: str, inputs: dict, stride: int) -> None:
    from nemo_loop.losses import (
        LoopDistillConfig,
        cross_loop_distillation_loss,
        fused_head_distillation_loss,
    )

    tokens = next(iter(inputs.values())).shape[1]
    mask = _mask(tokens, stride)
    chunked = LoopDistillConfig(chunk_size=CHUNK)
    if case == "naive":
        loss = _naive_loss(inputs["student"], inputs["teacher"])
    elif case == "naive_head":
        loss = _naive_loss(inputs["hidden"] @ inputs["weight"].t(), inputs["teacher"])
    elif case == "naive_h2048":
        with torch.no_grad():
            teacher = (inputs["teacher_hidden"] @ inputs["teacher_weight"].t()).float()
        loss = _naive_loss((inputs["hidden"] @ inputs["weight"].t()).float(), teacher)
    elif case == "peer":
        loss = _peer_loss(inputs["hidden"], inputs["weight"], inputs["teacher_hidden"],
                          inputs["teacher_weight"])
    elif case == "loss_unchunked":
        loss, _ = cross_loop_distillation_loss(inputs["student"], inputs["teacher"], mask,
                                               LoopDistillConfig(chunk_size=None))
    elif case == "loss_chunked":
        loss, _ = cross_loop_distillation_loss(inputs["student"], inputs["teacher"], mask, chunked)
    elif case == "fully_fused":
        loss, _ = fused_head_distillation_loss(
            inputs["hidden"], inputs["weight"], inputs["teacher_hidden"], mask, chunked,
            teacher_output_weight=inputs["teacher_weight"])
    else:  # fused_head, fused_head_h2048
        loss, _ = fused_head_distillation_loss(inputs["hidden"], inputs["weight"],
                                               inputs["teacher"], mask, chunked)
    loss.backward()


def _meminfo_kib(field: str) -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/meminfo")


def _cap_address_space() -> None:
    """Fail with a MemoryError instead of waking the OOM killer on a shared machine."""
    import resource

    available_kib = _meminfo_kib("MemAvailable")
    limit = max(available_kib - 1024 * 1024, 1024 * 1024) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def run_case(case: str, tokens: int, stride: int) -> dict:
    _cap_address_space()
    torch.set_num_threads(os.cpu_count() or 1)
    _step(case, _inputs(case, 256), 1)  # warm-up
    before_inputs = _rss_mib()
    inputs = _inputs(case, tokens)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    baseline_kib = _status_kib("VmRSS")
    start = time.perf_counter()
    _step(case, inputs, stride)
    seconds = time.perf_counter() - start
    peak_extra_mib = (_status_kib("VmHWM") - baseline_kib) / 1024
    return {"case": case, "tokens": tokens, "response_tokens": tokens // stride,
            "seconds": seconds, "peak_extra_mib": peak_extra_mib,
            "input_mib": baseline_kib / 1024 - before_inputs}


def run_pair(tokens: int, stride: int, repeats: int) -> dict:
    """Time per response token of fused_head_h2048 and fully_fused on the same inputs, and of
    the peer's formula on as many tokens (it has no mask), alternated ``repeats`` times in one
    process; the fastest run of each counts (robust to other load on a shared machine)."""
    torch.set_num_threads(os.cpu_count() or 1)
    response = tokens // stride

    def with_logits(inputs):
        return dict(inputs, teacher=inputs["teacher_hidden"] @ inputs["teacher_weight"].t())

    inputs, warm = _inputs("fully_fused", tokens), _inputs("fully_fused", 256)
    cases = (("fused_head_h2048", with_logits(inputs), with_logits(warm), stride),
             ("fully_fused", inputs, warm, stride),
             ("peer", _inputs("peer", response), _inputs("peer", 256), 1))
    for case, _, warm_inputs, _ in cases:
        _step(case, warm_inputs, 1)
    best = {case: float("inf") for case, *_ in cases}
    for _ in range(repeats):
        for case, case_inputs, _, case_stride in cases:
            case_inputs["hidden"].grad = case_inputs["weight"].grad = None
            start = time.perf_counter()
            _step(case, case_inputs, case_stride)
            best[case] = min(best[case], time.perf_counter() - start)
    return {"tokens": tokens, "response_tokens": response, "repeats": repeats,
            "us_per_token": {case: seconds / response * 1e6 for case, seconds in best.items()}}


def _run_in_subprocess(case: str, tokens: int, stride: int = 1) -> dict:
    return _child(["--case", case, str(tokens), str(stride)], case, tokens)


def _child(arguments: list[str], case: str, tokens: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        return {"case": case, "tokens": tokens, "error": (done.stderr or "")[-300:] or
                f"exit code {done.returncode} (killed? likely out of memory)"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rounded_or_none(value: float) -> float | None:
    return None if value != value else round(value, 3)


def _loss_part(full: bool) -> dict:
    token_counts = TOKEN_COUNTS if full else TOKEN_COUNTS[:1]
    results = {(case, t): _run_in_subprocess(case, t) for t in token_counts for case in CASES}
    print(f"{'case':<16}{'T':>7}{'time [s]':>10}{'peak extra [MiB]':>18}{'time ×':>9}"
          f"{'mem ×':>8}   (× relative to naive; head cases relative to naive_head)")
    time_ratio, memory_ratio = {}, {}
    for t in token_counts:
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
    return {"T": list(token_counts), "time_ratio": time_ratio, "peak_mem_ratio": memory_ratio}


def _naive_fits(case: str, tokens: int) -> tuple[bool, str]:
    """Whether the [R̃, T, V] fp32 tensors a naive formula holds at once fit, leaving 2 GiB to
    the machine's other users (measured at T = 8,192: the peer's peak is 3.3 of them; 6, more
    than 19 GiB, were not enough for naive_h2048's stacked loops)."""
    needed = NAIVE_TENSORS[case] * LOOPS * tokens * VOCAB * 4
    available = _meminfo_kib("MemAvailable") * 1024 - 2 * GIB
    if needed <= available:
        return True, ""
    return False, (f"does not fit: needs ≥ {needed / GIB:.0f} GiB ({NAIVE_TENSORS[case]} × "
                   f"[R̃, T, V] fp32), {max(available, 0) / GIB:.0f} GiB available")


def _stride(tokens: int, full: bool) -> int:
    if full:
        return 1
    return SPARSE_STRIDE if tokens >= SPARSE_FROM else DENSE_STRIDE


def _teacher_part(full: bool) -> dict:
    results = {}
    for tokens in TEACHER_TOKEN_COUNTS:
        cases = TEACHER_CASES if tokens == TEACHER_TOKEN_COUNTS[0] \
            else NAIVE_TEACHER_CASES + ("fully_fused",)  # the naive ones: to say they don't fit
        for case in cases:
            naive = case in NAIVE_TEACHER_CASES  # these ignore the mask: every token counts
            fits, reason = _naive_fits(case, tokens) if naive else (True, "")
            results[case, tokens] = _run_in_subprocess(
                case, tokens, 1 if naive else _stride(tokens, full)) if fits \
                else {"case": case, "tokens": tokens, "error": reason}
    first = TEACHER_TOKEN_COUNTS[0]
    pair = _child(["--pair", str(first), str(_stride(first, full)), str(PAIR_REPEATS)], "pair",
                  first)
    print(f"\n{'case':<18}{'T':>7}{'resp. tokens':>14}{'time [s]':>10}{'µs/token':>10}"
          f"{'inputs [MiB]':>14}{'peak extra [MiB]':>18}")
    for (case, tokens), row in results.items():
        if "error" in row:
            print(f"{case:<18}{tokens:>7}   {row['error'].strip().splitlines()[-1]}")
            continue
        per_token = row["seconds"] / row["response_tokens"] * 1e6
        print(f"{case:<18}{tokens:>7}{row['response_tokens']:>14}{row['seconds']:>10.2f}"
              f"{per_token:>10.0f}{row['input_mib']:>14.0f}{row['peak_extra_mib']:>18.0f}")
    if "error" in pair:
        print(f"paired timing failed: {pair['error']!r}")
    else:
        print(f"paired, alternated ×{pair['repeats']} at T={first} ({pair['response_tokens']} "
              "response tokens; the peer on that many tokens), fastest, µs/token: " + ", ".join(
                  f"{case} {us:.0f}" for case, us in pair["us_per_token"].items()))
    return _teacher_summary(results, pair)


def _teacher_summary(results: dict, pair: dict) -> dict:
    first = TEACHER_TOKEN_COUNTS[0]

    def field(case, tokens, name):
        return results.get((case, tokens), {}).get(name, float("nan"))

    def with_inputs(case, tokens):
        return field(case, tokens, "input_mib") + field(case, tokens, "peak_extra_mib")

    fully = "fully_fused"
    paired = pair.get("us_per_token", {})
    summary = {
        "T": list(TEACHER_TOKEN_COUNTS),
        "response_tokens": [field(fully, t, "response_tokens") for t in TEACHER_TOKEN_COUNTS],
        "fully_fused_peak_extra_gib": [_rounded_or_none(field(fully, t, "peak_extra_mib") / 1024)
                                       for t in TEACHER_TOKEN_COUNTS],
        "fully_fused_peak_with_inputs_gib": [_rounded_or_none(with_inputs(fully, t) / 1024)
                                             for t in TEACHER_TOKEN_COUNTS],
        f"fused_head_peak_with_inputs_gib_T{first}": _rounded_or_none(
            with_inputs("fused_head_h2048", first) / 1024),
        f"fully_fused_vs_fused_head_time_per_token_T{first}": _rounded_or_none(
            paired.get(fully, float("nan")) / paired.get("fused_head_h2048", float("nan"))),
        f"peer_vs_fully_fused_time_per_token_T{first}_paired": _rounded_or_none(
            paired.get("peer", float("nan")) / paired.get(fully, float("nan"))),
        "targets": {"peak_extra_gib_at_T65536": 4.0, "time_per_token_vs_fused_head": 1.3},
    }
    for case in NAIVE_TEACHER_CASES:  # what the naive formulas cost more, where they ran
        summary[f"{case}_vs_fully_fused_peak_with_inputs"] = [
            _rounded_or_none(with_inputs(case, t) / with_inputs(fully, t))
            for t in TEACHER_TOKEN_COUNTS]
    return summary


def main(full: bool) -> None:
    loss = _loss_part(full)
    teacher = _teacher_part(full)
    print(json.dumps({"bench": "distill_loss", **loss, "teacher_head": teacher}))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--case":
        print(json.dumps(run_case(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
    elif len(sys.argv) == 5 and sys.argv[1] == "--pair":
        print(json.dumps(run_pair(*map(int, sys.argv[2:]))))
    else:
        main(full="--full" in sys.argv[1:])
