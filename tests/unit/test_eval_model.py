"""Per-loop entropies against a plain forward, and loading weights from a checkpoint directory."""

import pytest
import torch

from nemo_loop.evaluation.harness import loop_entropies
from nemo_loop.models.looplm.config import LoopModelConfig

TINY = LoopModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                       num_query_groups=2, vocab_size=64, max_sequence_length=64, num_loops=3,
                       init_std=0.2)


def _model(seed: int):
    from nemo_loop.models.looplm.model import build_loop_model

    torch.manual_seed(seed)
    return build_loop_model(TINY.transformer_config()).eval()


def test_loop_entropies_match_full_forward(megatron_single_process):
    model = _model(0)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 64, (n,), generator=gen).tolist() for n in (4, 9, 6)]
    continuations = [torch.randint(1, 64, (n,), generator=gen).tolist() for n in (5, 2, 0)]
    got = loop_entropies(model, prompts, continuations, num_loops=2, batch_size=2)
    assert got.shape == (3, 2)
    for row, (prompt, generated) in enumerate(zip(prompts, continuations)):
        if not generated:
            assert torch.isnan(got[row]).all()
            continue
        ids = torch.tensor([prompt + generated])
        with torch.no_grad():
            logits = model(ids, num_loops=2, logit_loops=[1, 2]).logits[:, :, 0].float()
        predicting = logits[:, len(prompt) - 1:len(prompt) - 1 + len(generated)]
        log_p = torch.log_softmax(predicting, -1)
        expected = -(log_p.exp() * log_p).sum(-1).mean(-1)
        torch.testing.assert_close(got[row], expected, rtol=1e-5, atol=1e-5)
    # Different loops give different distributions: the intermediate loop is really read out.
    assert not torch.allclose(got[0, 0], got[0, 1])


def test_model_weights_and_config_load_from_checkpoint_dir(megatron_single_process, tmp_path):
    from dataclasses import replace

    from omegaconf import OmegaConf

    from nemo_loop.checkpointing import save_model_checkpoint
    from nemo_loop.config import to_dict
    from nemo_loop.evaluation.model_loading import (
        build_eval_model,
        checkpoint_identity,
        locate_checkpoint,
        stored_model_config,
    )

    saved = _model(1)
    step_dir = tmp_path / "step_0000007"
    save_model_checkpoint(saved, step_dir, model_config=TINY)
    # A run config that describes another model of the same shapes is not what evaluation
    # believes: the config stored with the weights is.
    misleading = replace(TINY, num_loops=2, rope_theta=500.0)
    OmegaConf.save(OmegaConf.create({"model": to_dict(misleading)}), tmp_path / "config.yaml")

    location = locate_checkpoint(str(tmp_path), None)
    assert location.step == 7 and location.directory == step_dir
    config, source = stored_model_config(location)
    assert config == TINY and source == step_dir / "model_config.yaml"
    torch.manual_seed(99)  # a different init, overwritten by the checkpoint
    loaded = build_eval_model(config, location)
    for (name, expected), (_, actual) in zip(saved.state_dict().items(),
                                             loaded.state_dict().items()):
        if isinstance(expected, torch.Tensor):
            torch.testing.assert_close(actual, expected, msg=name)
    identity = checkpoint_identity(location, init_seed=0)
    assert identity["step"] == 7 and not identity["random_init"]
    assert len(identity["sha256_metadata"]) == 64
    assert checkpoint_identity(location, 0) == identity

    with pytest.raises(FileNotFoundError, match="step_0000003"):
        locate_checkpoint(str(tmp_path), 3)
