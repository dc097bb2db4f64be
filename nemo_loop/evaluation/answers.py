"""Final-answer extraction from model output and equivalence checking with math-verify.

Extraction order: the last ``\\boxed{...}`` / ``\\fbox{...}`` (braces may nest; ``\\boxed 5``
also counts), then GSM8K's ``#### n``, then the last number in the text. Equivalence is decided
by math-verify (sympy-backed: ``\\frac{1}{2}`` = ``0.5``, ``27.0`` = ``27``, intervals, sets,
``\\sqrt``), each parse and comparison under a time limit. Anything that goes wrong while checking
one sample makes that sample incorrect and is reported in ``Verdict.error``; it never propagates.
"""

from __future__ import annotations

import functools
import re
import threading
from dataclasses import dataclass

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_HASH_ANSWER = re.compile(r"####\s*([^\n]+)")


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: str | None  # the answer string taken from the response (None: nothing found)
    error: str | None = None  # why checking failed (counted as incorrect)


# ----- extraction -----

def last_boxed(text: str) -> str | None:
    """Content of the last well-formed ``\\boxed``/``\\fbox`` in ``text``.

    A truncated box (unbalanced braces, typical of a generation cut at max_new_tokens) is skipped
    in favour of an earlier complete one.
    """
    end = len(text)
    while True:
        start, command = _last_box_command(text, end)
        if start < 0:
            return None
        content = _box_argument(text, start + len(command))
        if content is not None:
            return content.strip()
        end = start


def _last_box_command(text: str, end: int) -> tuple[int, str]:
    found = [(text.rfind(command, 0, end), command) for command in _BOX_COMMANDS]
    return max(found)


def _box_argument(text: str, position: int) -> str | None:
    if position < len(text) and text[position] == "{":
        depth = 0
        for index in range(position, len(text)):
            if text[index] == "{":
                depth += 1
            elif text[index] == "}":
                depth -= 1
                if depth == 0:
                    return text[position + 1:index]
        return None
    if position < len(text) and text[position] == " ":
        # "\boxed 5": the argument is the next run of non-space characters, up to "$".
        match = re.match(r" +([^\s$]+)", text[position:])
        return match.group(1) if match else None
    return None


def after_hash_marks(text: str) -> str | None:
    """GSM8K's final answer: what follows the last ``####`` (thousands separators removed)."""
    matches = _HASH_ANSWER.findall(text)
    if not matches:
        return None
    return matches[-1].strip().replace(",", "").rstrip(".") or None


def last_number(text: str) -> str | None:
    matches = _NUMBER.findall(text)
    return matches[-1].replace(",", "") if matches else None


def extract_answer(text: str) -> str | None:
    for extractor in (last_boxed, after_hash_marks, last_number):
        answer = extractor(text)
        if answer:
            return answer
    return None


def gold_to_text(value) -> str:
    """Reference answers arrive as str, int or float (AMC23 stores 27.0); make them LaTeX text."""
    if isinstance(value, bool):
        raise TypeError(f"a boolean is not a reference answer: {value!r}")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


# ----- verification -----

def answers_match(gold: str, predicted: str, timeout_s: int = 5) -> bool:
    """Whether two answer strings are mathematically equal. Raises on parse/verify failure.

    Falls back to whitespace-insensitive string equality when math-verify can parse neither side
    into anything (e.g. unusual free text).
    """
    from math_verify import verify

    gold_parsed = _parse_latex(gold, timeout_s)
    predicted_parsed = _parse_latex(predicted, timeout_s)
    if not gold_parsed or not predicted_parsed:
        return _squash(gold) == _squash(predicted)
    return bool(verify(list(gold_parsed), list(predicted_parsed),
                       timeout_seconds=_signal_timeout(timeout_s), raise_on_error=True))


def check_response(response: str, gold, timeout_s: int = 5) -> Verdict:
    """Extract the final answer of ``response`` and compare it with ``gold``; never raises."""
    try:
        extracted = extract_answer(response)
    except Exception as error:  # noqa: BLE001 - a sample must never crash the run
        return Verdict(False, None, f"extraction: {type(error).__name__}: {error}")
    if extracted is None:
        return Verdict(False, None)
    from math_verify.errors import TimeoutException

    try:
        return Verdict(answers_match(gold_to_text(gold), extracted, timeout_s), extracted)
    # math-verify's TimeoutException derives from BaseException, so Exception alone would let a
    # slow sympy comparison end the whole run.
    except (Exception, TimeoutException) as error:  # noqa: BLE001 - sympy errors, recursion ...
        return Verdict(False, extracted, f"{type(error).__name__}: {error}"[:300])


@functools.lru_cache(maxsize=4096)
def _parse_latex(text: str, timeout_s: int):
    from math_verify import parse

    # Gold answers repeat across samples and loop budgets: caching their parse saves most of
    # the sympy time. parse() returns a fresh list, which callers only read.
    return tuple(parse(f"${text}$", parsing_timeout=_signal_timeout(timeout_s),
                       raise_on_error=True))


def _signal_timeout(timeout_s: int) -> int | None:
    """math-verify bounds its work with SIGALRM, which only the main thread may set."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("answer verification must run in the main thread: its time limit "
                           "uses SIGALRM")
    return max(1, int(timeout_s))


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def math_verifier(response_text: str, gold) -> tuple[str | None, bool]:
    """The (extracted answer, is it correct) pair LLOPSD's contexts and metrics use."""
    verdict = check_response(response_text, gold)
    return verdict.extracted, verdict.correct


def check_exact(response: str, gold) -> Verdict:
    """Synthetic tasks whose answer is one word: the response's first word must equal it."""
    words = response.split()
    if not words:
        return Verdict(False, None)
    return Verdict(words[0] == gold_to_text(gold), words[0])


ANSWER_CHECKERS = ("math", "exact")


def check_answer(checker: str, response: str, gold, timeout_s: int = 5) -> Verdict:
    """``math``: final answer + math-verify equivalence; ``exact``: first word equals gold."""
    if checker == "exact":
        return check_exact(response, gold)
    if checker == "math":
        return check_response(response, gold, timeout_s)
    raise ValueError(f"answer checker must be one of {ANSWER_CHECKERS}, got {checker!r}")


def verifier_for(checker: str):
    """The (response text, gold) → (extracted, correct) callable LLOPSD takes."""
    if checker not in ANSWER_CHECKERS:
        raise ValueError(f"answer checker must be one of {ANSWER_CHECKERS}, got {checker!r}")

    def verifier(response_text: str, gold) -> tuple[str | None, bool]:
        verdict = check_answer(checker, response_text, gold)
        return verdict.extracted, verdict.correct
    return verifier
