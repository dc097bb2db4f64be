"""Hugging Face Ouro ⇄ model-only dist checkpoints (at any TP/PP): the orchestration.

    import_ouro(hf_dir, out_dir, layout)                 # HF files → dist checkpoint
    export_ouro(ckpt_dir, out_dir, num_loops, layout)    # any project checkpoint → HF files

The Ouro files are :mod:`nemo_loop.models.looplm.hf_ouro`'s, the name/shape/config mapping is
:mod:`nemo_loop.models.looplm.state_dict_adapter`'s, (re)sharding is
:mod:`nemo_loop.models.looplm.state_dict`'s and the dist checkpoints are
:mod:`nemo_loop.checkpointing`'s; this module sits above all of them (recipes/convert_ouro.py).

Checkpoint directory written by ``import_ouro`` and read by ``export_ouro``:

* ``model/``: megatron dist_checkpointing, model only (loads at any TP/PP);
* ``model_config.yaml``: the LoopModelConfig (usable as ``model=<dir>/model_config.yaml``);
* ``hf_config.json``: the imported config.json, so export preserves every field;
* ``tokenizer/``: the tokenizer files of the HF directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from nemo_loop.checkpointing import (
    load_model_checkpoint,
    resolve_checkpoint,
    save_model_checkpoint,
    tokenizer_identity,
)
from nemo_loop.models.looplm.config import LoopModelConfig, read_model_config, write_model_config
from nemo_loop.models.looplm.hf_ouro import (
    copy_tokenizer_files,
    open_ouro_checkpoint,
    ouro_special_tokens,
    write_ouro_checkpoint,
)
from nemo_loop.models.looplm.model import build_loop_model
from nemo_loop.models.looplm.state_dict import gather_full_state_dict, load_full_state_dict
from nemo_loop.models.looplm.state_dict_adapter import megatron_to_ouro, model_config_to_ouro_config
from nemo_loop.utils.distributed import initialize_model_parallel

logger = logging.getLogger(__name__)

MODEL_SUBDIR = "model"
MODEL_CONFIG_FILE = "model_config.yaml"
HF_CONFIG_FILE = "hf_config.json"
TOKENIZER_SUBDIR = "tokenizer"


def build_model(model_config: LoopModelConfig, layout):
    """This rank's stage of the model under ``layout`` (re-initialises model parallelism)."""
    initialize_model_parallel(layout)
    model = build_loop_model(model_config.transformer_config(layout.tensor_parallel,
                                                             layout.pipeline_parallel))
    model.eval()
    return model


def import_ouro(hf_dir: str | Path, out_dir: str | Path, layout, params_dtype: str | None = None
                ) -> LoopModelConfig:
    """HF Ouro directory → model-only dist checkpoint under ``layout`` (collective).

    Every rank reads (in full, unsharded over TP) only the tensors of its own pipeline stage,
    then keeps its TP shard; see docs/ouro_conversion.md for the memory this needs.
    """
    hf_config, model_config, weights = open_ouro_checkpoint(hf_dir, params_dtype)
    model = build_model(model_config, layout)
    load_full_state_dict(model, weights)
    out_dir = Path(out_dir)
    if torch.distributed.get_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_model_config(model_config, out_dir / MODEL_CONFIG_FILE)
        (out_dir / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        tokenizer_dir = out_dir / TOKENIZER_SUBDIR
        tokenizer_dir.mkdir(exist_ok=True)
        if copy_tokenizer_files(hf_dir, tokenizer_dir):
            ouro_special_tokens(tokenizer_dir, hf_config)  # logs the eos fix
        else:
            logger.warning("no tokenizer files in %s; none copied", hf_dir)
    torch.distributed.barrier()
    tokenizer_file = out_dir / TOKENIZER_SUBDIR / "tokenizer.json"
    tokenizer = None
    if tokenizer_file.is_file():  # its identity goes into the checkpoint
        from tokenizers import Tokenizer

        tokenizer = tokenizer_identity(Tokenizer.from_file(str(tokenizer_file)), tokenizer_file)
    save_model_checkpoint(model, out_dir / MODEL_SUBDIR, model_config=model_config,
                          tokenizer=tokenizer)
    return model_config


def export_ouro(ckpt_dir: str | Path, out_dir: str | Path, num_loops: int | None, layout,
                model_config_path: str | Path | None = None) -> dict:
    """Model checkpoint → HF Ouro directory with ``total_ut_steps = num_loops`` (collective).

    ``ckpt_dir`` is an ``import_ouro`` directory or any project checkpoint (a run directory,
    its checkpoints, one step, a model-only directory): the model config is the one stored with
    the weights. ``model_config_path`` overrides it (it must describe the same model).
    """
    ckpt_dir = Path(ckpt_dir)
    resolved = resolve_checkpoint(ckpt_dir)
    weights_dir = resolved.directory
    model_config = (read_model_config(model_config_path) if model_config_path
                    else resolved.model_config)
    num_loops = model_config.num_loops if num_loops is None else num_loops
    if num_loops < 1:
        raise ValueError(f"num_loops must be >= 1, got {num_loops}")
    if num_loops > model_config.num_loops:
        logger.warning("exporting with %d loops, more than the %d the model was trained with",
                       num_loops, model_config.num_loops)
    model = build_model(model_config, layout)
    load_model_checkpoint(model, weights_dir)
    full = gather_full_state_dict(model)
    base = ckpt_dir / HF_CONFIG_FILE
    hf_config = model_config_to_ouro_config(
        model_config, num_loops, json.loads(base.read_text()) if base.is_file() else None)
    if torch.distributed.get_rank() == 0:
        tokenizer_dir = ckpt_dir / TOKENIZER_SUBDIR
        write_ouro_checkpoint(out_dir, megatron_to_ouro(full, model_config), hf_config,
                              tokenizer_dir if tokenizer_dir.is_dir() else None)
    torch.distributed.barrier()
    return hf_config
