"""The shell game: a synthetic reasoning task on which more latent loops measurably help.

A ball starts under one of ``num_cups`` cups; ``k`` swaps each exchange two cups; the question
is where the ball ends up. The problem text is ``ball 1 | 0-1 1-2 0-2 0-1 =`` and its answer
``2``. (The leading ``ball`` is a fixed first token; tiny models learn the task several times
faster with one, presumably as an attention sink.)

Why this task: the ball's cup after swap t depends on its cup after swap t−1, so a model that
answers in one forward pass must carry a state through k sequential updates (swaps of three or
more cups generate a non-abelian group: counting swaps is no shortcut). Each application of
the shared layers can advance that state by a bounded number of swaps, so a LoopLM trained on
mixed lengths answers short games at any loop count and long games only with more loops —
exactly the quality-vs-loops curve that loop compression has to preserve.

Problems are text plus an answer word, encoded by a word-level tokenizer that is a function of
the config (see :func:`build_tokenizer`; :func:`write_tokenizer` saves it as ``tokenizer.json``);
the rest of the project reads them through the same :class:`~nemo_loop.data.chat.ChatTokenizer`
and prompt-set JSONL path as any math data. The splits are disjoint by construction: a
problem's split is a hash of its text.

Mixed-difficulty held-out sets (``heldout_swaps``): by default only full-length games are held
out, so every evaluation game has ``num_swaps`` swaps. Listing shorter lengths k in
``heldout_swaps`` holds out games of those lengths too, and :func:`mixed_problems` draws a
held-out set stratified by k (per-k accuracy: :meth:`ShellGameTask.difficulty`). Short lengths
have few games (3 cups: 3^(k+1), i.e. 9 single-swap games), so a hash *bucket* per game would
hold out a random share of them (blake2b puts 5 of the 9 single-swap games in test). Instead the
games of a listed length k are ranked by their hash and exact shares are held out: the first
⌈20%⌉ are test, the next ⌈10%⌉ validation, the rest stay in training (k = 2: 6 test, 3
validation, 18 train of 27). Single-swap games are never held out (k ≥ 2): they are the rules
every longer game composes, and with some of them held out pretraining stayed at chance.
Full-length games keep the bucket rule, so the 8-swap sets are unchanged; with
``heldout_swaps: []`` nothing changes at all (the training stream included).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nemo_loop.data.chat import END_OF_TEXT, IM_END, IM_START, ChatConfig, ChatTokenizer
from nemo_loop.data.prompts import PromptRecord
from nemo_loop.tasks.answers import Verdict, check_exact
from nemo_loop.tasks.base import NO_CONTEXT, Attempt, Task, TrainingExample

SPLITS = ("train", "validation", "test")
UNKNOWN = "<unk>"
BALL, SEPARATOR, QUESTION, HINT = "ball", "|", "=", "hint"
# The OPSD teacher context for this task: the answer, stated after the question. Pretraining
# shows it on ``hint_fraction`` of the sequences.
HINT_TEMPLATE = HINT + " {answer}"
# A game's split is its hash bucket: 2 of 10 buckets are test, 1 validation, 7 train.
_HASH_BUCKETS = 10
_SPLIT_SHARE = {"train": 0.7, "validation": 0.1, "test": 0.2}
# Held-out short games are ranked among all games of their length: enumerable lengths only.
MAX_RANKED_GAMES = 1 << 20
# Up to this many full-length games the splits are counted exactly (well under a second);
# above it, by their expected share, and a request may take at most half of that.
_ENUMERATION_LIMIT = 100_000
_ESTIMATE_MARGIN = 0.5
# Rejection sampling gives up after this many draws per game it expects to need.
_DRAWS_PER_GAME = 1000


@dataclass
class ShellGameConfig:
    num_cups: int = 3
    num_swaps: int = 8  # every evaluation problem has this many swaps
    min_swaps: int = 1  # training games draw their length uniformly from [min_swaps, num_swaps]
    # Share of pretraining sequences that state the answer first (``hint 2``): the OPSD teacher
    # context, which the model must have seen to make use of it.
    hint_fraction: float = 0.25
    seed: int = 0
    # Shorter game lengths that also have held-out (validation/test) games, for mixed-difficulty
    # evaluation sets; [] holds out full-length games only (see the module docstring).
    heldout_swaps: list[int] = field(default_factory=list)

    def validate(self) -> None:
        if not 3 <= self.num_cups <= 9:
            raise ValueError(f"task.shell_game.num_cups must be in [3, 9] (two cups have no non-abelian "
                             f"swap group), got {self.num_cups}")
        if not 1 <= self.min_swaps <= self.num_swaps:
            raise ValueError(f"task.shell_game: need 1 <= min_swaps <= num_swaps, got min_swaps="
                             f"{self.min_swaps}, num_swaps={self.num_swaps}")
        if not 0.0 <= self.hint_fraction <= 1.0:
            raise ValueError(f"task.shell_game.hint_fraction must be in [0, 1], got {self.hint_fraction}")
        lengths = list(self.heldout_swaps)
        if any(not isinstance(k, int) or not 2 <= k <= self.num_swaps for k in lengths) \
                or len(set(lengths)) != len(lengths):
            raise ValueError(f"task.shell_game.heldout_swaps must be distinct game lengths in "
                             f"[2, num_swaps={self.num_swaps}], got {lengths} (single-swap "
                             f"games are the rules every longer game composes: with some held "
                             f"out, pretraining stayed at chance)")
        for k in lengths:
            if k < self.num_swaps and games_of_length(self, k) > MAX_RANKED_GAMES:
                raise ValueError(f"task.shell_game.heldout_swaps: length {k} has "
                                 f"{games_of_length(self, k)} games; held-out short games are "
                                 f"ranked among all games of their length, at most "
                                 f"{MAX_RANKED_GAMES}")

    def swaps(self) -> list[tuple[int, int]]:
        return [(i, j) for i in range(self.num_cups) for j in range(i + 1, self.num_cups)]

    def max_prompt_words(self) -> int:
        return 4 + self.num_swaps + 2  # ball start | swaps = hint answer


@dataclass(frozen=True)
class Problem:
    text: str
    answer: str


def play(config: ShellGameConfig, start: int, swaps: list[int]) -> int:
    pairs = config.swaps()
    cup = start
    for swap in swaps:
        first, second = pairs[swap]
        cup = second if cup == first else first if cup == second else cup
    return cup


def render(config: ShellGameConfig, start: int, swaps: list[int]) -> Problem:
    pairs = config.swaps()
    words = [BALL, str(start), SEPARATOR] + [f"{pairs[s][0]}-{pairs[s][1]}" for s in swaps] + [QUESTION]
    return Problem(" ".join(words), str(play(config, start, swaps)))


def split_of(problem: Problem, config: ShellGameConfig) -> str:
    """Full-length games are held out by hash bucket; shorter games only when their length is
    in ``heldout_swaps`` (exact shares by hash rank), else training keeps them all — among them
    the single-swap rules the long games compose."""
    length = len(problem.text.split()) - 4
    if length < config.num_swaps:
        if length not in config.heldout_swaps:
            return "train"
        return _ranked_splits(config.num_cups, length).get(problem.text, "train")
    return _hashed_split(problem.text)


def _hashed_split(text: str) -> str:
    # A cryptographic hash: CRC32 is linear, and its buckets correlated with the start cup and
    # the answer (test answers were skewed towards cup 0).
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    bucket = int.from_bytes(digest, "little") % _HASH_BUCKETS
    return "test" if bucket < 2 else "validation" if bucket == 2 else "train"


def _game_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def games_of_length(config: ShellGameConfig, length: int) -> int:
    return config.num_cups * len(config.swaps()) ** length


@functools.lru_cache(maxsize=64)
def _games_by_hash(num_cups: int, length: int) -> tuple[str, ...]:
    """Every game of one length, ranked by its hash."""
    config = ShellGameConfig(num_cups=num_cups, num_swaps=max(length, 1))
    return tuple(sorted((render(config, start, list(swaps)).text
                         for start in range(num_cups)
                         for swaps in itertools.product(range(len(config.swaps())),
                                                        repeat=length)),
                        key=_game_hash))


@functools.lru_cache(maxsize=64)
def _ranked_splits(num_cups: int, length: int) -> dict[str, str]:
    """Every game of one short held-out length → its split: the ⌈20%⌉ lowest hashes are test,
    the next ⌈10%⌉ validation, the rest train."""
    texts = _games_by_hash(num_cups, length)
    test = math.ceil(_SPLIT_SHARE["test"] * len(texts))
    validation = math.ceil(_SPLIT_SHARE["validation"] * len(texts))
    return {text: "test" if rank < test else "validation" if rank < test + validation
            else "train" for rank, text in enumerate(texts)}


def heldout_lengths(config: ShellGameConfig) -> list[int]:
    """Game lengths with held-out games: ``heldout_swaps`` and ``num_swaps``."""
    return sorted(set(config.heldout_swaps) | {config.num_swaps})


def mixed_problems(config: ShellGameConfig, split: str, count_per_length: int
                   ) -> list[tuple[int, Problem]]:
    """A set stratified by game length: (k, problem) for ``count_per_length`` distinct games of
    ``split`` per length k in :func:`heldout_lengths` — all of them where a short length has
    fewer. The full-length part is the first games of :func:`problems` (the 8-swap set of the
    same config); a short length's games are its games of ``split`` in a seeded order. The same
    list for the same config. ``split`` train gives training prompts of the same lengths as the
    held-out sets (disjoint from them by construction)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if count_per_length < 1:
        raise ValueError(f"count_per_length must be >= 1, got {count_per_length}")
    chosen = []
    for length in heldout_lengths(config):
        if length == config.num_swaps:
            games = problems(config, split, count_per_length)
        else:
            texts = sorted(text for text, where in _ranked_splits(config.num_cups,
                                                                   length).items()
                           if where == split)
            generator = torch.Generator().manual_seed(
                (config.seed * len(SPLITS) + SPLITS.index(split)) * 1000 + length)
            order = torch.randperm(len(texts), generator=generator).tolist()
            games = [_problem_of(config, texts[i]) for i in order[:count_per_length]]
        chosen += [(length, game) for game in games]
    return chosen


def _problem_of(config: ShellGameConfig, text: str) -> Problem:
    words = text.split()
    pairs = {f"{i}-{j}": index for index, (i, j) in enumerate(config.swaps())}
    return render(config, int(words[1]), [pairs[word] for word in words[3:-1]])


def swaps_of(text: str) -> int | None:
    """The number of swaps of a rendered game (None: not a game)."""
    words = text.split()
    if len(words) < 4 or words[0] != BALL or words[2] != SEPARATOR or words[-1] != QUESTION:
        return None
    return len(words) - 4


def draw(config: ShellGameConfig, split: str, generator: torch.Generator,
         num_swaps: int | None = None) -> Problem:
    """One random problem of ``split`` (rejection sampling on the split hash); held-out splits
    only have full-length games."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split != "train":
        num_swaps = config.num_swaps
    attempts = _DRAWS_PER_GAME * _HASH_BUCKETS
    for _ in range(attempts):
        length = num_swaps or config.min_swaps + int(torch.randint(
            config.num_swaps - config.min_swaps + 1, (1,), generator=generator))
        start = int(torch.randint(config.num_cups, (1,), generator=generator))
        swaps = torch.randint(len(config.swaps()), (length,), generator=generator).tolist()
        problem = render(config, start, swaps)
        if split_of(problem, config) == split:
            return problem
    size, exact = split_size(config, split)
    raise RuntimeError(f"no {split} game in {attempts} draws: with num_cups={config.num_cups} "
                       f"and num_swaps={config.num_swaps} the {split} split holds "
                       f"{'' if exact else 'about '}{size} of {num_games(config)} games")


def num_games(config: ShellGameConfig) -> int:
    """Distinct full-length games (all splits together)."""
    return config.num_cups * len(config.swaps()) ** config.num_swaps


def split_size(config: ShellGameConfig, split: str) -> tuple[int, bool]:
    """How many distinct full-length games ``split`` holds, and whether that is exact (small
    game spaces are enumerated) or the split's expected share of all games."""
    if num_games(config) <= _ENUMERATION_LIMIT:
        return _counted_splits(config.num_cups, config.num_swaps)[split], True
    return int(_SPLIT_SHARE[split] * num_games(config)), False


@functools.lru_cache(maxsize=16)
def _counted_splits(num_cups: int, num_swaps: int) -> dict[str, int]:
    """Every full-length game's split (they depend on the game's text only)."""
    config = ShellGameConfig(num_cups=num_cups, num_swaps=num_swaps)
    names = [f"{i}-{j}" for i, j in config.swaps()]
    counts = dict.fromkeys(SPLITS, 0)
    for start in range(num_cups):
        for swaps in itertools.product(names, repeat=num_swaps):
            counts[_hashed_split(f"{BALL} {start} {SEPARATOR} {' '.join(swaps)} {QUESTION}")] += 1
    return counts


def check_count(config: ShellGameConfig, split: str, count: int) -> None:
    """Refuse a request for more distinct games than ``split`` holds (counted exactly where
    the game space is small; above that, more than half its expected size: rejection sampling
    would crawl towards the last ones)."""
    size, exact = split_size(config, split)
    limit = size if exact else int(_ESTIMATE_MARGIN * size)
    if count > limit:
        held = (f"holds {size} of its {num_games(config)} games" if exact else
                f"holds about {size} (its share of {num_games(config)} games, too many to "
                f"count), of which at most {limit} may be asked for")
        raise ValueError(f"{count} distinct {split} games requested, but with num_cups="
                         f"{config.num_cups} and num_swaps={config.num_swaps} the {split} split "
                         f"{held}; ask for at most {limit} or use longer games")


def problems(config: ShellGameConfig, split: str, count: int) -> list[Problem]:
    """``count`` distinct full-length problems of ``split``; the same list for the same config.

    Distinct, so that an evaluation set's size is its number of independent games."""
    check_count(config, split, count)
    generator = torch.Generator().manual_seed(config.seed * len(SPLITS) + SPLITS.index(split))
    size, _ = split_size(config, split)
    # _DRAWS_PER_GAME × the split draws one game of the split takes on average
    attempts = _DRAWS_PER_GAME * count * max(1, round(num_games(config) / max(size, 1)))
    chosen: dict[str, Problem] = {}
    for _ in range(attempts):
        if len(chosen) == count:
            break
        problem = draw(config, split, generator, config.num_swaps)
        chosen.setdefault(problem.text, problem)
    if len(chosen) < count:
        raise RuntimeError(f"found {len(chosen)} of {count} distinct {split} games in "
                           f"{attempts} draws (num_cups={config.num_cups}, num_swaps="
                           f"{config.num_swaps}); ask for fewer or use longer games")
    return list(chosen.values())


# ----- tokenizer -----

def vocabulary(config: ShellGameConfig) -> list[str]:
    """Special tokens at the ids ChatML code expects, then the task's words."""
    cups = [str(c) for c in range(config.num_cups)]
    swaps = [f"{i}-{j}" for i, j in config.swaps()]
    return [END_OF_TEXT, IM_START, IM_END, UNKNOWN, BALL, SEPARATOR, QUESTION, HINT] + cups + swaps


def build_tokenizer(config: ShellGameConfig):
    """A word-level ``tokenizers.Tokenizer`` (whitespace split) for the task's vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    words = vocabulary(config)
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)},
                                           unk_token=UNKNOWN))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins with spaces
    tokenizer.add_special_tokens([AddedToken(t, special=True)
                                  for t in (END_OF_TEXT, IM_START, IM_END, UNKNOWN)])
    return tokenizer


def write_tokenizer(config: ShellGameConfig, directory: str | Path) -> Path:
    """Save the task's tokenizer as ``directory/tokenizer.json`` (an artifact for other tools)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    build_tokenizer(config).save(str(path))
    return path


# How the task's prompts are rendered: raw words, no system turn, no instruction.
CHAT_CONFIG = ChatConfig(tokenizer_path="", system_prompt=None, instruction_suffix="",
                         template="plain")


class ShellGameTask(Task):
    name = "shell_game"
    # The vocabulary has words for an answer hint only: opsd hints the reference answer, sdpo
    # the answer of a sibling rollout the verifier marked correct. There are no words for
    # feedback or instructions (sdpo_verdict, opsdc), so sdpo masks out rollouts whose
    # siblings all failed. none: the plain prompt needs no words.
    context_kinds = ("opsd", "sdpo", "none")
    synthetic = True

    def validate(self) -> None:
        self.config.validate()

    def tokenizer(self, data_root=None) -> ChatTokenizer:
        return ChatTokenizer(CHAT_CONFIG, build_tokenizer(self.config),
                             source=f"shell_game(num_cups={self.config.num_cups})")

    def check(self, response: str, reference: str) -> Verdict:
        return check_exact(response, reference)

    def teacher_context(self, kind: str, record: PromptRecord, verdict: Verdict,
                        include_solution: bool = True, sibling: Attempt | None = None
                        ) -> str | None:
        self.check_context_kind(kind)
        if kind == "none":
            return NO_CONTEXT
        if kind == "sdpo":
            # A correct sibling's answer word (its first word) is the hint; no feedback words.
            return None if sibling is None else HINT_TEMPLATE.format(
                answer=sibling.verdict.extracted)
        return HINT_TEMPLATE.format(answer=record.answer)

    sft_needs_solutions = False

    def sft_target(self, record: PromptRecord) -> str:
        """The answer word is the whole reference response."""
        return record.answer

    def training_examples(self, count: int, generator: torch.Generator
                          ) -> list[TrainingExample]:
        """Training games of mixed length; ``hint_fraction`` of them state the answer first
        (the OPSD teacher's context), so the teacher knows what the hint means."""
        examples = []
        for _ in range(count):
            problem = draw(self.config, "train", generator)
            hinted = float(torch.rand((), generator=generator)) < self.config.hint_fraction
            context = HINT_TEMPLATE.format(answer=problem.answer) if hinted else None
            examples.append(TrainingExample(problem.text, problem.answer, context))
        return examples

    def heldout_problems(self, split: str, count: int) -> list[PromptRecord]:
        return [PromptRecord(p.text, p.answer, None, str(i))
                for i, p in enumerate(problems(self.config, split, count))]

    def difficulty_levels(self) -> list[int]:
        return heldout_lengths(self.config) if self.config.heldout_swaps else []

    def stratified_problems(self, split: str, count_per_length: int) -> list[PromptRecord]:
        """A set of ``split`` stratified by game length (:func:`mixed_problems`), ids
        ``k<k>-<i>``."""
        return [PromptRecord(p.text, p.answer, None, f"k{k}-{i}")
                for i, (k, p) in enumerate(mixed_problems(self.config, split, count_per_length))]

    def difficulty(self, problem: str) -> int | None:
        """The number of swaps: per-k accuracy in evaluation reports."""
        return swaps_of(problem)

    def max_sequence_tokens(self) -> int:
        return self.config.max_prompt_words() + 2  # + answer and end of turn

    def check_count(self, split: str, count: int) -> None:
        check_count(self.config, split, count)
