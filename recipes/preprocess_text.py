"""Tokenize JSONL/JSON text into megatron-core's indexed .bin/.idx corpus (+ .meta.json).

    python recipes/preprocess_text.py [--config conf/preprocess_text.yaml] [key=value ...]
    python recipes/preprocess_text.py input=/data/web.jsonl text_fields=[text] exclude=null \
        output_prefix=runs/data/web

Defaults: the MATH problems + solutions of math_test_full that are not in MATH500 (PRM800K's
train split, 4,500 documents) → runs/data/math_text. See nemo_loop/data/text_preprocessing.py.
"""

from __future__ import annotations

from nemo_loop.config import config_from_command_line
from nemo_loop.data.text_preprocessing import PreprocessConfig, preprocess


def main(argv: list[str] | None = None) -> None:
    config = config_from_command_line(PreprocessConfig, "preprocess_text.yaml", __doc__, argv)
    metadata = preprocess(config)
    print(f"wrote {config.output_prefix}.bin/.idx/.meta.json: {metadata['documents']} documents, "
          f"{metadata['tokens']} tokens (tokenizer {metadata['tokenizer']['path']})", flush=True)


if __name__ == "__main__":
    main()
