"""Hugging Face Ouro ⇄ this project's full state dict: names, shapes and the config, nothing else.

Pure mapping in the spirit of torchtitan's ``StateDictAdapter``: tensors in, tensors out, and
the HF ``config.json`` dict ⇄ :class:`LoopModelConfig`. No files, no safetensors, no
torch.distributed — reading and writing checkpoints and sharding to TP/PP live in
:mod:`nemo_loop.models.looplm.hf_ouro` and ``state_dict.load_full_state_dict``.

Tensor names follow HF Llama/Qwen2 with two extra norms per layer and an early-exit gate; the
megatron side is the full TP=1/PP=1 state dict of ``state_dict.py``:

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

The conversion is a pure re-layout (no arithmetic), so HF → megatron → HF is bit-exact.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from nemo_loop.models.looplm.config import LoopModelConfig

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


# ----------------------------------------------------------------------------- names and shapes


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
    check_tied_head(hf_state, model_config)
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


def check_tied_head(hf_state: Mapping[str, torch.Tensor], model_config: LoopModelConfig
                    ) -> None:
    """A tied checkpoint that still carries ``lm_head.weight`` must carry the embedding there."""
    if (model_config.tie_word_embeddings and "lm_head.weight" in hf_state
            and not torch.equal(hf_state["lm_head.weight"], hf_state["model.embed_tokens.weight"])):
        raise OuroFormatError("tie_word_embeddings is true but lm_head.weight differs from "
                                  "model.embed_tokens.weight")
