"""recipes/convert_ouro.py end to end: import a sharded HF Ouro checkpoint, export it with
fewer loops, and get every tensor back bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.ouro_checkpoint import write_tiny_ouro_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> str:
    run = subprocess.run([sys.executable, "recipes/convert_ouro.py", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout + run.stderr


@pytest.mark.slow
def test_import_then_export_round_trips(tmp_path):
    from nemo_loop.models.looplm.hf_ouro import read_ouro_state_dict

    config, weights = write_tiny_ouro_checkpoint(tmp_path / "hf")
    log = _run("import", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"))
    assert "<|im_end|>=2" in log  # the special-token warning
    _run("export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"),
         "--num-loops", "2")
    exported = read_ouro_state_dict(tmp_path / "out")
    assert set(exported) == set(weights)
    assert all(torch.equal(exported[name], weights[name]) for name in weights)
    assert json.loads((tmp_path / "out/config.json").read_text()) == {**config,
                                                                      "total_ut_steps": 2}
    assert (tmp_path / "out/tokenizer.json").read_bytes() == \
        (tmp_path / "hf/tokenizer.json").read_bytes()
