"""Answer extraction and verification on real benchmark records; benchmark loading errors."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from nemo_loop.tasks.answers import (
    after_hash_marks,
    check_response,
    extract_answer,
    last_boxed,
    stated_answer,
)
from nemo_loop.data.prompts import PromptSetError, load_prompt_set
from nemo_loop.data.prompts import BenchmarkSpec
from nemo_loop.tasks.math import BENCHMARKS

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


def test_unboxed_final_answer_statements():
    # A complete LaTeX expression wins over its last number (this used to extract 576).
    assert extract_answer(r"The final answer is $\frac{1}{576}$.") == r"\frac{1}{576}"
    # Minerva's format: the last statement counts, trailing prose is not part of it.
    assert extract_answer("Final Answer: The final answer is $x=5$. I hope it is correct.\n"
                          "Checked 3 times.") == "x=5"
    assert extract_answer("**Answer:** \\(\\left(3, \\frac{\\pi}{2}\\right)\\)") == (
        r"\left(3, \frac{\pi}{2}\right)")
    # Display math on the next line; a full stop inside the math is sentence punctuation.
    assert extract_answer("So the answer is\n\\[\n\\frac{3}{56}.\n\\]\nAlso 7.") == r"\frac{3}{56}"
    # The statement's last math span; a full stop with a space after it ends the statement.
    assert extract_answer(r"The answer is $\frac{4}{2}$, that is $2$. Not $5$.") == "2"
    # Plain statements: an expression is taken whole, prose gives its first number.
    assert extract_answer("Answer: (3, 4]") == "(3, 4]"
    assert extract_answer("the answer is 0.15.") == "0.15"
    assert extract_answer("The answer is 18 eggs, which is more than 7.") == "18"
    assert extract_answer(r"The answer is \$1,080.") == "1080"
    assert extract_answer("the answer is Evelyn.") == "Evelyn"
    # A "!" after a digit or bracket is a factorial, not the end of the sentence (issue 23).
    assert extract_answer(r"The final answer is 2^{25} \cdot 26!.") == r"2^{25} \cdot 26!"
    assert extract_answer("The answer is (n+1)!.") == "(n+1)!"
    assert extract_answer("the answer is Evelyn!") == "Evelyn"
    verdict = check_response(r"The final answer is 2^{25} \cdot 26!.", r"2^{25} \cdot 26!")
    assert verdict.correct and verdict.error is None
    assert not check_response(r"The final answer is 2^{25} \cdot 26.", r"2^{25} \cdot 26!").correct
    # \boxed and GSM8K's #### still come first.
    assert extract_answer(r"The answer is $3$. Correction: $\boxed{4}$") == "4"
    assert extract_answer("The answer is $3$.\n#### 4") == "4"
    # A statement cut off mid-expression is skipped for an earlier complete one.
    assert stated_answer(r"Answer: $12$. Re-checking, the answer is $\frac{1}{") == "12"
    assert stated_answer(r"answer: \frac{1}{") is None
    # "answer" that starts no statement, and no statement at all.
    assert stated_answer("To answer this, add 2 and 3 to get 5.") is None
    assert extract_answer("To answer this, add 2 and 3 to get 5.") == "5"


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


# Real MATH-500 references answered without \boxed, in the forms models write them.
MATH500_UNBOXED_CASES = [
    # (unique_id, response, expected, what extraction should return)
    ("test/algebra/2584.json", r"The final answer is $\frac{14}{3}$.", True, r"\frac{14}{3}"),
    ("test/algebra/2584.json", r"The final answer is $\frac{3}{14}$.", False, r"\frac{3}{14}"),
    ("test/intermediate_algebra/1197.json", "Answer: \\(\\dfrac{3}{56}\\)", True,
     r"\dfrac{3}{56}"),
    ("test/algebra/2036.json", r"so the answer is $\sqrt{117}$.", True, r"\sqrt{117}"),
    ("test/algebra/2036.json", r"so the answer is $3\sqrt{31}$.", False, r"3\sqrt{31}"),
    ("test/precalculus/1105.json", r"The answer is $-\frac{\pi}{6}$.", True, r"-\frac{\pi}{6}"),
    ("test/precalculus/1105.json", r"The answer is $\frac{\pi}{6}$.", False, r"\frac{\pi}{6}"),
    ("test/precalculus/1199.json", "**Final Answer:** $\\pi$", True, r"\pi"),
    ("test/intermediate_algebra/558.json", "The answer is (3, 4].", True, "(3, 4]"),
    ("test/intermediate_algebra/558.json", r"The answer is $[3, 4)$.", False, "[3, 4)"),
    ("test/intermediate_algebra/47.json", "Answer: $(-2, 1)$", True, "(-2, 1)"),
    ("test/intermediate_algebra/956.json", "The final answer is $(6, 31, -1)$.", True,
     "(6, 31, -1)"),
    ("test/intermediate_algebra/956.json", "The final answer is $(6, 31, 1)$.", False,
     "(6, 31, 1)"),
    ("test/precalculus/807.json", "answer: \\(\\left(3, \\tfrac{\\pi}{2}\\right)\\)", True,
     r"\left(3, \tfrac{\pi}{2}\right)"),
    ("test/algebra/1349.json", r"The final answer is $\text{Evelyn}$.", True, r"\text{Evelyn}"),
    ("test/algebra/1349.json", "The answer is Evelyn.", True, "Evelyn"),
    ("test/algebra/1349.json", "The answer is Bob.", False, "Bob"),
    ("test/prealgebra/105.json", "The answer is east.", True, "east"),
    ("test/precalculus/990.json", "Answer: $6-5i$", True, "6-5i"),
    ("test/intermediate_algebra/662.json", r"The answer is $1 \pm \sqrt{19}$.", True,
     r"1 \pm \sqrt{19}"),
    ("test/precalculus/927.json", r"The answer is $90^\circ$.", True, r"90^\circ"),
]


@pytest.mark.parametrize("problem_id,response,expected,extracted", MATH500_UNBOXED_CASES)
def test_math500_unboxed_answers(problem_id, response, expected, extracted):
    gold = _by_id("math500", problem_id).answer
    verdict = check_response(response, gold)
    assert verdict.error is None
    assert verdict.extracted == extracted
    assert verdict.correct is expected, (gold, verdict)


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

    from nemo_loop.tasks import answers

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
