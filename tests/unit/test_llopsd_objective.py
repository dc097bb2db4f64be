"""LLOPSD's ``loss.objective``: the sampled-token preset runs OPSD's sampled-token loss."""

import pytest
import torch

from nemo_loop.config import CONF_DIR, load_config

PRESET = CONF_DIR / "ablations" / "objective_sampled_token.yaml"


def _config(*overrides, path=PRESET):
    from nemo_loop.algorithms.llopsd import LLOPSDConfig

    return load_config(LLOPSDConfig, path, ["data.limit=4", *overrides])


def test_sampled_token_preset_reproduces_sampled_token_distillation_loss(
        megatron_single_process):
    from nemo_loop.algorithms.llopsd import distillation_loss
    from nemo_loop.losses import sampled_token_distillation_loss
    from nemo_loop.models.looplm.model import build_loop_model

    config = _config()
    assert config.loss.objective == "sampled_token"
    torch.manual_seed(0)
    student = build_loop_model(config.model.transformer_config())
    teacher = build_loop_model(config.model.transformer_config())  # another head (frozen mode)
    loops, seq, batch = config.rollout.student_loops, 5, 3
    mapping = config.loss.teacher_loop_for_each_student_loop(loops, config.model.num_loops)
    teacher_loops = sorted(set(mapping))
    vocab = config.model.vocab_size
    readouts = torch.randn(loops, seq, batch, config.model.hidden_size)
    micro_batch = {
        "teacher_readouts": torch.randn(len(teacher_loops), seq, batch, config.model.hidden_size),
        "token_ids": torch.randint(vocab, (seq, batch)),
        "loss_mask": torch.ones(batch, seq),  # batch-first, as train_step counts it
    }
    micro_batch["loss_mask"][1, 3:] = 0  # a shorter response
    micro_batch["token_ids"][3:, 1] = 0  # padding

    def run(compute):
        hidden = readouts.clone().requires_grad_()
        loss, metrics = compute(hidden)
        grads = torch.autograd.grad(loss, (hidden, student.output_weight()))
        return loss.detach(), metrics, grads

    got, got_metrics, got_grads = run(lambda hidden: distillation_loss(
        config.loss, student, hidden, micro_batch, teacher_loops, config.model.num_loops,
        teacher.output_weight()))
    with torch.no_grad():
        teacher_logits = teacher.logits(micro_batch["teacher_readouts"])
    expected, expected_metrics, expected_grads = run(
        lambda hidden: sampled_token_distillation_loss(
            student.logits(hidden), teacher_logits, micro_batch["token_ids"],
            micro_batch["loss_mask"].t(), config.loss, teacher_loop_ids=teacher_loops,
            num_teacher_loops=config.model.num_loops))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_metrics["divergence_per_loop"],
                               expected_metrics["divergence_per_loop"], rtol=1e-5, atol=1e-6)
    for got_grad, expected_grad in zip(got_grads, expected_grads):
        assert expected_grad.abs().amax() > 0
        torch.testing.assert_close(got_grad, expected_grad, rtol=1e-4, atol=1e-7)

    # The default objective is another loss on the same batch: the switch really selects.
    full = _config(path=CONF_DIR / "llopsd.yaml")
    assert full.loss.objective == "full"
    other, _, _ = run(lambda hidden: distillation_loss(
        full.loss, student, hidden, micro_batch, teacher_loops, config.model.num_loops,
        teacher.output_weight()))
    assert abs(other - got) > 1e-3


@pytest.mark.parametrize("override, message", [
    ("loss.objective=token", "unknown loss objective 'token'"),
    ("loss.top_k=8", "top_k does not apply to objective 'sampled_token'"),
])
def test_bad_objectives_are_named_at_load_time(override, message):
    with pytest.raises(ValueError, match=message):
        _config(override)
