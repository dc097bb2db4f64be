"""Hugging Face Ouro checkpoint files ⇄ model-only dist checkpoints (at any TP/PP).

The Ouro format (``OuroForCausalLM``): ``config.json`` plus safetensors, either one
``model.safetensors`` or shards listed in ``model.safetensors.index.json``. This module reads and
writes those files and orchestrates import/export; the name/shape/config mapping itself is the
pure :mod:`nemo_loop.models.looplm.state_dict_adapter`, and sharding the full TP=1/PP=1 state
dict to TP/PP is ``state_dict.load_full_state_dict``'s job.

Special tokens: the published Ouro ``config.json`` says bos = eos = pad = 0 (``<|endoftext|>``),
but the chat template ends every turn with ``<|im_end|>`` (id 2 in the shipped tokenizer), so a
generator that stops on eos = 0 runs past the end of an assistant turn. ``ouro_special_tokens``
reads the real ids from ``tokenizer.json``; export writes them to ``generation_config.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from nemo_loop.models.looplm.config import (
    LoopModelConfig,
    read_model_config,
    write_model_config,
)
from nemo_loop.models.looplm.state_dict_adapter import (
    OuroFormatError,
    OuroToMegatron,
    check_ouro_weights,
    check_tied_head,
    megatron_to_ouro,
    model_config_to_ouro_config,
    ouro_config_to_model_config,
)

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ----------------------------------------------------------------------------- special tokens


@dataclass(frozen=True)
class OuroSpecialTokens:
    endoftext: int
    im_start: int
    im_end: int

    @property
    def chat_eos(self) -> int:
        """The id that ends an assistant turn under the ChatML template."""
        return self.im_end

    @property
    def eos_ids(self) -> list[int]:
        """Stop on either: ``<|im_end|>`` for chat, ``<|endoftext|>`` for plain text."""
        return [self.im_end, self.endoftext]

    def generation_config(self) -> dict:
        return {"bos_token_id": self.endoftext, "eos_token_id": self.eos_ids,
                "pad_token_id": self.endoftext}


def ouro_special_tokens(tokenizer_dir: str | Path, hf_config: dict | None = None
                        ) -> OuroSpecialTokens:
    """The real special-token ids from ``tokenizer.json``, warning where config.json differs."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {tokenizer_dir}")
    added = {token["content"]: token["id"]
             for token in json.loads(path.read_text())["added_tokens"]}
    missing = [t for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>") if t not in added]
    if missing:
        raise OuroFormatError(f"{path} lacks the special tokens {missing}")
    tokens = OuroSpecialTokens(endoftext=added["<|endoftext|>"], im_start=added["<|im_start|>"],
                               im_end=added["<|im_end|>"])
    if hf_config is not None and hf_config.get("eos_token_id") != tokens.chat_eos:
        logger.warning(
            "Ouro config.json has eos_token_id=%s, but ChatML turns end with <|im_end|>=%d; "
            "generation must stop on %s (written to generation_config.json on export)",
            hf_config.get("eos_token_id"), tokens.im_end, tokens.eos_ids)
    return tokens


# ----------------------------------------------------------------------------- safetensors files


class SafetensorsCheckpoint:
    """The tensors of an HF checkpoint directory, read lazily (only what is asked for)."""

    def __init__(self, hf_dir: str | Path):
        from safetensors import safe_open

        self.directory = Path(hf_dir)
        self._safe_open = safe_open
        self._handles: dict[str, object] = {}
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise OuroFormatError(f"{index} has no 'weight_map'")
            for shard in sorted(set(weight_map.values())):
                if not (self.directory / shard).is_file():
                    raise FileNotFoundError(f"shard {shard!r} listed in {index} is missing "
                                            f"from {self.directory}")
            return weight_map
        single = self.directory / SINGLE_FILE
        if not single.is_file():
            raise FileNotFoundError(f"{self.directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        return {name: SINGLE_FILE for name in self._open(SINGLE_FILE).keys()}

    def _open(self, file_name: str):
        if file_name not in self._handles:
            self._handles[file_name] = self._safe_open(str(self.directory / file_name),
                                                       framework="pt")
        return self._handles[file_name]

    def _file_of(self, name: str) -> str:
        file_name = self.weight_map[name]
        if name not in self._open(file_name).keys():
            raise OuroFormatError(f"tensor {name!r} is mapped to {file_name} by {INDEX_FILE} "
                                  f"but is not in that file")
        return file_name

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._file_of(name)).get_slice(name).get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        return self._open(self._file_of(name)).get_tensor(name)

    def names(self) -> list[str]:
        return sorted(self.weight_map)


def read_ouro_state_dict(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF checkpoint, by HF name."""
    checkpoint = SafetensorsCheckpoint(hf_dir)
    return {name: checkpoint.tensor(name) for name in checkpoint.names()}


def read_ouro_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {hf_dir}")
    return json.loads(path.read_text())


def write_ouro_checkpoint(hf_dir: str | Path, state_dict: Mapping[str, torch.Tensor],
                          hf_config: dict, tokenizer_dir: str | Path | None = None) -> None:
    """config.json + model.safetensors (+ tokenizer files and generation_config.json)."""
    from safetensors.torch import save_file

    hf_dir = Path(hf_dir)
    hf_dir.mkdir(parents=True, exist_ok=True)
    (hf_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    save_file({name: t.contiguous() for name, t in state_dict.items()},
              str(hf_dir / SINGLE_FILE), metadata={"format": "pt"})
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, hf_dir)
        if (Path(tokenizer_dir) / "tokenizer.json").is_file():
            tokens = ouro_special_tokens(tokenizer_dir)
            (hf_dir / "generation_config.json").write_text(
                json.dumps(tokens.generation_config(), indent=2) + "\n")


def copy_tokenizer_files(source: str | Path, destination: str | Path) -> list[str]:
    import shutil

    copied = []
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, Path(destination) / name)
            copied.append(name)
    return copied


def open_ouro_checkpoint(hf_dir: str | Path, params_dtype: str | None = None
                         ) -> tuple[dict, LoopModelConfig, OuroToMegatron]:
    """(HF config, LoopModelConfig, lazily converted full megatron state dict), validated."""
    hf_config = read_ouro_config(hf_dir)
    model_config = ouro_config_to_model_config(hf_config, params_dtype)
    checkpoint = SafetensorsCheckpoint(hf_dir)
    check_ouro_weights({name: checkpoint.shape(name) for name in checkpoint.names()},
                       model_config)
    if model_config.tie_word_embeddings and "lm_head.weight" in checkpoint.weight_map:
        check_tied_head({n: checkpoint.tensor(n) for n in
                         ("lm_head.weight", "model.embed_tokens.weight")}, model_config)
    return hf_config, model_config, OuroToMegatron(checkpoint.tensor, model_config)


# ----------------------------------------------------------------------------- import / export
#
# Checkpoint directory written by ``import_ouro`` and read by ``export_ouro``:
#   model/              megatron dist_checkpointing, model only (loads at any TP/PP)
#   model_config.yaml   the LoopModelConfig (usable as ``model=<dir>/model_config.yaml``)
#   hf_config.json      the imported config.json, so export preserves every field
#   tokenizer/          the tokenizer files of the HF directory

MODEL_SUBDIR = "model"
MODEL_CONFIG_FILE = "model_config.yaml"
HF_CONFIG_FILE = "hf_config.json"
TOKENIZER_SUBDIR = "tokenizer"


def build_model(model_config: LoopModelConfig, layout):
    """This rank's stage of the model under ``layout`` (re-initialises model parallelism)."""
    from nemo_loop.models.looplm.model import build_loop_model
    from nemo_loop.utils.distributed import initialize_model_parallel

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
    from nemo_loop.checkpointing import save_model_checkpoint, tokenizer_identity
    from nemo_loop.models.looplm.state_dict import load_full_state_dict

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
    from nemo_loop.checkpointing import load_model_checkpoint, resolve_checkpoint
    from nemo_loop.models.looplm.state_dict import gather_full_state_dict

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
