"""lm-eval tasks, offline: find and load them by name before any model is built, and write the
shell game as two local YAML tasks.

Nothing is downloaded at run time: :func:`force_offline` switches the Hugging Face libraries
to offline mode before lm-eval loads a dataset, so a task whose data is neither local (lm-eval's
``dataset_path: json`` + ``dataset_kwargs.data_files``) nor in the Hugging Face cache fails at
load time with an error naming it. lm_eval is imported inside the functions that need it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from nemo_loop.data.prompts import write_prompt_set
from nemo_loop.tasks.shell_game import ShellGameConfig, ShellGameTask

OFFLINE_SWITCHES = {  # environment variable: modules that read it once, at import
    "HF_DATASETS_OFFLINE": ("datasets.config",),
    "HF_HUB_OFFLINE": ("datasets.config", "huggingface_hub.constants"),
    "HF_EVALUATE_OFFLINE": ("evaluate.config",),
}
SHELL_GAME_MC, SHELL_GAME_GEN = "shell_game_mc", "shell_game_gen"
# The answer word and the end of turn: what a trained model generates for a game.
SHELL_GAME_GEN_TOKENS = 2


def force_offline() -> None:
    """Hugging Face datasets/hub/evaluate in offline mode, in this process and its children
    (also where those libraries are already imported)."""
    for variable, modules in OFFLINE_SWITCHES.items():
        os.environ[variable] = "1"
        for module in modules:
            if module in sys.modules and hasattr(sys.modules[module], variable):
                setattr(sys.modules[module], variable, True)


# ----- finding and loading tasks -----

def load_tasks(names: list[str], include_paths: list[str]) -> tuple[object, list]:
    """(lm-eval TaskManager, the loaded Task/Group objects of ``names``), offline.

    The include paths are indexed first; lm-eval's own ~15k task definitions only when a name
    is not among them (indexing those takes tens of seconds). An unknown name, or a task whose
    data cannot be read offline, is a ValueError naming it.
    """
    force_offline()
    from lm_eval.tasks import TaskManager

    for path in include_paths:
        if not Path(path).is_dir():
            raise ValueError(f"include_paths: {path} is not a directory")
    manager = TaskManager(include_path=include_paths, include_defaults=False) \
        if include_paths else None
    if manager is None or unknown_tasks(names, manager):
        manager = TaskManager(include_path=include_paths or None)
    check_known(names, manager, include_paths)
    return manager, [item for name in names for item in _load_offline(manager, name)]


def unknown_tasks(names: list[str], manager) -> list[str]:
    """Names that are neither in ``manager``'s index nor a YAML file."""
    return [name for name in names
            if name not in manager.all_tasks and not Path(name).is_file()]


def check_known(names: list[str], manager, include_paths: list[str]) -> None:
    unknown = unknown_tasks(names, manager)
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}: neither lm-eval's tasks nor the "
                         f"YAML tasks under include_paths {include_paths} define them")


def _load_offline(manager, name: str) -> list:
    """The top-level objects lm-eval builds for ``name``: its group, or its task(s)."""
    try:
        loaded = manager.load([name])
    except (ConnectionError, OSError) as error:
        raise ValueError(
            f"lm-eval task {name!r} needs data that is not on this machine ({error}). "
            f"Evaluation runs offline: put the dataset in the Hugging Face cache beforehand, "
            f"or define the task on a local file (dataset_path: json, dataset_kwargs: "
            f"{{data_files: ...}})") from error
    except Exception as error:  # noqa: BLE001 - lm-eval raises anything; name the task
        raise ValueError(f"lm-eval task {name!r} failed to load: {type(error).__name__}: "
                         f"{error}") from error
    if name in loaded.get("groups", {}):
        return [loaded["groups"][name]]
    return list(loaded["tasks"].values())


def output_types(tasks: list) -> dict[str, str]:
    """{task name: lm-eval output type} of every leaf task among loaded tasks/groups."""
    leaves = []
    for item in tasks:
        leaves += item.get_all_tasks() if hasattr(item, "get_all_tasks") else [item]
    return {task.task_name: task.OUTPUT_TYPE for task in leaves}


# ----- the shell game as lm-eval tasks -----

def write_shell_game_tasks(directory: str | os.PathLike, config: ShellGameConfig, split: str,
                           problems: int) -> Path:
    """``problems`` held-out games of ``split`` as ``shell_game_<split>.jsonl`` and two lm-eval
    tasks reading it: ``shell_game_mc`` (log-likelihood of each cup after the game, accuracy)
    and ``shell_game_gen`` (greedy generation; exact match of the first word, as the task's own
    answer check). Returns the folder to put in ``include_paths``."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    data = write_prompt_set(directory / f"shell_game_{split}.jsonl",
                            ShellGameTask(config).heldout_problems(split, problems))
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {split: str(data)}},
              "test_split": split, "doc_to_text": "{{problem}}", "doc_to_target": "answer",
              "target_delimiter": " ", "metadata": {"version": 1}}
    tasks = {
        SHELL_GAME_MC: {
            "task": SHELL_GAME_MC, **common, "output_type": "multiple_choice",
            "doc_to_choice": [str(cup) for cup in range(config.num_cups)],
            "metric_list": [{"metric": "acc", "aggregation": "mean",
                             "higher_is_better": True}]},
        SHELL_GAME_GEN: {
            "task": SHELL_GAME_GEN, **common, "output_type": "generate_until",
            "generation_kwargs": {"until": [], "do_sample": False,
                                  "max_gen_toks": SHELL_GAME_GEN_TOKENS},
            "filter_list": [{"name": "first_word", "filter": [
                {"function": "regex", "regex_pattern": r"(\S+)"},
                {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                             "higher_is_better": True}]},
    }
    for name, definition in tasks.items():
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(definition, sort_keys=False))
    return directory
