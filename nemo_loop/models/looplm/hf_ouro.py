"""Hugging Face Ouro checkpoint files: reading, writing, special tokens.

The Ouro format (``OuroForCausalLM``): ``config.json`` plus safetensors, either one
``model.safetensors`` or shards listed in ``model.safetensors.index.json``. This module reads and
writes those files; the name/shape/config mapping itself is the pure
:mod:`nemo_loop.models.looplm.state_dict_adapter`, sharding the full TP=1/PP=1 state dict to
TP/PP is ``state_dict.load_full_state_dict``'s job, and the import/export orchestration (a model
under a layout, dist checkpoints) is :mod:`nemo_loop.conversion.ouro`'s.

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

from nemo_loop.models.looplm.config import LoopModelConfig
from nemo_loop.models.looplm.state_dict_adapter import (
    OuroFormatError,
    OuroToMegatron,
    check_ouro_weights,
    check_tied_head,
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
