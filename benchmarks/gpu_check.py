"""The first-GPU-hour check: does nemo-loop run on a CUDA device, how fast, and does memory match
the plan? One command, one JSON file, sized for ≤ 8 minutes on one H100 (docs/gpu_check.md).

    python benchmarks/gpu_check.py [--out FILE] [--parts a,b] [--budget-s 450]
    python benchmarks/gpu_check.py --smoke          # the same code at tiny sizes on CPU (a test)

Parts, each time-boxed and failure-isolated (a failing part records its error, the rest run):

  parity       a tiny LoopLM (fp32, TF32 off, padded masks) forward + backward on the device vs
               the same weights on CPU in a child process: max |Δ| of logits, loss, gradients
  train_step   an Ouro-1.4B-size LoopLM (24 layers, h 2,048, V 49,152, R = 4, random init, bf16,
               SDPA), pretraining steps at s = 2,048 with model.recompute none and full:
               tokens/s, MFU, peak memory vs the memory plan's prediction
  fused_loss   the fully fused cross-loop distillation loss (student and teacher through the
               fused head) at T = 65,536 tokens, R̃ = 2, h 2,048, bf16: time and peak memory
  generation   the native engine on the 1.4B-size model, batch 64, 128-token prompts, 128 greedy
               new tokens at R̃ = 1..4: tokens/s (end to end and decode only)
  llopsd_step  one LLOPSD step at that size (8 prompts, 128 new tokens, MATH prompts and the Ouro
               tokenizer from $NEMO_LOOP_DATA): its phase times, FLOPs, MFU and peak memory

The JSON goes to --out, else $OUT/gpu_check.json when $OUT is set, else
runs/gpu_check/gpu_check.json; its figures go into docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PARTS = ("parity", "train_step", "fused_loss", "generation", "llopsd_step")


@dataclass(frozen=True)
class Sizes:
    model: str  # conf/model/<name>.yaml for train_step, generation and llopsd_step
    seq: int
    timed_steps: int
    loss_tokens: int
    loss_hidden: int
    loss_vocab: int
    gen_batch: int
    gen_prompt: int
    gen_new: int
    llopsd_model: str
    llopsd_prompts: int
    llopsd_new: int
    limits_s: dict  # per part


FULL = Sizes(model="ouro_1p4b", seq=2048, timed_steps=3, loss_tokens=65_536, loss_hidden=2048,
             loss_vocab=49_152, gen_batch=64, gen_prompt=128, gen_new=128, llopsd_model="ouro_1p4b",
             llopsd_prompts=8, llopsd_new=128,
             limits_s=dict(parity=90, train_step=200, fused_loss=60, generation=120,
                           llopsd_step=150))
SMOKE = Sizes(model="tiny", seq=64, timed_steps=1, loss_tokens=1024, loss_hidden=64,
              loss_vocab=1024, gen_batch=4, gen_prompt=8, gen_new=4, llopsd_model="tiny_chat",
              llopsd_prompts=2, llopsd_new=4, limits_s={part: 300 for part in PARTS})
PARITY_MODEL = dict(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                    num_query_groups=2, vocab_size=256, max_sequence_length=64, num_loops=4,
                    attention_backend="sdpa")


class PartTimeout(Exception):
    pass


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_flops() -> float:
    from nemo_loop.utils.flops import H100_BF16_DENSE_FLOPS

    return H100_BF16_DENSE_FLOPS


def _model_config(name: str, **fields):
    from nemo_loop.config import CONF_DIR
    from nemo_loop.models.looplm.config import read_model_config

    return replace(read_model_config(CONF_DIR / "model" / f"{name}.yaml"), **fields)


def _fresh_parallel_state() -> None:
    from nemo_loop.utils.distributed import ParallelConfig, initialize_model_parallel

    initialize_model_parallel(ParallelConfig(), seed=1234)


# ----- parity: device vs CPU, fp32 -----

def _parity_batch():
    from nemo_loop.data.sequences import teacher_forced_batch

    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, PARITY_MODEL["vocab_size"], (n,), generator=gen).tolist()
            for n in (20, 13, 17)]
    return teacher_forced_batch([r[:8] for r in rows], [r[8:] for r in rows], pad_id=0)


def _parity_pass(model, batch: dict, device) -> dict:
    """Logits, loss and every gradient of one forward + backward, on CPU."""
    from nemo_loop.losses.ouro_pretrain import ouro_pretraining_loss

    moved = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    model.zero_grad(set_to_none=True)
    output = model(moved["input_ids"], position_ids=moved["position_ids"],
                   attention_mask=moved["attention_mask"])
    loss, _ = ouro_pretraining_loss(output, moved["labels"], moved["loss_mask"])
    loss.backward()
    return {"logits": output.logits.detach().cpu(), "loss": loss.detach().cpu(),
            "grads": {n: p.grad.detach().cpu() for n, p in model.named_parameters()}}


def cpu_reference(path: str) -> None:
    """Child process (CUDA hidden): the parity pass on CPU with the weights in ``path``."""
    from nemo_loop.models.looplm.config import LoopModelConfig
    from nemo_loop.models.looplm.model import build_loop_model
    from nemo_loop.utils.distributed import init_distributed

    init_distributed()
    _fresh_parallel_state()
    saved = torch.load(path)
    model = build_loop_model(LoopModelConfig(**PARITY_MODEL).transformer_config())
    missing, unexpected = model.load_state_dict(saved["weights"], strict=False)
    if unexpected or any(not key.endswith("_extra_state") for key in missing):
        raise RuntimeError(f"weights do not match the model: {missing} {unexpected}")
    torch.save(_parity_pass(model, saved["batch"], torch.device("cpu")), path + ".cpu")


def part_parity(sizes: Sizes) -> dict:
    from nemo_loop.models.looplm.config import LoopModelConfig
    from nemo_loop.models.looplm.model import build_loop_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    _fresh_parallel_state()
    model = build_loop_model(LoopModelConfig(**PARITY_MODEL).transformer_config())
    model.to(_device())
    batch = _parity_batch()
    device_result = _parity_pass(model, batch, _device())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "parity.pt")
        torch.save({"weights": {k: v.cpu() for k, v in model.state_dict().items()
                                if isinstance(v, torch.Tensor)}, "batch": batch}, path)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        subprocess.run([sys.executable, __file__, "--cpu-reference", path], env=env,
                       check=True, capture_output=True, text=True)
        cpu_result = torch.load(path + ".cpu")

    def err(a, b):
        return (a.double() - b.double()).abs().max().item()

    grads = {n: err(g, cpu_result["grads"][n]) for n, g in device_result["grads"].items()}
    figures = {"device": str(_device()), "logits_max_abs_err": err(device_result["logits"],
                                                                   cpu_result["logits"]),
               "loss_abs_err": err(device_result["loss"], cpu_result["loss"]),
               "grad_max_abs_err": max(grads.values()),
               "grad_scale": max(g.abs().max().item() for g in device_result["grads"].values())}
    figures["within_1e-4"] = max(figures["logits_max_abs_err"], figures["loss_abs_err"],
                                 figures["grad_max_abs_err"]) <= 1e-4
    return figures


# ----- train_step: the 1.4B-size model, pretraining steps, recompute off / on -----

def _pretrain_config(sizes: Sizes, recompute: str):
    from nemo_loop.algorithms.pretrain import PretrainConfig
    from nemo_loop.config import CONF_DIR, load_config

    return load_config(PretrainConfig, CONF_DIR / "pretrain.yaml", [
        f"model={sizes.model}", "model.attention_backend=sdpa", f"model.recompute={recompute}",
        f"model.max_sequence_length={max(sizes.seq, 64)}", "data.source=text",
        f"data.text.sequence_length={sizes.seq}", "trainer.micro_batch_size=1",
        "trainer.global_batch_size=1"] + (["model.params_dtype=bfloat16"]
                                          if torch.cuda.is_available() else []),
        check_paths=False)


def _train_steps(sizes: Sizes, recompute: str) -> dict:
    from nemo_loop.algorithms.common import build_optimizer, train_step, wrap_data_parallel
    from nemo_loop.algorithms.memory_plan import plan_training
    from nemo_loop.algorithms.registry import algorithm
    from nemo_loop.losses.ouro_pretrain import ouro_pretraining_loss
    from nemo_loop.models.looplm.model import build_loop_model
    from nemo_loop.utils.flops import LoopShape, training_flops
    from nemo_loop.utils.memory import PeakTensorMemory

    config = _pretrain_config(sizes, recompute)
    plan = plan_training(algorithm("pretrain"), config)
    _fresh_parallel_state()
    vocab, seq = config.model.vocab_size, sizes.seq
    tokens = torch.randint(0, vocab, (1, seq + 1), generator=torch.Generator().manual_seed(0))
    batches = [{k: v.to(_device()) for k, v in dict(
        input_ids=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=torch.ones(1, seq)).items()}]

    def loss_func(batch, output, normalizer):
        return ouro_pretraining_loss(output, batch["labels"], batch["loss_mask"],
                                     normalizer=normalizer)

    times = []
    with PeakTensorMemory(_device()) as peak:
        ddp = wrap_data_parallel(build_loop_model(config.model.transformer_config()))
        optimizer, scheduler = build_optimizer(ddp, config.optim)
        for step in range(1 + sizes.timed_steps):  # the first one warms up
            _sync()
            started = time.perf_counter()
            metrics = train_step(ddp, optimizer, scheduler, batches, loss_func)
            _sync()
            if step:
                times.append(time.perf_counter() - started)
    seconds = min(times)
    loops = config.model.num_loops
    flops = training_flops(LoopShape.of(config.model), seq, loops, readouts=seq * loops)
    del ddp, optimizer, scheduler
    return {"step_s": round(seconds, 4), "tokens_per_s": round(seq / seconds, 1),
            "mfu": round(flops / seconds / _peak_flops(), 4), "flops_per_step": flops,
            "loss": metrics["loss"], "peak_gib": round(peak.bytes / 2**30, 3),
            "planned_gib": round(plan.total / 2**30, 3),
            "planned_over_measured": round(plan.total / max(peak.bytes, 1), 3)}


def part_train_step(sizes: Sizes) -> dict:
    figures = {"model": sizes.model, "seq": sizes.seq, "micro_batch": 1}
    for recompute in ("none", "full"):
        figures[f"recompute_{recompute}"] = _train_steps(sizes, recompute)
        _release()
    return figures


# ----- fused_loss: the fully fused cross-loop loss at T = 65,536 -----

def part_fused_loss(sizes: Sizes) -> dict:
    from nemo_loop.losses import LoopDistillConfig, fused_head_distillation_loss
    from nemo_loop.utils.memory import PeakTensorMemory

    device, loops, vocab, hidden = _device(), 2, sizes.loss_vocab, sizes.loss_hidden
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    tokens = sizes.loss_tokens

    def inputs(seed):
        gen = torch.Generator(device=device).manual_seed(seed)
        readouts = torch.randn(loops, tokens, 1, hidden, generator=gen, device=device,
                               dtype=dtype)
        head = torch.randn(vocab, hidden, generator=gen, device=device, dtype=dtype) \
            / hidden ** 0.5
        return readouts, head

    student, weight = inputs(0)
    teacher, teacher_weight = inputs(1)
    student.requires_grad_(True)
    weight.requires_grad_(True)
    mask = torch.ones(tokens, 1, device=device)
    config = LoopDistillConfig(chunk_size=1024)

    def step():
        loss, _ = fused_head_distillation_loss(student, weight, teacher, mask, config,
                                               teacher_output_weight=teacher_weight)
        loss.backward()
        return loss

    step()  # warm-up
    student.grad = weight.grad = None
    _sync()
    with PeakTensorMemory(device) as peak:
        started = time.perf_counter()
        loss = step()
        _sync()
        seconds = time.perf_counter() - started
    head_flops = 2 * hidden * vocab
    flops = loops * tokens * head_flops * (3 + 1)  # student fwd + bwd, teacher fwd
    return {"tokens": tokens, "loops": loops, "hidden": hidden, "vocab": vocab,
            "dtype": str(dtype), "seconds": round(seconds, 4),
            "tokens_per_s": round(tokens / seconds, 1),
            "head_mfu": round(flops / seconds / _peak_flops(), 4),
            "step_peak_gib": round(peak.bytes / 2**30, 3), "loss": float(loss)}


# ----- generation: the native engine, loop budgets 1..4 -----

def part_generation(sizes: Sizes) -> dict:
    from nemo_loop.generation import NativeLoopEngine, SamplingParams
    from nemo_loop.models.looplm.model import build_loop_model

    _fresh_parallel_state()
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    config = _model_config(sizes.model, attention_backend="sdpa", params_dtype=dtype)
    model = build_loop_model(config.transformer_config()).to(_device()).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, config.vocab_size, (sizes.gen_batch, sizes.gen_prompt),
                            generator=gen).tolist()
    engine = NativeLoopEngine(model)

    def timed(loops, new_tokens):
        _sync()
        started = time.perf_counter()
        engine.generate(prompts, loops, SamplingParams(temperature=0, max_new_tokens=new_tokens))
        _sync()
        return time.perf_counter() - started

    engine.generate(prompts[:2], 1, SamplingParams(temperature=0, max_new_tokens=2))  # warm-up
    figures = {"batch": sizes.gen_batch, "prompt_tokens": sizes.gen_prompt,
               "new_tokens": sizes.gen_new, "tokens_per_s": {}, "decode_tokens_per_s": {}}
    for loops in range(1, config.num_loops + 1):
        prefill = timed(loops, 1)
        total = timed(loops, sizes.gen_new)
        figures["tokens_per_s"][loops] = round(sizes.gen_batch * sizes.gen_new / total, 1)
        figures["decode_tokens_per_s"][loops] = round(
            sizes.gen_batch * (sizes.gen_new - 1) / max(total - prefill, 1e-9), 1)
    return figures


# ----- llopsd_step: one LLOPSD step at the 1.4B size -----

def part_llopsd_step(sizes: Sizes) -> dict:
    from nemo_loop.algorithms.llopsd import LLOPSDConfig, llopsd_step, setup
    from nemo_loop.config import CONF_DIR, load_config
    from nemo_loop.utils.memory import PeakTensorMemory

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"model={sizes.llopsd_model}", "model.attention_backend=sdpa", f"output_dir={tmp}",
            f"trainer.prompts_per_step={sizes.llopsd_prompts}", "trainer.micro_batch_size=2",
            f"rollout.max_new_tokens={sizes.llopsd_new}", "trainer.max_steps=1",
            "trainer.resume=false", "checkpoint.check_free_space=false",
            f"trainer.peak_flops_per_s={_peak_flops()}"]
        if torch.cuda.is_available():
            overrides.append("model.params_dtype=bfloat16")
        config = load_config(LLOPSDConfig, CONF_DIR / "llopsd.yaml", overrides)
        with PeakTensorMemory(_device()) as peak:
            state = setup(config)
            metrics = llopsd_step(state)
        del state
    keys = ("time_generate_s", "time_teacher_s", "time_student_s", "time_optimizer_s",
            "time_ema_and_refit_s", "step_time_s", "flops", "mfu", "loss", "rollout_length",
            "generation_tokens_per_s")
    return {"model": sizes.llopsd_model, "prompts": sizes.llopsd_prompts,
            "new_tokens": sizes.llopsd_new, "peak_gib": round(peak.bytes / 2**30, 3),
            **{k: metrics[k] for k in keys if k in metrics}}


# ----- running the parts -----

def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _time_box(seconds: int):
    def expire(signum, frame):
        raise PartTimeout(f"over its {seconds} s time box")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_part(name: str, sizes: Sizes, deadline: float) -> dict:
    limit = min(sizes.limits_s[name], int(deadline - time.monotonic()))
    if limit < 5:
        return {"ok": False, "error": "skipped: the check's time budget is spent"}
    started = time.perf_counter()
    try:
        with _time_box(limit):
            figures = globals()[f"part_{name}"](sizes)
        result = {"ok": True, **figures}
    except (Exception, PartTimeout) as error:  # noqa: BLE001 - recorded, the next part runs
        result = {"ok": False, "error": f"{type(error).__name__}: {error}",
                  "traceback": traceback.format_exc()[-3000:]}
    finally:
        _release()
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _environment() -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    try:
        from importlib.metadata import version

        info["megatron_core"] = version("megatron-core")
    except Exception:  # noqa: BLE001 - informational
        info["megatron_core"] = None
    return info


def _output_path(argument: str | None) -> Path:
    if argument:
        return Path(argument)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_check.json"
    return REPO / "runs" / "gpu_check" / "gpu_check.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, the test suite)")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--out", default=None)
    parser.add_argument("--budget-s", type=int, default=450, help="wall time for all parts")
    parser.add_argument("--cpu-reference", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from nemo_loop.utils.distributed import init_distributed

    if args.cpu_reference:
        cpu_reference(args.cpu_reference)
        return 0
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {PARTS}")
    sizes = SMOKE if args.smoke else FULL
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --smoke on CPU")
    started = time.monotonic()
    init_distributed()
    report = {"check": "gpu_check", "smoke": args.smoke, **_environment(), "parts": {}}
    out = _output_path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in parts:
        print(f"[gpu_check] {name} ...", flush=True)
        report["parts"][name] = result = run_part(name, sizes, started + args.budget_s)
        print(f"[gpu_check] {name}: {'ok' if result['ok'] else result['error']} "
              f"({result['seconds']} s)", flush=True)
        out.write_text(json.dumps(report, indent=1))  # a later crash keeps the parts so far
    report["seconds"] = round(time.monotonic() - started, 1)
    out.write_text(json.dumps(report, indent=1))
    print(f"[gpu_check] {sum(r['ok'] for r in report['parts'].values())}/{len(parts)} parts ok "
          f"in {report['seconds']} s; {out}")
    print(json.dumps({k: v for k, v in report.items() if k != "parts"}
                     | {"parts": {k: {f: x for f, x in v.items() if f != "traceback"}
                                  for k, v in report["parts"].items()}}))
    return 0 if all(r["ok"] for r in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
