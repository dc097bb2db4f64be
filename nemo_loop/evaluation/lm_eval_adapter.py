"""lm-evaluation-harness model ``nemo_loop``: a checkpoint of this project at any loop budget,
through the project's own model, head, tokenizer, chat template and generation engine.

    import lm_eval
    import nemo_loop.evaluation.lm_eval_adapter  # registers "nemo_loop" with lm-eval

    lm_eval.simple_evaluate(
        model="nemo_loop", tasks=["arc_easy"], apply_chat_template=True,
        model_args="checkpoint=runs/llopsd,num_loops=2,batch_size=32")

Only this module imports lm_eval (importing it registers the model), so nothing else in the
project pays for lm-eval's import or depends on it being installed.

The three kinds of request, with lm-eval's HF-model semantics (``lm_eval.models.huggingface``):

* ``loglikelihood``: Σ log p of the continuation's tokens read out at loop ``num_loops``, and
  whether each token is the argmax (is_greedy); context + continuation truncated from the left
  to ``max_length`` + 1 tokens; batches of ``batch_size``, longest first.
* ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_length`` tokens after
  an ``<|endoftext|>`` prefix, every token scored once.
* ``generate_until``: the generation engine of ``generation.backend`` (native: the megatron model
  itself), greedy unless the task samples (``do_sample``, temperature, top_p, top_k); the chat
  template's stop tokens end a sequence, ``until`` strings cut the decoded text, contexts are
  truncated from the left to leave ``max_gen_toks`` of room.

Every scored or generated token's loop is counted per task (``loop_counts``): R̃ for each token
at a static budget; with an exit policy (``generation.exit``) the loop the token exited at.
"""

from __future__ import annotations

import json
from collections import defaultdict

import lm_eval.models  # noqa: F401  lm-eval's own models, registered before ours
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from nemo_loop.evaluation.lm_eval_config import LMEvalModelArgs, exit_policy
from nemo_loop.evaluation.lm_eval_model import (
    LoadedModel,
    build_model,
    check_max_length,
    continuation_scores,
    prepare_model,
)
from nemo_loop.generation.engine import SamplingParams

# generation_kwargs the engine honours; any other key is an error naming it.
GENERATION_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k")


@register_model("nemo_loop")
class NemoLoopLM(TemplateLM):
    def __init__(self, loaded: LoadedModel | None = None, args: LMEvalModelArgs | None = None,
                 **model_args):
        """From lm-eval: ``model_args`` (``LMEvalModelArgs`` fields, dotted keys allowed).
        From Python: ``loaded`` (a model built once, evaluated at several budgets) and its
        ``args``."""
        super().__init__()
        if loaded is None:
            args = LMEvalModelArgs.from_kwargs(model_args)
            loaded = build_model(prepare_model(args, [args.num_loops or 1]), args)
        elif args is None or model_args:
            raise TypeError("pass either model_args or (loaded, args)")
        self.args, self.loaded = args, loaded
        self.model, self.prompter = loaded.model, loaded.prompter
        self.num_loops = args.num_loops or self.model.num_loops
        if not 1 <= self.num_loops <= self.model.num_loops:
            raise ValueError(f"num_loops={self.num_loops} is outside 1..R = 1.."
                             f"{self.model.num_loops}")
        self._max_length = check_max_length(args.max_length,
                                            self.model.config.max_sequence_length)
        self.loop_counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # tokens, loops
        self._engine = None

    # ----- what lm-eval reads -----

    @property
    def eot_token_id(self) -> int:
        return self.prompter.pad_id  # <|endoftext|>: the prefix of an empty context

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self.args.max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.prompter.source.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs) -> list[int]:
        return self.prompter.encode_text(string)

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        return self.prompter.render_chat(chat_history, add_generation_prompt)

    def get_model_info(self) -> dict:
        return {"checkpoint": self.loaded.checkpoint, "num_loops": self.num_loops,
                "max_loops": self.model.num_loops, "exit_policy": exit_policy(
                    self.args.generation), "tokenizer": self.prompter.source}

    def mean_loops(self) -> dict[str, dict]:
        """Per task: tokens scored or generated and the mean loop they were read out at."""
        return {task: {"tokens": tokens, "mean_loops": loops / tokens if tokens else None}
                for task, (tokens, loops) in self.loop_counts.items()}

    # ----- log-likelihoods -----

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, task_names=None
                              ) -> list[tuple[float, bool]]:
        """``requests``: (strings, context ids, continuation ids); ``task_names`` one per
        request (lm-eval's own calls come through :meth:`loglikelihood`)."""
        if exit_policy(self.args.generation) != "static":
            raise NotImplementedError(
                "generation.exit applies to generate_until; log-likelihoods under an exit "
                "policy (a teacher-forced exit loop per position) are not wired yet: score "
                "loglikelihood tasks at static loop budgets")
        sequences, lengths = [], []
        for _, context, continuation in requests:
            if len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens does not fit "
                                 f"max_length={self.max_length}")
            sequences.append((context + continuation)[-(self.max_length + 1):])
            lengths.append(len(continuation))
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        scores: list = [None] * len(sequences)
        size = self.args.batch_size
        for start in range(0, len(order), size):
            batch = order[start:start + size]
            results = continuation_scores(self.model, [sequences[i] for i in batch],
                                          [lengths[i] for i in batch], self.num_loops,
                                          self.prompter.pad_id)
            for index, result in zip(batch, results):
                scores[index] = result
        for name, n in zip(task_names or [None] * len(lengths), lengths):
            self._count(name, [self.num_loops] * n)
        return scores

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        encoded = []
        for request in requests:
            context, continuation = request.args
            if context == "":
                ids = self.tok_encode(continuation)
                pair = ([self.prefix_token_id], ids) if ids[:1] != [self.prefix_token_id] \
                    else (ids[:1], ids[1:])
            else:
                pair = self._encode_pair(context, continuation)
            encoded.append(((context, continuation), *pair))
        return self._loglikelihood_tokens(encoded, task_names=[r.task_name for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners, names = [], [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            for context, predicted in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, predicted))
                owners.append(index)
                names.append(request.task_name)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows,
                                                                          task_names=names)):
            totals[owner] += logprob
        return totals

    # ----- generation -----

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests grouped by their generation_kwargs; each group is one engine call."""
        groups: dict[str, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(index)
        texts: list = [None] * len(requests)
        for indices in groups.values():
            first = requests[indices[0]]
            sampling, until = self._sampling(first.args[1], first.task_name)
            room = self.max_length - sampling.max_new_tokens
            if room < 1:
                raise ValueError(f"task {first.task_name!r}: max_gen_toks="
                                 f"{sampling.max_new_tokens} leaves no room for a context in "
                                 f"max_length={self.max_length}")
            prompts = [(self.tok_encode(requests[i].args[0]) or [self.prefix_token_id])[-room:]
                       for i in indices]
            # Longest first: batches of similar length waste less left padding.
            order = sorted(range(len(prompts)), key=lambda j: -len(prompts[j]))
            results = self.engine.generate([prompts[j] for j in order], self.num_loops, sampling)
            for j, result in zip(order, results):
                request = requests[indices[j]]
                text = self.prompter.decode(result.token_ids)
                texts[indices[j]] = postprocess_generated_text(text, until, None)
                self._count(request.task_name, token_loops(result))
        return texts

    @property
    def engine(self):
        if self._engine is None:
            from nemo_loop.generation.backend import build_engine

            self._engine = build_engine(self.args.generation, self.model,
                                        max_batch_size=self.args.batch_size)
        return self._engine

    def close(self) -> None:
        """Release the generation engine (vLLM: its KV cache and workers)."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def _sampling(self, gen_kwargs: dict, task_name: str | None
                  ) -> tuple[SamplingParams, list[str]]:
        unknown = sorted(set(gen_kwargs) - set(GENERATION_KWARGS)
                         - {"max_new_tokens", "max_tokens", "max_completion_tokens"})
        if unknown:
            raise ValueError(f"task {task_name!r}: generation_kwargs {unknown} are not supported "
                             f"by the nemo_loop model (it takes {list(GENERATION_KWARGS)})")
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs["until"],
                                      eos=self.prompter.tokenizer.decode(
                                          [self.eot_token_id], skip_special_tokens=False))
        sampling = SamplingParams(
            temperature=float(kwargs.get("temperature", 1.0)) if kwargs["do_sample"] else 0.0,
            top_p=float(kwargs.get("top_p") or 1.0), top_k=int(kwargs.get("top_k") or 0),
            max_new_tokens=int(kwargs["max_gen_toks"]),
            stop_token_ids=self.prompter.stop_token_ids, seed=self.args.seed,
            exit=self.args.generation.exit)
        return sampling, until

    def _count(self, task_name: str | None, loops: list[int]) -> None:
        counts = self.loop_counts[task_name or "unnamed"]
        counts[0] += len(loops)
        counts[1] += sum(loops)


def token_loops(result) -> list[int]:
    """The loop each generated token was read out at (``GenerationResult.exit_loops``)."""
    return list(result.exit_loops)
