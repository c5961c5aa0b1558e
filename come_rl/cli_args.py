"""``key=value`` command-line arguments for the toolkit's scripts (train, evaluate, collect, experiments, bench).

The planning run (``come_rl.run``) uses Hydra; the other scripts take the same ``key=value`` shape through this one
parser, so an unknown key or a bad value gets the same clear error everywhere.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any


def _convert(key: str, raw: str, default: Any, converter: Callable[[str], Any] | None) -> Any:
    try:
        if converter is not None:
            return converter(raw)
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError("expected true or false")
            return raw.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, (dict, list)):
            return json.loads(raw)
        return raw
    except (ValueError, json.JSONDecodeError) as error:
        raise ValueError(f"bad value for {key}: {raw!r} ({error})") from error


def parse_key_values(argv: Sequence[str], defaults: dict[str, Any], usage: str = "",
                     converters: dict[str, Callable[[str], Any]] | None = None) -> dict[str, Any]:
    """Override ``defaults`` with ``key=value`` arguments; values are converted to the type of the default
    (or by ``converters[key]``). Unknown keys, missing ``=`` and unconvertible values raise a ValueError."""
    converters = converters or {}
    values = dict(defaults)
    for argument in argv:
        if "=" not in argument:
            raise ValueError(f"arguments are key=value, got {argument!r}; {usage or 'keys: ' + ', '.join(defaults)}")
        key, raw = argument.split("=", 1)
        if key not in defaults:
            raise ValueError(f"unknown key {key!r}; valid keys: {', '.join(defaults)}")
        values[key] = _convert(key, raw, defaults[key], converters.get(key))
    return values


def parse_dataclass(argv: Sequence[str], config_cls: type) -> Any:
    """``key=value`` arguments -> an instance of the dataclass ``config_cls`` (its fields are the keys)."""
    defaults = {}
    for field in dataclasses.fields(config_cls):
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
        else:
            defaults[field.name] = None
    return config_cls(**parse_key_values(argv, defaults))


def parse_cli(argv: Sequence[str], config_cls: type) -> Any:
    """:func:`parse_dataclass` for a ``main``: an unknown key, a bad value or a bad setting exits with its message."""
    try:
        return parse_dataclass(list(argv), config_cls)
    except ValueError as error:
        raise SystemExit(f"{error}") from error


def run_evaluation_cli(argv: Sequence[str], config_cls: type, evaluate: Callable[[Any], list[dict]]) -> Any:
    """The shared ``main`` of the agent evaluations (find the object, return to a seen place): parse ``key=value``
    into ``config_cls``, run ``evaluate``, turn bad settings into one ``error:`` line, print each summary row."""
    config = parse_cli(argv, config_cls)
    try:
        summaries = evaluate(config)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
    for row in summaries:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    return config
