"""A tiny random Ouro checkpoint in the real HF file layout, for the conversion tests.

config.json with Ouro's fields, safetensors split into two shards with an index, and the real
Ouro-1.4B tokenizer files (skipped with a reason when the shared data is absent).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
OURO_TOKENIZER_DIR = REPO_ROOT.parent / "shared/data/tokenizer/ouro-1.4b"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

TINY_OURO_CONFIG = {
    "architectures": ["OuroForCausalLM"],
    "model_type": "ouro",
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 0,
    "head_dim": 16,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "layer_types": ["full_attention", "full_attention"],
    "max_position_embeddings": 256,
    "max_window_layers": 2,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "total_ut_steps": 4,
    "early_exit_threshold": 1.0,
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 49152,  # the real tokenizer's
}


def tokenizer_dir_or_skip() -> Path:
    if not (OURO_TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.skip(f"the Ouro tokenizer is not at {OURO_TOKENIZER_DIR}")
    return OURO_TOKENIZER_DIR


def random_ouro_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named random tensors; norms are 1 + noise so that swapping two norms is visible."""
    from nemo_loop.models.looplm.state_dict_adapter import (
        expected_ouro_shapes,
        ouro_config_to_model_config,
    )

    gen = torch.Generator().manual_seed(seed)
    shapes = expected_ouro_shapes(ouro_config_to_model_config(config))
    weights = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=gen)
        if name.endswith("norm.weight") or "layernorm" in name:
            weights[name] = 1.0 + 0.2 * noise
        elif name == "model.early_exit_gate.bias":
            weights[name] = noise
        else:
            weights[name] = 0.08 * noise
    return weights


def write_tiny_ouro_checkpoint(directory: Path, config: dict | None = None, seed: int = 0,
                               with_tokenizer: bool = True) -> tuple[dict, dict]:
    """Writes the checkpoint; returns (config, weights)."""
    from safetensors.torch import save_file

    config = dict(config or TINY_OURO_CONFIG)
    weights = random_ouro_weights(config, seed)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file_name, shard_names in shards.items():
        save_file({n: weights[n] for n in shard_names}, str(directory / file_name),
                  metadata={"format": "pt"})
        weight_map.update({n: file_name for n in shard_names})
    total = sum(t.numel() * t.element_size() for t in weights.values())
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if with_tokenizer:
        for name in TOKENIZER_FILES:
            shutil.copyfile(tokenizer_dir_or_skip() / name, directory / name)
    return config, weights
