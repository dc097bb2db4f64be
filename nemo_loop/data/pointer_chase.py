"""Pointer chasing: a synthetic reasoning task where more latent loops should help.

A prompt lists shuffled assignments such as ``C = 7 ; F = C ; A = F ; K = 2 ; …`` and asks
``? A =``. Answering means following the chain A → F → C → 7: one attention lookup per hop,
so the number of hops a model can resolve grows with its depth — here, with the number of
times the shared layers are applied. Distractor chains keep the task from being solvable by
position or frequency. Every prompt has exactly one answer, checked by comparing digits.

Teachers in LLOPSD may get a privileged hint ``! 7 ;`` before the assignments (the OPSD
context); pretraining shows hints on some sequences so the model learns what they mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemo_loop.data.sequences import build_batch

PAD, BOS, EOS, EQUALS, SEMICOLON, QUERY, HINT = range(7)
FIRST_DIGIT, NUM_DIGITS = 7, 10
FIRST_VARIABLE, NUM_VARIABLES = FIRST_DIGIT + NUM_DIGITS, 24
VOCAB_SIZE = FIRST_VARIABLE + NUM_VARIABLES  # 41; models may have a larger vocab
_NAMES = {PAD: "<pad>", BOS: "<s>", EOS: "</s>", EQUALS: "=", SEMICOLON: ";", QUERY: "?",
          HINT: "!"}


@dataclass
class PointerChaseConfig:
    hops: int = 4  # chain length of the queried variable (test problems always use this)
    # Training chains are drawn from [min_hops, hops]: short chains teach the one-hop lookup
    # that long chains compose. None: always ``hops``.
    min_hops: int | None = None
    distractor_chains: int = 2
    hint_fraction: float = 0.3  # share of pretraining sequences that carry the answer hint
    train_seed: int = 0
    test_seed: int = 10_000_019  # a separate stream: test problems are never trained on

    def validate(self, vocab_size: int) -> None:
        if self.hops < 1 or self.distractor_chains < 0:
            raise ValueError("data: hops must be >= 1 and distractor_chains >= 0")
        if self.min_hops is not None and not 1 <= self.min_hops <= self.hops:
            raise ValueError(f"data.min_hops must be in [1, hops={self.hops}]")
        if (self.distractor_chains + 1) * self.hops > NUM_VARIABLES:
            raise ValueError(f"data: {(self.distractor_chains + 1) * self.hops} variables "
                             f"needed, the vocabulary has {NUM_VARIABLES}")
        if vocab_size < VOCAB_SIZE:
            raise ValueError(f"pointer chasing needs a vocab of at least {VOCAB_SIZE}, the "
                             f"model has {vocab_size}")
        if not 0.0 <= self.hint_fraction <= 1.0:
            raise ValueError("data.hint_fraction must be in [0, 1]")


@dataclass(frozen=True)
class Problem:
    prompt: tuple[int, ...]  # ends with "? X ="
    answer: int  # token id of the digit

    def with_hint(self) -> tuple[int, ...]:
        """The teacher's privileged prompt: the answer stated before the assignments."""
        return (BOS, HINT, self.answer, SEMICOLON) + self.prompt[1:]


def make_problem(config: PointerChaseConfig, generator: torch.Generator,
                 hops: int | None = None) -> Problem:
    def randint(high):
        return int(torch.randint(high, (1,), generator=generator))

    hops = hops or config.hops
    chains = config.distractor_chains + 1
    variables = (torch.randperm(NUM_VARIABLES, generator=generator)[:chains * hops]
                 + FIRST_VARIABLE).tolist()
    statements = []
    for chain in range(chains):
        names = variables[chain * hops:(chain + 1) * hops]
        statements.append((names[0], FIRST_DIGIT + randint(NUM_DIGITS)))
        statements += [(names[i], names[i - 1]) for i in range(1, len(names))]
        if chain == 0:
            query, answer = names[-1], statements[0][1]
    order = torch.randperm(len(statements), generator=generator).tolist()
    prompt = [BOS]
    for index in order:
        target, source = statements[index]
        prompt += [target, EQUALS, source, SEMICOLON]
    prompt += [QUERY, query, EQUALS]
    return Problem(tuple(prompt), answer)


def problems(config: PointerChaseConfig, count: int, split: str) -> list[Problem]:
    seed = {"train": config.train_seed, "test": config.test_seed}[split]
    generator = torch.Generator().manual_seed(seed)
    return [make_problem(config, generator) for _ in range(count)]


def sample_batch(config: PointerChaseConfig, batch_size: int,
                 generator: torch.Generator) -> dict:
    """Pretraining sequences ``prompt answer </s>``; the loss covers the answer and EOS."""
    prompts = []
    low = config.min_hops or config.hops
    for _ in range(batch_size):
        hops = low + int(torch.randint(config.hops - low + 1, (1,), generator=generator))
        problem = make_problem(config, generator, hops)
        hinted = float(torch.rand((), generator=generator)) < config.hint_fraction
        prompts.append((list(problem.with_hint() if hinted else problem.prompt),
                        [problem.answer, EOS]))
    batch = build_batch([p for p, _ in prompts], [r for _, r in prompts], PAD)
    loss_mask = torch.zeros(batch_size, batch.input_ids.shape[1] - 1)
    loss_mask[:, batch.response_window] = 1.0
    return dict(input_ids=batch.input_ids[:, :-1], labels=batch.input_ids[:, 1:],
                position_ids=batch.position_ids[:, :-1],
                attention_mask=batch.attention_mask[:, :, :-1, :-1], loss_mask=loss_mask)


def sequence_length(config: PointerChaseConfig) -> int:
    return 1 + 4 * (config.distractor_chains + 1) * config.hops + 3 + 3 + 2


def decode(ids) -> str:
    words = []
    for token in ids:
        if token in _NAMES:
            words.append(_NAMES[token])
        elif FIRST_DIGIT <= token < FIRST_VARIABLE:
            words.append(str(token - FIRST_DIGIT))
        else:
            words.append(chr(ord("A") + token - FIRST_VARIABLE))
    return " ".join(words)
