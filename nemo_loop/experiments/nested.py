"""Nested config dicts and their dotted keys: ``{"a": {"b": 1}}`` ⇄ ``a.b=1``."""

from __future__ import annotations

import json
import re


def dotted(values: dict) -> dict:
    """``{"a.b": 1}`` → ``{"a": {"b": 1}}`` (for merging dotted keys into nested configs)."""
    nested: dict = {}
    for key, value in values.items():
        *parents, last = key.split(".")
        target = nested
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value
    return nested


def flat_keys(values, prefix: str = "") -> list[str]:
    """Every leaf key of a nested dict, dotted."""
    if not isinstance(values, dict) or not values:
        return [prefix] if prefix else []
    return [key for name, value in values.items()
            for key in flat_keys(value, f"{prefix}.{name}" if prefix else str(name))]


def dotlist(items: dict) -> list[str]:
    """``{key: value}`` → ``["key=value"]`` that OmegaConf parses back to the same values."""
    out = []
    for key, value in items.items():
        if isinstance(value, str) and re.fullmatch(r"[A-Za-z_][\w./-]*", value) and \
                value.lower() not in ("true", "false", "null", "none", "yes", "no", "on", "off"):
            out.append(f"{key}={value}")
        else:
            out.append(f"{key}={json.dumps(value)}")
    return out


def flat_items(values: dict, prefix: str = "") -> dict:
    return {key: lookup(values, key) for key in flat_keys(values, prefix)}


def lookup(values: dict, key: str):
    for part in key.split(".") if key else []:
        values = values[part]
    return values


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (added/removed included)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return [] if old == new else [f"{prefix or '<root>'}: {old!r} → {new!r}"]
    found = []
    for key in sorted(set(old) | set(new), key=str):
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in old:
            found.append(f"{where} added")
        elif key not in new:
            found.append(f"{where} removed")
        else:
            found += differences(old[key], new[key], where)
    return found
