"""How a reference answer sits in a prompt-set field, and the LaTeX text helpers that find it.

``plain``: the field is the answer (``27.0`` becomes ``27``); ``last_boxed``: the last
``\\boxed{}`` of the field (full MATH test ``solution``); ``after_hashes``: what follows GSM8K's
last ``####``. The math task's answer extraction (:mod:`nemo_loop.tasks.answers`) uses the same
helpers on model output.
"""

from __future__ import annotations

import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_HASH_ANSWER = re.compile(r"####\s*([^\n]+)")


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


def gold_to_text(value) -> str:
    """Reference answers arrive as str, int or float (AMC23 stores 27.0); make them LaTeX text."""
    if isinstance(value, bool):
        raise TypeError(f"a boolean is not a reference answer: {value!r}")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()
