"""Final-answer extraction from model output and equivalence checking with math-verify.

Extraction order: the last ``\\boxed{...}`` / ``\\fbox{...}`` (braces may nest; ``\\boxed 5``
also counts), then GSM8K's ``#### n``, then the last unboxed answer statement ("The final answer
is $\\frac{1}{576}$.", "Answer: (3, 4]"), then the last number in the text. Equivalence is decided
by math-verify (sympy-backed: ``\\frac{1}{2}`` = ``0.5``, ``27.0`` = ``27``, intervals, sets,
``\\sqrt``), each parse and comparison under a time limit. Anything that goes wrong while checking
one sample makes that sample incorrect and is reported in ``Verdict.error``; it never propagates.
"""

from __future__ import annotations

import functools
import re
import threading
from dataclasses import dataclass

from nemo_loop.data.answer_formats import after_hash_marks, gold_to_text, last_boxed

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
# "answer is", "answer:", "Answer = ", "**Final Answer:**", "answer would be"; what follows (after
# any markdown bold or colon) is the statement.
_ANSWER_MARKER = re.compile(r"\banswer\b\**\s*(?:is\b|would\s+be\b|=|:)[\s*:]*", re.IGNORECASE)
# Longer openers first: "$$" must not be read as an empty "$...$".
_MATH_DELIMITERS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))
_LATEX_COMMAND = re.compile(r"\\(?:text|mathrm|textbf|mbox)\{[^{}]*\}|\\[A-Za-z]+")
_WORD = re.compile(r"[A-Za-z]{2,}")
# Sentence punctuation after a plain answer; a "!" right after a digit or a closing bracket is
# a factorial ("26!", "(n+1)!"), not an exclamation.
_TRAILING_PUNCTUATION = re.compile(r"(?:[.,;:]|(?<![\d)}\]])!)+$")
_MATH_WORDS = frozenset({"pi", "sin", "cos", "tan", "cot", "log", "ln", "exp", "sqrt", "inf"})


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: str | None  # the answer string taken from the response (None: nothing found)
    error: str | None = None  # why checking failed (counted as incorrect)


# ----- extraction -----

def stated_answer(text: str) -> str | None:
    """The answer of the last unboxed answer statement ("the final answer is ...", "Answer: ...").

    A statement runs to the end of its line or sentence (a full stop outside math). When it holds
    math (``$...$``, ``$$...$$``, ``\\(...\\)``, ``\\[...\\]``) the last math span is the answer,
    so ``$\\frac{1}{576}$`` gives the whole fraction rather than 576. Otherwise the plain text is
    the answer when it reads as one expression (``(3, 4]``, ``\\frac{1}{2}``, ``x = 5``, ``Evelyn``)
    and its first number when it is prose ("18 eggs, which is more than 7" → 18).
    """
    for marker in reversed(list(_ANSWER_MARKER.finditer(text))):
        maths, plain = _split_statement(text, marker.end())
        answer = maths[-1] if maths else _plain_answer(plain)
        if answer:
            return answer
    return None


def _split_statement(text: str, start: int) -> tuple[list[str], str]:
    """The math spans and the plain text of the statement that begins at ``start``."""
    maths, plain = [], []
    index = start
    while index < len(text):
        if text.startswith("\\$", index):  # an escaped dollar sign is currency, not math
            index += 2
            continue
        delimiter = next((pair for pair in _MATH_DELIMITERS if text.startswith(pair[0], index)),
                         None)
        if delimiter is not None:
            opener, closer = delimiter
            end = text.find(closer, index + len(opener))
            if end < 0:
                if opener == "$":  # a lone dollar sign is currency ("the answer is $18.")
                    index += 1
                    continue
                break  # math cut off by the end of the generation
            content = _strip_math(text[index + len(opener):end])
            if content:
                maths.append(content)
            index = end + len(closer)
            continue
        char = text[index]
        if char == "\n" or (char == "." and (index + 1 == len(text) or text[index + 1].isspace())):
            break
        plain.append(char)
        index += 1
    return maths, "".join(plain)


def _strip_math(content: str) -> str:
    content = content.strip().removeprefix("\\displaystyle").strip()
    # Sentence punctuation written inside the math ("$\\frac{1}{576}.$") is not part of it.
    return re.sub(r"(?:[.,;]|\\[,;!]|\\quad)+$", "", content).strip()


def _plain_answer(plain: str) -> str | None:
    answer = _TRAILING_PUNCTUATION.sub("", plain.strip().strip("*").strip()).strip()
    if not answer or answer.count("{") != answer.count("}"):  # empty, or cut off mid-expression
        return None
    words = set(_WORD.findall(_LATEX_COMMAND.sub(" ", answer))) - _MATH_WORDS
    numbers = _NUMBER.findall(answer)
    if words and numbers:  # prose around a number: "204 minutes", "18 eggs, more than 7"
        return numbers[0].replace(",", "")
    if _NUMBER.fullmatch(answer):  # "1,080": thousands separators, not a pair
        return answer.replace(",", "")
    return answer


def last_number(text: str) -> str | None:
    matches = _NUMBER.findall(text)
    return matches[-1].replace(",", "") if matches else None


def extract_answer(text: str) -> str | None:
    for extractor in (last_boxed, after_hash_marks, stated_answer, last_number):
        answer = extractor(text)
        if answer:
            return answer
    return None


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


def check_exact(response: str, gold) -> Verdict:
    """Synthetic tasks whose answer is one word: the response's first word must equal it."""
    words = response.split()
    if not words:
        return Verdict(False, None)
    return Verdict(words[0] == gold_to_text(gold), words[0])
