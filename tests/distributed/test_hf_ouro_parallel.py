"""Ouro HF checkpoint → LoopGPTModel at TP=1/TP=2/PP=2/TP2×PP2: per-loop logits and exit
probabilities against the plain-PyTorch reference (fp32), and import → export bit-exactness
through a dist checkpoint saved under one layout and loaded under others. One 4-rank launch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from megatron.core import parallel_state

from nemo_loop.utils.distributed import ParallelConfig

pytestmark = [pytest.mark.parity, pytest.mark.slow]

TOLERANCE = 1e-5
HF_DIR_ENV = "NEMO_LOOP_TEST_OURO_HF_DIR"
WORK_DIR_ENV = "NEMO_LOOP_TEST_OURO_WORK_DIR"


def _hf_dir() -> Path:
    return Path(os.environ[HF_DIR_ENV])


def _work_dir(name: str) -> Path:
    return Path(os.environ[WORK_DIR_ENV]) / name


def _input_ids(vocab_size: int, batch=2, seq=12):
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(5))


def _gather_vocab(logits):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits.detach().contiguous())


def _check_parity(layout: ParallelConfig):
    from nemo_loop.conversion.ouro import build_model
    from nemo_loop.models.looplm import hf_ouro
    from nemo_loop.models.looplm.pipeline import forward_backward_loops
    from nemo_loop.models.looplm.reference import ouro_reference_forward
    from nemo_loop.models.looplm.state_dict import load_full_state_dict

    hf_config, model_config, weights = hf_ouro.open_ouro_checkpoint(_hf_dir())
    model = build_model(model_config, layout)
    load_full_state_dict(model, weights)
    input_ids = _input_ids(model_config.vocab_size)
    outputs = forward_backward_loops(model, [{"input_ids": input_ids}], None, forward_only=True)
    logit_err = prob_err = 0.0
    if parallel_state.is_pipeline_last_stage():
        output = outputs[0]
        logits = _gather_vocab(output.logits).permute(0, 2, 1, 3)  # [R, b, s, V]
        probs = output.exit_probs.transpose(1, 2)  # [R, b, s]
        ref_logits, ref_probs = ouro_reference_forward(
            hf_ouro.read_ouro_state_dict(_hf_dir()), hf_config, input_ids)
        assert logits.shape == ref_logits.shape, (logits.shape, ref_logits.shape)
        logit_err = (logits.double() - ref_logits.double()).abs().max().item()
        prob_err = (probs.double() - ref_probs.double()).abs().max().item()
    errors = torch.tensor([logit_err, prob_err], dtype=torch.float64)
    torch.distributed.all_reduce(errors, op=torch.distributed.ReduceOp.MAX)
    logit_err, prob_err = errors.tolist()
    if torch.distributed.get_rank() == 0:
        print(f"PARITY ouro-import tp={layout.tensor_parallel} pp={layout.pipeline_parallel} "
              f"logits={logit_err:.2e} exit_probs={prob_err:.2e}", flush=True)
    assert logit_err <= TOLERANCE and prob_err <= TOLERANCE, (logit_err, prob_err)


def check_parity_tp1():
    _check_parity(ParallelConfig())


def check_parity_tp2():
    _check_parity(ParallelConfig(tensor_parallel=2))


def check_parity_pp2():
    _check_parity(ParallelConfig(pipeline_parallel=2))


def check_parity_tp2_pp2():
    _check_parity(ParallelConfig(tensor_parallel=2, pipeline_parallel=2))


def _assert_export_matches(exported: Path, num_loops: int):
    from nemo_loop.models.looplm.hf_ouro import read_ouro_state_dict

    if torch.distributed.get_rank() != 0:
        return
    original = read_ouro_state_dict(_hf_dir())
    result = read_ouro_state_dict(exported)
    assert set(result) == set(original), set(result) ^ set(original)
    different = [name for name in original if not torch.equal(result[name], original[name])]
    assert not different, f"tensors changed by import → export: {different[:5]}"
    config = json.loads((_hf_dir() / "config.json").read_text())
    assert json.loads((exported / "config.json").read_text()) == {**config,
                                                                  "total_ut_steps": num_loops}
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (exported / name).read_bytes() == (_hf_dir() / name).read_bytes(), name
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 0]


def check_import_tp2_pp2_then_export_tp1_is_bit_exact():
    from nemo_loop.conversion.ouro import export_ouro, import_ouro

    ckpt = _work_dir("ckpt_tp2_pp2")
    import_ouro(_hf_dir(), ckpt, ParallelConfig(tensor_parallel=2, pipeline_parallel=2))
    assert (ckpt / "model_config.yaml").is_file() and (ckpt / "tokenizer/tokenizer.json").is_file()
    export_ouro(ckpt, _work_dir("hf_tp1"), 3, ParallelConfig())
    _assert_export_matches(_work_dir("hf_tp1"), 3)


CHECKS = [name for name in dir() if name.startswith("check_")]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from tests.multiproc import run_checks
    from tests.ouro_checkpoint import write_tiny_ouro_checkpoint

    root = tmp_path_factory.mktemp("ouro")
    write_tiny_ouro_checkpoint(root / "hf")  # skips without the real tokenizer files
    os.environ[HF_DIR_ENV], os.environ[WORK_DIR_ENV] = str(root / "hf"), str(root / "work")
    try:
        return run_checks(__name__, CHECKS, world_size=4, timeout_s=180)
    finally:
        del os.environ[HF_DIR_ENV], os.environ[WORK_DIR_ENV]


@pytest.mark.parametrize("check", CHECKS)
def test_ouro_conversion_parallel(results, check):
    assert results[check] is None, results[check]
