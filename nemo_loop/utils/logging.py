"""Metrics to stdout, a JSONL file and (optionally) Weights & Biases, from one rank.

``metrics.jsonl`` is strict JSON, one record per line: a NaN or infinite value is written as
``null`` and its key listed in the record's ``nonfinite`` field (Python's ``json`` would write
bare ``NaN``/``Infinity`` tokens that other JSON readers reject).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "nemo-loop"
    name: str | None = None
    mode: str = "auto"  # auto (online when WANDB_API_KEY is set, else offline) | offline | online

    def validate(self) -> None:
        if self.mode not in ("auto", "offline", "online"):
            raise ValueError(f"wandb.mode must be auto, offline or online, got {self.mode!r}")

    def resolved_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def is_logging_rank() -> bool:
    """The rank holding final metrics: last pipeline stage, first TP and DP rank."""
    return (parallel_state.is_pipeline_last_stage()
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0)


METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id.txt"


def _records(output_dir: Path) -> list[tuple[str, int | None]]:
    """(line, step) of the metrics file; step None for a line a killed run left half-written."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append((line, int(json.loads(line)["step"])))
        except (ValueError, KeyError, TypeError):
            records.append((line, None))
    return records


def strict_json_record(step: int, metrics: dict) -> dict:
    """``{"step": step, **metrics}`` with every value JSON can hold (tensors and numpy scalars
    as floats or lists), NaN and infinities as None, and the keys that held one listed under
    ``nonfinite``."""
    nonfinite = []
    record = {"step": step}
    for key, value in metrics.items():
        record[key], finite = _strict_value(value)
        if not finite:
            nonfinite.append(key)
    if nonfinite:
        record["nonfinite"] = nonfinite
    return record


def _strict_value(value) -> tuple[object, bool]:
    """(value for strict JSON, whether every number in it was finite)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value, True
    if isinstance(value, dict):
        pairs = {key: _strict_value(item) for key, item in value.items()}
        return ({key: item for key, (item, _) in pairs.items()},
                all(finite for _, finite in pairs.values()))
    if hasattr(value, "tolist") and not isinstance(value, float):  # tensors, numpy values
        return _strict_value(value.tolist())
    if isinstance(value, (list, tuple)):
        items = [_strict_value(item) for item in value]
        return [item for item, _ in items], all(finite for _, finite in items)
    number = float(value)
    return (number, True) if math.isfinite(number) else (None, False)


def metrics_steps(output_dir: Path) -> list[int]:
    """The step of every record in ``output_dir``'s metrics file (empty: none)."""
    return [step for _, step in _records(output_dir) if step is not None]


def truncate_metrics(output_dir: Path, last_step: int) -> int:
    """Drop the records after ``last_step`` (logged by a run after its last checkpoint, and
    about to be logged again by the resumed run) and half-written lines; returns how many
    lines were dropped."""
    from nemo_loop.utils.storage import write_durably

    path = Path(output_dir) / METRICS_FILE
    lines = _records(output_dir)
    kept = [line for line, step in lines if step is not None and step <= last_step]
    if len(kept) != len(lines):
        write_durably(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


class MetricsLogger:
    def __init__(self, wandb_config: WandbConfig, run_config, output_dir: Path, formatter,
                 resume_step: int | None = None):
        """``resume_step``: None appends to the metrics file; a step (0: a fresh training run)
        first drops the records after it, and wandb continues the run id stored beside them."""
        self.active = is_logging_rank()
        self.formatter = formatter
        self.run = None
        if not self.active:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        from omegaconf import OmegaConf

        from nemo_loop.config import to_dict

        # The resolved run config beside its metrics: what produced them, re-runnable as --config.
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(to_dict(run_config)))
        if resume_step is not None:
            truncate_metrics(output_dir, resume_step)
        self.file = open(output_dir / METRICS_FILE, "a")
        if wandb_config.enabled:
            try:
                import wandb
            except ImportError as error:
                raise RuntimeError("wandb.enabled=true needs the wandb package "
                                   "(pip install wandb)") from error

            self.run = wandb.init(project=wandb_config.project, name=wandb_config.name,
                                  mode=wandb_config.resolved_mode(), dir=str(output_dir),
                                  config=to_dict(run_config),
                                  **_wandb_resume(output_dir, resume_step))

    def log(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        print(self.formatter(step, metrics), flush=True)
        self.file.write(json.dumps(strict_json_record(step, metrics), allow_nan=False) + "\n")
        self.file.flush()
        if self.run is not None:
            flat = {}
            for key, value in metrics.items():
                if isinstance(value, list):
                    flat.update({f"{key}/loop{r + 1}": v for r, v in enumerate(value)})
                else:
                    flat[key] = value
            self.run.log(flat, step=step)

    def close(self, barrier: bool = True) -> None:
        """``barrier=False`` on an error path, where other ranks may never get here."""
        if self.active and not self.file.closed:
            self.file.close()
            if self.run is not None:
                self.run.finish(exit_code=0 if barrier else 1)
        if barrier and torch.distributed.is_initialized():
            torch.distributed.barrier()


def _wandb_resume(output_dir: Path, resume_step: int | None) -> dict:
    """A resumed run continues the wandb run of its first start (its id is stored in the run
    directory); wandb ignores steps it already has, which a resumed run repeats exactly."""
    if resume_step is None:
        return {}
    import uuid

    id_file = output_dir / WANDB_ID_FILE
    if resume_step > 0 and id_file.is_file():
        return {"id": id_file.read_text().strip(), "resume": "allow"}
    run_id = uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    return {"id": run_id}
