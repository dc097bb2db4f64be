"""Metrics to stdout, a JSONL file and (optionally) Weights & Biases, from one rank."""

from __future__ import annotations

import json
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


class MetricsLogger:
    def __init__(self, wandb_config: WandbConfig, run_config, output_dir: Path, formatter):
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
        self.file = open(output_dir / "metrics.jsonl", "a")
        if wandb_config.enabled:
            try:
                import wandb
            except ImportError as error:
                raise RuntimeError("wandb.enabled=true needs the wandb package "
                                   "(pip install wandb)") from error

            self.run = wandb.init(project=wandb_config.project, name=wandb_config.name,
                                  mode=wandb_config.resolved_mode(), dir=str(output_dir),
                                  config=to_dict(run_config))

    def log(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        print(self.formatter(step, metrics), flush=True)
        self.file.write(json.dumps({"step": step, **metrics}, default=float) + "\n")
        self.file.flush()
        if self.run is not None:
            flat = {}
            for key, value in metrics.items():
                if isinstance(value, list):
                    flat.update({f"{key}/loop{r + 1}": v for r, v in enumerate(value)})
                else:
                    flat[key] = value
            self.run.log(flat, step=step)

    def close(self) -> None:
        if self.active:
            self.file.close()
            if self.run is not None:
                self.run.finish()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
