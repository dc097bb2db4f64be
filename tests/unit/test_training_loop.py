"""The one train loop (``TrainingRun.train``) every algorithm runs: which steps it logs, when its
held-out hook scores which split, what it returns and when it saves — with a stand-in step and
save, so no model is trained."""

import json

from nemo_loop.algorithms import pretrain
from nemo_loop.algorithms.training_run import TrainerState, TrainingRun
from nemo_loop.config import CONF_DIR, load_config


def _run(tmp_path, *overrides):
    config = load_config(pretrain.PretrainConfig, CONF_DIR / "pretrain.yaml", [
        f"output_dir={tmp_path}", "checkpoint.check_free_space=false", *overrides])
    return TrainingRun(config)


def _step(state):
    state.step += 1
    return {"loss": 1.0 / state.step, "update_skipped": False, "nonfinite_loss": False,
            "nonfinite_grads": False}


def _train(run, monkeypatch, capsys, heldout=None, log_first_step=True):
    saved, scored = [], []
    state = TrainerState(run.config, None, run)
    monkeypatch.setattr(run, "save", lambda state: saved.append(state.step))

    def score(split):
        scored.append((state.step, split))
        return {f"{split}_accuracy_per_loop": [0.5]}

    history = run.train(state, _step, lambda step, m: f"record {step}: {sorted(m)}",
                        log_first_step=log_first_step, heldout=score if heldout else None)
    records = [json.loads(line) for line in
               (run.output_dir / "metrics.jsonl").read_text().splitlines()]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("record")]
    return history, records, lines, saved, scored


def test_each_step_is_one_record_with_its_held_out_scores(megatron_single_process, tmp_path,
                                                          monkeypatch, capsys):
    run = _run(tmp_path, "trainer.max_steps=5", "trainer.log_interval=2",
               "trainer.eval_interval=2", "trainer.save_interval=0")
    history, records, lines, saved, scored = _train(run, monkeypatch, capsys, heldout=True)
    assert scored == [(2, "validation"), (4, "validation"), (5, "validation"), (5, "test")]
    assert [r["step"] for r in records] == [1, 2, 4, 5]  # step 1, the interval, the last: once
    assert len(lines) == 4
    assert "validation_accuracy_per_loop" in records[1] and "loss" in records[1]
    assert set(records[3]) >= {"loss", "validation_accuracy_per_loop", "test_accuracy_per_loop"}
    assert "test_accuracy_per_loop" not in records[2]
    # every step's metrics, with their step, then the final held-out scores
    assert [m.get("step") for m in history] == [1, 2, 3, 4, 5, None]
    assert history[-1] == {"validation_accuracy_per_loop": [0.5],
                           "test_accuracy_per_loop": [0.5]}
    assert saved == [5]
    run.preemption.close()


def test_held_out_scores_off_the_log_interval_are_a_record_of_their_own(
        megatron_single_process, tmp_path, monkeypatch, capsys):
    run = _run(tmp_path, "trainer.max_steps=4", "trainer.log_interval=4",
               "trainer.eval_interval=3", "trainer.save_interval=2")
    history, records, lines, saved, _ = _train(run, monkeypatch, capsys, heldout=True,
                                               log_first_step=False)
    assert [r["step"] for r in records] == [3, 4]
    assert "loss" not in records[0] and "validation_accuracy_per_loop" in records[0]
    assert len(history) == 5 and saved == [2, 4]
    run.preemption.close()


def test_without_a_held_out_hook_nothing_is_scored(megatron_single_process, tmp_path,
                                                   monkeypatch, capsys):
    run = _run(tmp_path, "trainer.max_steps=3", "trainer.log_interval=1",
               "trainer.eval_interval=1")
    history, records, lines, saved, scored = _train(run, monkeypatch, capsys)
    assert scored == [] and [r["step"] for r in records] == [1, 2, 3]
    assert [m["step"] for m in history] == [1, 2, 3] and saved == [3]
    run.preemption.close()


def test_a_resumed_state_continues_after_its_step(megatron_single_process, tmp_path,
                                                  monkeypatch, capsys):
    run = _run(tmp_path, "trainer.max_steps=3", "trainer.log_interval=1")
    state = TrainerState(run.config, None, run, step=2)
    monkeypatch.setattr(run, "save", lambda state: None)
    history = run.train(state, _step, lambda step, m: "")
    assert [m["step"] for m in history] == [3]
    state.load_state_dict({"step": 7})  # what resume restores: the step (no data position)
    assert state.step == 7 and state.state_dict() == {}
    run.preemption.close()
