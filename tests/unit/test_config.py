import pytest

from nemo_loop.algorithms.pretrain import PretrainConfig
from nemo_loop.config import CONF_DIR, load_config


def test_default_yaml_loads_the_tiny_model():
    config = load_config(PretrainConfig, CONF_DIR / "pretrain.yaml")
    assert config.model.name == "tiny" and config.model.num_loops == 4


def test_model_swap_and_dotlist_overrides():
    config = load_config(PretrainConfig, CONF_DIR / "pretrain.yaml",
                         ["model=ouro_1p4b", "model.num_loops=2", "trainer.max_steps=7"])
    assert config.model.hidden_size == 2048 and config.model.num_layers == 24
    assert config.model.num_loops == 2 and config.trainer.max_steps == 7


def test_model_swap_reads_the_model_yaml_like_everyone_else(tmp_path):
    from nemo_loop.models.looplm.config import read_model_config

    config = load_config(PretrainConfig, CONF_DIR / "pretrain.yaml", ["model=ouro_1p4b"])
    # nothing of the replaced tiny model (embedding_init_std: 1.0) survives the swap
    assert config.model == read_model_config(CONF_DIR / "model" / "ouro_1p4b.yaml")
    assert config.model.embedding_init_std is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_layers: 2\nnum_loopz: 3\n")
    with pytest.raises(ValueError, match=r"invalid LoopModelConfig in .*bad\.yaml.*num_loopz"):
        load_config(PretrainConfig, CONF_DIR / "pretrain.yaml", [f"model={bad}"])


@pytest.mark.parametrize("override, message", [
    (["trainer.bogus=1"], "trainer.bogus"),
    (["model.num_loops=abc"], "model.num_loops"),
    (["model=no_such_model"], "no_such_model"),
    (["model.layer_spec=postnorm"], "unknown layer_spec"),
    (["model.num_loops=0"], "num_loops"),
    (["optim.decay_style=step"], "decay_style"),
    (["task.shell_game.num_cups=12"], "num_cups"),
    (["task.shell_game.num_swaps=200"], "max_sequence_length"),
    (["task.name=math"], "synthetic task"),
    (["model.vocab_size=8"], "vocab_size"),
    (["trainer.max_steps"], "key=value"),
])
def test_bad_configs_name_the_problem(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(PretrainConfig, CONF_DIR / "pretrain.yaml", override)


def test_batch_divisibility_is_checked_against_the_world():
    config = load_config(PretrainConfig, CONF_DIR / "pretrain.yaml",
                         ["trainer.global_batch_size=48", "trainer.micro_batch_size=16"])
    config.validate(world_size=1)
    with pytest.raises(ValueError, match="global_batch_size"):
        config.validate(world_size=2)


def test_compression_experiment_config_checks_every_phase_at_load_time():
    from nemo_loop.experiments.compression import CompressionExperimentConfig

    config = load_config(CompressionExperimentConfig, CONF_DIR / "compression.yaml")
    assert list(config.students) == ["llopsd", "terminal_only"]
    assert config.student_config("terminal_only").loss.weighting == "terminal"
    student = config.student_config("llopsd")
    assert student.model == config.model and student.task == config.task
    assert student.rollout.student_loops == config.student_loops == 2
    assert student.optim.lr == 3e-4 and student.teacher.mode == "frozen"  # compression.llopsd
    assert config.eval_config("pretrained").task.name == "shell_game"
    assert student.trainer.init_from.endswith("pretrain/model")
    assert config.eval_config("pretrained").custom.name == "shell_game"
    for override, message in [(["student_loops=5"], "student_loops"),
                              (["students.bad.loss.mapping=zigzag"], "zigzag"),
                              (["students.bad.loss.mappingg=shift"], "students.bad.*mappingg"),
                              (["students.bad.algorithm=ppo"], "unknown algorithm 'ppo'"),
                              (["students.bad.rollout.student_loops=3"],
                               "'rollout.student_loops', which the experiment decides"),
                              (["compression.ppo.optim.lr=1"], "unknown algorithm 'ppo'"),
                              (["evaluation.n_samples=0"], "n_samples"),
                              (["pretrain.trainer.max_steps=0"], "max_steps")]:
        with pytest.raises(ValueError, match=message):
            load_config(CompressionExperimentConfig, CONF_DIR / "compression.yaml", override)


def test_missing_yaml_is_an_error():
    with pytest.raises(FileNotFoundError):
        load_config(PretrainConfig, "conf/nope.yaml")


ABLATIONS = sorted((CONF_DIR / "ablations").glob("*.yaml"))


@pytest.mark.parametrize("preset", ABLATIONS, ids=lambda p: p.stem)
def test_every_ablation_preset_loads_and_changes_one_factor(preset):
    from nemo_loop.algorithms.llopsd import LLOPSDConfig
    from nemo_loop.config import to_dict

    base = to_dict(load_config(LLOPSDConfig, CONF_DIR / "llopsd.yaml"))
    ablation = to_dict(load_config(LLOPSDConfig, preset))
    changed = {section for section in base if base[section] != ablation[section]}
    if preset.stem == "context_sdpo":  # SDPO's sibling context needs rollout groups (G >= 2)
        assert changed == {"teacher", "rollout"}, changed
    else:
        assert len(changed) == 1, changed


def test_ablation_grid_is_covered():
    from nemo_loop.algorithms.llopsd import LLOPSDConfig

    configs = [load_config(LLOPSDConfig, p) for p in ABLATIONS]
    configs.append(load_config(LLOPSDConfig, CONF_DIR / "llopsd.yaml"))
    assert {c.rollout.student_loops for c in configs} == {2, 3, 4}
    assert {c.loss.mapping for c in configs} == {"shift", "linear", "fixed"}
    assert {c.loss.weighting for c in configs} == {"uniform", "late_heavy", "adaptive", "terminal"}
    assert {c.loss.divergence for c in configs} == {"forward_kl", "reverse_kl", "jsd"}
    assert {c.teacher.context.kind for c in configs} == {"opsd", "sdpo", "sdpo_verdict", "opsdc"}
    assert {c.loss.objective for c in configs} == {"full", "sampled_token"}
    assert {c.teacher.mode for c in configs} == {"same", "ema", "frozen"}


def test_base_cycles_are_rejected(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="includes itself"):
        load_config(PretrainConfig, tmp_path / "a.yaml")


def test_to_dict_is_what_omegaconf_gives():
    """to_dict skips OmegaConf's tree for speed; written out it must stay what
    OmegaConf.to_container of the structured config gives — study fingerprints (JSON) and every
    run's config.yaml are made of it. (Tuples become lists; OmegaConf keeps a tuple in an
    untyped field, which JSON and YAML write as a list anyway.)"""
    import json

    from omegaconf import OmegaConf

    from nemo_loop.algorithms.llopsd import LLOPSDConfig
    from nemo_loop.config import to_dict
    from nemo_loop.experiments.compression import CompressionExperimentConfig

    for config in (load_config(LLOPSDConfig, CONF_DIR / "llopsd.yaml",
                               ["loss.weights_list=[0.25,0.75]", "loss.weighting=explicit",
                                "rollout.student_loops=2"]),
                   load_config(CompressionExperimentConfig, CONF_DIR / "adaptive_exit.yaml"),
                   PretrainConfig()):
        plain = to_dict(config)
        reference = OmegaConf.to_container(OmegaConf.structured(config))
        assert json.dumps(plain, sort_keys=True, default=str) == \
            json.dumps(reference, sort_keys=True, default=str)
        assert OmegaConf.to_yaml(plain) == OmegaConf.to_yaml(reference)
