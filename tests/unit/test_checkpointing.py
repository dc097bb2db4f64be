"""Checkpoints that cannot lie (issue 19), through pretraining's train loop on a tiny model:
what a checkpoint records, what resume / init_from / evaluation check and find, storage errors
before step 1 and at save time, fallback past a damaged checkpoint, retention, refusing to mix
two runs."""

import errno
import functools
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from nemo_loop.algorithms import pretrain
from nemo_loop.checkpointing import (
    CheckpointMismatchError,
    CheckpointSaveError,
    tokenizer_identity,
)
from nemo_loop.config import CONF_DIR, load_config
from nemo_loop.models.looplm.config import architecture_differences, read_model_config
from nemo_loop.utils.storage import StorageError

# 8 heads in 4 groups: the same tensor shapes as 4 heads in 2 groups (hidden 64).
TRAINED_MODEL = ["model.num_attention_heads=8", "model.num_query_groups=4",
                 "model.rope_theta=50000", "model.num_loops=3"]


def _config(output_dir, *overrides):
    return load_config(pretrain.PretrainConfig, CONF_DIR / "pretrain.yaml", [
        f"output_dir={output_dir}", "trainer.max_steps=2", "trainer.micro_batch_size=8",
        "trainer.global_batch_size=8", "trainer.log_interval=1", "trainer.eval_interval=0",
        "optim.warmup_steps=0", "validation_problems=8", "test_problems=8", *overrides])


def _step_dirs(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def trained(megatron_single_process, tmp_path_factory):
    """4 steps, a checkpoint after every step, all kept, then the final model-only one."""
    run = tmp_path_factory.mktemp("trained") / "run"
    config = _config(run, "trainer.max_steps=4", "trainer.save_interval=1",
                     "checkpoint.keep_last=0", *TRAINED_MODEL)
    pretrain.pretrain(config)
    return run, config


def _copy(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained[0], tmp_path / "run"))


def test_every_checkpoint_records_model_tokenizer_and_layout(trained):
    run, config = trained
    assert _step_dirs(run) == [f"step_{s:07d}" for s in (1, 2, 3, 4)]  # keep_last=0: all
    tokenizer = pretrain.build_task(config.task).tokenizer()
    expected_tokenizer = tokenizer_identity(tokenizer.tokenizer, tokenizer.source)
    for directory in [run / "checkpoints" / "step_0000004", run / "model"]:
        info = json.loads((directory / "checkpoint.json").read_text())
        assert info["kind"] == ("model" if directory.name == "model" else "training")
        assert info["tokenizer"] == expected_tokenizer
        assert info["parallel"] == {"tensor_parallel": 1, "pipeline_parallel": 1,
                                    "data_parallel": 1, "world_size": 1}
        stored = read_model_config(directory / "model_config.yaml")
        assert stored == config.model
        assert all((directory / name).stat().st_size == size
                   for name, size in info["files"].items())
    assert (run / "checkpoints" / "latest_checkpointed_step.txt").read_text() == "4"


def test_resume_with_a_same_shape_architecture_change_names_every_field(trained, tmp_path):
    run = _copy(trained, tmp_path)
    written = (run / "config.yaml").read_text()
    changed = _config(run, "trainer.max_steps=5", "model.num_attention_heads=4",
                      "model.num_query_groups=2", "model.num_loops=4",
                      "model.max_sequence_length=256")  # neutral: RoPE is per position
    with pytest.raises(CheckpointMismatchError) as raised:
        pretrain.pretrain(changed)
    message = str(raised.value)
    for field, saved, wanted in [("num_attention_heads", 8, 4), ("num_query_groups", 4, 2),
                                 ("num_loops", 3, 4), ("rope_theta", 50000.0, 10000.0)]:
        assert f"{field}: checkpoint {saved!r}, this run {wanted!r}" in message
    assert "max_sequence_length" not in message
    assert (run / "config.yaml").read_text() == written  # the run's config is not overwritten

    # init_from compares the same way.
    fresh = _config(tmp_path / "fresh", f"trainer.init_from={run / 'model'}")
    with pytest.raises(CheckpointMismatchError, match="num_attention_heads: checkpoint 8"):
        pretrain.pretrain(fresh)


def test_evaluation_reads_the_trained_config_wherever_the_path_points(trained, tmp_path):
    from megatron.core.utils import unwrap_model

    from nemo_loop.evaluation.model_loading import (
        build_eval_model,
        locate_checkpoint,
        stored_model_config,
    )
    from nemo_loop.models.looplm.state_dict import gather_full_state_dict

    run, config = trained
    final = None
    for path, step in [(run, 4), (run / "checkpoints", 4),
                       (run / "checkpoints" / "step_0000003", 3), (run / "model", None)]:
        location = locate_checkpoint(str(path), None)
        model_config, source = stored_model_config(location)
        assert location.step == step, path
        assert model_config == config.model and source.parent == location.directory
        assert architecture_differences(model_config, config.model) == []
        weights = gather_full_state_dict(unwrap_model(build_eval_model(model_config,
                                                                        location)))
        if step == 4:
            final = final or weights
            assert all(torch.equal(weights[k], final[k]) for k in final), path
    model_only = gather_full_state_dict(build_eval_model(config.model,
                                                         locate_checkpoint(str(run / "model"),
                                                                           None)))
    assert all(torch.equal(model_only[k], final[k]) for k in final)
    assert locate_checkpoint(str(run / "checkpoints"), 2).directory.name == "step_0000002"

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="looked for") as raised:
        locate_checkpoint(str(tmp_path / "empty"), None)
    assert "checkpoints" in str(raised.value) and "metadata.json" in str(raised.value)
    bare = Path(shutil.copytree(run / "model", tmp_path / "bare"))
    (bare / "model_config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="records no model config"):
        locate_checkpoint(str(bare), None)


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory no process may write to, root included (immutable attribute)."""
    path = tmp_path / "read_only"
    path.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
            pytest.skip("running as root on a file system without chattr +i")
        yield path
        subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)


def test_read_only_checkpoint_dir_fails_before_the_model_is_built(read_only_dir, tmp_path,
                                                                  monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the storage check")

    from nemo_loop.algorithms import common

    monkeypatch.setattr(common, "build_loop_model", no_model)
    config = _config(tmp_path / "run", f"trainer.checkpoint_dir={read_only_dir}")
    with pytest.raises(StorageError, match=f"cannot write to {read_only_dir}"):
        pretrain.pretrain(config)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_free_space_shortfall_states_both_numbers(tmp_path, monkeypatch):
    from collections import namedtuple

    from nemo_loop.algorithms.training_run import estimated_checkpoint_bytes
    from nemo_loop.utils import storage

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: usage(10**6, 10**6, 1000))
    config = _config(tmp_path / "run")
    needed = estimated_checkpoint_bytes(config.model)
    with pytest.raises(StorageError, match=f"1000 bytes.*{needed} bytes"):
        pretrain.pretrain(config)


def test_a_full_disk_at_save_says_so_and_the_next_start_cleans_up(megatron_single_process,
                                                                  tmp_path, monkeypatch, capsys):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    real_write = filesystem_async._write_item

    @functools.wraps(real_write)  # megatron reads the signature
    def full_disk_at_step_2(*args, **kwargs):
        stream = next(a for a in args if hasattr(a, "name") and hasattr(a, "write"))
        if "step_0000002" in stream.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(filesystem_async, "_write_item", full_disk_at_step_2)
    run = tmp_path / "run"
    config = _config(run, "trainer.save_interval=1")
    with pytest.raises(CheckpointSaveError, match="step_0000002 failed: no space left on /"):
        pretrain.pretrain(config)
    assert _step_dirs(run) == ["step_0000001", "step_0000002.tmp"]
    assert (run / "checkpoints" / "latest_checkpointed_step.txt").read_text() == "1"

    monkeypatch.setattr(filesystem_async, "_write_item", real_write)
    capsys.readouterr()
    pretrain.pretrain(_config(run, "trainer.save_interval=1"))
    out = capsys.readouterr().out
    assert f"removed {run / 'checkpoints' / 'step_0000002.tmp'}" in out
    assert f"resumed from step 1 (checkpoint {run / 'checkpoints' / 'step_0000001'})" in out
    assert _step_dirs(run) == ["step_0000001", "step_0000002"]


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(trained, tmp_path, caplog,
                                                                 damage):
    run = _copy(trained, tmp_path)
    shard = run / "checkpoints" / "step_0000004" / "__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2] if damage == "truncated" else bytes(len(data)))
    config = _config(run, "trainer.max_steps=4", *TRAINED_MODEL)
    tokenizer = pretrain.build_task(config.task).tokenizer()
    with caplog.at_level("WARNING"):
        loop_run, *_ = pretrain.setup(config, tokenizer)
    assert loop_run.start_step == 3
    assert loop_run.resumed_from == run / "checkpoints" / "step_0000003"
    warning = caplog.text
    assert "falling back to the previous complete checkpoint" in warning
    assert str(shard if damage == "truncated" else shard.parent) in warning


def test_keep_last_keeps_exactly_that_many_checkpoints(megatron_single_process, tmp_path):
    run = tmp_path / "run"
    pretrain.pretrain(_config(run, "trainer.max_steps=5", "trainer.save_interval=1",
                              "checkpoint.keep_last=2"))
    assert _step_dirs(run) == ["step_0000004", "step_0000005"]


def test_a_fresh_run_refuses_another_runs_outputs_unless_told_to_overwrite(trained, tmp_path):
    run = _copy(trained, tmp_path)
    fresh = ["trainer.resume=false", "trainer.max_steps=1", *TRAINED_MODEL]
    with pytest.raises(StorageError, match="holds another run's outputs.*overwrite=true"):
        pretrain.pretrain(_config(run, *fresh))
    assert len((run / "metrics.jsonl").read_text().splitlines()) > 2  # untouched

    pretrain.pretrain(_config(run, *fresh, "trainer.overwrite=true"))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text()
             .splitlines()]
    assert steps == [1, 1]  # step 1 and the final accuracy: nothing of the earlier run
    assert _step_dirs(run) == ["step_0000001"]


def test_resumed_metrics_keep_each_step_once_even_after_a_half_written_line(tmp_path):
    from nemo_loop.utils.logging import metrics_steps, truncate_metrics

    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "lo')
    assert metrics_steps(tmp_path) == [1, 2, 3, 4]
    assert truncate_metrics(tmp_path, 2) == 3
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines[:2]) + "\n"
