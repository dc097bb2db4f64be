"""The train loop every algorithm shares, and the state it trains, saves and resumes
(torchtitan's Trainer/CheckpointManager split, over megatron-core dist checkpointing).

    run = TrainingRun(config, tokenizer, model_copies=1)   # storage checked, before the model
    state = MyState(config, build_trainable_model(config, run), run, sampler=...)
    run.resume(state)                                      # the newest checkpoint, if any
    history = run.train(state, my_step, format_step)       # my_step(state) advances state.step

:class:`TrainerState` is what is trained and checkpointed; an algorithm's state extends it with
its ``extra_modules`` (an EMA teacher) and ``state_dict`` entries. An algorithm's config
provides ``output_dir``, ``model``, ``wandb``, ``checkpoint`` (:class:`CheckpointConfig`) and a
``trainer`` section that extends :class:`CheckpointedTrainerConfig` with at least ``max_steps``
and ``log_interval`` (and ``eval_interval`` with a held-out hook).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from nemo_loop.algorithms.common import TrainableModel
from nemo_loop.checkpointing import (
    LATEST,
    VERIFY_MODES,
    complete_checkpoints,
    load_checkpoint,
    load_model_checkpoint,
    remove_stale_staging,
    resolve_checkpoint,
    save_checkpoint,
    save_model_checkpoint,
    tokenizer_identity,
)
from nemo_loop.data.prompts import PromptSampler
from nemo_loop.models.looplm.config import LoopModelConfig, dtype_bytes, parameter_count
from nemo_loop.utils.collective import run_collectively
from nemo_loop.utils.logging import (
    METRICS_FILE,
    WANDB_ID_FILE,
    MetricsLogger,
    is_logging_rank,
    metrics_steps,
)
from nemo_loop.utils.preemption import Preempted, PreemptionHandler
from nemo_loop.utils.run_lock import LOCK_FILE, hold_lock
from nemo_loop.utils.storage import (
    StorageError,
    check_free_space,
    ensure_writable_dir,
    human_bytes,
)

FINAL_MODEL_DIR = "model"
# Adam with fp32 master weights: main parameter, exp_avg and exp_avg_sq, 4 bytes each.
OPTIMIZER_BYTES_PER_PARAMETER = 12


@dataclass
class CheckpointConfig:
    # Complete checkpoints kept after each successful save (the newest ones); 0 keeps all.
    keep_last: int = 2
    # At startup, compare the free space under the checkpoint directory with what retention
    # will hold at once: keep_last + 1 checkpoints (0: every save still planned).
    check_free_space: bool = True
    # What resume and init_from check before loading: "size" (every file present with its
    # recorded size) or "checksum" (also each file's SHA-256, recorded at save: catches a
    # same-size corruption; costs a read of every file at save and load, see
    # benchmarks/checkpoint_checksum.py).
    verify: str = "size"

    def validate(self) -> None:
        if self.keep_last < 0:
            raise ValueError(f"checkpoint.keep_last must be >= 0 (0: keep all), got "
                             f"{self.keep_last}")
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"checkpoint.verify must be one of {VERIFY_MODES}, got "
                             f"{self.verify!r}")


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
    # A step whose loss or gradients are not finite is skipped (no update); this many skipped
    # in a row stop the run with an error naming the step and what was not finite.
    max_skipped_steps: int = 5

    def validate_checkpointing(self) -> None:
        if self.save_interval < 0:
            raise ValueError(f"trainer.save_interval must be >= 0, got {self.save_interval}")
        if self.max_skipped_steps < 1:
            raise ValueError(f"trainer.max_skipped_steps must be >= 1, got "
                             f"{self.max_skipped_steps}")
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


def _checkpoints(count: int, more: bool = False) -> str:
    return f"{count} {'more ' if more else ''}checkpoint" + ("s" if count != 1 else "")


@dataclass
class TrainerState:
    """What a run trains and checkpoints; an algorithm's state extends it (with
    ``@dataclass(kw_only=True)``) and overrides :meth:`extra_modules`, :meth:`state_dict` and
    :meth:`load_state_dict` for what it adds."""

    config: object
    trainable: TrainableModel
    run: TrainingRun
    sampler: PromptSampler | None = None  # None: the data is indexed by the step
    step: int = 0  # steps done

    model = property(lambda self: self.trainable.model)  # this rank's stage, unwrapped
    ddp_model = property(lambda self: self.trainable.ddp_model)
    optimizer = property(lambda self: self.trainable.optimizer)
    scheduler = property(lambda self: self.trainable.scheduler)

    def extra_modules(self) -> dict:
        """Modules checkpointed sharded beside the model (an EMA teacher, a reference)."""
        return {}

    def state_dict(self) -> dict:
        """The JSON trainer state a checkpoint holds beside the step and LR schedule."""
        return {} if self.sampler is None else {"data_position": self.sampler.state_dict()}

    def load_state_dict(self, saved: dict) -> None:
        self.step = saved["step"]
        if self.sampler is not None:
            self.sampler.load_state_dict(saved["data_position"])


class TrainingRun:
    def __init__(self, config, tokenizer=None, model_copies: int = 1):
        """Check the run's storage before the model is built (collective): the output and
        checkpoint directories exist and take a file, this process holds their run lock (a
        second run into them refuses, naming this one), leftovers of a killed save are
        removed, another run's outputs are not mixed with this one's, and the checkpoints
        retention keeps at once fit. From here on a pre-timeout or preemption signal
        (SIGUSR1/SIGTERM) is caught: one that arrives during setup requeues the job as soon as
        the train loop starts (see :meth:`loop`).

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
        self.preemption = PreemptionHandler()
        try:
            run_collectively(self._prepare_storage,
                             lambda error: getattr(error, "strerror", None) or str(error),
                             StorageError, rank_zero_only=True)
        except BaseException:
            self.preemption.close()
            raise

    # ----- before the model exists -----

    def _prepare_storage(self) -> None:
        for directory in (self.output_dir, self.root):
            ensure_writable_dir(directory)
        self._lock_directories()
        stale_outputs = tuple(name + ".tmp" for name in (FINAL_MODEL_DIR, METRICS_FILE))
        for stale in (remove_stale_staging(self.root)
                      + remove_stale_staging(self.output_dir, stale_outputs)):
            print(f"removed {stale}, left by a save that did not finish", flush=True)
        self._refuse_to_mix_runs()
        if self.config.checkpoint.check_free_space:
            count, why = self._checkpoints_held_at_once()
            check_free_space(self.root, count * self.checkpoint_bytes,
                             f"{why} of about {human_bytes(self.checkpoint_bytes)} each "
                             f"({parameter_count(self.config.model)} parameters: weights and "
                             f"Adam state)")

    def _lock_directories(self) -> None:
        """Before anything is read or removed: this process, and no other, writes here."""
        hold_lock(self.output_dir / LOCK_FILE, f"output directory {self.output_dir}")
        root, output = self.root.resolve(), self.output_dir.resolve()
        if root != output and output not in root.parents:
            hold_lock(self.root / LOCK_FILE, f"checkpoint directory {self.root}")

    def _checkpoints_held_at_once(self) -> tuple[int, str]:
        """How many more checkpoints the disk must take at the fullest moment, and why: a save
        is written before retention removes the oldest, so keep_last + 1 (less those already
        there); with keep_last=0 every save the run still plans (at the interval and the end;
        a preemption adds one)."""
        keep = self.config.checkpoint.keep_last
        existing = complete_checkpoints(self.root)
        if keep:
            count = keep + 1 - min(len(existing), keep)
            return count, (f"{_checkpoints(count, more=True)} (checkpoint.keep_last={keep}: "
                           f"{keep} kept and the next one, written before the oldest is "
                           f"removed; {len(existing)} already there)")
        latest = existing[0][0] if existing else 0
        interval, last = self.trainer.save_interval, self.trainer.max_steps
        count = max(1, sum(1 for step in range(latest + 1, last + 1)
                           if (interval and step % interval == 0) or step == last))
        return count, (f"{_checkpoints(count)} (checkpoint.keep_last=0 keeps every one: the "
                       f"saves planned after step {latest} up to trainer.max_steps={last})")

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
        load_model_checkpoint(model, resolved.directory, tokenizer=self.tokenizer,
                              verify=self.config.checkpoint.verify)
        if torch.distributed.get_rank() == 0:
            print(f"initial weights from {resolved.directory}", flush=True)

    def resume(self, state: TrainerState) -> None:
        """Restore the newest complete checkpoint into ``state`` (``trainer.resume``): the
        weights, optimizer and LR schedule, its extra modules and its ``state_dict``. Without
        one, the run starts at step 0."""
        if not self.trainer.resume:
            return
        try:
            saved = load_checkpoint(self.root, state.ddp_model, state.optimizer,
                                    state.scheduler, extra_modules=state.extra_modules(),
                                    model_config=self.config.model, tokenizer=self.tokenizer,
                                    verify=self.config.checkpoint.verify)
        except BaseException:
            # A refused checkpoint ends the run: give the signals back (in-process callers,
            # e.g. a test or a notebook, go on with their own handlers).
            self.preemption.close()
            raise
        if saved is None:
            return
        state.load_state_dict(saved)
        self.start_step, self.resumed_from = saved["step"], Path(saved["path"])
        if torch.distributed.get_rank() == 0:
            print(f"resumed from step {self.start_step} (checkpoint {self.resumed_from})",
                  flush=True)

    def save(self, state: TrainerState) -> Path:
        """The checkpoint of ``state.step`` (collective)."""
        return save_checkpoint(self.root, state.step, state.ddp_model, state.optimizer,
                               state.scheduler, state.extra_modules(), state.state_dict(),
                               model_config=self.config.model, tokenizer=self.tokenizer,
                               keep_last=self.config.checkpoint.keep_last,
                               checksums=self.config.checkpoint.verify == "checksum",
                               space_needed=self.checkpoint_bytes)

    def save_final_model(self, model) -> Path:
        """The model-only checkpoint at ``<output_dir>/model`` (init_from and evaluation)."""
        return save_model_checkpoint(model, self.output_dir / FINAL_MODEL_DIR,
                                     model_config=self.config.model, tokenizer=self.tokenizer,
                                     checksums=self.config.checkpoint.verify == "checksum")

    # ----- the loop -----

    def train(self, state: TrainerState, step: Callable[[TrainerState], dict], formatter,
              log_first_step: bool = False,
              heldout: Callable[[str], dict] | None = None) -> list[dict]:
        """``step(state)`` (which advances ``state.step``) until ``trainer.max_steps``. Logs the
        step's metrics every ``trainer.log_interval`` steps, at the end and (``log_first_step``)
        after step 1; ``heldout(split)`` scores validation every ``trainer.eval_interval``
        steps and validation and test after the last step, in the step's record (one record
        per step). Then :meth:`_Loop.end_of_step`: non-finite streaks, saves, preemption.
        Returns every step's metrics, then the final held-out scores."""
        history = []
        max_steps = self.trainer.max_steps
        with self._loop(formatter, state.step) as loop:
            while state.step < max_steps:
                metrics = step(state)
                metrics["step"] = state.step
                history.append(metrics)
                scores = self._heldout_scores(heldout, state.step)
                if state.step == max_steps and scores:
                    history.append(scores)
                if (state.step % self.trainer.log_interval == 0 or state.step == max_steps
                        or (log_first_step and state.step == 1)):
                    loop.log(state.step, {**metrics, **scores})
                elif scores:
                    loop.log(state.step, scores)
                loop.end_of_step(state.step, lambda: self.save(state), metrics)
        return history

    def _heldout_scores(self, heldout: Callable[[str], dict] | None, step: int) -> dict:
        if heldout is None:
            return {}
        if step == self.trainer.max_steps:
            return {**heldout("validation"), **heldout("test")}
        interval = self.trainer.eval_interval
        return heldout("validation") if interval and step % interval == 0 else {}

    @contextlib.contextmanager
    def _loop(self, formatter, start: int):
        """The logger (records after ``start``, the resumed step, dropped), the preemption
        handler and a progress bar; all closed on every way out. A pre-timeout or preemption signal that
        arrived during setup raises :class:`Preempted` here, before any step: the weights are
        still those of the checkpoint the run resumed from, so there is nothing to save, and
        the requeued job starts at once rather than after a step and a save it may not have
        time for."""
        try:
            if self.preemption.stop_requested():
                if torch.distributed.get_rank() == 0:
                    print(f"a pre-timeout or preemption signal arrived during setup: exiting "
                          f"for a requeue before step {start + 1}", flush=True)
                raise Preempted(start)
        except BaseException:
            self.preemption.close()
            raise
        logger = MetricsLogger(self.config.wandb, self.config, self.output_dir, formatter,
                               resume_step=start)
        progress = tqdm(total=self.trainer.max_steps, initial=start,
                        desc=self.output_dir.name, unit="step", leave=False,
                        # None: only on a terminal; log files get the step lines instead.
                        disable=None if is_logging_rank() else True)
        loop = _Loop(self, logger, self.preemption, progress)
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


class NonFiniteTrainingError(RuntimeError):
    """``trainer.max_skipped_steps`` steps in a row had a non-finite loss or gradients."""


class _Loop:
    def __init__(self, run: TrainingRun, logger: MetricsLogger, preemption: PreemptionHandler,
                 progress):
        self.run, self.logger, self.preemption, self.progress = run, logger, preemption, progress
        self.skipped_steps = 0  # steps skipped as non-finite, by this process
        self.streak: list[tuple[int, str]] = []  # (step, what was not finite), in a row
        self._counted_step: int | None = None

    def log(self, step: int, metrics: dict) -> None:
        if "update_skipped" in metrics:  # a train step's metrics (not held-out scores)
            self._count_update(step, metrics)
            metrics = {**metrics, "skipped_steps": self.skipped_steps}
        self.logger.log(step, metrics)

    def _count_update(self, step: int, metrics: dict) -> None:
        """Once per step (log and end_of_step both see it): the non-finite step counts. An
        fp16 loss-scale overflow (skipped by megatron's scaler, which then lowers the scale)
        neither counts nor ends a streak: the first steps of fp16 training are full of them."""
        if step == self._counted_step:
            return
        self._counted_step = step
        if not (metrics.get("nonfinite_loss") or metrics.get("nonfinite_grads")):
            if not metrics.get("update_skipped"):
                self.streak = []
            return
        self.skipped_steps += 1
        self.streak.append((step, "the loss" if metrics.get("nonfinite_loss")
                            else "the gradients"))

    def end_of_step(self, step: int, save, metrics: dict | None = None) -> None:
        """Call after every step (all ranks) with a ``save()`` closure and the step's metrics:
        stops the run once ``trainer.max_skipped_steps`` steps in a row were skipped as
        non-finite (:class:`NonFiniteTrainingError`, before any save); saves at
        ``trainer.save_interval``, at ``max_steps`` and when a pre-timeout/preemption signal
        arrived on any rank — then raises :class:`Preempted` (exit code 85: the batch script
        requeues the job)."""
        metrics = metrics or {}
        self.progress.update(1)
        if isinstance(metrics.get("loss"), float):
            self.progress.set_postfix(loss=f"{metrics['loss']:.4f}")
        trainer = self.run.trainer
        if "update_skipped" in metrics:
            self._count_update(step, metrics)
            if len(self.streak) >= trainer.max_skipped_steps:
                self._stop_non_finite(step)
        stop = step < trainer.max_steps and self.preemption.stop_requested()
        interval = trainer.save_interval
        if stop or (interval and step % interval == 0) or step == trainer.max_steps:
            save()
        if stop:
            raise Preempted(step)

    def _stop_non_finite(self, step: int) -> None:
        first_step, first = self.streak[0]
        checkpoints = complete_checkpoints(self.run.root)
        last = (f"the newest checkpoint is {checkpoints[0][1]} (step {checkpoints[0][0]})"
                if checkpoints else "no checkpoint was written")
        raise NonFiniteTrainingError(
            f"training stopped at step {step}: {len(self.streak)} steps in a row were skipped "
            f"(trainer.max_skipped_steps={self.run.trainer.max_skipped_steps}) because their "
            f"update was not finite; the first non-finite quantity was {first} at step "
            f"{first_step}. Skipped steps leave the weights as the last finite update made "
            f"them; {last}. Lower optim.lr (now {self.run.config.optim.lr:g}), raise "
            f"optim.warmup_steps or check the data of these steps")
