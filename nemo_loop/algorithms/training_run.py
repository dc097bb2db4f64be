"""The train-loop plumbing every algorithm shares: output and checkpoint directories, initial
weights, resume, saving at an interval / at the end / on preemption, and the metrics logger.

    run = TrainingRun(config, tokenizer, model_copies=1)   # before the model is built
    ...build the model...
    run.load_initial_weights(model)                        # trainer.init_from, checked
    ...DDP and optimizer...
    trainer_state = run.resume(ddp_model, optimizer, scheduler, extra_modules)  # or None
    with run.loop(format_step, start_step) as loop:
        while step < max_steps:
            ...one step...
            loop.log(step, metrics)
            loop.end_of_step(step, save)  # saves at the interval, the end, on SIGUSR1/SIGTERM

An algorithm's config provides ``output_dir``, ``model``, ``wandb``, ``checkpoint``
(:class:`CheckpointConfig`) and a ``trainer`` section that extends
:class:`CheckpointedTrainerConfig` with at least ``max_steps``.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from nemo_loop.checkpointing import (
    LATEST,
    complete_checkpoints,
    load_checkpoint,
    load_model_checkpoint,
    remove_stale_staging,
    resolve_checkpoint,
    run_collectively,
    save_checkpoint,
    save_model_checkpoint,
    tokenizer_identity,
)
from nemo_loop.models.looplm.config import LoopModelConfig, dtype_bytes, parameter_count
from nemo_loop.utils.logging import (
    METRICS_FILE,
    WANDB_ID_FILE,
    MetricsLogger,
    is_logging_rank,
    metrics_steps,
)
from nemo_loop.utils.preemption import Preempted, PreemptionHandler
from nemo_loop.utils.storage import (
    StorageError,
    check_free_space,
    ensure_writable_dir,
)

FINAL_MODEL_DIR = "model"
# Adam with fp32 master weights: main parameter, exp_avg and exp_avg_sq, 4 bytes each.
OPTIMIZER_BYTES_PER_PARAMETER = 12


@dataclass
class CheckpointConfig:
    # Complete checkpoints kept after each successful save (the newest ones); 0 keeps all.
    keep_last: int = 2
    # At startup, compare the free space under the checkpoint directory with one checkpoint.
    check_free_space: bool = True

    def validate(self) -> None:
        if self.keep_last < 0:
            raise ValueError(f"checkpoint.keep_last must be >= 0 (0: keep all), got "
                             f"{self.keep_last}")


@dataclass
class CheckpointedTrainerConfig:
    """The ``trainer`` fields every algorithm's train loop reads."""

    save_interval: int = 0  # 0: only at the end (and on preemption)
    checkpoint_dir: str | None = None  # default: <output_dir>/checkpoints
    resume: bool = True  # continue from the newest complete checkpoint, if there is one
    # A run that does not resume (resume=false, or no checkpoint) into an output_dir holding
    # another run's metrics or checkpoints deletes them; without it such a run refuses to start.
    # A run that resumes ignores it, so a requeued job never starts over.
    overwrite: bool = False
    # Initial weights: a checkpoint written for the same model (a run directory, its
    # checkpoints, one step, a model-only `model/` folder or a converter's output), any layout.
    init_from: str | None = None
    # One device's peak FLOP/s (e.g. 989.4e12: an H100's dense bf16); with it every step logs
    # its MFU next to its model FLOPs and achieved FLOP/s (nemo_loop.algorithms.step_flops).
    peak_flops_per_s: float | None = None

    def validate_checkpointing(self) -> None:
        if self.save_interval < 0:
            raise ValueError(f"trainer.save_interval must be >= 0, got {self.save_interval}")
        if self.peak_flops_per_s is not None and not self.peak_flops_per_s > 0:
            raise ValueError(f"trainer.peak_flops_per_s must be > 0 or null, got "
                             f"{self.peak_flops_per_s}")


def validate_run_sections(config, check_paths: bool) -> None:
    """The sections every training run shares: optimizer, checkpointing and wandb, and (with
    ``check_paths``) that ``trainer.init_from`` resolves to a checkpoint."""
    config.optim.validate()
    config.checkpoint.validate()
    config.trainer.validate_checkpointing()
    config.wandb.validate()
    if check_paths and config.trainer.init_from:
        try:
            resolve_checkpoint(config.trainer.init_from)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"trainer.init_from: {error}") from None


def check_global_batch(name: str, size: int, micro_batch_size: int, data_parallel: int) -> None:
    """``trainer.<name>`` splits into full micro-batches on every data-parallel rank."""
    if size % (micro_batch_size * data_parallel):
        raise ValueError(f"trainer.{name} {size} is not divisible by micro_batch_size × "
                         f"data_parallel = {micro_batch_size} × {data_parallel}")


def checkpoint_root(config) -> Path:
    return Path(config.trainer.checkpoint_dir or Path(config.output_dir) / "checkpoints")


def estimated_checkpoint_bytes(model_config: LoopModelConfig, model_copies: int = 1) -> int:
    """One training checkpoint: ``model_copies`` sets of weights (the model, plus an EMA or
    frozen teacher) in their dtype, and the Adam state with fp32 master weights."""
    count = parameter_count(model_config)
    return count * (model_copies * dtype_bytes(model_config) + OPTIMIZER_BYTES_PER_PARAMETER)


class TrainingRun:
    def __init__(self, config, tokenizer=None, model_copies: int = 1):
        """Check the run's storage before the model is built (collective): the output and
        checkpoint directories exist and take a file, leftovers of a killed save are removed,
        another run's outputs are not mixed with this one's, and one checkpoint fits.

        ``tokenizer``: the run's ``ChatTokenizer`` (its identity goes into every checkpoint);
        ``model_copies``: weight sets per checkpoint (2 with an EMA or frozen teacher).
        """
        self.config = config
        self.trainer = config.trainer
        self.output_dir = Path(config.output_dir)
        self.root = checkpoint_root(config)
        self.tokenizer = (tokenizer_identity(tokenizer.tokenizer, tokenizer.source)
                          if tokenizer is not None else None)
        self.checkpoint_bytes = estimated_checkpoint_bytes(config.model, model_copies)
        self.start_step = 0
        self.resumed_from: Path | None = None
        run_collectively(self._prepare_storage,
                         lambda error: getattr(error, "strerror", None) or str(error),
                         StorageError, rank_zero_only=True)

    # ----- before the model exists -----

    def _prepare_storage(self) -> None:
        for directory in (self.output_dir, self.root):
            ensure_writable_dir(directory)
        stale_outputs = tuple(name + ".tmp" for name in (FINAL_MODEL_DIR, METRICS_FILE))
        for stale in (remove_stale_staging(self.root)
                      + remove_stale_staging(self.output_dir, stale_outputs)):
            print(f"removed {stale}, left by a save that did not finish", flush=True)
        self._refuse_to_mix_runs()
        if self.config.checkpoint.check_free_space:
            count = parameter_count(self.config.model)
            check_free_space(self.root, self.checkpoint_bytes,
                             f"one checkpoint ({count} parameters: weights and Adam state)")

    def _refuse_to_mix_runs(self) -> None:
        """A run that will not resume must not write into another run's metrics and
        checkpoints: it stops, unless ``trainer.overwrite`` says to delete them."""
        checkpoints = complete_checkpoints(self.root)
        if self.trainer.resume and checkpoints:
            return
        logged = metrics_steps(self.output_dir)
        if not logged and not checkpoints:
            return
        found = []
        if logged:
            found.append(f"{self.output_dir / METRICS_FILE} ({len(logged)} records, up to step "
                         f"{max(logged)})")
        if checkpoints:
            found.append(f"{len(checkpoints)} checkpoints in {self.root}")
        if not self.trainer.overwrite:
            why = ("trainer.resume=false" if self.trainer.resume is False
                   else "there is no checkpoint to resume from")
            raise FileExistsError(
                f"{self.output_dir} holds another run's outputs: {', '.join(found)}; {why}. "
                f"Set trainer.overwrite=true to delete them and start over, or choose another "
                f"output_dir")
        print(f"trainer.overwrite=true: deleting the earlier run's {', '.join(found)}",
              flush=True)
        for path in [self.output_dir / METRICS_FILE, self.output_dir / WANDB_ID_FILE,
                     self.root / LATEST, self.output_dir / FINAL_MODEL_DIR,
                     *(directory for _, directory in checkpoints)]:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    # ----- weights -----

    def load_initial_weights(self, model) -> None:
        """``trainer.init_from`` into ``model`` (before DDP and the optimizer copy the weights),
        after checking that the checkpoint was written for this model and tokenizer."""
        if not self.trainer.init_from:
            return
        resolved = resolve_checkpoint(self.trainer.init_from)
        load_model_checkpoint(model, resolved.directory, tokenizer=self.tokenizer)
        if torch.distributed.get_rank() == 0:
            print(f"initial weights from {resolved.directory}", flush=True)

    def resume(self, ddp_model, optimizer, scheduler, extra_modules: dict | None = None
               ) -> dict | None:
        """Restore the newest complete checkpoint (``trainer.resume``); its trainer state, or
        None for a fresh start."""
        if not self.trainer.resume:
            return None
        state = load_checkpoint(self.root, ddp_model, optimizer, scheduler,
                                extra_modules=extra_modules, model_config=self.config.model,
                                tokenizer=self.tokenizer)
        if state is None:
            return None
        self.start_step, self.resumed_from = state["step"], Path(state["path"])
        if torch.distributed.get_rank() == 0:
            print(f"resumed from step {self.start_step} (checkpoint {self.resumed_from})",
                  flush=True)
        return state

    def save(self, step: int, ddp_model, optimizer, scheduler,
             extra_modules: dict | None = None, trainer_state: dict | None = None) -> Path:
        return save_checkpoint(self.root, step, ddp_model, optimizer, scheduler, extra_modules,
                               trainer_state, model_config=self.config.model,
                               tokenizer=self.tokenizer,
                               keep_last=self.config.checkpoint.keep_last)

    def save_final_model(self, model) -> Path:
        """The model-only checkpoint at ``<output_dir>/model`` (init_from and evaluation)."""
        return save_model_checkpoint(model, self.output_dir / FINAL_MODEL_DIR,
                                     model_config=self.config.model, tokenizer=self.tokenizer)

    # ----- the loop -----

    def train(self, state, step, save, formatter, log_first_step: bool = False) -> list[dict]:
        """``step(state)`` until ``trainer.max_steps`` (``state.step`` counts them): metrics
        logged every ``trainer.log_interval`` steps and at the end (and after the first step
        with ``log_first_step``), ``save(state)`` at the interval, the end and on preemption.
        Returns every step's metrics."""
        history = []
        max_steps = self.trainer.max_steps
        with self.loop(formatter) as loop:
            while state.step < max_steps:
                metrics = step(state)
                history.append(metrics)
                if (state.step % self.trainer.log_interval == 0 or state.step == max_steps
                        or (log_first_step and state.step == 1)):
                    loop.log(state.step, metrics)
                loop.end_of_step(state.step, lambda: save(state), metrics.get("loss"))
        return history

    @contextlib.contextmanager
    def loop(self, formatter, start_step: int | None = None):
        """The logger (records after the resumed step dropped), the preemption handler and a
        progress bar; all closed on every way out."""
        start = self.start_step if start_step is None else start_step
        logger = MetricsLogger(self.config.wandb, self.config, self.output_dir, formatter,
                               resume_step=start)
        progress = tqdm(total=self.trainer.max_steps, initial=start,
                        desc=self.output_dir.name, unit="step", leave=False,
                        # None: only on a terminal; log files get the step lines instead.
                        disable=None if is_logging_rank() else True)
        loop = _Loop(self, logger, PreemptionHandler(), progress)
        orderly = False
        try:
            yield loop
            orderly = True
        except Preempted:
            orderly = True  # every rank saved and raises it at the same step
            raise
        finally:
            progress.close()
            loop.preemption.close()
            logger.close(barrier=orderly)


class _Loop:
    def __init__(self, run: TrainingRun, logger: MetricsLogger, preemption: PreemptionHandler,
                 progress):
        self.run, self.logger, self.preemption, self.progress = run, logger, preemption, progress

    def log(self, step: int, metrics: dict) -> None:
        self.logger.log(step, metrics)

    def end_of_step(self, step: int, save, loss: float | None = None) -> None:
        """Call after every step (all ranks) with a ``save()`` closure: saves at
        ``trainer.save_interval``, at ``max_steps`` and when a pre-timeout/preemption signal
        arrived on any rank — then raises :class:`Preempted` (exit code 85: the batch script
        requeues the job)."""
        self.progress.update(1)
        if loss is not None:
            self.progress.set_postfix(loss=f"{loss:.4f}")
        trainer = self.run.trainer
        stop = step < trainer.max_steps and self.preemption.stop_requested()
        interval = trainer.save_interval
        if stop or (interval and step % interval == 0) or step == trainer.max_steps:
            save()
        if stop:
            raise Preempted(step)

