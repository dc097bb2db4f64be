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


@pytest.fixture
def disk_of_150_mb(tmp_path, monkeypatch):
    """A directory on a 150 MB file system: a real tmpfs where this process may mount one
    (root, as in CI), else free-space readings of 150 MB at the one place they are read."""
    path = tmp_path / "disk"
    path.mkdir()
    size = 150 * 10**6
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True).returncode == 0
    if not mounted:
        from collections import namedtuple

        from nemo_loop.utils import storage

        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(storage.shutil, "disk_usage", lambda where: usage(size, 0, size))
    yield path
    if mounted:  # lazily: this process holds the run lock in it until it ends
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def test_a_150_mb_disk_is_refused_at_start_when_retention_needs_more(
        megatron_single_process, disk_of_150_mb, tmp_path, monkeypatch):
    """Issue 23: a ~103 MB checkpoint fits the disk once, but keep_last=2 holds three at the
    moment of a save (the new one is written before the oldest is removed): refused before
    the model is built, with both numbers; the tiny model's three fit."""
    from nemo_loop.algorithms import common
    from nemo_loop.algorithms.training_run import TrainingRun, estimated_checkpoint_bytes
    from nemo_loop.utils.storage import free_bytes

    wide = ["model.hidden_size=512", "model.ffn_hidden_size=1408",
            "model.num_attention_heads=8", "model.num_query_groups=4"]
    config = _config(tmp_path / "run", f"trainer.checkpoint_dir={disk_of_150_mb}",
                     "checkpoint.keep_last=2", *wide)
    one = estimated_checkpoint_bytes(config.model)
    free = free_bytes(disk_of_150_mb)
    assert one < free < 3 * one  # one checkpoint fits, three do not

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the storage check")

    monkeypatch.setattr(common, "build_loop_model", no_model)
    with pytest.raises(StorageError, match=r"has 1\d\d.\d\d MB free \(1\d{8} bytes\), but 3 "
                       r"more checkpoints \(checkpoint.keep_last=2: 2 kept and the next one, "
                       r"written before the oldest is removed; 0 already there\) of about "
                       rf".* MB each .* take about .* \({3 * one} bytes\)"):
        pretrain.pretrain(config)
    with pytest.raises(StorageError, match=r"but 2 checkpoints \(checkpoint.keep_last=0 keeps "
                                           r"every one: the saves planned after step 0 up to "
                                           r"trainer.max_steps=2\)"):
        pretrain.pretrain(_config(tmp_path / "run", f"trainer.checkpoint_dir={disk_of_150_mb}",
                                  "checkpoint.keep_last=0", "trainer.save_interval=1", *wide))
    TrainingRun(_config(tmp_path / "tiny", f"trainer.checkpoint_dir={disk_of_150_mb}",
                        "checkpoint.keep_last=2"), None).preemption.close()  # 3 × 1.6 MB fit


def test_a_full_disk_at_save_says_so_and_removes_the_partial_save(megatron_single_process,
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
    with pytest.raises(CheckpointSaveError, match="step_0000002 failed: no space left on /.*; "
                       "a checkpoint needs about 1\\.\\d\\d MB"):
        pretrain.pretrain(config)
    assert _step_dirs(run) == ["step_0000001"]  # the partial step_0000002.tmp is gone
    assert (run / "checkpoints" / "latest_checkpointed_step.txt").read_text() == "1"

    monkeypatch.setattr(filesystem_async, "_write_item", real_write)
    capsys.readouterr()
    pretrain.pretrain(_config(run, "trainer.save_interval=1"))
    out = capsys.readouterr().out
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
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # step 1 once, with the final held-out accuracy in its record: nothing of the earlier run
    assert [record["step"] for record in records] == [1]
    assert "loss" in records[0] and "test_accuracy_per_loop" in records[0]
    assert _step_dirs(run) == ["step_0000001"]


def test_resumed_metrics_keep_each_step_once_even_after_a_half_written_line(tmp_path):
    from nemo_loop.utils.logging import metrics_steps, truncate_metrics

    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "lo')
    assert metrics_steps(tmp_path) == [1, 2, 3, 4]
    assert truncate_metrics(tmp_path, 2) == 3
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines[:2]) + "\n"


# ----- issue 23: runs that cannot collide or rot -----

def test_a_second_run_into_a_running_runs_directory_refuses_naming_it(megatron_single_process,
                                                                       tmp_path):
    """Two real runs into one output_dir (a double sbatch): the second refuses before touching
    anything, naming the first's PID; once the first is SIGKILLed the kernel has released its
    lock, and a run starts there again."""
    import signal
    import sys
    import time

    from nemo_loop.utils.run_lock import holder_pid

    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "recipes/pretrain_looplm.py", f"output_dir={run}",
         "trainer.max_steps=100000", "trainer.micro_batch_size=8", "trainer.global_batch_size=8",
         "trainer.log_interval=1", "trainer.eval_interval=0", "validation_problems=8",
         "test_problems=8"], cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").is_file() and first.poll() is None:
            assert time.monotonic() < deadline, "the first run did not start training"
            time.sleep(0.2)
        assert first.poll() is None, first.stderr.read()[-3000:]
        assert holder_pid(run / ".run.lock") == first.pid
        logged = (run / "metrics.jsonl").stat().st_size
        with pytest.raises(StorageError, match=rf"output directory {run} is in use by another "
                                               rf"run: PID {first.pid} on host .*started"):
            pretrain.pretrain(_config(run, "trainer.overwrite=true"))
        assert first.poll() is None and (run / "metrics.jsonl").stat().st_size >= logged
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    pretrain.pretrain(_config(run, "trainer.max_steps=1", "trainer.overwrite=true"))
    assert holder_pid(run / ".run.lock") == os.getpid()
    assert _step_dirs(run) == ["step_0000001"]


def test_a_staging_directory_that_lost_its_shards_is_never_published(megatron_single_process,
                                                                       tmp_path, monkeypatch):
    """What a second run did to the first's save: deleted the shards mid-write. The manifest
    must not be published listing no shard; the previous checkpoint stays the latest."""
    from nemo_loop import checkpointing

    real_save_rng_states = checkpointing._save_rng_states

    def save_then_lose_shards(directory):
        real_save_rng_states(directory)
        if "step_0000002" in str(directory):
            for shard in Path(directory).glob("*.distcp"):
                shard.unlink()

    monkeypatch.setattr(checkpointing, "_save_rng_states", save_then_lose_shards)
    run = tmp_path / "run"
    with pytest.raises(CheckpointSaveError, match=r"refusing to publish .*step_0000002.tmp: it "
                                                  r"lacks __0_0.distcp \(missing, needs at least"):
        pretrain.pretrain(_config(run, "trainer.save_interval=1"))
    assert _step_dirs(run) == ["step_0000001"]
    assert (run / "checkpoints" / "latest_checkpointed_step.txt").read_text() == "1"


def test_weights_with_a_nan_are_never_saved(megatron_single_process, tmp_path, monkeypatch):
    """A NaN that reaches the weights (here put there after step 2's update) is refused at the
    save, before anything is written: step 1 stays the newest checkpoint."""
    from megatron.core.utils import unwrap_model

    from nemo_loop.checkpointing import NonFiniteCheckpointError, save_model_checkpoint

    real_step = pretrain.train_step

    def step_then_poison(ddp_model, *args, **kwargs):
        metrics = real_step(ddp_model, *args, **kwargs)
        if len(steps) == 1:
            with torch.no_grad():
                unwrap_model(ddp_model).decoder.layers[0].mlp.linear_fc1.weight[0, 0] = \
                    float("nan")
        steps.append(metrics)
        return metrics

    steps = []
    monkeypatch.setattr(pretrain, "train_step", step_then_poison)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteCheckpointError, match=r"refusing to save .*step_0000002: "
                                                       r"decoder.layers.0.mlp.linear_fc1.weight "
                                                       r"holds NaN values"):
        pretrain.pretrain(_config(run, "trainer.save_interval=1"))
    assert _step_dirs(run) == ["step_0000001"]
    assert (run / "checkpoints" / "latest_checkpointed_step.txt").read_text() == "1"

    from nemo_loop.models.looplm.model import build_loop_model

    model = build_loop_model(_config(run).model.transformer_config())
    with torch.no_grad():
        model.output_layer.weight[1, 2] = float("inf")
    with pytest.raises(NonFiniteCheckpointError, match="output_layer.weight holds infinite"):
        save_model_checkpoint(model, tmp_path / "model")
    assert not (tmp_path / "model").exists() and not (tmp_path / "model.tmp").exists()


def test_a_same_size_corrupted_shard_is_caught_by_checksums(megatron_single_process, tmp_path,
                                                             caplog):
    """Sizes cannot see a flipped byte inside a tensor: ``verify=size`` resumes from the
    damaged checkpoint; ``verify=checksum`` (SHA-256s recorded at save) falls back to the
    previous one, and init_from refuses the damaged model checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader

    from nemo_loop.checkpointing import CheckpointLoadError, load_model_checkpoint

    run = tmp_path / "run"
    pretrain.pretrain(_config(run, "trainer.save_interval=1", "checkpoint.keep_last=0",
                              "checkpoint.verify=checksum"))
    for directory in (run / "checkpoints" / "step_0000002", run / "model"):
        assert json.loads((directory / "checkpoint.json").read_text())["sha256"].keys() == \
            json.loads((directory / "checkpoint.json").read_text())["files"].keys()
        index = FileSystemReader(str(directory)).read_metadata()
        largest = max(index.storage_data.values(), key=lambda item: item.length)
        shard = directory / largest.relative_path
        data = bytearray(shard.read_bytes())
        middle = largest.offset + largest.length // 2
        data[middle:middle + 8] = bytes(b ^ 0x40 for b in data[middle:middle + 8])
        shard.write_bytes(bytes(data))  # the same size: a size check passes

    tokenizer = pretrain.build_task(_config(run).task).tokenizer()
    for verify, resumed in (("size", 2), ("checksum", 1)):
        with caplog.at_level("WARNING"):
            loop_run, *_ = pretrain.setup(_config(run, f"checkpoint.verify={verify}"),
                                          tokenizer)
        loop_run.preemption.close()
        assert loop_run.start_step == resumed, verify
    assert "__0_0.distcp does not match the SHA-256 recorded when it was written" in caplog.text
    from nemo_loop.models.looplm.model import build_loop_model

    model = build_loop_model(_config(run).model.transformer_config())
    load_model_checkpoint(model, run / "model")  # sizes only: loads the damaged weights
    with pytest.raises(CheckpointLoadError, match="does not match the SHA-256"):
        load_model_checkpoint(model, run / "model", verify="checksum")


def test_mount_points_come_from_mountinfo_so_bind_mounts_are_named():
    from nemo_loop.utils.storage import mount_point

    mountinfo = ("27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
                 "40 27 254:0 /data/ro /mnt/read\\040only ro,relatime - ext4 /dev/vda rw\n"
                 "41 27 254:0 /x /mnt/read rw - ext4 /dev/vda rw\n")
    assert mount_point("/mnt/read only/run/checkpoints", mountinfo) == Path("/mnt/read only")
    assert mount_point("/mnt/readable/run", mountinfo) == Path("/")
    assert mount_point("/mnt/read/run", mountinfo) == Path("/mnt/read")


def test_a_read_only_bind_mount_is_named_by_its_mount_point(tmp_path):
    """A directory bind-mounted read-only onto itself: same device as its parent, so
    os.path.ismount misses it and the error used to say "/ is a read-only file system"."""
    from nemo_loop.utils.storage import ensure_writable_dir

    mount = tmp_path / "ro"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "--bind", str(mount), str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("bind mounts need root and a mount namespace that allows them")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mount)], check=True)
        target = mount / "run" / "checkpoints"
        with pytest.raises(StorageError) as raised:
            ensure_writable_dir(target)
        assert raised.value.strerror == (f"cannot write to {target}: {mount} is a read-only "
                                         f"file system (holding {target})")
    finally:
        subprocess.run(["umount", str(mount)], check=True)
