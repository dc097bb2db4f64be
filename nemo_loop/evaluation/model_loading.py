"""Build the model under evaluation: from a project checkpoint, or randomly initialised.

``checkpoint`` may point anywhere inside a run: the run directory, its checkpoint root (the
newest complete step, or ``checkpoint_step``), one step directory, a model-only ``model/``
directory or a converter's output (:func:`nemo_loop.checkpointing.resolve_checkpoint`). The
architecture always comes from the model config stored with the checkpoint — never from the
eval config, which could describe a different model of the same shapes — and a checkpoint
without one is an error naming the paths looked at. Only the model's sharded tensors are read,
so training and model-only checkpoints load the same way, under any tensor-parallel layout.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from nemo_loop.models.looplm.config import LoopModelConfig

log = logging.getLogger(__name__)

# Small files that pin down a dist_checkpointing directory: hashing them identifies the
# checkpoint without reading gigabytes of shards.
IDENTITY_FILES = (".metadata", "metadata.json", "common.pt", "trainer_state.json",
                  "checkpoint.json", "model_config.yaml")


@dataclass
class CheckpointLocation:
    directory: Path | None  # the directory holding the weights; None: random init
    step: int | None
    model_config: LoopModelConfig | None = None  # as stored with the checkpoint
    config_file: Path | None = None


def locate_checkpoint(path: str | None, step: int | None) -> CheckpointLocation:
    if path is None:
        return CheckpointLocation(None, None)
    from nemo_loop.checkpointing import resolve_checkpoint

    resolved = resolve_checkpoint(path, step)
    return CheckpointLocation(resolved.directory, resolved.step, resolved.model_config,
                              resolved.config_file)


def stored_model_config(location: CheckpointLocation) -> tuple[LoopModelConfig, Path] | None:
    """The model config saved with the checkpoint and its file (None: random init)."""
    if location.directory is None:
        return None
    return location.model_config, location.config_file


def checkpoint_identity(location: CheckpointLocation, init_seed: int) -> dict:
    if location.directory is None:
        return {"path": None, "random_init": True, "init_seed": init_seed}
    digest = hashlib.sha256()
    listing = []
    for file in sorted(p for p in location.directory.rglob("*") if p.is_file()):
        relative = file.relative_to(location.directory).as_posix()
        listing.append((relative, file.stat().st_size))
        digest.update(f"{relative}\0{file.stat().st_size}\0".encode())
        if file.name in IDENTITY_FILES:
            digest.update(file.read_bytes())
    return {"path": str(location.directory.resolve()), "step": location.step,
            "model_config_file": str(location.config_file), "random_init": False,
            "sha256_metadata": digest.hexdigest(), "num_files": len(listing),
            "total_bytes": sum(size for _, size in listing)}


def build_eval_model(model_config: LoopModelConfig, location: CheckpointLocation,
                     tensor_parallel: int = 1) -> torch.nn.Module:
    from nemo_loop.models.looplm.model import build_loop_model

    model = build_loop_model(model_config.transformer_config(tensor_parallel))
    if location.directory is None:
        log.warning("checkpoint=null: evaluating a RANDOMLY INITIALISED model (pipeline smoke "
                    "test; accuracies are meaningless)")
    else:
        from nemo_loop.checkpointing import load_model_checkpoint

        load_model_checkpoint(model, location.directory)
        log.info("loaded model weights from %s (step %s)", location.directory, location.step)
    model.eval()
    return model
