"""Prompt formatting with the Ouro tokenizer's ChatML template, and decoding of generations.

The published Ouro tokenizer_config.json says bos = eos = pad = ``<|endoftext|>`` (id 0), but its
chat template (ChatML) frames every turn with ``<|im_start|>`` (1) … ``<|im_end|>`` (2), and a chat
model ends its answer with ``<|im_end|>``. So generation stops at ``<|im_end|>`` as well as at
``<|endoftext|>``; both ids are looked up in the tokenizer, never hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
DEFAULT_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class PromptConfig:
    # Directory holding tokenizer.json (or the file itself); None: <data_root>/tokenizer/ouro-1.4b.
    tokenizer_path: str | None = None
    # The Ouro chat template inserts this system turn when none is given; null drops the turn.
    system_prompt: str | None = "You are a helpful assistant."
    instruction_suffix: str = DEFAULT_SUFFIX
    # "chatml": Ouro's chat format; "plain": problem + suffix as raw text (base models).
    template: str = "chatml"

    def validate(self) -> None:
        if self.template not in ("chatml", "plain"):
            raise ValueError(f"prompt.template must be chatml or plain, got {self.template!r}")


class ChatPrompter:
    """Problem text → prompt token ids, generated ids → text, and the ids that end an answer."""

    def __init__(self, config: PromptConfig, data_root: Path):
        from tokenizers import Tokenizer

        path = Path(config.tokenizer_path) if config.tokenizer_path else \
            data_root / "tokenizer" / "ouro-1.4b"
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist (set "
                                    f"prompt.tokenizer_path)")
        self.config = config
        self.tokenizer_file = path
        self.tokenizer = Tokenizer.from_file(str(path))
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.im_start_id = self._special_id(IM_START)
        self.im_end_id = self._special_id(IM_END)
        self.end_of_text_id = self._special_id(END_OF_TEXT)

    def _special_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer {self.tokenizer_file} has no {token} token; "
                             f"ChatML prompts need it")
        return token_id

    @property
    def stop_token_ids(self) -> list[int]:
        return sorted({self.im_end_id, self.end_of_text_id})

    def prompt_text(self, problem: str) -> str:
        user = f"{problem}\n{self.config.instruction_suffix}".strip() \
            if self.config.instruction_suffix else problem
        if self.config.template == "plain":
            return user + "\n"
        system = "" if self.config.system_prompt is None else \
            f"{IM_START}system\n{self.config.system_prompt}{IM_END}\n"
        return f"{system}{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n"

    def encode_prompt(self, problem: str) -> list[int]:
        return self.tokenizer.encode(self.prompt_text(problem), add_special_tokens=False).ids

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)
