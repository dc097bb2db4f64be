"""Tasks: one home for what depends on what the model is asked (see :mod:`nemo_loop.tasks.base`).

Every config that prompts a model has a ``task:`` section; ``task.name`` picks the task and the
section named after it holds that task's settings, so switching task is one field::

    task:
      name: shell_game          # math | shell_game
      shell_game: {num_swaps: 8}
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nemo_loop.data.chat import ChatConfig
from nemo_loop.tasks.base import (
    CONTEXT_KINDS,
    GROUP_CONTEXT_KINDS,
    Attempt,
    Task,
    TrainingExample,
)
from nemo_loop.tasks.math import MathTask
from nemo_loop.tasks.shell_game import ShellGameConfig, ShellGameTask

TASKS: dict[str, type[Task]] = {task.name: task for task in (MathTask, ShellGameTask)}


@dataclass
class MathTaskConfig:
    prompt: ChatConfig = field(default_factory=ChatConfig)
    verify_timeout_s: int = 5  # per math-verify parse or comparison
    # Wording of the teacher contexts (LLOPSD's privileged information).
    answer_template: str = "(For reference, the correct final answer is {answer}.)"
    concise_instruction: str = ("Be concise: reach the final answer with as few steps and "
                                "tokens as possible.")
    # sdpo: how a sibling rollout the verifier marked correct is shown to the teacher.
    sibling_template: str = "(A correct solution from an earlier attempt:)\n{attempt}"

    def validate(self) -> None:
        self.prompt.validate()
        if self.verify_timeout_s < 1:
            raise ValueError(f"task.math.verify_timeout_s must be >= 1 second, got "
                             f"{self.verify_timeout_s}")
        _check_template("task.math.answer_template", self.answer_template, "answer")
        _check_template("task.math.sibling_template", self.sibling_template, "attempt")


def _check_template(name: str, template: str, field_name: str) -> None:
    try:
        template.format(**{field_name: "x"})
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"{name} must be a format string with only {{{field_name}}} in it, "
                         f"got {template!r} ({error!r})") from None


@dataclass
class TaskConfig:
    name: str = "math"
    math: MathTaskConfig = field(default_factory=MathTaskConfig)
    shell_game: ShellGameConfig = field(default_factory=ShellGameConfig)

    def validate(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"task.name must be one of {sorted(TASKS)}, got {self.name!r}")
        # Settings of a task that is not the one chosen would be silently ignored.
        for other in TASKS:
            section = getattr(self, other)
            if other != self.name and section != type(section)():
                raise ValueError(f"task.{other} is set but task.name is {self.name!r}; set "
                                 f"task.name={other} or remove the task.{other} settings")
        getattr(self, self.name).validate()
        build_task(self).validate()


def build_task(config: TaskConfig) -> Task:
    """The task object for ``config`` (its section: ``config.<name>``)."""
    if config.name not in TASKS:
        raise ValueError(f"task.name must be one of {sorted(TASKS)}, got {config.name!r}")
    return TASKS[config.name](getattr(config, config.name))


__all__ = ["Attempt", "CONTEXT_KINDS", "GROUP_CONTEXT_KINDS", "MathTaskConfig", "Task", "TaskConfig", "TrainingExample",
           "build_task", "TASKS"]
