"""Checkpoints with megatron-core's dist_checkpointing: one path for every algorithm.

A checkpoint root (``<output_dir>/checkpoints`` by default) holds::

    step_0000004/              one complete checkpoint, renamed into place once fully written
        checkpoint.json        written last: kind, step, tokenizer, parallel layout, file sizes
                               (and SHA-256s with checkpoint.verify=checksum)
        model_config.yaml      the model the weights belong to
        trainer_state.json     step, LR scheduler, data position, ...
        rng/rank00000.pt       each rank's RNG streams
        .metadata, *.distcp, common.pt, metadata.json    the sharded model and optimizer
    step_0000006.tmp/          a save in progress (one left by a killed run is removed at start)
    latest_checkpointed_step.txt

A model-only checkpoint (``<output_dir>/model``, converters) is the same without optimizer,
trainer state and RNG. Both load under any TP/PP/DP layout. Loading compares the stored model
config with the model it loads into: a field that changes what the weights compute is an error
naming it (:func:`nemo_loop.models.looplm.config.architecture_differences`).

Saves are synchronous and in-process (:func:`_in_process_writes`), every file and directory is
fsynced before the staging directory is renamed and before the ``latest`` marker moves, and a
failed save names its cause and removes its staging directory. Nothing is saved from weights
holding a NaN or infinity, and a staging directory is published only if every shard its
dist-checkpoint index (``.metadata``) refers to is there, as large as the index says, and every
file of its manifest has the recorded size. Resuming takes the newest complete checkpoint whose
files and load check out, falling back to older ones with a warning.

Loading the distributed optimizer needs three workarounds for megatron-core 0.19.2
(:mod:`nemo_loop.utils.optimizer_compat`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from nemo_loop.checkpoint_manifest import (  # noqa: F401 - the errors are part of this API
    INFO_FILE,
    MODEL_CONFIG_FILE,
    TRAINER_STATE_FILE,
    VERIFY_MODES,
    CheckpointLoadError,
    CheckpointSaveError,
    check_publishable,
    read_info,
    verify_files,
    write_info,
)
from nemo_loop.models.looplm.config import (
    LoopModelConfig,
    architecture_differences,
    model_config_of,
    read_model_config,
    write_model_config,
)
from nemo_loop.utils.collective import FAILURES, root_os_error, run_collectively
from nemo_loop.utils.optimizer_compat import (
    materialise_optimizer_state,
    restore_per_parameter_steps,
    tolerate_missing_adam_step,
)
from nemo_loop.utils.storage import (
    describe_os_error,
    fsync_tree,
    human_bytes,
    replace_durably,
    write_durably,
)

log = logging.getLogger(__name__)

LATEST = "latest_checkpointed_step.txt"
STAGING_SUFFIX = ".tmp"
_STEP_DIR = re.compile(r"step_(\d+)")
# Canonical per-parameter optimizer state: reshardable across TP, PP and DP.
_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointMismatchError(ValueError):
    """The checkpoint was written for another model or tokenizer than the one loading it."""


class NonFiniteCheckpointError(CheckpointSaveError):
    """The weights to save hold a NaN or infinity; nothing was written."""


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def _staging_dir(final: Path) -> Path:
    return final.with_name(final.name + STAGING_SUFFIX)


def tokenizer_identity(tokenizer, source: str) -> dict:
    """What the token ids mean: a hash of the token → id map (added tokens included), so the
    same vocabulary read from another path compares equal. ``tokenizer``: a
    ``tokenizers.Tokenizer``."""
    vocab = sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
    return {"source": str(source), "vocab_size": len(vocab), "vocab_sha256": digest}


# ----- describing failures -----


def _rank() -> int:
    return torch.distributed.get_rank()


def _failure_description(what: str, path: Path, space_needed: int | None = None):
    def describe(error: BaseException) -> str:
        cause = root_os_error(error)
        if cause is not None:
            reason = describe_os_error(cause, path)
            if space_needed and cause.errno in (errno.ENOSPC, errno.EDQUOT):
                reason += f"; a checkpoint needs about {human_bytes(space_needed)}"
        else:
            # torch's CheckpointException only says which ranks failed; say how they failed.
            failures = [f[0] if isinstance(f, tuple) else f
                        for f in getattr(error, "failures", {}).values()]
            reason = "; ".join(f"{type(e).__name__}: {e}" for e in failures or [error])
        return f"rank {_rank()}: {what} {path} failed: {reason}"
    return describe


@contextlib.contextmanager
def _in_process_writes():
    """megatron's shard writer returns its results through a ``multiprocessing`` Manager queue
    whose server process (~450 MB, ~5 s to start at the first save) outlives a killed run, and
    it turns the writer's exception into a message that drops the cause ("Worker failure").
    Saves here are synchronous, so a plain queue carries the results, and the writer's own
    exceptions are kept: the first one becomes the failure's cause."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    writer = filesystem_async.FileSystemWriterAsync
    original_queue = filesystem_async.get_write_results_queue
    original_write = writer.__dict__["write_preloaded_data"]
    writer_errors: list[BaseException] = []

    def write_keeping_errors(*args, **kwargs):
        output = original_write.__func__(*args, **kwargs)
        if isinstance(output, tuple) and isinstance(output[1], BaseException):
            writer_errors.append(output[1])
        return output

    filesystem_async.get_write_results_queue = lambda *args, **kwargs: queue.Queue()
    writer.write_preloaded_data = staticmethod(write_keeping_errors)
    try:
        yield
    except FAILURES as error:
        if writer_errors and root_os_error(error) is None:
            raise error from writer_errors[0]
        raise
    finally:
        filesystem_async.get_write_results_queue = original_queue
        writer.write_preloaded_data = original_write


# ----- writing -----


def _write_staged(final: Path, write_shards, kind: str, step: int | None, model_config,
                  tokenizer: dict | None, rank_zero_files: dict[str, str],
                  checksums: bool = False, space_needed: int | None = None) -> Path:
    """Write into ``<final>.tmp`` (collective), then on rank 0: the small files, the model
    config, the manifest, fsync of the whole tree, the completeness check and the rename onto
    ``final``. A failure removes the staging directory (once every rank stopped writing) and
    names its cause, with ``space_needed`` when the disk was full."""
    staging = _staging_dir(final)
    describe = _failure_description(f"saving the {kind} checkpoint", final, space_needed)

    def fresh_staging():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)

    def commit():
        for name, text in rank_zero_files.items():
            (staging / name).write_text(text)
        write_model_config(model_config, staging / MODEL_CONFIG_FILE)
        info = write_info(staging, kind, step, tokenizer, checksums)
        fsync_tree(staging)
        check_publishable(staging, info, kind)
        if final.exists():
            shutil.rmtree(final)
        replace_durably(staging, final)

    run_collectively(fresh_staging, describe, CheckpointSaveError, rank_zero_only=True)
    try:
        run_collectively(lambda: write_shards(staging), describe, CheckpointSaveError)
        run_collectively(commit, describe, CheckpointSaveError, rank_zero_only=True)
    except CheckpointSaveError:
        # every rank is here (run_collectively agreed on the failure): nothing writes anymore
        if _rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _check_finite(modules: dict[str, torch.nn.Module], final: Path) -> None:
    """Collective: no rank's shard of the weights to save holds a NaN or infinity."""
    def check() -> None:
        for prefix, module in modules.items():
            for name, param in module.named_parameters():
                if not torch.isfinite(param).all():
                    kind = "NaN" if torch.isnan(param).any() else "infinite"
                    raise NonFiniteCheckpointError(f"{prefix}{name} holds {kind} values")

    run_collectively(check, lambda error: f"rank {_rank()}: refusing to save {final}: {error} "
                                          f"(the previous checkpoints are kept)",
                     NonFiniteCheckpointError)


def _sharded_state(ddp_model, optimizer, extra_modules, for_load: bool):
    model_state = ddp_model.module.sharded_state_dict()
    state = {"model": model_state,
             "optimizer": optimizer.sharded_state_dict(model_state, is_loading=for_load,
                                                       metadata=_OPTIMIZER_FORMAT)}
    for name, module in (extra_modules or {}).items():
        state[name] = module.sharded_state_dict(prefix=f"{name}.")
    return state


def save_checkpoint(root: str | Path, step: int, ddp_model, optimizer, scheduler,
                    extra_modules: dict | None = None, trainer_state: dict | None = None, *,
                    model_config: LoopModelConfig | None = None, tokenizer: dict | None = None,
                    keep_last: int = 0, checksums: bool = False,
                    space_needed: int | None = None) -> Path:
    """Write ``root/step_N`` atomically (collective), mark it latest, then keep only the
    newest ``keep_last`` complete checkpoints (0: all). Weights holding a NaN or infinity are
    never saved (:class:`NonFiniteCheckpointError`, before anything is written), so every
    checkpoint retention keeps is finite. ``checksums``: record each file's SHA-256 in the
    manifest; ``space_needed``: the size the error of a full disk states.

    ``extra_modules`` (e.g. an EMA teacher) are saved sharded beside the model;
    ``trainer_state`` (JSON) holds the data position and anything else to resume.
    ``model_config`` defaults to the one the model was built from; ``tokenizer`` is a
    :func:`tokenizer_identity`. A crash mid-save leaves the earlier checkpoints untouched.
    """
    root = Path(root)
    _check_finite({"": ddp_model.module, **{f"{name}.": module for name, module
                                            in (extra_modules or {}).items()}},
                  _step_dir(root, step))
    state = {**(trainer_state or {}), "step": step, "scheduler": scheduler.state_dict()}

    def write_shards(staging: Path) -> None:
        with _in_process_writes():
            dist_checkpointing.save(
                _sharded_state(ddp_model, optimizer, extra_modules, for_load=False),
                str(staging))
        _save_rng_states(staging)

    final = _write_staged(_step_dir(root, step), write_shards, "training", step,
                          model_config or model_config_of(ddp_model.module.config), tokenizer,
                          {TRAINER_STATE_FILE: json.dumps(state)}, checksums, space_needed)

    def mark_latest_and_prune():
        write_durably(root / LATEST, str(step))
        remove_old_checkpoints(root, keep_last, step)

    run_collectively(mark_latest_and_prune, _failure_description("marking", final),
                     CheckpointSaveError, rank_zero_only=True)
    return final


def save_model_checkpoint(model, path: str | Path, *, model_config: LoopModelConfig | None = None,
                          tokenizer: dict | None = None, checksums: bool = False) -> Path:
    """Save only the model's sharded weights to ``path``, atomically (collective); never from
    weights holding a NaN or infinity."""
    _check_finite({"": model}, Path(path))

    def write_shards(staging: Path) -> None:
        with _in_process_writes():
            dist_checkpointing.save({"model": model.sharded_state_dict()}, str(staging))

    return _write_staged(Path(path), write_shards, "model", None,
                         model_config or model_config_of(model.config), tokenizer, {},
                         checksums)


# ----- finding, checking and pruning -----


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.fullmatch(path.name)
        if match and (path / INFO_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def latest_step(root: str | Path) -> int | None:
    """The newest complete checkpoint's step (None: there is none)."""
    found = complete_checkpoints(root)
    return found[0][0] if found else None


def remove_stale_staging(directory: str | Path,
                         patterns: tuple[str, ...] = ("step_*" + STAGING_SUFFIX,
                                                      LATEST + STAGING_SUFFIX)) -> list[Path]:
    """Delete what a killed save left in ``directory``: staging directories and files."""
    directory = Path(directory)
    stale = sorted({path for pattern in patterns for path in directory.glob(pattern)})
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return stale


def remove_old_checkpoints(root: str | Path, keep_last: int, saved_step: int) -> list[Path]:
    """Keep the newest ``keep_last`` complete checkpoints up to ``saved_step`` (0: keep all).
    Newer ones are from a branch the run abandoned (it resumed from an older checkpoint)."""
    if keep_last <= 0:
        return []
    found = complete_checkpoints(root)
    keep = {path for step, path in found if step <= saved_step}
    keep = set(sorted(keep, reverse=True)[:keep_last])
    removed = [path for _, path in found if path not in keep]
    for path in removed:
        shutil.rmtree(path)
    return removed


def stored_model_config_file(directory: str | Path) -> tuple[Path | None, list[Path]]:
    """The model config a checkpoint directory was written with (its own file, or for a
    converter's ``<dir>/model`` the one beside it), and the paths looked at."""
    directory = Path(directory)
    tried = [directory / MODEL_CONFIG_FILE, directory.parent / MODEL_CONFIG_FILE]
    return next((path for path in tried if path.is_file()), None), tried


def check_compatible(directory: str | Path, model_config: LoopModelConfig,
                     tokenizer: dict | None = None) -> dict:
    """Raise :class:`CheckpointMismatchError` naming every field in which the checkpoint's
    model config (or tokenizer) differs from ``model_config`` in a way that changes what the
    weights compute; layout changes (TP/PP/DP) are fine. Returns the manifest ({} if none)."""
    directory = Path(directory)
    config_file, tried = stored_model_config_file(directory)
    if config_file is None:
        raise CheckpointMismatchError(
            f"checkpoint {directory} records no model config (looked for "
            f"{', '.join(map(str, tried))}); it cannot be checked against this run's model")
    differences = architecture_differences(read_model_config(config_file), model_config)
    if differences:
        listed = "; ".join(f"{name}: checkpoint {saved!r}, this run {wanted!r}"
                           for name, saved, wanted in differences)
        raise CheckpointMismatchError(
            f"checkpoint {directory} was written for a different model ({config_file}): "
            f"{listed}. These fields change what the weights compute; set them as the "
            f"checkpoint has them, or start from another checkpoint")
    info = read_info(directory) if (directory / INFO_FILE).is_file() else {}
    saved_tokenizer = info.get("tokenizer")
    if tokenizer and saved_tokenizer and \
            saved_tokenizer["vocab_sha256"] != tokenizer["vocab_sha256"]:
        raise CheckpointMismatchError(
            f"checkpoint {directory} was written with another tokenizer: "
            f"{saved_tokenizer['source']} ({saved_tokenizer['vocab_size']} tokens) vs this "
            f"run's {tokenizer['source']} ({tokenizer['vocab_size']} tokens); their token "
            f"ids mean different things")
    return info


def _describe_layout_change(directory: Path, info: dict) -> None:
    from megatron.core import parallel_state

    saved = info.get("parallel")
    now = {"tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
           "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
           "data_parallel": parallel_state.get_data_parallel_world_size()}
    if saved and any(saved.get(key) != value for key, value in now.items()) and _rank() == 0:
        before = " ".join(f"{k}={saved.get(k)}" for k in now)
        after = " ".join(f"{k}={v}" for k, v in now.items())
        print(f"checkpoint {directory} was written at {before}; resharding to {after}",
              flush=True)


# ----- loading -----


def load_checkpoint(root: str | Path, ddp_model, optimizer, scheduler, step: int | None = None,
                    extra_modules: dict | None = None, *,
                    model_config: LoopModelConfig | None = None,
                    tokenizer: dict | None = None, verify: str = "size") -> dict | None:
    """Restore the newest complete checkpoint under ``root`` (or the one of ``step``) and
    return its trainer state, with ``"path"`` added; None when ``root`` holds none.

    A checkpoint with a missing or truncated file (``verify="checksum"``: or a file whose
    SHA-256 differs from the recorded one), or one whose load fails, is skipped with a
    warning naming the problem, and the previous complete one is tried; if none loads, the
    error lists them all. A checkpoint of another model is an error, never skipped.
    """
    root = Path(root)
    model_config = model_config or model_config_of(ddp_model.module.config)
    if step is None:
        candidates = [path for _, path in complete_checkpoints(root)]
    else:
        candidates = [_step_dir(root, step)]
        if not (candidates[0] / INFO_FILE).is_file():
            raise FileNotFoundError(f"{candidates[0]} is not a complete checkpoint "
                                    f"(no {INFO_FILE})")
    problems = []
    for path in candidates:
        try:
            info = _load_checked(path, ddp_model, optimizer, scheduler, extra_modules,
                                 model_config, tokenizer, verify)
        except CheckpointLoadError as error:
            problems.append(str(error))
            if _rank() == 0:
                log.warning("checkpoint %s is unusable, falling back to the previous complete "
                            "checkpoint: %s", path, error)
            continue
        _describe_layout_change(path, info)
        return {**info["trainer_state"], "path": str(path)}
    if problems:
        raise CheckpointLoadError(f"no checkpoint under {root} loads: " + " | ".join(problems))
    return None


def _load_checked(path: Path, ddp_model, optimizer, scheduler, extra_modules, model_config,
                  tokenizer, verify: str = "size") -> dict:
    """Manifest, compatibility (an error, never a fallback), file sizes (and checksums), then
    the load; every step agreed on by all ranks. Returns the manifest with the trainer state
    added."""
    info = run_collectively(lambda: read_info(path), _failure_description("reading", path),
                            CheckpointLoadError)
    check_compatible(path, model_config, tokenizer)
    _verify_collectively(path, info, verify)
    trainer_state = run_collectively(
        lambda: _load_training_state(path, ddp_model, optimizer, scheduler, extra_modules),
        _failure_description("loading", path), CheckpointLoadError)
    return {**info, "trainer_state": trainer_state}


def _load_training_state(path: Path, ddp_model, optimizer, scheduler,
                         extra_modules: dict | None) -> dict:
    materialise_optimizer_state(optimizer)
    with torch.no_grad():  # the load writes into leaf tensors that require grad
        state = dist_checkpointing.load(
            _sharded_state(ddp_model, optimizer, extra_modules, for_load=True), str(path))
        ddp_model.module.load_state_dict(state["model"])
        for name, module in (extra_modules or {}).items():
            prefix = f"{name}."
            module.load_state_dict({key[len(prefix):]: value
                                    for key, value in state[name].items()})
        with tolerate_missing_adam_step(optimizer):
            optimizer.load_state_dict(state["optimizer"])
    restore_per_parameter_steps(optimizer)
    _load_rng_states(path)
    trainer_state = json.loads((path / TRAINER_STATE_FILE).read_text())
    scheduler.load_state_dict(trainer_state["scheduler"])
    return trainer_state


def _verify_collectively(path: Path, info: dict, verify: str) -> None:
    """:func:`verify_files` on every rank, the checksums split between the ranks."""
    part = ((_rank(), torch.distributed.get_world_size())
            if torch.distributed.is_initialized() else (0, 1))
    check = lambda: verify_files(path, info, verify, part)  # noqa: E731
    if torch.distributed.is_initialized():
        run_collectively(check, _failure_description("checking", path), CheckpointLoadError)
    else:
        check()


def load_model_checkpoint(model, path: str | Path, *, tokenizer: dict | None = None,
                          verify: str = "size") -> None:
    """Load the model part of a checkpoint (model-only or training) into ``model``, whatever
    TP/PP layout it was saved under, after checking that it was written for this model and
    that its files are whole (``verify``: "size" or "checksum", see :func:`verify_files`)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    info = check_compatible(path, model_config_of(model.config), tokenizer)
    _verify_collectively(path, info, verify)
    with torch.no_grad():
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
        model.load_state_dict(state["model"])


@dataclass
class ResolvedCheckpoint:
    directory: Path  # the directory holding the weights
    step: int | None
    model_config: LoopModelConfig
    config_file: Path


def resolve_checkpoint(path: str | Path, step: int | None = None) -> ResolvedCheckpoint:
    """Wherever ``path`` points inside a run — the run directory, its checkpoint root, one
    step directory, a model-only directory or a converter's output — the weights to load and
    the model config they were written with; otherwise an error naming what was looked at."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint path {path} is not a directory")
    tried = []
    for root in (path, path / "checkpoints"):
        if step is not None:
            candidates = [_step_dir(root, step)]
        else:
            candidates = [directory for _, directory in complete_checkpoints(root)][:1]
        tried.append(root / ("step_*/" + INFO_FILE if step is None else
                             f"step_{step:07d}/{INFO_FILE}"))
        if candidates and (candidates[0] / INFO_FILE).is_file():
            return _resolved(candidates[0])
    if step is not None:
        raise FileNotFoundError(f"no complete checkpoint of step {step} at "
                                f"{' or '.join(map(str, tried))}")
    for directory in (path, path / "model"):
        tried.append(directory / "metadata.json")
        if (directory / "metadata.json").is_file():
            return _resolved(directory)
    raise FileNotFoundError(f"no checkpoint at {path}; looked for "
                            f"{', '.join(map(str, tried))}")


def _resolved(directory: Path) -> ResolvedCheckpoint:
    config_file, tried = stored_model_config_file(directory)
    if config_file is None:
        raise FileNotFoundError(f"checkpoint {directory} records no model config; looked for "
                                f"{', '.join(map(str, tried))}")
    step = read_info(directory).get("step") if (directory / INFO_FILE).is_file() else None
    match = _STEP_DIR.fullmatch(directory.name)
    if step is None and match:
        step = int(match.group(1))
    return ResolvedCheckpoint(directory, step, read_model_config(config_file), config_file)


# ----- RNG streams -----


def _rng_file(directory: Path) -> Path:
    return directory / "rng" / f"rank{_rank():05d}.pt"


def _save_rng_states(directory: Path) -> None:
    """Per rank: the CPU generator and megatron's model-parallel tracker (dropout streams)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    path = _rng_file(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}, path)


def _load_rng_states(directory: Path) -> None:
    """Each rank restores the streams saved under its rank, if the checkpoint has them."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    path = _rng_file(directory)
    if not path.is_file():
        return
    states = torch.load(path, weights_only=False)
    torch.set_rng_state(states["cpu"])
    get_cuda_rng_tracker().set_states(states["tracker"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
