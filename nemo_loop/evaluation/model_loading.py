"""Build the model under evaluation: from a project checkpoint, or randomly initialised.

Checkpoints are those of ``nemo_loop.checkpointing`` (megatron dist_checkpointing directories
``<root>/step_NNNNNNN`` with a ``latest_checkpointed_step.txt`` marker in the root). Only the
model's sharded tensors are read, so a training checkpoint (model + optimizer) and a model-only
one load the same way, under any tensor-parallel layout. The model architecture comes from a
YAML stored next to the checkpoint (``model_config.yaml``/``model.yaml``, or a run
``config.yaml`` with a ``model:`` section) if there is one, else from the eval config's ``model``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from nemo_loop.models.looplm.config import LoopModelConfig

log = logging.getLogger(__name__)

MODEL_CONFIG_FILES = ("model_config.yaml", "model.yaml", "config.yaml")
# Small files that pin down a dist_checkpointing directory: hashing them identifies the
# checkpoint without reading gigabytes of shards.
IDENTITY_FILES = (".metadata", "metadata.json", "common.pt", "trainer_state.json")


@dataclass
class CheckpointLocation:
    directory: Path | None  # the step directory holding the shards; None: random init
    step: int | None


def locate_checkpoint(path: str | None, step: int | None) -> CheckpointLocation:
    if path is None:
        return CheckpointLocation(None, None)
    from nemo_loop.checkpointing import LATEST, latest_step

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist")
    if (root / LATEST).is_file() or step is not None:
        step = latest_step(root) if step is None else step
        directory = root / f"step_{step:07d}"
        if not directory.is_dir():
            raise FileNotFoundError(f"checkpoint step directory {directory} does not exist")
        return CheckpointLocation(directory, step)
    trainer_state = root / "trainer_state.json"
    if trainer_state.is_file():
        step = json.loads(trainer_state.read_text()).get("step")
    return CheckpointLocation(root, step)


def stored_model_config(location: CheckpointLocation) -> tuple[LoopModelConfig, Path] | None:
    """The model config saved with the checkpoint (step directory first, then its root)."""
    if location.directory is None:
        return None
    for folder in (location.directory, location.directory.parent):
        for name in MODEL_CONFIG_FILES:
            candidate = folder / name
            if not candidate.is_file():
                continue
            loaded = OmegaConf.load(candidate)
            section = loaded.get("model") if name == "config.yaml" else loaded
            if section is None or isinstance(section, str):
                continue
            merged = OmegaConf.merge(OmegaConf.structured(LoopModelConfig), section)
            return OmegaConf.to_object(merged), candidate
    return None


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
            "random_init": False, "sha256_metadata": digest.hexdigest(),
            "num_files": len(listing), "total_bytes": sum(size for _, size in listing)}


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
