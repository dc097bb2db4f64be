"""JSONL / JSON text → megatron-core's indexed ``.bin``/``.idx`` corpus, with the Ouro tokenizer.

    python recipes/preprocess_text.py [--config conf/preprocess_text.yaml] [key=value ...]

Each record becomes one document: its ``text_fields`` joined by ``separator``, tokenized with
the tokenizer at ``tokenizer_path`` (no special tokens added), then the end-of-document token
``<|endoftext|>`` when ``append_eod`` (megatron's ``--append-eod``: ``GPTDataset`` packs documents
back to back, and the EOD token is where one ends). Documents go through megatron-core's
``IndexedDatasetBuilder`` (uint16 ids for vocabularies below 65,500, else int32), so the output is
exactly what megatron's own ``preprocess_data.py`` writes and ``GPTDataset`` reads.

Beside ``<prefix>.bin`` and ``<prefix>.idx`` goes ``<prefix>.meta.json``: the tokenizer (path,
SHA-256 of its file, vocabulary size, EOD id), the input and the counts. Training reads it to
refuse a corpus tokenized with another tokenizer (:mod:`nemo_loop.data.text`).

Bad input stops the run with the file and line: a malformed JSON line, a record that is not an
object, a missing text field, or a field that is null or blank. ``exclude`` drops records whose
first text field equals one in another file (e.g. MATH500's problems, held out for evaluation).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from nemo_loop.data.prompts import PromptSetError, data_path, read_records

META_SUFFIX = ".meta.json"
END_OF_DOCUMENT = "<|endoftext|>"


@dataclass
class PreprocessConfig:
    # JSONL, or JSON holding one array of records; relative paths are under the data root.
    input: str = "math_test_full/test.jsonl"
    # Fields joined (in this order) into one document per record.
    text_fields: list[str] = field(default_factory=lambda: ["problem", "solution"])
    separator: str = "\n\n"
    # Records whose first text field equals the ``exclude_field`` of a record in this file are
    # dropped (null: keep every record). Relative paths are under the data root.
    exclude: str | None = "math500/test.jsonl"
    exclude_field: str = "problem"
    tokenizer_path: str = "tokenizer/ouro-1.4b"  # a tokenizer.json or its directory
    append_eod: bool = True
    limit: int | None = None  # the first N kept records (null: all)
    # Writes <output_prefix>.bin/.idx/.meta.json; relative to the working directory.
    output_prefix: str = "runs/data/math_text"

    def validate(self) -> None:
        if not self.text_fields or any(not name for name in self.text_fields):
            raise ValueError(f"text_fields must name at least one field, got {self.text_fields}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or null, got {self.limit}")
        if not self.output_prefix:
            raise ValueError("output_prefix is required")
        for what, path in (("input", self.input), ("exclude", self.exclude)):
            if path is not None and not data_path(path).is_file():
                raise FileNotFoundError(f"{what} file {data_path(path)} does not exist "
                                        f"(relative paths are under the data root)")
        tokenizer_file(self.tokenizer_path)


def tokenizer_file(path: str) -> Path:
    """The ``tokenizer.json`` that ``path`` (the file or its directory, relative paths under the
    data root) names."""
    resolved = data_path(path)
    if resolved.is_dir():
        resolved = resolved / "tokenizer.json"
    if not resolved.is_file():
        raise FileNotFoundError(f"tokenizer file {resolved} does not exist")
    return resolved


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def documents(config: PreprocessConfig):
    """(where, text) of every kept record, ``where`` being ``file:line``."""
    path = data_path(config.input)
    excluded = _excluded_texts(config)
    kept = 0
    for line, record in read_records(path):
        where = f"{path}:{line}"
        parts = []
        for name in config.text_fields:
            if name not in record:
                raise PromptSetError(f"{where}: missing field {name!r} (fields: "
                                     f"{sorted(record)})")
            value = record[name]
            if value is None or not str(value).strip():
                raise PromptSetError(f"{where}: field {name!r} is empty")
            parts.append(str(value))
        if parts[0] in excluded:
            continue
        yield where, config.separator.join(parts)
        kept += 1
        if config.limit is not None and kept >= config.limit:
            return


def _excluded_texts(config: PreprocessConfig) -> set[str]:
    if config.exclude is None:
        return set()
    path = data_path(config.exclude)
    texts = set()
    for line, record in read_records(path):
        if config.exclude_field not in record:
            raise PromptSetError(f"{path}:{line}: missing field {config.exclude_field!r} "
                                 f"(exclude_field; fields: {sorted(record)})")
        texts.add(str(record[config.exclude_field]))
    return texts


def preprocess(config: PreprocessConfig, batch_size: int = 256) -> dict:
    """Write the corpus; returns its metadata (also written to ``<prefix>.meta.json``)."""
    import numpy
    from megatron.core.datasets.indexed_dataset import (
        DType,
        IndexedDatasetBuilder,
        get_bin_path,
        get_idx_path,
    )
    from tokenizers import Tokenizer

    config.validate()
    tokenizer_path = tokenizer_file(config.tokenizer_path)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    eod_id = tokenizer.token_to_id(END_OF_DOCUMENT)
    if config.append_eod and eod_id is None:
        raise ValueError(f"tokenizer {tokenizer_path} has no {END_OF_DOCUMENT} token to end "
                         f"documents with (set append_eod=false)")
    prefix = Path(config.output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    # Written under temporary names and renamed at the end: a killed run leaves no corpus that
    # looks complete.
    staging = prefix.with_name(prefix.name + ".tmp")
    builder = IndexedDatasetBuilder(get_bin_path(str(staging)),
                                    dtype=DType.optimal_dtype(vocab_size))
    counts = {"documents": 0, "tokens": 0}

    def flush(texts: list[str]) -> None:
        for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
            ids = encoding.ids + ([eod_id] if config.append_eod else [])
            builder.add_document(numpy.asarray(ids), [len(ids)])
            counts["documents"] += 1
            counts["tokens"] += len(ids)

    pending = []
    for _, text in documents(config):
        pending.append(text)
        if len(pending) == batch_size:
            flush(pending)
            pending = []
    if pending:
        flush(pending)
    if counts["documents"] == 0:
        raise PromptSetError(f"{data_path(config.input)}: no records left to write")
    builder.finalize(get_idx_path(str(staging)))
    metadata = {
        "input": str(data_path(config.input)), "text_fields": list(config.text_fields),
        "separator": config.separator,
        "exclude": None if config.exclude is None else str(data_path(config.exclude)),
        "tokenizer": {"path": str(tokenizer_path), "sha256": file_sha256(tokenizer_path),
                      "vocab_size": vocab_size, "eod_id": eod_id},
        "append_eod": config.append_eod, **counts,
    }
    Path(str(staging) + META_SUFFIX).write_text(json.dumps(metadata, indent=2) + "\n")
    for suffix in (".bin", ".idx", META_SUFFIX):
        os.replace(str(staging) + suffix, str(prefix) + suffix)
    return metadata
