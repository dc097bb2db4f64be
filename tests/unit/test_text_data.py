"""Text corpora: JSONL → megatron's .bin/.idx round-trips token for token, bad input names its
file and line, a corpus is checked against the run's tokenizer, and megatron's GPTDataset packs
the documents into next-token samples."""

import json
from pathlib import Path

import pytest
import torch

from nemo_loop.data.prompts import PromptSetError, data_path
from nemo_loop.data.text import TextCorpus, TextDataConfig
from nemo_loop.data.text_preprocessing import META_SUFFIX, PreprocessConfig, preprocess

RECORDS = [
    {"problem": "What is $1+1$?", "solution": "It is $\\boxed{2}$."},
    {"problem": "Solve $x^2=4$.", "solution": "Both $x=2$ and $x=-2$ work, so $\\boxed{\\pm 2}$."},
    {"problem": "Name a prime.", "solution": "Seven: $\\boxed{7}$.", "extra": 1},
    {"problem": "Held out?", "solution": "Yes."},
]


def _tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(data_path("tokenizer/ouro-1.4b/tokenizer.json")))


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                            for line in lines))
    return path


def _config(tmp_path, source: Path, **overrides) -> PreprocessConfig:
    exclude = _write(tmp_path / "exclude.jsonl", [{"problem": "Held out?"}])
    return PreprocessConfig(input=str(source), exclude=str(exclude),
                            output_prefix=str(tmp_path / "corpus"), **overrides)


def test_bin_idx_round_trip_token_for_token(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    source = _write(tmp_path / "docs.jsonl", RECORDS)
    metadata = preprocess(_config(tmp_path, source))
    tokenizer = _tokenizer()
    eod = tokenizer.token_to_id("<|endoftext|>")
    expected = [tokenizer.encode(f"{r['problem']}\n\n{r['solution']}",
                                 add_special_tokens=False).ids + [eod] for r in RECORDS[:3]]
    dataset = IndexedDataset(str(tmp_path / "corpus"))
    assert len(dataset) == 3  # the excluded record is gone
    assert [dataset[i].tolist() for i in range(3)] == expected
    assert dataset.document_indices.tolist() == [0, 1, 2, 3]
    assert metadata["documents"] == 3 and metadata["tokens"] == sum(map(len, expected))
    assert metadata["tokenizer"]["vocab_size"] == 49152 and metadata["tokenizer"]["eod_id"] == eod
    assert json.loads(Path(str(tmp_path / "corpus") + META_SUFFIX).read_text()) == metadata
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("line, message", [
    ('{"problem": "x", "solution": ', "malformed JSON"),
    ('["not", "an", "object"]', "record is a list, not a JSON object"),
    ('{"problem": "x"}', "missing field 'solution'"),
    ('{"problem": "x", "solution": "  "}', "field 'solution' is empty"),
    ('{"problem": null, "solution": "y"}', "field 'problem' is empty"),
])
def test_bad_records_name_the_file_and_line(tmp_path, line, message):
    source = _write(tmp_path / "bad.jsonl", [RECORDS[0], "", line, RECORDS[1]])
    with pytest.raises(PromptSetError) as raised:
        preprocess(_config(tmp_path, source))
    assert str(raised.value).startswith(f"{source}:3: ") and message in str(raised.value)
    assert not Path(str(tmp_path / "corpus") + ".idx").exists()


def test_bad_settings_are_refused(tmp_path):
    source = _write(tmp_path / "docs.jsonl", RECORDS)
    with pytest.raises(FileNotFoundError, match="input file .*missing.jsonl"):
        preprocess(_config(tmp_path, tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="text_fields"):
        preprocess(_config(tmp_path, source, text_fields=[]))
    with pytest.raises(PromptSetError, match="exclude_field"):
        preprocess(_config(tmp_path, source, exclude_field="question"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small corpus of MATH problems + solutions (the first 40 kept records)."""
    prefix = tmp_path_factory.mktemp("text") / "math"
    preprocess(PreprocessConfig(limit=40, output_prefix=str(prefix)))
    return prefix


def test_a_corpus_is_checked_against_the_run(corpus, tmp_path):
    config = TextDataConfig(paths=[str(corpus)], sequence_length=16)
    config.validate(49152, 64)
    with pytest.raises(ValueError, match="exceeds model.max_sequence_length 8"):
        config.validate(49152, 8)
    with pytest.raises(ValueError, match="49152-token vocabulary but model.vocab_size is 64"):
        config.validate(64, 64)
    other = tmp_path / "tokenizer.json"
    other.write_text(data_path("tokenizer/ouro-1.4b/tokenizer.json").read_text() + "\n")
    with pytest.raises(ValueError, match="was tokenized with .*not with data.text.tokenizer_path"):
        TextDataConfig(paths=[str(corpus)], tokenizer_path=str(other)).validate()
    with pytest.raises(FileNotFoundError, match=r"incomplete: missing .*nothing\.bin"):
        TextDataConfig(paths=[str(tmp_path / "nothing")]).validate()
    with pytest.raises(ValueError, match="one positive weight per path"):
        TextDataConfig(paths=[str(corpus)], weights=[1.0, 2.0]).validate()
    with pytest.raises(ValueError, match="data.text.split"):
        TextDataConfig(paths=[str(corpus)], split="a,b").validate()


def test_the_data_section_picks_one_source():
    from nemo_loop.algorithms.pretrain_data import PretrainDataConfig

    with pytest.raises(ValueError, match="data.source must be one of"):
        PretrainDataConfig(source="web").validate(64, 64)
    with pytest.raises(ValueError, match="data.text is set but data.source is 'task'"):
        PretrainDataConfig(text=TextDataConfig(sequence_length=64)).validate(64, 64)


def test_gpt_dataset_packs_documents_into_next_token_samples(corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    seq = 16
    text = TextCorpus(TextDataConfig(paths=[str(corpus)], split="90,5,5", sequence_length=seq),
                      train_samples=20, seed=3)
    batch = text.batch("train", [0, 1, 2])
    assert batch["input_ids"].shape == (3, seq) and batch["row_lengths"].tolist() == [seq] * 3
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    assert batch["loss_mask"].sum() == 3 * seq and "attention_mask" not in batch
    # sample 0 is the start of the split's documents in megatron's shuffled document order
    train = text.splits["train"]
    documents = IndexedDataset(str(corpus))
    stream = torch.cat([torch.from_numpy(documents[int(d)].astype("int64"))
                        for d in train.document_index[:10]])
    order = train.shuffle_index.tolist().index(0)  # the shuffled position of sample 0
    sample = text.batch("train", [order])
    assert torch.equal(sample["input_ids"][0], stream[:seq])
    assert torch.equal(sample["labels"][0], stream[1:seq + 1])
    assert text.heldout_count("validation") == min(32, len(text.splits["validation"]))
    # the same seed draws the same samples (resume relies on it)
    again = TextCorpus(TextDataConfig(paths=[str(corpus)], split="90,5,5", sequence_length=seq),
                       train_samples=20, seed=3).batch("train", [0, 1, 2])
    assert torch.equal(again["input_ids"], batch["input_ids"])
