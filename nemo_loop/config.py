"""Typed configs from OmegaConf YAML plus CLI dotlist overrides, checked once at load time.

A YAML file may start from another with ``base: other.yaml`` (relative to its own folder, then
to ``conf/``), which is how ``conf/ablations/*.yaml`` change one factor of ``conf/llopsd.yaml``.
``model=NAME`` (no dot) swaps the whole ``model`` section for ``conf/model/NAME.yaml`` (or a
path to a YAML file); ``section.key=value`` overrides one field. Unknown keys and wrong types
are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
T = TypeVar("T")


def read_section(path: str | os.PathLike, schema: type[T]) -> T:
    """A YAML file holding one section (a model config, say) → ``schema``, defaults for every
    field it omits; unknown keys and wrong types are errors naming the file."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema),
                                                   OmegaConf.load(path)))
    except OmegaConfBaseException as error:
        raise ValueError(f"invalid {schema.__name__} in {path}: "
                         f"{str(error).splitlines()[0]}") from None


def _model_section(name: str, schema: type) -> dict:
    """The whole ``model`` section from ``conf/model/NAME.yaml`` (or a YAML path): every field,
    defaults included, so a swapped-in model keeps nothing of the one it replaces."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else CONF_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
        raise ValueError(f"model config {name!r} not found at {path}; known models: {known}")
    return to_dict(read_section(path, schema))


def _yaml_with_bases(path: Path, seen: tuple = ()) -> list:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ValueError(f"config {path} includes itself through 'base'")
    layer = OmegaConf.load(path)
    base = layer.pop("base", None)
    if base is None:
        return [layer]
    candidates = [path.parent / base, CONF_DIR / base]
    base_path = next((c for c in candidates if c.is_file()), candidates[0])
    return _yaml_with_bases(base_path, seen + (path.resolve(),)) + [layer]


def load_config(schema: type[T], yaml_path: str | os.PathLike | None,
                overrides: list[str] | None = None, *, check_paths: bool = True) -> T:
    """Schema defaults ← YAML file ← ``model=NAME`` ← dotlist overrides; then ``validate()``
    (``check_paths=False``: ``validate(check_paths=False)``, for schemas that take it — a plan
    of a run whose inputs do not exist yet)."""
    overrides = list(overrides or [])
    base = OmegaConf.structured(schema)

    def model_schema() -> type:
        if "model" not in base:
            raise ValueError(f"{schema.__name__} has no model section to load a model into")
        return OmegaConf.get_type(base, "model")
    layers = []
    if yaml_path is not None:
        layers.extend(_yaml_with_bases(Path(yaml_path)))
    dotted = []
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        if key == "model" and not value.startswith("{"):
            layers.append(OmegaConf.create({"model": _model_section(value, model_schema())}))
        else:
            dotted.append(item)
    try:
        for layer in layers:
            if "model" in layer and isinstance(layer.model, str):
                layer.model = _model_section(layer.model, model_schema())
            base = OmegaConf.merge(base, layer)
        base = OmegaConf.merge(base, OmegaConf.from_dotlist(dotted))
        config = OmegaConf.to_object(base)
    except OmegaConfBaseException as error:
        where = getattr(error, "full_key", None)
        reason = str(error).splitlines()[0]
        raise ValueError(f"invalid config at {where!r}: {reason}" if where
                         else f"invalid config: {reason}") from None
    if check_paths:
        config.validate()
    else:
        config.validate(check_paths=False)
    return config


def to_dict(config) -> dict:
    """A config (dataclass) as plain dicts and lists — written as JSON or YAML, what
    ``OmegaConf.to_container`` of it gives (tuples become lists), without building an OmegaConf
    tree first (a study resolves hundreds of configs)."""
    if not dataclasses.is_dataclass(config):
        return OmegaConf.to_container(OmegaConf.structured(config))
    return _plain(dataclasses.asdict(config))


def _plain(value):
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def config_from_command_line(schema: type[T], default_yaml: str, description: str,
                             argv: list[str] | None = None) -> T:
    """``[--config FILE] [key=value ...]`` as every recipe takes them → a validated config."""
    import argparse

    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONF_DIR / default_yaml))
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    return load_config(schema, args.config, args.overrides)
