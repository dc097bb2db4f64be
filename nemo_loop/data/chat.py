"""The Ouro tokenizer with its ChatML template.

The published Ouro configs say bos = eos = pad = 0 (``<|endoftext|>``), but ChatML turns are
delimited by ``<|im_start|>`` (id 1) and ``<|im_end|>`` (id 2): a chat reply ends at
``<|im_end|>``, so that is the stop token used for generation, and padding uses id 0.
"""

from __future__ import annotations

from pathlib import Path

from nemo_loop.data.prompts import default_data_root

DEFAULT_SYSTEM = "You are a helpful assistant."


class ChatTokenizer:
    def __init__(self, tokenizer_dir: str | Path):
        from tokenizers import Tokenizer

        path = Path(tokenizer_dir)
        if not path.is_absolute() and not path.exists():
            path = default_data_root() / path
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.im_start_id = self._special("<|im_start|>")
        self.im_end_id = self._special("<|im_end|>")
        self.pad_id = self._special("<|endoftext|>")
        self.vocab_size = self.tokenizer.get_vocab_size()

    def _special(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer has no {token} token; it is not a ChatML tokenizer")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_prompt(self, user: str, system: str = DEFAULT_SYSTEM) -> list[int]:
        """``<|im_start|>system…<|im_end|>\\n<|im_start|>user…<|im_end|>\\n<|im_start|>assistant\\n``"""
        ids = []
        for role, content in (("system", system), ("user", user)):
            ids += [self.im_start_id] + self.encode(f"{role}\n{content}") + [self.im_end_id]
            ids += self.encode("\n")
        return ids + [self.im_start_id] + self.encode("assistant\n")
