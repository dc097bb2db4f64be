"""LoopRPT logs each step once: its last step's record holds the final held-out scores (it used to
log the last step twice, the step then the held-out scores), on the console and in
metrics.jsonl."""

import json
import re

from nemo_loop.config import CONF_DIR, load_config


def test_looprpt_logs_each_step_once_with_the_final_scores_in_the_last(
        megatron_single_process, tmp_path, capsys):
    from nemo_loop.algorithms import looprpt

    config = load_config(looprpt.LoopRPTConfig, CONF_DIR / "looprpt.yaml", [
        f"output_dir={tmp_path}", "trainer.max_steps=3", "trainer.log_interval=1",
        "trainer.eval_interval=2", "trainer.micro_batch_size=4", "trainer.global_batch_size=4",
        "looprpt.num_rollouts=2", "validation_problems=8", "test_problems=8",
        "optim.warmup_steps=0", "checkpoint.check_free_space=false"])
    history = looprpt.train(config)
    out = capsys.readouterr().out

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text()
               .splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all("loss" in r for r in records)
    assert "validation_accuracy_per_loop" in records[1] and "test_accuracy_per_loop" \
        not in records[1]
    assert {"validation_accuracy_per_loop", "test_accuracy_per_loop"} <= set(records[2])
    steps = [int(n) for n in re.findall(r"^step +(\d+) \| loss", out, re.MULTILINE)]
    assert steps == [1, 2, 3]
    assert len(re.findall(r"^validation accuracy per loop:", out, re.MULTILINE)) == 2
    assert len(re.findall(r"test accuracy per loop:", out)) == 1
    assert [m["step"] for m in history if "loss" in m] == [1, 2, 3]
    assert set(history[-1]) == {"validation_accuracy_per_loop", "test_accuracy_per_loop"}
