"""Pretraining sequences from tokenized text corpora, through megatron-core's data pipeline.

A corpus is what ``recipes/preprocess_text.py`` writes (``<prefix>.bin``/``.idx`` in megatron's
indexed format, plus ``<prefix>.meta.json``). :class:`TextCorpus` builds the train, validation
and test splits with megatron-core's ``BlendedMegatronDatasetBuilder`` over ``GPTDataset``:
blends of several corpora with weights, megatron's split string (document ranges per split),
``sequence_length`` tokens per sample with documents packed back to back, and its EOD options
(``eod_mask_loss``, ``reset_position_ids``, ``reset_attention_mask``). The C++ index helpers
(``helpers_cpp``) ship prebuilt in the megatron-core wheel; a missing build is an error that says
how to compile it.

Sample i of the training split is the same on every run with the same ``seed`` (megatron's
shuffles are seeded), and step k of a run reads samples [(k − 1)·B, k·B) of the global batch B,
so the data position is the step: a resumed run reads exactly what the uninterrupted one did.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nemo_loop.data.text_preprocessing import META_SUFFIX, file_sha256, tokenizer_file

SPLITS = ("train", "validation", "test")


@dataclass
class TextDataConfig:
    # Corpus prefixes (<prefix>.bin/.idx/.meta.json from recipes/preprocess_text.py); relative
    # paths are under the working directory.
    paths: list[str] = field(default_factory=lambda: ["runs/data/math_text"])
    # Blend weights, one per path (null: in proportion to the corpora's sizes).
    weights: list[float] | None = None
    # megatron's split string: train, validation, test shares of each corpus's documents.
    split: str = "98,1,1"
    sequence_length: int = 128  # tokens per training sequence (<= model.max_sequence_length)
    # Must be the tokenizer the corpus was written with (checked against its .meta.json).
    tokenizer_path: str = "tokenizer/ouro-1.4b"
    eod_mask_loss: bool = False  # no loss on predicting the end-of-document token
    reset_position_ids: bool = False  # positions restart after every end of document
    reset_attention_mask: bool = False  # no attention across documents (explicit masks)
    # Held-out sequences scored per loop (the first N of each split; fewer if it has fewer).
    validation_sequences: int = 32
    test_sequences: int = 32

    def validate(self, vocab_size: int | None = None, max_sequence_length: int | None = None,
                 check_paths: bool = True) -> None:
        if not self.paths:
            raise ValueError("data.text.paths must name at least one corpus prefix")
        if self.weights is not None and (len(self.weights) != len(self.paths)
                                         or any(w <= 0 for w in self.weights)):
            raise ValueError(f"data.text.weights must be one positive weight per path "
                             f"({len(self.paths)}), got {self.weights}")
        if self.sequence_length < 2:
            raise ValueError(f"data.text.sequence_length must be >= 2, got "
                             f"{self.sequence_length}")
        if max_sequence_length is not None and self.sequence_length > max_sequence_length:
            raise ValueError(f"data.text.sequence_length {self.sequence_length} exceeds "
                             f"model.max_sequence_length {max_sequence_length}")
        if self.validation_sequences < 0 or self.test_sequences < 0:
            raise ValueError("data.text.validation_sequences and test_sequences must be >= 0")
        _split_shares(self.split)
        if check_paths:
            tokenizer = tokenizer_file(self.tokenizer_path)
            for path in self.paths:
                check_corpus(path, tokenizer, vocab_size)


def _split_shares(split: str) -> list[float]:
    try:
        shares = [float(part) for part in split.split(",")]
    except ValueError:
        shares = []
    if not 1 <= len(shares) <= 3 or any(s < 0 for s in shares) or sum(shares) <= 0:
        raise ValueError(f"data.text.split must be up to three non-negative shares "
                         f"'train,validation,test' with a positive sum, got {split!r}")
    return shares + [0.0] * (3 - len(shares))


def corpus_metadata(prefix: str | Path) -> dict:
    path = Path(str(prefix) + META_SUFFIX)
    missing = [str(prefix) + s for s in (".bin", ".idx", META_SUFFIX)
               if not Path(str(prefix) + s).is_file()]
    if missing:
        raise FileNotFoundError(f"corpus {prefix} is incomplete: missing {missing} (write it "
                                f"with recipes/preprocess_text.py)")
    return json.loads(path.read_text())


def check_corpus(prefix: str | Path, tokenizer: Path, vocab_size: int | None) -> dict:
    """The corpus's metadata, after checking that it was tokenized with ``tokenizer`` and that
    its ids fit a model of ``vocab_size``."""
    metadata = corpus_metadata(prefix)
    written = metadata["tokenizer"]
    if written["sha256"] != file_sha256(tokenizer):
        raise ValueError(f"corpus {prefix} was tokenized with {written['path']} (sha256 "
                         f"{written['sha256'][:12]}…), not with data.text.tokenizer_path "
                         f"{tokenizer} (sha256 {file_sha256(tokenizer)[:12]}…)")
    if vocab_size is not None and written["vocab_size"] > vocab_size:
        raise ValueError(f"corpus {prefix} holds ids of a {written['vocab_size']}-token "
                         f"vocabulary but model.vocab_size is {vocab_size}")
    return metadata


class _CorpusTokenizer:
    """What ``GPTDatasetConfig`` reads of a tokenizer: the EOD id, the vocabulary size and an
    identity for megatron's index cache. It has no pad token: Ouro's pad is its EOD token, and
    megatron would otherwise warn and fall back to −1 itself."""

    def __init__(self, metadata: dict):
        self.eod = metadata["tokenizer"]["eod_id"]
        self.vocab_size = metadata["tokenizer"]["vocab_size"]
        self.unique_identifiers = OrderedDict(
            [("class", "nemo_loop.data.text._CorpusTokenizer"),
             ("sha256", metadata["tokenizer"]["sha256"])])


def _require_helpers() -> None:
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"megatron-core's C++ dataset helpers (megatron.core.datasets.helpers_cpp) do not "
            f"import ({error}); build them once with `python -c 'from megatron.core.datasets."
            f"utils import compile_helpers; compile_helpers()'` (needs a C++ compiler and "
            f"pybind11)") from None


class TextCorpus:
    """The three splits of a (blended) corpus as megatron ``GPTDataset``s; collective: every
    rank of the job must build it (megatron's builder synchronises on the world group)."""

    def __init__(self, config: TextDataConfig, train_samples: int, seed: int):
        from megatron.core.datasets.blended_megatron_dataset_builder import (
            BlendedMegatronDatasetBuilder,
        )
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        _require_helpers()
        tokenizer = tokenizer_file(config.tokenizer_path)
        metadata = [check_corpus(path, tokenizer, None) for path in config.paths]
        self.config = config
        self.eod_id = metadata[0]["tokenizer"]["eod_id"]
        dataset_config = GPTDatasetConfig(
            random_seed=seed, sequence_length=config.sequence_length,
            blend=([str(Path(p)) for p in config.paths], config.weights), split=config.split,
            tokenizer=_CorpusTokenizer(metadata[0]), reset_position_ids=config.reset_position_ids,
            reset_attention_mask=config.reset_attention_mask,
            eod_mask_loss=config.eod_mask_loss,
            create_attention_mask=config.reset_attention_mask, path_to_cache=None)
        # Held-out splits: one pass over their documents (None), never repeated.
        sizes = [train_samples, None, None]
        datasets = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True,
                                                 dataset_config).build()
        self.splits = dict(zip(SPLITS, datasets))
        if self.splits["train"] is None or len(self.splits["train"]) < train_samples:
            raise ValueError(f"data.text.split {config.split!r} leaves the training split "
                             f"too few documents for {train_samples} sequences")

    def heldout_count(self, split: str) -> int:
        wanted = (self.config.validation_sequences if split == "validation"
                  else self.config.test_sequences)
        dataset = self.splits[split]
        return 0 if dataset is None else min(wanted, len(dataset))

    def batch(self, split: str, indices: list[int]) -> dict:
        """Samples ``indices`` of ``split`` as a next-token micro-batch: ``input_ids``,
        ``labels``, ``loss_mask`` and ``position_ids`` ``[b, s]``, ``row_lengths`` ``[b]``, and
        ``attention_mask`` ``[b, 1, s, s]`` (True = may not attend) only with
        ``reset_attention_mask`` (else the model's causal mask)."""
        samples = [self.splits[split][i] for i in indices]
        batch = dict(input_ids=torch.stack([s["tokens"] for s in samples]),
                     labels=torch.stack([s["labels"] for s in samples]),
                     loss_mask=torch.stack([s["loss_mask"] for s in samples]).float(),
                     position_ids=torch.stack([s["position_ids"] for s in samples]))
        # packed: every row is sequence_length real tokens (FLOPs accounting reads this)
        batch["row_lengths"] = torch.full((len(samples),), batch["input_ids"].shape[1])
        if self.config.reset_attention_mask:
            batch["attention_mask"] = torch.stack([s["attention_mask"] for s in samples])
        return batch
