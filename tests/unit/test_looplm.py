import pytest
import torch

from nemo_loop.models.looplm.config import LoopModelConfig

TINY = LoopModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                       num_query_groups=2, vocab_size=128, max_sequence_length=64, num_loops=4)


@pytest.fixture
def model(megatron_single_process):
    from nemo_loop.models.looplm.model import build_loop_model

    torch.manual_seed(0)
    return build_loop_model(TINY.transformer_config())


def _tokens(batch=2, seq=10, seed=0):
    return torch.randint(0, TINY.vocab_size, (batch, seq),
                         generator=torch.Generator().manual_seed(seed))


def test_fewer_loops_are_exactly_the_first_loops(model):
    ids = _tokens()
    full = model(ids)
    for loops in range(1, TINY.num_loops + 1):
        partial = model(ids, num_loops=loops)
        assert partial.logits.shape == (loops, 10, 2, TINY.vocab_size)
        assert torch.equal(partial.logits, full.logits[:loops])
        assert torch.equal(partial.exit_logits, full.exit_logits[:loops])


def test_loops_differ_from_each_other(model):
    logits = model(_tokens()).logits
    assert not torch.allclose(logits[0], logits[1])


def test_head_runs_only_for_requested_loops(model):
    calls = []
    handle = model.output_layer.register_forward_hook(lambda *_: calls.append(1))
    output = model(_tokens(), logit_loops=[2, 4])
    handle.remove()
    assert len(calls) == 2 and output.loops == [2, 4]
    assert torch.equal(output.logits, model(_tokens()).logits[[1, 3]])


def test_exit_distribution_sums_to_one_and_matches_definition():
    from nemo_loop.models.looplm.model import exit_distribution

    gates = torch.randn(4, 5, 3) * 10
    probs = exit_distribution(gates)
    assert torch.allclose(probs.sum(0), torch.ones(5, 3), atol=1e-6)
    lam = torch.sigmoid(gates.double())
    expected = [lam[0], lam[1] * (1 - lam[0]), lam[2] * (1 - lam[0]) * (1 - lam[1]),
                (1 - lam[0]) * (1 - lam[1]) * (1 - lam[2])]
    assert torch.allclose(probs.double(), torch.stack(expected), atol=1e-6)


def test_model_exit_probs_sum_to_one(model):
    probs = model(_tokens(), num_loops=3).exit_probs
    assert probs.shape == (3, 10, 2)
    assert torch.allclose(probs.sum(0), torch.ones(10, 2), atol=1e-6)


def test_attention_is_causal(model):
    ids = _tokens()
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % TINY.vocab_size
    a, b = model(ids).logits, model(changed).logits
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("loops", [0, 5, -1])
def test_bad_loop_counts_are_rejected(model, loops):
    with pytest.raises(ValueError, match="num_loops"):
        model(_tokens(), num_loops=loops)


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="not divisible by tensor_parallel"):
        LoopModelConfig(num_attention_heads=4, num_query_groups=4).validate(tensor_parallel=8)
    with pytest.raises(ValueError, match="unknown layer_spec"):
        LoopModelConfig(layer_spec="postnorm").validate()
    with pytest.raises(ValueError, match="num_loops"):
        LoopModelConfig(num_loops=0).validate()
    with pytest.raises(ValueError, match="pipeline_parallel"):
        LoopModelConfig(num_layers=3).validate(pipeline_parallel=2)


def test_unknown_attention_backend_is_rejected():
    from nemo_loop.models.looplm.layer_specs import loop_layer_spec

    with pytest.raises(ValueError, match="model.attention_backend must be one of"):
        LoopModelConfig(attention_backend="cudnn").validate()
    with pytest.raises(ValueError, match="unknown core attention"):
        loop_layer_spec("sandwich", "cudnn")
    with pytest.raises(ValueError, match="unknown layer_spec"):
        loop_layer_spec("bogus", "sdpa")


@pytest.mark.skipif(torch.cuda.is_available(), reason="Transformer Engine may be usable here")
def test_te_backend_without_transformer_engine_names_the_field():
    with pytest.raises(RuntimeError, match="model.attention_backend 'te' needs Transformer Engine"):
        LoopModelConfig(attention_backend="te").transformer_config()
    assert LoopModelConfig().transformer_config().core_attention == "sdpa"  # auto


def test_sandwich_layer_has_four_norms_and_prenorm_two(megatron_single_process):
    from nemo_loop.models.looplm.model import build_loop_model

    def norms(layer_spec):
        cfg = LoopModelConfig(**{**TINY.__dict__, "layer_spec": layer_spec})
        layer = build_loop_model(cfg.transformer_config()).decoder.layers[0]
        return sorted(n.split(".")[0] for n, _ in layer.named_parameters() if "layernorm" in n)

    assert norms("sandwich") == ["input_layernorm", "post_mlp_layernorm",
                                 "post_self_attn_layernorm", "pre_mlp_layernorm"]
    assert norms("prenorm") == ["input_layernorm", "pre_mlp_layernorm"]


def test_sandwich_post_norms_shape_the_residual_stream(model):
    """Scaling a post-norm weight must change the output (the norm is really applied)."""
    ids = _tokens()
    before = model(ids).logits
    with torch.no_grad():
        model.decoder.layers[0].post_mlp_layernorm.weight.mul_(3.0)
    assert not torch.allclose(before, model(ids).logits)


def test_ouro_loss_matches_a_direct_computation(model):
    from nemo_loop.losses.ouro_pretrain import ouro_pretraining_loss

    ids, labels = _tokens(seed=1), _tokens(seed=2)
    mask = torch.ones(2, 10)
    mask[1, :4] = 0
    output = model(ids)
    loss, metrics = ouro_pretraining_loss(output, labels, mask, entropy_beta=0.1)
    logp = torch.log_softmax(output.logits.double(), -1)  # [n, s, b, V]
    ce = -logp.gather(-1, labels.t()[None, :, :, None].expand(4, -1, -1, 1)).squeeze(-1)
    p = output.exit_probs.double()
    per_token = (p * ce).sum(0) + 0.1 * (p * p.log()).sum(0)
    expected = (per_token * mask.t()).sum() / mask.sum()
    assert abs(loss.item() - expected.item()) < 1e-5
    assert torch.allclose(metrics["ce_per_loop"].double(),
                          (ce * mask.t()).sum((1, 2)) / mask.sum(), atol=1e-5)


def test_pipeline_schedule_at_pp1_equals_plain_autograd(model):
    from nemo_loop.losses.ouro_pretrain import ouro_pretraining_loss
    from nemo_loop.models.looplm.pipeline import forward_backward_loops

    batches = [dict(input_ids=_tokens(seed=s), labels=_tokens(seed=s + 10),
                    loss_mask=torch.ones(2, 10)) for s in range(3)]

    def loss_func(batch, output):
        loss, metrics = ouro_pretraining_loss(output, batch["labels"], batch["loss_mask"])
        return loss / len(batches), metrics

    forward_backward_loops(model, batches, loss_func, num_loops=3)
    scheduled = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for batch in batches:
        loss_func(batch, model(batch["input_ids"], num_loops=3))[0].backward()
    for name, param in model.named_parameters():
        assert torch.allclose(scheduled[name], param.grad, atol=1e-6), name


def test_run_loops_and_logits_reproduce_forward(model):
    ids = _tokens()
    readouts = list(model.run_loops(ids, 3))
    assert [tuple(r.shape) for r in readouts] == [(10, 2, TINY.hidden_size)] * 3
    output = model(ids, num_loops=3)
    assert torch.equal(model.logits(readouts), output.logits)
    assert torch.equal(model.exit_logits(readouts), output.exit_logits)
    # The head is readout @ Wᵀ with the output layer's own weight when untied.
    assert model.output_weight() is model.output_layer.weight
    direct = torch.stack(readouts) @ model.output_layer.weight.T
    assert torch.allclose(model.logits(torch.stack(readouts)), direct, atol=1e-5)


def test_run_loops_rejects_bad_loop_counts(model):
    with pytest.raises(ValueError, match="num_loops"):
        model.run_loops(_tokens(), TINY.num_loops + 1)


def test_tied_head_reads_out_through_the_embedding(megatron_single_process):
    from nemo_loop.models.looplm.model import build_loop_model

    torch.manual_seed(0)
    tied = LoopModelConfig(**{**TINY.__dict__, "tie_word_embeddings": True})
    model = build_loop_model(tied.transformer_config())
    embedding = model.embedding.word_embeddings.weight
    assert model.output_layer.weight is None  # no separate head weight exists
    assert model.output_weight() is embedding
    ids = _tokens()
    readouts = torch.stack(list(model.run_loops(ids, 2)))
    logits = model.logits(readouts)
    assert torch.allclose(logits, readouts @ embedding.T, atol=1e-5)
    assert torch.equal(model(ids, num_loops=2).logits, logits)
    logits.sum().backward()  # the head's gradient lands on the embedding
    unused = torch.ones(TINY.vocab_size, dtype=torch.bool)
    unused[ids.unique()] = False  # rows the embedding lookup never touched
    assert embedding.grad[unused].abs().sum() > 0


@pytest.mark.parametrize("fields, field", [
    (dict(recompute="partial"), "model.recompute must be one of"),
    (dict(recompute_method="uniform"), "model.recompute_method applies to recompute=full"),
    (dict(recompute="full", recompute_method="random"), "model.recompute_method must be one of"),
    (dict(recompute="selective", recompute_num_layers=1),
     "model.recompute_num_layers applies to recompute=full"),
    (dict(recompute="full", recompute_num_layers=3), "model.recompute_num_layers must be in"),
    (dict(recompute="full", recompute_modules=["mlp"]),
     "model.recompute_modules applies to recompute=selective"),
    (dict(recompute="selective", recompute_modules=["moe"]), "model.recompute_modules must be"),
])
def test_bad_recompute_settings_are_refused_naming_the_field(fields, field):
    with pytest.raises(ValueError, match=field):
        LoopModelConfig(**{**TINY.__dict__, **fields}).validate(pipeline_parallel=1)


def test_recompute_maps_onto_megatrons_fields():
    full = LoopModelConfig(**{**TINY.__dict__, "recompute": "full"}).transformer_config()
    assert (full.recompute_granularity, full.recompute_method, full.recompute_num_layers) == \
        ("full", "uniform", 1)
    selective = LoopModelConfig(**{**TINY.__dict__, "recompute": "selective",
                                   "recompute_modules": ["mlp"]}).transformer_config()
    assert (selective.recompute_granularity, selective.recompute_modules) == ("selective", ["mlp"])
    assert LoopModelConfig(**TINY.__dict__).transformer_config().recompute_granularity is None
    with pytest.raises(ValueError, match="'layernorm' needs Transformer Engine"):
        LoopModelConfig(**{**TINY.__dict__, "recompute": "selective",
                           "recompute_modules": ["layernorm"]}).transformer_config()


def test_attention_backend_and_recompute_do_not_change_the_architecture():
    """A checkpoint trained with one backend/recompute loads under another."""
    from nemo_loop.models.looplm.config import architecture_differences, model_config_of

    saved = LoopModelConfig(**{**TINY.__dict__, "attention_backend": "dot_product",
                               "recompute": "full", "recompute_num_layers": 2})
    assert architecture_differences(saved, TINY) == []
    assert model_config_of(saved.transformer_config()).recompute_num_layers == 2
    assert model_config_of(saved.transformer_config()).attention_backend == "dot_product"


def test_oisd_attention_term_refuses_recompute():
    from nemo_loop.algorithms.oisd import OISDConfig
    from nemo_loop.config import CONF_DIR, load_config

    with pytest.raises(ValueError, match="oisd.attention_coef > 0 needs model.recompute none"):
        load_config(OISDConfig, CONF_DIR / "oisd.yaml", ["model.recompute=full"],
                    check_paths=False)
    config = load_config(OISDConfig, CONF_DIR / "oisd.yaml",
                         ["model.recompute=full", "oisd.attention_coef=0"], check_paths=False)
    assert config.model.recompute == "full"


def test_sdpa_attention_dropout_draws_from_megatrons_rng_tracker(megatron_single_process):
    """Training-mode dropout changes the output, is repeatable from the model-parallel RNG
    state, and is off in eval mode (as DotProductAttention's)."""
    from megatron.core import tensor_parallel
    from megatron.core.transformer.enums import AttnMaskType

    from nemo_loop.models.looplm.attention import SDPAttention

    config = LoopModelConfig(**{**TINY.__dict__, "attention_dropout": 0.5}).transformer_config()
    attention = SDPAttention(config, 1, AttnMaskType.causal, "self")
    gen = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(6, 2, heads, 16, generator=gen) for heads in (4, 2, 2))
    tracker = tensor_parallel.get_cuda_rng_tracker()

    def run():
        return attention(query, key, value, None)

    attention.eval()
    plain = run()
    attention.train()
    state = tracker.get_states()
    first = run()
    tracker.set_states(state)
    assert torch.equal(first, run())
    assert not torch.allclose(first, plain)
    attention.eval()
    assert torch.equal(run(), plain)
