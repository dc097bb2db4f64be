"""Prompts in the Ouro tokenizer's ChatML format, and decoding of generations.

The published Ouro tokenizer_config.json says bos = eos = pad = ``<|endoftext|>`` (id 0), but
its chat template (ChatML) frames every turn with ``<|im_start|>`` (1) … ``<|im_end|>`` (2), and a
chat model ends its answer with ``<|im_end|>``. So generation stops at ``<|im_end|>`` as well as at
``<|endoftext|>``, and padding uses ``<|endoftext|>``; all ids are looked up in the tokenizer,
never hard-coded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from nemo_loop.data.prompts import data_path

IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
TEMPLATES = ("chatml", "plain")
DEFAULT_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class ChatConfig:
    # Directory holding tokenizer.json, or the file itself; relative paths are under the data root.
    tokenizer_path: str = "tokenizer/ouro-1.4b"
    # The Ouro chat template inserts this system turn when none is given; null drops the turn.
    system_prompt: str | None = "You are a helpful assistant."
    # Appended to every problem on its own line: the one place the answer instruction lives.
    instruction_suffix: str = DEFAULT_SUFFIX
    # "chatml": Ouro's chat format; "plain": the user message as raw text (base models).
    template: str = "chatml"

    def validate(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"prompt.template must be one of {TEMPLATES}, got "
                             f"{self.template!r}")


class ChatTokenizer:
    """Problem text → prompt token ids, generated ids → text, and the ids that end an answer."""

    def __init__(self, config: ChatConfig, tokenizer, source: str):
        """``tokenizer``: a ``tokenizers.Tokenizer``; ``source`` names where it came from (a
        file, or the task that built it) in messages and in checkpoint metadata."""
        self.config = config
        self.source = source
        self.tokenizer = tokenizer
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.im_start_id = self._special_id(IM_START)
        self.im_end_id = self._special_id(IM_END)
        self.pad_id = self._special_id(END_OF_TEXT)
        # Word-level task tokenizers map unknown words to an unk token; byte-level BPE has none.
        self.unknown_id = self.tokenizer.token_to_id("<unk>")

    @classmethod
    def from_file(cls, config: ChatConfig, data_root: str | os.PathLike | None = None
                  ) -> "ChatTokenizer":
        """``config.tokenizer_path``: a ``tokenizer.json`` or its directory (relative paths are
        under the data root)."""
        from tokenizers import Tokenizer

        path = data_path(config.tokenizer_path, data_root)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist (set "
                                    f"task.math.prompt.tokenizer_path)")
        return cls(config, Tokenizer.from_file(str(path)), str(path))

    def check_fits(self, vocab_size: int) -> None:
        """The model's embedding must have a row for every token id."""
        if self.vocab_size > vocab_size:
            raise ValueError(f"tokenizer {self.source} has {self.vocab_size} tokens but "
                             f"model.vocab_size is only {vocab_size}")

    def _special_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer {self.source} has no {token} token; ChatML "
                             f"prompts need it")
        return token_id

    @property
    def stop_token_ids(self) -> list[int]:
        return sorted({self.im_end_id, self.pad_id})

    def user_message(self, problem: str, context: str | None = None) -> str:
        """Problem and instruction suffix, then ``context`` (LLOPSD's privileged teacher context)
        after a blank line: the student's and the teacher's messages differ only by it."""
        suffix = self.config.instruction_suffix
        message = f"{problem}\n{suffix}".strip() if suffix else problem.strip()
        return f"{message}\n\n{context}" if context else message

    def prompt_text(self, problem: str, context: str | None = None) -> str:
        """As the tokenizer's ``chat_template`` renders it with ``add_generation_prompt``."""
        return self.render_chat([{"role": "user", "content": self.user_message(problem, context)}])

    def render_chat(self, messages: list[dict[str, str]],
                    add_generation_prompt: bool = True) -> str:
        """A chat history (``{"role", "content"}`` dicts) in this template, verbatim: no
        instruction suffix is added (lm-eval tasks word their own instructions).

        chatml: the configured system turn first unless the history starts with one, every turn
        framed by ``<|im_start|>role`` … ``<|im_end|>``, then the assistant's opening; with
        ``add_generation_prompt=False`` the last turn is left open for the model to continue.
        plain: each message's text on its own line (the last one's newline omitted when it is
        left open)."""
        if self.config.template == "plain":
            text = "".join(message["content"] + "\n" for message in messages)
            return text if add_generation_prompt else text.removesuffix("\n")
        if (not messages or messages[0]["role"] != "system") and \
                self.config.system_prompt is not None:
            messages = [{"role": "system", "content": self.config.system_prompt}, *messages]
        turns = [f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages]
        if add_generation_prompt:
            return "".join(turns) + f"{IM_START}assistant\n"
        return "".join(turns).removesuffix(f"{IM_END}\n")

    def encode_prompt(self, problem: str, context: str | None = None) -> list[int]:
        return self._encode(self.prompt_text(problem, context), "prompt")

    def encode_text(self, text: str) -> list[int]:
        """Any text, as it stands (special tokens written in it are recognised)."""
        return self._encode(text, "text")

    def encode_response(self, text: str) -> list[int]:
        """A reference response as the model should write it after the prompt (supervised
        targets): the text's tokens, then the end of turn."""
        return self._encode(text.strip(), "response") + [self.im_end_id]

    def _encode(self, text: str, what: str) -> list[int]:
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        if self.unknown_id is not None and self.unknown_id in encoding.ids:
            words = sorted({text[start:end] for (start, end), i in
                            zip(encoding.offsets, encoding.ids) if i == self.unknown_id})
            raise ValueError(f"{what} has words outside the vocabulary of "
                             f"{self.source}: {words} ({what}: {text!r})")
        return encoding.ids

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)
