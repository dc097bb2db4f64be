"""What ``checkpoint.verify=checksum`` costs: saving (a SHA-256 of every file into
``checkpoint.json``) and resuming (every file hashed again before the load) against the
default ``size`` check, on CPU, in one process.

Run: ``python benchmarks/checkpoint_checksum.py [--models tiny tiny_chat] [--repeats 5]``
(about a minute for the defaults). Models are ``conf/model/<name>.yaml``: ``tiny`` is the
pretraining default (~0.1 M parameters, a 1.6 MB checkpoint), ``tiny_chat`` the LLOPSD default
(the 49,152-token Ouro vocabulary: ~6.4 M parameters, ~100 MB) — the "mid" case; pass
``ouro_1p4b`` on a machine with the disk and memory for it.

Method: per model, one pretraining step (so the optimizer holds its Adam state), then saves
with and without checksums alternate (size, checksum, size, ...) into two checkpoint roots, and
so do resumes from them, which mode goes first alternating, so load from other processes hits
both alike; the medians are reported with their ratio (checksum / size). Saves fsync every
file, so on a busy disk their times are noisy: ``save_hash_ms``/``load_hash_ms`` (the time spent
hashing, median) and their share of a plain save/load are the added work measured directly;
``sha256_mb_per_s`` is the hashing rate. The JSON line is the last line printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nemo_loop import checkpoint_manifest, checkpointing  # noqa: E402
from nemo_loop.algorithms.common import build_optimizer, train_step, wrap_data_parallel  # noqa: E402
from nemo_loop.algorithms.pretrain import PretrainConfig, my_micro_batches  # noqa: E402
from nemo_loop.config import CONF_DIR, load_config  # noqa: E402
from nemo_loop.losses.ouro_pretrain import ouro_pretraining_loss  # noqa: E402
from nemo_loop.models.looplm.model import build_loop_model  # noqa: E402
from nemo_loop.tasks import build_task  # noqa: E402
from nemo_loop.utils.distributed import init_distributed, initialize_model_parallel  # noqa: E402


def trained_state(model_name: str):
    """DDP model, optimizer and scheduler of ``model_name`` after one pretraining step."""
    config = load_config(PretrainConfig, CONF_DIR / "pretrain.yaml", [
        f"model={model_name}", "trainer.micro_batch_size=8", "trainer.global_batch_size=8"])
    initialize_model_parallel(config.parallel, seed=1234)
    model = build_loop_model(config.model.transformer_config(1, 1, False))
    ddp = wrap_data_parallel(model, config.optim.use_distributed_optimizer)
    optimizer, scheduler = build_optimizer(ddp, config.optim)
    task = build_task(config.task)
    micro_batches = my_micro_batches(config, task, task.tokenizer(), step=1)

    def loss_func(batch, output):
        loss, metrics = ouro_pretraining_loss(output, batch["labels"], batch["loss_mask"], 0.05)
        return loss / len(micro_batches), metrics

    train_step(ddp, optimizer, scheduler, micro_batches, loss_func)
    return ddp, optimizer, scheduler


def measure(model_name: str, repeats: int, scratch: Path) -> dict:
    ddp, optimizer, scheduler = trained_state(model_name)
    roots = {"size": scratch / f"{model_name}-size", "checksum": scratch / f"{model_name}-sha"}
    seconds = {f"{what}_{mode}": [] for what in ("save", "load") for mode in roots}
    hashing = {"save": [], "load": []}  # seconds in SHA-256 per save / load
    hashed_bytes = []
    real_sha256 = checkpoint_manifest.sha256_of

    def timed_sha256(path):
        started = time.perf_counter()
        digest = real_sha256(path)
        hashing[phase][-1] += time.perf_counter() - started
        hashed_bytes.append(path.stat().st_size)
        return digest

    checkpoint_manifest.sha256_of = timed_sha256
    try:
        for step in range(1, repeats + 2):  # the first round warms up
            order = list(roots.items())[::1 if step % 2 else -1]  # alternate who goes first
            for mode, root in order:
                phase = "save"
                hashing[phase].append(0.0)
                started = time.perf_counter()
                checkpointing.save_checkpoint(root, step, ddp, optimizer, scheduler,
                                              keep_last=1, checksums=mode == "checksum")
                saved = time.perf_counter() - started
                phase = "load"
                hashing[phase].append(0.0)
                started = time.perf_counter()
                checkpointing.load_checkpoint(root, ddp, optimizer, scheduler, verify=mode)
                loaded = time.perf_counter() - started
                if step > 1:
                    seconds[f"save_{mode}"].append(saved)
                    seconds[f"load_{mode}"].append(loaded)
    finally:
        checkpoint_manifest.sha256_of = real_sha256
    newest = checkpointing.complete_checkpoints(roots["size"])[0][1]
    size = sum(p.stat().st_size for p in newest.rglob("*") if p.is_file())
    median = {key: statistics.median(values) for key, values in seconds.items()}
    hash_ms = {phase: 1e3 * statistics.median([s for s in values if s > 0])
               for phase, values in hashing.items()}
    for root in roots.values():
        shutil.rmtree(root)
    return {"checkpoint_mb": round(size / 1e6, 2),
            **{f"{key}_ms": round(value * 1e3, 1) for key, value in median.items()},
            "save_ratio": round(median["save_checksum"] / median["save_size"], 3),
            "load_ratio": round(median["load_checksum"] / median["load_size"], 3),
            # the added work itself, robust to the disk's noise: hashing time over a plain save
            "save_hash_ms": round(hash_ms["save"], 1), "load_hash_ms": round(hash_ms["load"], 1),
            "save_hash_share": round(hash_ms["save"] / 1e3 / median["save_size"], 3),
            "load_hash_share": round(hash_ms["load"] / 1e3 / median["load_size"], 3),
            "sha256_mb_per_s": round(sum(hashed_bytes) / 1e6 / (
                sum(hashing["save"]) + sum(hashing["load"])), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "tiny_chat"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    init_distributed()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            results[name] = measure(name, args.repeats, Path(scratch))
            print(f"{name}: {results[name]}", flush=True)
    print(json.dumps({"bench": "checkpoint_checksum", "repeats": args.repeats, **results}))


if __name__ == "__main__":
    main()
