"""Hugging Face Ouro checkpoints ⇄ LoopGPTModel.

The Ouro format (``OuroForCausalLM``): ``config.json`` plus safetensors, either one
``model.safetensors`` or shards listed in ``model.safetensors.index.json``. Tensor names follow
HF Llama/Qwen2 with two extra norms per layer and an early-exit gate:

    model.embed_tokens.weight                         → embedding.word_embeddings.weight
    model.layers.i.self_attn.{q,k,v}_proj.weight      → decoder.layers.i.self_attention.linear_qkv
    model.layers.i.self_attn.o_proj.weight            → ….self_attention.linear_proj.weight
    model.layers.i.mlp.{gate,up}_proj.weight          → ….mlp.linear_fc1.weight  (cat[gate, up])
    model.layers.i.mlp.down_proj.weight               → ….mlp.linear_fc2.weight
    model.layers.i.input_layernorm                    → ….input_layernorm
    model.layers.i.input_layernorm_2                  → ….post_self_attn_layernorm
    model.layers.i.post_attention_layernorm           → ….pre_mlp_layernorm
    model.layers.i.post_attention_layernorm_2         → ….post_mlp_layernorm
    model.norm.weight                                 → decoder.final_layernorm.weight
    model.early_exit_gate.{weight,bias}               → exit_gate.{weight,bias}
    lm_head.weight                                    → output_layer.weight (absent when tied)

The conversion is a pure re-layout (no arithmetic), so import → export is bit-exact. The
megatron side is the full TP=1/PP=1 state dict of ``state_dict.py``; sharding to TP/PP is
``load_full_state_dict``'s job.

Special tokens: the published Ouro ``config.json`` says bos = eos = pad = 0 (``<|endoftext|>``),
but the chat template ends every turn with ``<|im_end|>`` (id 2 in the shipped tokenizer), so a
generator that stops on eos = 0 runs past the end of an assistant turn. ``ouro_special_tokens``
reads the real ids from ``tokenizer.json``; export writes them to ``generation_config.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from nemo_loop.models.looplm.config import LoopModelConfig

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# HF per-layer norm → megatron per-layer norm (see the sandwich layer in layer_specs.py).
_NORMS = {
    "input_layernorm": "input_layernorm",
    "input_layernorm_2": "post_self_attn_layernorm",
    "post_attention_layernorm": "pre_mlp_layernorm",
    "post_attention_layernorm_2": "post_mlp_layernorm",
}
# Buffers some exporters write although they are recomputed at load time.
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)

_PARAM_DTYPES = ("float32", "bfloat16", "float16", "float64")


class OuroFormatError(ValueError):
    """An Ouro checkpoint this converter cannot (or must not) read."""


# ----------------------------------------------------------------------------- config


def ouro_config_to_model_config(hf_config: dict, params_dtype: str | None = None
                                ) -> LoopModelConfig:
    """LoopModelConfig of an Ouro ``config.json``; refuses features LoopGPTModel lacks."""
    _reject_unsupported(hf_config)
    hidden, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    checkpoint_dtype = hf_config.get("torch_dtype")
    dtype = params_dtype or (checkpoint_dtype if checkpoint_dtype in _PARAM_DTYPES else "float32")
    return LoopModelConfig(
        name=hf_config.get("_name_or_path") or "ouro",
        num_layers=hf_config["num_hidden_layers"],
        hidden_size=hidden,
        ffn_hidden_size=hf_config["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf_config.get("num_key_value_heads") or heads,
        vocab_size=hf_config["vocab_size"],
        max_sequence_length=hf_config["max_position_embeddings"],
        num_loops=hf_config.get("total_ut_steps", 4),
        rope_theta=float(hf_config.get("rope_theta", 10000.0)),
        layer_spec="sandwich",
        norm_epsilon=hf_config.get("rms_norm_eps", 1e-6),
        init_std=hf_config.get("initializer_range", 0.02),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        attention_dropout=float(hf_config.get("attention_dropout", 0.0)),
        params_dtype=dtype,
    )


def _reject_unsupported(hf_config: dict) -> None:
    problems = []
    model_type = hf_config.get("model_type")
    if model_type != "ouro":
        problems.append(f"model_type is {model_type!r}, expected 'ouro'")
    required = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "vocab_size", "max_position_embeddings")
    problems += [f"missing field {key!r}" for key in required if key not in hf_config]
    if problems:
        raise OuroFormatError("unsupported Ouro config: " + "; ".join(problems))
    if hf_config.get("rope_scaling") is not None:
        problems.append(f"rope_scaling={hf_config['rope_scaling']!r} (only plain RoPE, null)")
    if hf_config.get("use_sliding_window"):
        problems.append("use_sliding_window=true (only full causal attention)")
    layer_types = hf_config.get("layer_types") or []
    if any(kind != "full_attention" for kind in layer_types):
        problems.append(f"layer_types other than full_attention: {sorted(set(layer_types))}")
    if hf_config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf_config['hidden_act']!r} (only silu/SwiGLU)")
    if hf_config.get("attention_bias") or hf_config.get("mlp_bias"):
        problems.append("attention_bias / mlp_bias (the LoopLM has no linear biases)")
    head_dim = hf_config.get("head_dim")
    default_head_dim = hf_config["hidden_size"] // hf_config["num_attention_heads"]
    if head_dim is not None and head_dim != default_head_dim:
        # megatron's kv_channels would support it, but LoopModelConfig fixes hidden/heads.
        problems.append(f"head_dim={head_dim} != hidden_size/num_attention_heads "
                        f"= {default_head_dim}")
    if hf_config.get("total_ut_steps", 4) < 1:
        problems.append(f"total_ut_steps={hf_config['total_ut_steps']} (must be >= 1)")
    if problems:
        raise OuroFormatError("unsupported Ouro config: " + "; ".join(problems))


def model_config_to_ouro_config(model_config: LoopModelConfig, num_loops: int,
                                base: dict | None = None) -> dict:
    """An Ouro ``config.json``: ``base`` (the imported one) with the shapes and R̃ updated."""
    hf_config = dict(base) if base else _default_ouro_config()
    hf_config.update(
        num_hidden_layers=model_config.num_layers,
        hidden_size=model_config.hidden_size,
        intermediate_size=model_config.ffn_hidden_size,
        num_attention_heads=model_config.num_attention_heads,
        num_key_value_heads=model_config.num_query_groups or model_config.num_attention_heads,
        head_dim=model_config.hidden_size // model_config.num_attention_heads,
        vocab_size=model_config.vocab_size,
        rms_norm_eps=model_config.norm_epsilon,
        rope_theta=model_config.rope_theta,
        tie_word_embeddings=model_config.tie_word_embeddings,
        total_ut_steps=num_loops,
        torch_dtype=model_config.params_dtype,
    )
    if not base:
        hf_config["max_position_embeddings"] = model_config.max_sequence_length
        hf_config["layer_types"] = ["full_attention"] * model_config.num_layers
        hf_config["max_window_layers"] = model_config.num_layers
    return hf_config


def _default_ouro_config() -> dict:
    return {"architectures": ["OuroForCausalLM"], "model_type": "ouro", "hidden_act": "silu",
            "attention_dropout": 0.0, "initializer_range": 0.02, "rope_scaling": None,
            "sliding_window": None, "use_sliding_window": False, "use_cache": True,
            "early_exit_threshold": 1.0, "bos_token_id": 0, "eos_token_id": 0,
            "pad_token_id": 0}


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


# ----------------------------------------------------------------------------- name/shape map


def expected_ouro_shapes(model_config: LoopModelConfig) -> dict[str, tuple[int, ...]]:
    """The HF tensor names and shapes an Ouro checkpoint of this config must contain."""
    hidden, ffn = model_config.hidden_size, model_config.ffn_hidden_size
    heads = model_config.num_attention_heads
    groups = model_config.num_query_groups or heads
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (model_config.vocab_size, hidden),
              "model.norm.weight": (hidden,),
              "model.early_exit_gate.weight": (1, hidden),
              "model.early_exit_gate.bias": (1,)}
    if not model_config.tie_word_embeddings:
        shapes["lm_head.weight"] = (model_config.vocab_size, hidden)
    for i in range(model_config.num_layers):
        prefix = f"model.layers.{i}."
        shapes.update({
            prefix + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            prefix + "self_attn.k_proj.weight": (groups * head_dim, hidden),
            prefix + "self_attn.v_proj.weight": (groups * head_dim, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            prefix + "mlp.gate_proj.weight": (ffn, hidden),
            prefix + "mlp.up_proj.weight": (ffn, hidden),
            prefix + "mlp.down_proj.weight": (hidden, ffn),
        })
        shapes.update({prefix + f"{norm}.weight": (hidden,) for norm in _NORMS})
    return shapes


def check_ouro_weights(found: Mapping[str, tuple[int, ...]], model_config: LoopModelConfig
                       ) -> None:
    """Unknown, missing or mis-shaped tensors are errors that name the tensor."""
    expected = expected_ouro_shapes(model_config)
    present = {name: shape for name, shape in found.items()
               if not name.endswith(_IGNORED_HF_SUFFIXES)}
    if model_config.tie_word_embeddings:
        # Tied checkpoints may still carry the (identical) head; it is checked, then dropped.
        expected.setdefault("lm_head.weight", expected["model.embed_tokens.weight"])
    unknown = sorted(set(present) - set(expected))
    if unknown:
        raise OuroFormatError(f"unknown parameter name(s) in the Ouro checkpoint: {unknown[:5]}"
                              f"{' …' if len(unknown) > 5 else ''}")
    optional = {"lm_head.weight"} if model_config.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(present) - optional)
    if missing:
        raise OuroFormatError(f"missing parameter(s) in the Ouro checkpoint: {missing[:5]}"
                              f"{' …' if len(missing) > 5 else ''}")
    for name, shape in sorted(present.items()):
        if tuple(shape) != expected[name]:
            raise OuroFormatError(f"shape mismatch for {name}: the config implies "
                                  f"{expected[name]}, the checkpoint has {tuple(shape)}")


# ----------------------------------------------------------------------------- tensor re-layout


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int
             ) -> torch.Tensor:
    """megatron's grouped QKV rows: for each KV group g, [q heads of g; k_g; v_g]."""
    hidden = q.shape[1]
    q = q.reshape(num_query_groups, -1, hidden)
    k = k.reshape(num_query_groups, -1, hidden)
    v = v.reshape(num_query_groups, -1, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, num_query_groups: int, head_dim: int):
    hidden = qkv.shape[1]
    grouped = qkv.reshape(num_query_groups, -1, hidden)
    q_rows = grouped.shape[1] - 2 * head_dim
    q, k, v = torch.split(grouped, [q_rows, head_dim, head_dim], dim=1)
    return (q.reshape(-1, hidden).clone(), k.reshape(-1, hidden).clone(),
            v.reshape(-1, hidden).clone())


class OuroToMegatron(Mapping):
    """The full megatron state dict of an Ouro checkpoint, converted on access.

    Looking up only the parameters of one pipeline stage reads only that stage's tensors, so
    ``load_full_state_dict(model, OuroToMegatron(...))`` never holds the whole model in memory.
    """

    def __init__(self, read_tensor, model_config: LoopModelConfig):
        self._read = read_tensor
        self.config = model_config
        self._sources = _megatron_sources(model_config)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._sources:
            raise KeyError(name)
        kind, hf_names = self._sources[name]
        tensors = [self._read(hf_name) for hf_name in hf_names]
        if kind == "qkv":
            return fuse_qkv(*tensors, self.config.num_query_groups
                            or self.config.num_attention_heads)
        if kind == "fc1":
            return torch.cat(tensors, dim=0)
        return tensors[0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def _megatron_sources(model_config: LoopModelConfig) -> dict[str, tuple[str, list[str]]]:
    """megatron name → (how to combine, the HF names it is made of)."""
    sources = {"embedding.word_embeddings.weight": ("copy", ["model.embed_tokens.weight"]),
               "decoder.final_layernorm.weight": ("copy", ["model.norm.weight"]),
               "exit_gate.weight": ("copy", ["model.early_exit_gate.weight"]),
               "exit_gate.bias": ("copy", ["model.early_exit_gate.bias"])}
    if not model_config.tie_word_embeddings:
        sources["output_layer.weight"] = ("copy", ["lm_head.weight"])
    for i in range(model_config.num_layers):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        sources[mc + "self_attention.linear_qkv.weight"] = (
            "qkv", [hf + f"self_attn.{p}_proj.weight" for p in "qkv"])
        sources[mc + "self_attention.linear_proj.weight"] = (
            "copy", [hf + "self_attn.o_proj.weight"])
        sources[mc + "mlp.linear_fc1.weight"] = (
            "fc1", [hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"])
        sources[mc + "mlp.linear_fc2.weight"] = ("copy", [hf + "mlp.down_proj.weight"])
        for hf_norm, mc_norm in _NORMS.items():
            sources[mc + f"{mc_norm}.weight"] = ("copy", [hf + f"{hf_norm}.weight"])
    return sources


def ouro_to_megatron(hf_state: Mapping[str, torch.Tensor], model_config: LoopModelConfig
                     ) -> dict[str, torch.Tensor]:
    """Eager HF → full megatron state dict (validates names and shapes first)."""
    check_ouro_weights({n: tuple(t.shape) for n, t in hf_state.items()}, model_config)
    _check_tied_head(hf_state, model_config)
    converted = OuroToMegatron(hf_state.__getitem__, model_config)
    return {name: converted[name] for name in converted}


def megatron_to_ouro(full: Mapping[str, torch.Tensor], model_config: LoopModelConfig
                     ) -> dict[str, torch.Tensor]:
    """Full megatron state dict → HF Ouro tensors (the exact inverse of ``ouro_to_megatron``)."""
    groups = model_config.num_query_groups or model_config.num_attention_heads
    head_dim = model_config.hidden_size // model_config.num_attention_heads
    hf_state = {}
    for name, (kind, hf_names) in _megatron_sources(model_config).items():
        if name not in full:
            raise KeyError(f"megatron state dict has no tensor {name!r}")
        tensor = full[name]
        if kind == "qkv":
            parts = split_qkv(tensor, groups, head_dim)
        elif kind == "fc1":
            parts = tuple(t.clone() for t in torch.chunk(tensor, 2, dim=0))
        else:
            parts = (tensor.clone(),)
        hf_state.update(zip(hf_names, parts))
    unknown = sorted(set(full) - set(_megatron_sources(model_config)))
    if unknown:
        raise KeyError(f"megatron state dict has tensors with no Ouro name: {unknown[:5]}")
    return hf_state


def _check_tied_head(hf_state: Mapping[str, torch.Tensor], model_config: LoopModelConfig):
    if model_config.tie_word_embeddings and "lm_head.weight" in hf_state:
        if not torch.equal(hf_state["lm_head.weight"], hf_state["model.embed_tokens.weight"]):
            raise OuroFormatError("tie_word_embeddings is true but lm_head.weight differs from "
                                  "model.embed_tokens.weight")


def open_ouro_checkpoint(hf_dir: str | Path, params_dtype: str | None = None
                         ) -> tuple[dict, LoopModelConfig, OuroToMegatron]:
    """(HF config, LoopModelConfig, lazily converted full megatron state dict), validated."""
    hf_config = read_ouro_config(hf_dir)
    model_config = ouro_config_to_model_config(hf_config, params_dtype)
    checkpoint = SafetensorsCheckpoint(hf_dir)
    check_ouro_weights({name: checkpoint.shape(name) for name in checkpoint.names()},
                       model_config)
    if model_config.tie_word_embeddings and "lm_head.weight" in checkpoint.weight_map:
        _check_tied_head({n: checkpoint.tensor(n) for n in
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


def save_model_config(model_config: LoopModelConfig, path: str | Path) -> None:
    from omegaconf import OmegaConf

    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(model_config)))


def load_model_config(path: str | Path) -> LoopModelConfig:
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(LoopModelConfig), OmegaConf.load(path))
    return OmegaConf.to_object(merged)


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
    from nemo_loop.checkpointing import save_model_checkpoint
    from nemo_loop.models.looplm.state_dict import load_full_state_dict

    hf_config, model_config, weights = open_ouro_checkpoint(hf_dir, params_dtype)
    model = build_model(model_config, layout)
    load_full_state_dict(model, weights)
    out_dir = Path(out_dir)
    if torch.distributed.get_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_model_config(model_config, out_dir / MODEL_CONFIG_FILE)
        (out_dir / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        tokenizer_dir = out_dir / TOKENIZER_SUBDIR
        tokenizer_dir.mkdir(exist_ok=True)
        if copy_tokenizer_files(hf_dir, tokenizer_dir):
            ouro_special_tokens(tokenizer_dir, hf_config)  # logs the eos fix
        else:
            logger.warning("no tokenizer files in %s; none copied", hf_dir)
    save_model_checkpoint(model, out_dir / MODEL_SUBDIR)
    return model_config


def export_ouro(ckpt_dir: str | Path, out_dir: str | Path, num_loops: int | None, layout,
                model_config_path: str | Path | None = None) -> dict:
    """Model checkpoint → HF Ouro directory with ``total_ut_steps = num_loops`` (collective).

    ``ckpt_dir`` is an ``import_ouro`` directory, or any dist checkpoint holding a "model" entry
    (e.g. a training step directory) together with ``model_config_path``.
    """
    from nemo_loop.checkpointing import load_model_checkpoint
    from nemo_loop.models.looplm.state_dict import gather_full_state_dict

    ckpt_dir = Path(ckpt_dir)
    model_config = load_model_config(model_config_path or ckpt_dir / MODEL_CONFIG_FILE)
    num_loops = model_config.num_loops if num_loops is None else num_loops
    if num_loops < 1:
        raise ValueError(f"num_loops must be >= 1, got {num_loops}")
    if num_loops > model_config.num_loops:
        logger.warning("exporting with %d loops, more than the %d the model was trained with",
                       num_loops, model_config.num_loops)
    weights_dir = ckpt_dir / MODEL_SUBDIR if (ckpt_dir / MODEL_SUBDIR).is_dir() else ckpt_dir
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
