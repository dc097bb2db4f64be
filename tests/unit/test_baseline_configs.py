"""GRPO/RLTT/OISD configs: the YAMLs and presets load, bad settings are named at load time,
and rollout groups split into whole groups per data-parallel rank."""

import pytest

from nemo_loop.config import CONF_DIR, load_config, to_dict


def _schema(algorithm: str):
    from nemo_loop.algorithms.grpo import GRPOConfig
    from nemo_loop.algorithms.oisd import OISDConfig
    from nemo_loop.algorithms.rltt import RLTTConfig
    from nemo_loop.algorithms.sft import SFTConfig

    return {"grpo": GRPOConfig, "rltt": RLTTConfig, "oisd": OISDConfig,
            "sft": SFTConfig}[algorithm]


def _load(algorithm: str, *overrides, path=None):
    return load_config(_schema(algorithm), path or CONF_DIR / f"{algorithm}.yaml",
                       list(overrides))


PRESETS = sorted(p for p in (CONF_DIR / "baselines").glob("*.yaml")
                 if p.stem.split("_")[0] in ("grpo", "rltt", "oisd"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_baseline_preset_loads_and_changes_one_section(preset):
    algorithm = preset.stem.split("_")[0]
    base = to_dict(_load(algorithm))
    changed = {section for section, value in to_dict(_load(algorithm, path=preset)).items()
               if base[section] != value}
    assert len(changed) == 1, changed


def test_rltt_defaults_are_the_published_ones():
    from nemo_loop.algorithms.rltt import RLTTConfig

    for config in (_load("rltt"), RLTTConfig()):
        assert config.rollout.samples_per_prompt == 8
        assert (config.optim.lr, config.loss.kl_coef, config.optim.clip_grad) == (1e-6, 0.001,
                                                                                  0.1)
        assert config.rollout.temperature == 1.0 and config.rltt.weighting == "exit_pdf"
    kinds = {_load("rltt", path=p).rltt.weighting for p in PRESETS if p.stem.startswith("rltt")}
    assert kinds | {"exit_pdf"} == {"uniform", "progressive", "exit_pdf", "learned"}


@pytest.mark.parametrize("algorithm, override, message", [
    ("grpo", "rollout.samples_per_prompt=1", "samples_per_prompt.*GRPO.*group"),
    ("rltt", "rollout.samples_per_prompt=1", "samples_per_prompt.*RLTT"),
    ("oisd", "rollout.samples_per_prompt=1", "samples_per_prompt.*OISD"),
    ("rltt", "rltt.weighting=zigzag", "rltt.weighting"),
    ("rltt", "trainer.updates_per_batch=2", "on-policy"),
    ("rltt", "rltt.gamma=-1", "rltt.gamma"),
    ("rltt", "rltt.learned_lr=0", "rltt.learned_lr"),
    ("oisd", "oisd.loops=[2]", "oisd.loops"),
    ("oisd", "oisd.loops=[1,3]", "oisd.loops"),
    ("oisd", "rollout.student_loops=1", "R̃"),
    ("oisd", "oisd.logit_coef=-0.1", "oisd.logit_coef"),
    ("oisd", "oisd.attention_coef=-0.1", "oisd.attention_coef"),
    ("oisd", "oisd.attention_layer=5", "oisd.attention_layer"),
    ("grpo", "loss.kl_coef=-0.001", "loss.kl_coef"),
    ("grpo", "loss.clip_high=-0.2", "loss.clip_high"),
    ("grpo", "loss.aggregation=median", "loss.aggregation"),
    ("grpo", "trainer.updates_per_batch=0", "updates_per_batch"),
    ("grpo", "parallel.pipeline_parallel=2", "pipeline_parallel"),
    ("grpo", "rollout.student_loops=5", "student_loops"),
    ("grpo", "data.path=/nonexistent.jsonl", "prompt set not found"),
    # the policy gradient is taken on the distribution the rollouts were drawn from
    ("grpo", "rollout.temperature=0", "rollout.temperature=0 \\(greedy\\) cannot train GRPO"),
    ("rltt", "rollout.top_p=0.9", "rollout.top_p=0.9 / rollout.top_k=0: RLTT"),
    ("oisd", "rollout.top_k=20", "rollout.top_k=20: OISD"),
    ("grpo", "loss.dual_clip=1.0", "loss.dual_clip must be a finite number > 1"),
    ("grpo", "loss.max_log_ratio=0", "loss.max_log_ratio must be a finite number > 0"),
    ("grpo", "loss.k3_clamp=-1", "loss.k3_clamp must be a finite number > 0"),
    ("grpo", "trainer.max_tokens_per_micro_batch=16", "max_tokens_per_micro_batch 16 must be"),
    ("sft", "trainer.max_tokens_per_micro_batch=16", "max_tokens_per_micro_batch 16 must be"),
])
def test_bad_configs_are_named_at_load_time(algorithm, override, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        _load(algorithm, override)


def test_rollouts_must_split_into_whole_groups():
    config = _load("grpo", "trainer.prompts_per_step=3")
    with pytest.raises(ValueError, match="prompts_per_step 3 is not divisible by data_parallel"):
        config.validate(world_size=2)
    # 12 rollouts per rank in micro-batches of 8 and 4: the loss is normalized over the step,
    # so micro-batches need not be equal
    _load("grpo", "trainer.prompts_per_step=4", "rollout.samples_per_prompt=6",
          "trainer.micro_batch_size=8").validate(world_size=2)
