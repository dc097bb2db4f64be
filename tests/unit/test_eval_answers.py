"""Answer extraction and verification on real benchmark records; benchmark loading errors."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from nemo_loop.evaluation.answers import (
    after_hash_marks,
    check_response,
    extract_answer,
    last_boxed,
)
from nemo_loop.data.prompts import PromptSetError, load_prompt_set
from nemo_loop.evaluation.benchmarks import BENCHMARKS, BenchmarkSpec

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"benchmark data not found at {DATA}")


def _by_id(benchmark: str, problem_id: str):
    problems = {p.id: p for p in load_prompt_set(BENCHMARKS[benchmark], DATA)}
    return problems[problem_id]


# ----- extraction -----

def test_last_boxed_handles_nesting_fbox_spaces_and_truncation():
    assert last_boxed(r"so $\boxed{\frac{\sqrt{3}}{3}}$.") == r"\frac{\sqrt{3}}{3}"
    assert last_boxed(r"\boxed{1} then \boxed{2}") == "2"
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed(r"answer: $\boxed 5$") == "5"
    # A generation cut mid-box falls back to the last complete box.
    assert last_boxed(r"\boxed{3} or maybe \boxed{\frac{1}{") == "3"
    assert last_boxed("no box here") is None


def test_extract_answer_fallbacks():
    assert extract_answer("She has 3 + 15 = 18 eggs.\n#### 18") == "18"
    assert after_hash_marks("#### 1,234") == "1234"
    assert extract_answer("The total is 1,080 dollars, not 7.") == "7"
    assert extract_answer("so the answer is -2.5") == "-2.5"
    assert extract_answer("nothing numeric") is None


# ----- verification on real records -----

MATH500_CASES = [
    # (unique_id, response, expected)
    ("test/precalculus/807.json", r"Thus $\boxed{(3, \frac{\pi}{2})}$.", True),
    ("test/precalculus/807.json", r"$\boxed{(3, \pi)}$", False),
    ("test/algebra/1519.json", r"$\boxed{\frac{\sqrt{3}}{3}}$", True),  # nested braces
    ("test/algebra/1519.json", r"$\boxed{\frac{1}{\sqrt{3}}}$", True),
    ("test/algebra/2036.json", r"\boxed{\sqrt{117}}", True),  # 3\sqrt{13}
    ("test/algebra/2036.json", r"\boxed{\sqrt{13}}", False),
    ("test/prealgebra/1558.json", r"\boxed{\frac{5}{4}}", True),  # gold 1.25
    ("test/intermediate_algebra/558.json", r"\boxed{(3, 4]}", True),  # interval
    ("test/intermediate_algebra/558.json", r"\boxed{[3, 4]}", False),
    ("test/intermediate_algebra/662.json", r"\boxed{1+\sqrt{19}, 1-\sqrt{19}}", True),
    ("test/algebra/1349.json", r"\boxed{\text{Evelyn}}", True),  # text answer
    ("test/algebra/1349.json", r"\boxed{\text{Bob}}", False),
    ("test/counting_and_probability/508.json", r"\boxed{10080}", True),  # gold 10,\!080
    ("test/prealgebra/1003.json", r"\boxed{\frac{270}{7}}", True),  # gold has \text{ degrees}
]


@pytest.mark.parametrize("problem_id,response,expected", MATH500_CASES)
def test_math500_equivalences(problem_id, response, expected):
    gold = _by_id("math500", problem_id).answer
    verdict = check_response(response, gold)
    assert verdict.error is None
    assert verdict.correct is expected, (gold, verdict)


def test_amc23_float_gold_matches_integer_answer():
    problem = _by_id("amc23", "0")
    assert problem.answer == "27"  # stored as 27.0
    assert check_response(r"They meet $\boxed{27}$ miles from A.", 27.0).correct
    assert check_response(r"\boxed{27.0}", problem.answer).correct
    assert not check_response(r"\boxed{18}", problem.answer).correct


def test_aime24_plain_number_answers():
    problem = _by_id("aime24", "60")
    assert problem.answer == "204"
    assert check_response(r"The walk takes \boxed 204 minutes", problem.answer).correct
    assert check_response("so the answer is 204.", problem.answer).correct
    assert check_response(r"\boxed{0204}", problem.answer).correct
    assert not check_response(r"\boxed{240}", problem.answer).correct


def test_decimal_against_fraction_gold():
    assert check_response(r"\boxed{0.5}", r"\frac{1}{2}").correct
    assert check_response(r"\boxed{\dfrac{3}{2}}", "1.5").correct


def test_failures_are_incorrect_not_crashes():
    verdict = check_response("no answer at all", "5")
    assert not verdict.correct and verdict.extracted is None and verdict.error is None
    weird = check_response(r"\boxed{\frac{}{}^^}", r"\frac{1}{2}")
    assert not weird.correct


# ----- benchmark registry and loader -----

@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_registered_benchmark_loads(name):
    problems = load_prompt_set(replace(BENCHMARKS[name], limit=5), DATA)
    assert len(problems) == 5 and all(p.problem and p.answer for p in problems)


def test_answers_from_solution_box_and_hash_marks():
    gsm8k = load_prompt_set(replace(BENCHMARKS["gsm8k"], limit=1), DATA)[0]
    assert gsm8k.answer == "18"
    full = {p.id: p for p in load_prompt_set(replace(BENCHMARKS["math_test_full"], limit=10),
                                             DATA)}
    assert full["2"].answer == r"\dfrac{9}{7}"


def test_full_math500_and_small_sets_have_expected_sizes():
    assert len(load_prompt_set(BENCHMARKS["math500"], DATA)) == 500
    assert len(load_prompt_set(BENCHMARKS["aime24"], DATA)) == 30
    assert len(load_prompt_set(BENCHMARKS["amc23"], DATA)) == 40


def test_custom_file_with_field_mapping(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([{"q": "1+1?", "sol": r"It is \boxed{2}."}]))
    spec = BenchmarkSpec(name="mine", path=str(path), problem_field="q", answer_field="sol",
                         answer_format="last_boxed")
    [problem] = load_prompt_set(spec)
    assert problem.answer == "2" and problem.problem == "1+1?"


def test_malformed_record_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "a", "answer": "1"}\n{"problem": "b", "answer": \n')
    with pytest.raises(PromptSetError, match=r"bad\.jsonl:2: malformed JSON"):
        load_prompt_set(BenchmarkSpec(name="bad", path=str(path)))


def test_missing_field_names_field_file_and_line(tmp_path):
    path = tmp_path / "missing.jsonl"
    path.write_text('{"problem": "a", "answer": "1"}\n{"problem": "b", "solution": "2"}\n')
    with pytest.raises(PromptSetError, match=r"missing\.jsonl:2: missing field 'answer'"):
        load_prompt_set(BenchmarkSpec(name="missing", path=str(path)))


def test_verification_timeout_is_an_incorrect_sample_with_an_error(monkeypatch):
    from math_verify.errors import TimeoutException

    from nemo_loop.evaluation import answers

    def times_out(*args, **kwargs):
        raise TimeoutException("Operation timed out!")

    monkeypatch.setattr(answers, "answers_match", times_out)
    verdict = answers.check_response(r"\boxed{2}", "2")
    assert not verdict.correct and verdict.extracted == "2"
    assert verdict.error.startswith("TimeoutException")


def test_slow_sympy_comparison_is_cut_off_by_the_time_limit(monkeypatch):
    import time

    import math_verify.grader

    def hangs(*args, **kwargs):  # stands in for a sympy simplification that never ends
        time.sleep(60)

    monkeypatch.setattr(math_verify.grader, "sympy_expr_eq", hangs)
    started = time.perf_counter()
    verdict = check_response(r"\boxed{(x+1)^{2}}", r"x^2+2x+1", timeout_s=1)
    assert not verdict.correct and "Timeout" in verdict.error
    assert time.perf_counter() - started < 15
