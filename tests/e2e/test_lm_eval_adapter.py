"""The lm-eval adapter on a shell-game model pretrained here for a few dozen steps (its accuracy
depends on the loop budget, so the comparisons below are not between constants).

* loglikelihood = the model's own log-prob sum (a plain forward, full-vocabulary log-softmax);
* loglikelihood_rolling = the same sum over lm-eval's rolling windows;
* greedy generate_until = the native engine's greedy output, cut at the stop strings;
* the shell game as lm-eval tasks through ``lm_eval.simple_evaluate`` (the sweep recipe) scores
  every game as ``recipes/evaluate.py`` does, at every loop budget.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow  # pretraining and evaluate.py run as subprocesses

ROOT = Path(__file__).resolve().parents[2]
SWAPS = 5  # short games: a few dozen steps of pretraining get well above chance on some budgets
SHELL_GAME = ["task.name=shell_game", f"task.shell_game.num_swaps={SWAPS}"]
BUDGETS = [1, 4]
GAMES = 48


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain")
    run = subprocess.run(
        [sys.executable, "recipes/pretrain_looplm.py", "trainer.max_steps=60",
         "trainer.log_interval=30", "trainer.eval_interval=0", "optim.warmup_steps=10",
         "validation_problems=16", "test_problems=16", *SHELL_GAME, f"output_dir={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return out / "model"


@pytest.fixture(scope="module")
def adapter_args(pretrained):
    from nemo_loop.evaluation.lm_eval_config import LMEvalModelArgs

    return LMEvalModelArgs.from_kwargs({"checkpoint": str(pretrained), "batch_size": 3,
                                        **dict(o.split("=") for o in SHELL_GAME)})


@pytest.fixture(scope="module")
def loaded(adapter_args, megatron_single_process):
    from nemo_loop.evaluation.lm_eval_model import build_model, prepare_model

    return build_model(prepare_model(adapter_args, BUDGETS), adapter_args)


@pytest.fixture(scope="module")
def untrained(megatron_single_process):
    """A random model over the shell game's 14 words (+2 unused ids): unlike the pretrained
    one, which answers one cup and stops, it writes sentences of varied length."""
    from nemo_loop.evaluation.lm_eval_model import LoadedModel
    from nemo_loop.models.looplm.config import LoopModelConfig
    from nemo_loop.models.looplm.model import build_loop_model
    from nemo_loop.tasks.shell_game import ShellGameConfig, ShellGameTask

    torch.manual_seed(7)
    config = LoopModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64,
                             num_attention_heads=4, vocab_size=16, max_sequence_length=64,
                             num_loops=4, init_std=0.3)
    model = build_loop_model(config.transformer_config()).eval()
    return LoadedModel(model, ShellGameTask(ShellGameConfig()).tokenizer(), checkpoint={})


def _adapter(loaded, args, **changes):
    from dataclasses import replace

    from nemo_loop.evaluation.lm_eval_adapter import NemoLoopLM

    return NemoLoopLM(loaded, replace(args, **changes))


def _request(kind, *arguments, task="probe"):
    from lm_eval.api.instance import Instance

    return Instance(kind, doc={}, arguments=tuple(arguments), idx=0, metadata=(task, 0, 1))


def _games(count, split="test"):
    from nemo_loop.tasks.shell_game import ShellGameConfig, problems

    return problems(ShellGameConfig(num_swaps=SWAPS), split, count)


def _reference_logprobs(model, ids: list[int], num_loops: int) -> torch.Tensor:
    """log p(ids[t+1] | ids[:t+1]) at loop num_loops: the model's forward, full softmax."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]), num_loops=num_loops,
                       logit_loops=[num_loops]).logits[0, :, 0].double()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_loglikelihood_is_the_models_logprob_sum(loaded, adapter_args):
    games = _games(4)
    requests = [_request("loglikelihood", g.text, f" {cup}") for g in games for cup in "012"]
    requests.append(_request("loglikelihood", games[0].text, " 2 0-1 ball"))  # 3 tokens
    requests.append(_request("loglikelihood", "", games[1].text))  # empty context: <|endoftext|>
    prompter = loaded.prompter
    for loops in BUDGETS:
        lm = _adapter(loaded, adapter_args, num_loops=loops)
        got = lm.loglikelihood(requests)
        one_batch = _adapter(loaded, adapter_args, num_loops=loops,
                             batch_size=64).loglikelihood(requests)
        assert [g for _, g in got] == [g for _, g in one_batch]  # batching changes nothing
        assert [p for p, _ in got] == pytest.approx([p for p, _ in one_batch], abs=1e-5)
        for request, (logprob, greedy) in zip(requests, got):
            context, continuation = request.args
            context_ids = prompter.encode_text(context) if context else [prompter.pad_id]
            continuation_ids = prompter.encode_text(continuation)
            ids = context_ids + continuation_ids
            reference = _reference_logprobs(loaded.model, ids, loops)[-len(continuation_ids):]
            assert logprob == pytest.approx(float(reference.sum()), abs=1e-5), request.args
            with torch.no_grad():
                argmax = loaded.model(torch.tensor([ids[:-1]]), num_loops=loops).logits[
                    -1, -len(continuation_ids):, 0].argmax(-1)
            assert greedy == bool((argmax == torch.tensor(continuation_ids)).all())
        greedy_flags = [g for _, g in got[:12]]
        assert any(greedy_flags) and not all(greedy_flags)  # one cup of three per game
        assert lm.mean_loops() == {"probe": {"tokens": 12 + 3 + len(prompter.encode_text(
            games[1].text)), "mean_loops": float(loops)}}


def test_registered_with_lm_eval_and_built_from_its_model_args(pretrained, loaded,
                                                               adapter_args):
    from lm_eval.api.registry import get_model

    import nemo_loop.evaluation.lm_eval_adapter as adapter

    model_class = get_model("nemo_loop")
    assert model_class is adapter.NemoLoopLM
    assert get_model("dummy").__name__ == "DummyLM"  # lm-eval's own models still resolve
    shell_game = ",".join(SHELL_GAME)
    lm = model_class.create_from_arg_string(f"checkpoint={pretrained},num_loops=2,{shell_game}",
                                            {"batch_size": 5})
    assert (lm.num_loops, lm.args.batch_size, lm.args.task.shell_game.num_swaps) == (2, 5, SWAPS)
    requests = [_request("loglikelihood", g.text, f" {g.answer}") for g in _games(3)]
    reference = _adapter(loaded, adapter_args, num_loops=2).loglikelihood(requests)
    assert [p for p, _ in lm.loglikelihood(requests)] == pytest.approx(
        [p for p, _ in reference], abs=1e-5)
    with pytest.raises(ValueError, match=r"loop budget\(s\) \[9\] outside 1..R = 1..4"):
        model_class.create_from_arg_string(f"checkpoint={pretrained},num_loops=9,{shell_game}")


def test_loglikelihood_rolling_follows_lm_evals_windows(loaded, adapter_args):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    text = " ".join(g.text + " " + g.answer for g in _games(3))  # 30 words
    prompter = loaded.prompter
    ids = prompter.encode_text(text)
    whole = _adapter(loaded, adapter_args, num_loops=4)
    whole_sum = float(_reference_logprobs(loaded.model, [prompter.pad_id] + ids, 4).sum())
    (got,) = whole.loglikelihood_rolling([_request("loglikelihood_rolling", text)])
    assert got == pytest.approx(whole_sum, abs=1e-5)  # fits the context: one window

    windowed = _adapter(loaded, adapter_args, num_loops=4, max_length=8)
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
        ids, prefix_token=prompter.pad_id, max_seq_len=8, context_len=1)]
    assert len(windows) == 4
    expected = sum(float(_reference_logprobs(loaded.model, context + predicted, 4)
                         [-len(predicted):].sum()) for context, predicted in windows)
    (got,) = windowed.loglikelihood_rolling([_request("loglikelihood_rolling", text)])
    assert got == pytest.approx(expected, abs=1e-5)
    assert abs(got - whole_sum) > 1e-3  # the windows' shorter contexts change the score


def test_greedy_generate_until_is_the_native_engines_output(untrained):
    from nemo_loop.evaluation.lm_eval_config import LMEvalModelArgs
    from nemo_loop.generation import NativeLoopEngine, SamplingParams

    adapter_args = LMEvalModelArgs(checkpoint="(in memory)", batch_size=3)

    loaded, prompter = untrained, untrained.prompter
    # Games, a training-length game and prompts off the task's format (longer generations).
    contexts = [g.text for g in _games(5)] + [_games(1, "train")[0].text, "0-1 0-2",
                                               "ball 1 | 1-2 = 2 ball"]
    kwargs = {"until": ["never"], "max_gen_toks": 6, "do_sample": False}
    engine = NativeLoopEngine(loaded.model)
    for loops in BUDGETS:
        reference = engine.generate([prompter.encode_text(c) for c in contexts], loops,
                                    SamplingParams(temperature=0, max_new_tokens=6,
                                                   stop_token_ids=prompter.stop_token_ids))
        texts = [prompter.decode(r.token_ids) for r in reference]
        lm = _adapter(loaded, adapter_args, num_loops=loops)
        got = lm.generate_until([_request("generate_until", c, kwargs) for c in contexts])
        assert got == texts
        assert len(set(texts)) > 2 and max(len(t.split()) for t in texts) > 2
        assert lm.mean_loops()["probe"] == {"tokens": sum(r.length for r in reference),
                                            "mean_loops": float(loops)}
        # A stop string cuts the text where it first occurs.
        longest = max(texts, key=len)
        stop = longest.split()[1]
        cut = _adapter(loaded, adapter_args, num_loops=loops, batch_size=1).generate_until(
            [_request("generate_until", c, {**kwargs, "until": [stop]}) for c in contexts])
        assert cut == [t.split(stop)[0] for t in texts] and cut != texts


def test_exit_policy_reaches_the_engine(untrained):
    """generation.exit rides on SamplingParams; each token counts at its exit loop."""
    from dataclasses import replace

    from nemo_loop.evaluation.lm_eval_config import LMEvalModelArgs
    from nemo_loop.generation import NativeLoopEngine, SamplingParams
    from nemo_loop.generation.exit import ExitConfig

    contexts = [g.text for g in _games(4)] + ["0-1 0-2", "ball 1 | 1-2 = 2 ball"]
    requests = [_request("generate_until", c, {"max_gen_toks": 5}) for c in contexts]
    args = LMEvalModelArgs(checkpoint="(in memory)", num_loops=4, batch_size=4)
    engine = NativeLoopEngine(untrained.model)
    for threshold in (0.0, 0.2, float("inf")):  # exit at loop 1 / sometimes / never
        exit_config = ExitConfig("confidence", threshold)
        lm = _adapter(untrained, args, generation=replace(args.generation, exit=exit_config))
        reference = engine.generate(
            [untrained.prompter.encode_text(c) for c in contexts], 4, SamplingParams(
                temperature=0, max_new_tokens=5, stop_token_ids=untrained.prompter.stop_token_ids,
                exit=exit_config))
        assert lm.generate_until(requests) == [untrained.prompter.decode(r.token_ids)
                                               for r in reference]
        loops = [loop for r in reference for loop in r.exit_loops]
        assert lm.mean_loops()["probe"]["mean_loops"] == pytest.approx(sum(loops) / len(loops))
        assert (sum(loops) / len(loops) == 1.0) == (threshold == 0.0)
        with pytest.raises(NotImplementedError, match="log-likelihoods under an exit policy"):
            lm.loglikelihood([_request("loglikelihood", contexts[0], " 1")])


def test_unsupported_generation_kwargs_are_named(loaded, adapter_args):
    lm = _adapter(loaded, adapter_args, num_loops=1)
    with pytest.raises(ValueError, match=r"task 'probe': generation_kwargs \['num_beams'\]"):
        lm.generate_until([_request("generate_until", "ball", {"num_beams": 4})])


def test_shell_game_tasks_score_every_game_like_the_evaluate_recipe(pretrained, tmp_path,
                                                                    megatron_single_process):
    """lm-eval's shell_game_gen generates greedily and compares the first word; evaluate.py
    generates greedily and checks the first word: every game must agree. shell_game_mc picks
    the cup of highest log-likelihood; where the greedy token is one of the cups (its
    is_greedy flag, checked), that cup *is* the greedy answer, so it must agree as well."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lm_eval_sweep_recipe",
                                                  ROOT / "recipes" / "lm_eval_sweep.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    sweep = tmp_path / "sweep"
    recipe.main([f"model_args.checkpoint={pretrained}",
                 *[f"model_args.{o}" for o in SHELL_GAME], "model_args.batch_size=16",
                 f"shell_game_tasks.problems={GAMES}", "tasks=[shell_game_mc,shell_game_gen]",
                 f"loop_budgets={BUDGETS}", "bootstrap_iters=0", f"output_dir={sweep}"])
    games = sweep / "lm_eval_tasks" / "shell_game_test.jsonl"
    run = subprocess.run(
        [sys.executable, "recipes/evaluate.py", f"checkpoint={pretrained}", *SHELL_GAME,
         "benchmarks=[]", f"custom.path={games}", "custom.name=shell_game", "custom.id_field=id",
         "n_samples=1", "pass_at_k=[1]", "sampling.temperature=0", "sampling.max_new_tokens=2",
         f"loop_budgets={BUDGETS}", f"output_dir={tmp_path / 'evaluate'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    evaluated = {(s["num_loops"], int(s["problem_id"])): s["correct"] for s in _jsonl(
        tmp_path / "evaluate" / "samples.jsonl")}
    samples = _jsonl(sweep / "samples.jsonl")
    results = json.loads((sweep / "results.json").read_text())["tasks"]
    for loops in BUDGETS:
        generated = {s["doc_id"]: s["exact_match"] for s in samples
                     if s["task"] == "shell_game_gen" and s["num_loops"] == loops}
        chosen = {s["doc_id"]: s for s in samples
                  if s["task"] == "shell_game_mc" and s["num_loops"] == loops}
        assert sorted(generated) == sorted(chosen) == list(range(GAMES))
        reference = [evaluated[(loops, game)] for game in range(GAMES)]
        assert 0 < sum(reference) < GAMES
        assert [bool(generated[g]) for g in range(GAMES)] == reference
        assert all(any(greedy for _, greedy in chosen[g]["filtered_resps"])
                   for g in range(GAMES)), "a greedy token that is no cup: train longer"
        assert [bool(chosen[g]["acc"]) for g in range(GAMES)] == reference
        for task in ("shell_game_mc", "shell_game_gen"):
            (entry,) = [e for e in results[task] if e["num_loops"] == loops]
            assert entry["metrics"][entry["primary_metric"]] == pytest.approx(
                sum(reference) / GAMES)
            assert entry["mean_loops"] == loops and entry["documents"] == GAMES

    table = (sweep / "results.md").read_text()
    accuracy = sum(evaluated[(1, g)] for g in range(GAMES)) / GAMES
    assert f"| shell_game_mc | acc | 1 | {accuracy:.3f} |" in table
    assert f"| shell_game_gen | exact_match (first_word) | 1 | {accuracy:.3f} |" in table
    assert (sweep / "accuracy_vs_loops.png").read_bytes()[:4] == b"\x89PNG"
    logged = _jsonl(sweep / "metrics.jsonl")
    assert [entry["step"] for entry in logged] == BUDGETS
    assert logged[0]["shell_game_mc/acc,none"] == pytest.approx(accuracy)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
