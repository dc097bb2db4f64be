"""Ouro HF ⇄ megatron conversion: config mapping and tensor re-layout (``state_dict_adapter``),
file reading and errors (``hf_ouro``)."""

from __future__ import annotations

import json

import pytest
import torch

from nemo_loop.models.looplm import hf_ouro, state_dict_adapter
from nemo_loop.models.looplm.state_dict_adapter import OuroFormatError
from tests.ouro_checkpoint import (
    OURO_TOKENIZER_DIR,
    TINY_OURO_CONFIG,
    random_ouro_weights,
    tokenizer_dir_or_skip,
    write_tiny_ouro_checkpoint,
)


def test_real_ouro_1p4b_config_maps_to_the_model_yaml():
    path = OURO_TOKENIZER_DIR / "config.json"
    if not path.is_file():
        pytest.skip(f"no Ouro config at {path}")
    config = state_dict_adapter.ouro_config_to_model_config(json.loads(path.read_text()))
    assert (config.num_layers, config.hidden_size, config.ffn_hidden_size) == (24, 2048, 5632)
    assert (config.num_attention_heads, config.num_query_groups) == (16, 16)
    assert (config.vocab_size, config.num_loops, config.rope_theta) == (49152, 4, 1e6)
    assert config.layer_spec == "sandwich" and not config.tie_word_embeddings
    assert config.params_dtype == "bfloat16" and config.norm_epsilon == 1e-6
    config.validate(tensor_parallel=8, pipeline_parallel=4)


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"head_dim": 32}, "head_dim=32"),
    ({"model_type": "qwen2"}, "model_type is 'qwen2'"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding_attention"),
])
def test_unsupported_configs_are_refused_by_name(change, message):
    with pytest.raises(OuroFormatError, match=message):
        state_dict_adapter.ouro_config_to_model_config({**TINY_OURO_CONFIG, **change})


def test_fused_qkv_follows_megatron_group_layout():
    heads, groups, head_dim, hidden = 4, 2, 3, 5
    q = torch.arange(heads * head_dim).repeat_interleave(hidden).view(-1, hidden).float()
    k = 100 + torch.arange(groups * head_dim).repeat_interleave(hidden).view(-1, hidden).float()
    v = 200 + torch.arange(groups * head_dim).repeat_interleave(hidden).view(-1, hidden).float()
    qkv = state_dict_adapter.fuse_qkv(q, k, v, groups)
    rows = qkv[:, 0].tolist()
    # group 0: q heads 0,1 (rows 0..5), k head 0, v head 0; then group 1.
    assert rows[:12] == list(range(6)) + [100, 101, 102, 200, 201, 202]
    assert rows[12:] == list(range(6, 12)) + [103, 104, 105, 203, 204, 205]
    back = state_dict_adapter.split_qkv(qkv, groups, head_dim)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))


@pytest.mark.parametrize("tied", [False, True])
def test_hf_megatron_hf_round_trip_is_bit_exact(tied):
    config = {**TINY_OURO_CONFIG, "tie_word_embeddings": tied, "vocab_size": 96}
    model_config = state_dict_adapter.ouro_config_to_model_config(config)
    weights = random_ouro_weights(config, seed=3)
    full = state_dict_adapter.ouro_to_megatron(weights, model_config)
    assert ("output_layer.weight" in full) is not tied
    assert full["decoder.layers.1.mlp.linear_fc1.weight"].shape == (256, 64)
    assert full["decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((4 + 2 * 2) * 16, 64)
    assert torch.equal(full["decoder.layers.0.post_self_attn_layernorm.weight"],
                       weights["model.layers.0.input_layernorm_2.weight"])
    assert torch.equal(full["decoder.layers.0.pre_mlp_layernorm.weight"],
                       weights["model.layers.0.post_attention_layernorm.weight"])
    back = state_dict_adapter.megatron_to_ouro(full, model_config)
    assert set(back) == set(weights)
    assert all(torch.equal(back[name], weights[name]) for name in weights)


def test_reads_sharded_checkpoint_and_real_special_tokens(tmp_path, caplog):
    config, weights = write_tiny_ouro_checkpoint(tmp_path / "hf")
    hf_config, model_config, lazy = hf_ouro.open_ouro_checkpoint(tmp_path / "hf")
    assert hf_config == config and model_config.num_loops == 4
    eager = state_dict_adapter.ouro_to_megatron(weights, model_config)
    assert set(lazy) == set(eager)
    assert all(torch.equal(lazy[name], eager[name]) for name in eager)

    with caplog.at_level("WARNING"):
        tokens = hf_ouro.ouro_special_tokens(tokenizer_dir_or_skip(), hf_config)
    assert (tokens.endoftext, tokens.im_start, tokens.im_end) == (0, 1, 2)
    assert tokens.chat_eos == 2 and tokens.eos_ids == [2, 0]
    assert "<|im_end|>=2" in caplog.text
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir_or_skip() / "tokenizer.json"))
    assert tokenizer.token_to_id("<|im_end|>") == tokens.im_end
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids[0] == tokens.im_start


def _rewrite_shard(directory, mutate):
    """Apply ``mutate`` to the tensors of the shard holding model.layers.0.* tensors."""
    from safetensors.torch import load_file, save_file

    index = json.loads((directory / "model.safetensors.index.json").read_text())
    file_name = index["weight_map"]["model.layers.0.mlp.up_proj.weight"]
    tensors = load_file(str(directory / file_name))
    mutate(tensors, index["weight_map"], file_name)
    save_file(tensors, str(directory / file_name))
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def test_shape_mismatch_names_the_tensor(tmp_path):
    write_tiny_ouro_checkpoint(tmp_path, with_tokenizer=False)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(OuroFormatError, match=r"shape mismatch for model\.layers\.0\.mlp\."
                       r"down_proj\.weight: the config implies \(64, 96\), the checkpoint has "
                       r"\(64, 128\)"):
        hf_ouro.open_ouro_checkpoint(tmp_path)


def test_missing_shard_file_is_named(tmp_path):
    write_tiny_ouro_checkpoint(tmp_path, with_tokenizer=False)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard 'model-00002-of-00002\.safetensors' "
                       r"listed in .*model\.safetensors\.index\.json is missing"):
        hf_ouro.open_ouro_checkpoint(tmp_path)


def test_unknown_parameter_is_named(tmp_path):
    write_tiny_ouro_checkpoint(tmp_path, with_tokenizer=False)

    def add_unknown(tensors, weight_map, file_name):
        tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
        weight_map["model.layers.0.self_attn.q_norm.weight"] = file_name

    _rewrite_shard(tmp_path, add_unknown)
    with pytest.raises(OuroFormatError, match=r"unknown parameter name\(s\).*"
                       r"model\.layers\.0\.self_attn\.q_norm\.weight"):
        hf_ouro.open_ouro_checkpoint(tmp_path)


def test_missing_parameter_is_named(tmp_path):
    write_tiny_ouro_checkpoint(tmp_path, with_tokenizer=False)

    def drop(tensors, weight_map, file_name):
        del tensors["model.layers.0.mlp.up_proj.weight"]
        del weight_map["model.layers.0.mlp.up_proj.weight"]

    _rewrite_shard(tmp_path, drop)
    with pytest.raises(OuroFormatError, match=r"missing parameter\(s\).*"
                       r"model\.layers\.0\.mlp\.up_proj\.weight"):
        hf_ouro.open_ouro_checkpoint(tmp_path)


def test_single_file_checkpoint_is_read(tmp_path):
    from safetensors.torch import save_file

    weights = random_ouro_weights({**TINY_OURO_CONFIG, "vocab_size": 96}, seed=5)
    save_file(weights, str(tmp_path / "model.safetensors"))
    read = hf_ouro.read_ouro_state_dict(tmp_path)
    assert set(read) == set(weights) and all(torch.equal(read[n], weights[n]) for n in weights)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        hf_ouro.read_ouro_state_dict(tmp_path)


def test_reference_exit_distribution_matches_the_model():
    from nemo_loop.models.looplm.model import exit_distribution
    from nemo_loop.models.looplm.reference import exit_probabilities

    gates = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0)) * 3
    expected = exit_distribution(gates)
    assert torch.allclose(exit_probabilities(gates), expected, atol=1e-6)
    assert torch.allclose(expected.sum(0), torch.ones(3, 5), atol=1e-6)


def test_export_config_preserves_fields_and_sets_loops():
    model_config = state_dict_adapter.ouro_config_to_model_config(TINY_OURO_CONFIG)
    exported = state_dict_adapter.model_config_to_ouro_config(model_config, 2, TINY_OURO_CONFIG)
    assert exported == {**TINY_OURO_CONFIG, "total_ut_steps": 2}
    fresh = state_dict_adapter.model_config_to_ouro_config(model_config, 4)
    assert state_dict_adapter.ouro_config_to_model_config(fresh) == model_config


def test_the_adapter_is_pure_mapping():
    """Tensors and dicts in, tensors and dicts out: no files, safetensors or collectives."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(state_dict_adapter))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"__future__", "collections.abc", "torch",
                        "nemo_loop.models.looplm.config"}
    assert "open(" not in inspect.getsource(state_dict_adapter)
