"""LLOPSD end to end on the tiny LoopLM with the real Ouro tokenizer and MATH-train prompts."""


import pytest
import torch

from nemo_loop.algorithms.llopsd import LLOPSDConfig, train
from nemo_loop.config import CONF_DIR, load_config
from tests.resume import assert_exact_resume


def _config(tmp_path, *overrides):
    return load_config(LLOPSDConfig, CONF_DIR / "llopsd.yaml", [
        f"output_dir={tmp_path}", "rollout.max_new_tokens=6", "data.limit=8",
        "trainer.prompts_per_step=2", "trainer.micro_batch_size=1", *overrides])


@pytest.mark.resume
def test_resumed_run_repeats_the_uninterrupted_losses(megatron_single_process, tmp_path):
    common = ["teacher.mode=ema", "teacher.context.kind=sdpo", "rollout.samples_per_prompt=2",
              "trainer.save_interval=2"]
    straight = train(_config(tmp_path / "straight", "trainer.max_steps=4", *common))
    first = train(_config(tmp_path / "resumed", "trainer.max_steps=2", *common))
    second = train(_config(tmp_path / "resumed", "trainer.max_steps=4", *common))
    assert_exact_resume(straight, first, second, tmp_path / "resumed")

    # The issue-19 case: same tensor shapes, another model (8 heads in 4 groups, R = 3).
    import signal

    from nemo_loop.checkpointing import CheckpointMismatchError

    handlers = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    with pytest.raises(CheckpointMismatchError, match="num_attention_heads: checkpoint 4, this "
                       "run 8; num_query_groups: checkpoint 2, this run 4; num_loops"):
        train(_config(tmp_path / "resumed", "trainer.max_steps=6", *common,
                      "model.num_attention_heads=8", "model.num_query_groups=4",
                      "model.num_loops=3"))
    # the refused run gave the preemption signals back
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == handlers


def test_overfitting_pulls_student_loops_onto_the_teacher(megatron_single_process, tmp_path):
    history = train(_config(tmp_path, "trainer.max_steps=40", "data.limit=2",
                            "teacher.mode=frozen", "optim.lr=1e-2", "optim.min_lr=1e-2",
                            "optim.decay_style=constant", "trainer.resume=false"))
    start = torch.tensor(history[0]["divergence_per_loop"])
    end = torch.tensor(history[-1]["divergence_per_loop"])
    assert (end < start / 5).all(), (start, end)


def test_left_padding_does_not_change_response_logits(megatron_single_process):
    from nemo_loop.data.sequences import build_batch
    from nemo_loop.models.looplm.model import build_loop_model

    config = _config("unused").model
    torch.manual_seed(0)
    model = build_loop_model(config.transformer_config())
    prompt, other, response = [1, 50, 60, 70, 2], [1, 9, 2], [300, 301, 302]
    alone = build_batch([prompt], [response], pad_id=0)
    padded = build_batch([prompt, other + [5] * 0], [response, [4]], pad_id=0)
    short = build_batch([other, prompt], [[4], response], pad_id=0)  # prompt is the longest
    logits = {}
    for name, batch, row in (("alone", alone, 0), ("padded", padded, 0), ("short", short, 1)):
        output = model(batch.input_ids, batch.position_ids, batch.attention_mask)
        logits[name] = output.logits[:, batch.response_window, row]
    assert torch.allclose(logits["alone"], logits["padded"], atol=1e-5)
    other_alone = build_batch([other], [[4]], pad_id=0)
    out = model(other_alone.input_ids, other_alone.position_ids, other_alone.attention_mask)
    out_padded = model(short.input_ids, short.position_ids, short.attention_mask)
    window = slice(short.prompt_length - 1, short.prompt_length)
    assert torch.allclose(out.logits[:, other_alone.response_window, 0],
                          out_padded.logits[:, window, 0], atol=1e-5)


@pytest.mark.parametrize("override, message", [
    ("rollout.student_loops=5", "student_loops"),
    ("rollout.student_loops=0", "student_loops"),
    ("loss.mapping=explicit", "explicit"),
    ("loss.divergence=tv", "divergence"),
    ("teacher.mode=copy", "teacher.mode"),
    ("teacher.context.kind=hint", "context.kind"),
    ("parallel.pipeline_parallel=2", "pipeline_parallel"),
    ("data.path=/nonexistent.jsonl", "prompt set not found"),
    ("data.answer_format=xml", "answer_format"),
    ("task.math.prompt.template=html", "prompt.template"),
])
def test_bad_configs_name_the_problem(tmp_path, override, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        _config(tmp_path, override)


def test_tokenizer_must_match_the_vocab(megatron_single_process, tmp_path):
    config = _config(tmp_path, "model.vocab_size=64")
    with pytest.raises(ValueError, match="vocab_size"):
        train(config)


def test_prompts_must_split_over_data_parallel_ranks(tmp_path):
    config = _config(tmp_path, "trainer.prompts_per_step=3", "trainer.micro_batch_size=2")
    with pytest.raises(ValueError, match="prompts_per_step 3 is not divisible by data_parallel"):
        config.validate(world_size=2)
    # micro-batches of 2 and 1: the loss is normalized over the step, not per micro-batch
    config.validate(world_size=1)


def test_training_starts_from_init_from_weights(megatron_single_process, tmp_path):
    from megatron.core.utils import unwrap_model

    from nemo_loop.algorithms.llopsd import setup
    from nemo_loop.checkpointing import save_model_checkpoint
    from nemo_loop.models.looplm.model import build_loop_model
    from nemo_loop.models.looplm.state_dict import gather_full_state_dict

    config = _config(tmp_path / "run", "trainer.resume=false")
    source = build_loop_model(config.model.transformer_config())
    with torch.no_grad():
        for param in source.parameters():
            param.add_(torch.randn_like(param))
    save_model_checkpoint(source, tmp_path / "init")
    expected = gather_full_state_dict(source)
    state = setup(_config(tmp_path / "run", "trainer.resume=false",
                          f"trainer.init_from={tmp_path / 'init'}"))
    got = gather_full_state_dict(unwrap_model(state.ddp_model))
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    with pytest.raises(FileNotFoundError, match="init_from"):
        _config(tmp_path / "run", f"trainer.init_from={tmp_path / 'nothing'}")


def test_tied_embeddings_train_the_embedding_as_the_head(megatron_single_process, tmp_path):
    """With tie_word_embeddings the embedding is the head of generation, teacher and student.

    One LLOPSD step from weights W must equal one untied step from W with output_layer.weight
    set to the embedding: same loss, and the head's update of embedding rows that no input
    token looked up must equal the untied run's update of those output_layer rows (clipping
    and weight decay off, so Adam's first step is a per-element function of the gradient).
    """
    from megatron.core.utils import unwrap_model

    from nemo_loop.algorithms.llopsd import llopsd_step, setup
    from nemo_loop.checkpointing import save_model_checkpoint
    from nemo_loop.models.looplm.model import build_loop_model
    from nemo_loop.models.looplm.state_dict import (
        gather_full_state_dict,
        load_full_state_dict,
    )

    common = ["trainer.resume=false", "optim.clip_grad=0", "optim.weight_decay=0"]
    tie = "model.tie_word_embeddings=true"
    torch.manual_seed(0)
    tied = build_loop_model(_config(tmp_path, tie).model.transformer_config())
    initial = gather_full_state_dict(tied)
    embedding = "embedding.word_embeddings.weight"
    untied = build_loop_model(_config(tmp_path).model.transformer_config())
    load_full_state_dict(untied, {**initial, "output_layer.weight": initial[embedding]})
    save_model_checkpoint(tied, tmp_path / "init_tied")
    save_model_checkpoint(untied, tmp_path / "init_untied")

    runs = {}
    for name, overrides in (("tied", [tie]), ("untied", [])):
        state = setup(_config(tmp_path / name, *common, *overrides,
                              f"trainer.init_from={tmp_path / f'init_{name}'}"))
        metrics = llopsd_step(state)
        runs[name] = metrics["loss"], gather_full_state_dict(unwrap_model(state.ddp_model))
    (tied_loss, tied_after), (untied_loss, untied_after) = runs["tied"], runs["untied"]
    assert "output_layer.weight" not in tied_after
    assert abs(tied_loss - untied_loss) <= 1e-6 * abs(untied_loss), (tied_loss, untied_loss)
    # Rows the untied embedding did not move were never looked up: only the head reaches them.
    head_only = (untied_after[embedding] == initial[embedding]).all(1)
    assert head_only.sum() > head_only.numel() // 2
    tied_update = (tied_after[embedding] - initial[embedding])[head_only]
    head_update = (untied_after["output_layer.weight"] - initial[embedding])[head_only]
    assert tied_update.abs().amax() > 0
    torch.testing.assert_close(tied_update, head_update, rtol=0, atol=1e-7)
