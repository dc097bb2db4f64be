"""A checkpoint's manifest, ``checkpoint.json``: what it records and how its files are checked.

Written last into the staging directory (its presence marks a complete checkpoint): kind,
step, tokenizer identity, the TP/PP/DP layout, every file's size and, with
``checkpoint.verify=checksum``, every file's SHA-256. Before a staging directory is published,
:func:`check_publishable` holds it against what a complete checkpoint must contain (the shards
its dist-checkpoint index refers to, at least as large as the index says, and for a training
checkpoint the trainer state and each rank's RNG file); before a load, :func:`verify_files`
holds the files against the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from nemo_loop.utils.collective import FAILURES

log = logging.getLogger(__name__)

INFO_FILE = "checkpoint.json"
MODEL_CONFIG_FILE = "model_config.yaml"
TRAINER_STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 1
# What loading checks of a checkpoint's files (CheckpointConfig.verify).
VERIFY_MODES = ("size", "checksum")
DIST_INDEX = ".metadata"  # torch.distributed.checkpoint's index of the shards


class CheckpointSaveError(RuntimeError):
    """A save failed; the message names the cause (e.g. no space left on the device)."""


class CheckpointLoadError(RuntimeError):
    """A checkpoint's files are missing, truncated or unreadable."""


def write_info(directory: Path, kind: str, step: int | None, tokenizer: dict | None,
               checksums: bool = False) -> dict:
    """The manifest, written last: its presence marks a complete checkpoint, and the file
    sizes it lists (and, with ``checksums``, their SHA-256) let a resume detect a missing,
    truncated or corrupted shard before loading. Returns it."""
    from megatron.core import parallel_state

    paths = [path for path in sorted(directory.rglob("*")) if path.is_file()]
    files = {path.relative_to(directory).as_posix(): path.stat().st_size for path in paths}
    layout = {"tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
              "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
              "data_parallel": parallel_state.get_data_parallel_world_size(),
              "world_size": torch.distributed.get_world_size()}
    info = {"format": FORMAT_VERSION, "kind": kind, "step": step,
            "model_config": MODEL_CONFIG_FILE, "tokenizer": tokenizer, "parallel": layout,
            "files": files}
    if checksums:
        info["sha256"] = {path.relative_to(directory).as_posix(): sha256_of(path)
                          for path in paths}
    (directory / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    return info


def sha256_of(path: Path) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def required_files(directory: Path, kind: str) -> dict[str, int]:
    """What a complete checkpoint of ``kind`` must hold, with each file's least size: the
    dist-checkpoint index, every shard file it refers to (up to its last byte), megatron's
    metadata.json and, for a training checkpoint, the trainer state and every rank's RNG
    file. Raises CheckpointSaveError when the index is missing or unreadable."""
    from torch.distributed.checkpoint import FileSystemReader

    if not (directory / DIST_INDEX).is_file():
        raise CheckpointSaveError(f"{directory} has no {DIST_INDEX} (the index of the model's "
                                  f"shards)")
    try:
        index = FileSystemReader(str(directory)).read_metadata()
    except FAILURES as error:
        raise CheckpointSaveError(f"{directory / DIST_INDEX} is unreadable: {error}") from error
    required = {DIST_INDEX: 1, "metadata.json": 1}
    for item in (index.storage_data or {}).values():
        end = item.offset + item.length
        required[item.relative_path] = max(required.get(item.relative_path, 0), end)
    if len(required) == 2:
        raise CheckpointSaveError(f"{directory / DIST_INDEX} refers to no shard file")
    if kind == "training":
        required[TRAINER_STATE_FILE] = 1
        for rank in range(torch.distributed.get_world_size()):
            required[f"rng/rank{rank:05d}.pt"] = 1
    return required


def check_publishable(staging: Path, info: dict, kind: str) -> None:
    """Before the rename: the manifest lists every file a complete checkpoint must hold
    (model shards included), and every file it lists is still there with its size — a
    staging directory that another process emptied or rewrote is never published."""
    listed = info["files"]
    missing = [f"{name} ({'missing' if name not in listed else f'{listed[name]} bytes'}, "
               f"needs at least {size})"
               for name, size in required_files(staging, kind).items()
               if listed.get(name, -1) < size]
    if missing:
        raise CheckpointSaveError(
            f"refusing to publish {staging}: it lacks {', '.join(missing)} — was it changed "
            f"by another process writing into the same directory?")
    try:
        verify_files(staging, info)
    except CheckpointLoadError as error:
        raise CheckpointSaveError(f"refusing to publish {staging}: {error}") from error


def read_info(directory: str | Path) -> dict:
    path = Path(directory) / INFO_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointLoadError(f"{path} is unreadable: {error}") from error


def verify_files(directory: Path, info: dict, verify: str = "size",
                 part: tuple[int, int] = (0, 1)) -> None:
    """Every file the manifest lists exists with its recorded size; with ``verify="checksum"``
    also its recorded SHA-256 (of the files ``part`` = (index, count) picks: the ranks of a
    collective check share the reading). A manifest written without checksums is checked by
    size, with a warning."""
    for name, size in info.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            raise CheckpointLoadError(f"{path} is missing")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointLoadError(f"{path} has {actual} bytes, {size} were written "
                                      f"(truncated or overwritten)")
    if verify != "checksum":
        return
    recorded = info.get("sha256")
    if recorded is None:
        if part[0] == 0:
            log.warning("checkpoint.verify=checksum, but %s was written without checksums "
                        "(checkpoint.verify=size): only file sizes are checked", directory)
        return
    index, count = part
    for name in sorted(recorded)[index::count]:
        if sha256_of(directory / name) != recorded[name]:
            raise CheckpointLoadError(f"{directory / name} does not match the SHA-256 "
                                      f"recorded when it was written (corrupted since)")
